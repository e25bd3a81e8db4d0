"""Data sets by name: each opens as a random-access `Source`, built with TFDS on first use.

    data = config_lib.DataOptions.from_config(config.data)
    entry = sources.get(data.name)          # a ValueError lists the valid names
    entry.check(data)                       # config errors that need no data set built
    source = entry.open(data)               # builds into data.data_dir if needed
    example = source.read('train', 7)       # image float32 [*spatial, C], label int32 ...

`DATASETS` maps each name to its `Entry`; `register` adds one. The registered
names are the embedded `synthetic_shapes` (2D) and `synthetic_volumes` (3D), a
user's `segmentation_folder` (2D or 3D: the project's folder layout, or an nnU-Net
v2 or MSD data set, told apart by its `dataset.json`; `builder.py`) and TFDS's
`oxford_iiit_pet`.

A data set is read in array_record format, which gives random access by index
(exact resume and a global shuffle need it). `build` prepares a data set in that
format, and adds array_record copies to one that TFDS prepared as TFRecord only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from unet_jax import config as config_lib
from unet_jax import distributed
from unet_jax.data import builder as builder_lib
from unet_jax.data import cpu_tensorflow
from unet_jax.data import folder as folder_lib
from unet_jax.data import nnunet
from unet_jax.data import pets
from unet_jax.data import synthetic  # noqa: F401  Registers its TFDS builders.


@dataclasses.dataclass(frozen=True)
class Example:
  """One decoded example.

  Attributes:
    image: float32 [*spatial, C], raw intensities (not normalised).
    label: int32 [*spatial], class indices; the data set's own ignore value (if
      any) is still in place.
    spacing: physical voxel size per spatial axis (ones when unknown).
    case_id: a name for the example: its file name, or its index.
  """

  image: np.ndarray
  label: np.ndarray
  spacing: tuple[float, ...]
  case_id: str


@dataclasses.dataclass(frozen=True)
class Source:
  """An opened, built data set.

  Attributes:
    name: the registered name.
    builder: the TFDS builder.
    num_classes: classes in the masks, background included.
    num_channels: image channels.
    ndim: 2 or 3 spatial axes.
    min_shape, max_shape, median_shape: spatial shapes over the data set; None
      when the data set does not record them (images of varying size).
    spacing: median voxel spacing of 3D data (None for 2D).
    small_examples: (case, shape) of examples far smaller than the median.
    splits: the split names.
    split_aliases: names read as another split (e.g. 'validation' -> 'val').
    to_image_label: decodes a stored example to (image, label).
    channel_names: each channel's name where the data set gives them (an
      nnU-Net `dataset.json`'s `channel_names`, e.g. ('CT',)); else ().
    labelled_splits: the splits that together hold every labelled case, as
      the plan reads them: ('train', 'val') for an nnU-Net or MSD data set, or
      the project's layout split into folds (one fold's two halves; ('train',)
      for fold 'all'), else () (the train split alone).
  """

  name: str
  builder: Any
  num_classes: int
  num_channels: int
  ndim: int
  min_shape: tuple[int, ...] | None
  max_shape: tuple[int, ...] | None
  median_shape: tuple[int, ...] | None
  spacing: tuple[float, ...] | None
  small_examples: tuple[tuple[str, tuple[int, ...]], ...]
  splits: tuple[str, ...]
  split_aliases: Mapping[str, str]
  to_image_label: Callable[[dict], tuple[np.ndarray, np.ndarray]]
  channel_names: tuple[str, ...] = ()
  labelled_splits: tuple[str, ...] = ()

  def has_split(self, split: str) -> bool:
    """Whether `split` (or the split it is an alias of) exists."""
    return self.split_aliases.get(split, split) in self.splits

  def split(self, split: str) -> Sequence[dict]:
    """The random-access source of a split; a ValueError names the known splits."""
    split = self.split_aliases.get(split, split)
    if split not in self.splits:
      raise ValueError(
        f'{self.name} has no split {split!r}; its splits are {list(self.splits)}.'
      )
    return self.builder.as_data_source(split)

  def read(self, records: Sequence[dict], index: int) -> Example:
    """Decodes example `index` of `records` (from `split`) and checks its shapes."""
    record = records[index]
    image, label = self.to_image_label(record)
    if image.shape[:-1] != label.shape or image.ndim != self.ndim + 1:
      raise ValueError(
        f'{self.name}: example {index} has image {image.shape} and label {label.shape}.'
      )
    spacing = record.get('spacing') if isinstance(record, Mapping) else None
    if spacing is None:
      spacing = self.spacing or (1.0,) * self.ndim
    return Example(
      image=image,
      label=label,
      spacing=tuple(float(s) for s in np.asarray(spacing).reshape(-1)),
      case_id=_case_id(record, index),
    )


def _case_id(record, index: int) -> str:
  for key in ('id', 'file_name'):
    value = record.get(key) if isinstance(record, Mapping) else None
    if value is not None:
      value = np.asarray(value).item()
      return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)
  return str(index)


@dataclasses.dataclass(frozen=True)
class Entry:
  """How to open one registered data set; each takes `config_lib.DataOptions`.

  Attributes:
    ndim: the dimensionality the options name, known before building.
    check: raises ValueError for config errors that need no data set built.
    open: opens (building first if needed) the data set the options name.
  """

  ndim: Callable[[config_lib.DataOptions], int]
  check: Callable[[config_lib.DataOptions], None]
  open: Callable[[config_lib.DataOptions], Source]


DATASETS: dict[str, Entry] = {}


def register(name: str, entry: Entry) -> None:
  """Makes `name` usable as `config.data.name`."""
  DATASETS[name] = entry


def get(name: str) -> Entry:
  """The entry of a registered data set; a ValueError lists the valid names."""
  if name not in DATASETS:
    raise ValueError(
      f'Unknown data set {name!r}; config.data.name must be one of {sorted(DATASETS)}.'
    )
  return DATASETS[name]


# ---------------------------------------------------------------------------
# Building.


def _add_array_record(builder) -> None:
  """Adds array_record copies of a data set prepared as TFRecord only.

  Makes a data set built by `tfds.load` (or an earlier, TFRecord-only
  download) readable at random without building it again.
  """
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module

  tf = cpu_tensorflow.import_tensorflow()
  info = builder.info
  logging.info('Adding array_record files to %s for random access.', builder.data_dir)
  for split_info in info.splits.values():
    template = split_info.filename_template
    sources = template.sharded_filepaths(split_info.num_shards)
    targets = template.replace(filetype_suffix='array_record').sharded_filepaths(
      split_info.num_shards
    )
    for source, target in zip(sources, targets):
      partial = f'{target}.incomplete'
      writer = array_record_module.ArrayRecordWriter(partial, 'group_size:1')
      for record in tf.data.TFRecordDataset(os.fspath(source)).as_numpy_iterator():
        writer.write(record)
      writer.close()
      os.replace(partial, target)
  info.add_alternative_file_format('array_record')
  info.write_to_directory(builder.data_dir)


def build(builder) -> None:
  """Builds a data set in array_record format if it is not built yet."""
  if not builder.is_prepared():
    logging.info(
      'Building %s into %s (first use; this reads or generates every example once).',
      builder.info.full_name,
      builder.data_dir,
    )
    cpu_tensorflow.import_tensorflow()
    builder.download_and_prepare(file_format='array_record')
    logging.info('Built %s.', builder.info.full_name)
  elif 'array_record' not in {f.value for f in builder.info.available_file_formats()}:
    _add_array_record(builder)


def open_on_every_process(entry: Entry, data: config_lib.DataOptions) -> Source:
  """`entry.open(data)` on every JAX process, process 0 first.

  Opening builds a data set that is not built yet. With several processes
  sharing `data_dir`, each would build it at once and race to write the same
  files, so process 0 opens (and builds) first while the others wait at a
  barrier; then they open the copy it built (`distributed.main_process_first`).
  When process 0 fails, the others raise too. With one process, `entry.open`.
  `data_dir` should be on storage that every process reads; a process that
  finds nothing built after the barrier builds its own copy.
  """
  return distributed.main_process_first(
    lambda: entry.open(data), what=f'open the data set {data.name!r}'
  )


def _data_dir(data: config_lib.DataOptions) -> str | None:
  return data.data_dir or None


def _image_to_float(example: dict) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(example['image'], np.float32), np.asarray(example['label'], np.int32)


def _from_metadata(name: str, builder, ndim: int) -> Source:
  """A Source of a builder whose metadata records classes, channels and shapes."""
  meta = builder.info.metadata
  if meta.get('ndim') != ndim:
    raise ValueError(f'{builder.info.full_name} is {meta.get("ndim")}D, expected {ndim}D.')
  spacing = meta.get('spacing')
  if spacing is None and ndim == 3:
    spacing = (1.0,) * ndim
  shape = lambda key: None if meta.get(key) is None else tuple(int(s) for s in meta[key])
  median = shape('median_shape')
  if median is None and meta.get('min_shape') == meta.get('max_shape'):
    median = shape('max_shape')
  return Source(
    name=name,
    builder=builder,
    num_classes=int(meta['num_classes']),
    num_channels=int(meta['num_channels']),
    ndim=ndim,
    min_shape=shape('min_shape'),
    max_shape=shape('max_shape'),
    median_shape=median,
    spacing=None if spacing is None else tuple(float(s) for s in spacing),
    small_examples=tuple((str(p), tuple(s)) for p, s in meta.get('small_examples', [])),
    splits=tuple(builder.info.splits.keys()),
    split_aliases={},
    to_image_label=_image_to_float,
    channel_names=tuple(str(c) for c in meta.get('channel_names', ())),
    labelled_splits=tuple(
      s
      for s in ('train', 'val')
      if (meta.get('format') in ('nnunet', 'msd') or meta.get('pooled'))
      and s in builder.info.splits
    ),
  )


# ---------------------------------------------------------------------------
# The registered data sets.


def _no_check(data: config_lib.DataOptions) -> None:
  """Data sets with fixed splits: no folds."""
  if data.fold != 0 or data.num_folds:
    raise ValueError(
      f'config.data.fold={data.fold!r} and num_folds={data.num_folds}: {data.name!r}'
      ' has fixed splits; folds are for segmentation_folder.'
    )


def _open_synthetic(ndim: int) -> Callable[[config_lib.DataOptions], Source]:
  def open_source(data: config_lib.DataOptions) -> Source:
    builder = tfds.builder(data.name, config=data.config or None, data_dir=_data_dir(data))
    build(builder)
    return _from_metadata(data.name, builder, ndim)

  return open_source


def _folder_root(data: config_lib.DataOptions) -> str:
  return os.path.abspath(os.path.expanduser(data.root)) if data.root else ''


def _guess_ndim(root: str) -> int:
  """3 when every image under `root/<split>/images` is NIfTI, else 2."""
  names = [
    name.lower()
    for split in folder_lib.SPLITS
    if os.path.isdir(folder := os.path.join(root, split, 'images'))
    for name in os.listdir(folder)
    if not name.startswith('.')
  ]
  nifti = [n for n in names if n.endswith(folder_lib.IMAGE_EXTENSIONS[3])]
  return 3 if names and len(nifti) == len(names) else 2


def _folder_ndim(data: config_lib.DataOptions) -> int:
  """2 or 3: from `config.data.config` ('2d', '3d'), a dataset.json's file
  ending, or ('') the files' extensions."""
  config = data.config
  if config not in ('', '2d', '3d'):
    raise ValueError(
      "segmentation_folder takes config.data.config '2d', '3d' or '' (from the"
      f' files), got {config!r}.'
    )
  root = _folder_root(data)
  if root and nnunet.is_dataset(root):
    layout = nnunet.read_layout(root)
    if config and int(config[0]) != layout.ndim:
      raise ValueError(
        f'config.data.config={config!r}, but {root}/dataset.json has file_ending'
        f" {layout.file_ending!r}, which is {layout.ndim}D; set config.data.config=''."
      )
    return layout.ndim
  if config:
    return int(config[0])
  return _guess_ndim(root) if root and os.path.isdir(root) else 2


