"""Data augmentation for segmentation, in JAX, run inside the jitted train step.

`augment(key, image, label, config=options)` draws one random transform per
example and applies it to the image and its mask alike; `options` is a
`config_lib.AugmentOptions` (or `config.augment`, read into one; the defaults
are on its fields):

* flips along every spatial axis (`config.flip`), or only along the axes
  `config.flip_axes` names (e.g. (1, 2): not along D of a [D, H, W] volume);
* 90-degree rotations in the last two spatial axes, the (H, W) plane, when
  they are of equal size (`config.rot90`);
* random scale and crop: zoom by s ~ U(`config.scale`) around a random
  window (s > 1 zooms in, s < 1 out);
* elastic deformation (`config.elastic`, in pixels): the U-Net paper's
  augmentation. Displacements drawn from N(0, elastic^2) on a coarse grid of
  `config.elastic_grid` points per axis are interpolated smoothly
  (bicubic) to every pixel (Ronneberger et al., 2015, Sec. 3.1);
* intensity jitter (`config.intensity` = a): per channel,
  x -> x * (1 + u) + v with u, v ~ U(-a, a), image only.

All geometric transforms are composed into one map from output to input
coordinates, sampled once: linearly for the image, at the nearest pixel for the
mask, both reflecting at the border (`d c b a | a b c d | d c b a`). Flips and
rotations map pixels to pixels exactly, so they never blur. Outputs have the
input shapes and dtypes. Works for 2D [N, H, W, C] and 3D [N, D, H, W, C].

Cost: it runs inside the jitted train step, on the device, so it needs no
host work or transfer besides the batch itself; its share of the step is
measured in benchmarks/RESULTS.md ("Input pipeline").
"""

import functools
import itertools

import jax
import jax.numpy as jnp

from unet_jax import config as config_lib


def _reflect(index: jax.Array, size: int) -> jax.Array:
  """Maps integer indices into [0, size) by half-sample symmetric reflection."""
  index = jnp.mod(index, 2 * size)
  return jnp.where(index >= size, 2 * size - 1 - index, index)


def _sample_linear(x: jax.Array, coords: list[jax.Array]) -> jax.Array:
  """Samples x [*spatial, C] at fractional coords (one [*spatial] array per axis)."""
  spatial = x.shape[:-1]
  lower = [jnp.floor(c) for c in coords]
  frac = [c - lo for c, lo in zip(coords, lower)]
  lower = [lo.astype(jnp.int32) for lo in lower]
  out = jnp.zeros(coords[0].shape + x.shape[-1:], x.dtype)
  for corner in itertools.product((0, 1), repeat=len(spatial)):
    index = tuple(_reflect(lo + o, s) for lo, o, s in zip(lower, corner, spatial))
    weight = functools.reduce(
      jnp.multiply, [f if o else 1 - f for f, o in zip(frac, corner)]
    )
    out = out + weight[..., None].astype(x.dtype) * x[index]
  return out


def _sample_nearest(x: jax.Array, coords: list[jax.Array]) -> jax.Array:
  """Samples x [*spatial, ...] at the pixel nearest to each coordinate."""
  index = tuple(
    _reflect(jnp.round(c).astype(jnp.int32), s) for c, s in zip(coords, x.shape)
  )
  return x[index]


def _coordinates(
  key: jax.Array, spatial: tuple[int, ...], opts: config_lib.AugmentOptions
) -> list[jax.Array]:
  """Input coordinates of every output pixel under one random transform."""
  ndim = len(spatial)
  k_flip, k_rot, k_scale, k_offset, k_elastic = jax.random.split(key, 5)
  coords = list(
    jnp.meshgrid(*[jnp.arange(s, dtype=jnp.float32) for s in spatial], indexing='ij')
  )
  if opts.elastic > 0:
    grid = opts.elastic_grid
    coarse = opts.elastic * jax.random.normal(k_elastic, (ndim,) + (grid,) * ndim)
    field = jax.image.resize(coarse, (ndim,) + spatial, method='cubic')
    coords = [c + field[d] for d, c in enumerate(coords)]
  lo, hi = opts.scale
  if (lo, hi) != (1.0, 1.0):
    scale = jax.random.uniform(k_scale, (), minval=lo, maxval=hi)
    size = jnp.asarray(spatial, jnp.float32)
    slack = size - size / scale  # > 0 zooming in, < 0 zooming out.
    offset = jnp.minimum(slack, 0) + jax.random.uniform(k_offset, (ndim,)) * jnp.abs(slack)
    coords = [offset[d] + (c + 0.5) / scale - 0.5 for d, c in enumerate(coords)]
  if opts.rot90 and ndim >= 2 and spatial[-1] == spatial[-2]:
    last = spatial[-1] - 1.0
    y, x = coords[-2], coords[-1]
    k = jax.random.randint(k_rot, (), 0, 4)
    # The input pixel that np.rot90(input, k) moves to output (y, x).
    coords[-2] = jnp.select([k == 0, k == 1, k == 2], [y, x, last - y], last - x)
    coords[-1] = jnp.select([k == 0, k == 1, k == 2], [x, last - y, last - x], y)
  if opts.flip:
    flips = jax.random.bernoulli(k_flip, 0.5, (ndim,))
    axes = opts.flip_axes or range(ndim)
    coords = [
      jnp.where(flips[d], spatial[d] - 1.0 - c, c) if d in axes else c
      for d, c in enumerate(coords)
    ]
  return coords


def _augment_one(key, image, label, *, opts):
  k_geometry, k_intensity = jax.random.split(key)
  if opts.geometric:
    coords = _coordinates(k_geometry, label.shape, opts)
    image = _sample_linear(image, coords)
    label = _sample_nearest(label, coords)
  if opts.intensity > 0:
    a = opts.intensity
    gain, shift = jax.random.uniform(k_intensity, (2, image.shape[-1]), minval=-a, maxval=a)
    image = image * (1 + gain).astype(image.dtype) + shift.astype(image.dtype)
  return image, label


def augment(
  key: jax.Array, image: jax.Array, label: jax.Array, *, config
) -> tuple[jax.Array, jax.Array]:
  """Randomly augments a batch, one independent transform per example.

  Args:
    key: A `jax.random.key`.
    image: float [N, *spatial, C], spatial = (H, W) or (D, H, W).
    label: int [N, *spatial], class indices.
    config: `config_lib.AugmentOptions`, or `config.augment` (read into them):
      flip, flip_axes, rot90, scale, intensity, elastic, elastic_grid.

  Returns:
    (image, label) with the input shapes and dtypes; the same geometric
    transform moved each image (linear interpolation) and its mask (nearest).

  Raises:
    ValueError: if shapes disagree or the config is out of range (at trace
      time).
  """
  if image.ndim not in (4, 5) or label.shape != image.shape[:-1]:
    raise ValueError(
      'augment expects image [N, *spatial, C] and label [N, *spatial] with 2 or 3'
      f' spatial axes, got {image.shape} and {label.shape}.'
    )
  opts = config_lib.AugmentOptions.from_config(config)
  keys = jax.random.split(key, image.shape[0])
  return jax.vmap(functools.partial(_augment_one, opts=opts))(keys, image, label)
