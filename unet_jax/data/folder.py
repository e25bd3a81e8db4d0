"""A user's own folder of images and masks: listing, reading and checking it.

`builder.py` builds it into the `segmentation_folder` TFDS data set.

Layout (2D, config '2d', the default)::

    <root>/<split>/images/<id>.{png,tif,tiff,jpg,jpeg}
    <root>/<split>/masks/<id>.png      # pixel value = class index

Layout (3D, config '3d')::

    <root>/<split>/images/<id>.{nii,nii.gz}
    <root>/<split>/masks/<id>.{nii,nii.gz}

`<split>` is any of 'train', 'val' and 'test'; at least one must exist. Images
are grey or RGB (2D), or single- or multi-channel NIfTI volumes (3D, channels
on the 4th NIfTI axis). NIfTI volumes are read in canonical (RAS)
orientation, (D, H, W) = (S, A, R), with the voxel spacing in the same order
(`geometry.read_volume`), so a volume stored with its axes in another order
reads the same.
Hidden files (names starting with '.') are ignored; any other file is either
used or reported.

2D masks (see `read_mask`): a single-channel PNG holds the class index of each
pixel; a palette PNG (mode 'P', as in Pascal VOC) holds it as the palette
index; a grey RGB mask (R = G = B, alpha constant if any) is its grey value. A
colour mask needs `mask_colors`, the RGB colour of each class (index =
class); a colour outside it is an error. `ignore_index` (e.g. VOC's 255
border) names a mask value that marks pixels to ignore: it may lie at or above
`num_classes`, is left out of the class check, `class_pixels` and class
inference, and is stored unchanged for the input pipeline to map.

Nothing is silently dropped. `list_pairs` (file names only) and `validate`
(reads every file) raise `BadDataError`, a `ValueError` naming each offending
file, for: an image without a mask or a mask without an image, an unknown
extension, an empty split, a 3D volume in a 2D data set or the other way
round, an unreadable or truncated file (image and mask are checked apart, so
one does not hide the other), a symbolic link whose target does not exist
(both named), image and mask shapes that differ, a NIfTI image and mask whose
voxel grids differ in spacing, direction or origin (both files named, with
both values: `geometry.grid_differences`, on the files' own affines, so image
and mask must be stored in the same voxel order, as nnU-Net requires), every
image holding NaN or +-Inf values, with their count (`nonfinite='zero'` logs
them instead, and the builder replaces them by 0), mask values
that are not class indices in [0, num_classes), a colour mask without
`mask_colors` or with a colour outside it, every image whose channel count
differs from the most common one, and, when the classes are inferred, every
mask holding a value past a class that never occurs (a 0/255 mask). All
problems go in one error; past 20 it ends with "... and N more" and the path
of a file under `tempfile.gettempdir()` (not the data folder, which may be
read-only) that lists all of them. The builder validates the whole folder
before it writes anything. `validate` also reports the per-axis median shape
and names the images smaller than half of it along some axis.

Use from a config::

    config.data.name = 'segmentation_folder'
    config.data.config = '2d'  # or '3d'; '' tells them apart by the files
    config.data.root = '/path/to/root'

The input pipeline names the built copy after a fingerprint of the folder (file
names, sizes and modification times) and of the options that change what is
built (`num_classes`, `mask_colors`, `ignore_index`, passed as `fingerprint`'s
`extra`), so editing the folder or an option rebuilds it instead of reading a
stale copy.
"""

import collections
from collections.abc import Sequence
import dataclasses
import hashlib
import os
import pathlib
import tempfile

from absl import logging
import numpy as np

from unet_jax import config as config_lib
from unet_jax.data import geometry

SPLITS = ('train', 'val', 'test')
IMAGE_EXTENSIONS = {2: ('.png', '.tif', '.tiff', '.jpg', '.jpeg'), 3: ('.nii', '.nii.gz')}
MASK_EXTENSIONS = {2: ('.png',), 3: ('.nii', '.nii.gz')}
_MAX_LISTED_ERRORS = 20


