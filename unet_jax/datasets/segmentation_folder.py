"""`segmentation_folder`: a user's own folder of images and masks, as a TFDS builder.

Layout (2D, config '2d', the default)::

    <root>/<split>/images/<id>.{png,tif,tiff,jpg,jpeg}
    <root>/<split>/masks/<id>.png      # pixel value = class index

Layout (3D, config '3d')::

    <root>/<split>/images/<id>.{nii,nii.gz}
    <root>/<split>/masks/<id>.{nii,nii.gz}

`<split>` is any of 'train', 'val' and 'test'; at least one must exist. Images
are grey or RGB (2D), or single- or multi-channel NIfTI volumes (3D, channels
on the 4th NIfTI axis). NIfTI arrays (x, y, z) are transposed to (D, H, W) =
(z, y, x) and the voxel spacing (NIfTI zooms) is kept in the same order.
Hidden files (names starting with '.') are ignored; any other file is either
used or reported.

Nothing is silently dropped. `list_pairs` (file names only) and `validate`
(reads every file) raise `BadDataError`, a `ValueError` naming each offending
file, for: an image without a mask or a mask without an image, an unknown
extension, an empty split, a 3D volume in a 2D data set or the other way
round, an unreadable or truncated file, image and mask shapes that differ,
mask values that are not class indices in [0, num_classes), and images whose
channel counts differ. The builder validates the whole folder before it writes
anything.

Use from a config::

    config.data.name = 'segmentation_folder'
    config.data.config = '2d'  # or '3d'
    config.data.root = '/path/to/root'

or directly with TFDS::

    builder = tfds.builder('segmentation_folder/2d', data_dir=...)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir='/path/to/root'))

The input pipeline names the built copy after a fingerprint of the folder (file
names, sizes and modification times) and `num_classes`, so editing the folder
rebuilds it instead of reading a stale copy.
"""

import collections
import dataclasses
import hashlib
import os
import pathlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from unet_jax.datasets import cpu_tensorflow

SPLITS = ('train', 'val', 'test')
IMAGE_EXTENSIONS = {2: ('.png', '.tif', '.tiff', '.jpg', '.jpeg'), 3: ('.nii', '.nii.gz')}
MASK_EXTENSIONS = {2: ('.png',), 3: ('.nii', '.nii.gz')}
_MAX_LISTED_ERRORS = 20


class BadDataError(ValueError):
  """A file of a segmentation folder is missing, unreadable or inconsistent."""


def _raise_all(errors: list[str]) -> None:
  if not errors:
    return
  shown = errors[:_MAX_LISTED_ERRORS]
  more = len(errors) - len(shown)
  message = f'{len(errors)} problem(s) in the segmentation folder:\n  ' + '\n  '.join(
      shown
  )
  if more:
    message += f'\n  ... and {more} more.'
  raise BadDataError(message)


