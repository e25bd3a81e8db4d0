r"""Self-configuring training: a fingerprint of the data set, then a plan made by rules.

    fp = planning.fingerprint(data)      # data = input_pipeline.open(...); cached
    p = planning.plan(fp, memory_budget='2GiB', time_budget=300, step_time=0.4)
    print(planning.format_table(p))      # field, value, who set it, reason
    config = planning.apply(config, p)   # the config with the plan's values

or, from the shell, without training:

    python -m unet_jax.planning --root=/path/to/my_data [--config=3d]

nnU-Net (Isensee et al., 2021) showed that a handful of rules, applied to a
"fingerprint" of a data set, configure a U-Net that matches or beats hand-tuned
pipelines on most medical segmentation tasks. This module does the same for
`unet_jax`, with the rules below.

The fingerprint (`fingerprint`, `Fingerprint`) is read once from the raw train
examples of a built data set and cached beside it: shapes (median, min, max),
voxel spacing (median, anisotropy = coarsest / finest), per-channel intensity
statistics over the foreground (0.5 and 99.5 percentiles, mean, std; up to
10,000 voxels sampled per case, as nnU-Net does), the raw value range and what
integer type holds it, class frequencies and the share of images each class
occurs in, each class's in-plane thickness and where and how it lies (mean
centroid per axis, in-plane elongation).

The plan (`plan`, a pure function of the fingerprint and the budgets):

* **Patch, depth, pooling, kernels.** The target input is the median shape.
  The axes are pooled level by level: an axis is pooled (by 2) only while its
  current spacing is within 2x of the finest current spacing and its current
  size is at least 8, so the bottleneck is 4 to 8 pixels per axis; an axis whose
  spacing is more than 2x the finest gets kernel 1 there ((1, 3, 3)-style). At
  most `MAX_DEPTH` levels (the widths double at every level). The patch is
  rounded down to a multiple of the pooling factor and, while a training step
  of batch 2 does not fit `memory_budget` (`unet_jax.models.memory.estimate`), the
  axis largest relative to the median shape (each of them on a tie) is shrunk
  by one pooling factor, re-planning the pooling each time (nnU-Net's rule).
  2D: whole images (padded to the largest) when the largest fits the budget and
  is at most 1.5x the median along every axis, else random crops of the patch.
  3D: random patches, and sliding-window evaluation with the same patch when
  volumes are larger.
* **Batch size**: the most that fits the budget, at most 5% of the data set's
  voxels, at least 2 (nnU-Net's rule); instance norm below a batch of 8, where
  batch statistics are noisy (nnU-Net uses instance norm throughout).
* **Normalisation** (`input_pipeline.normalise`), from the raw value range:
  integer values with a minimum at or below -500 that fit in int16 are taken as
  CT (Hounsfield units: air is -1000): clip to the foreground's 0.5 and 99.5
  percentiles, then one z-score with the foreground mean and std. Integer values
  in [0, 255] are 8-bit images: a fixed 0-1 scaling from [0, 255]. Anything
  else (floats, 16-bit MRI or microscopy) is MRI-like: a z-score per image.
* **Augmentation.** Flips along an axis only when no foreground class lies on
  one side along it: the mean centroid (normalised position 0..1) of every
  class is within 0.1 of the centre, or within 3 standard errors of it (a class
  that sits on one side, such as a left organ, is not flip-invariant, and
  flipping would swap left and right classes). 90-degree rotations in the
  (H, W) plane only when flips along H and W are allowed, the in-plane spacing
  is isotropic (within 10%), the training input is square, and no class has a
  preferred in-plane orientation (its mean log elongation log(s_H / s_W) is
  within log 1.5 of 0, or within 3 standard errors of it): anatomical images,
  whose structures sit at fixed places in fixed orientations, fail these tests
  and are not rotated. Scale in [0.85, 1.25], or [1, 1.25] (zoom in only) when
  a class is thinner than 3 pixels, which zooming out would erase; elastic
  deformation (2D, at most 100 cases, as in the U-Net paper) of 2% of the
  smaller side, at most 4 pixels; intensity jitter 0.1.
* **Loss**: Dice + cross-entropy (nnU-Net's); a class that is under 1% of the
  labelled voxels gets the weight min(10, sqrt(1% / frequency)), 1 otherwise.
* **Steps**: `time_budget / step_time` when both are given (the step time is
  measured on the plan made without them, at the start of training), with a
  warmup of at most 10% of them. When fewer than `MIN_STEPS` steps would fit,
  the step is made cheaper first, taking its time as proportional to voxels x
  batch x features^2: the patch shrinks (as for memory, not below
  min(`MIN_PATCH_SIDE`, median) along any axis; 2D whole images become crops),
  then the top width halves (not below `MIN_FEATURES`). CPUs, not memory, are
  what limits training in minutes; nnU-Net plans for a GPU and has no such rule.

Fields set on the command line are given to `plan` as `fixed`: the plan keeps
their values, plans the rest around them (a fixed depth gets pooling for that
depth, a fixed patch a depth for that patch) and the table marks them.

Reference: F. Isensee, P. F. Jaeger, S. A. A. Kohl, J. Petersen, K. H. Maier-Hein,
"nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 203-211 (2021), arXiv:1809.10486.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from scipy import ndimage

from unet_jax import losses
from unet_jax import models
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import sources
from unet_jax.models import factory
from unet_jax.models import memory
from unet_jax.train import config_checks

FORMAT_VERSION = 1  # Of the cached fingerprint; a new version recomputes it.
PLAN_FILE = 'plan.json'
MAX_DEPTH = 5  # Pooling levels at most: the UNet's widths double at every level.
MIN_POOL_SIZE = 8  # An axis is pooled while at least this long: bottleneck 4..8.
SAMPLES_PER_CASE = 10_000  # Foreground intensities sampled per case (nnU-Net's).
RARE_CLASS = 0.01  # A class under this share of the labelled voxels is weighted.
CT_MIN_VALUE = -500  # Integer data reaching this low is taken as Hounsfield units.
_THIN = 3.0  # Pixels: a class thinner than this is not zoomed out.
MIN_STEPS = 250  # The time rule makes a step cheaper until this many fit the budget.
MIN_PATCH_SIDE = 32  # ... but not below this (or the median) along any axis,
MIN_FEATURES = 8  # ... nor the top width below this.


# ---------------------------------------------------------------------------
# The fingerprint.


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """What the plan needs to know about a data set, from its raw train examples.

  Per-axis values are in (H, W) or (D, H, W) order; per-channel values have one
  entry per channel; per-class values one per class (background first).

  Attributes:
    key: the built data set it was read from (TFDS name, config and version).
    ndim, num_channels, num_classes: as the data set records them.
    num_cases: examples read (the train split).
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

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Fingerprint:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in values.items() if k in names})


