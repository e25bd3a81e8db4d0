"""Synthetic segmentation data sets, generated locally from a seed.

Two TFDS builders share one N-D renderer:

* `synthetic_shapes`: 2D images of random ellipses and convex polygons on a
  noisy, textured background.
* `synthetic_volumes`: the 3D analogue (ellipsoids and convex polyhedra), with
  an optional anisotropic voxel spacing.

Nothing is downloaded: `download_and_prepare` renders every example from
`(config.seed, split, index)`, so two builds of one config are identical.

    import tensorflow_datasets as tfds
    import unet_jax.data  # Registers the builders.
    ds = tfds.data_source('synthetic_shapes', split='train')  # 'binary' config.

Features: `image` uint8 `[*spatial, 1]`, `label` uint8 `[*spatial]` holding the
class index (0 is background), and for volumes `spacing` float32 `[3]`.

Rendering, per example:

* Foreground: 1-3 shapes whose total area (volume) is the config's
  `foreground_fraction` of the image, give or take 30%. Every foreground class
  of the config occurs in every example (multi-class configs draw each class at
  least once, and a shape painted over by another is drawn again). An ellipse is a random
  rotation of an axis-aligned ellipse; a polygon is a randomly rotated square
  (cube) cut by 1-3 random half-planes (half-spaces). Shapes are defined in
  physical units, so an anisotropic `spacing` squashes them in voxels.
* Background: grey level 100, a smooth random field (std 18), stripes along a
  random direction (amplitude 8) and pixel noise (std 12).
* Foreground classes are brighter or darker than the background (see
  `_CLASS_STYLES`) and carry their own texture, so a small U-Net separates them
  from context, not from a single threshold alone.
"""

import dataclasses
import math

import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

from unet_jax.data import cpu_tensorflow

_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}
_MAX_REDRAWS = 50

# Per foreground class: (shape kind, intensity offset, texture). Class c uses
# entry c - 1. The binary variant draws its kind at random for each shape.
_CLASS_STYLES = (
  ('ellipse', 70.0, 'speckle'),
  ('polygon', 50.0, 'stripes'),
  ('any', -55.0, 'speckle'),
)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Configuration of a synthetic segmentation data set.

  Attributes:
    shape: Spatial shape of every example, (H, W) or (D, H, W).
    num_classes: Classes in the masks, background included: 2 for binary,
      at most 4.
    foreground_fraction: Mean share of foreground pixels in an example.
    spacing: Physical voxel size per axis; None for isotropic unit spacing.
    num_train: Examples in the 'train' split.
    num_validation: Examples in the 'validation' split.
    num_test: Examples in the 'test' split.
    seed: Seed of the whole data set.
  """

  shape: tuple[int, ...] = (64, 64)
  num_classes: int = 2
  foreground_fraction: float = 0.05
  spacing: tuple[float, ...] | None = None
  num_train: int = 512
  num_validation: int = 64
  num_test: int = 64
  seed: int = 0


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
  """A uniformly random rotation matrix [ndim, ndim] (QR of a Gaussian)."""
  q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def _ball_volume(ndim: int) -> float:
  return math.pi ** (ndim / 2) / math.gamma(ndim / 2 + 1)


def _shape_mask(rng, kind, coords, centre, volume):
  """Boolean mask of one random shape of about `volume` physical units.

  Args:
    rng: numpy Generator.
    kind: 'ellipse' or 'polygon'.
    coords: Physical coordinates [ndim, *spatial].
    centre: Physical centre [ndim].
    volume: Target area (2D) or volume (3D) in physical units.

  Returns:
    bool [*spatial].
  """
  ndim = coords.shape[0]
  rotation = _random_rotation(rng, ndim)
  local = np.tensordot(rotation.T, coords - centre.reshape((ndim,) + (1,) * ndim), axes=1)
  if kind == 'ellipse':
    aspect = rng.uniform(0.6, 1.4, size=ndim)
    aspect = aspect / np.prod(aspect) ** (1 / ndim)
    radii = (volume / _ball_volume(ndim)) ** (1 / ndim) * aspect
    r2 = sum((local[d] / radii[d]) ** 2 for d in range(ndim))
    return r2 <= 1.0
  # A square (cube) of half-width h, cut by a few random half-spaces: a convex
  # polygon (polyhedron). The cuts remove about a quarter of its area.
  half = 0.5 * (volume / 0.75) ** (1 / ndim)
  mask = np.all(np.abs(local) <= half, axis=0)
  for _ in range(rng.integers(1, 4)):
    normal = rng.normal(size=ndim)
    normal /= np.linalg.norm(normal)
    offset = half * rng.uniform(0.55, 0.9)
    mask &= np.tensordot(normal, local, axes=1) <= offset
  return mask


def _smooth_noise(rng, shape, sigma):
  """Zero-mean, unit-std random field, smooth over `sigma` pixels."""
  field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma, mode='wrap')
  return (field - field.mean()) / (field.std() + 1e-8)


def _stripes(rng, coords, *, wavelength):
  """Sinusoidal stripes along a random direction, values in [-1, 1]."""
  ndim = coords.shape[0]
  direction = rng.normal(size=ndim)
  direction /= np.linalg.norm(direction)
  phase = rng.uniform(0, 2 * np.pi)
  return np.sin(2 * np.pi * np.tensordot(direction, coords, axes=1) / wavelength + phase)


def render_example(
  rng: np.random.Generator,
  *,
  shape: tuple[int, ...],
  num_classes: int,
  foreground_fraction: float,
  spacing: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Renders one synthetic image and its mask.

  Args:
    rng: numpy Generator; the only source of randomness.
    shape: Spatial shape, (H, W) or (D, H, W).
    num_classes: Classes including background, in [2, 4].
    foreground_fraction: Target mean share of foreground pixels, in (0, 1).
    spacing: Physical voxel size per axis; None for all ones.

  Returns:
    image: uint8 [*shape, 1].
    label: uint8 [*shape], class indices in [0, num_classes).
  """
  ndim = len(shape)
  if not 2 <= num_classes <= len(_CLASS_STYLES) + 1:
    raise ValueError(
      f'num_classes must be in [2, {len(_CLASS_STYLES) + 1}], got {num_classes}.'
    )
  if not 0 < foreground_fraction < 1:
    raise ValueError(f'foreground_fraction must be in (0, 1), got {foreground_fraction}.')
  spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, np.float64)
  if spacing.shape != (ndim,):
    raise ValueError(f'spacing {tuple(spacing)} does not match shape {shape}.')
  coords = np.stack(
    np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape, spacing)], indexing='ij')
  )
  extent = np.asarray(shape) * spacing

  label = _paint_label(
    rng, coords, extent, num_classes=num_classes, foreground_fraction=foreground_fraction
  )
  return _render_image(rng, label, coords, num_classes=num_classes), label