def _folder_check(data: config_lib.DataOptions) -> None:
  root = data.root
  if not root:
    raise ValueError(
      'segmentation_folder needs config.data.root: a folder with train/ and val/,'
      ' or an nnU-Net v2 or MSD data set folder (with its dataset.json).'
    )
  if not os.path.isdir(os.path.expanduser(root)):
    raise ValueError(f'config.data.root {root!r} is not a folder.')
  ndim = _folder_ndim(data)
  if data.target_spacing and len(data.target_spacing) != ndim:
    raise ValueError(
      f'config.data.target_spacing={data.target_spacing} has'
      f' {len(data.target_spacing)} values; the data set is {ndim}D.'
    )
  if data.mask_colors and nnunet.is_dataset(_folder_root(data)):
    raise ValueError(
      "config.data.mask_colors applies to the project's folder layout; nnU-Net and"
      ' MSD labels hold class indices.'
    )
  _fold_split(_folder_root(data), data, ndim, write=False)  # The fold, before a build.


def _folder_options(data: config_lib.DataOptions) -> dict[str, Any]:
  """The options that decide a folder's built copy (they key its fingerprint)."""
  return {
    'num_classes': data.num_classes or None,  # 0: infer.
    'mask_colors': data.mask_colors or None,
    'ignore_index': data.ignore_index,
    # Only when set, so the copies built before the option keep their names.
    **({'nonfinite': data.nonfinite} if data.nonfinite != 'error' else {}),
  }


