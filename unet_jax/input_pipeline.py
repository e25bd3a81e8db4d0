"""Input pipeline: TFDS data sets in array_record format, read at random with grain.

    info = input_pipeline.get_info(config.data, divisor=(8, 8))
    train_it = input_pipeline.train_iterator(
        config.data, batch_size=16, seed=0, divisor=(8, 8), start_step=step)
    batch = next(train_it)  # {'image': f32[b, H, W, C], 'label': i32[b, H, W]}

Data sets (`config.data.name`): 'synthetic_shapes', 'synthetic_volumes',
'segmentation_folder' (with `config.data.root`) and 'oxford_iiit_pet'. The
first use of a data set builds it with TFDS into `config.data.data_dir` (''
means TFDS's default), logging progress; later uses read the built copy.

Order. Every example the train iterator yields is a pure function of
`(seed, step, position in the global batch)`: global example g = step *
batch_size + position is example `perm_e[g % n]` of the train split, where
perm_e is a seed-derived permutation drawn afresh for each epoch
e = g // n. Resuming at `start_step=s` therefore yields exactly the batches
a run from 0 yields from step s on, with no skipping. Process p of P takes
positions [p * b, (p + 1) * b) of each global batch, b = batch_size // P.
Batches are built in a background thread and prefetched.

Sizes. `config.data.size_policy` maps every example to one shape whose sizes
are multiples of `divisor` (the model's total pooling factor):

* 'pad' (default): the largest size in the data set (or
  `config.data.image_size`), rounded up; smaller examples are zero-padded
  around the centre (after normalisation, so the padding is the mean, and
  label 0), larger ones centre-cropped.
* 'crop': the smallest size (or `image_size`), rounded down; larger
  examples are centre-cropped, smaller ones padded.
* 'resize': `image_size` (or the largest size), rounded to the nearest
  multiple; images are resized with linear and masks with nearest
  interpolation.

Data sets of varying, unrecorded sizes (oxford_iiit_pet) need `image_size`.
With `config.data.patch_size`, training yields random patches of that size
instead (volumes smaller than a patch are padded first), a share
`config.data.foreground_fraction` of them centred on a foreground voxel, as in
nnU-Net; evaluation still yields whole examples at the policy's shape.

Normalisation: each example, per channel, to zero mean and unit standard
deviation over its own pixels (z-score, as nnU-Net does for MRI).

Splits: synthetic sets have 'train', 'validation' and 'test';
segmentation_folder has 'train', 'val' and 'test' and reads 'validation' as
'val'; oxford_iiit_pet has 'train' and 'test' and reads 'validation' as 'test'.

Why grain over array_record rather than tf.data. Exact resume and a global,
per-epoch reshuffle need random access by index, which array_record gives and
TFRecord does not: tf.data resumes by reading and dropping every earlier
example, and its shuffle buffer is not a global permutation. Per-example logic
(patch choice with foreground oversampling, size policies) stays plain numpy
instead of TF ops. Measured with `benchmarks/input_pipeline.py` on this 2-core
CPU machine (shared with other jobs, so +-20%), synthetic_shapes/binary
(64x64x1), batch 16:

  grain + array_record, 1 read thread       5,800-7,900 examples/s
    (2 threads 4,800-6,200, 4 threads 4,500-7,200: GIL-bound numpy work)
  tf.data + TFRecord, parallel map         19,000-37,000 examples/s
  resume at step 10,000                    grain 0.0 s, tf.data 0.4-0.7 s
                                           (grows with the step and the
                                           decode cost)
  train step, default config, augmenting   on a fixed batch 54.7 and 36.6
                                           examples/s; fed by this pipeline
                                           52.1 and 37.2 (two runs,
                                           interleaved medians)
  3D patches 16x32x32, synthetic_volumes   275-560 examples/s

tf.data reads faster, but either input outruns the CPU train step about
100-fold, so its speed buys nothing here, while grain buys exactness. Where a
fast accelerator step outruns one read thread, grain's `mp_prefetch` adds
worker processes (measured: 5,200 examples/s with 2 workers on these 2 shared
cores; it should scale with cores, which this machine cannot show).
"""

import dataclasses
import math
import os
import sys
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import grain
import jax
import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

# Importing unet_jax.datasets registers its TFDS builders.
from unet_jax.datasets import cpu_tensorflow
from unet_jax.datasets import pets
from unet_jax.datasets import segmentation_folder as folder_lib

