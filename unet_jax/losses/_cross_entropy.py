"""Pixel-averaged cross-entropies: sigmoid (binary, multi-label) and softmax."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from unet_jax.losses import _common


@_common.empty_batch_gives_zero
def binary_cross_entropy_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  r"""Sigmoid binary cross-entropy, averaged over elements.

  For each element (pixel and channel), with `x` the logit and `y` the
  target in `[0, 1]`:

  .. math::
    l = -\big(y \log \sigma(x) + (1 - y) \log(1 - \sigma(x))\big)

  computed as `-(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))`, exact and
  finite for any logit. The loss is the mean of `l` over the elements of the
  non-ignored pixels. Channels are independent (binary or multi-label).

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map (`C == 1`: the target is
      `labels == 1`; `C > 1`: `one_hot(labels, C)`) or [N, *spatial, C]
      float target in `[0, 1]`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N], the mean over each example's elements. 'mean': [], the mean
    over all elements of the batch. 'sum': [], the sum of the 'none' values.

  References:
    L_BCE of the U-Net course text; `optax.sigmoid_binary_cross_entropy`.
  """
  _common.check_options(reduction=reduction)
  _common.check_inputs(logits, labels, activation='sigmoid', ignore_index=ignore_index)
  logits = _common.upcast(logits)
  targets, mask = _common.targets_and_mask(
    logits, labels, activation='sigmoid', ignore_index=ignore_index
  )
  losses = optax.sigmoid_binary_cross_entropy(logits, targets)
  weights = jnp.broadcast_to(mask, losses.shape)
  return _common.reduce_pixels(losses * weights, weights, reduction)


@_common.empty_batch_gives_zero
def cross_entropy_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  label_smoothing: float = 0.0,
  class_weights: Any = None,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  r"""Softmax cross-entropy, averaged over pixels (PyTorch/MONAI semantics).

  For each pixel, with `t` the target over the `C` classes, the smoothed
  target `q = (1 - label_smoothing) * t + label_smoothing / C` and the
  class weights `w` (all ones by default):

  .. math::
    l = -\sum_c w_c \, q_c \log \mathrm{softmax}(x)_c

  The mean is weighted: `sum_i l_i / sum_i sum_c w_c * t_ic` over the
  non-ignored pixels `i`, which for integer labels is `torch`'s
  `CrossEntropyLoss(weight=w, label_smoothing=...)`. `log_softmax` uses
  log-sum-exp, so extreme logits give finite values.

  Args:
    logits: [N, *spatial, C] float, C >= 2.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float one-hot
      or soft target.
    label_smoothing: in [0, 1]; mixes the target with the uniform one.
    class_weights: optional [C] non-negative weights, one per class.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N], each example's weighted pixel mean. 'mean': [], the weighted
    mean over all pixels of the batch. 'sum': [], the sum of the 'none'
    values.

  References:
    Szegedy et al., Rethinking the Inception Architecture for Computer Vision
    (label smoothing), CVPR 2016, https://arxiv.org/abs/1512.00567.
  """
  _common.check_options(reduction=reduction)
  _common.check_unit_interval(label_smoothing=label_smoothing)
  _common.check_nonnegative(class_weights=class_weights)
  _common.check_inputs(logits, labels, activation='softmax', ignore_index=ignore_index)
  logits = _common.upcast(logits)
  num_classes = logits.shape[-1]
  targets, mask = _common.targets_and_mask(
    logits, labels, activation='softmax', ignore_index=ignore_index
  )
  smoothed = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  mask = mask[..., 0]
  if class_weights is None:
    losses = -jnp.sum(smoothed * log_probs, axis=-1)
    weights = mask
  else:
    class_weights = jnp.asarray(class_weights, logits.dtype)
    if class_weights.shape != (num_classes,):
      raise ValueError(
        f'class_weights must have shape [{num_classes}], got {class_weights.shape}.'
      )
    losses = -jnp.sum(class_weights * smoothed * log_probs, axis=-1)
    weights = jnp.sum(class_weights * targets, axis=-1) * mask
  return _common.reduce_pixels(losses * mask, weights, reduction)