def splits_path(root: str, data_dir: str | None) -> str:
  """Where the `splits_final.json` of an nnU-Net or MSD data set (or of the
  project's layout split into folds) is: in `root` if the user put one there
  (nnU-Net's own, copied), else beside the built copies in `data_dir` (TFDS's
  default when None), one per data set folder."""
  own = os.path.join(root, 'splits_final.json')
  if os.path.exists(own):
    return own
  key = hashlib.sha256(root.encode()).hexdigest()[:8]
  folder = os.path.join(
    data_dir or tfds.core.constants.get_default_data_dir(),
    'segmentation_folder',
    'splits',
    f'{os.path.basename(root)}_{key}',
  )
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, 'splits_final.json')


DEFAULT_NUM_FOLDS = 5  # nnU-Net's, for a split made when config.data.num_folds is 0.


def _own_pairs(root: str, ndim: int) -> dict[str, list]:
  """The project's layout: its pairs by split (names only; cheap checks)."""
  return folder_lib.list_pairs(root, ndim=ndim)


def _pooled_ids(pairs: dict[str, list], root: str) -> list[str]:
  """The case ids of train/ and val/ together; a ValueError names repeated ids."""
  ids = [p.id for split in ('train', 'val') for p in pairs.get(split, [])]
  repeated = sorted({i for i in ids if ids.count(i) > 1})
  if repeated:
    raise ValueError(
      f"config.data.num_folds (or fold='all') pools train/ and val/ of {root}, but"
      f' case id(s) {repeated} are in both: rename them so each id names one case.'
    )
  return ids