def _paint_label(
  rng: np.random.Generator,
  coords: np.ndarray,
  extent: np.ndarray,
  *,
  num_classes: int,
  foreground_fraction: float,
) -> np.ndarray:
  """Paints the shapes of every foreground class: uint8 [*spatial]."""
  shape = coords.shape[1:]
  ndim = len(shape)
  if num_classes == 2:
    classes = [1] * int(rng.integers(1, 4))
  else:
    extra_class = int(rng.integers(1, num_classes))
    classes = list(range(1, num_classes)) + [extra_class] * int(rng.integers(0, 2))
  total = foreground_fraction * float(np.prod(extent)) * rng.uniform(0.7, 1.3)
  shares = rng.uniform(0.7, 1.3, size=len(classes))
  shares = total * shares / shares.sum()

  label = np.zeros(shape, np.uint8)

  def paint(cls, volume):
    kind = _CLASS_STYLES[cls - 1][0] if num_classes > 2 else 'any'
    if kind == 'any':
      kind = ('ellipse', 'polygon')[int(rng.integers(2))]
    centre = rng.uniform(0.15, 0.85, size=ndim) * extent
    label[_shape_mask(rng, kind, coords, centre, volume)] = cls

  for cls, volume in zip(classes, shares):
    paint(cls, volume)
  # Every class is present in every example: a shape painted over entirely by a
  # later one is drawn again elsewhere (rare; other examples are unchanged).
  for cls, volume in zip(classes, shares):
    redraws = 0
    while not np.any(label == cls):
      if redraws == _MAX_REDRAWS:
        raise RuntimeError(f'class {cls} could not be placed in {redraws} redraws.')
      paint(cls, volume)
      redraws += 1
  return label