NAMES = (
    'synthetic_shapes',
    'synthetic_volumes',
    'segmentation_folder',
    'oxford_iiit_pet',
)
SIZE_POLICIES = ('pad', 'crop', 'resize')
_NDIM = {'synthetic_shapes': 2, 'synthetic_volumes': 3, 'oxford_iiit_pet': 2}
_SPLIT_ALIASES = {
    'segmentation_folder': {'validation': 'val'},
    'oxford_iiit_pet': {'validation': 'test'},
}
_READ_THREADS = 1  # Background threads building batches (see the measurement above).
_PREFETCH_BATCHES = 4  # Batches buffered ahead of the train step.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about a data set.

  Attributes:
    num_classes: Classes in the masks, background included (binary: 2).
    num_channels: Image channels.
    spatial_shape: Spatial shape of a training example as fed to the model
      (after the size policy, or the patch size): (H, W) or (D, H, W).
    num_train: Examples in the train split.
    num_eval: Examples in the eval split.
    spacing: Voxel spacing (D, H, W) of 3D data, if known; else None.
    eval_spatial_shape: Spatial shape of an eval example (differs from
      `spatial_shape` only when training on patches).
  """

  num_classes: int
  num_channels: int
  spatial_shape: tuple
  num_train: int
  num_eval: int
  spacing: tuple | None
  eval_spatial_shape: tuple | None = None


@dataclasses.dataclass(frozen=True)
class _Data:
  """An opened, built data set."""

  name: str
  builder: Any
  num_classes: int
  num_channels: int
  ndim: int
  min_shape: tuple | None
  max_shape: tuple | None
  spacing: tuple | None
  to_image_label: Callable[[dict], tuple[np.ndarray, np.ndarray]]

  def source(self, split: str) -> Sequence[dict]:
    """The random-access source of a split, with a clear error if absent."""
    split = _SPLIT_ALIASES.get(self.name, {}).get(split, split)
    if self.name == pets.NAME:
      known = list(pets.SPLITS)
    else:
      known = list(self.builder.info.splits.keys())
    if split not in known:
      raise ValueError(f'{self.name} has no split {split!r}; its splits are {known}.')
    return self.builder.as_data_source(split)


# ---------------------------------------------------------------------------
# Opening and building data sets.


def _config_get(data_config, key, default=None):
  value = data_config.get(key, default)
  return default if value is None else value


def _ndim_of(data_config) -> int:
  """Dimensionality of a configured data set, known before building it."""
  name = data_config.name
  if name not in NAMES:
    raise ValueError(
        f'Unknown data set {name!r}; config.data.name must be one of {list(NAMES)}.'
    )
  if name != 'segmentation_folder':
    return _NDIM[name]
  config = _config_get(data_config, 'config', '') or '2d'
  if config not in ('2d', '3d'):
    raise ValueError(
        f"segmentation_folder takes config.data.config '2d' or '3d', got {config!r}."
    )
  return int(config[0])


def _image_to_float(example: dict) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(example['image'], np.float32), np.asarray(example['label'], np.int32)


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


def _prepare(builder) -> None:
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


def _open(data_config) -> _Data:
  """Opens (building if needed) the data set `data_config` names."""
  ndim = _ndim_of(data_config)
  name = data_config.name
  data_dir = _config_get(data_config, 'data_dir', '') or None
  if name == 'segmentation_folder':
    root = _config_get(data_config, 'root', '')
    if not root:
      raise ValueError(
          'segmentation_folder needs config.data.root, the folder of images and masks.'
      )
    num_classes = _config_get(data_config, 'num_classes', None) or None  # 0: infer.
    pairs = folder_lib.list_pairs(root, ndim=ndim)  # Cheap checks on file names.
    root = os.path.abspath(os.path.expanduser(root))
    digest = folder_lib.fingerprint(root, pairs, extra=f'{root}\0{ndim}\0{num_classes}')
    builder_config = folder_lib.SegmentationFolderConfig(
        name=f'{ndim}d_{digest}', ndim=ndim, root=root, num_classes=num_classes
    )
    builder = tfds.builder(name, config=builder_config, data_dir=data_dir)
  else:
    builder = tfds.builder(
        name, config=_config_get(data_config, 'config', '') or None, data_dir=data_dir
    )
  _prepare(builder)

  if name == pets.NAME:
    return _Data(
        name=name,
        builder=builder,
        num_classes=pets.NUM_CLASSES,
        num_channels=3,
        ndim=2,
        min_shape=None,
        max_shape=None,
        spacing=None,
        to_image_label=pets.to_image_label,
    )
  meta = builder.info.metadata
  if meta.get('ndim') != ndim:
    raise ValueError(
        f'{builder.info.full_name} is {meta.get("ndim")}D, expected {ndim}D.'
    )
  spacing = meta.get('spacing')
  if spacing is None and ndim == 3:
    spacing = (1.0,) * ndim
  return _Data(
      name=name,
      builder=builder,
      num_classes=int(meta['num_classes']),
      num_channels=int(meta['num_channels']),
      ndim=ndim,
      min_shape=tuple(meta['min_shape']),
      max_shape=tuple(meta['max_shape']),
      spacing=None if spacing is None else tuple(float(s) for s in spacing),
      to_image_label=_image_to_float,
  )


# ---------------------------------------------------------------------------
# Shapes: divisor, size policy, patches.


def _per_axis(value, ndim: int, what: str) -> tuple[int, ...] | None:
  """An int or a sequence of ints as a tuple of `ndim` ints; None if unset."""
  if isinstance(value, (int, np.integer)):
    values = (int(value),) * ndim if value else ()
  else:
    values = tuple(int(v) for v in value or ())
  if not values:
    return None
  if len(values) != ndim:
    raise ValueError(
        f'{what} {values} has {len(values)} axes, but the data set is {ndim}D.'
    )
  if min(values) < 1:
    raise ValueError(f'{what} {values} must be positive.')
  return values


def _shapes(
    data_config, data: _Data, divisor
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
  """The model's eval shape (size policy) and the training patch size, if any."""
  ndim = data.ndim
  divisor = _per_axis(divisor, ndim, 'divisor')
  policy = _config_get(data_config, 'size_policy', 'pad')
  image_size = _per_axis(
      _config_get(data_config, 'image_size', None), ndim, 'config.data.image_size'
  )
  patch = _per_axis(
      _config_get(data_config, 'patch_size', None), ndim, 'config.data.patch_size'
  )
  if patch is not None and any(p % d for p, d in zip(patch, divisor)):
    raise ValueError(
        f'config.data.patch_size {patch} must be a multiple of the model divisor'
        f' {divisor}.'
    )
  if image_size is not None:
    base = image_size
  elif data.max_shape is None:
    raise ValueError(
        f'{data.name} holds images of varying size; set config.data.image_size'
        " (e.g. 128) and config.data.size_policy='resize'."
    )
  else:
    base = data.min_shape if policy == 'crop' else data.max_shape
  if policy == 'pad':
    shape = tuple(-(-s // d) * d for s, d in zip(base, divisor))
  elif policy == 'crop':
    shape = tuple(max(d, s // d * d) for s, d in zip(base, divisor))
  else:
    shape = tuple(max(d, int(round(s / d)) * d) for s, d in zip(base, divisor))
  return shape, patch


def _normalise(image: np.ndarray) -> np.ndarray:
  """Per-channel z-score over the spatial axes: float32 [*spatial, C]."""
  flat = image.reshape(-1, image.shape[-1]).astype(np.float32, copy=False)
  mean = flat.mean(axis=0)
  std = np.sqrt(np.mean(np.square(flat - mean), axis=0))
  return (image - mean) * (1 / np.maximum(std, 1e-6))


def _pad_or_crop(image, label, shape):
  """Centre-pads (image 0, label 0) or centre-crops to `shape`."""
  pads, crops = [], []
  for size, target in zip(label.shape, shape):
    extra = target - size
    pads.append((max(extra, 0) // 2, max(extra, 0) - max(extra, 0) // 2))
    start = max(-extra, 0) // 2
    crops.append(slice(start, start + min(size, target)))
  image, label = image[tuple(crops)], label[tuple(crops)]
  if any(p != (0, 0) for p in pads):
    image = np.pad(image, pads + [(0, 0)])
    label = np.pad(label, pads)
  return image, label


def _resize(image, label, shape):
  """Resizes the image (linear) and the mask (nearest) to `shape`."""
  zoom = [t / s for t, s in zip(shape, label.shape)]
  image = ndimage.zoom(image, zoom + [1.0], order=1, mode='nearest', grid_mode=True)
  label = ndimage.zoom(label, zoom, order=0, mode='nearest', grid_mode=True)
  return image, label


def _fit(image, label, shape, *, policy):
  if label.shape == tuple(shape):
    return image, label
  if policy == 'resize':
    return _resize(image, label, shape)
  return _pad_or_crop(image, label, shape)


def _random_patch(image, label, patch, rng: np.random.Generator, *, on_foreground: bool):
  """A random patch; if `on_foreground`, centred on a voxel of a random foreground class.

  The patch is shifted inside the volume where the centre is too close to an
  edge. Volumes without foreground give a uniformly random patch.
  """
  shape = tuple(max(s, p) for s, p in zip(label.shape, patch))
  image, label = _pad_or_crop(image, label, shape)
  high = np.asarray(shape) - np.asarray(patch)
  start = None
  if on_foreground:
    counts = np.bincount(label.ravel())
    classes = np.flatnonzero(counts[1:]) + 1
    if classes.size:
      cls = rng.choice(classes)
      voxel = np.unravel_index(rng.choice(np.flatnonzero(label.ravel() == cls)), shape)
      start = np.clip(np.asarray(voxel) - np.asarray(patch) // 2, 0, high)
  if start is None:
    start = np.asarray([rng.integers(0, h + 1) for h in high])
  window = tuple(slice(s, s + p) for s, p in zip(start, patch))
  return image[window], label[window]


def _on_foreground(index: int, fraction: float) -> bool:
  """Whether the index-th example of the stream is centred on foreground.

  Exactly `round(n * fraction)` of any n consecutive indices, evenly spread
  (so every process's share of a batch gets its part).
  """
  return math.floor((index + 1) * fraction + 1e-9) > math.floor(index * fraction + 1e-9)


def _seed_words(seed: int) -> int:
  """A 32-bit seed derived from any integer seed (for grain's shuffle)."""
  return int(np.random.SeedSequence([seed % 2**63, 0]).generate_state(1)[0])


def _processes(process_index, process_count, batch_size) -> tuple[int, int, int]:
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  if batch_size < process_count or batch_size % process_count:
    raise ValueError(
        f'batch_size {batch_size} must be a positive multiple of process_count'
        f' {process_count}.'
    )
  return process_index, process_count, batch_size // process_count


def _read(data: _Data, source, index: int):
  image, label = data.to_image_label(source[index])
  if image.shape[:-1] != label.shape or image.ndim != data.ndim + 1:
    raise ValueError(
        f'{data.name}: example {index} has image {image.shape} and label {label.shape}.'
    )
  return _normalise(image), label


def _iterate(batches: 'grain.MapDataset') -> Iterator[dict]:
  options = grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES
  )
  return iter(batches.to_iter_dataset(options))


# ---------------------------------------------------------------------------
# Public API.


def get_info(data_config, *, divisor) -> DatasetInfo:
  """Reads a data set's metadata, building the data set first if needed.

  Args:
    data_config: `config.data`.
    divisor: An int, or one int per spatial axis, that every model input size
      must be a multiple of (the model's total pooling factor).

  Returns:
    A `DatasetInfo`.

  Raises:
    ValueError: for a bad config (unknown name, missing root, a divisor, patch
      or image size of the wrong rank, a patch size not a multiple of the
      divisor, an unknown split), before any data set is built.
    datasets.BadDataError: (a ValueError) naming each bad file of a folder.
  """
  _check_config(data_config, divisor)
  data = _open(data_config)
  eval_shape, patch = _shapes(data_config, data, divisor)
  num_train = len(data.source(data_config.train_split))
  num_eval = len(data.source(data_config.eval_split))
  return DatasetInfo(
      num_classes=data.num_classes,
      num_channels=data.num_channels,
      spatial_shape=patch or eval_shape,
      num_train=num_train,
      num_eval=num_eval,
      spacing=data.spacing,
      eval_spatial_shape=eval_shape,
  )


def _check_config(data_config, divisor) -> None:
  """Config errors that need no data set built."""
  ndim = _ndim_of(data_config)
  policy = _config_get(data_config, 'size_policy', 'pad')
  if policy not in SIZE_POLICIES:
    raise ValueError(
        f'config.data.size_policy must be one of {list(SIZE_POLICIES)}, got {policy!r}.'
    )
  fraction = float(_config_get(data_config, 'foreground_fraction', 0.0))
  if not 0 <= fraction <= 1:
    raise ValueError(
        f'config.data.foreground_fraction must be in [0, 1], got {fraction}.'
    )
  if data_config.name == 'segmentation_folder':
    root = _config_get(data_config, 'root', '')
    if not root:
      raise ValueError(
          'segmentation_folder needs config.data.root, the folder of images and masks.'
      )
    if not os.path.isdir(os.path.expanduser(root)):
      raise ValueError(f'config.data.root {root!r} is not a folder.')
  if data_config.name == pets.NAME and not _config_get(data_config, 'image_size', None):
    raise ValueError(
        f'{pets.NAME} holds images of varying size; set config.data.image_size'
        " (e.g. 128) and config.data.size_policy='resize'."
    )
  divisor_axes = _per_axis(divisor, ndim, 'divisor')
  if divisor_axes is None:
    raise ValueError(
        f'divisor must be a positive int or {ndim} of them, got {divisor!r}.'
    )
  patch = _per_axis(
      _config_get(data_config, 'patch_size', None), ndim, 'config.data.patch_size'
  )
  _per_axis(_config_get(data_config, 'image_size', None), ndim, 'config.data.image_size')
  if patch is not None and any(p % d for p, d in zip(patch, divisor_axes)):
    raise ValueError(
        f'config.data.patch_size {patch} must be a multiple of the model divisor'
        f' {divisor_axes}.'
    )


def train_iterator(
    data_config,
    *,
    batch_size: int,
    seed: int,
    divisor,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """An endless iterator over training batches.

  Args:
    data_config: `config.data`.
    batch_size: The global batch size, over all processes.
    seed: Seeds the order and the patch choice.
    divisor: As in `get_info`.
    start_step: The step of the first batch yielded; the batch of step s does
      not depend on where the iterator started (exact resume).
    process_index: This process; defaults to `jax.process_index()`.
    process_count: Defaults to `jax.process_count()`.

  With `data_config.patch_size`, each example is a random patch, centred on a
  foreground voxel for a share `data_config.foreground_fraction` of the
  examples; the patch is a pure function of (seed, step, position).

  Returns:
    An iterator of {'image': float32 [b, *spatial, C] (normalised),
    'label': int32 [b, *spatial]} with b = batch_size // process_count, built
    and prefetched in a background thread.
  """
  _check_config(data_config, divisor)
  p, _, b = _processes(process_index, process_count, batch_size)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  data = _open(data_config)
  shape, patch = _shapes(data_config, data, divisor)
  policy = _config_get(data_config, 'size_policy', 'pad')
  fraction = float(_config_get(data_config, 'foreground_fraction', 0.0))
  source = data.source(data_config.train_split)
  n = len(source)
  if n == 0:
    raise ValueError(
        f'{data.name}: the train split {data_config.train_split!r} is empty.'
    )
  # order[g] = the example at global position g; reshuffled every epoch.
  order = grain.MapDataset.range(n).shuffle(seed=_seed_words(seed)).repeat()

  def example(g: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = _read(data, source, order[g])
    if patch is None:
      return _fit(image, label, shape, policy=policy)
    rng = np.random.default_rng([seed % 2**63, 1, g])
    return _random_patch(
        image, label, patch, rng, on_foreground=_on_foreground(g, fraction)
    )

  def batch(step: int) -> dict[str, np.ndarray]:
    first = step * batch_size + p * b
    images, labels = zip(*(example(g) for g in range(first, first + b)))
    return {'image': np.stack(images), 'label': np.stack(labels).astype(np.int32)}

  return _iterate(grain.MapDataset.range(start_step, sys.maxsize).map(batch))


def eval_iterator(
    data_config,
    *,
    batch_size: int,
    divisor,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over the whole eval split (`data_config.eval_split`).

  Every process yields ceil(num_eval / batch_size) batches of exactly b =
  batch_size // process_count examples; each real example appears once over
  all processes, and the last global batch is filled with padding examples
  (zeros) that have mask 0. 3D data yields whole volumes at the size policy's
  shape (`DatasetInfo.eval_spatial_shape`), also when training on patches.

  Args:
    data_config: `config.data`.
    batch_size: The global eval batch size, over all processes.
    divisor: As in `get_info`.
    process_index: This process; defaults to `jax.process_index()`.
    process_count: Defaults to `jax.process_count()`.

  Returns:
    An iterator of {'image': float32 [b, *spatial, C], 'label': int32
    [b, *spatial], 'mask': float32 [b]}.
  """
  _check_config(data_config, divisor)
  p, _, b = _processes(process_index, process_count, batch_size)
  data = _open(data_config)
  shape, _ = _shapes(data_config, data, divisor)
  policy = _config_get(data_config, 'size_policy', 'pad')
  source = data.source(data_config.eval_split)
  n = len(source)
  if n == 0:
    raise ValueError(f'{data.name}: the eval split {data_config.eval_split!r} is empty.')
  num_steps = -(-n // batch_size)

  def batch(step: int) -> dict[str, np.ndarray]:
    images = np.zeros((b,) + shape + (data.num_channels,), np.float32)
    labels = np.zeros((b,) + shape, np.int32)
    mask = np.zeros((b,), np.float32)
    for k in range(b):
      g = step * batch_size + p * b + k
      if g < n:
        image, label = _read(data, source, g)
        images[k], labels[k] = _fit(image, label, shape, policy=policy)
        mask[k] = 1.0
    return {'image': images, 'label': labels, 'mask': mask}

  return _iterate(grain.MapDataset.range(num_steps).map(batch))