def _folds(root: str, data, ids: list[str], *, write: bool) -> tuple[list, str]:
  """The folds of `ids` and where they are kept (`splits_path`).

  An existing file is read (and checked against `ids`); otherwise nnU-Net's
  split into `num_folds` folds (5 when 0) is made, and written if `write`.
  Raises ValueError when a set `num_folds` differs from the file's, or
  `fold` is beyond its folds.
  """
  path = splits_path(root, _data_dir(data))
  num_folds = data.num_folds or DEFAULT_NUM_FOLDS
  if os.path.exists(path) or write:
    folds = nnunet.read_or_write_splits(path, ids, num_folds=num_folds)
  else:
    folds = nnunet.splits(ids, num_folds=num_folds)
  if data.num_folds and len(folds) != data.num_folds:
    raise ValueError(
      f'config.data.num_folds={data.num_folds}, but {path} holds {len(folds)} folds:'
      ' leave num_folds at 0 to use the file as it is, or move the file away to'
      ' split anew.'
    )
  if data.fold != 'all' and data.fold >= len(folds):
    raise ValueError(
      f'config.data.fold={data.fold!r} is beyond the {len(folds)} folds of {path}:'
      f" use 0 .. {len(folds) - 1} or 'all'."
    )
  return folds, path


def _fold_split(root: str, data, ndim: int, *, write: bool = True):
  """(train ids, val ids, pooled) of the configured fold of a folder data set.

  `pooled`: the project's layout is re-split (train/ and val/ pooled); its
  own split is kept (False) when `num_folds` is 0 and `fold` is not 'all'.
  """
  if nnunet.is_dataset(root):
    ids, pooled = [case.id for case in nnunet.read_layout(root).training], False
  else:
    pairs = _own_pairs(root, ndim)
    pooled = bool(data.num_folds) or data.fold == 'all'
    if not pooled and data.fold != 0:
      raise ValueError(
        f'config.data.fold={data.fold!r}: {root} keeps its own train/ and val/ split'
        ' (fold 0) unless config.data.num_folds is set; set it (e.g. 5) to pool'
        " train/ and val/ and split them into folds, or use fold='all'."
      )
    if not pooled:
      own = lambda split: tuple(sorted(p.id for p in pairs.get(split, [])))
      return own('train'), own('val'), False
    ids = _pooled_ids(pairs, root)
  if data.fold == 'all':
    return tuple(sorted(ids)), (), pooled
  fold = _folds(root, data, ids, write=write)[0][data.fold]
  return tuple(sorted(fold['train'])), tuple(sorted(fold['val'])), pooled


