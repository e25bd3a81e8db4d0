"""Input pipeline: a data set opened once, then read at random with grain.

    data = input_pipeline.open(config.data, divisor=(8, 8))
    data.info                     # classes, channels, shapes, sizes of the splits
    train_it = data.train_iterator(step, batch_size=16, seed=0)
    batch = next(train_it)        # {'image': f32[b, H, W, C], 'label': i32[b, H, W]}
    for batch in data.eval_iterator('validation', batch_size=16): ...

`config.data.name` picks a registered data set (`unet_jax.data.sources`):
'synthetic_shapes', 'synthetic_volumes', 'segmentation_folder' (with
`config.data.root`) or 'oxford_iiit_pet'. Opening a data set for the first time
builds it with TFDS into `config.data.data_dir` ('' means TFDS's default).

Labels. Pixels that carry no label hold `IGNORE_LABEL` (-1): the padding added
to fit the model, and the data set's own "don't care" value
(`config.data.ignore_index`, e.g. 255 for Pascal VOC's borders). The train step
leaves them out of the loss and the evaluators out of every metric.

Order. Every example the train iterator yields is a pure function of
`(seed, step, position in the global batch)`: global example g = step *
batch_size + position is example `perm_e[g % n]` of the train split, where
perm_e is a seed-derived permutation drawn afresh for each epoch e = g // n.
Resuming at `start_step=s` therefore yields exactly the batches a run from 0
yields from step s on, with no skipping. Process p of P takes positions
[p * b, (p + 1) * b) of each global batch, b = batch_size // P. Batches are
built in a background thread and prefetched.

Sizes. The model takes sizes that are multiples of `divisor` (its total
pooling factor, per axis). `config.data.size_policy` decides how:

* 'pad' (default): train on the largest size in the data set (or
  `config.data.image_size`), rounded up. Smaller examples are padded around
  the centre, larger ones randomly cropped.
* 'crop': train on random crops of the median size (or `image_size`), rounded
  down; smaller examples are padded. Examples far smaller than the median are
  named in a warning.
* 'resize': `image_size` (or the largest size), rounded to the nearest
  multiple; images are resized with linear and masks with nearest
  interpolation, for training and evaluation alike.

Under 'pad' and 'crop', evaluation always sees whole examples: each is padded
to the largest size, rounded up, and the padding is ignored. With
`config.data.patch_size` (3D), training yields random patches of that size
instead, a share `config.data.foreground_fraction` of them centred on a
foreground voxel, as nnU-Net does.

Normalisation (`config.data.normalization`, see `normalise`): 'zscore' (the
default) takes each example, per channel, to zero mean and unit standard
deviation over its own pixels (as nnU-Net does for MRI); 'ct' clips to a fixed
intensity window and applies one global z-score (nnU-Net's CT normalisation);
'rescale' maps a fixed range to [0, 1] (8-bit images); 'minmax' maps each image
to [0, 1]; 'none' leaves it. One mode for every channel, or one per channel
('ct,zscore'). `unet_jax.planning` chooses them from the data. Padding is added
after normalisation, so the image padding is 0 (the mean, under 'zscore').

Why grain over array_record rather than tf.data: exact resume and a global,
per-epoch reshuffle need random access by index, which array_record gives and
TFRecord does not, and per-example logic (patches with foreground
oversampling, size policies) stays plain numpy. tf.data reads faster; both
outrun the CPU train step by far (benchmarks/RESULTS.md, "Input pipeline").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import jax
import numpy as np
from scipy import ndimage

from unet_jax import config as config_lib
from unet_jax.data import sources

SIZE_POLICIES = config_lib.SIZE_POLICIES
NORMALIZATIONS = config_lib.NORMALIZATIONS  # DataOptions.normalization; see normalise.
IGNORE_LABEL = -1  # Label of pixels left out of the loss and the metrics.
_READ_THREADS = 1  # Background threads building batches (benchmarks/RESULTS.md).
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
    num_eval: Examples in the eval split (0 without one, under fold 'all').
    spacing: Voxel spacing (D, H, W) of 3D data, if known; else None.
    eval_spatial_shape: Spatial shape of an eval example (whole examples,
      padded to a common size).
  """

  num_classes: int
  num_channels: int
  spatial_shape: tuple
  num_train: int
  num_eval: int
  spacing: tuple | None
  eval_spatial_shape: tuple | None = None


# ---------------------------------------------------------------------------
# Shapes: divisor, size policy, patches.


