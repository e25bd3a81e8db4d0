"""Typed options: each config section is read once, here, into a frozen object.

    data = config_lib.DataOptions.from_config(config.data)
    data.size_policy, data.ignore_index        # 'pad', None (the config's -1)
    data.patch_shape(ndim=3)                    # (16, 32, 32), or None
    run = config_lib.RunOptions.from_config(config)
    run.augment.flip, run.optimizer.learning_rate, run.evals['eval'].overlap

Every default of the data, augment, optimizer and loss sections, and of the
run-level fields, lives here, on the dataclass fields, with its comment;
`configs/default.py` builds its sections from them (`DataOptions().to_config()`),
so a config that leaves a field out gets the documented default, and the
command line (`--config.data.x=...`) still reaches every field. A field this
module does not know is refused, naming it. Checks that need the registries
(loss names, evaluator types, data set names) stay with them and in
`unet_jax.train.config_checks`.

This module imports no other unet_jax module: every layer can read its options.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import ml_collections
from ml_collections import config_dict
import numpy as np

SIZE_POLICIES = ('pad', 'crop', 'resize')
NONFINITE = ('error', 'zero')  # DataOptions.nonfinite.
# DataOptions.normalization: one mode, or one per channel ('ct,zscore').
NORMALIZATIONS = ('zscore', 'ct', 'rescale', 'minmax', 'none')
# nnU-Net's normalisation by channel name (dataset.json's channel_names, compared
# case-insensitively); any other name: 'zscore'. 'rescale' takes its range from the
# data (0-255 for 8-bit channels).
CHANNEL_NORMALIZATIONS = {
  'ct': 'ct',
  'nonorm': 'none',
  'zscore': 'zscore',
  'rescale_to_0_1': 'minmax',
  'rgb_to_0_1': 'rescale',
}
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'poly', 'constant')
BEST_MODES = ('max', 'min')
PARALLELISM = ('jit', 'pmap')  # unet_jax.train.runner.MODES (a test checks they agree).
# unet_jax.ops.policy.NAMES (a test checks they agree).
KERNELS = ('auto', 'xla', 'native', 'onednn')
INTENSITY_FIELDS = {
  'ct': ('low', 'high', 'mean', 'std'),
  'rescale': ('low', 'high'),
}


# ---------------------------------------------------------------------------
# Shapes given per axis.


def per_axis(value, ndim: int, name: str, *, of: str = 'the input') -> tuple[int, ...]:
  """A size given as one int (every axis) or `ndim` ints, as `ndim` positive ints.

  The one parser of per-axis sizes (patches, divisors, image sizes).

  Args:
    value: an int, or a sequence of `ndim` ints.
    ndim: the number of spatial axes.
    name: the option, for the message (e.g. 'config.data.patch_size').
    of: what has `ndim` axes, for the message ('the image', 'the data set').

  Raises:
    ValueError: naming `name`, for a value that is not an int or `ndim` ints, or
      not positive.
  """
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (int(value),) * ndim
  else:
    try:
      value = tuple(value)
    except TypeError:
      raise ValueError(f'{name}={value!r} must be an int or {ndim} ints.') from None
    if len(value) != ndim:
      raise ValueError(
        f'{name}={value} has {len(value)} entries, but {of} has {ndim} spatial axes'
        f' ({of} is {ndim}D).'
      )
  for v in value:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f'{name}={value} must hold positive integers.')
  return tuple(int(v) for v in value)


def _size(value) -> int | tuple[int, ...]:
  """A config size as an int or a tuple of ints; 0, None and () are ()."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value) if value else ()
  return tuple(int(v) for v in value or ())


def _floats(value) -> tuple[float, ...]:
  """One float or a sequence of them, as a tuple."""
  if isinstance(value, (int, float, np.number)):
    return (float(value),)
  return tuple(float(v) for v in value or ())


