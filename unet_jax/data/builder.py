"""`segmentation_folder`: a user's data set on disk, as a TFDS builder.

Three layouts are read as they are (`sources.py` tells them apart):

* `'folder'`, the project's own: `<root>/{train,val,test}/{images,masks}/`
  (`folder.py`);
* `'nnunet'`, nnU-Net v2's raw layout, and `'msd'`, the Medical Segmentation
  Decathlon's, both recognised by their `dataset.json` (`nnunet.py`). Their
  training cases are split into 'train' and 'val' by one fold of a
  `splits_final.json` (`val_ids`, chosen by the caller). The project's layout
  is split the same way when `pooled`: the cases of train/ and val/ together,
  `val_ids` in 'val' and the others in 'train' (test/ stays as it is).

NIfTI volumes are read in one canonical orientation (`geometry.read_volume`).
With `target_spacing` set, every 3D case is resampled to it once, here, when the
data set is built: images by third-order spline, labels by their one-hot
channels, each thick axis by nearest neighbour (`geometry.py`). The built copy
records, per example, the spacing it was written at.

Everything is checked before anything is written, with one `BadDataError`
naming every offending file (images holding NaN or +-Inf values among them,
unless `nonfinite='zero'`, which replaces those values by 0 as each case is
read). A caller that names built copies (as
`sources.py` does) must fold every field of `SegmentationFolderConfig` into
the copy's name, so a changed option builds a new copy.

Direct use with TFDS::

    builder = tfds.builder('segmentation_folder/3d', data_dir=...)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir='/path/to/root'))
"""

from collections.abc import Sequence
import dataclasses

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from unet_jax.data import cpu_tensorflow
from unet_jax.data import folder as folder_lib
from unet_jax.data import geometry
from unet_jax.data import nnunet

LAYOUTS = ('folder', 'nnunet', 'msd')


@dataclasses.dataclass(frozen=True)
class Case:
  """One example to build: its id, its image file(s) (one per channel, or one
  holding every channel) and its mask."""

  id: str
  images: tuple[str, ...]
  label: str


@dataclasses.dataclass(eq=False)
class SegmentationFolderConfig(tfds.core.BuilderConfig):
  """Configuration of `segmentation_folder`.

  Attributes:
    ndim: 2 for images, 3 for volumes.
    root: The folder; None to take TFDS's `manual_dir` instead.
    num_classes: Checked against every mask; None to infer it.
    mask_colors: 'folder' layout, 2D only: the RGB colour of each class, index
      = class (see `folder.read_mask`); None for masks of class indices.
    ignore_index: A mask value to ignore (e.g. 255); stored unchanged, and
      left out of the class check, the class inference and `class_pixels`.
    layout: One of `LAYOUTS`.
    target_spacing: 3D: the (D, H, W) spacing every case is resampled to;
      None: each case at its own spacing.
    val_ids: 'nnunet', 'msd' and a pooled 'folder': the training cases of the
      'val' split; the others form 'train' (no 'val' split when empty).
    pooled: 'folder' layout: pool the cases of train/ and val/ and split them
      by `val_ids`; False keeps the folders' own split.
    nonfinite: Image values that are NaN or +-Inf: 'error' names every file
      holding them before anything is written; 'zero' replaces them by 0 (each
      such file is logged with their count).
  """

  ndim: int = 2
  root: str | None = None
  num_classes: int | None = None
  mask_colors: Sequence[Sequence[int]] | None = dataclasses.field(
    default=None, kw_only=True
  )
  ignore_index: int | None = dataclasses.field(default=None, kw_only=True)
  layout: str = dataclasses.field(default='folder', kw_only=True)
  target_spacing: tuple[float, ...] | None = dataclasses.field(default=None, kw_only=True)
  val_ids: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
  pooled: bool = dataclasses.field(default=False, kw_only=True)
  nonfinite: str = dataclasses.field(default='error', kw_only=True)


def split_cases(
  cases: Sequence[Case], val_ids: Sequence[str], *, where: str
) -> dict[str, list[Case]]:
  """`cases` as 'train' and 'val': `val_ids` validate, the others train.

  An empty split is left out. Raises ValueError naming `where` for a val id
  that is not a case, or an id that names two cases.
  """
  val_ids, ids = set(val_ids), [c.id for c in cases]
  unknown = sorted(val_ids - set(ids))
  if unknown:
    raise ValueError(f'Validation case(s) {unknown} are not training cases of {where}.')
  repeated = sorted({i for i in ids if ids.count(i) > 1})
  if repeated:
    raise ValueError(f'{where}: case id(s) {repeated} name more than one case.')
  split = {'train': [], 'val': []}
  for case in cases:
    split['val' if case.id in val_ids else 'train'].append(case)
  return {name: c for name, c in split.items() if c}


def fold_cases(layout: 'nnunet.Layout', val_ids: Sequence[str]) -> dict[str, list[Case]]:
  """The training cases of an nnU-Net or MSD layout as 'train' and 'val'."""
  cases = [Case(c.id, tuple(c.images), c.label) for c in layout.training]
  return split_cases(cases, val_ids, where=layout.root)


def pool_cases(
  cases: dict[str, list[Case]], val_ids: Sequence[str], *, where: str
) -> dict[str, list[Case]]:
  """The 'folder' layout's cases by split, with train/ and val/ pooled and split
  by `val_ids` (`split_cases`); 'test' is kept as it is."""
  pooled = [c for split in ('train', 'val') for c in cases.get(split, [])]
  test = {'test': cases['test']} if cases.get('test') else {}
  return {**split_cases(pooled, val_ids, where=where), **test}