class BadDataError(ValueError):
  """A file of a segmentation folder is missing, unreadable or inconsistent."""


def _write_full_list(message: str) -> str:
  """Writes `message` to a new file in the temporary folder; returns its path.

  The temporary folder (`tempfile.gettempdir()`) is used, not the data folder,
  which may be read-only.
  """
  fd, path = tempfile.mkstemp(prefix='unet_jax_bad_data_', suffix='.txt', text=True)
  with os.fdopen(fd, 'w') as f:
    f.write(message + '\n')
  return path


def raise_all(
  errors: list[str], *, hint: str = '', subject: str = 'the segmentation folder'
) -> None:
  """Raises one `BadDataError` listing `errors` (one line each), if any.

  Past `_MAX_LISTED_ERRORS` lines the message ends with "... and N more" and
  the path of a file in the temporary folder that lists all of them.

  Args:
    errors: One line per problem, each naming its file.
    hint: A closing line of advice, if any.
    subject: What holds the problems, for the header line.
  """
  if not errors:
    return
  header = f'{len(errors)} problem(s) in {subject}:'
  full = header + '\n  ' + '\n  '.join(errors) + (f'\n{hint}' if hint else '')
  shown = errors[:_MAX_LISTED_ERRORS]
  message = header + '\n  ' + '\n  '.join(shown)
  more = len(errors) - len(shown)
  if more:
    try:
      listing = f'all {len(errors)} are listed in {_write_full_list(full)}'
    except OSError as e:
      listing = f'could not write the full list ({type(e).__name__}: {e})'
    message += f'\n  ... and {more} more; {listing}.'
  if hint:
    message += f'\n{hint}'
  raise BadDataError(message)


def _ranges(values: list[int]) -> str:
  """'1..254' for [1, 2, ..., 254]; '1, 3..5' for [1, 3, 4, 5]."""
  parts, start = [], None
  for i, v in enumerate(values):
    if start is None:
      start = v
    if i + 1 == len(values) or values[i + 1] != v + 1:
      parts.append(str(v) if v == start else f'{start}..{v}')
      start = None
  return ', '.join(parts)


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


def dangling_link(path: str | os.PathLike) -> str | None:
  """The problem of a symbolic link whose target does not exist, naming both; or
  None for any other path."""
  if not os.path.islink(path) or os.path.exists(path):
    return None
  target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
  return f'{path}: a symbolic link to {target}, which does not exist.'


def check_nonfinite_option(nonfinite: str) -> None:
  if nonfinite not in config_lib.NONFINITE:
    raise ValueError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}.")


def count_nonfinite(image: np.ndarray) -> int:
  """The number of NaN and +-Inf values of `image` (0 for integer arrays)."""
  if not np.issubdtype(image.dtype, np.inexact):
    return 0
  return int(image.size - np.count_nonzero(np.isfinite(image)))


def nonfinite_problem(path: str, count: int, size: int) -> str:
  """The line naming a training image with `count` non-finite voxels of `size`."""
  return (
    f'{path}: {count} non-finite voxel(s) (NaN or Inf) of {size}; fix the file, or'
    " set config.data.nonfinite='zero' to replace them by 0 when the data set is"
    ' built.'
  )


def zero_nonfinite(image: np.ndarray, *, path: str) -> np.ndarray:
  """`image` with its NaN and +-Inf values replaced by 0 (`nonfinite='zero'`),
  each file with any logged with their count; `image` itself if it has none."""
  count = count_nonfinite(image)
  if not count:
    return image
  logging.warning(
    "%s: %d non-finite voxel(s) (NaN or Inf) of %d replaced by 0 (nonfinite='zero').",
    path,
    count,
    image.size,
  )
  return np.where(np.isfinite(image), image, 0).astype(image.dtype)


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
        if dangling_link(path):
          errors.append(dangling_link(path))
        elif path.is_dir():
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
  raise_all(errors)
  return pairs


