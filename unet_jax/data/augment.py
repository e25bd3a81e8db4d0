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
  window (s > 1 zooms in, s < 1 out), with probability `config.scale_p`
  (nnU-Net: p 0.2 and (0.7, 1.4), a factor on its sampling grid, so its 1.4
  zooms out);
* rotation by any angle (`config.rotation_p`, angles ~ U(`config.rotation`)
  degrees): in the (H, W) plane in 2D; in 3D about each axis of
  `config.rotation_axes` (every axis when empty; (0,): about D only, the (H, W)
  plane, for anisotropic data), each with its own angle; positive angles turn
  the way `np.rot90` does. nnU-Net (`configure_rotation_dummyDA_mirroring_and_
  inital_patch_size`, `SpatialTransform(p_rotation=0.2)`): +-180 degrees in 2D
  (+-15 for patches over 1.5x longer one way), +-30 about each axis in 3D, and
  +-180 about D only when the patch is over 3x longer in plane than along D.
  Where the rotated window leaves the image, this module reflects the image and
  the mask (nnU-Net pads with zeros);
* elastic deformation (`config.elastic`, in pixels): the U-Net paper's
  augmentation. Displacements drawn from N(0, elastic^2) on a coarse grid of
  `config.elastic_grid` points per axis are interpolated smoothly
  (bicubic) to every pixel (Ronneberger et al., 2015, Sec. 3.1);
* intensity jitter (`config.intensity` = a): per channel,
  x -> x * (1 + u) + v with u, v ~ U(-a, a), image only.

Then nnU-Net v2's intensity transforms, image only, in its order, each with its
probability per example (`*_p`; nnU-Net's `get_training_transforms` in
nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py and the batchgeneratorsv2
transforms it builds; the option ranges default to the values given there):

* Gaussian noise (`noise_p`, nnU-Net 0.1): x + n, n ~ N(0, sd^2) with
  sd ~ U(`noise_std`) = U(0, 0.1); one noise field for every channel.
  (batchgeneratorsv2's `GaussianNoiseTransform` calls the range
  `noise_variance` but draws with it as the standard deviation.)
* Gaussian blur (`blur_p`, 0.2): each channel with probability
  `blur_channel_p` (0.5), separable, with sigma ~ U(`blur_sigma`) = U(0.5, 1)
  drawn per axis and channel; the kernel reaches 3 sigma_max (nnU-Net: truncate
  6, i.e. a width of about 6 sigma) and the border is mirrored (`reflect`).
* Multiplicative brightness (`brightness_p`, 0.15): x * m per channel,
  m from `brightness` = (0.75, 1.25).
* Contrast (`contrast_p`, 0.15): per channel, (x - mean) * f + mean, clipped to
  the channel's original [min, max] (`preserve_range=True`), f from `contrast`.