def _tuples(value):
  """Lists (from JSON) and arrays as tuples, recursively; numpy scalars as Python
  numbers."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
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
    self.spacings.append(tuple(spacing))
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

  def summary(self, key: str) -> Fingerprint:
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
      shape_median=_tuples(np.median(shapes, axis=0).astype(float)),
      shape_min=_tuples(shapes.min(axis=0)),
      shape_max=_tuples(shapes.max(axis=0)),
      spacing_median=_tuples(spacing),
      anisotropy=float(spacing.max() / spacing.min()),
      value_min=_tuples(self.low.astype(float)),
      value_max=_tuples(self.high.astype(float)),
      value_type=_value_type(self.low.min(), self.high.max(), self.integer),
      foreground_p00_5=_tuples(p_low.astype(float)),
      foreground_p99_5=_tuples(p_high.astype(float)),
      foreground_mean=_tuples(samples.mean(axis=0).astype(float)),
      foreground_std=_tuples(samples.std(axis=0).astype(float)),
      class_voxels=_tuples(self.class_voxels),
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
  return _tuples(array.mean(axis=0)), _tuples(sem)


def fingerprint_examples(
  examples: Iterable[Any],
  *,
  ndim: int,
  num_channels: int,
  num_classes: int,
  ignore_index: int | None = None,
  key: str = '',
) -> Fingerprint:
  """The fingerprint of raw examples (`datasets.sources.Example`: image float32
  [*spatial, C], label int [*spatial], spacing), read one at a time.

  Pixels labelled `ignore_index` are left out of the class and foreground
  statistics.
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
  return survey.summary(key)


def _cache_path(data, split: str, ignore_index: int | None) -> str | None:
  folder = getattr(getattr(data.source, 'builder', None), 'data_dir', None)
  if folder is None:
    return None
  suffix = '' if ignore_index is None else f'_ignore{ignore_index}'
  return os.path.join(os.fspath(folder), f'unet_jax_fingerprint_{split}{suffix}.json')


def fingerprint(
  data, *, split: str = 'train', ignore_index: int | None = None, cache: bool = True
) -> Fingerprint:
  """The fingerprint of an opened data set (`input_pipeline.Dataset`), from the raw
  examples of `split`, cached as JSON in the built data set's folder.

  The built copy of a user's folder is named after a hash of its files and
  options, so a changed folder is a new built copy and gets a new fingerprint.

  Args:
    data: from `input_pipeline.open`.
    split: the split to read.
    ignore_index: the data set's "don't care" mask value (config.data.ignore_index),
      or None.
    cache: read and write the cache; False recomputes without writing.
  """
  ignore_index = None if ignore_index is None or ignore_index < 0 else int(ignore_index)
  path = _cache_path(data, split, ignore_index) if cache else None
  builder = getattr(data.source, 'builder', None)
  key = str(getattr(getattr(builder, 'info', None), 'full_name', data.source.name))
  if path and os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored.get('version') == FORMAT_VERSION and stored.get('key') == key:
      return Fingerprint.from_dict(stored)
  records = data.split(split)
  logging.info(
    'Fingerprinting %d examples of %s (once per built data set).', len(records), key
  )
  result = fingerprint_examples(
    (data.source.read(records, i) for i in range(len(records))),
    ndim=data.source.ndim,
    num_channels=data.source.num_channels,
    num_classes=data.source.num_classes,
    ignore_index=ignore_index,
    key=key,
  )
  if path:
    _write_json(path, {'version': FORMAT_VERSION, **result.to_dict()})
  return result


def _write_json(path: str, values: Mapping[str, Any]) -> None:
  """Writes atomically (a temporary name, then a rename); logs if it cannot."""
  partial = f'{path}.partial-{os.getpid()}'
  try:
    with open(partial, 'w') as f:
      json.dump(values, f, indent=1)
    os.replace(partial, path)
  except OSError as e:
    logging.warning('Could not write %s (%s); continuing without it.', path, e)