def fingerprint(
  root: str | os.PathLike, pairs: dict[str, list[Pair]], *, extra: str = ''
) -> str:
  """A short hash of the folder's file names, sizes and modification times.

  Args:
    root: The folder root; paths are hashed relative to it.
    pairs: From `list_pairs`.
    extra: Anything else that changes the built copy, folded into the hash. A
      caller must include every option of `SegmentationFolderConfig` that
      changes what is validated or written (e.g. their `repr`s joined by '\\0').
  """
  paths = [
    path
    for split in sorted(pairs)
    for pair in pairs[split]
    for path in (pair.image, pair.mask)
  ]
  return files_fingerprint(root, paths, extra=extra)


def files_fingerprint(root: str | os.PathLike, paths, *, extra: str = '') -> str:
  """A short hash of `paths` (relative to `root`), their sizes and modification
  times, and `extra`."""
  digest = hashlib.sha256(extra.encode())
  for path in paths:
    stat = os.stat(path)
    rel = os.path.relpath(path, root)
    digest.update(f'{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()[:12]


def _check_mask_colors(
  mask_colors: Sequence[Sequence[int]] | None,
) -> tuple[tuple[int, int, int], ...] | None:
  """`mask_colors` as a tuple of (R, G, B) int triples; ValueError if malformed."""
  if mask_colors is None:
    return None
  if isinstance(mask_colors, (str, bytes)) or not len(mask_colors):
    raise ValueError(
      f'mask_colors must be a non-empty list of RGB triples, one per class, got'
      f' {mask_colors!r}.'
    )
  colors, seen = [], {}
  for c, color in enumerate(mask_colors):
    triple = tuple(color) if not isinstance(color, (str, bytes)) else ()
    if len(triple) != 3 or not all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255
      for v in triple
    ):
      raise ValueError(
        f'mask_colors[{c}] = {color!r}: each entry must be an RGB triple of ints'
        ' in [0, 255].'
      )
    triple = tuple(int(v) for v in triple)
    if triple in seen:
      raise ValueError(
        f'mask_colors[{c}] = {triple} repeats mask_colors[{seen[triple]}]; each'
        ' class needs its own colour.'
      )
    seen[triple] = c
    colors.append(triple)
  return tuple(colors)


def _check_ignore_index(ignore_index: int | None, num_classes: int | None) -> None:
  if ignore_index is None:
    return
  if (
    not isinstance(ignore_index, (int, np.integer))
    or isinstance(ignore_index, bool)
    or ignore_index < 0
  ):
    raise ValueError(
      f'ignore_index must be None or a non-negative int (a mask value, e.g. 255),'
      f' got {ignore_index!r}.'
    )
  if num_classes is not None and ignore_index < num_classes:
    raise ValueError(
      f'ignore_index={ignore_index} is a class index below'
      f' num_classes={num_classes}; it must lie outside [0, num_classes).'
    )


def _colors_to_classes(
  path: str, rgb: np.ndarray, mask_colors: tuple[tuple[int, int, int], ...]
) -> np.ndarray:
  """Maps an [H, W, 3] uint8 colour mask to class indices through `mask_colors`."""
  rgb = rgb.astype(np.int64)
  keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
  uniques, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
  by_key = {(r << 16) | (g << 8) | b: c for c, (r, g, b) in enumerate(mask_colors)}
  classes = np.array([by_key.get(int(k), -1) for k in uniques], np.int64)
  unknown = np.flatnonzero(classes < 0)
  if unknown.size:
    unknown = unknown[np.argsort(-counts[unknown], kind='stable')]
    listed = ', '.join(
      f'{_key_to_rgb(uniques[u])} in {counts[u]} pixel(s)' for u in unknown[:5]
    )
    more = f' and {unknown.size - 5} more colour(s)' if unknown.size > 5 else ''
    raise BadDataError(f'{path}: colour(s) not in mask_colors: {listed}{more}.')
  return classes[inverse.reshape(keys.shape)]


def _key_to_rgb(key: int) -> tuple[int, int, int]:
  key = int(key)
  return (key >> 16, (key >> 8) & 255, key & 255)


