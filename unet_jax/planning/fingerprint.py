"""The fingerprint of a data set: what the plan needs to know, read once and cached.

    fp = fingerprint(data)   # data = input_pipeline.open(...); cached beside it

The fingerprint (`fingerprint`, `Fingerprint`) is read once from the raw train
examples of a built data set and cached beside it: each case's shape and voxel
spacing (as built: at the case's own spacing), their summaries (shape median,
min, max; median spacing, anisotropy = coarsest / finest), the source's channel
names (nnU-Net's dataset.json `channel_names`, if it has them), per-channel intensity
statistics over the foreground (0.5 and 99.5 percentiles, mean, std; up to
10,000 voxels sampled per case, as nnU-Net does), the raw value range and what
integer type holds it, class frequencies and the share of images each class
occurs in, each class's in-plane thickness and where and how it lies (mean
centroid per axis, in-plane elongation). `unet_jax/planning/rules.py` turns it
into a plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping

from absl import logging
import numpy as np
from scipy import ndimage

FORMAT_VERSION = 2  # Of the cached fingerprint; a new version recomputes it.
SAMPLES_PER_CASE = 10_000  # Foreground intensities sampled per case (nnU-Net's).


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """What the plan needs to know about a data set, from its raw train examples.

  Per-axis values are in (H, W) or (D, H, W) order; per-channel values have one
  entry per channel; per-class values one per class (background first).

  Attributes:
    key: the built data set it was read from (TFDS name, config and version).
    ndim, num_channels, num_classes: as the data set records them.
    num_cases: examples read (the train split, or every labelled split).
    shape_median, shape_min, shape_max: spatial shapes over the cases.
    spacing_median: median voxel spacing (ones for 2D images).
    anisotropy: the coarsest over the finest median spacing.
    value_min, value_max: raw intensity range over all voxels, per channel.
    value_type: the smallest integer type that holds every raw value ('uint8',
      'uint16', 'int16', 'int32'), or 'float' if some value is not an integer.
    foreground_p00_5, foreground_p99_5, foreground_mean, foreground_std:
      per channel, over foreground voxels (every voxel if there is no
      foreground), up to `SAMPLES_PER_CASE` per case.
    class_voxels: labelled voxels of each class (ignored voxels left out).
    class_frequency: class_voxels / all labelled voxels.
    class_image_share: the share of cases in which each class occurs.
    class_thickness: in-plane thickness in pixels, 2 x area / boundary pixels
      in each (H, W) slice (a line w pixels wide gives w); 0 for background
      and absent classes.
    centroid_mean, centroid_sem: per class, per axis: the mean over the cases
      holding the class of its centroid as a fraction of the extent ((mean
      pixel index + 0.5) / size: 0.5 is the centre), and the standard error of
      that mean (0 from a single case); 0.5 and 0 for background and absent
      classes.
    elongation_mean, elongation_sem: per class: the mean over cases of
      log(s_H / s_W), where s is the standard deviation of the class's pixel
      coordinates along an in-plane axis in physical units, plus half a pixel
      (so a one-pixel line has a finite spread), and its standard error.
    spacings, shapes: per case, in the order read: its voxel spacing and
      spatial shape ((): not recorded, as in fingerprints made by hand).
    channel_names: the source's name of each channel (e.g. ('CT',) or
      ('T2', 'ADC')); () when it has none.
  """

  key: str
  ndim: int
  num_channels: int
  num_classes: int
  num_cases: int
  shape_median: tuple[float, ...]
  shape_min: tuple[int, ...]
  shape_max: tuple[int, ...]
  spacing_median: tuple[float, ...]
  anisotropy: float
  value_min: tuple[float, ...]
  value_max: tuple[float, ...]
  value_type: str
  foreground_p00_5: tuple[float, ...]
  foreground_p99_5: tuple[float, ...]
  foreground_mean: tuple[float, ...]
  foreground_std: tuple[float, ...]
  class_voxels: tuple[int, ...]
  class_frequency: tuple[float, ...]
  class_image_share: tuple[float, ...]
  class_thickness: tuple[float, ...]
  centroid_mean: tuple[tuple[float, ...], ...]
  centroid_sem: tuple[tuple[float, ...], ...]
  elongation_mean: tuple[float, ...]
  elongation_sem: tuple[float, ...]
  spacings: tuple[tuple[float, ...], ...] = ()
  shapes: tuple[tuple[int, ...], ...] = ()
  channel_names: tuple[str, ...] = ()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Fingerprint:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: as_tuples(v) for k, v in values.items() if k in names})


def as_tuples(value):
  """Lists (from JSON) and arrays as tuples, recursively; numpy scalars as Python
  numbers (the plan and the fingerprint hold only these)."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    return tuple(as_tuples(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  return value