def _tuples(value) -> Any:
  """Lists (as ml-collections may hand them over) as nested tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _choice(field: str, value: Any, valid) -> None:
  if value not in valid:
    raise ValueError(f'config.{field}={value!r} is not one of {sorted(valid)}.')


def _items(section) -> dict[str, Any]:
  """A config section (ConfigDict, dict or None) as a plain dict of its fields."""
  if section is None:
    return {}
  if isinstance(section, ml_collections.ConfigDict):
    return {k: section[k] for k in section.keys()}  # References resolved.
  return dict(section)


# ---------------------------------------------------------------------------
# Sections.


class _Section:
  """from_config / to_config for a frozen dataclass of one config section."""

  SECTION: ClassVar[str]

  @classmethod
  def from_config(cls, section):
    """The options of `section`; missing (or None) fields take their defaults.

    An options object is returned as it is. Raises ValueError naming unknown
    fields, or a field with a bad value.
    """
    if isinstance(section, cls):
      return section
    values = _items(section)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(
        f'config.{cls.SECTION} has unknown field(s) {unknown}; it takes {names}.'
      )
    values = {k: v for k, v in values.items() if v is not None}
    return cls(**cls._from_config_values(values))

  @classmethod
  def _from_config_values(cls, values: dict[str, Any]) -> dict[str, Any]:
    return values

  def _config_values(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def to_config(self) -> ml_collections.ConfigDict:
    """The section as a ConfigDict, in the config's own form (e.g. -1 for None)."""
    return ml_collections.ConfigDict(self._config_values())


