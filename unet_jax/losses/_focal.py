"""The focal loss: cross-entropy that down-weights the pixels already right."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unet_jax.losses import _common


def _modulating_factor(base: jax.Array, gamma: Any) -> jax.Array:
  """base ** gamma for base >= 0, with finite gradients where base == 0."""
  positive = base > 0
  safe_base = jnp.where(positive, base, 1.0)
  at_zero = jnp.where(jnp.asarray(gamma) == 0, 1.0, 0.0)
  return jnp.where(positive, safe_base**gamma, at_zero)


def _softmax_focal(
  logits: jax.Array, targets: jax.Array, mask: jax.Array, *, gamma: Any, alpha: Any
) -> tuple[jax.Array, jax.Array]:
  """Per-pixel softmax focal losses [N, *spatial] and their weights (the mask)."""
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  one_minus_p = -jnp.expm1(log_probs)
  losses = -_modulating_factor(one_minus_p, gamma) * targets * log_probs
  if alpha is not None:
    alpha = jnp.asarray(alpha, logits.dtype)
    if alpha.ndim == 0:
      alpha = jnp.concatenate([(1.0 - alpha)[None], jnp.full((num_classes - 1,), alpha)])
    if alpha.shape != (num_classes,):
      raise ValueError(
        f'alpha must be a scalar or have shape [{num_classes}], got {alpha.shape}.'
      )
    losses = alpha * losses
  return jnp.sum(losses, axis=-1), mask[..., 0]


def _sigmoid_focal(
  logits: jax.Array, targets: jax.Array, mask: jax.Array, *, gamma: Any, alpha: Any
) -> tuple[jax.Array, jax.Array]:
  """Per-element sigmoid focal losses [N, *spatial, C] and their weights."""
  num_classes = logits.shape[-1]
  one_minus_p_t = targets * jax.nn.sigmoid(-logits) + (1.0 - targets) * jax.nn.sigmoid(
    logits
  )
  losses = _modulating_factor(one_minus_p_t, gamma) * optax.sigmoid_binary_cross_entropy(
    logits, targets
  )
  if alpha is not None:
    alpha = jnp.asarray(alpha, logits.dtype)
    if alpha.ndim not in (0, 1) or alpha.size not in (1, num_classes):
      raise ValueError(
        f'alpha must be a scalar or have shape [{num_classes}], got {alpha.shape}.'
      )
    losses = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * losses
  return losses, jnp.broadcast_to(mask, losses.shape)


def _check_alpha(alpha: Any, activation: str) -> None:
  """A ValueError for a concrete `alpha` out of range (see `focal_loss`)."""
  if alpha is None or _common.is_traced(alpha):
    return
  if activation == 'sigmoid' or np.ndim(alpha) == 0:
    # 1 - alpha weighs the background (softmax) or the negatives (sigmoid).
    _common.check_unit_interval(alpha=alpha)
  else:
    _common.check_nonnegative(alpha=alpha)


@_common.empty_batch_gives_zero
def focal_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  gamma: float = 2.0,
  alpha: Any = None,
  activation: str = 'softmax',
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  r"""Focal loss (Lin et al.): cross-entropy that down-weights easy pixels.

  With `p_t` the probability given to the target:

  .. math::
    l = -\alpha_t \, (1 - p_t)^\gamma \log p_t

  * `activation='softmax'`: per pixel, `l = -sum_c alpha_c * t_c *
    (1 - p_c) ** gamma * log p_c` (one term for a one-hot target), averaged
    over pixels. A scalar `alpha` gives `1 - alpha` to class 0
    (background) and `alpha` to the others (MONAI's convention); a [C] array
    gives one factor per class.
  * `activation='sigmoid'`: per element (pixel and channel), with
    `alpha_t = alpha * y + (1 - alpha) * (1 - y)`, averaged over elements.

  `gamma = 0` and `alpha=None` give plain cross-entropy. `log p` comes
  from `log_softmax` / `log_sigmoid` and `1 - p` is taken without
  cancellation, so the loss and its gradient stay finite for extreme logits
  and any `gamma >= 0`.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    gamma: focusing parameter, >= 0.
    alpha: optional class balance: a scalar in [0, 1] or a [C] array of
      factors >= 0 (each in [0, 1] with `activation='sigmoid'`).
    activation: 'softmax' (mutually exclusive classes, C >= 2) or 'sigmoid'
      (independent channels).
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N], each example's mean over pixels (softmax) or elements
    (sigmoid). 'mean': [], the mean over the whole batch. 'sum': [], the sum
    of the 'none' values.

  References:
    Lin et al., Focal Loss for Dense Object Detection, ICCV 2017,
    https://arxiv.org/abs/1708.02002.
  """
  _common.check_options(reduction=reduction, activation=activation)
  _common.check_nonnegative(gamma=gamma)
  _check_alpha(alpha, activation)
  _common.check_inputs(logits, labels, activation=activation, ignore_index=ignore_index)
  logits = _common.upcast(logits)
  targets, mask = _common.targets_and_mask(
    logits, labels, activation=activation, ignore_index=ignore_index
  )
  focal = _softmax_focal if activation == 'softmax' else _sigmoid_focal
  losses, weights = focal(logits, targets, mask, gamma=gamma, alpha=alpha)
  return _common.reduce_pixels(losses * weights, weights, reduction)