def _constant_alpha(path: str, array: np.ndarray) -> np.ndarray:
  """Drops the last (alpha) channel; BadDataError if the alpha varies."""
  alpha = array[..., -1]
  if alpha.size and np.any(alpha != alpha.flat[0]):
    values = np.unique(alpha)
    raise BadDataError(
      f'{path}: mask has an alpha channel that varies ({values.size} values,'
      f' e.g. {values[:5].tolist()}); masks must not use transparency.'
    )
  return array[..., :-1]


def _mask_2d(path: str, im, mask_colors) -> np.ndarray:
  """The class indices of an opened 2D mask (see `read_mask`)."""
  mode = im.mode
  if mode == 'P' and mask_colors is not None:
    im, mode = im.convert('RGB'), 'RGB'
  if mode in ('1', 'L', 'P', 'I', 'I;16', 'I;16B', 'I;16L'):
    return np.asarray(im).astype(np.int64)
  if mode not in ('LA', 'RGB', 'RGBA'):
    raise BadDataError(
      f'{path}: mask has mode {mode}; masks must be single-channel PNGs whose'
      ' pixel values are class indices, palette PNGs, or RGB colour masks'
      ' with config.data.mask_colors.'
    )
  array = np.asarray(im)
  if mode in ('LA', 'RGBA'):
    array = _constant_alpha(path, array)
  if mode == 'LA':
    return array[..., 0].astype(np.int64)
  if mask_colors is not None:
    return _colors_to_classes(path, array, mask_colors)
  if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(
    array[..., 1], array[..., 2]
  ):
    return array[..., 0].astype(np.int64)  # Grey saved as RGB.
  colors = np.unique(array.reshape(-1, 3), axis=0)
  examples = ', '.join(str(tuple(int(v) for v in c)) for c in colors[:4])
  raise BadDataError(
    f'{path}: a colour mask ({len(colors)} colours, e.g. {examples}); set'
    ' config.data.mask_colors to the RGB colour of each class (index = class),'
    ' or save the masks as single-channel class indices.'
  )


def _read_2d(path: str, *, is_mask: bool, mask_colors=None) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as im:
    if getattr(im, 'n_frames', 1) > 1:
      raise BadDataError(
        f'{path}: a multi-page image (a 3D volume) in a 2D data set; set'
        " config.data.config='3d'."
      )
    im.load()
    if is_mask:
      return _mask_2d(path, im, mask_colors)
    mode = im.mode
    if mode in ('P', 'CMYK', 'YCbCr', 'RGBA', 'LAB', 'HSV'):
      im = im.convert('RGB')
    elif mode in ('1', 'LA'):
      im = im.convert('L')
    array = np.asarray(im)
  if array.ndim == 2:
    array = array[..., None]
  return array.astype(np.float32)


def _read_3d(path: str, *, is_mask: bool) -> tuple[np.ndarray, tuple[float, ...]]:
  """A NIfTI file in canonical orientation (`geometry.read_volume`): [D, H, W, C]
  (image, float32) or [D, H, W] (mask), and its (D, H, W) spacing."""
  import nibabel  # pylint: disable=g-import-not-at-top

  shape = nibabel.load(path).shape  # The header only.
  if len(shape) < 3:
    raise BadDataError(
      f'{path}: a {len(shape)}D array {shape} in a 3D data set; set'
      " config.data.config='2d' for 2D images."
    )
  if len(shape) > 4:
    raise BadDataError(f'{path}: unexpected array shape {shape} for a 3D volume.')
  volume = geometry.read_volume(path)
  array = volume.array
  if array.ndim == 3:
    array = array[..., None]
  if is_mask and array.shape[3] != 1:
    raise BadDataError(
      f'{path}: unexpected array shape {array.shape} for a 3D mask (a 4D volume'
      ' with several channels).'
    )
  spacing = tuple(round(float(s), 6) for s in volume.spacing)
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