@dataclasses.dataclass(frozen=True)
class DataOptions(_Section):
  """`config.data`: which data set, its sizes, labels and normalisation."""

  SECTION: ClassVar[str] = 'data'

  name: str = 'synthetic_shapes'  # A registered data set (unet_jax.data.sources).
  config: str = ''  # TFDS builder config, e.g. 'binary_64'; '' for the default.
  root: str = ''  # Folder of images and masks, for 'segmentation_folder'.
  data_dir: str = ''  # TFDS data_dir; '': TFDS's default (~/tensorflow_datasets).
  train_split: str = 'train'
  eval_split: str = 'validation'
  size_policy: str = 'pad'  # Sizes the model cannot take: 'pad', 'crop' or 'resize'.
  image_size: (
    int | tuple[int, ...]
  ) = ()  # Target size for the size policy; () = from the data.
  num_classes: int = 0  # segmentation_folder: classes in the masks; 0 = infer.
  patch_size: int | tuple[int, ...] = ()  # 3D only: random training patches; (): none.
  foreground_fraction: float = 1 / 3  # 3D only: share of patches on foreground.
  # A mask value to leave out (255: VOC's borders); in the config -1 means none.
  ignore_index: int | None = None
  mask_colors: tuple[
    tuple[int, ...], ...
  ] = ()  # Colour masks: the RGB colour of each class.
  # 'zscore' per image; 'ct': clip to [low, high], then (x - mean) / std; 'rescale':
  # (x - low) / (high - low); 'minmax': per image to [0, 1]; 'none'. One mode for
  # every channel, or one per channel, comma-separated ('ct,zscore'). The
  # intensity_* fields hold one value, or one per channel.
  normalization: str = 'zscore'
  intensity_low: tuple[float, ...] = ()  # 'ct', 'rescale': the low end of the window.
  intensity_high: tuple[float, ...] = ()  # 'ct', 'rescale': the high end.
  intensity_mean: tuple[float, ...] = ()  # 'ct': the global mean, after clipping.
  intensity_std: tuple[float, ...] = ()  # 'ct': the global standard deviation.
  # Voxel spacing (D, H, W) every 3D case is resampled to when the data set is built,
  # and predictions are resampled back from; (): each case at its own spacing. The
  # plan sets it from the training cases (unet_jax/planning/rules.py).
  target_spacing: tuple[float, ...] = ()
  # segmentation_folder: the cross-validation fold to train, 0 .. num_folds - 1 (its
  # cases validate, the others train), or 'all' (every case trains; no validation).
  # The folds are those of splits_final.json (sources.splits_path), made once
  # (nnU-Net's split) when missing; the command line takes 1 or all.
  fold: int | str = 0
  # Folds when the split is made: 0 means 5 for nnU-Net and MSD data sets and, for
  # the project's layout, its own train/ and val/ (one fold); k >= 2 pools train/
  # and val/ and splits them into k folds. An existing splits file is used as it
  # is: with 0 whatever its number of folds (as nnU-Net); a set num_folds that
  # differs from the file's is an error.
  num_folds: int = 0
  # Image voxels that are NaN or +-Inf: 'error' names every file holding them (with
  # their count) before anything is built or predicted; 'zero' replaces them by 0
  # before normalisation, when the data set is built and when predicting.
  nonfinite: str = 'error'

  def __post_init__(self):
    fix = lambda name, value: object.__setattr__(self, name, value)
    fix('fold', _fold(self.fold))
    fix('num_folds', _num_folds(self.num_folds))
    if self.num_folds and self.fold != 'all' and self.fold >= self.num_folds:
      raise ValueError(
        f'config.data.fold={self.fold!r} is beyond config.data.num_folds='
        f"{self.num_folds}: use 0 .. {self.num_folds - 1} or 'all'."
      )
    fix('image_size', _size(self.image_size))
    fix('patch_size', _size(self.patch_size))
    fix('mask_colors', tuple(tuple(int(v) for v in c) for c in self.mask_colors or ()))
    fix('foreground_fraction', float(self.foreground_fraction))
    fix('num_classes', int(self.num_classes or 0))
    for name in ('low', 'high', 'mean', 'std'):
      fix(f'intensity_{name}', _floats(getattr(self, f'intensity_{name}')))
    fix('target_spacing', _floats(self.target_spacing))
    if not all(math.isfinite(s) and s > 0 for s in self.target_spacing):
      raise ValueError(
        'config.data.target_spacing must hold positive, finite spacings (one per'
        f' spatial axis), got {self.target_spacing}.'
      )
    if self.nonfinite not in NONFINITE:
      raise ValueError(
        f'config.data.nonfinite={self.nonfinite!r} is not one of {list(NONFINITE)}.'
      )
    if self.size_policy not in SIZE_POLICIES:
      raise ValueError(
        f'config.data.size_policy must be one of {list(SIZE_POLICIES)},'
        f' got {self.size_policy!r}.'
      )
    if not 0 <= self.foreground_fraction <= 1:
      raise ValueError(
        'config.data.foreground_fraction must be in [0, 1],'
        f' got {self.foreground_fraction}.'
      )
    self._check_normalization()

  def normalization_modes(self) -> tuple[str, ...]:
    """`normalization` as modes: one for every channel, or one per channel."""
    return tuple(m.strip() for m in self.normalization.split(','))

  def _check_normalization(self) -> None:
    modes = self.normalization_modes()
    for mode in modes:
      if mode not in NORMALIZATIONS and len(modes) == 1:
        raise ValueError(
          f'config.data.normalization={mode!r} is not one of {list(NORMALIZATIONS)}.'
        )
      if mode not in NORMALIZATIONS:
        raise ValueError(
          f'config.data.normalization={self.normalization!r}: the entry {mode!r} is'
          f' not one of {list(NORMALIZATIONS)}.'
        )
    for mode in modes:
      for name in INTENSITY_FIELDS.get(mode, ()):
        if not getattr(self, f'intensity_{name}'):
          raise ValueError(
            f'config.data.normalization={self.normalization!r} needs'
            f' config.data.intensity_{name} (one value, or one per channel).'
          )
    if any(mode in INTENSITY_FIELDS for mode in modes):
      self._check_intensities(modes)

  def _check_intensities(self, modes: tuple[str, ...]) -> None:
    """The intensity values of the channels whose mode uses them: one value or one
    per channel, high above low, a positive std ('ct')."""
    low, high = self.intensity_values('low'), self.intensity_values('high')
    std = self.intensity_values('std')
    if len(modes) == 1:
      if low.size > 1 and high.size > 1 and low.size != high.size:
        raise ValueError(
          f'config.data.intensity_low {low.tolist()} and intensity_high'
          f' {high.tolist()} have different lengths.'
        )
      window, ct = True, modes[0] == 'ct'
    else:
      for name in ('low', 'high', 'mean', 'std'):
        size = self.intensity_values(name).size
        if size not in (0, 1, len(modes)):
          raise ValueError(
            f'config.data.intensity_{name} has {size} values, but'
            f' config.data.normalization={self.normalization!r} gives'
            f' {len(modes)} channels a mode each: give 1 value or {len(modes)}.'
          )
      window = np.asarray([m in INTENSITY_FIELDS for m in modes])
      ct = np.asarray([m == 'ct' for m in modes])
    if np.any((high <= low) & window):
      raise ValueError(
        f'config.data.intensity_high {high.tolist()} must be above'
        f' intensity_low {low.tolist()}.'
      )
    if std.size and np.any((std <= 0) & ct):
      raise ValueError(f'config.data.intensity_std {std.tolist()} must be positive.')

  def intensity_values(self, name: str) -> np.ndarray:
    """`intensity_<name>` as float32 [1] or [C]."""
    return np.asarray(getattr(self, f'intensity_{name}'), np.float32)

  def image_shape(self, ndim: int) -> tuple[int, ...] | None:
    """`image_size` as `ndim` ints; None when unset."""
    return _shape_or_none(self.image_size, ndim, 'config.data.image_size')

  def patch_shape(self, ndim: int) -> tuple[int, ...] | None:
    """`patch_size` as `ndim` ints; None when unset."""
    return _shape_or_none(self.patch_size, ndim, 'config.data.patch_size')

  @classmethod
  def _from_config_values(cls, values):
    if 'ignore_index' in values and values['ignore_index'] < 0:
      values['ignore_index'] = None
    return values

  def _config_values(self):
    values = super()._config_values()
    values['ignore_index'] = -1 if self.ignore_index is None else self.ignore_index
    # Typed `object`, so both --config.data.fold=1 and --config.data.fold=all parse.
    values['fold'] = config_dict.FieldReference(self.fold, field_type=object)
    return values


