"""2x linear upsampling with half-pixel centres as a fixed stencil.

`jax.image.resize(x, shape, method='linear')` builds, for every resized axis, a dense
[in, out] matrix of interpolation weights and contracts the image with it; in the
train step its gradient is the transposed contraction. For a factor of exactly 2 the
weights are fixed: with half-pixel centres (PyTorch's `align_corners=False`) output
`2i` is `0.75 x[i] + 0.25 x[i - 1]` and output `2i + 1` is `0.75 x[i] + 0.25 x[i + 1]`,
the neighbour clamped at the edges (there both `jax.image.resize`, which renormalises
the weights inside the image, and PyTorch give `x[0]` and `x[n - 1]`). `upsample_2x`
computes that with slices and elementwise arithmetic, which XLA fuses, forward and
backward; it is the same function as `jax.image.resize` to float rounding
(tests/resize_test.py). `policy.KernelPolicy.upsample_as_stencil` chooses it.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp


def suits(factors: Sequence[int]) -> bool:
  """Whether `upsample_2x` computes this resize: every factor 1 or 2."""
  return all(f in (1, 2) for f in factors)


def _double(x: jax.Array, axis: int) -> jax.Array:
  n = x.shape[axis]
  first = lax.slice_in_dim(x, 0, 1, axis=axis)
  last = lax.slice_in_dim(x, n - 1, n, axis=axis)
  before = jnp.concatenate([first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
  after = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis), last], axis)
  even = 0.75 * x + 0.25 * before
  odd = 0.75 * x + 0.25 * after
  y = jnp.stack([even, odd], axis=axis + 1)
  return y.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1 :])


def upsample_2x(x: jax.Array, factors: Sequence[int]) -> jax.Array:
  """`x` `[N, *spatial, C]` linearly upsampled by `factors` (each 1 or 2) per spatial
  axis, half-pixel centres: `jax.image.resize(x, ..., method='linear')`.

  Raises:
    ValueError: a factor other than 1 or 2, or one factor per spatial axis missing.
  """
  factors = tuple(factors)
  if len(factors) != x.ndim - 2 or not suits(factors):
    raise ValueError(
      f'upsample_2x takes a factor of 1 or 2 for each of the {x.ndim - 2} spatial axes'
      f' of x {x.shape}; got {factors}.'
    )
  for axis, factor in enumerate(factors, start=1):
    if factor == 2:
      x = _double(x, axis)
  return x