def _split_extension(name: str) -> tuple[str, str]:
  lower = name.lower()
  if lower.endswith('.nii.gz'):
    return name[: -len('.nii.gz')], '.nii.gz'
  stem, ext = os.path.splitext(name)
  return stem, ext.lower()


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example of a folder: its id and the paths of its image and mask."""

  id: str
  image: str
  mask: str


def _list_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if not p.name.startswith('.'))


def list_pairs(root: str | os.PathLike, *, ndim: int) -> dict[str, list[Pair]]:
  """Pairs images with masks by file name, without reading any file.

  Args:
    root: The folder holding `train/`, `val/` and `test/`.
    ndim: 2 or 3; which extensions are allowed.

  Returns:
    The pairs of each split present, sorted by id.

  Raises:
    BadDataError: naming every file or folder at fault (see module docstring).
  """
  if ndim not in (2, 3):
    raise ValueError(f'ndim must be 2 or 3, got {ndim}.')
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise BadDataError(
        f'{root}: segmentation folder root does not exist or is not a folder.'
    )
  present = [s for s in SPLITS if (root / s).is_dir()]
  if not present:
    raise BadDataError(
        f'{root}: no split folder found; expected at least one of {list(SPLITS)},'
        ' each with images/ and masks/.'
    )
  other = ('2d', 2) if ndim == 3 else ('3d', 3)
  errors = []
  pairs = {}
  for split in present:
    found = {}
    for kind, allowed in (
        ('images', IMAGE_EXTENSIONS[ndim]),
        ('masks', MASK_EXTENSIONS[ndim]),
    ):
      folder = root / split / kind
      if not folder.is_dir():
        errors.append(f'{folder}: missing folder.')
        found[kind] = {}
        continue
      by_id = {}
      for path in _list_files(folder):
        stem, ext = _split_extension(path.name)
        if path.is_dir():
          errors.append(f'{path}: unexpected folder inside {kind}/.')
        elif ext not in allowed:
          if ext in IMAGE_EXTENSIONS[other[1]] + MASK_EXTENSIONS[other[1]]:
            dims = f'a {other[1]}D file in a {ndim}D data set'
            errors.append(f"{path}: {dims}; set config.data.config='{other[0]}'.")
          else:
            errors.append(f'{path}: unknown extension; {kind}/ takes {list(allowed)}.')
        elif stem in by_id:
          errors.append(f'{path}: duplicate id {stem!r} (also {by_id[stem].name}).')
        else:
          by_id[stem] = path
      found[kind] = by_id
    images, masks = found['images'], found['masks']
    for stem in sorted(images.keys() - masks.keys()):
      if (root / split / 'masks').is_dir():
        errors.append(f'{images[stem]}: image without a mask (expected masks/{stem}.*).')
    for stem in sorted(masks.keys() - images.keys()):
      if (root / split / 'images').is_dir():
        errors.append(f'{masks[stem]}: mask without an image (expected images/{stem}.*).')
    common = sorted(images.keys() & masks.keys())
    if not images and not masks and (root / split / 'images').is_dir():
      errors.append(f'{root / split}: empty split (no images).')
    pairs[split] = [Pair(stem, str(images[stem]), str(masks[stem])) for stem in common]
  _raise_all(errors)
  return pairs


def fingerprint(
    root: str | os.PathLike, pairs: dict[str, list[Pair]], *, extra: str = ''
) -> str:
  """A short hash of the folder's file names, sizes and modification times."""
  digest = hashlib.sha256(extra.encode())
  root = pathlib.Path(root)
  for split in sorted(pairs):
    for pair in pairs[split]:
      for path in (pair.image, pair.mask):
        stat = os.stat(path)
        rel = os.path.relpath(path, root)
        digest.update(f'{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()[:12]


def _read_2d(path: str, *, is_mask: bool) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as im:
    if getattr(im, 'n_frames', 1) > 1:
      raise BadDataError(
          f'{path}: a multi-page image (a 3D volume) in a 2D data set; set'
          " config.data.config='3d'."
      )
    im.load()
    mode = im.mode
    if is_mask:
      if mode not in ('1', 'L', 'P', 'I', 'I;16', 'I;16B', 'I;16L'):
        raise BadDataError(
            f'{path}: mask has mode {mode}; masks must be single-channel PNGs whose'
            ' pixel values are class indices.'
        )
      return np.asarray(im).astype(np.int64)
    if mode in ('P', 'CMYK', 'YCbCr', 'RGBA', 'LAB', 'HSV'):
      im = im.convert('RGB')
    elif mode in ('1', 'LA'):
      im = im.convert('L')
    array = np.asarray(im)
  if array.ndim == 2:
    array = array[..., None]
  return array.astype(np.float32)


def _read_3d(path: str, *, is_mask: bool) -> tuple[np.ndarray, tuple[float, ...]]:
  import nibabel  # pylint: disable=g-import-not-at-top

  volume = nibabel.load(path)
  array = np.asanyarray(volume.dataobj)
  zooms = tuple(round(float(z), 6) for z in volume.header.get_zooms())
  if array.ndim < 3:
    raise BadDataError(
        f'{path}: a {array.ndim}D array {array.shape} in a 3D data set; set'
        " config.data.config='2d' for 2D images."
    )
  if array.ndim > 4 or (is_mask and array.ndim == 4 and array.shape[3] != 1):
    raise BadDataError(
        f'{path}: unexpected array shape {array.shape} for a 3D'
        f' {"mask" if is_mask else "image"}.'
    )
  if array.ndim == 3:
    array = array[..., None]
  array = np.transpose(array, (2, 1, 0, 3))  # (x, y, z, c) -> (z, y, x, c).
  spacing = tuple(reversed(zooms[:3]))
  if is_mask:
    return array[..., 0], spacing
  return array.astype(np.float32), spacing


def read_image(path: str, *, ndim: int) -> tuple[np.ndarray, tuple[float, ...] | None]:
  """Reads an image: float32 [*spatial, C] and the spacing (3D) or None (2D).

  Raises:
    BadDataError: naming the file, if it is unreadable, truncated or of the
      wrong dimensionality.
  """
  try:
    if ndim == 2:
      return _read_2d(path, is_mask=False), None
    return _read_3d(path, is_mask=False)
  except BadDataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BadDataError(
        f'{path}: unreadable or truncated image ({type(e).__name__}: {e}).'
    ) from e


def read_mask(path: str, *, ndim: int) -> tuple[np.ndarray, tuple[float, ...] | None]:
  """Reads a mask: int64 [*spatial] class indices, and the spacing or None.

  Raises:
    BadDataError: naming the file, if it is unreadable, truncated, of the wrong
      dimensionality, or holds values that are not non-negative integers.
  """
  try:
    if ndim == 2:
      mask, spacing = _read_2d(path, is_mask=True), None
    else:
      mask, spacing = _read_3d(path, is_mask=True)
  except BadDataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BadDataError(
        f'{path}: unreadable or truncated mask ({type(e).__name__}: {e}).'
    ) from e
  if not np.issubdtype(mask.dtype, np.integer):
    if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
      raise BadDataError(
          f'{path}: mask holds non-integer values; masks must hold class indices.'
      )
  mask = mask.astype(np.int64)
  if mask.size and mask.min() < 0:
    raise BadDataError(
        f'{path}: mask holds negative value {mask.min()}; masks must hold class indices.'
    )
  return mask, spacing


def validate(
    pairs: dict[str, list[Pair]], *, ndim: int, num_classes: int | None = None
) -> dict[str, object]:
  """Reads every file once and checks the whole folder.

  Args:
    pairs: From `list_pairs`.
    ndim: 2 or 3.
    num_classes: If given, every mask value must be below it. If None, it is
      inferred as the largest mask value plus one, and every class below it
      must occur somewhere (so a 0/255 mask is reported, not taken as 256
      classes).

  Returns:
    Metadata: num_classes, num_channels, ndim, min_shape, max_shape, spacing
    (median per axis, 3D only), num_examples per split and class_pixels (pixel
    count of each class over all splits).

  Raises:
    BadDataError: listing every offending file.
  """
  errors = []
  channels = collections.Counter()
  first_with_channels = {}
  min_shape, max_shape, spacings = None, None, []
  class_pixels = collections.Counter()
  max_by_file = {}
  for split_pairs in pairs.values():
    for pair in split_pairs:
      try:
        image, image_spacing = read_image(pair.image, ndim=ndim)
        mask, mask_spacing = read_mask(pair.mask, ndim=ndim)
      except BadDataError as e:
        errors.append(str(e))
        continue
      if image.shape[:-1] != mask.shape:
        errors.append(
            f'{pair.image}: image shape {image.shape[:-1]} differs from mask shape'
            f' {mask.shape} ({pair.mask}).'
        )
        continue
      if image_spacing is not None and not np.allclose(
          image_spacing, mask_spacing, rtol=1e-3
      ):
        errors.append(
            f'{pair.image}: spacing {image_spacing} differs from mask spacing'
            f' {mask_spacing} ({pair.mask}).'
        )
        continue
      c = image.shape[-1]
      channels[c] += 1
      first_with_channels.setdefault(c, pair.image)
      shape = np.asarray(mask.shape)
      min_shape = shape if min_shape is None else np.minimum(min_shape, shape)
      max_shape = shape if max_shape is None else np.maximum(max_shape, shape)
      if image_spacing is not None:
        spacings.append(image_spacing)
      values, counts = np.unique(mask, return_counts=True)
      class_pixels.update(dict(zip(values.tolist(), counts.tolist())))
      max_by_file[pair.mask] = int(values[-1]) if values.size else 0
      if num_classes is not None and values.size and values[-1] >= num_classes:
        bad = values[values >= num_classes].tolist()
        errors.append(
            f'{pair.mask}: mask value(s) {bad[:5]} at or above num_classes={num_classes}.'
        )
  if len(channels) > 1:
    common = channels.most_common(1)[0][0]
    for c, path in first_with_channels.items():
      if c != common:
        errors.append(
            f'{path}: {c} channel(s), while most images have {common}; channel'
            ' counts must agree.'
        )
  _raise_all(errors)
  if num_classes is None:
    num_classes = max(class_pixels) + 1
    if num_classes == 1:
      raise BadDataError(
          f'{next(iter(max_by_file))}: every mask is all background (0); cannot'
          ' infer the classes. Set config.data.num_classes if this is intended.'
      )
    missing = [c for c in range(num_classes) if c not in class_pixels]
    if missing:
      worst = max(max_by_file, key=max_by_file.get)
      raise BadDataError(
          f'{worst}: mask value {max_by_file[worst]} implies {num_classes} classes,'
          f' but classes {missing[:10]} never occur: masks must hold class indices'
          ' 0..C-1 (a 0/255 mask must be mapped to 0/1). Set config.data.num_classes'
          ' if this is intended.'
      )
  metadata = {
      'num_classes': int(num_classes),
      'num_channels': int(next(iter(channels))),
      'ndim': ndim,
      'min_shape': [int(s) for s in min_shape],
      'max_shape': [int(s) for s in max_shape],
      'spacing': [float(s) for s in np.median(spacings, axis=0)] if spacings else None,
      'num_examples': {split: len(p) for split, p in pairs.items()},
      'class_pixels': {str(k): int(v) for k, v in sorted(class_pixels.items())},
  }
  logging.info('Validated segmentation folder: %s', metadata)
  return metadata


def write_pair(
    root: str | os.PathLike,
    split: str,
    example_id: str,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    spacing: tuple[float, ...] | None = None,
    image_format: str = 'png',
) -> tuple[str, str]:
  """Writes one example in the folder layout; the inverse of the readers.

  Args:
    root: The folder root.
    split: 'train', 'val' or 'test'.
    example_id: File name stem.
    image: 2D: [H, W] or [H, W, C] uint8 (png, jpg, tif), uint16 grey (png,
      tif) or float32 grey (tif). 3D: [D, H, W] or [D, H, W, C], any dtype.
    mask: Class indices, [H, W] or [D, H, W].
    spacing: 3D only: voxel spacing (D, H, W); default ones.
    image_format: 2D only: 'png', 'tif' or 'jpg'.

  Returns:
    The paths of the image and the mask.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
  images = pathlib.Path(root) / split / 'images'
  masks = pathlib.Path(root) / split / 'masks'
  images.mkdir(parents=True, exist_ok=True)
  masks.mkdir(parents=True, exist_ok=True)
  mask = np.asarray(mask)
  if mask.ndim == 2:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    image_path = images / f'{example_id}.{image_format}'
    Image.fromarray(image).save(image_path)
    mask_path = masks / f'{example_id}.png'
    mask_dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
    Image.fromarray(mask.astype(mask_dtype)).save(mask_path)
    return str(image_path), str(mask_path)
  import nibabel  # pylint: disable=g-import-not-at-top

  zooms = tuple(reversed(spacing or (1.0, 1.0, 1.0)))
  image = np.asarray(image)
  image = image.transpose(
      (2, 1, 0) + tuple(range(3, image.ndim))
  )  # (D, H, W, C) -> (x, y, z, C).
  paths = []
  if image.dtype == np.int64:
    image = image.astype(np.int32)
  mask = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int32)
  for folder, array in ((images, image), (masks, mask.transpose(2, 1, 0))):
    volume = nibabel.Nifti1Image(array, affine=np.diag(zooms + (1.0,)))
    volume.header.set_zooms(zooms + volume.header.get_zooms()[3:])
    path = folder / f'{example_id}.nii.gz'
    nibabel.save(volume, path)
    paths.append(str(path))
  return paths[0], paths[1]


@dataclasses.dataclass(eq=False)
class SegmentationFolderConfig(tfds.core.BuilderConfig):
  """Configuration of `segmentation_folder`.

  Attributes:
    ndim: 2 for images, 3 for volumes.
    root: The folder; None to take TFDS's `manual_dir` instead.
    num_classes: Checked against every mask; None to infer it.
  """

  ndim: int = 2
  root: str | None = None
  num_classes: int | None = None


class SegmentationFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of images and masks (see the module docstring for the layout)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Pass the folder as manual_dir: <root>/{train,val,test}/{images,masks}/<id>.<ext>.'
  )
  BUILDER_CONFIGS = [
      SegmentationFolderConfig(
          name='2d', ndim=2, description='PNG/TIFF/JPEG images, PNG masks.'
      ),
      SegmentationFolderConfig(name='3d', ndim=3, description='NIfTI volumes and masks.'),
  ]
  DEFAULT_CONFIG_NAME = '2d'

  def _info(self) -> tfds.core.DatasetInfo:
    ndim = self.builder_config.ndim
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                'id': tfds.features.Text(),
                'image': tfds.features.Tensor(
                    shape=(None,) * (ndim + 1), dtype=np.float32, encoding='zlib'
                ),
                'label': tfds.features.Tensor(
                    shape=(None,) * ndim, dtype=np.int32, encoding='zlib'
                ),
                'spacing': tfds.features.Tensor(shape=(ndim,), dtype=np.float32),
            }
        ),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    cpu_tensorflow.import_tensorflow()  # TFDS writes with TensorFlow.
    config = self.builder_config
    root = config.root or dl_manager.manual_dir
    pairs = list_pairs(root, ndim=config.ndim)
    self.info.metadata.update(
        validate(pairs, ndim=config.ndim, num_classes=config.num_classes)
    )
    return {
        split: self._generate_examples(split_pairs)
        for split, split_pairs in pairs.items()
    }

  def _generate_examples(self, pairs):
    ndim = self.builder_config.ndim
    for pair in pairs:
      image, spacing = read_image(pair.image, ndim=ndim)
      label, _ = read_mask(pair.mask, ndim=ndim)
      yield pair.id, {
          'id': pair.id,
          'image': image,
          'label': label.astype(np.int32),
          'spacing': np.asarray(spacing or (1.0,) * ndim, np.float32),
      }