def _fold(value) -> int | str:
  """`config.data.fold` as an int >= 0 or 'all' (from an int, or a str of either)."""
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value.strip())
  elif isinstance(value, str) and value.strip().lower() == 'all':
    return 'all'
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
    return int(value)
  raise ValueError(
    f"config.data.fold={value!r} must be a fold number (0, 1, ...) or 'all'."
  )


def _num_folds(value) -> int:
  """`config.data.num_folds` as an int: 0 (unset) or at least 2."""
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value.strip())
  if (
    isinstance(value, (int, np.integer))
    and not isinstance(value, bool)
    and (value == 0 or value >= 2)
  ):
    return int(value)
  raise ValueError(
    f"config.data.num_folds={value!r} must be 0 (the data set's default) or at least 2."
  )


def _shape_or_none(value, ndim: int, name: str) -> tuple[int, ...] | None:
  if value == ():
    return None
  return per_axis(value, ndim, name, of='the data set')


@dataclasses.dataclass(frozen=True)
class AugmentOptions(_Section):
  """`config.augment`: the random transforms of the train step (unet_jax.data.augment).

  Every `*_p` is a probability per example (0 turns the transform off); the ranges
  beside them are nnU-Net v2's defaults (unet_jax/data/augment.py cites them), so
  setting a probability alone gives nnU-Net's transform. All new transforms are off
  by default: a config that does not name them augments as before.
  """

  SECTION: ClassVar[str] = 'augment'

  flip: bool = True  # Random flips along the spatial axes.
  flip_axes: tuple[int, ...] = ()  # The spatial axes flip acts on; (): every axis.
  rot90: bool = True  # Random 90-degree rotations in the (H, W) plane, when square.
  scale: tuple[float, float] = (1.0, 1.0)  # Random scale-and-crop range; (1, 1): off.
  scale_p: float = 1.0  # Probability of the scaling (nnU-Net: 0.2).
  intensity: float = 0.0  # Intensity jitter amplitude; 0 turns it off.
  elastic: float = 0.0  # Elastic displacement in pixels; 0 turns it off.
  elastic_grid: int = 3  # Points per axis of the coarse displacement grid.
  rotation_p: float = 0.0  # Probability of a rotation by any angle (nnU-Net: 0.2).
  rotation: tuple[float, float] = (-30.0, 30.0)  # Angle range in degrees, per axis.
  rotation_axes: tuple[int, ...] = ()  # 3D: the axes rotated about; (0,): (H, W) only.
  noise_p: float = 0.0  # Probability of additive Gaussian noise (nnU-Net: 0.1).
  noise_std: tuple[float, float] = (0.0, 0.1)  # Range of the noise's standard deviation.
  blur_p: float = 0.0  # Probability of a Gaussian blur (nnU-Net: 0.2).
  blur_sigma: tuple[float, float] = (0.5, 1.0)  # Sigma range in pixels, drawn per axis.
  blur_channel_p: float = 0.5  # Of a blurred example, the share of blurred channels.
  brightness_p: float = 0.0  # Probability of a multiplicative brightness (nnU-Net: 0.15).
  brightness: tuple[float, float] = (0.75, 1.25)  # Range of the multiplier.
  contrast_p: float = 0.0  # Probability of a contrast change (nnU-Net: 0.15).
  contrast: tuple[float, float] = (0.75, 1.25)  # Range of the contrast factor.
  lowres_p: float = 0.0  # Probability of a low-resolution simulation (nnU-Net: 0.25).
  lowres: tuple[float, float] = (0.5, 1.0)  # Range of the downsampling factor.
  lowres_channel_p: float = 0.5  # Of a low-res example, the share of channels.
  lowres_axes: tuple[int, ...] = ()  # The spatial axes downsampled; (): every axis.
  gamma_p: float = 0.0  # Probability of a gamma transform (nnU-Net: 0.3).
  gamma_inverted_p: float = 0.0  # Probability of a gamma of the inverted image (0.1).
  gamma: tuple[float, float] = (0.7, 1.5)  # Range of the exponent.

  _PROBABILITIES: ClassVar[tuple[str, ...]] = (
    'scale_p',
    'rotation_p',
    'noise_p',
    'blur_p',
    'blur_channel_p',
    'brightness_p',
    'contrast_p',
    'lowres_p',
    'lowres_channel_p',
    'gamma_p',
    'gamma_inverted_p',
  )
  # Ranges (min, max) with min <= max, and the bounds they must lie within.
  _RANGES: ClassVar[dict[str, tuple[float, float, str]]] = {
    'rotation': (-180.0, 180.0, 'within [-180, 180] degrees'),
    'noise_std': (0.0, math.inf, '>= 0'),
    'blur_sigma': (0.0, 8.0, 'in (0, 8] pixels'),
    'brightness': (0.0, math.inf, '> 0'),
    'contrast': (0.0, math.inf, '> 0'),
    'lowres': (0.0, 1.0, 'in (0, 1]'),
    'gamma': (0.0, math.inf, '> 0'),
  }
  _OPEN_BELOW: ClassVar[tuple[str, ...]] = (
    'blur_sigma',
    'brightness',
    'contrast',
    'lowres',
    'gamma',
  )

  def __post_init__(self):
    fix = lambda name, value: object.__setattr__(self, name, value)
    fix('flip', bool(self.flip))
    fix('rot90', bool(self.rot90))
    fix('scale', tuple(float(s) for s in self.scale))
    fix('intensity', float(self.intensity))
    fix('elastic', float(self.elastic))
    fix('elastic_grid', int(self.elastic_grid))
    for name in ('flip_axes', 'rotation_axes', 'lowres_axes'):
      fix(name, tuple(int(a) for a in getattr(self, name) or ()))
    for name in self._PROBABILITIES:
      fix(name, float(getattr(self, name)))
    for name in self._RANGES:
      fix(name, tuple(float(v) for v in getattr(self, name)))
    scale = self.scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
      raise ValueError(
        f'config.augment.scale must be (min, max) with 0 < min <= max, got {scale}.'
      )
    if self.intensity < 0 or self.elastic < 0:
      raise ValueError(
        'config.augment.intensity and .elastic must be >= 0, got'
        f' {self.intensity}, {self.elastic}.'
      )
    if self.elastic_grid < 2:
      raise ValueError(
        f'config.augment.elastic_grid must be >= 2, got {self.elastic_grid}.'
      )
    for name in ('flip_axes', 'rotation_axes', 'lowres_axes'):
      if any(a < 0 or a > 2 for a in getattr(self, name)):
        raise ValueError(
          f'config.augment.{name} must hold spatial axes (0, 1 or 2),'
          f' got {getattr(self, name)}.'
        )
    self._check_probabilities_and_ranges()

  def _check_probabilities_and_ranges(self):
    for name in self._PROBABILITIES:
      value = getattr(self, name)
      if not 0 <= value <= 1:  # Also refuses NaN.
        raise ValueError(f'config.augment.{name} must be in [0, 1], got {value}.')
    for name, (low, high, text) in self._RANGES.items():
      value = getattr(self, name)
      ordered = len(value) == 2 and value[0] <= value[1]
      below = value[0] > low if name in self._OPEN_BELOW else value[0] >= low
      if not (ordered and below and value[-1] <= high):
        raise ValueError(
          f'config.augment.{name} must be (min, max) with min <= max, {text}, got {value}.'
        )

  @property
  def geometric(self) -> bool:
    """Whether any transform moves pixels."""
    return (
      self.flip
      or self.rot90
      or self.elastic > 0
      or self.rotation_p > 0
      or (self.scale != (1.0, 1.0) and self.scale_p > 0)
    )