def _resampled_metadata(metadata: dict, target) -> dict:
  """`metadata` with the shapes and spacing of the copy resampled to `target`."""
  shapes = np.array(
    [
      geometry.resampled_shape(shape, spacing, target)
      for shape, spacing in zip(metadata['shapes'], metadata['spacings'])
    ]
  )
  median = np.median(shapes, axis=0)
  return {
    **metadata,
    'min_shape': [int(s) for s in shapes.min(axis=0)],
    'max_shape': [int(s) for s in shapes.max(axis=0)],
    'median_shape': [float(s) for s in median],
    'spacing': [float(s) for s in target],
    'small_examples': [],
  }


def read_case(case: Case, *, ndim: int, mask_colors=None, nonfinite: str = 'error'):
  """(image float32 [*spatial, C], label int64 [*spatial], spacing or None).

  Channel files are read in order and stacked; NIfTI in canonical orientation.
  With `nonfinite='zero'`, NaN and +-Inf image values are replaced by 0 (and
  logged, `folder.zero_nonfinite`); with 'error' they were refused by the checks.
  """
  folder_lib.check_nonfinite_option(nonfinite)
  parts, spacing = [], None
  for path in case.images:
    image, image_spacing = folder_lib.read_image(path, ndim=ndim)
    if nonfinite == 'zero':
      image = folder_lib.zero_nonfinite(image, path=path)
    parts.append(image)
    spacing = spacing or image_spacing
  image = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
  label, _ = folder_lib.read_mask(case.label, ndim=ndim, mask_colors=mask_colors)
  return image, label, spacing


class SegmentationFolder(tfds.core.GeneratorBasedBuilder):
  """A data set on disk (see the module docstring for the layouts)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
    '1.0.0': 'Initial release.',
    '1.1.0': 'nnU-Net and MSD layouts; canonical orientation; resampling.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Pass the folder as manual_dir: <root>/{train,val,test}/{images,masks}/<id>.<ext>,'
    ' or an nnU-Net v2 or MSD data set folder (with its dataset.json).'
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

  def _cases_and_metadata(self, root: str) -> tuple[dict[str, list[Case]], dict]:
    """Every case by split, and the checked metadata; BadDataError before any write."""
    config = self.builder_config
    if config.layout == 'folder':
      pairs = folder_lib.list_pairs(root, ndim=config.ndim)
      metadata = folder_lib.validate(
        pairs,
        ndim=config.ndim,
        num_classes=config.num_classes,
        mask_colors=config.mask_colors,
        ignore_index=config.ignore_index,
        nonfinite=config.nonfinite,
      )
      cases = {
        split: [Case(p.id, (p.image,), p.mask) for p in split_pairs]
        for split, split_pairs in pairs.items()
      }
      if config.pooled:
        cases = pool_cases(cases, config.val_ids, where=str(root))
        metadata['num_examples'] = {split: len(c) for split, c in cases.items()}
        metadata['pooled'] = True
      return cases, metadata
    if config.layout not in LAYOUTS:
      raise ValueError(f'layout must be one of {LAYOUTS}, got {config.layout!r}.')
    layout = nnunet.read_layout(root)
    if layout.ndim != config.ndim:
      raise ValueError(
        f'{root}: file_ending {layout.file_ending!r} is {layout.ndim}D, but the'
        f' builder config is {config.ndim}D.'
      )
    metadata = nnunet.check(layout, nonfinite=config.nonfinite)
    if config.num_classes is not None and metadata['num_classes'] > config.num_classes:
      raise folder_lib.BadDataError(
        f'{root}/dataset.json: labels reach {metadata["num_classes"] - 1}, at or above'
        f' config.data.num_classes={config.num_classes}.'
      )
    cases = fold_cases(layout, config.val_ids)
    metadata['num_examples'] = {split: len(c) for split, c in cases.items()}
    return cases, metadata

  def _split_generators(self, dl_manager):
    cpu_tensorflow.import_tensorflow()  # TFDS writes with TensorFlow.
    config = self.builder_config
    cases, metadata = self._cases_and_metadata(config.root or dl_manager.manual_dir)
    if config.target_spacing and config.ndim == 3:
      metadata = _resampled_metadata(metadata, config.target_spacing)
      logging.info(
        'Resampling every case to spacing %s (median shape %s) while building.',
        config.target_spacing,
        metadata['median_shape'],
      )
    num_classes = metadata['num_classes']
    for per_case in ('shapes', 'spacings'):
      metadata.pop(per_case, None)
    self.info.metadata.update(metadata)
    return {
      split: self._generate_examples(split_cases, num_classes)
      for split, split_cases in cases.items()
    }

  def _generate_examples(self, cases, num_classes: int):
    config = self.builder_config
    target = config.target_spacing if config.ndim == 3 else None
    for case in cases:
      image, label, spacing = read_case(
        case,
        ndim=config.ndim,
        mask_colors=config.mask_colors,
        nonfinite=config.nonfinite,
      )
      if target:
        image = geometry.resample_image(image, spacing, target)
        classes = max(num_classes, int(label.max(initial=0)) + 1)
        label = geometry.resample_label(label, spacing, target, num_classes=classes)
        spacing = tuple(target)
      yield (
        case.id,
        {
          'id': case.id,
          'image': image,
          'label': label.astype(np.int32),
          'spacing': np.asarray(spacing or (1.0,) * config.ndim, np.float32),
        },
      )