def read_mask(
  path: str, *, ndim: int, mask_colors: Sequence[Sequence[int]] | None = None
) -> tuple[np.ndarray, tuple[float, ...] | None]:
  """Reads a mask: int64 [*spatial] class indices, and the spacing or None.

  2D masks (PNG) are read by mode:

  * single-channel ('L', 'I;16', '1', ...): the pixel value is the class;
  * palette ('P', as in Pascal VOC): the palette index is the class (VOC's
    255 border stays 255; see `validate`'s `ignore_index`);
  * RGB, or RGBA / grey+alpha with a constant alpha: with `mask_colors`, the
    colour at index c is class c (palette masks are then also read by
    colour); without it, a grey RGB mask (R = G = B) is its grey value, and
    any other colour mask is an error.

  Args:
    path: The mask file.
    ndim: 2 or 3.
    mask_colors: 2D only: the RGB colour of each class, [C] triples of ints in
      [0, 255], index = class. None: masks hold class indices.

  Raises:
    BadDataError: naming the file, if it is unreadable, truncated, of the wrong
      dimensionality, holds values that are not non-negative integers, is a
      colour mask without `mask_colors`, or holds a colour not in
      `mask_colors` (each such colour is named with its pixel count).
    ValueError: if `mask_colors` is malformed, or given for 3D.
  """
  mask_colors = _check_mask_colors(mask_colors)
  if mask_colors is not None and ndim != 2:
    raise ValueError('mask_colors applies to 2D (PNG) masks only.')
  try:
    if ndim == 2:
      mask, spacing = _read_2d(path, is_mask=True, mask_colors=mask_colors), None
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


def _values_text(values: list[int]) -> str:
  shown = ', '.join(str(v) for v in values[:5])
  shown += f', ... ({len(values)} values)' if len(values) > 5 else ''
  return f'mask value {shown}' if len(values) == 1 else f'mask values {shown}'


def validate(
  pairs: dict[str, list[Pair]],
  *,
  ndim: int,
  num_classes: int | None = None,
  mask_colors: Sequence[Sequence[int]] | None = None,
  ignore_index: int | None = None,
  nonfinite: str = 'error',
) -> dict[str, object]:
  """Reads every file once and checks the whole folder.

  Each image and each mask is read and checked on its own, so an unreadable
  image does not hide a problem with its mask. Every problem found is listed
  in one `BadDataError` (see `raise_all` for long lists).

  Args:
    pairs: From `list_pairs`.
    ndim: 2 or 3.
    num_classes: If given, every mask value (except `ignore_index`) must be
      below it. If None and `mask_colors` is given, it is `len(mask_colors)`.
      If both are None, it is inferred as the largest mask value plus one, and
      every class below it must occur somewhere (so a 0/255 mask is reported,
      naming every mask that holds a value past a missing class, not taken as
      256 classes).
    mask_colors: 2D only: the RGB colour of each class (see `read_mask`).
    ignore_index: A mask value that marks pixels to ignore (e.g. VOC's 255
      border). It may lie at or above `num_classes`, must not lie below it,
      is left out of `class_pixels` and of class inference, and is stored
      unchanged.
    nonfinite: 'error': every image holding NaN or +-Inf values is named, with
      their count; 'zero': they are logged instead (the builder replaces them
      by 0).

  Returns:
    Metadata: num_classes, num_channels, ndim, min_shape, max_shape,
    median_shape (per-axis median over all examples, floats), small_examples
    (a list of [image path, shape] of the images smaller than half of
    `median_shape` along some axis; each is also logged as a warning), spacing
    (median per axis, 3D only), num_examples per split and class_pixels (pixel
    count of each class over all splits, ignored pixels excluded).

  Raises:
    BadDataError: listing every offending file.
    ValueError: if `mask_colors` or `ignore_index` is malformed or disagrees
      with `num_classes`, or `nonfinite` is not 'error' or 'zero'.
  """
  mask_colors, num_classes = _colors_and_classes(mask_colors, num_classes, ndim=ndim)
  _check_ignore_index(ignore_index, num_classes)
  check_nonfinite_option(nonfinite)
  survey = _Survey(nonfinite=nonfinite)
  for split_pairs in pairs.values():
    for pair in split_pairs:
      survey.add(
        pair,
        ndim=ndim,
        num_classes=num_classes,
        mask_colors=mask_colors,
        ignore_index=ignore_index,
      )
  survey.check_channels()
  hint = ''
  if num_classes is None and not survey.masks_unread and survey.values_by_mask:
    num_classes, hint = survey.infer_classes(ignore_index)
  raise_all(survey.errors, hint=hint)
  if not survey.shapes:
    raise BadDataError('The segmentation folder holds no examples.')
  metadata = _metadata(survey, pairs, ndim=ndim, num_classes=num_classes)
  logging.info('Validated segmentation folder: %s', metadata)
  return metadata