# ---------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class Choice:
  """One planned config field.

  Attributes:
    field: the dotted config field, e.g. 'model.depth'.
    value: the value the run uses (tuples, not lists).
    reason: why the plan chose `planned`.
    overridden: the field was set on the command line; `value` is that value.
    planned: the plan's own value (equal to `value` unless overridden).
  """

  field: str
  value: Any
  reason: str
  overridden: bool = False
  planned: Any = None

  def __post_init__(self):
    object.__setattr__(self, 'value', _tuples(self.value))
    planned = self.value if self.planned is None and not self.overridden else self.planned
    object.__setattr__(self, 'planned', _tuples(planned))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Planned config fields, each with its reason, and what the plan was made from.

  Attributes:
    choices: one per planned field, in the order of the table.
    inputs: the budgets, the measured step time and the fingerprint key.
  """

  choices: tuple[Choice, ...]
  inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, 'choices', tuple(self.choices))
    object.__setattr__(self, 'inputs', dict(_tuples_in(self.inputs)))

  def values(self) -> dict[str, Any]:
    """{field: value} of every choice."""
    return {c.field: c.value for c in self.choices}

  def __getitem__(self, field: str) -> Any:
    return self.values()[field]

  def to_dict(self) -> dict[str, Any]:
    return {
      'inputs': dict(self.inputs),
      'choices': [dataclasses.asdict(c) for c in self.choices],
    }

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Plan:
    return cls(
      choices=tuple(Choice(**c) for c in values['choices']), inputs=values.get('inputs', {})
    )


def _tuples_in(mapping: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _tuples(v) for k, v in mapping.items()}


def write_plan(path: str, p: Plan, fp: Fingerprint | None = None) -> None:
  """Writes a plan (and the fingerprint it came from, for reading) as JSON."""
  values = p.to_dict()
  if fp is not None:
    values['fingerprint'] = fp.to_dict()
  _write_json(path, values)


def read_plan(path: str) -> Plan:
  """The plan `write_plan` wrote: equal to the one written."""
  with open(path) as f:
    return Plan.from_dict(json.load(f))


def _data_kind(fp: Fingerprint) -> tuple[str, str]:
  """('ct' | 'natural8' | 'mri', why), from the raw value range."""
  low, high = min(fp.value_min), max(fp.value_max)
  where = f'raw values {low:g}..{high:g} ({fp.value_type})'
  if fp.value_type in ('int16', 'uint8') and low <= CT_MIN_VALUE:
    return 'ct', f'{where} reach {CT_MIN_VALUE} or below: CT in Hounsfield units'
  if fp.value_type == 'uint8':
    return 'natural8', f'{where}: 8-bit images'
  return 'mri', f'{where}: neither 8-bit nor Hounsfield units (MRI-like)'


def _normalisation(fp: Fingerprint, fixed: Mapping[str, Any]) -> list[Choice]:
  kind, why = _data_kind(fp)
  mode = {'ct': 'ct', 'natural8': 'rescale', 'mri': 'zscore'}[kind]
  choices = [
    Choice(
      'data.normalization',
      mode,
      {
        'ct': f'{why}; clip to the foreground 0.5-99.5 percentiles, then one z-score',
        'rescale': f'{why}; a fixed 0-1 scaling keeps their intensities comparable',
        'zscore': f'{why}; a z-score per image, per channel',
      }[mode],
    )
  ]
  mode = fixed.get('data.normalization', mode)
  if mode == 'ct':
    choices += [
      Choice(
        'data.intensity_low',
        fp.foreground_p00_5,
        'the 0.5 percentile of the foreground intensities',
      ),
      Choice(
        'data.intensity_high',
        fp.foreground_p99_5,
        'the 99.5 percentile of the foreground intensities',
      ),
      Choice(
        'data.intensity_mean', fp.foreground_mean, 'the mean of the foreground intensities'
      ),
      Choice(
        'data.intensity_std',
        tuple(max(s, 1e-6) for s in fp.foreground_std),
        'the standard deviation of the foreground intensities',
      ),
    ]
  elif mode == 'rescale':
    eight_bit = kind == 'natural8'
    low = (0.0,) * fp.num_channels if eight_bit else fp.value_min
    high = (255.0,) * fp.num_channels if eight_bit else fp.value_max
    why = 'the 8-bit range' if eight_bit else 'the raw value range'
    choices += [
      Choice('data.intensity_low', low, why),
      Choice('data.intensity_high', high, why),
    ]
  return choices


def topology(
  shape: Sequence[float], spacing: Sequence[float], *, depth: int | None = None
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
  """Pooling windows and kernels per level for an input `shape` of `spacing`.

  Level by level, an axis is pooled by 2 if its current spacing (the spacing
  times the pooling so far) is at most 2x the finest current spacing and its
  current size is at least `MIN_POOL_SIZE`; its kernel is 3 where the spacing
  is within 2x of the finest and 1 elsewhere. It stops when no axis can be
  pooled or at `MAX_DEPTH` levels (with `depth`: at exactly `depth` levels,
  pooling the spacing-eligible axes that are at least 2 long, when the size
  rule allows none). At least one level.

  Returns:
    (pool_sizes, kernel_sizes): `depth` pool tuples and `depth + 1` kernel
    tuples (the last for the bottleneck), as `models.UNet` takes them.
  """
  size = [float(s) for s in shape]
  current = [float(s) for s in spacing]
  pools, kernels = [], []
  while len(pools) < (depth or MAX_DEPTH):
    eligible = [s <= 2 * min(current) for s in current]
    pool = tuple(2 if ok and n >= MIN_POOL_SIZE else 1 for ok, n in zip(eligible, size))
    if max(pool) == 1:
      if depth is None and pools:
        break
      pool = tuple(2 if ok and n >= 2 else 1 for ok, n in zip(eligible, size))
      if max(pool) == 1:
        pool = tuple(2 if ok else 1 for ok in eligible)
    kernels.append(tuple(3 if ok else 1 for ok in eligible))
    pools.append(pool)
    size = [n / p for n, p in zip(size, pool)]
    current = [s * p for s, p in zip(current, pool)]
  kernels.append(tuple(3 if s <= 2 * min(current) else 1 for s in current))
  return tuple(pools), tuple(kernels)


def _divisor(pools) -> tuple[int, ...]:
  return tuple(math.prod(p[a] for p in pools) for a in range(len(pools[0])))


def _fits(shape, pools, kernels, *, batch, fp, features, budget) -> bool:
  estimate = memory.estimate(
    spatial_shape=tuple(shape),
    in_channels=fp.num_channels,
    num_classes=max(fp.num_classes, 2),
    features=features,
    depth=len(pools),
    kernel_sizes=kernels,
    pool_sizes=pools,
    batch=batch,
    training=True,
  )
  return estimate.total_bytes <= budget


def _shape_text(shape) -> str:
  return 'x'.join(f'{s:g}' for s in shape)


def _axis_names(ndim: int) -> tuple[str, ...]:
  return ('D', 'H', 'W')[-ndim:]


def _one_for_all(pools) -> bool:
  """Whether pool sizes are one int or one tuple for every level."""
  return isinstance(pools, int) or all(isinstance(p, int) for p in pools)


def _layout(fp: Fingerprint, shape, fixed: Mapping[str, Any]):
  """(pools, kernels, why) for an input `shape`, honouring a fixed depth, pooling
  or kernels."""
  depth = fixed.get('model.depth')
  fixed_pools = fixed.get('model.pool_sizes')
  if depth is None and fixed_pools is not None and not _one_for_all(fixed_pools):
    depth = len(fixed_pools)
  pools, kernels = topology(shape, fp.spacing_median, depth=depth)
  if fixed_pools is not None:
    pools = models.level_shapes(ndim=fp.ndim, depth=len(pools), pool_sizes=fixed_pools)[1]
  if fixed.get('model.kernel_sizes') is not None:
    kernels = models.level_shapes(
      ndim=fp.ndim, depth=len(pools), kernel_sizes=fixed['model.kernel_sizes']
    )[0]
  return pools, kernels, depth is not None


def _largest_batch(shape, pools, kernels, *, fp, features, budget, cap: int) -> int:
  """The largest batch (per device, at most `cap`) whose training step fits; 0 if
  not even 1 fits. Memory grows linearly with the batch; checked at the answer."""
  fits = lambda b: _fits(
    shape, pools, kernels, batch=b, fp=fp, features=features, budget=budget
  )
  if not fits(1):
    return 0
  one = memory.estimate(
    spatial_shape=tuple(shape),
    in_channels=fp.num_channels,
    num_classes=max(fp.num_classes, 2),
    features=features,
    depth=len(pools),
    kernel_sizes=kernels,
    pool_sizes=pools,
    batch=1,
    training=True,
  ).total_bytes
  two = memory.estimate(
    spatial_shape=tuple(shape),
    in_channels=fp.num_channels,
    num_classes=max(fp.num_classes, 2),
    features=features,
    depth=len(pools),
    kernel_sizes=kernels,
    pool_sizes=pools,
    batch=2,
    training=True,
  ).total_bytes
  per_example = max(two - one, 1)
  b = int(min(cap, max(1, (budget - (one - per_example)) // per_example)))
  while b > 1 and not fits(b):
    b -= 1
  return b


def _patch(
  fp: Fingerprint, fixed, *, budget, features, batch, max_voxels=None, time_batch=1
):
  """(patch, pools, kernels, note): the median shape, rounded down to the pooling
  factor, shrunk while a training step of `batch` does not fit `budget`, then
  while `time_batch` patches hold more than `max_voxels` voxels (the time rule;
  not below min(MIN_PATCH_SIDE, median) along any axis). Each time the axes
  largest relative to the median shape (all of them on a tie, so a square patch
  stays square) shrink by their pooling factor."""
  median = [max(1.0, m) for m in fp.shape_median]
  patch = [max(1, int(round(m))) for m in median]
  floor = [min(MIN_PATCH_SIDE, int(round(m))) for m in median]
  start, shrunk = None, set()
  while True:
    pools, kernels, _ = _layout(fp, patch, fixed)
    divisor = _divisor(pools)
    rounded = [max(d, p // d * d) for p, d in zip(patch, divisor)]
    start = start or rounded
    if not _fits(
      rounded, pools, kernels, batch=batch, fp=fp, features=features, budget=budget
    ):
      why = 'memory'
      shrinkable = [a for a in range(fp.ndim) if rounded[a] > divisor[a]]
    elif max_voxels is not None and math.prod(rounded) * time_batch > max_voxels:
      why = 'time'
      shrinkable = [a for a in range(fp.ndim) if rounded[a] - divisor[a] >= floor[a]]
    else:
      break
    if not shrinkable:
      break
    shrunk.add(why)
    ratio = max(rounded[a] / median[a] for a in shrinkable)
    patch = [
      r - d if a in shrinkable and r / m >= ratio - 1e-9 else r
      for a, (r, d, m) in enumerate(zip(rounded, divisor, median))
    ]
  note = (
    f'the median shape {_shape_text(fp.shape_median)}, rounded down to a multiple'
    f' of the pooling factor {_shape_text(divisor)}'
  )
  if 'memory' in shrunk:
    note += (
      f', shrunk from {_shape_text(start)} until a training step of batch'
      f' {batch} fits {memory.format_bytes(budget)}'
    )
  if 'time' in shrunk:
    note += ', shrunk for the time budget (see num_train_steps)'
  return tuple(rounded), pools, kernels, note


def _input_choices(
  fp: Fingerprint,
  fixed,
  *,
  budget: int,
  features: int,
  num_devices: int,
  max_voxels: float | None = None,
  max_batch: int | None = None,
) -> tuple[list[Choice], tuple[int, ...], int]:
  """The input size (policy, image or patch size), the network's layout and the
  batch; with `max_voxels`, at most that many voxels a step (the time rule), and
  a batch of at most `max_batch`. Returns the choices, the training input shape
  and the batch."""
  per_device = lambda b: max(1, -(-b // num_devices))
  first_batch = per_device(fixed.get('batch_size', 2))
  time_batch = fixed.get('batch_size', max_batch or 1)
  field = 'data.patch_size' if fp.ndim == 3 else 'data.image_size'
  given = tuple(fixed.get(field) or ())
  if given:
    patch, note = given, 'set on the command line'
    pools, kernels, _ = _layout(fp, patch, fixed)
  else:
    patch, pools, kernels, note = _patch(
      fp,
      fixed,
      budget=budget,
      features=features,
      batch=first_batch,
      max_voxels=max_voxels,
      time_batch=time_batch,
    )
  choices, train_shape = [], patch
  if fp.ndim == 2:
    divisor = _divisor(pools)
    whole = tuple(-(-m // d) * d for m, d in zip(fp.shape_max, divisor))
    whole_ok = (
      not given
      and all(mx <= 1.5 * md for mx, md in zip(fp.shape_max, fp.shape_median))
      and _fits(
        whole, pools, kernels, batch=first_batch, fp=fp, features=features, budget=budget
      )
      and (max_voxels is None or math.prod(whole) * time_batch <= max_voxels)
    )
    if fixed.get('data.size_policy', 'pad' if whole_ok else 'crop') == 'pad' and (
      not given
    ):
      train_shape = whole
      choices += [
        Choice(
          'data.size_policy',
          'pad',
          f'whole images: the largest,'
          f' {_shape_text(fp.shape_max)}, padded to {_shape_text(whole)}, fits'
          f' {memory.format_bytes(budget)} and is at most 1.5x the median',
        ),
        Choice('data.image_size', (), 'the largest image (size policy pad)'),
      ]
    else:
      choices += [
        Choice(
          'data.size_policy',
          'crop',
          'random crops of the image size: the'
          ' largest image is far larger than the median, does not fit'
          f' {memory.format_bytes(budget)} or is too slow for the time budget'
          if not given
          else 'random crops of the image size',
        ),
        Choice('data.image_size', patch, note),
      ]
  else:
    choices.append(Choice('data.patch_size', patch, f'random patches: {note}'))
    if any(m > p for m, p in zip(fp.shape_max, patch)):
      choices.append(
        Choice(
          'evals.eval.patch_size',
          patch,
          'volumes larger than the patch are evaluated by sliding windows of the patch',
        )
      )
  choices += _layout_choices(fp, train_shape, pools, kernels, fixed)
  batch = _batch_choices(
    fp,
    train_shape,
    pools,
    kernels,
    budget=budget,
    features=features,
    num_devices=num_devices,
    fixed=fixed,
    max_batch=max_batch,
  )
  return choices + batch, tuple(train_shape), batch[0].value


def _layout_choices(fp, shape, pools, kernels, fixed) -> list[Choice]:
  bottleneck = [s / d for s, d in zip(shape, _divisor(pools))]
  fixed_depth = 'model.depth' in fixed or 'model.pool_sizes' in fixed
  depth_why = (
    f'pool until the bottleneck is 4-8 pixels per axis (at most {MAX_DEPTH}'
    f' levels): {_shape_text(shape)} -> {_shape_text(bottleneck)}'
  )
  anisotropic = fp.anisotropy > 2
  spacing = _shape_text(fp.spacing_median)
  pool_why = (
    f'spacing {spacing}: an axis is pooled only while its spacing is within 2x'
    ' of the finest, and while it is at least'
    f' {MIN_POOL_SIZE} long'
    if anisotropic
    else f'an axis is pooled while at least {MIN_POOL_SIZE} long (spacing {spacing})'
  )
  if fixed_depth:
    pool_why += ', for the depth set on the command line'
  kernel_why = (
    'kernel 1 along an axis whose spacing is over 2x the finest at that'
    ' level ((1, 3, 3)-style)'
    if any(1 in k for k in kernels)
    else '3 along every axis: no axis is over 2x coarser than the finest'
  )
  return [
    Choice('model.depth', len(pools), depth_why),
    Choice('model.pool_sizes', pools, pool_why),
    Choice('model.kernel_sizes', kernels, kernel_why),
  ]


def _batch_choices(
  fp, shape, pools, kernels, *, budget, features, num_devices, fixed, max_batch=None
) -> list[Choice]:
  voxels = fp.num_cases * math.prod(fp.shape_median)
  cap = max(2, int(round(0.05 * voxels / math.prod(shape))))
  if max_batch:
    cap = min(cap, max_batch)
  if 'batch_size' in fixed:
    batch = int(fixed['batch_size'])
    why = 'set on the command line'
  else:
    by_memory = (
      _largest_batch(
        shape,
        pools,
        kernels,
        fp=fp,
        features=features,
        budget=budget,
        cap=-(-cap // num_devices),
      )
      * num_devices
    )
    batch = max(2, min(cap, by_memory))
    batch = -(-batch // num_devices) * num_devices
    limit = ', and the time rule' if max_batch else ''
    why = (
      f'the most that fits {memory.format_bytes(budget)} ({by_memory}), at most 5%'
      f" of the data set's voxels ({cap}{limit}), at least 2"
    )
    if num_devices > 1:
      why += f', a multiple of the {num_devices} devices'
  norm = 'instance' if batch < 8 else 'batch'
  return [
    Choice('batch_size', batch, why),
    Choice(
      'model.norm',
      norm,
      f'batch {batch}: '
      + (
        'BatchNorm statistics of so few examples are noisy; instance norm, as nnU-Net'
        if norm == 'instance'
        else 'large enough for BatchNorm'
      ),
    ),
  ]


def _off_centre(fp: Fingerprint) -> dict[int, str]:
  """Axes along which some foreground class lies to one side: axis -> why."""
  names, out = _axis_names(fp.ndim), {}
  for c in range(1, fp.num_classes):
    if not fp.class_voxels[c]:
      continue
    for a in range(fp.ndim):
      offset = fp.centroid_mean[c][a] - 0.5
      sem = fp.centroid_sem[c][a]
      if abs(offset) > 0.1 and abs(offset) > 3 * sem and a not in out:
        out[a] = (
          f'class {c} lies at {fp.centroid_mean[c][a]:.2f} along {names[a]}'
          f' (+- {sem:.2f}; the centre is 0.5)'
        )
  return out


def _rotation(fp: Fingerprint, shape, off_centre: Mapping[int, str]) -> tuple[bool, str]:
  """Whether 90-degree rotations in the (H, W) plane are safe, and why."""
  h, w = fp.ndim - 2, fp.ndim - 1
  if h in off_centre or w in off_centre:
    return False, off_centre.get(h) or off_centre[w]
  s_h, s_w = fp.spacing_median[h], fp.spacing_median[w]
  if abs(s_h / s_w - 1) > 0.1:
    return False, f'the in-plane spacing {s_h:g} x {s_w:g} is not isotropic'
  if shape[h] != shape[w]:
    return False, f'the training input {_shape_text(shape)} is not square'
  for c in range(1, fp.num_classes):
    mean, sem = fp.elongation_mean[c], fp.elongation_sem[c]
    if fp.class_voxels[c] and abs(mean) > math.log(1.5) and abs(mean) > 3 * sem:
      axis = 'H' if mean > 0 else 'W'
      return False, (
        f'class {c} is elongated along {axis} (s_H / s_W ='
        f' {math.exp(mean):.2f} on average): a preferred orientation'
      )
  return True, (
    'no class lies to one side or has a preferred orientation; isotropic'
    ' in-plane spacing; a square input'
  )


def _augment_choices(fp: Fingerprint, shape) -> list[Choice]:
  names = _axis_names(fp.ndim)
  off = _off_centre(fp)
  axes = tuple(a for a in range(fp.ndim) if a not in off)
  if axes:
    flip_why = f'no class lies to one side along {", ".join(names[a] for a in axes)}'
    if off:
      flip_why += '; not along ' + '; '.join(
        f'{names[a]}: {why}' for a, why in sorted(off.items())
      )
    choices = [
      Choice('augment.flip', True, flip_why),
      Choice('augment.flip_axes', axes, flip_why),
    ]
  else:
    choices = [Choice('augment.flip', False, '; '.join(off.values()))]
  rot90, rot_why = _rotation(fp, shape, off)
  choices.append(Choice('augment.rot90', rot90, rot_why))
  thin = [c for c in range(1, fp.num_classes) if 0 < fp.class_thickness[c] < _THIN]
  if thin:
    choices.append(
      Choice(
        'augment.scale',
        (1.0, 1.25),
        'zoom in only: class'
        f' {thin[0]} is {fp.class_thickness[thin[0]]:.1f} pixels thick,'
        ' and zooming out would erase it',
      )
    )
  else:
    choices.append(
      Choice(
        'augment.scale',
        (0.85, 1.25),
        f'a safe range: no class is thinner than {_THIN:g} pixels',
      )
    )
  if fp.ndim == 2 and fp.num_cases <= 100:
    elastic = round(min(4.0, 0.02 * min(shape)), 1)
    choices.append(
      Choice(
        'augment.elastic',
        elastic,
        f'{fp.num_cases} cases: elastic'
        ' deformation of 2% of the smaller side (at most 4), as in'
        ' the U-Net paper for small data sets',
      )
    )
  else:
    choices.append(
      Choice(
        'augment.elastic',
        0.0,
        '3D or over 100 cases: off, as in nnU-Net'
        if fp.ndim == 3 or fp.num_cases > 100
        else 'off',
      )
    )
  choices.append(
    Choice(
      'augment.intensity',
      0.1,
      'mild brightness and contrast jitter (nnU-Net applies stronger ones)',
    )
  )
  return choices


def _loss_choices(fp: Fingerprint, fixed) -> list[Choice]:
  if fixed.get('model.num_classes') == 1:
    return []  # One sigmoid logit, set on the command line: the config's loss.
  choices = [Choice('loss.name', 'dice_ce', 'Dice + cross-entropy, as nnU-Net')]
  if fixed.get('loss.name', 'dice_ce') != 'dice_ce':
    return choices
  weights, why = [], []
  for c, f in enumerate(fp.class_frequency):
    if 0 < f < RARE_CLASS:
      weights.append(round(min(10.0, math.sqrt(RARE_CLASS / f)), 3))
      why.append(
        f'class {c} is {100 * f:.3g}% of the labelled voxels (in'
        f' {100 * fp.class_image_share[c]:.0f}% of the images): weight'
        f' {weights[-1]:g} = min(10, sqrt(1% / {100 * f:.3g}%))'
      )
    else:
      weights.append(1.0)
  if why:
    choices.append(
      Choice(
        'loss.kwargs.class_weights', tuple(weights), '; '.join(why) + '; other classes 1'
      )
    )
  return choices


def _timed_choices(
  fp, fixed, choices, shape, batch, *, time_budget, step_time, features, **options
):
  """The time rule: (choices, steps choices, input shape). A plan whose measured step would
  allow fewer than MIN_STEPS steps in the budget is made cheaper (step time taken
  as proportional to voxels x batch x features^2): the patch shrinks (not below
  min(MIN_PATCH_SIDE, median) per axis), then the features halve (not below
  MIN_FEATURES, and not if set on the command line)."""
  ref_cost = math.prod(shape) * batch * features**2
  allowed = ref_cost * time_budget / (step_time * MIN_STEPS)
  ref = f'{_shape_text(shape)} x batch {batch}, features {features}'
  width = features
  if ref_cost > allowed:
    while True:
      choices, shape, batch = _input_choices(
        fp, fixed, features=width, max_voxels=allowed / width**2, max_batch=batch, **options
      )
      cost = math.prod(shape) * batch * width**2
      if cost <= allowed or width // 2 < MIN_FEATURES or 'model.features' in fixed:
        break
      width //= 2
  cost = math.prod(shape) * batch * width**2
  seconds = step_time * cost / ref_cost
  steps = max(1, math.floor(time_budget / seconds + 1e-9))
  why = f'a time budget of {time_budget:g} s / {seconds:.3g} s per step'
  if cost != ref_cost:
    why += (
      f' (measured {step_time:.3g} s for {ref}; scaled by voxels x batch x'
      f' features^2: fewer than {MIN_STEPS} steps would fit unscaled)'
    )
  else:
    why += ' (measured on the planned model)'
  timed = [
    Choice('num_train_steps', steps, why),
    Choice(
      'optimizer.warmup_steps', min(50, steps // 10), 'at most 10% of the steps, at most 50'
    ),
  ]
  if width != features:
    choices = choices + [
      Choice(
        'model.features',
        width,
        f'halved from {features}:'
        f' even the smallest patch the time rule allows'
        f' would leave under {MIN_STEPS} steps',
      )
    ]
  return choices, timed, shape


def plan(
  fp: Fingerprint,
  *,
  memory_budget: str | int = '2GiB',
  time_budget: float | None = None,
  step_time: float | None = None,
  fixed: Mapping[str, Any] | None = None,
  features: int = 16,
  num_devices: int = 1,
) -> Plan:
  """The plan for a data set: config fields, each with its reason (the module
  docstring gives the rules). A pure function of its arguments.

  Args:
    fp: the data set's fingerprint.
    memory_budget: per device, for a training step, in bytes or as '2GiB'.
    time_budget: seconds of training steps; with `step_time` it sets
      `num_train_steps`.
    step_time: measured seconds per training step of this plan.
    fixed: dotted config fields set on the command line, with their values:
      kept, planned around, and marked as overridden.
    features: the network's top width (`config.model.features`), for the
      memory estimates.
    num_devices: the batch is a multiple of it; the budget is per device.

  Returns:
    A `Plan`.
  """
  fixed = _tuples_in(fixed or {})
  budget = memory.parse_bytes(memory_budget)
  options = dict(budget=budget, num_devices=num_devices)
  choices, shape, batch = _input_choices(fp, fixed, features=features, **options)
  timed = []
  if time_budget and step_time and 'num_train_steps' not in fixed:
    choices, timed, shape = _timed_choices(
      fp,
      fixed,
      choices,
      shape,
      batch,
      time_budget=time_budget,
      step_time=step_time,
      features=features,
      **options,
    )
  choices += _normalisation(fp, fixed)
  choices += _augment_choices(fp, shape)
  choices += _loss_choices(fp, fixed)
  choices += timed
  inputs = {
    'key': fp.key,
    'memory_budget': memory.format_bytes(budget),
    'time_budget': time_budget,
    'step_time': step_time,
    'features': features,
    'num_devices': num_devices,
  }
  if not any(c.field in fixed for c in choices):
    return Plan(tuple(choices), inputs)
  free = plan(
    fp,
    memory_budget=budget,
    time_budget=time_budget,
    step_time=step_time,
    features=features,
    num_devices=num_devices,
  )
  free_choices = {c.field: c for c in free.choices}
  marked = []
  for c in choices:
    if c.field in fixed:
      own = free_choices.get(c.field, c)
      c = Choice(c.field, fixed[c.field], own.reason, overridden=True, planned=own.value)
    marked.append(c)
  return Plan(tuple(marked), inputs)


# ---------------------------------------------------------------------------
# Using a plan.


def _node_and_leaf(config, field: str):
  *path, leaf = field.split('.')
  node = config
  for part in path:
    node = node[part]
  return node, leaf


def has_field(config, field: str) -> bool:
  try:
    node, leaf = _node_and_leaf(config, field)
  except (KeyError, AttributeError, TypeError):
    return False
  return leaf in node


def apply(config: ml_collections.ConfigDict, p: Plan) -> ml_collections.ConfigDict:
  """A copy of `config` with every planned field set (overridden ones keep theirs)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for c in p.choices:
    node, leaf = _node_and_leaf(config, c.field)
    node[leaf] = c.value
  return config