def fold_ids(data: config_lib.DataOptions) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train case ids, val case ids) of the configured fold, sorted.

  For a `segmentation_folder` data set (`config.data.root`): an nnU-Net or
  MSD data set's fold `config.data.fold` of its `splits_final.json`
  (`splits_path`; written first, nnU-Net's split into `num_folds` folds, when
  missing); the project's layout's pooled train/ and val/ split the same way
  when `num_folds` is set, else the ids of its train/ and val/. With
  `fold='all'` every labelled case trains and the val ids are (). No data
  set is built; the folds are those the built 'train' and 'val' splits hold.

  Args:
    data: `config_lib.DataOptions` (or `config.data`).

  Raises:
    ValueError: for another data set, a fold beyond the folds, a `num_folds`
      that differs from the file's, or ids repeated across train/ and val/
      when they are pooled.
  """
  data = config_lib.DataOptions.from_config(data)
  if data.name != 'segmentation_folder':
    raise ValueError(f'Folds are those of segmentation_folder, not {data.name!r}.')
  _folder_check(data)
  train, val, _ = _fold_split(_folder_root(data), data, _folder_ndim(data))
  return train, val


def case_files(data: config_lib.DataOptions) -> dict[str, tuple[tuple[str, ...], str]]:
  """Case id -> (image paths in channel order, label path), for every labelled
  case the folds are drawn from: an nnU-Net or MSD data set's training cases
  (an MSD image is one 4D file), the project's layout's train/ and val/
  (test/ is held out). Paths are absolute; no data set is built.

  Raises:
    ValueError: for another data set, or an id in both train/ and val/.
  """
  data = config_lib.DataOptions.from_config(data)
  if data.name != 'segmentation_folder':
    raise ValueError(f'Case files are those of segmentation_folder, not {data.name!r}.')
  _folder_check(data)
  root = _folder_root(data)
  if nnunet.is_dataset(root):
    training = nnunet.read_layout(root).training
    return {case.id: (tuple(case.images), case.label) for case in training}
  pairs = _own_pairs(root, _folder_ndim(data))
  _pooled_ids(pairs, root)
  return {
    p.id: ((p.image,), p.mask) for split in ('train', 'val') for p in pairs.get(split, [])
  }


def _dataset_files(root: str, data: config_lib.DataOptions, ndim: int):
  """(layout name, the files the built copy is read from, val ids, pooled)."""
  _, val_ids, pooled = _fold_split(root, data, ndim)
  if not nnunet.is_dataset(root):
    pairs = _own_pairs(root, ndim)
    paths = [p for split in sorted(pairs) for x in pairs[split] for p in (x.image, x.mask)]
    return 'folder', paths, val_ids, pooled
  layout = nnunet.read_layout(root)
  paths = [p for case in layout.training for p in (*case.images, case.label)]
  return layout.format, paths, val_ids, pooled


def _open_folder(data: config_lib.DataOptions) -> Source:
  ndim = _folder_ndim(data)
  root = _folder_root(data)
  options = _folder_options(data)
  target = tuple(data.target_spacing) if ndim == 3 and data.target_spacing else None
  layout, paths, val_ids, pooled = _dataset_files(root, data, ndim)
  # A re-split own layout adds its flag; other copies keep the names they had.
  values = (root, ndim, layout, target, val_ids, *options.values())
  extra = '\0'.join(str(v) for v in values + (('pooled',) if pooled else ()))
  digest = folder_lib.files_fingerprint(root, paths, extra=extra)
  builder_config = builder_lib.SegmentationFolderConfig(
    name=f'{ndim}d_{digest}',
    ndim=ndim,
    root=root,
    layout=layout,
    target_spacing=target,
    val_ids=val_ids,
    pooled=pooled,
    **options,
  )
  builder = tfds.builder(
    'segmentation_folder', config=builder_config, data_dir=_data_dir(data)
  )
  build(builder)
  source = _from_metadata('segmentation_folder', builder, ndim)
  if data.fold == 'all':
    logging.info(
      "config.data.fold='all': every labelled case of %s trains; no 'val' split.", root
    )
  return dataclasses.replace(source, split_aliases={'validation': 'val'})


def _pets_check(data: config_lib.DataOptions) -> None:
  _no_check(data)
  if not data.image_size:
    raise ValueError(
      f'{pets.NAME} holds images of varying size; set config.data.image_size'
      " (e.g. 128) and config.data.size_policy='resize'."
    )


def _open_pets(data: config_lib.DataOptions) -> Source:
  builder = tfds.builder(pets.NAME, data_dir=_data_dir(data))
  build(builder)
  return Source(
    name=pets.NAME,
    builder=builder,
    num_classes=pets.NUM_CLASSES,
    num_channels=3,
    ndim=2,
    min_shape=None,
    max_shape=None,
    median_shape=None,
    spacing=None,
    small_examples=(),
    splits=pets.SPLITS,
    split_aliases={'validation': 'test'},
    to_image_label=pets.to_image_label,
  )


register(
  'synthetic_shapes', Entry(ndim=lambda c: 2, check=_no_check, open=_open_synthetic(2))
)
register(
  'synthetic_volumes', Entry(ndim=lambda c: 3, check=_no_check, open=_open_synthetic(3))
)
register(
  'segmentation_folder', Entry(ndim=_folder_ndim, check=_folder_check, open=_open_folder)
)
register(pets.NAME, Entry(ndim=lambda c: 2, check=_pets_check, open=_open_pets))


def config_ndim(data) -> int:
  """The spatial rank of the data set `data` (`config.data` or its options) names,
  known before it is built."""
  data = config_lib.DataOptions.from_config(data)
  return get(data.name).ndim(data)