def _render_image(
  rng: np.random.Generator, label: np.ndarray, coords: np.ndarray, *, num_classes: int
) -> np.ndarray:
  """The image of a painted label map: uint8 [*spatial, 1]."""
  shape = label.shape
  image = 100.0 + 18.0 * _smooth_noise(rng, shape, sigma=max(shape) / 10)
  image += 8.0 * _stripes(rng, coords, wavelength=rng.uniform(6.0, 12.0))
  for cls in range(1, num_classes):
    inside = label == cls
    if not inside.any():
      continue
    _, offset, texture = _CLASS_STYLES[cls - 1]
    if texture == 'stripes':
      pattern = _stripes(rng, coords, wavelength=rng.uniform(3.0, 5.0))
    else:
      pattern = _smooth_noise(rng, shape, sigma=1.0)
    image[inside] += offset + 12.0 * pattern[inside]
  image += rng.normal(scale=12.0, size=shape)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image[..., None]


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared implementation of the two synthetic builders."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
    '1.0.0': 'Initial release.',
    '1.1.0': 'Every class occurs in every multi-class example.',
  }
  NDIM = 2

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if len(config.shape) != self.NDIM:
      raise ValueError(f'{self.name} needs a {self.NDIM}D shape, got {config.shape}.')
    features = {
      'image': tfds.features.Tensor(shape=tuple(config.shape) + (1,), dtype=np.uint8),
      'label': tfds.features.Tensor(shape=tuple(config.shape), dtype=np.uint8),
    }
    if self.NDIM == 3:
      features['spacing'] = tfds.features.Tensor(shape=(3,), dtype=np.float32)
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(
        num_classes=config.num_classes,
        num_channels=1,
        ndim=self.NDIM,
        min_shape=list(config.shape),
        max_shape=list(config.shape),
        spacing=None if config.spacing is None else list(config.spacing),
        foreground_fraction=config.foreground_fraction,
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cpu_tensorflow.import_tensorflow()  # TFDS writes with TensorFlow.
    config = self.builder_config
    sizes = {
      'train': config.num_train,
      'validation': config.num_validation,
      'test': config.num_test,
    }
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split, num_examples):
    config = self.builder_config
    for index in range(num_examples):
      rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
      image, label = render_example(
        rng,
        shape=tuple(config.shape),
        num_classes=config.num_classes,
        foreground_fraction=config.foreground_fraction,
        spacing=config.spacing,
      )
      example = {'image': image, 'label': label}
      if self.NDIM == 3:
        spacing = config.spacing or (1.0, 1.0, 1.0)
        example['spacing'] = np.asarray(spacing, np.float32)
      yield index, example


class SyntheticShapes(_SyntheticBuilder):
  """2D random ellipses and polygons on a noisy, textured background.

  Configs ('binary' is the default):
    binary: 64x64, 2 classes, ~5% foreground; 512 train / 64 validation /
      64 test. Builds in a few seconds.
    binary_balanced: as 'binary' with ~25% foreground.
    multiclass: 64x64, 4 classes: 1 bright ellipses, 2 bright striped
      polygons, 3 dark ellipses or polygons.
    tiny: 32x32, binary, 16 / 8 / 8 examples: for tests and smoke runs.

  Any other foreground fraction or size: pass
  `SyntheticConfig(name=..., foreground_fraction=...)` as `config=`.
  """

  NDIM = 2
  BUILDER_CONFIGS = [
    SyntheticConfig(name='binary', description='2 classes, ~5% foreground.'),
    SyntheticConfig(
      name='binary_balanced',
      foreground_fraction=0.25,
      description='2 classes, ~25% foreground.',
    ),
    SyntheticConfig(
      name='multiclass',
      num_classes=4,
      foreground_fraction=0.12,
      description='4 classes.',
    ),
    SyntheticConfig(
      name='tiny',
      shape=(32, 32),
      num_train=16,
      num_validation=8,
      num_test=8,
      description='For tests.',
    ),
  ]
  DEFAULT_CONFIG_NAME = 'binary'


class SyntheticVolumes(_SyntheticBuilder):
  """3D random ellipsoids and polyhedra on a noisy, textured background.

  Configs ('binary' is the default):
    binary: 32x64x64 (D, H, W), isotropic, 2 classes, ~5% foreground;
      64 train / 8 validation / 8 test.
    anisotropic: 16x64x64 with spacing (3, 1, 1): thick slices, as in CT.
    multiclass: 32x64x64, 4 classes (as `synthetic_shapes/multiclass`).
    tiny: 16x32x32, binary, 8 / 4 / 4 examples: for tests and smoke runs.
  """

  NDIM = 3
  BUILDER_CONFIGS = [
    SyntheticConfig(
      name='binary',
      shape=(32, 64, 64),
      num_train=64,
      num_validation=8,
      num_test=8,
      description='Isotropic.',
    ),
    SyntheticConfig(
      name='anisotropic',
      shape=(16, 64, 64),
      spacing=(3.0, 1.0, 1.0),
      num_train=64,
      num_validation=8,
      num_test=8,
      description='Spacing (3, 1, 1).',
    ),
    SyntheticConfig(
      name='multiclass',
      shape=(32, 64, 64),
      num_classes=4,
      foreground_fraction=0.12,
      num_train=64,
      num_validation=8,
      num_test=8,
      description='4 classes.',
    ),
    SyntheticConfig(
      name='tiny',
      shape=(16, 32, 32),
      num_train=8,
      num_validation=4,
      num_test=4,
      description='For tests.',
    ),
  ]
  DEFAULT_CONFIG_NAME = 'binary'
