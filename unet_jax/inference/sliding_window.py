r"""Sliding-window prediction of whole 2D images and 3D volumes, patch by patch.

A network trained on patches predicts an image of any size by tiling it with
overlapping patches, predicting each, and blending the overlaps with a weight that
falls off towards the patch border, where the network sees the least context:

.. math::
  \hat y(v) = \frac{\sum_p w(v - o_p)\, f(x_p)(v - o_p)}{\sum_p w(v - o_p)}

for every pixel v, over the patches p at offsets o_p that contain v, with importance
map w (`gaussian_importance_map`, or 1 everywhere). Patch positions cover the image
exactly, the last one flush with the border (`patch_positions`); images smaller than
a patch are padded by mirroring (the overlap-tile strategy of the U-Net paper) and the
output is cropped back, so the result has the input's spatial shape.

    logits = sliding_window_predict(
        lambda x: model.apply(variables, x, train=False), volume,   # [D, H, W, C]
        patch_size=(64, 128, 128), overlap=0.5, divisor=16)           # [D, H, W, K]

References:
  O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical
  Image Segmentation", MICCAI 2015 (overlap-tile strategy, mirrored borders).
  F. Isensee et al., "nnU-Net: a self-configuring method for deep learning-based
  biomedical image segmentation", Nature Methods 18, 2021 (Gaussian importance
  weighting with sigma = patch / 8, mirroring test-time augmentation).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from unet_jax import config as config_lib

MODES = ('gaussian', 'constant')
PADDING_MODES = ('reflect', 'constant', 'edge')
OUTPUTS = ('logits', 'probabilities')


def _check_overlap(overlap: float) -> float:
  if not 0 <= overlap < 1:
    raise ValueError(
      f'overlap={overlap} must be in [0, 1): the fraction of a patch shared with its'
      ' neighbour.'
    )
  return float(overlap)


def axis_starts(size: int, patch: int, overlap: float) -> tuple[int, ...]:
  """Patch starts along one axis: every `patch * (1 - overlap)`, the last flush.

  The step is `max(1, floor(patch * (1 - overlap)))`; starts are `0, step, 2 step,
  ...` while the patch fits, then one last patch ends exactly at the border:
  `axis_starts(100, 64, 0.5) == (0, 32, 36)`.

  Args:
    size: the (padded) length of the axis, at least `patch`.
    patch: the patch length.
    overlap: in [0, 1).
  """
  overlap = _check_overlap(overlap)
  if patch > size:
    raise ValueError(
      f'A patch of {patch} does not fit an axis of {size}: pad the image first.'
    )
  step = max(1, math.floor(patch * (1 - overlap) + 1e-9))
  starts = list(range(0, size - patch + 1, step))
  if starts[-1] != size - patch:
    starts.append(size - patch)
  return tuple(starts)


def patch_positions(
  shape: Sequence[int], patch_size: int | Sequence[int], overlap: float
) -> list[tuple[int, ...]]:
  """Start offsets of every patch over `shape`, in row-major order.

  The Cartesian product of `axis_starts` over the axes: the patches cover every
  pixel, neighbours overlap by at least `overlap` of a patch, and the last patch on
  each axis is flush with the border.

  Args:
    shape: spatial shape (H, W) or (D, H, W), each at least the patch.
    patch_size: an int or one int per axis.
    overlap: in [0, 1).

  Returns:
    A list of `len(shape)`-tuples.
  """
  shape = tuple(int(s) for s in shape)
  patch = config_lib.per_axis(patch_size, len(shape), 'patch_size', of='the image')
  return list(
    itertools.product(*(axis_starts(s, p, overlap) for s, p in zip(shape, patch)))
  )


def gaussian_importance_map(
  patch_size: Sequence[int], *, sigma_scale: float = 1 / 8
) -> np.ndarray:
  r"""A separable Gaussian weight over a patch, peak 1 at the centre, never 0.

  .. math::
    w(v) = \prod_i \exp\Big(-\frac{(v_i - c_i)^2}{2 \sigma_i^2}\Big),\quad
    c_i = \frac{p_i - 1}{2},\quad \sigma_i = p_i \cdot \text{sigma\_scale}

  The centre is the patch's geometric centre, so the map is symmetric under every
  axis flip. nnU-Net builds the same map by Gaussian filtering of a delta at
  `p // 2`. Values below the smallest positive one are clipped to it, so no pixel gets
  weight 0 (which could leave a pixel with no weight at all): at sigma = p / 8 the
  border value is exp(-8) per axis, so this only matters if float32 underflows.

  Args:
    patch_size: the patch shape, e.g. (128, 128) or (64, 128, 128).
    sigma_scale: sigma as a fraction of the patch size (1/8 in nnU-Net).

  Returns:
    float32 array of shape `patch_size`.
  """
  patch = tuple(int(p) for p in patch_size)
  if not patch or min(patch) < 1 or not sigma_scale > 0:
    raise ValueError(
      f'patch_size={patch_size} must be positive and sigma_scale={sigma_scale} > 0.'
    )
  weight = np.ones((), np.float64)
  for axis, p in enumerate(patch):
    v = np.arange(p, dtype=np.float64) - (p - 1) / 2
    g = np.exp(-(v**2) / (2 * (p * sigma_scale) ** 2))
    weight = np.multiply.outer(weight, g) if axis else g
  weight = (weight / weight.max()).astype(np.float32)
  positive = weight[weight > 0]
  return np.maximum(weight, positive.min()).astype(np.float32)


def _flips(ndim: int) -> list[Callable[[jax.Array], jax.Array]]:
  """The 2**ndim axis flips of a [b, *spatial, c] batch (identity first)."""
  out = []
  for mask in itertools.product((False, True), repeat=ndim):
    axes = tuple(1 + a for a in range(ndim) if mask[a])
    out.append(functools.partial(jnp.flip, axis=axes) if axes else lambda t: t)
  return out


@functools.partial(jax.jit, static_argnames=('apply_fn', 'flip_tta'))
def _weighted_logits(patches, weight, *, apply_fn, flip_tta):
  """`weight * apply_fn(patches)` in float32, averaged over flips if `flip_tta`."""
  ndim = patches.ndim - 2

  def run(x):
    y = apply_fn(x)
    if y.ndim != x.ndim or y.shape[:-1] != x.shape[:-1]:
      raise ValueError(
        f'apply_fn must map patches {x.shape} to logits [{x.shape[0]},'
        f' {", ".join(map(str, x.shape[1:-1]))}, K]; it returned shape {y.shape}.'
      )
    return y.astype(jnp.float32)

  if not flip_tta:
    logits = run(patches)
  else:
    flips = _flips(ndim)
    out = jax.eval_shape(run, patches)

    def body(i, total):
      x = jax.lax.switch(i, flips, patches)
      return total + jax.lax.switch(i, flips, run(x))

    logits = jax.lax.fori_loop(0, len(flips), body, jnp.zeros(out.shape, out.dtype)) / len(
      flips
    )
  return logits * weight[None, ..., None]


def _host_weighted_logits(patches, weight, *, apply_fn, flip_tta):
  """As `_weighted_logits`, for an `apply_fn` that is compiled already (no tracing)."""
  ndim = patches.ndim - 2
  flips = [
    tuple(1 + a for a in range(ndim) if mask[a])
    for mask in itertools.product((False, True), repeat=ndim)
  ]
  total = None
  for axes in flips if flip_tta else [()]:
    x = np.flip(patches, axis=axes) if axes else patches
    y = np.asarray(apply_fn(x), np.float32)
    if y.ndim != x.ndim or y.shape[:-1] != x.shape[:-1]:
      raise ValueError(
        f'apply_fn must map patches {x.shape} to logits [{x.shape[0]},'
        f' {", ".join(map(str, x.shape[1:-1]))}, K]; it returned shape {y.shape}.'
      )
    y = np.flip(y, axis=axes) if axes else y
    total = y if total is None else total + y
  return total / (len(flips) if flip_tta else 1) * weight[None, ..., None]


def _check_arguments(
  apply_fn, image, patch_size, overlap, mode, batch_size, padding_mode, divisor, output
) -> tuple[np.ndarray, tuple[int, ...]]:
  """The image as an array and the patch size; a ValueError for any bad argument."""
  image = np.asarray(image)
  if image.ndim not in (3, 4):
    raise ValueError(
      f'image must be one [H, W, C] image or [D, H, W, C] volume, channels last;'
      f' got shape {image.shape} (rank {image.ndim}). Predict a batch one image at'
      ' a time.'
    )
  ndim = image.ndim - 1
  spatial = image.shape[:-1]
  if min(image.shape) < 1:
    raise ValueError(f'image has an empty axis: shape {image.shape}.')
  div = config_lib.per_axis(divisor, ndim, 'divisor', of='the image')
  if patch_size is None:
    patch = tuple(-(-s // d) * d for s, d in zip(spatial, div))
  else:
    patch = config_lib.per_axis(patch_size, ndim, 'patch_size', of='the image')
  for p, d in zip(patch, div):
    if p % d:
      raise ValueError(
        f'patch_size={patch} is not a multiple of divisor={div}: the network only'
        ' takes sizes that are multiples of the product of its pooling strides.'
      )
  _check_overlap(overlap)
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is not one of {MODES}.')
  if padding_mode not in PADDING_MODES:
    raise ValueError(f'padding_mode={padding_mode!r} is not one of {PADDING_MODES}.')
  if output not in OUTPUTS:
    raise ValueError(f'output={output!r} is not one of {OUTPUTS}.')
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} must be a positive integer.')
  if not callable(apply_fn):
    raise ValueError(f'apply_fn={apply_fn!r} is not callable.')

  return image, patch


def _pad_to_patch(
  image: np.ndarray, patch: tuple[int, ...], padding_mode: str
) -> tuple[np.ndarray, tuple[slice, ...]]:
  """The image in float32, padded up to a patch where it is smaller, and the crop back.

  The padding of each axis is split evenly, the odd pixel after. The crop, a tuple
  of slices, takes the input's pixels from an array of the padded shape.
  """
  spatial = image.shape[:-1]
  pads = [
    ((max(p - s, 0)) // 2, max(p - s, 0) - max(p - s, 0) // 2)
    for s, p in zip(spatial, patch)
  ]
  image = image.astype(np.float32, copy=False)
  if any(before or after for before, after in pads):
    image = np.pad(image, pads + [(0, 0)], mode=padding_mode)
  crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
  return image, crop


def _patch_predictor(apply_fn, weight: np.ndarray, *, flip_tta, jit_apply):
  """batch of patches -> weighted logits: jitted, or on the host for a compiled fn."""
  if jit_apply:
    return functools.partial(
      _weighted_logits,
      weight=jnp.asarray(weight),
      apply_fn=apply_fn,
      flip_tta=bool(flip_tta),
    )
  return functools.partial(
    _host_weighted_logits, weight=weight, apply_fn=apply_fn, flip_tta=bool(flip_tta)
  )


def _accumulate(predict, image, positions, patch, weight, batch_size, *, jit_apply):
  """The blended logits [*padded, K] over the (padded) image.

  The sum of every patch's weighted logits, divided in place by the sum of the weights.
  """
  padded = image.shape[:-1]
  out = None
  weight_sum = np.zeros(padded, np.float32)

  def add(pending):
    nonlocal out
    result, starts = pending
    result = np.asarray(result)
    if out is None:
      out = np.zeros(padded + result.shape[-1:], np.float32)
    for logits, start in zip(result, starts):
      window = tuple(slice(s, s + p) for s, p in zip(start, patch))
      out[window] += logits
      weight_sum[window] += weight

  pending = None
  for first in range(0, len(positions), batch_size):
    starts = positions[first : first + batch_size]
    # A fresh buffer each batch: on CPU the device array may alias it.
    batch = np.zeros((batch_size, *patch, image.shape[-1]), np.float32)
    for j, start in enumerate(starts):
      batch[j] = image[tuple(slice(s, s + p) for s, p in zip(start, patch))]
    result = predict(jnp.asarray(batch) if jit_apply else batch)  # asynchronous
    if pending is not None:
      add(pending)  # overlaps with the device's work
    pending = (result, starts)
  add(pending)
  out /= weight_sum[..., None]
  return out  # frees the weight sum: room for the softmax's temporaries


def _to_output(out: np.ndarray, output: str) -> np.ndarray:
  """The blended logits as `output` asks, in place: no more image-sized copies."""
  if output == 'probabilities':
    if out.shape[-1] == 1:
      scipy.special.expit(out, out=out)
    else:
      out -= out.max(axis=-1, keepdims=True)
      np.exp(out, out=out)
      out /= out.sum(axis=-1, keepdims=True)
  return np.ascontiguousarray(out, dtype=np.float32)


def sliding_window_predict(
  apply_fn: Callable[[jax.Array], jax.Array],
  image,
  *,
  patch_size: int | Sequence[int] | None,
  overlap: float = 0.5,
  mode: str = 'gaussian',
  batch_size: int = 4,
  flip_tta: bool = False,
  padding_mode: str = 'reflect',
  divisor: int | Sequence[int] = 1,
  output: str = 'logits',
  jit_apply: bool = True,
) -> np.ndarray:
  r"""Predicts one whole image or volume patch by patch, blending the overlaps.

  The image is padded where it is smaller than a patch (`padding_mode`, split evenly
  before and after), tiled by `patch_positions`, and the patches are run through
  `apply_fn` `batch_size` at a time by one jitted function (the last batch is padded
  with empty patches, so every batch has the same shape and nothing recompiles; the
  compiled function is cached on `apply_fn`, so pass the same function object for a
  whole data set). Each patch's logits are weighted by the importance map and added
  into one output buffer; a weight map of the image's size sums the weights; their
  quotient, cropped to the input's shape, is returned. Where one patch covers the
  whole image this is `apply_fn(image[None])[0]`.

  Memory: the image, the output and the weight map live on the host (numpy), as
  float32: about `4 * (C + K + 1)` bytes per (padded) pixel while blending, growing
  linearly with the image. When the image was padded, the output is cropped into a
  copy (`4 * K` bytes per pixel) after the weight map is freed, so the peak is the
  larger of the two phases (probabilities are computed in place). The device holds the
  importance map, two batches in flight (one computing while the host adds the
  previous one) and `apply_fn`'s activations for one batch: fixed by `batch_size`
  and `patch_size`, whatever the image size. A volume too large for the accelerator
  is therefore predicted as long as it fits in host memory. The compiled function is
  cached on `apply_fn`, which keeps it (and what it closes over) alive until
  `jax.clear_caches()`.

  Args:
    apply_fn: maps a float32 batch `[b, *patch_size, C]` to logits
      `[b, *patch_size, K]`, e.g. `lambda x: model.apply(variables, x, train=False)`.
      It must be a pure function of its input (it is traced under `jax.jit`).
    image: one image `[H, W, C]` or volume `[D, H, W, C]`, channels last (numpy or
      JAX array).
    patch_size: an int, one int per spatial axis, or None for one patch of the whole
      image (padded up to a multiple of `divisor`).
    overlap: fraction of a patch shared with its neighbour, in [0, 1).
    mode: 'gaussian' (`gaussian_importance_map`, sigma = patch / 8) or 'constant'
      (every pixel of a patch weighs 1).
    batch_size: patches per call of `apply_fn`.
    flip_tta: average the logits over all 2**ndim axis flips (4 in 2D, 8 in 3D), each
      prediction flipped back; costs 2**ndim forward passes a batch.
    padding_mode: `numpy.pad` mode for images smaller than a patch: 'reflect'
      (mirroring, the default), 'constant' (zeros) or 'edge'.
    divisor: an int or one per axis: what the network's input sizes must be
      multiples of (`models.input_divisor`); `patch_size` must respect it.
    output: 'logits', or 'probabilities': a softmax over K, or a sigmoid when K == 1,
      of the blended (and flip-averaged) logits, as nnU-Net does.
    jit_apply: trace `apply_fn` into the jitted weighting (the default). False for
      an `apply_fn` that is compiled already and takes and returns host arrays, such
      as the training runner's sharded prediction: it is then called as it is, once
      a batch (and flip), and the weighting is done on the host.

  Returns:
    float32 numpy array `[*image.shape[:-1], K]`.
  """
  image, patch = _check_arguments(
    apply_fn, image, patch_size, overlap, mode, batch_size, padding_mode, divisor, output
  )
  image, crop = _pad_to_patch(image, patch, padding_mode)
  positions = patch_positions(image.shape[:-1], patch, overlap)
  weight = (
    gaussian_importance_map(patch) if mode == 'gaussian' else np.ones(patch, np.float32)
  )
  predict = _patch_predictor(apply_fn, weight, flip_tta=flip_tta, jit_apply=jit_apply)
  out = _accumulate(
    predict, image, positions, patch, weight, batch_size, jit_apply=jit_apply
  )
  return _to_output(out[crop], output)