@dataclasses.dataclass(frozen=True)
class OptimizerOptions(_Section):
  """`config.optimizer`: the optimiser and its learning-rate schedule."""

  SECTION: ClassVar[str] = 'optimizer'

  name: str = 'adam'  # 'adam', 'adamw' or 'sgd' (Nesterov momentum).
  learning_rate: float = 1e-3  # The peak, after warmup.
  schedule: str = 'cosine'  # Decay after warmup: 'cosine', 'poly' (nnU-Net) or 'constant'.
  warmup_steps: int = 50  # Linear warmup from 0.
  weight_decay: float = 0.0  # 'adamw' only.
  momentum: float = 0.99  # 'sgd' only.
  grad_clip_norm: float = 1.0  # Clip the global gradient norm to this; 0: no clipping.

  def __post_init__(self):
    _choice('optimizer.name', self.name, OPTIMIZERS)
    _choice('optimizer.schedule', self.schedule, SCHEDULES)
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(
        f'config.optimizer.learning_rate must be finite and positive, got'
        f' {self.learning_rate}.'
      )
    for field in ('weight_decay', 'momentum', 'grad_clip_norm'):
      value = getattr(self, field)
      if not (math.isfinite(value) and value >= 0):
        # A negative clip norm would flip the gradients (optax scales by norm / g).
        raise ValueError(f'config.optimizer.{field} must be finite and >= 0, got {value}.')
    if self.warmup_steps < 0:
      raise ValueError(
        f'config.optimizer.warmup_steps must be >= 0, got {self.warmup_steps}.'
      )