def _text(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, tuple):
    inner = ', '.join(_text(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  return repr(value) if isinstance(value, str) else str(value)


def format_table(p: Plan) -> str:
  """The plan as a table: field, value, who set it, reason."""
  rows = [('field', 'value', 'set by', 'reason')]
  for c in p.choices:
    if c.overridden:
      rows.append(
        (
          c.field,
          _text(c.value),
          'command line',
          f"overrides the plan's {_text(c.planned)}: {c.reason}",
        )
      )
    else:
      rows.append((c.field, _text(c.value), 'plan', c.reason))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ['  '.join(r[i].ljust(widths[i]) for i in range(3)) + '  ' + r[3] for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths) + '  ' + '-' * 6)
  return '\n'.join(lines)


def format_fingerprint(fp: Fingerprint) -> str:
  """The fingerprint as 'field  value' lines."""
  values = fp.to_dict()
  width = max(len(k) for k in values)
  return '\n'.join(f'{k.ljust(width)}  {_text(_tuples(v))}' for k, v in values.items())


def measure_step_time(
  config: ml_collections.ConfigDict, data, *, steps: int = 6, warmup: int = 4
) -> float:
  """Seconds per training step of `config` on `data` (an `input_pipeline.Dataset`
  opened for it), on one device with its share of the batch.

  Compiles, runs up to `warmup` more steps (for at most about 10 s) so the input
  pipeline's prefetch buffer is drained, then times `steps` steps (at least 2,
  fewer when they take over 15 s) with real batches, so the input pipeline's
  time counts; returns the mean.
  """
  from unet_jax import train  # pylint: disable=g-import-not-at-top  (train imports us)

  info = data.info
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.num_classes = model_config.num_classes or info.num_classes
  model = factory.create_model(model_config, kernels=config.get('kernels', 'auto'))
  tx = train.create_optimizer(config)
  state = train.create_train_state(
    jax.random.key(config.seed), model, tx, (1, *info.spatial_shape, info.num_channels)
  )
  loss_fn = functools.partial(
    losses.get_loss(config.loss.name),
    ignore_index=input_pipeline.IGNORE_LABEL,
    **config.loss.kwargs.to_dict(),
  )
  step = jax.jit(
    functools.partial(
      train.train_step,
      model=model,
      tx=tx,
      loss_fn=loss_fn,
      learning_rate_fn=train.create_learning_rate_fn(config),
      aug_config=config.augment,
      seed=config.seed,
    ),
    donate_argnums=0,
  )
  batch_size = max(1, config.batch_size // jax.device_count())
  batches = data.train_iterator(
    0, batch_size=batch_size, seed=config.seed, process_index=0, process_count=1
  )
  state, metrics = step(state, next(batches))  # Compiles.
  jax.block_until_ready(metrics['loss'])
  start = time.perf_counter()
  for _ in range(warmup):
    if time.perf_counter() - start > 10:
      break
    state, metrics = step(state, next(batches))
    jax.block_until_ready(metrics['loss'])
  start, done = time.perf_counter(), 0
  while done < max(steps, 2):
    state, metrics = step(state, next(batches))
    jax.block_until_ready(metrics['loss'])
    done += 1
    if done >= 2 and time.perf_counter() - start > 15:
      break
  return (time.perf_counter() - start) / done


def _fixed(config, keep: Iterable[str]) -> dict[str, Any]:
  """{field: the config's value} of the kept fields the config has."""
  out = {}
  for field in keep:
    if has_field(config, field):
      node, leaf = _node_and_leaf(config, field)
      value = node[leaf]
      out[field] = (
        value.to_dict() if isinstance(value, ml_collections.ConfigDict) else (value)
      )
  return out


def _stored_step_time(path: str, fp: Fingerprint, time_budget) -> float | None:
  """The step time a workdir's plan.json measured for the same data and budget
  (a resumed run reuses it, so it plans the same number of steps)."""
  if not time_budget or not os.path.exists(path):
    return None
  try:
    inputs = read_plan(path).inputs
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('Ignoring %s, which cannot be read (%s).', path, e)
    return None
  if inputs.get('key') == fp.key and inputs.get('time_budget') == time_budget:
    return inputs.get('step_time')
  return None


def _reopen(config, data):
  ndim = sources.config_ndim(config.data)
  return input_pipeline.open(
    config.data, divisor=factory.input_divisor_of(config.model, ndim=ndim)
  )


def plan_run(config: ml_collections.ConfigDict, data, workdir: str):
  """The plan step at the start of training (`train._prepare`).

  With `config.plan` set: fingerprints `data` (cached), plans with
  `config.plan_memory_budget` and `config.plan_time_budget` (measuring the step
  time of the planned model when a time budget is given; a resumed run reuses
  the time its plan.json recorded), keeps the fields `config.plan_keep` names
  (launch.py adds every field set on the command line), writes
  `workdir/plan.json` (process 0) and logs the table.

  Returns:
    (config, data): the planned config, and the data set opened for it; both
    unchanged when `config.plan` is False or missing.
  """
  if not config.get('plan', False):
    return config, data
  fp = fingerprint(
    data, split=config.data.train_split, ignore_index=config.data.get('ignore_index')
  )
  keep = tuple(config.get('plan_keep') or ())
  time_budget = float(config.get('plan_time_budget') or 0) or None
  path = os.path.join(workdir, PLAN_FILE)
  step_time = _stored_step_time(path, fp, time_budget)
  options = dict(
    memory_budget=config.get('plan_memory_budget') or '2GiB',
    fixed=_fixed(config, keep),
    features=config.model.features,
    num_devices=jax.device_count(),
    time_budget=time_budget,
  )
  p = plan(fp, step_time=step_time, **options)
  planned = apply(config, p)
  config_checks.validate_config(
    planned, num_devices=jax.device_count(), process_count=jax.process_count()
  )
  data = _reopen(planned, data)
  if time_budget and step_time is None and 'num_train_steps' not in keep:
    step_time = measure_step_time(planned, data)
    if jax.process_count() > 1:  # Every process must plan the same number of steps.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      step_time = float(multihost_utils.broadcast_one_to_all(np.float32(step_time)))
    p = plan(fp, step_time=step_time, **options)
    planned = apply(config, p)
  if jax.process_index() == 0:
    write_plan(path, p, fp)
  logging.info(
    'The plan (unet_jax/planning.py; --config.plan=False for the fixed'
    ' settings), written to %s:\n%s',
    path,
    format_table(p),
  )
  return planned, data


# ---------------------------------------------------------------------------
# The command line.


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog='python -m unet_jax.planning',
    description='Prints the fingerprint of a folder of images and masks and the plan'
    ' training would use (see configs/folder.py), without training.',
  )
  parser.add_argument('--root', required=True, help='the folder (train/, val/, ...)')
  parser.add_argument('--config', default='2d', choices=('2d', '3d'))
  parser.add_argument('--data_dir', default='', help="TFDS data_dir ('': TFDS's)")
  parser.add_argument('--num_classes', type=int, default=0, help='0: from the masks')
  parser.add_argument('--ignore_index', type=int, default=-1)
  parser.add_argument('--memory_budget', default='2GiB')
  parser.add_argument('--features', type=int, default=16)
  parser.add_argument('--time_budget', type=float, default=0.0, help='seconds')
  parser.add_argument(
    '--step_time', type=float, default=0.0, help='seconds per step (training measures it)'
  )
  args = parser.parse_args(argv)
  data_config = ml_collections.ConfigDict(
    dict(
      name='segmentation_folder',
      config=args.config,
      root=args.root,
      data_dir=args.data_dir,
      train_split='train',
      eval_split='train',
      size_policy='pad',
      image_size=(),
      patch_size=(),
      num_classes=args.num_classes,
      ignore_index=args.ignore_index,
      mask_colors=(),
    )
  )
  try:
    data = input_pipeline.open(data_config, divisor=1)
    fp = fingerprint(data, ignore_index=args.ignore_index)
    p = plan(
      fp,
      memory_budget=args.memory_budget,
      features=args.features,
      time_budget=args.time_budget or None,
      step_time=args.step_time or None,
    )
  except ValueError as e:
    raise SystemExit(f'Error: {e}') from None
  print(f'Fingerprint of {args.root} (train split):\n')
  print(format_fingerprint(fp))
  print('\nPlan:\n')
  print(format_table(p))


if __name__ == '__main__':
  main()