def _colors_and_classes(mask_colors, num_classes, *, ndim: int):
  """(mask_colors checked, num_classes): with colours, one class per colour."""
  mask_colors = _check_mask_colors(mask_colors)
  if mask_colors is None:
    return None, num_classes
  if ndim != 2:
    raise ValueError('mask_colors applies to 2D (PNG) masks only.')
  if num_classes is not None and num_classes != len(mask_colors):
    raise ValueError(
      f'num_classes={num_classes} but mask_colors holds {len(mask_colors)}'
      ' colours; give one colour per class.'
    )
  return mask_colors, len(mask_colors)


def _metadata(
  survey: '_Survey', pairs, *, ndim: int, num_classes: int
) -> dict[str, object]:
  """The metadata `validate` returns, from a survey without errors."""
  array = np.array([s for _, s in survey.shapes])
  median = np.median(array, axis=0)
  small = [[p, list(s)] for p, s in survey.shapes if np.any(np.array(s) < median / 2)]
  for path, shape in small:
    logging.warning(
      'Segmentation folder: %s has shape %s, smaller than half the median'
      ' shape %s along some axis.',
      path,
      shape,
      median.tolist(),
    )
  spacings = survey.spacings
  metadata = {
    'num_classes': int(num_classes),
    'num_channels': int(next(iter(survey.paths_by_channels))),
    'ndim': ndim,
    'min_shape': [int(s) for s in array.min(axis=0)],
    'max_shape': [int(s) for s in array.max(axis=0)],
    'median_shape': [float(s) for s in median],
    'small_examples': small,
    'spacing': [float(s) for s in np.median(spacings, axis=0)] if spacings else None,
    'num_examples': {split: len(p) for split, p in pairs.items()},
    'class_pixels': {str(k): int(v) for k, v in sorted(survey.class_pixels.items())},
    'shapes': [list(s) for _, s in survey.shapes],
    'spacings': [list(s) for s in spacings],
  }
  return metadata


def _grid_differences(pair: Pair, *, ndim: int) -> list[str]:
  """How the voxel grid (spacing, direction, origin) of a NIfTI mask differs from
  its image's (`geometry.grid_differences`, on the header affines); [] in 2D."""
  if ndim != 3:
    return []
  import nibabel  # pylint: disable=g-import-not-at-top

  return geometry.grid_differences(
    nibabel.load(pair.image).affine, nibabel.load(pair.mask).affine
  )


