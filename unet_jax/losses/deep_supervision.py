r"""Deep supervision: one loss over a network's main and auxiliary outputs.

A U-Net with deep supervision (nnU-Net) adds 1x1 heads to the decoder levels below the
top; each head's logits are compared with the labels subsampled to its resolution and
the terms are summed with weights that halve from level to level. This module knows
nothing of the network: `supervision_strides` takes the per-level pooling windows as
plain tuples (`unet_jax.models.level_shapes` gives them for a `UNet`).
"""

from collections.abc import Callable, Sequence
import math

import jax
import jax.numpy as jnp


def deep_supervision_loss(
  loss_fn: Callable[..., jax.Array],
  outputs,
  labels: jax.Array,
  *,
  strides: tuple[tuple[int, ...], ...],
) -> jax.Array:
  r"""The loss of a model's main and auxiliary outputs, weighted as nnU-Net does.

  .. math::
    L = \sum_i w_i \, L(\mathrm{logits}_i, \mathrm{labels}_i),\quad
    w_i = \frac{2^{-i}}{\sum_j 2^{-j}}

  where i = 0 is the full-resolution output and i >= 1 the auxiliary heads, each
  compared with the labels subsampled to its resolution (nearest neighbour: the
  pixel nearest the centre of each block, so ignored pixels stay ignored).

  Args:
    loss_fn: (logits, labels) -> scalar.
    outputs: logits [N, *spatial, C], or (logits, (aux_1, aux_2, ...)) from a
      UNet with `deep_supervision`.
    labels: [N, *spatial] integer classes.
    strides: for each auxiliary output, its downsampling factor per axis
      (`supervision_strides`).

  Returns:
    A scalar.

  References:
    Isensee et al., nnU-Net, Nature Methods 2021, https://arxiv.org/abs/1809.10486
    (deep supervision weights).
  """
  if not isinstance(outputs, tuple):
    return loss_fn(outputs, labels)
  logits, aux = outputs
  terms = [loss_fn(logits, labels)]
  for head, stride in zip(aux, strides):
    window = (slice(None),) + tuple(slice(s // 2, None, s) for s in stride)
    terms.append(loss_fn(head, labels[window]))
  weights = jnp.asarray([0.5**i for i in range(len(terms))])
  return jnp.sum(weights / weights.sum() * jnp.stack(terms))


def supervision_strides(
  pools: Sequence[Sequence[int]], *, num_heads: int
) -> tuple[tuple[int, ...], ...]:
  """The downsampling factor per axis of each auxiliary head.

  Head `l` (1 <= l <= `num_heads`) sits on the decoder level `l` poolings below the
  top, so its stride along each axis is the product of the first `l` pooling windows.

  Args:
    pools: the network's pooling window per level from the top, one tuple of
      `ndim` ints per level (`unet_jax.models.level_shapes(...)[1]`).
    num_heads: the number of auxiliary heads (the UNet's `deep_supervision`).

  Returns:
    `num_heads` tuples of `ndim` ints, e.g. `((2, 2), (4, 4))` for two heads of a
    network that pools by 2.
  """
  pools = tuple(tuple(int(p) for p in level) for level in pools)
  if not 0 <= num_heads <= len(pools):
    raise ValueError(
      f'num_heads={num_heads} must be in [0, {len(pools)}] (one head per pooling level).'
    )
  return tuple(
    tuple(math.prod(axis) for axis in zip(*pools[:level]))
    for level in range(1, num_heads + 1)
  )