# The numeric options of the losses (unet_jax.losses checks them too, on every call):
# each finite and >= 0, or in [0, 1]; a number or a list of them (class_weights).
LOSS_NONNEGATIVE = (
  'gamma',
  'beta',
  'smooth_nr',
  'smooth_dr',
  'class_weights',
  'lambda_dice',
  'lambda_bce',
  'lambda_ce',
  'lambda_focal',
)
LOSS_UNIT_INTERVAL = ('label_smoothing',)


def _loss_number(field: str, value, *, high: float | None = None) -> None:
  """A ValueError unless config.loss.kwargs.<field> is finite and in [0, high]."""
  try:
    array = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise ValueError(
      f'config.loss.kwargs.{field} must be a number or a list of them, got {value!r}.'
    ) from None
  if np.all(
    np.isfinite(array) & (array >= 0) & (array <= (np.inf if high is None else high))
  ):
    return
  bound = '>= 0' if high is None else f'in [0, {high:g}]'
  shown = array.item() if array.ndim == 0 else array.tolist()
  raise ValueError(f'config.loss.kwargs.{field} must be finite and {bound}, got {shown}.')


@dataclasses.dataclass(frozen=True)
class LossOptions(_Section):
  """`config.loss`: a registered loss (unet_jax.losses) and its keyword options."""

  SECTION: ClassVar[str] = 'loss'

  name: str = 'dice_bce'  # A name in unet_jax.losses.
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Its options.

  def __post_init__(self):
    kwargs = self.kwargs
    if isinstance(kwargs, ml_collections.ConfigDict):
      kwargs = kwargs.to_dict()
    object.__setattr__(self, 'kwargs', dict(kwargs or {}))
    if 'ignore_index' in self.kwargs:
      raise ValueError(
        'config.loss.kwargs.ignore_index is set by the trainer (padding and ignored'
        ' pixels); set config.data.ignore_index to the label value to leave out.'
      )
    self._check_numbers()

  def _check_numbers(self) -> None:
    """A ValueError naming a numeric option out of range, before anything is built.

    A negative focal gamma or loss weight would otherwise train without a word,
    towards a wrong or unbounded loss.
    """
    values = {k: v for k, v in self.kwargs.items() if v is not None}
    for field in LOSS_NONNEGATIVE:
      if field in values:
        _loss_number(field, values[field])
    for field in LOSS_UNIT_INTERVAL:
      if field in values:
        _loss_number(field, values[field], high=1.0)
    if 'alpha' not in values:
      return
    alpha = values['alpha']
    # Tversky: the false positives' weight. Focal: a class balance, where a scalar
    # gives 1 - alpha to the background, and sigmoid gives 1 - alpha to negatives.
    unit = self.name != 'tversky' and (
      np.ndim(alpha) == 0 or values.get('activation') == 'sigmoid'
    )
    _loss_number('alpha', alpha, high=1.0 if unit else None)
    # Both >= 0 by now; beta's default is positive.
    if (
      self.name == 'tversky'
      and 'beta' in values
      and np.any(np.add(alpha, values['beta']) <= 0)
    ):
      raise ValueError(
        'config.loss.kwargs.alpha + beta must be > 0 (with both 0 the Tversky loss'
        f' is constant), got alpha={alpha}, beta={values["beta"]}.'
      )