class _Survey:
  """What `validate` learns from reading a folder, file by file, and its errors."""

  def __init__(self, *, nonfinite: str = 'error'):
    self.nonfinite = nonfinite
    self.errors: list[str] = []
    self.paths_by_channels = collections.defaultdict(list)
    self.shapes: list[tuple[str, tuple[int, ...]]] = []
    self.spacings: list[tuple[float, ...]] = []
    self.class_pixels = collections.Counter()
    self.values_by_mask: dict[str, np.ndarray] = {}
    self.masks_unread = False

  def _read(self, reader, path, **kwargs):
    try:
      return reader(path, **kwargs)
    except BadDataError as e:
      self.errors.append(str(e))
      return None, None

  def add(self, pair: Pair, *, ndim, num_classes, mask_colors, ignore_index) -> None:
    """Reads one pair; records its problems, classes, channels, shape and spacing."""
    image, image_spacing = self._read(read_image, pair.image, ndim=ndim)
    mask, mask_spacing = self._read(
      read_mask, pair.mask, ndim=ndim, mask_colors=mask_colors
    )
    if mask is None:
      self.masks_unread = True
    else:
      values, counts = np.unique(mask, return_counts=True)
      if ignore_index is not None:
        kept = values != ignore_index
        values, counts = values[kept], counts[kept]
      self.class_pixels.update(dict(zip(values.tolist(), counts.tolist())))
      self.values_by_mask[pair.mask] = values
      if num_classes is not None and values.size and values[-1] >= num_classes:
        bad = values[values >= num_classes].tolist()
        self.errors.append(
          f'{pair.mask}: mask value(s) {bad[:5]} at or above num_classes={num_classes}.'
        )
    if image is None:
      return
    self._check_values(pair.image, image)
    self.paths_by_channels[image.shape[-1]].append(pair.image)
    if mask is None:
      return
    if image.shape[:-1] != mask.shape:
      self.errors.append(
        f'{pair.image}: image shape {image.shape[:-1]} differs from mask shape'
        f' {mask.shape} ({pair.mask}).'
      )
    elif differences := _grid_differences(pair, ndim=ndim):
      self.errors.append(
        f'{pair.image}: grid differs from that of its mask {pair.mask}: '
        + '; '.join(differences)
        + '.'
      )
    else:
      self.shapes.append((pair.image, tuple(int(s) for s in mask.shape)))
      if image_spacing is not None:
        self.spacings.append(image_spacing)

  def _check_values(self, path: str, image: np.ndarray) -> None:
    """Names an image holding NaN or +-Inf values ('error'), or logs it ('zero')."""
    count = count_nonfinite(image)
    if count and self.nonfinite == 'error':
      self.errors.append(nonfinite_problem(path, count, image.size))
    elif count:
      logging.warning(
        '%s: %d non-finite voxel(s) (NaN or Inf) of %d; replaced by 0 when the data'
        " set is built (config.data.nonfinite='zero').",
        path,
        count,
        image.size,
      )

  def check_channels(self) -> None:
    """Names every image whose channel count is not the most common one."""
    by_channels = self.paths_by_channels
    if len(by_channels) <= 1:
      return
    total = sum(len(p) for p in by_channels.values())
    common = max(by_channels, key=lambda c: len(by_channels[c]))
    for c in sorted(by_channels):
      if c != common:
        self.errors.extend(
          f'{path}: {c} channel(s), while {len(by_channels[common])} of'
          f' {total} images have {common}; channel counts must agree.'
          for path in by_channels[c]
        )

  def infer_classes(self, ignore_index) -> tuple[int, str]:
    """num_classes from the largest mask value; names the masks if classes skip."""
    num_classes = max(self.class_pixels, default=-1) + 1
    missing = [c for c in range(num_classes) if c not in self.class_pixels]
    if num_classes <= 1:
      self.errors.append(
        f'{next(iter(self.values_by_mask))}: every mask is all background (0)'
        f'{" or ignore_index" if ignore_index is not None else ""}; cannot infer'
        ' the classes. Set config.data.num_classes if this is intended.'
      )
      return num_classes, ''
    if not missing:
      return num_classes, ''
    for path, values in self.values_by_mask.items():
      beyond = values[values > missing[0]].tolist()
      if beyond:
        verb = 'implies' if len(beyond) == 1 else 'imply'
        self.errors.append(
          f'{path}: {_values_text(beyond)} {verb} at least {beyond[-1] + 1}'
          f' classes, but classes {_ranges(missing)} never occur in any mask.'
        )
    return num_classes, (
      f'Inferred {num_classes} classes from the largest mask value, but classes'
      f' {_ranges(missing)} never occur: masks must hold class indices 0..C-1'
      ' (map a 0/255 mask to 0/1, set config.data.ignore_index=255 if 255'
      ' marks pixels to ignore, or set config.data.num_classes if this is'
      ' intended).'
    )


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