* Low resolution (`lowres_p`, 0.25): each channel with probability
  `lowres_channel_p` (0.5) is downsampled by f ~ U(`lowres`) = U(0.5, 1) along
  the axes of `lowres_axes` (every axis when empty; nnU-Net leaves out D of
  anisotropic data) to round(n f) pixels (nearest, torch's 'nearest-exact'),
  then upsampled back linearly (torch's 'linear' with align_corners=False, as
  batchgeneratorsv2 does; nnU-Net v1 upsampled cubically). The random size is
  computed with gathers, so shapes stay static.
* Gamma of the inverted image (`gamma_inverted_p`, 0.1), then gamma
  (`gamma_p`, 0.3): per channel, x is rescaled to [0, 1], raised to g and
  rescaled back, then shifted and scaled to keep its mean and standard
  deviation (`p_retain_stats=1`); the inverted variant does this to -x.

Each multiplier, factor and exponent above (brightness, contrast, gamma) is
drawn as nnU-Net's `BGContrast` draws it: when its range straddles 1, half of
the draws from U(min, 1) and half from U(1, max), so shrinking and growing are
equally likely.

All geometric transforms are composed into one map from output to input
coordinates, sampled once: linearly for the image, at the nearest pixel for the
mask, both reflecting at the border (`d c b a | a b c d | d c b a`). Flips and
90-degree rotations map pixels to pixels exactly, so they never blur; the mask
is only ever moved, never blended, so its values (an ignore value too) survive.
Outputs have the input shapes and dtypes. Works for 2D [N, H, W, C] and 3D
[N, D, H, W, C].

Cost: it runs inside the jitted train step, on the device, so it needs no
host work or transfer besides the batch itself; its share of the step is
measured in benchmarks/RESULTS.md ("Input pipeline", and for nnU-Net's full
set "Augmentation: nnU-Net's full set"). Under `vmap` a transform drawn with
probability p is computed for every example and kept where drawn
(`jnp.where`), so its cost does not fall with p.
"""

import functools
import itertools
import math

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


def _rotate(
  key: jax.Array, coords: list[jax.Array], spatial, opts: config_lib.AugmentOptions
) -> list[jax.Array]:
  """`coords` rotated about the centre, with probability `opts.rotation_p`.

  2D: in the (H, W) plane. 3D: about each axis of `opts.rotation_axes` (every
  axis when empty), one angle each, applied in turn. An angle of +90 degrees
  maps a square image as `np.rot90(image, 1)` does.
  """
  k_p, k_angle = jax.random.split(key)
  if len(spatial) == 2:
    planes = [(0, 1)]
  else:
    planes = [
      tuple(a for a in range(3) if a != about) for about in opts.rotation_axes or (0, 1, 2)
    ]
  lo, hi = (math.radians(a) for a in opts.rotation)
  angles = jax.random.uniform(k_angle, (len(planes),), minval=lo, maxval=hi)
  centre = [(s - 1) / 2 for s in spatial]
  rel = [c - m for c, m in zip(coords, centre)]
  for (i, j), angle in zip(planes, angles):
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # The input pixel that a rotation by `angle` moves to output (.., i, .., j, ..).
    rel[i], rel[j] = cos * rel[i] + sin * rel[j], cos * rel[j] - sin * rel[i]
  do = jax.random.bernoulli(k_p, opts.rotation_p)
  return [jnp.where(do, r + m, c) for r, m, c in zip(rel, centre, coords)]


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
  if (lo, hi) != (1.0, 1.0) and opts.scale_p > 0:
    scale = jax.random.uniform(k_scale, (), minval=lo, maxval=hi)
    size = jnp.asarray(spatial, jnp.float32)
    slack = size - size / scale  # > 0 zooming in, < 0 zooming out.
    offset = jnp.minimum(slack, 0) + jax.random.uniform(k_offset, (ndim,)) * jnp.abs(slack)
    scaled = [offset[d] + (c + 0.5) / scale - 0.5 for d, c in enumerate(coords)]
    if opts.scale_p < 1:
      do = jax.random.bernoulli(jax.random.fold_in(k_scale, 1), opts.scale_p)
      scaled = [jnp.where(do, s, c) for s, c in zip(scaled, coords)]
    coords = scaled
  if opts.rotation_p > 0:
    coords = _rotate(jax.random.fold_in(k_rot, 1), coords, spatial, opts)
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


# ---------------------------------------------------------------------------
# nnU-Net's intensity transforms: x [*spatial, C] of one example, image only.


def _factor(key: jax.Array, bounds: tuple[float, float], shape) -> jax.Array:
  """Draws from `bounds` as nnU-Net's `BGContrast` does: when the range straddles
  1, half of the draws from U(min, 1), half from U(1, max)."""
  lo, hi = bounds
  if not lo < 1 < hi:
    return jax.random.uniform(key, shape, minval=lo, maxval=hi)
  k_side, k_below, k_above = jax.random.split(key, 3)
  below = jax.random.uniform(k_below, shape, minval=lo, maxval=1.0)
  above = jax.random.uniform(k_above, shape, minval=1.0, maxval=hi)
  return jnp.where(jax.random.bernoulli(k_side, 0.5, shape), below, above)


def _noise(key, x, opts):
  k_p, k_std, k_noise = jax.random.split(key, 3)
  lo, hi = opts.noise_std
  std = jax.random.uniform(k_std, (), minval=lo, maxval=hi)
  noise = std * jax.random.normal(k_noise, x.shape[:-1] + (1,))
  return jnp.where(jax.random.bernoulli(k_p, opts.noise_p), x + noise.astype(x.dtype), x)


def _blur(key, x, opts):
  k_p, k_channel, k_sigma = jax.random.split(key, 3)
  ndim, channels = x.ndim - 1, x.shape[-1]
  radius = max(1, math.ceil(3 * opts.blur_sigma[1]))
  lo, hi = opts.blur_sigma
  sigma = jax.random.uniform(k_sigma, (ndim, channels), minval=lo, maxval=hi)
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)[:, None]
  out = x
  for axis in range(ndim):
    weights = jnp.exp(-0.5 * (taps / sigma[axis]) ** 2)
    weights = (weights / weights.sum(0)).astype(x.dtype)  # [2 radius + 1, C]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(out, pad, mode='reflect')
    n = x.shape[axis]
    out = sum(
      weights[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
      for k in range(2 * radius + 1)
    )
  channel = jax.random.bernoulli(k_channel, opts.blur_channel_p, (channels,))
  return jnp.where(jax.random.bernoulli(k_p, opts.blur_p) & channel, out, x)


def _brightness(key, x, opts):
  k_p, k_factor = jax.random.split(key)
  factor = _factor(k_factor, opts.brightness, (x.shape[-1],)).astype(x.dtype)
  return jnp.where(jax.random.bernoulli(k_p, opts.brightness_p), x * factor, x)


def _contrast(key, x, opts):
  k_p, k_factor = jax.random.split(key)
  axes = tuple(range(x.ndim - 1))
  mean, low, high = x.mean(axes), x.min(axes), x.max(axes)
  factor = _factor(k_factor, opts.contrast, (x.shape[-1],)).astype(x.dtype)
  out = jnp.clip((x - mean) * factor + mean, low, high)
  return jnp.where(jax.random.bernoulli(k_p, opts.contrast_p), out, x)


def _lowres_channel(x: jax.Array, factor: jax.Array, axes) -> jax.Array:
  """x [*spatial] down to round(n factor) pixels (nearest) and back (linear) along
  `axes`, as torch's interpolate ('nearest-exact', then 'linear' with
  align_corners=False) does, with static shapes."""
  for axis in axes:
    n = x.shape[axis]
    m = jnp.maximum(jnp.round(n * factor), 1.0)  # The low resolution's size.
    i = jnp.arange(n, dtype=jnp.float32)
    u = jnp.maximum((i + 0.5) * m / n - 0.5, 0.0)  # Low-res coordinate of output i.
    lower = jnp.floor(u)
    frac = u - lower
    upper = jnp.minimum(lower + 1, m - 1)

    def source(j, n=n, m=m):  # The input pixel 'nearest-exact' gives low-res pixel j.
      return jnp.minimum(jnp.floor((j + 0.5) * n / m), n - 1).astype(jnp.int32)

    shape = [1] * x.ndim
    shape[axis] = n
    frac = frac.reshape(shape).astype(x.dtype)
    x = (1 - frac) * jnp.take(x, source(lower), axis=axis) + frac * jnp.take(
      x, source(upper), axis=axis
    )
  return x


def _lowres(key, x, opts):
  k_p, k_channel, k_factor = jax.random.split(key, 3)
  channels = x.shape[-1]
  axes = opts.lowres_axes or range(x.ndim - 1)
  axes = [a for a in axes if a < x.ndim - 1]
  lo, hi = opts.lowres
  factor = jax.random.uniform(k_factor, (channels,), minval=lo, maxval=hi)
  out = jax.vmap(
    functools.partial(_lowres_channel, axes=axes), in_axes=(-1, 0), out_axes=-1
  )(x, factor)
  channel = jax.random.bernoulli(k_channel, opts.lowres_channel_p, (channels,))
  return jnp.where(jax.random.bernoulli(k_p, opts.lowres_p) & channel, out, x)


def _gamma(key, x, opts, *, p: float, invert: bool):
  k_p, k_gamma = jax.random.split(key)
  axes = tuple(range(x.ndim - 1))
  y = -x if invert else x
  mean, std = y.mean(axes), y.std(axes)
  low = y.min(axes)
  span = y.max(axes) - low
  gamma = _factor(k_gamma, opts.gamma, (x.shape[-1],)).astype(x.dtype)
  y = ((y - low) / jnp.maximum(span, 1e-7)) ** gamma * span + low
  y = (y - y.mean(axes)) * (std / jnp.maximum(y.std(axes), 1e-7)) + mean
  y = -y if invert else y
  return jnp.where(jax.random.bernoulli(k_p, p), y, x)


def _intensity(key: jax.Array, x: jax.Array, opts: config_lib.AugmentOptions) -> jax.Array:
  """nnU-Net's intensity transforms, in its order; those with probability 0 are
  left out of the computation."""
  steps = [
    (opts.noise_p, _noise),
    (opts.blur_p, _blur),
    (opts.brightness_p, _brightness),
    (opts.contrast_p, _contrast),
    (opts.lowres_p, _lowres),
    (
      opts.gamma_inverted_p,
      functools.partial(_gamma, p=opts.gamma_inverted_p, invert=True),
    ),
    (opts.gamma_p, functools.partial(_gamma, p=opts.gamma_p, invert=False)),
  ]
  for tag, (p, transform) in enumerate(steps):
    if p > 0:
      x = transform(jax.random.fold_in(key, tag), x, opts)
  return x


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
  image = _intensity(jax.random.fold_in(k_intensity, 1), image, opts)
  return image, label


def augment(
  key: jax.Array, image: jax.Array, label: jax.Array, *, config
) -> tuple[jax.Array, jax.Array]:
  """Randomly augments a batch, one independent transform per example.

  Args:
    key: A `jax.random.key`.
    image: float [N, *spatial, C], spatial = (H, W) or (D, H, W).
    label: int [N, *spatial], class indices.
    config: `config_lib.AugmentOptions`, or `config.augment` (read into them).

  Returns:
    (image, label) with the input shapes and dtypes; the same geometric
    transform moved each image (linear interpolation) and its mask (nearest);
    the intensity transforms changed the image only.

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