def _value_type(low: float, high: float, integer: bool) -> str:
  if not integer:
    return 'float'
  for name in ('uint8', 'uint16', 'int16', 'int32'):
    info = np.iinfo(name)
    if info.min <= low and high <= info.max:
      return name
  return 'float'


def _thickness_counts(mask: np.ndarray) -> tuple[int, int]:
  """(pixels, in-plane boundary pixels) of a boolean mask [*spatial]."""
  if not mask.any():
    return 0, 0
  structure = np.zeros((3,) * mask.ndim, bool)
  centre = (1,) * mask.ndim
  structure[centre] = True
  for axis in (-2, -1):  # In-plane face neighbours only.
    for offset in (0, 2):
      index = list(centre)
      index[axis] = offset
      structure[tuple(index)] = True
  interior = ndimage.binary_erosion(mask, structure, border_value=1)
  return int(mask.sum()), int((mask & ~interior).sum())


class _Survey:
  """Statistics gathered case by case, then summarised by `summary`."""

  def __init__(self, ndim: int, num_channels: int, num_classes: int):
    self.ndim, self.num_channels, self.num_classes = ndim, num_channels, num_classes
    self.shapes, self.spacings = [], []
    self.low = np.full(num_channels, np.inf)
    self.high = np.full(num_channels, -np.inf)
    self.integer = True
    self.samples, self.all_samples = [], []
    self.class_voxels = np.zeros(num_classes, np.int64)
    self.present = np.zeros(num_classes, np.int64)
    self.area = np.zeros(num_classes, np.int64)
    self.boundary = np.zeros(num_classes, np.int64)
    self.centroids = [[] for _ in range(num_classes)]
    self.elongations = [[] for _ in range(num_classes)]

  def add(self, index: int, image: np.ndarray, label: np.ndarray, spacing, ignore):
    """One raw case: image [*spatial, C], label [*spatial] (with `ignore` values)."""
    self.shapes.append(label.shape)
    self.spacings.append(tuple(float(s) for s in spacing))
    flat = image.reshape(-1, image.shape[-1])
    self.low = np.minimum(self.low, flat.min(axis=0))
    self.high = np.maximum(self.high, flat.max(axis=0))
    self.integer = self.integer and bool(np.all(flat == np.round(flat)))
    valid = np.ones(label.shape, bool) if ignore is None else label != ignore
    rng = np.random.default_rng(index)
    self.samples.append(_sample(flat[(valid & (label > 0)).ravel()], rng))
    self.all_samples.append(_sample(flat, rng))
    counts = np.bincount(label[valid].ravel(), minlength=self.num_classes)
    self.class_voxels += counts[: self.num_classes]
    self.present += counts[: self.num_classes] > 0
    for c in range(1, self.num_classes):
      if counts[c]:
        self._add_class(c, label == c, spacing)

  def _add_class(self, c: int, mask: np.ndarray, spacing) -> None:
    area, boundary = _thickness_counts(mask)
    self.area[c] += area
    self.boundary[c] += boundary
    where = np.nonzero(mask)
    shape = np.asarray(mask.shape, np.float64)
    self.centroids[c].append([(w.mean() + 0.5) / s for w, s in zip(where, shape)])
    spread = [w.std() * s + 0.5 * s for w, s in zip(where[-2:], spacing[-2:])]
    self.elongations[c].append(math.log(spread[0] / spread[1]))

  def summary(self, key: str, channel_names: tuple[str, ...] = ()) -> Fingerprint:
    if not self.shapes:
      raise ValueError(f'{key}: the train split holds no examples to fingerprint.')
    shapes = np.asarray(self.shapes)
    spacing = np.median(np.asarray(self.spacings, np.float64), axis=0)
    samples = np.concatenate(self.samples)
    if not len(samples):
      samples = np.concatenate(self.all_samples)
    p_low, p_high = np.percentile(samples, [0.5, 99.5], axis=0)
    labelled = max(int(self.class_voxels.sum()), 1)
    fg = range(1, self.num_classes)
    centroids = [_mean_sem(self.centroids[c], self.ndim, 0.5) for c in fg]
    elongations = [_mean_sem([[e] for e in self.elongations[c]], 1, 0.0) for c in fg]
    return Fingerprint(
      key=key,
      ndim=self.ndim,
      num_channels=self.num_channels,
      num_classes=self.num_classes,
      num_cases=len(self.shapes),
      shape_median=as_tuples(np.median(shapes, axis=0).astype(float)),
      shape_min=as_tuples(shapes.min(axis=0)),
      shape_max=as_tuples(shapes.max(axis=0)),
      spacing_median=as_tuples(spacing),
      anisotropy=float(spacing.max() / spacing.min()),
      value_min=as_tuples(self.low.astype(float)),
      value_max=as_tuples(self.high.astype(float)),
      value_type=_value_type(self.low.min(), self.high.max(), self.integer),
      foreground_p00_5=as_tuples(p_low.astype(float)),
      foreground_p99_5=as_tuples(p_high.astype(float)),
      foreground_mean=as_tuples(samples.mean(axis=0).astype(float)),
      foreground_std=as_tuples(samples.std(axis=0).astype(float)),
      class_voxels=as_tuples(self.class_voxels),
      class_frequency=tuple(float(v) / labelled for v in self.class_voxels),
      class_image_share=tuple(float(p) / len(self.shapes) for p in self.present),
      class_thickness=(0.0,)
      + tuple(
        2 * float(self.area[c]) / self.boundary[c] if self.boundary[c] else 0.0 for c in fg
      ),
      centroid_mean=((0.5,) * self.ndim,) + tuple(m for m, _ in centroids),
      centroid_sem=((0.0,) * self.ndim,) + tuple(e for _, e in centroids),
      elongation_mean=(0.0,) + tuple(m[0] for m, _ in elongations),
      elongation_sem=(0.0,) + tuple(e[0] for _, e in elongations),
      spacings=as_tuples(self.spacings),
      shapes=as_tuples([tuple(int(n) for n in s) for s in self.shapes]),
      channel_names=tuple(str(n) for n in channel_names),
    )