@dataclasses.dataclass(frozen=True)
class EvalOptions(_Section):
  """One entry of `config.evals`: an evaluator (unet_jax.evaluation) and its period.

  `samples` reaches the evaluator types that draw samples ('confusion'); fields
  other than these are the type's own options (`tolerance` for 'boundary'), kept
  in `extras` and checked against the type by `unet_jax.evaluation`.
  """

  SECTION: ClassVar[str] = 'evals'

  type: str  # The evaluator: 'confusion', 'per_case' or 'boundary'.
  every_steps: int  # How often it runs; it also runs after the last step.
  split: str = ''  # '': config.data.eval_split.
  batch_size: int = 0  # 0: config.eval_batch_size.
  patch_size: tuple[int, ...] = ()  # Larger examples in sliding windows; (): whole.
  overlap: float = 0.5  # Overlap of the sliding windows.
  samples: int = 4  # Examples drawn to samples/<name>_step_<N>.png ('confusion').
  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  name: str = dataclasses.field(default='eval', compare=False)  # Its key in config.evals.

  COMMON: ClassVar[tuple[str, ...]] = (
    'type',
    'split',
    'every_steps',
    'batch_size',
    'patch_size',
    'overlap',
    'samples',
  )

  def __post_init__(self):
    patch = _size(self.patch_size)
    if isinstance(patch, int):
      raise ValueError(
        f'config.evals.{self.name}.patch_size={patch} must have one size per axis,'
        ' e.g. (32, 64, 64).'
      )
    object.__setattr__(self, 'patch_size', patch)
    object.__setattr__(self, 'extras', dict(self.extras))
    if not self.every_steps or int(self.every_steps) < 1:
      raise ValueError(
        f'config.evals.{self.name}.every_steps must be positive, got {self.every_steps}.'
      )

  @classmethod
  def from_config(cls, section, *, name: str = 'eval') -> EvalOptions:  # pylint: disable=arguments-differ
    if isinstance(section, cls):
      return section
    values = _items(section)
    common = {k: v for k, v in values.items() if k in cls.COMMON and v is not None}
    extras = {k: v for k, v in values.items() if k not in cls.COMMON}
    common.setdefault('type', None)
    common.setdefault('every_steps', None)
    return cls(**common, extras=extras, name=name)

  def _config_values(self):
    values = {k: getattr(self, k) for k in self.COMMON}
    return {**values, **self.extras}


@dataclasses.dataclass(frozen=True)
class PlanOptions:
  """The top-level `plan*` fields: whether and how to plan a run from its data
  (`unet_jax.planning`; configs/folder.py turns it on)."""

  FIELDS: ClassVar[tuple[str, ...]] = (
    'plan',
    'plan_keep',
    'plan_memory_budget',
    'plan_time_budget',
    'plan_from',
  )

  plan: bool = False  # Plan from the data; False: the config's fixed settings.
  plan_keep: tuple[str, ...] = ()  # Fields the plan leaves alone (launch.py adds CLI ones).
  plan_memory_budget: str | int = '2GiB'  # Per device, for a training step.
  plan_time_budget: float = 0.0  # Seconds of training steps; 0: num_train_steps.
  # Another run's folder (or a plan.json): its plan is applied instead of planning
  # from the data (no fingerprint, no step timing), whatever `plan` says; the
  # plan_keep fields still win. '': none. A resume may change it (it is recorded).
  plan_from: str = ''

  def __post_init__(self):
    if self.plan_time_budget < 0:
      raise ValueError(
        f'config.plan_time_budget must be >= 0, got {self.plan_time_budget}.'
      )

  @classmethod
  def from_config(cls, config) -> PlanOptions:
    """The plan fields of a whole config; missing (or None) ones take their defaults."""
    if isinstance(config, cls):
      return config
    values = {k: v for k, v in _items(config).items() if k in cls.FIELDS and v is not None}
    if 'plan_keep' in values:
      values['plan_keep'] = tuple(str(f) for f in values['plan_keep'])
    if 'plan_time_budget' in values:
      values['plan_time_budget'] = float(values['plan_time_budget'])
    if 'plan_from' in values:
      values['plan_from'] = str(values['plan_from'])
    return cls(**values)

  def to_config(self) -> ml_collections.ConfigDict:
    """The top-level `plan*` fields, to add to a config with `config.update`."""
    return ml_collections.ConfigDict({f: getattr(self, f) for f in self.FIELDS})