def _round(shape, divisor, how: str) -> tuple[int, ...]:
  shape = [int(s) for s in shape]
  if how == 'up':
    return tuple(-(-s // d) * d for s, d in zip(shape, divisor))
  if how == 'down':
    return tuple(max(d, s // d * d) for s, d in zip(shape, divisor))
  return tuple(max(d, int(round(s / d)) * d) for s, d in zip(shape, divisor))


@dataclasses.dataclass(frozen=True)
class _Shapes:
  train: tuple[int, ...]  # What training examples are fitted to (no patches).
  eval: tuple[int, ...]  # What evaluation examples are padded or resized to.
  patch: tuple[int, ...] | None  # Training patches (3D), if any.


def _shapes(options: config_lib.DataOptions, source: sources.Source, divisor) -> _Shapes:
  """The training and evaluation shapes of the size policy, and the patch size."""
  policy = options.size_policy
  image_size = options.image_shape(source.ndim)
  patch = options.patch_shape(source.ndim)
  recorded = source.max_shape is not None
  if image_size is None and not recorded:
    raise ValueError(
      f'{source.name} holds images of varying size; set config.data.image_size'
      " (e.g. 128) and config.data.size_policy='resize'."
    )
  if policy == 'resize':
    shape = _round(image_size or source.max_shape, divisor, 'nearest')
    return _Shapes(train=shape, eval=shape, patch=patch)
  if not recorded:
    raise ValueError(
      f'config.data.size_policy={policy!r} evaluates whole images padded to the'
      f' largest size, which {source.name} does not record; use'
      " size_policy='resize'."
    )
  eval_shape = _round(np.maximum(source.max_shape, image_size or 0), divisor, 'up')
  if policy == 'pad':
    train = _round(image_size or source.max_shape, divisor, 'up')
  else:
    train = _round(image_size or source.median_shape or source.min_shape, divisor, 'down')
  return _Shapes(train=train, eval=eval_shape, patch=patch)


def normalise(
  image: np.ndarray, *, mode='zscore', low=None, high=None, mean=None, std=None
) -> np.ndarray:
  """Normalises an image [*spatial, C], per channel; float32 [*spatial, C].

  ::

    'zscore':  x' = (x - mean(x)) / max(std(x), 1e-6)   over the image's own pixels
    'ct':      x' = (clip(x, low, high) - mean) / std   with the data set's values
    'rescale': x' = (x - low) / (high - low)            a fixed range to [0, 1]
    'minmax':  x' = (x - min(x)) / max(max(x) - min(x), 1e-8)   per image to [0, 1]
    'none':    x' = x

  'zscore' is nnU-Net's normalisation for MRI-like data; 'ct' its CT normalisation,
  with `low`, `high` the 0.5 and 99.5 percentiles and `mean`, `std` the mean and
  standard deviation of the foreground intensities of the training set; 'rescale' a
  fixed scaling, e.g. `low=0, high=255` for 8-bit images; 'minmax' and 'none'
  nnU-Net's 'rescale_to_0_1' and 'noNorm' (Isensee et al., nnU-Net, Nature Methods
  2021, Sec. "Intensity normalization"; nnunetv2/preprocessing/normalization).

  Args:
    image: [*spatial, C] raw intensities.
    mode: one of `NORMALIZATIONS` for every channel, or a sequence of C modes (or
      a comma-separated string of them), one per channel.
    low, high, mean, std: 'ct' and 'rescale' only: a scalar or one value per
      channel ([C]).
  """
  modes = tuple(m.strip() for m in mode.split(',')) if isinstance(mode, str) else mode
  if len(modes) == 1:
    return _normalise_one(image, modes[0], low=low, high=high, mean=mean, std=std)
  if image.shape[-1] != len(modes):
    raise ValueError(
      f'normalise: {len(modes)} modes {tuple(modes)} for an image of'
      f' {image.shape[-1]} channel(s).'
    )
  values = dict(low=low, high=high, mean=mean, std=std)
  channels = []
  for c, m in enumerate(modes):
    own = {k: _channel_value(v, c) for k, v in values.items()}
    channels.append(_normalise_one(image[..., c : c + 1], m, **own).astype(np.float32))
  return np.concatenate(channels, axis=-1)


def _channel_value(value, c: int):
  """Channel c's value of a scalar, [1] or [C] value (None stays None)."""
  if value is None:
    return None
  value = np.asarray(value, np.float32).reshape(-1)
  return value[c] if value.size > 1 else value[0]


def _normalise_one(image, mode: str, *, low, high, mean, std) -> np.ndarray:
  """`normalise` with one mode for every channel."""
  if mode == 'zscore':
    flat = image.reshape(-1, image.shape[-1]).astype(np.float32, copy=False)
    mean = flat.mean(axis=0)
    std = np.sqrt(np.mean(np.square(flat - mean), axis=0))
    return (image - mean) * (1 / np.maximum(std, 1e-6))
  image = np.asarray(image, np.float32)
  if mode == 'none':
    return image
  if mode == 'minmax':
    flat = image.reshape(-1, image.shape[-1])
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    return ((image - lo) / np.maximum(hi - lo, np.float32(1e-8))).astype(np.float32)
  low, high = np.float32(low), np.float32(high)
  if mode == 'ct':
    mean, std = np.float32(mean), np.float32(std)
    return ((np.clip(image, low, high) - mean) / std).astype(np.float32)
  if mode == 'rescale':
    return ((image - low) / (high - low)).astype(np.float32)
  raise ValueError(f'mode={mode!r} is not one of {list(NORMALIZATIONS)}.')


def _channel_values(
  options: config_lib.DataOptions, name: str, num_channels: int | None
) -> np.ndarray:
  """`intensity_<name>`: one float per channel (or one for all), as float32 [C]."""
  values = options.intensity_values(name)
  if num_channels is not None and len(values) not in (1, num_channels):
    raise ValueError(
      f'config.data.intensity_{name}={tuple(values.tolist())} has {len(values)} values;'
      f' the data has {num_channels} channel(s): give 1 or {num_channels}.'
    )
  return values


def normaliser(data, num_channels: int | None = None):
  """The normalisation the data options ask for: image [*spatial, C] -> float32.

  Args:
    data: `config_lib.DataOptions` (or `config.data`): `normalization` (one mode,
      or one per channel) and, for 'ct' and 'rescale', the `intensity_*` values
      (checked there).
    num_channels: the image channels the modes and intensity values must fit (1
      of each, or one per channel); None: not checked.
  """
  options = config_lib.DataOptions.from_config(data)
  modes = options.normalization_modes()
  if num_channels is not None and len(modes) not in (1, num_channels):
    raise ValueError(
      f'config.data.normalization={options.normalization!r} gives {len(modes)}'
      f' modes; the data has {num_channels} channel(s): give 1 or {num_channels}.'
    )
  if modes == ('zscore',):
    return normalise
  names = {n for m in modes for n in config_lib.INTENSITY_FIELDS.get(m, ())}
  values = {
    name: _channel_values(options, name, num_channels)
    for name in ('low', 'high', 'mean', 'std')
    if name in names
  }
  return functools.partial(normalise, mode=modes[0] if len(modes) == 1 else modes, **values)


def _pad_to(image, label, shape):
  """Pads around the centre to at least `shape`: image 0, label IGNORE_LABEL."""
  pads = []
  for size, target in zip(label.shape, shape):
    extra = max(target - size, 0)
    pads.append((extra // 2, extra - extra // 2))
  if any(p != (0, 0) for p in pads):
    image = np.pad(image, pads + [(0, 0)])
    label = np.pad(label, pads, constant_values=IGNORE_LABEL)
  return image, label


def _crop(image, label, shape, starts):
  window = tuple(slice(s, s + p) for s, p in zip(starts, shape))
  return image[window], label[window]


def _fit_train(image, label, shape, rng: np.random.Generator):
  """Pads (centred) where smaller than `shape`, crops at random where larger."""
  image, label = _pad_to(image, label, shape)
  starts = [int(rng.integers(0, s - t + 1)) for s, t in zip(label.shape, shape)]
  return _crop(image, label, shape, starts)


def _resize(image, label, shape):
  """Resizes the image (linear) and the mask (nearest) to `shape`."""
  if label.shape == tuple(shape):
    return image, label
  zoom = [t / s for t, s in zip(shape, label.shape)]
  image = ndimage.zoom(image, zoom + [1.0], order=1, mode='nearest', grid_mode=True)
  label = ndimage.zoom(label, zoom, order=0, mode='nearest', grid_mode=True)
  return image, label


def _random_patch(image, label, patch, rng: np.random.Generator, *, on_foreground: bool):
  """A random patch; if `on_foreground`, centred on a voxel of a random foreground class.

  The patch is shifted inside the volume where the centre is too close to an
  edge. Volumes without foreground give a uniformly random patch.
  """
  image, label = _pad_to(image, label, patch)
  high = np.asarray(label.shape) - np.asarray(patch)
  start = None
  if on_foreground:
    counts = np.bincount(np.maximum(label, 0).ravel())
    classes = np.flatnonzero(counts[1:]) + 1
    if classes.size:
      cls = rng.choice(classes)
      voxel = np.unravel_index(
        rng.choice(np.flatnonzero(label.ravel() == cls)), label.shape
      )
      start = np.clip(np.asarray(voxel) - np.asarray(patch) // 2, 0, high)
  if start is None:
    start = np.asarray([rng.integers(0, h + 1) for h in high])
  return _crop(image, label, patch, start)


def _on_foreground(index: int, fraction: float) -> bool:
  """Whether the index-th example of the stream is centred on foreground.

  Exactly `round(n * fraction)` of any n consecutive indices, evenly spread
  (so every process's share of a batch gets its part).
  """
  return math.floor((index + 1) * fraction + 1e-9) > math.floor(index * fraction + 1e-9)


def _seed_words(seed: int) -> int:
  """A 32-bit seed derived from any integer seed (for grain's shuffle)."""
  return int(np.random.SeedSequence([seed % 2**63, 0]).generate_state(1)[0])


def _processes(process_index, process_count, batch_size) -> tuple[int, int]:
  """(this process, examples per process of each global batch)."""
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  if batch_size < process_count or batch_size % process_count:
    raise ValueError(
      f'batch_size {batch_size} must be a positive multiple of process_count'
      f' {process_count}.'
    )
  return process_index, batch_size // process_count


def _iterate(batches: grain.MapDataset) -> Iterator[dict]:
  options = grain.ReadOptions(
    num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES
  )
  return iter(batches.to_iter_dataset(options))


def _check_config(
  options: config_lib.DataOptions, divisor
) -> tuple[sources.Entry, tuple[int, ...]]:
  """Config errors that need no data set built; returns the entry and the divisor."""
  entry = sources.get(options.name)
  ndim = entry.ndim(options)
  entry.check(options)
  divisor = config_lib.per_axis(divisor, ndim, 'divisor', of='the data set')
  patch = options.patch_shape(ndim)
  options.image_shape(ndim)
  if patch is not None and any(p % d for p, d in zip(patch, divisor)):
    raise ValueError(
      f'config.data.patch_size {patch} must be a multiple of the model divisor {divisor}.'
    )
  return entry, divisor


# ---------------------------------------------------------------------------
# The data object.


class Dataset:
  """A data set opened for one model: its info and its iterators.

  Made by `open`; holds the opened source, so iterators start without
  checking or opening anything again.
  """

  def __init__(
    self, options: config_lib.DataOptions, source: sources.Source, shapes: _Shapes
  ):
    self.options = options
    self.source = source
    self._shapes = shapes
    self._normalise = normaliser(options, source.num_channels)
    self.info = DatasetInfo(
      num_classes=source.num_classes,
      num_channels=source.num_channels,
      spatial_shape=shapes.patch or shapes.train,
      num_train=len(self.split(options.train_split)),
      num_eval=self._num_eval(),
      spacing=source.spacing,
      eval_spatial_shape=shapes.eval,
    )

  def _num_eval(self) -> int:
    """Examples in the eval split; 0 when `fold='all'` left no such split."""
    split = self.options.eval_split
    if self.options.fold == 'all' and not self.source.has_split(split):
      return 0
    return len(self.split(split))

  def split(self, split: str) -> Sequence[dict]:
    """The records of a split (a ValueError names the known splits)."""
    return self.source.split(split)

  def read(self, records: Sequence[dict], index: int) -> sources.Example:
    """Example `index`, normalised, with ignored pixels set to IGNORE_LABEL."""
    example = self.source.read(records, index)
    label = example.label
    ignore = self.options.ignore_index
    if ignore is not None:
      label = np.where(label == ignore, IGNORE_LABEL, label).astype(np.int32)
    return dataclasses.replace(example, image=self._normalise(example.image), label=label)

  def train_iterator(
    self,
    start_step: int = 0,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """An endless iterator over training batches from `start_step` on.

    Args:
      start_step: The step of the first batch yielded; the batch of step s does
        not depend on where the iterator started (exact resume).
      batch_size: The global batch size, over all processes.
      seed: Seeds the order, the crops and the patch choice.
      process_index: This process; defaults to `jax.process_index()`.
      process_count: Defaults to `jax.process_count()`.

    Returns:
      An iterator of {'image': float32 [b, *spatial, C] (normalised), 'label':
      int32 [b, *spatial]} with b = batch_size // process_count, built and
      prefetched in a background thread.
    """
    p, b = _processes(process_index, process_count, batch_size)
    if start_step < 0:
      raise ValueError(f'start_step must be >= 0, got {start_step}.')
    records = self.split(self.options.train_split)
    n = len(records)
    if n == 0:
      raise ValueError(
        f'{self.source.name}: the train split {self.options.train_split!r} is empty.'
      )
    # order[g] = the example at global position g; reshuffled every epoch.
    order = grain.MapDataset.range(n).shuffle(seed=_seed_words(seed)).repeat()
    shapes, policy = self._shapes, self.options.size_policy
    fraction = self.options.foreground_fraction

    def example(g: int) -> tuple[np.ndarray, np.ndarray]:
      ex = self.read(records, order[g])
      rng = np.random.default_rng([seed % 2**63, 1, g])
      if shapes.patch is not None:
        return _random_patch(
          ex.image,
          ex.label,
          shapes.patch,
          rng,
          on_foreground=_on_foreground(g, fraction),
        )
      if policy == 'resize':
        return _resize(ex.image, ex.label, shapes.train)
      return _fit_train(ex.image, ex.label, shapes.train, rng)

    def batch(step: int) -> dict[str, np.ndarray]:
      first = step * batch_size + p * b
      images, labels = zip(*(example(g) for g in range(first, first + b)))
      return {'image': np.stack(images), 'label': np.stack(labels).astype(np.int32)}

    return _iterate(grain.MapDataset.range(start_step, sys.maxsize).map(batch))

  def eval_iterator(
    self,
    split: str | None = None,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, Any]]:
    """One deterministic pass over a whole split (default: `config.data.eval_split`).

    Every process yields ceil(n / batch_size) batches of exactly b = batch_size
    // process_count examples; each real example appears once over all
    processes, and the last global batch is filled with padding examples
    (zeros, every pixel IGNORE_LABEL) that have mask 0. Examples are whole,
    padded to `info.eval_spatial_shape` (padding is IGNORE_LABEL), or resized
    to it under size_policy 'resize'.

    Returns:
      An iterator of {'image': float32 [b, *spatial, C], 'label': int32 [b,
      *spatial], 'mask': float32 [b] (1 for a real example), 'index': int32 [b]
      (the example's index in the split, -1 for padding), 'spacing': float32
      [b, ndim], 'id': object [b] (case names)}.
    """
    p, b = _processes(process_index, process_count, batch_size)
    split = split or self.options.eval_split
    records = self.split(split)
    n = len(records)
    if n == 0:
      raise ValueError(f'{self.source.name}: the split {split!r} is empty.')
    shape, ndim = self._shapes.eval, self.source.ndim

    def batch(step: int) -> dict[str, np.ndarray]:
      out = {
        'image': np.zeros((b,) + shape + (self.source.num_channels,), np.float32),
        'label': np.full((b,) + shape, IGNORE_LABEL, np.int32),
        'mask': np.zeros((b,), np.float32),
        'index': np.full((b,), -1, np.int32),
        'spacing': np.ones((b, ndim), np.float32),
        'id': np.full((b,), '', object),
      }
      for k in range(b):
        g = step * batch_size + p * b + k
        if g < n:
          ex = self.read(records, g)
          fit = _resize if self.options.size_policy == 'resize' else _pad_to
          out['image'][k], out['label'][k] = fit(ex.image, ex.label, shape)
          out['mask'][k], out['index'][k], out['id'][k] = 1.0, g, ex.case_id
          out['spacing'][k] = ex.spacing
      return out

    return _iterate(grain.MapDataset.range(-(-n // batch_size)).map(batch))


def open(data, *, divisor) -> Dataset:  # pylint: disable=redefined-builtin
  """Opens the data set `config.data` names, building it first if needed.

  Args:
    data: `config_lib.DataOptions`, or `config.data` (read into them here).
    divisor: An int, or one int per spatial axis, that every model input size
      must be a multiple of (the model's total pooling factor).

  Returns:
    A `Dataset`.

  Raises:
    ValueError: for a bad config (unknown name, missing root, a divisor, patch
      or image size of the wrong rank, a patch size not a multiple of the
      divisor, an unknown split), before any data set is built.
    datasets.BadDataError: (a ValueError) naming each bad file of a folder.
  """
  options = config_lib.DataOptions.from_config(data)
  entry, divisor = _check_config(options, divisor)
  source = sources.open_on_every_process(entry, options)  # Process 0 builds first.
  for case, shape in source.small_examples:
    logging.warning(
      '%s: %s is far smaller than the median size %s of %s.',
      case,
      shape,
      source.median_shape,
      source.name,
    )
  return Dataset(options, source, _shapes(options, source, divisor))