def _sample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """At most SAMPLES_PER_CASE rows of values [n, C], drawn without replacement."""
  if len(values) <= SAMPLES_PER_CASE:
    return values.astype(np.float64)
  return values[np.sort(rng.choice(len(values), SAMPLES_PER_CASE, replace=False))].astype(
    np.float64
  )


def _mean_sem(
  rows: list, width: int, empty: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-column mean and standard error of rows [n, width]: (empty, 0) for no rows,
  a standard error of 0 for one row."""
  if not rows:
    return (empty,) * width, (0.0,) * width
  array = np.asarray(rows, np.float64)
  sem = (
    array.std(axis=0, ddof=1) / math.sqrt(len(array))
    if len(array) > 1
    else (np.zeros(width))
  )
  return as_tuples(array.mean(axis=0)), as_tuples(sem)


def fingerprint_examples(
  examples: Iterable[Any],
  *,
  ndim: int,
  num_channels: int,
  num_classes: int,
  ignore_index: int | None = None,
  key: str = '',
  channel_names: tuple[str, ...] = (),
) -> Fingerprint:
  """The fingerprint of raw examples (`datasets.sources.Example`: image float32
  [*spatial, C], label int [*spatial], spacing), read one at a time.

  Pixels labelled `ignore_index` are left out of the class and foreground
  statistics. `channel_names` (the source's, if any) are recorded as given.
  """
  survey = _Survey(ndim, num_channels, num_classes)
  for i, example in enumerate(examples):
    survey.add(
      i,
      np.asarray(example.image, np.float32),
      np.asarray(example.label),
      example.spacing,
      ignore_index,
    )
  return survey.summary(key, channel_names)


def resampled_shape(shape, spacing, target) -> tuple[int, ...]:
  """The spatial shape of a case of `shape` and `spacing` resampled to `target`.

  round(shape * spacing / target) per axis (numpy's rounding: halves to even),
  at least 1; the data module resamples by the same rule.

  Args:
    shape: the case's spatial shape, (D, H, W) or (H, W).
    spacing: its voxel spacing, in the same order.
    target: the spacing it is resampled to.
  """
  new = np.round(np.asarray(shape, np.float64) * np.asarray(spacing, np.float64) / target)
  return tuple(max(1, int(n)) for n in new)


def resampled(fp: Fingerprint, target) -> Fingerprint:
  """The fingerprint of the data resampled to `target` spacing: every case's
  shape by `resampled_shape`, the shape median, min and max of those, the spacing
  `target` for every case and its anisotropy; the rest unchanged. A fingerprint
  without per-case shapes and spacings keeps its shapes."""
  target = tuple(float(t) for t in target)
  changed = dict(spacing_median=target, anisotropy=max(target) / min(target))
  if fp.shapes and fp.spacings:
    shapes = np.asarray(
      [resampled_shape(n, s, target) for n, s in zip(fp.shapes, fp.spacings)]
    )
    changed.update(
      shapes=as_tuples(shapes),
      spacings=(target,) * len(shapes),
      shape_median=as_tuples(np.median(shapes, axis=0).astype(float)),
      shape_min=as_tuples(shapes.min(axis=0)),
      shape_max=as_tuples(shapes.max(axis=0)),
    )
  return dataclasses.replace(fp, **changed)


def _cache_path(
  data, splits: str | tuple[str, ...], ignore_index: int | None
) -> str | None:
  splits = (splits,) if isinstance(splits, str) else splits
  folder = getattr(getattr(data.source, 'builder', None), 'data_dir', None)
  if folder is None:
    return None
  suffix = '' if ignore_index is None else f'_ignore{ignore_index}'
  name = '+'.join(splits)
  return os.path.join(os.fspath(folder), f'unet_jax_fingerprint_{name}{suffix}.json')


def _examples(data, splits: tuple[str, ...]):
  """The raw examples of `splits`, one at a time, and how many there are."""
  records = [data.split(split) for split in splits]

  def read():
    for split_records in records:
      for i in range(len(split_records)):
        yield data.source.read(split_records, i)

  return read(), sum(len(r) for r in records)


def fingerprint(
  data,
  *,
  split: str | tuple[str, ...] = 'train',
  ignore_index: int | None = None,
  cache: bool = True,
) -> Fingerprint:
  """The fingerprint of an opened data set (`input_pipeline.Dataset`), from the raw
  examples of `split` (one split, or several read as one), cached as JSON in the
  built data set's folder.

  The built copy of a user's folder is named after a hash of its files and
  options, so a changed folder is a new built copy and gets a new fingerprint.

  Args:
    data: from `input_pipeline.open`.
    split: the split, or splits, to read.
    ignore_index: the data set's "don't care" mask value
      (`DataOptions.ignore_index`), or None.
    cache: read and write the cache; False recomputes without writing.
  """
  if ignore_index is not None and ignore_index < 0:
    raise ValueError(f'ignore_index must be None or a mask value >= 0, got {ignore_index}.')
  splits = (split,) if isinstance(split, str) else tuple(split)
  path = _cache_path(data, splits, ignore_index) if cache else None
  builder = getattr(data.source, 'builder', None)
  key = str(getattr(getattr(builder, 'info', None), 'full_name', data.source.name))
  if path and os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored.get('version') == FORMAT_VERSION and stored.get('key') == key:
      return Fingerprint.from_dict(stored)
  examples, count = _examples(data, splits)
  logging.info('Fingerprinting %d examples of %s (once per built data set).', count, key)
  result = fingerprint_examples(
    examples,
    ndim=data.source.ndim,
    num_channels=data.source.num_channels,
    num_classes=data.source.num_classes,
    ignore_index=ignore_index,
    key=key,
    channel_names=tuple(getattr(data.source, 'channel_names', None) or ()),
  )
  if path:
    write_json(path, {'version': FORMAT_VERSION, **result.to_dict()})
  return result


def write_json(path: str, values: Mapping[str, Any]) -> None:
  """Writes atomically (a temporary name, then a rename); logs if it cannot."""
  partial = f'{path}.partial-{os.getpid()}'
  try:
    with open(partial, 'w') as f:
      json.dump(values, f, indent=1)
    os.replace(partial, path)
  except OSError as e:
    logging.warning('Could not write %s (%s); continuing without it.', path, e)