@dataclasses.dataclass(frozen=True)
class RunOptions(_Section):
  """The run-level fields of a config, and its data, augment, optimizer, loss and
  evals sections as options. `config.model` stays a section of its own
  (`unet_jax.models.factory.create_model`); the plan fields are `PlanOptions`.
  """

  SECTION: ClassVar[str] = ''
  SECTIONS: ClassVar[tuple[str, ...]] = ('data', 'augment', 'optimizer', 'loss', 'evals')

  seed: int = 0  # Seeds parameters, data order and augmentation.
  batch_size: int = 16  # Global batch, split across devices.
  eval_batch_size: int = 16  # Global; the last batch is padded and the padding masked.
  num_train_steps: int = 600
  log_every_steps: int = 50
  eval_every_steps: int = 200  # configs/default.py's evaluator runs at this period.
  checkpoint_every_steps: int = 200
  keep_checkpoints: int = 2  # The last K checkpoints are kept, plus the best.
  best_metric: str = 'eval_dice'  # Picks the best checkpoint: <evaluator>_<metric>.
  best_mode: str = 'max'  # 'max' for Dice, 'min' for a distance such as hd95.
  parallelism: str = 'jit'  # 'jit' (Mesh + NamedSharding) or 'pmap'.
  # How convolutions and pooling run: 'auto' (the native CPU kernels where they win),
  # 'xla', 'native' or 'onednn' (unet_jax/ops/policy.py). Not saved state: a resume
  # may change it.
  kernels: str = 'auto'
  # 'RUN[:step]' (step: a number, 'best' or 'latest'; default 'best'): a new run
  # starts from RUN's parameters and BatchNorm statistics, with a fresh optimizer
  # (unet_jax/train/finetune.py). '': from random ones. Read at step 0 only; a resume
  # may not change it (the run's parameters came from the recorded one).
  init_from: str = ''
  data: DataOptions = dataclasses.field(default_factory=DataOptions)
  augment: AugmentOptions = dataclasses.field(default_factory=AugmentOptions)
  optimizer: OptimizerOptions = dataclasses.field(default_factory=OptimizerOptions)
  loss: LossOptions = dataclasses.field(default_factory=LossOptions)
  evals: Mapping[str, EvalOptions] = dataclasses.field(default_factory=dict)

  SCALARS: ClassVar[tuple[str, ...]] = (
    'seed',
    'batch_size',
    'eval_batch_size',
    'num_train_steps',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'best_metric',
    'best_mode',
    'parallelism',
    'kernels',
    'init_from',
  )

  def __post_init__(self):
    _choice('parallelism', self.parallelism, PARALLELISM)
    _choice('kernels', self.kernels, KERNELS)
    _choice('best_mode', self.best_mode, BEST_MODES)
    for field in (
      'batch_size',
      'eval_batch_size',
      'num_train_steps',
      'log_every_steps',
      'checkpoint_every_steps',
    ):
      if getattr(self, field) < 1:
        raise ValueError(f'config.{field} must be positive, got {getattr(self, field)}.')

  @classmethod
  def from_config(cls, config) -> RunOptions:  # pylint: disable=arguments-differ
    """The run's options; other top-level fields (model, plan, ...) are left alone."""
    if isinstance(config, cls):
      return config
    values = _items(config)
    scalars = {k: values[k] for k in cls.SCALARS if values.get(k) is not None}
    evals = {
      name: EvalOptions.from_config(section, name=name)
      for name, section in _items(values.get('evals')).items()
    }
    return cls(
      **scalars,
      data=DataOptions.from_config(values.get('data')),
      augment=AugmentOptions.from_config(values.get('augment')),
      optimizer=OptimizerOptions.from_config(values.get('optimizer')),
      loss=LossOptions.from_config(values.get('loss')),
      evals=evals,
    )

  def to_config(self) -> ml_collections.ConfigDict:
    """The run-level fields and the data, augment, loss and optimizer sections."""
    config = ml_collections.ConfigDict({k: getattr(self, k) for k in self.SCALARS})
    for name in ('data', 'augment', 'loss', 'optimizer'):
      config[name] = getattr(self, name).to_config()
    return config
