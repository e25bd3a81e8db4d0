r"""The planning rules: how a data set's fingerprint becomes config choices.

This is where the rules are documented (the README and configs/folder.py link
here). nnU-Net (Isensee et al., 2021) showed that a handful of rules, applied to a
"fingerprint" of a data set (`unet_jax/planning/fingerprint.py`), configure a
U-Net that matches or beats hand-tuned pipelines on most medical segmentation
tasks. `unet_jax.planning.plan` applies these to make a plan, a pure function of
the fingerprint and the budgets:

* **Target spacing** (3D; `data.target_spacing`, what every case is resampled
  to when the data set is built), nnU-Net v2's rule
  (`ExperimentPlanner.determine_fullres_target_spacing`): the per-axis median of
  the training cases' spacings. When the data is anisotropic, the axis with the
  coarsest median gets the 10th percentile of its spacings instead (numpy's
  linear interpolation), raised to the next coarsest axis's median + 1e-5 if it
  would fall below it (so it stays the coarsest). Anisotropic means both, as in
  nnU-Net: that axis's median spacing is over `ANISOTROPY` (3) times the largest
  of the other axes' medians, and its median size (of the native shapes) times 3
  is under the smallest of the other axes' median sizes: thick slices and few of
  them. Every rule below plans the resampled data: each case's shape becomes
  round(shape x spacing / target) (at least 1; `resampled_shape`), and the
  shapes' median, min and max, the spacing and the anisotropy are those of the
  resampled cases. 2D images are not resampled: no target spacing.
* **Patch, depth, pooling, kernels.** The target input is the median shape.
  The axes are pooled level by level: an axis is pooled (by 2) only while its
  current spacing is within 2x of the finest current spacing and its current
  size is at least 8, so the bottleneck is 4 to 8 pixels per axis; an axis whose
  spacing is more than 2x the finest gets kernel 1 there ((1, 3, 3)-style). At
  most `MAX_DEPTH` levels (the widths double at every level;
  `unet_jax/planning/topology.py`). The patch is rounded down to a multiple of
  the pooling factor and, while a training step of batch 2 does not fit
  `memory_budget` (`unet_jax.models.memory.estimate`), the axis largest
  relative to the median shape (each of them on a tie) is shrunk by one pooling
  factor, re-planning the pooling each time (nnU-Net's rule). The estimate is of
  the run's network: with `model.block='residual'` (configs/resenc_m.py) the
  residual encoder with its blocks per stage and `model.max_features`, which needs
  more memory a voxel, so a budget gives it a smaller patch or batch than the
  plain U-Net, and a larger budget a larger one.
* **Blocks per stage** (`model.block='residual'` only): the config's
  `model.blocks_per_stage`, e.g. nnU-Net's (1, 3, 4, 6, 6, 6), cut to the planned
  depth + 1 stages, or extended by its last count (nnU-Net's ResEnc planner).
  2D: whole images (padded to the largest) when the largest fits the budget and
  is at most 1.5x the median along every axis, else random crops of the patch.
  3D: random patches, and sliding-window evaluation with the same patch when
  volumes are larger.
* **Batch size**: the most that fits the budget, at most 5% of the data set's
  voxels, at least 2 (nnU-Net's rule); instance norm below a batch of 8, where
  batch statistics are noisy (nnU-Net uses instance norm throughout).
* **Normalisation** (`input_pipeline.normalise`). When the data set names its
  channels (nnU-Net's dataset.json `channel_names`), by name, as nnU-Net maps
  them (case-insensitively): 'CT' -> 'ct' (below), 'noNorm' -> 'none',
  'rescale_to_0_1' -> 'minmax' (each image to [0, 1]), 'rgb_to_0_1' -> 'rescale'
  (from [0, 255] for 8-bit data, else from the channel's raw value range),
  'zscore' and any other name -> 'zscore'; one mode when every channel has the
  same, else one per channel ('ct,zscore'), with the intensity values of each
  'ct' channel as below and neutral ones (low 0, high 1, mean 0, std 1) where a
  channel's mode does not use them. Else, from the raw value range:
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
  and are not turned by 90 degrees. Rotation by any angle with probability 0.2 (nnU-Net's
  `get_training_transforms`): in 2D, +-180 degrees in the (H, W) plane, or +-15
  when the plane has a preferred orientation (the tests above, but for the
  square input) or the input is over 1.5x longer one way (nnU-Net's rule); in
  3D, +-30 degrees about every axis, or, when the patch is over 3x longer in
  plane than along D (nnU-Net's `do_dummy_2d_data_aug`) or the D spacing is over
  3x the in-plane one, about D only (+-180 or +-15 as in 2D), and low-resolution
  simulation in H and W only. Scale with probability 0.2 (nnU-Net's) in
  [0.7, 1.4] (nnU-Net's range; its factor scales the sampling grid, so 1.4
  zooms out where ours zooms in, a near-symmetric range either way), or
  [1, 1.4] (zoom in only) when a class is thinner than 3 pixels, which zooming
  out would erase; elastic deformation (2D, at most 100 cases, as in the U-Net
  paper) of 2% of the smaller side, at most 4 pixels. nnU-Net's intensity
  transforms at its probabilities: noise 0.1, blur 0.2, brightness 0.15,
  contrast 0.15, low resolution 0.25, inverted gamma 0.1, gamma 0.3 (their
  ranges are the config fields' defaults, nnU-Net's too;
  `unet_jax/data/augment.py`); the older intensity jitter is off.
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

Each rule here returns `Choice`s, one per config field, each with its reason.

Reference: F. Isensee, P. F. Jaeger, S. A. A. Kohl, J. Petersen, K. H. Maier-Hein,
"nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 203-211 (2021), arXiv:1809.10486.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from unet_jax import config as config_lib
from unet_jax import models
from unet_jax.models import memory
from unet_jax.planning.fingerprint import as_tuples
from unet_jax.planning.fingerprint import Fingerprint
from unet_jax.planning.fingerprint import resampled
from unet_jax.planning.topology import layout
from unet_jax.planning.topology import MAX_DEPTH
from unet_jax.planning.topology import MIN_POOL_SIZE
from unet_jax.planning.topology import pooling_factor

RARE_CLASS = 0.01  # A class under this share of the labelled voxels is weighted.
CT_MIN_VALUE = -500  # Integer data reaching this low is taken as Hounsfield units.
_THIN = 3.0  # Pixels: a class thinner than this is not zoomed out.
MIN_STEPS = 250  # The time rule makes a step cheaper until this many fit the budget.
MIN_PATCH_SIDE = 32  # ... but not below this (or the median) along any axis,
MIN_FEATURES = 8  # ... nor the top width below this.
ANISOTROPY = 3  # nnU-Net's ANISO_THRESHOLD, for the target spacing.
LOW_PERCENTILE = 10  # The coarse axis's target of anisotropic data (nnU-Net's).


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
    object.__setattr__(self, 'value', as_tuples(self.value))
    planned = self.value if self.planned is None and not self.overridden else self.planned
    object.__setattr__(self, 'planned', as_tuples(planned))


# ---------------------------------------------------------------------------
# The target spacing.


def _target_spacing(fp: Fingerprint) -> tuple[tuple[float, ...], str]:
  """nnU-Net v2's full-resolution target spacing (`ExperimentPlanner.
  determine_fullres_target_spacing`), and why."""
  if not fp.spacings:
    return (
      fp.spacing_median,
      'the median spacing (the fingerprint has no per-case spacings)',
    )
  spacings = np.asarray(fp.spacings, np.float64)
  sizes = np.percentile(np.asarray(fp.shapes or [fp.shape_median], np.float64), 50, axis=0)
  target = np.percentile(spacings, 50, axis=0)
  why = f'the per-axis median spacing of {len(spacings)} cases'
  worst = int(np.argmax(target))
  others = [a for a in range(fp.ndim) if a != worst]
  other_spacing = max(target[a] for a in others)
  other_size = min(sizes[a] for a in others)
  axis = _axis_names(fp.ndim)[worst]
  thick = f'median {target[worst]:.4g} > {ANISOTROPY} x {other_spacing:.4g}'
  few = f'median size {sizes[worst]:g} x {ANISOTROPY} < {other_size:g}'
  if target[worst] > ANISOTROPY * other_spacing and sizes[worst] * ANISOTROPY < other_size:
    low = float(np.percentile(spacings[:, worst], LOW_PERCENTILE))
    why += (
      f'; {axis}: the {LOW_PERCENTILE}th percentile {low:.4g} of its spacings'
      f' (anisotropic: {thick}, {few})'
    )
    if low < other_spacing:  # nnU-Net's guard: still the coarsest axis.
      low = float(other_spacing) + 1e-5
      why += f", raised to the next coarsest axis's {other_spacing:.4g} + 1e-5"
    target[worst] = low
  elif target[worst] > ANISOTROPY * other_spacing:
    why += f' ({axis}: {thick}, but not {few}: not anisotropic enough for nnU-Net)'
  return as_tuples(target), why


def spacing_choices(
  fp: Fingerprint, fixed: Mapping[str, Any]
) -> tuple[list[Choice], Fingerprint]:
  """3D: data.target_spacing, and the fingerprint of the data resampled to it (the
  target set on the command line, if any), which the other rules plan from. 2D:
  images are not resampled: no choice, and `fp` itself."""
  if fp.ndim != 3:
    return [], fp
  planned, why = _target_spacing(fp)
  target = tuple(fixed.get('data.target_spacing', planned) or ())
  if target and len(target) != fp.ndim:
    raise ValueError(
      f'config.data.target_spacing={target} has {len(target)} entries, but the data'
      f' set has {fp.ndim} spatial axes.'
    )
  why += (
    f'; resampled median shape {_shape_text(resampled(fp, planned).shape_median)}'
    f' (native {_shape_text(fp.shape_median)})'
  )
  used = resampled(fp, target) if target else fp
  return [Choice('data.target_spacing', planned, why)], used


# ---------------------------------------------------------------------------
# Normalisation.


# Channel names map to modes through config.CHANNEL_NORMALIZATIONS (nnU-Net's
# mapping, matched case-insensitively as nnunetv2's get_normalization_scheme does).
_NEUTRAL = {'low': 0.0, 'high': 1.0, 'mean': 0.0, 'std': 1.0}  # Of unused channels.


def _data_kind(fp: Fingerprint) -> tuple[str, str]:
  """('ct' | 'natural8' | 'mri', why), from the raw value range."""
  low, high = min(fp.value_min), max(fp.value_max)
  where = f'raw values {low:g}..{high:g} ({fp.value_type})'
  if fp.value_type in ('int16', 'uint8') and low <= CT_MIN_VALUE:
    return 'ct', f'{where} reach {CT_MIN_VALUE} or below: CT in Hounsfield units'
  if fp.value_type == 'uint8':
    return 'natural8', f'{where}: 8-bit images'
  return 'mri', f'{where}: neither 8-bit nor Hounsfield units (MRI-like)'


def _mode_by_value_range(fp: Fingerprint) -> tuple[str, str]:
  kind, why = _data_kind(fp)
  mode = {'ct': 'ct', 'natural8': 'rescale', 'mri': 'zscore'}[kind]
  return mode, {
    'ct': f'{why}; clip to the foreground 0.5-99.5 percentiles, then one z-score',
    'rescale': f'{why}; a fixed 0-1 scaling keeps their intensities comparable',
    'zscore': f'{why}; a z-score per image, per channel',
  }[mode]


def _mode_by_channel_names(fp: Fingerprint) -> tuple[str, str]:
  """nnU-Net's mapping of each channel's name; one mode when they agree."""
  modes = [
    config_lib.CHANNEL_NORMALIZATIONS.get(n.casefold(), 'zscore') for n in fp.channel_names
  ]
  named = ', '.join(f'{n} -> {m}' for n, m in zip(fp.channel_names, modes))
  mode = modes[0] if len(set(modes)) == 1 else ','.join(modes)
  return mode, f"channel_names in dataset.json: {named} (nnU-Net's mapping)"


def _intensities(fp: Fingerprint, mode: str, c: int) -> dict[str, tuple[float, str]]:
  """{name: (value, why)} of channel c's intensity values under `mode`."""
  if mode == 'ct':
    return {
      'low': (fp.foreground_p00_5[c], 'the 0.5 percentile of the foreground intensities'),
      'high': (fp.foreground_p99_5[c], 'the 99.5 percentile of the foreground intensities'),
      'mean': (fp.foreground_mean[c], 'the mean of the foreground intensities'),
      'std': (
        max(fp.foreground_std[c], 1e-6),
        'the standard deviation of the foreground intensities',
      ),
    }
  if fp.value_type == 'uint8':  # 'rescale'
    return {'low': (0.0, 'the 8-bit range'), 'high': (255.0, 'the 8-bit range')}
  return {
    'low': (fp.value_min[c], 'the raw value range'),
    'high': (fp.value_max[c], 'the raw value range'),
  }


def _intensity_choices(fp: Fingerprint, modes: tuple[str, ...]) -> list[Choice]:
  """data.intensity_* for `modes` (one for all channels, or one per channel): one
  value per channel; a channel whose mode does not use a field gets a neutral one."""
  channels = range(fp.num_channels)
  per_mode = [modes[0] if len(modes) == 1 else modes[c] for c in channels]
  used = [
    _intensities(fp, m, c) if m in config_lib.INTENSITY_FIELDS else {}
    for c, m in enumerate(per_mode)
  ]
  choices = []
  for name in ('low', 'high', 'mean', 'std'):
    if not any(name in u for u in used):
      continue
    value = tuple(u[name][0] if name in u else _NEUTRAL[name] for u in used)
    whys = {u[name][1] for u in used if name in u}
    why = '; '.join(sorted(whys))
    users = [str(c) for c, u in enumerate(used) if name in u]
    if len(users) < len(used):
      why = f'channel {", ".join(users)}: {why}; others {_NEUTRAL[name]:g} (unused)'
    choices.append(Choice(f'data.intensity_{name}', value, why))
  return choices


def normalisation_choices(fp: Fingerprint, fixed: Mapping[str, Any]) -> list[Choice]:
  """data.normalization (by channel name, else by the raw value range) and the
  intensity values its modes use."""
  names = fp.channel_names and len(fp.channel_names) == fp.num_channels
  mode, why = _mode_by_channel_names(fp) if names else _mode_by_value_range(fp)
  choices = [Choice('data.normalization', mode, why)]
  mode = fixed.get('data.normalization', mode)
  modes = tuple(m.strip() for m in mode.split(','))
  if len(modes) not in (1, fp.num_channels):
    raise ValueError(
      f'config.data.normalization={mode!r} gives {len(modes)} modes; the data has'
      f' {fp.num_channels} channel(s): give 1 or {fp.num_channels}.'
    )
  return choices + _intensity_choices(fp, modes)


# ---------------------------------------------------------------------------
# The input size, the layout and the batch.


def stage_blocks_for(blocks_per_stage: Any, depth: int) -> int | tuple[int, ...]:
  """The blocks per stage of a residual encoder of `depth` (nnU-Net's ResEnc planner
  rule): a list is cut to `depth + 1` stages, or extended with its last count; an
  int (or None: 1) applies to every stage."""
  if blocks_per_stage is None or isinstance(blocks_per_stage, int):
    return blocks_per_stage or 1
  counts = tuple(int(c) for c in blocks_per_stage)[: depth + 1]
  return counts + counts[-1:] * (depth + 1 - len(counts))


def _network_args(network: Mapping[str, Any] | None, depth: int) -> dict[str, Any]:
  """`memory.estimate`'s block fields for the run's `network` (block,
  blocks_per_stage, max_features; missing ones at the UNet's defaults)."""
  network = dict(network or {})
  block = network.get('block') or 'plain'
  return dict(
    block=block,
    blocks_per_stage=stage_blocks_for(network.get('blocks_per_stage'), depth)
    if block == 'residual'
    else 1,
    max_features=network.get('max_features'),
  )


def _step_bytes(shape, pools, kernels, *, batch, fp, features, network=None) -> int:
  """The estimated bytes of a training step on `batch` inputs of `shape`.

  In float32 whatever `config.model.dtype` says (its default, 'auto', is bfloat16 on
  GPU and TPU): a plan is then the same on every machine, and exact for the CPU. For
  bfloat16 it over-estimates the patches a budget of gigabytes picks (bfloat16 halves
  the activations), and under-estimates only tiny patches (by about 12% at 8x8 with
  64 features), where bfloat16's copies of the kernels outweigh the halved
  activations.
  """
  return memory.estimate(
    spatial_shape=tuple(shape),
    in_channels=fp.num_channels,
    num_classes=max(fp.num_classes, 2),
    features=features,
    depth=len(pools),
    kernel_sizes=kernels,
    pool_sizes=pools,
    batch=batch,
    training=True,
    **_network_args(network, len(pools)),
  ).total_bytes


def _fits(shape, pools, kernels, *, batch, fp, features, budget, network=None) -> bool:
  size = _step_bytes(
    shape, pools, kernels, batch=batch, fp=fp, features=features, network=network
  )
  return size <= budget


def _shape_text(shape) -> str:
  return 'x'.join(f'{s:g}' for s in shape)


def _axis_names(ndim: int) -> tuple[str, ...]:
  return ('D', 'H', 'W')[-ndim:]


def _largest_batch(
  shape, pools, kernels, *, fp, features, budget, cap: int, network=None
) -> int:
  """The largest batch (per device, at most `cap`) whose training step fits; 0 if
  not even 1 fits. Memory grows linearly with the batch; checked at the answer."""
  size = lambda b: _step_bytes(
    shape, pools, kernels, batch=b, fp=fp, features=features, network=network
  )
  fits = lambda b: size(b) <= budget
  if not fits(1):
    return 0
  one, two = size(1), size(2)
  per_example = max(two - one, 1)
  b = int(min(cap, max(1, (budget - (one - per_example)) // per_example)))
  while b > 1 and not fits(b):
    b -= 1
  return b


def _patch(
  fp: Fingerprint,
  fixed,
  *,
  budget,
  features,
  batch,
  max_voxels=None,
  time_batch=1,
  network=None,
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
    pools, kernels, _ = layout(fp, patch, fixed)
    divisor = pooling_factor(pools)
    rounded = [max(d, p // d * d) for p, d in zip(patch, divisor)]
    start = start or rounded
    if not _fits(
      rounded,
      pools,
      kernels,
      batch=batch,
      fp=fp,
      features=features,
      budget=budget,
      network=network,
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


def input_choices(
  fp: Fingerprint,
  fixed,
  *,
  budget: int,
  features: int,
  num_devices: int,
  max_voxels: float | None = None,
  max_batch: int | None = None,
  network: Mapping[str, Any] | None = None,
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
    pools, kernels, _ = layout(fp, patch, fixed)
  else:
    patch, pools, kernels, note = _patch(
      fp,
      fixed,
      budget=budget,
      features=features,
      batch=first_batch,
      max_voxels=max_voxels,
      time_batch=time_batch,
      network=network,
    )
  if fp.ndim == 2:
    choices, train_shape = _image_choices(
      fp,
      fixed,
      patch,
      note,
      pools,
      kernels,
      given=bool(given),
      budget=budget,
      features=features,
      batch=first_batch,
      max_voxels=max_voxels,
      time_batch=time_batch,
      network=network,
    )
  else:
    choices, train_shape = _patch_choices(fp, patch, note), patch
  choices += _layout_choices(fp, train_shape, pools, kernels, fixed)
  choices += _block_choices(len(pools), network)
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
    network=network,
  )
  return choices + batch, tuple(train_shape), batch[0].value


def _image_choices(
  fp,
  fixed,
  patch,
  note,
  pools,
  kernels,
  *,
  given: bool,
  budget: int,
  features: int,
  batch: int,
  max_voxels: float | None,
  time_batch: int,
  network: Mapping[str, Any] | None = None,
) -> tuple[list[Choice], tuple[int, ...]]:
  """2D: whole images (size policy 'pad') when the largest, padded to the pooling
  factor, is at most 1.5x the median, fits a step of `batch` and, with
  `max_voxels`, `time_batch` of them hold at most that many voxels (the time
  rule); else random crops of `patch`. Returns the choices and the training
  input shape."""
  divisor = pooling_factor(pools)
  whole = tuple(-(-m // d) * d for m, d in zip(fp.shape_max, divisor))
  whole_ok = (
    not given
    and all(mx <= 1.5 * md for mx, md in zip(fp.shape_max, fp.shape_median))
    and _fits(
      whole,
      pools,
      kernels,
      batch=batch,
      fp=fp,
      features=features,
      budget=budget,
      network=network,
    )
    and (max_voxels is None or math.prod(whole) * time_batch <= max_voxels)
  )
  if fixed.get('data.size_policy', 'pad' if whole_ok else 'crop') == 'pad' and (not given):
    return [
      Choice(
        'data.size_policy',
        'pad',
        f'whole images: the largest,'
        f' {_shape_text(fp.shape_max)}, padded to {_shape_text(whole)}, fits'
        f' {memory.format_bytes(budget)} and is at most 1.5x the median',
      ),
      Choice('data.image_size', (), 'the largest image (size policy pad)'),
    ], whole
  return [
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
  ], patch


def _patch_choices(fp, patch, note) -> list[Choice]:
  """3D: random patches; sliding windows of the patch to evaluate larger volumes."""
  choices = [Choice('data.patch_size', patch, f'random patches: {note}')]
  if any(m > p for m, p in zip(fp.shape_max, patch)):
    choices.append(
      Choice(
        'evals.eval.patch_size',
        patch,
        'volumes larger than the patch are evaluated by sliding windows of the patch',
      )
    )
  return choices


def _layout_choices(fp, shape, pools, kernels, fixed) -> list[Choice]:
  bottleneck = [s / d for s, d in zip(shape, pooling_factor(pools))]
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


def _block_choices(depth: int, network: Mapping[str, Any] | None) -> list[Choice]:
  """A residual encoder's blocks per stage for the planned depth; none for 'plain'."""
  args = _network_args(network, depth)
  if args['block'] != 'residual':
    return []
  given = dict(network or {}).get('blocks_per_stage')
  pattern = given if given is None or isinstance(given, int) else tuple(given)
  counts = models.stage_blocks(
    block='residual', blocks_per_stage=args['blocks_per_stage'], depth=depth
  )
  return [
    Choice(
      'model.blocks_per_stage',
      counts,
      f"the config's {pattern or 1} for {depth + 1} stages (depth {depth}, the"
      " bottleneck last): cut, or extended by its last count, as nnU-Net's ResEnc"
      ' planner does',
    )
  ]


def _batch_choices(
  fp,
  shape,
  pools,
  kernels,
  *,
  budget,
  features,
  num_devices,
  fixed,
  max_batch=None,
  network=None,
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
        network=network,
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


# ---------------------------------------------------------------------------
# Augmentation.


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


def _orientation(fp: Fingerprint, off_centre: Mapping[int, str]) -> str | None:
  """Why the (H, W) plane has a preferred orientation, or None if it has none."""
  h, w = fp.ndim - 2, fp.ndim - 1
  if h in off_centre or w in off_centre:
    return off_centre.get(h) or off_centre[w]
  s_h, s_w = fp.spacing_median[h], fp.spacing_median[w]
  if abs(s_h / s_w - 1) > 0.1:
    return f'the in-plane spacing {s_h:g} x {s_w:g} is not isotropic'
  for c in range(1, fp.num_classes):
    mean, sem = fp.elongation_mean[c], fp.elongation_sem[c]
    if fp.class_voxels[c] and abs(mean) > math.log(1.5) and abs(mean) > 3 * sem:
      axis = 'H' if mean > 0 else 'W'
      return (
        f'class {c} is elongated along {axis} (s_H / s_W ='
        f' {math.exp(mean):.2f} on average): a preferred orientation'
      )
  return None


def _rotation(fp: Fingerprint, shape, off_centre: Mapping[int, str]) -> tuple[bool, str]:
  """Whether 90-degree rotations in the (H, W) plane are safe, and why."""
  h, w = fp.ndim - 2, fp.ndim - 1
  why = _orientation(fp, off_centre)
  if why:
    return False, why
  if shape[h] != shape[w]:
    return False, f'the training input {_shape_text(shape)} is not square'
  return True, (
    'no class lies to one side or has a preferred orientation; isotropic'
    ' in-plane spacing; a square input'
  )


def _in_plane_only(fp: Fingerprint, shape) -> str | None:
  """Why 3D rotations and low-resolution simulation stay in the (H, W) plane (nnU-Net's
  `do_dummy_2d_data_aug`), or None."""
  if fp.ndim != 3:
    return None
  if max(shape) / shape[0] > ANISOTROPY:
    return (
      f'the patch {_shape_text(shape)} is over {ANISOTROPY}x longer in plane than'
      " along D (nnU-Net's rule)"
    )
  s_d, s_plane = fp.spacing_median[0], max(fp.spacing_median[1:])
  if s_d > ANISOTROPY * s_plane:
    return f'the D spacing {s_d:g} is over {ANISOTROPY}x the in-plane {s_plane:g}'
  return None


def _rotation_choices(fp: Fingerprint, shape, off: Mapping[int, str]) -> list[Choice]:
  """Rotation by any angle, nnU-Net's: p 0.2; +-180 degrees in a plane, +-30 about
  every axis of isotropic 3D, +-15 where the plane has a preferred orientation or
  (nnU-Net's rule) the input is over 1.5x longer one way."""
  in_plane = _in_plane_only(fp, shape)
  choices = [Choice('augment.rotation_p', 0.2, "nnU-Net's probability")]
  if fp.ndim == 3 and not in_plane:
    choices.append(
      Choice('augment.rotation', (-30.0, 30.0), "about every axis, nnU-Net's 3D range")
    )
    return choices + [Choice('augment.rotation_axes', (), 'isotropic enough to turn D')]
  h, w = shape[-2], shape[-1]
  why = _orientation(fp, off)
  if not why and max(h, w) / min(h, w) > 1.5:
    why = f"the input {_shape_text(shape)} is over 1.5x longer one way (nnU-Net's rule)"
  if why:
    choices.append(Choice('augment.rotation', (-15.0, 15.0), f'+-15 degrees: {why}'))
  else:
    choices.append(
      Choice(
        'augment.rotation',
        (-180.0, 180.0),
        'any angle in the (H, W) plane (nnU-Net): no preferred orientation',
      )
    )
  if fp.ndim == 3:
    choices.append(Choice('augment.rotation_axes', (0,), f'about D only: {in_plane}'))
  return choices


def _intensity_augment_choices(fp: Fingerprint, shape) -> list[Choice]:
  """nnU-Net's intensity transforms at its probabilities; the ranges are the
  defaults of their config fields (nnU-Net's too)."""
  nnunet = "nnU-Net's probability; its range is the default of augment."
  choices = [
    Choice(
      'augment.intensity',
      0.0,
      "off: nnU-Net's brightness, contrast and gamma below replace the jitter",
    ),
    Choice('augment.noise_p', 0.1, nnunet + 'noise_std'),
    Choice('augment.blur_p', 0.2, nnunet + 'blur_sigma'),
    Choice('augment.brightness_p', 0.15, nnunet + 'brightness'),
    Choice('augment.contrast_p', 0.15, nnunet + 'contrast'),
    Choice('augment.lowres_p', 0.25, nnunet + 'lowres'),
  ]
  in_plane = _in_plane_only(fp, shape)
  if fp.ndim == 3:
    choices.append(
      Choice('augment.lowres_axes', (1, 2), f'H and W only: {in_plane}')
      if in_plane
      else Choice('augment.lowres_axes', (), 'every axis: isotropic enough')
    )
  return choices + [
    Choice('augment.gamma_inverted_p', 0.1, nnunet + 'gamma'),
    Choice('augment.gamma_p', 0.3, nnunet + 'gamma'),
  ]


def augment_choices(fp: Fingerprint, shape) -> list[Choice]:
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
  choices += _rotation_choices(fp, shape, off)
  choices.append(Choice('augment.scale_p', 0.2, "nnU-Net's probability"))
  thin = [c for c in range(1, fp.num_classes) if 0 < fp.class_thickness[c] < _THIN]
  if thin:
    choices.append(
      Choice(
        'augment.scale',
        (1.0, 1.4),
        'zoom in only: class'
        f' {thin[0]} is {fp.class_thickness[thin[0]]:.1f} pixels thick,'
        ' and zooming out would erase it',
      )
    )
  else:
    choices.append(
      Choice(
        'augment.scale',
        (0.7, 1.4),
        f"nnU-Net's range: no class is thinner than {_THIN:g} pixels",
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
  return choices + _intensity_augment_choices(fp, shape)


# ---------------------------------------------------------------------------
# The loss.


def loss_choices(fp: Fingerprint, fixed) -> list[Choice]:
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


# ---------------------------------------------------------------------------
# Steps: the time rule.


def timed_choices(
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
      choices, shape, batch = input_choices(
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
