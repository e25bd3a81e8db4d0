"""Segmentation losses: pure `jax.numpy` functions of logits and labels.

Every loss here has the signature::

  loss_fn(logits, labels, *, ...options..., ignore_index=None,
          reduction='mean') -> jax.Array

and shares these conventions.

Shapes:

* ``logits``: ``[N, *spatial, C]``, channels-last: ``[N, H, W, C]`` in 2D,
  ``[N, D, H, W, C]`` in 3D (any number of spatial axes works). Losses are
  computed in at least float32 (bfloat16 logits are upcast).
* ``labels``: either an integer (or bool) class map of shape
  ``logits.shape[:-1]``, or a float one-hot / soft target of shape
  ``logits.shape``.

From integer labels to targets:

* ``activation='softmax'``: the target is ``one_hot(labels, C)``. Softmax needs
  ``C >= 2``: a softmax over one channel is constant.
* ``activation='sigmoid'``: channels are independent (binary or multi-label).
  With ``C == 1`` the target is ``labels == 1`` as a single channel (binary
  segmentation with one logit); with ``C > 1`` it is ``one_hot(labels, C)``.
* Labels outside ``[0, C)`` that are not ``ignore_index`` give all-zero target
  rows. Use ``ignore_index`` to leave such pixels out.

``ignore_index`` (integer labels only): pixels whose label equals it contribute
nothing to any loss, so the loss equals the loss computed on the other pixels
alone and the gradient at ignored pixels is exactly zero. The value may lie
outside ``[0, C)`` (e.g. 255): such pixels are masked before one-hot encoding.

``reduction``:

* ``'none'``: shape ``[N]``, one value per example.
* ``'mean'``: a scalar. Region losses (Dice, Tversky, generalized Dice): the
  mean of the per-example values. Pixel-averaged losses (BCE, CE, focal): the
  mean over all non-ignored pixels of the batch, which equals the mean of the
  per-example values when no pixel is ignored.
* ``'sum'``: a scalar, the sum of the per-example values.

With ``batch=True`` a region loss sums over the batch and spatial axes
together, so there is one value for the whole batch: ``'mean'`` and ``'sum'``
both return it and ``'none'`` raises a ValueError.

All functions are pure and safe under `jax.jit`, `jax.grad` and `jax.vmap`:
shapes are checked at trace time and nothing branches in Python on array
values. Sigmoid and softmax are taken from logits in stable form (log-sigmoid,
log-sum-exp), so logits of +-1e4 give finite losses and gradients. String and
bool options are static: bind them with `functools.partial` before `jax.jit`.

Where they come from. The project follows a U-Net course handout (a lab text
on semantic segmentation; "the U-Net course text" below) that names BCE, Dice,
their sum and a focal variant; MONAI's losses fix the options and their
semantics, and `benchmarks/monai_parity.py` checks the values against MONAI.

Why not `optax.losses.dice_loss`: it has no ``ignore_index``, which training
needs (padding and "don't care" pixels must not count), and none of MONAI's
options (``include_background``, ``squared_pred``, ``jaccard``, ``batch``,
the smoothing terms), so it could not match MONAI's values.

Example::

  loss_fn = functools.partial(losses.dice_ce_loss, include_background=False)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(logits, labels)
"""

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

_REDUCTIONS = ('mean', 'sum', 'none')
_ACTIVATIONS = ('softmax', 'sigmoid')
_GDL_WEIGHTS = ('square', 'simple', 'uniform')

# -----------------------------------------------------------------------------
# Shared helpers.
# -----------------------------------------------------------------------------


def _check_options(
  *,
  reduction: str,
  activation: str | None = None,
  batch: bool = False,
) -> None:
  if reduction not in _REDUCTIONS:
    raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}.')
  if activation is not None and activation not in _ACTIVATIONS:
    raise ValueError(f'activation must be one of {_ACTIVATIONS}, got {activation!r}.')
  if batch and reduction == 'none':
    raise ValueError(
      "reduction='none' gives one value per example, which batch=True does "
      "not have; use reduction='mean' or batch=False."
    )


def _is_class_map(logits: jax.Array, labels: jax.Array) -> bool:
  return labels.ndim == logits.ndim - 1


def _check_inputs(
  logits: jax.Array,
  labels: jax.Array,
  *,
  activation: str,
  ignore_index: int | None,
) -> None:
  """Trace-time checks of shapes and dtypes; raises ValueError."""
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  try:
    chex.assert_type(logits, float)
  except AssertionError as e:
    raise ValueError(f'logits must be floating point, got {logits.dtype}.') from e
  if logits.ndim < 3:
    raise ValueError(
      'logits must be [N, *spatial, C] with at least one spatial axis, got '
      f'shape {logits.shape}.'
    )
  try:
    if _is_class_map(logits, labels):
      chex.assert_shape(labels, logits.shape[:-1])
      if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
        raise AssertionError('a class map must have an integer dtype')
    else:
      chex.assert_equal_shape([logits, labels])
      chex.assert_type(labels, float)
  except AssertionError as e:
    raise ValueError(
      f'labels must be an integer class map of shape {logits.shape[:-1]} or '
      f'a float target of shape {logits.shape}; got {labels.dtype} '
      f'{labels.shape}.'
    ) from e
  if ignore_index is not None and not _is_class_map(logits, labels):
    raise ValueError(
      'ignore_index needs an integer class map of shape '
      f'{logits.shape[:-1]}; got float labels of shape {labels.shape}.'
    )
  if activation == 'softmax' and logits.shape[-1] < 2:
    raise ValueError(
      'A softmax over a single channel is constant. For binary segmentation '
      "with one logit use activation='sigmoid' (or a sigmoid-based loss); "
      'otherwise give the model C >= 2 output channels.'
    )


def _upcast(logits: jax.Array) -> jax.Array:
  logits = jnp.asarray(logits)
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _targets_and_mask(
  logits: jax.Array,
  labels: jax.Array,
  *,
  activation: str,
  ignore_index: int | None,
) -> tuple[jax.Array, jax.Array]:
  """Float targets [N, *spatial, C] and a validity mask [N, *spatial, 1].

  Ignored pixels have an all-zero target and a zero mask.
  """
  num_classes = logits.shape[-1]
  dtype = logits.dtype
  labels = jnp.asarray(labels)
  if not _is_class_map(logits, labels):
    mask = jnp.ones(logits.shape[:-1] + (1,), dtype)
    return labels.astype(dtype), mask
  labels = labels.astype(jnp.int32)
  if ignore_index is None:
    valid = jnp.ones(labels.shape, jnp.bool_)
  else:
    valid = labels != ignore_index
    # Mask first, so an ignored value >= C is never one-hot encoded.
    labels = jnp.where(valid, labels, 0)
  mask = valid[..., None].astype(dtype)
  if activation == 'sigmoid' and num_classes == 1:
    targets = (labels == 1)[..., None].astype(dtype)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  return targets * mask, mask


def _probabilities(logits: jax.Array, activation: str) -> jax.Array:
  if activation == 'softmax':
    return jax.nn.softmax(logits, axis=-1)
  return jax.nn.sigmoid(logits)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 where the denominator is 0."""
  positive = denominator > 0
  safe = jnp.where(positive, denominator, 1.0)
  return jnp.where(positive, numerator / safe, 0.0)


def _reduce_pixels(
  weighted_losses: jax.Array, weights: jax.Array, reduction: str
) -> jax.Array:
  """Reduces weighted per-pixel (or per-element) losses, [N, ...]."""
  axes = tuple(range(1, weighted_losses.ndim))
  numerators = jnp.sum(weighted_losses, axis=axes)
  denominators = jnp.sum(weights, axis=axes)
  if reduction == 'mean':
    return _safe_divide(jnp.sum(numerators), jnp.sum(denominators))
  per_example = _safe_divide(numerators, denominators)
  if reduction == 'sum':
    return jnp.sum(per_example)
  return per_example


def _reduce_examples(per_example: jax.Array, reduction: str) -> jax.Array:
  """Reduces per-example losses [N] (or one batch-level scalar)."""
  if per_example.ndim == 0 or reduction == 'none':
    return per_example
  if reduction == 'mean':
    return jnp.mean(per_example)
  return jnp.sum(per_example)


def _region_inputs(
  logits: jax.Array,
  labels: jax.Array,
  *,
  activation: str,
  include_background: bool,
  ignore_index: int | None,
) -> tuple[jax.Array, jax.Array]:
  """Masked probabilities and targets [N, *spatial, C'] for region losses."""
  logits = _upcast(logits)
  targets, mask = _targets_and_mask(
    logits, labels, activation=activation, ignore_index=ignore_index
  )
  probs = _probabilities(logits, activation) * mask
  if not include_background and logits.shape[-1] > 1:
    probs, targets = probs[..., 1:], targets[..., 1:]
  return probs, targets


def _region_sum(x: jax.Array, *, batch: bool) -> jax.Array:
  """Sums over the spatial axes ([N, C]), or batch and spatial axes ([C])."""
  axes = tuple(range(0 if batch else 1, x.ndim - 1))
  return jnp.sum(x, axis=axes)


def _dice_class_weights(class_weights: Any, num_classes: int, num_kept: int) -> jax.Array:
  """Weights for the channels a region loss keeps, shape [C']."""
  weights = jnp.asarray(class_weights, jnp.float32)
  if weights.ndim == 1 and weights.shape[0] == num_classes:
    return weights[num_classes - num_kept :]
  if weights.ndim == 1 and weights.shape[0] == num_kept:
    return weights
  raise ValueError(
    f'class_weights must have shape [{num_classes}] (one per channel) or, '
    f'with include_background=False, [{num_kept}]; got {weights.shape}.'
  )


def _modulating_factor(base: jax.Array, gamma: Any) -> jax.Array:
  """base ** gamma for base >= 0, with finite gradients where base == 0."""
  positive = base > 0
  safe_base = jnp.where(positive, base, 1.0)
  at_zero = jnp.where(jnp.asarray(gamma) == 0, 1.0, 0.0)
  return jnp.where(positive, safe_base**gamma, at_zero)


# -----------------------------------------------------------------------------
# Pixel-averaged losses.
# -----------------------------------------------------------------------------


def binary_cross_entropy_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Sigmoid binary cross-entropy, averaged over elements.

  For each element (pixel and channel), with ``x`` the logit and ``y`` the
  target in ``[0, 1]``::

    l = -(y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x)))

  computed as ``-(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))``, exact and
  finite for any logit. The loss is the mean of ``l`` over the elements of the
  non-ignored pixels. Channels are independent (binary or multi-label).

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map (``C == 1``: the target is
      ``labels == 1``; ``C > 1``: ``one_hot(labels, C)``) or [N, *spatial, C]
      float target in ``[0, 1]``.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N], the mean over each example's elements. 'mean': [], the mean
    over all elements of the batch. 'sum': [], the sum of the 'none' values.

  References:
    L_BCE of the U-Net course text; `optax.sigmoid_binary_cross_entropy`.
  """
  _check_options(reduction=reduction)
  _check_inputs(logits, labels, activation='sigmoid', ignore_index=ignore_index)
  logits = _upcast(logits)
  targets, mask = _targets_and_mask(
    logits, labels, activation='sigmoid', ignore_index=ignore_index
  )
  losses = optax.sigmoid_binary_cross_entropy(logits, targets)
  weights = jnp.broadcast_to(mask, losses.shape)
  return _reduce_pixels(losses * weights, weights, reduction)


def cross_entropy_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  label_smoothing: float = 0.0,
  class_weights: Any = None,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Softmax cross-entropy, averaged over pixels (PyTorch/MONAI semantics).

  For each pixel, with ``t`` the target over the ``C`` classes, the smoothed
  target ``q = (1 - label_smoothing) * t + label_smoothing / C`` and the
  class weights ``w`` (all ones by default)::

    l = -sum_c w_c * q_c * log_softmax(x)_c

  The mean is weighted: ``sum_i l_i / sum_i sum_c w_c * t_ic`` over the
  non-ignored pixels ``i``, which for integer labels is ``torch``'s
  ``CrossEntropyLoss(weight=w, label_smoothing=...)``. ``log_softmax`` uses
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
  _check_options(reduction=reduction)
  _check_inputs(logits, labels, activation='softmax', ignore_index=ignore_index)
  logits = _upcast(logits)
  num_classes = logits.shape[-1]
  targets, mask = _targets_and_mask(
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
  return _reduce_pixels(losses * mask, weights, reduction)


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
  """Focal loss (Lin et al.): cross-entropy that down-weights easy pixels.

  With ``p_t`` the probability given to the target::

    l = -alpha_t * (1 - p_t) ** gamma * log(p_t)

  * ``activation='softmax'``: per pixel, ``l = -sum_c alpha_c * t_c *
    (1 - p_c) ** gamma * log p_c`` (one term for a one-hot target), averaged
    over pixels. A scalar ``alpha`` gives ``1 - alpha`` to class 0
    (background) and ``alpha`` to the others (MONAI's convention); a [C] array
    gives one factor per class.
  * ``activation='sigmoid'``: per element (pixel and channel), with
    ``alpha_t = alpha * y + (1 - alpha) * (1 - y)``, averaged over elements.

  ``gamma = 0`` and ``alpha=None`` give plain cross-entropy. ``log p`` comes
  from ``log_softmax`` / ``log_sigmoid`` and ``1 - p`` is taken without
  cancellation, so the loss and its gradient stay finite for extreme logits
  and any ``gamma >= 0``.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    gamma: focusing parameter, >= 0.
    alpha: optional class balance: a scalar in [0, 1] or a [C] array.
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
  _check_options(reduction=reduction, activation=activation)
  _check_inputs(logits, labels, activation=activation, ignore_index=ignore_index)
  logits = _upcast(logits)
  num_classes = logits.shape[-1]
  targets, mask = _targets_and_mask(
    logits, labels, activation=activation, ignore_index=ignore_index
  )
  if activation == 'softmax':
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
    losses = jnp.sum(losses, axis=-1)
    weights = mask[..., 0]
  else:
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
    weights = jnp.broadcast_to(mask, losses.shape)
  return _reduce_pixels(losses * weights, weights, reduction)


# -----------------------------------------------------------------------------
# Region (overlap) losses.
# -----------------------------------------------------------------------------


def dice_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  activation: str = 'softmax',
  include_background: bool = True,
  squared_pred: bool = False,
  jaccard: bool = False,
  batch: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  class_weights: Any = None,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Soft Dice (or Jaccard) loss, with MONAI ``DiceLoss`` semantics.

  With ``p`` the softmax or sigmoid of ``logits`` and ``g`` the target, for
  each example and class (sums over the spatial axes; over the batch and
  spatial axes together when ``batch=True``)::

    I = sum(p * g),  P = sum(p),  G = sum(g)
    dice:     L_c = 1 - (2 * I + smooth_nr) / (P + G + smooth_dr)
    jaccard:  L_c = 1 - (2 * I + smooth_nr) / (2 * (P + G - I) + smooth_dr)

  ``squared_pred=True`` uses ``P = sum(p ** 2)`` and ``G = sum(g ** 2)``. The
  loss of an example is ``mean_c(w_c * L_c)`` over the classes kept
  (``w_c = 1`` without ``class_weights``). Perfect overlap gives about 0 and
  disjoint masks about 1; a class absent from both prediction and target
  gives ``1 - smooth_nr / smooth_dr`` (0 with the defaults).

  For the same options the values agree with MONAI's
  ``DiceLoss(sigmoid=..., softmax=..., to_onehot_y=..., ...)`` with
  ``reduction='mean'`` (MONAI's 'sum' and 'none' keep the class axis; here
  they sum or keep per-example class means). With one channel
  (``C == 1``, sigmoid) ``include_background`` has no effect: that channel is
  the foreground.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    activation: 'softmax' (mutually exclusive classes, C >= 2) or 'sigmoid'
      (independent channels, binary or multi-label).
    include_background: if False, channel 0 is left out (after the softmax).
    squared_pred: square p and g in the denominator.
    jaccard: the Jaccard (soft IoU) form instead of Dice.
    batch: sum over the batch too, giving one value for the whole batch.
    smooth_nr: added to the numerator.
    smooth_dr: added to the denominator.
    class_weights: optional non-negative weights, [C] (the background's is
      dropped when ``include_background=False``) or, as in MONAI, [C - 1]
      when ``include_background=False``.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': []. With ``batch=True``: [] ('none' raises
    a ValueError).

  References:
    Milletari et al., V-Net, 3DV 2016, https://arxiv.org/abs/1606.04797;
    MONAI ``monai.losses.DiceLoss``.
  """
  _check_options(reduction=reduction, activation=activation, batch=batch)
  _check_inputs(logits, labels, activation=activation, ignore_index=ignore_index)
  probs, targets = _region_inputs(
    logits,
    labels,
    activation=activation,
    include_background=include_background,
    ignore_index=ignore_index,
  )
  intersection = _region_sum(probs * targets, batch=batch)
  if squared_pred:
    pred_o = _region_sum(probs * probs, batch=batch)
    ground_o = _region_sum(targets * targets, batch=batch)
  else:
    pred_o = _region_sum(probs, batch=batch)
    ground_o = _region_sum(targets, batch=batch)
  denominator = pred_o + ground_o
  if jaccard:
    denominator = 2.0 * (denominator - intersection)
  per_class = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
  if class_weights is not None:
    per_class = per_class * _dice_class_weights(
      class_weights, logits.shape[-1], probs.shape[-1]
    )
  return _reduce_examples(jnp.mean(per_class, axis=-1), reduction)


def tversky_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  alpha: float = 0.5,
  beta: float = 0.5,
  activation: str = 'softmax',
  include_background: bool = True,
  batch: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Tversky loss, with MONAI ``TverskyLoss`` semantics.

  For each example and class (sums over the spatial axes; also over the batch
  when ``batch=True``)::

    TP = sum(p * g),  FP = sum(p * (1 - g)),  FN = sum((1 - p) * g)
    L_c = 1 - (TP + smooth_nr) / (TP + alpha * FP + beta * FN + smooth_dr)

  The loss of an example is the mean of ``L_c`` over the classes kept.
  ``alpha = beta = 0.5`` is the Dice loss (up to smoothing) and
  ``alpha = beta = 1`` the Jaccard loss; ``beta > alpha`` penalises missed
  foreground more than false alarms.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    alpha: weight of the false positives.
    beta: weight of the false negatives.
    activation: 'softmax' (C >= 2) or 'sigmoid'.
    include_background: if False, channel 0 is left out (after the softmax).
    batch: sum over the batch too, giving one value for the whole batch.
    smooth_nr: added to the numerator.
    smooth_dr: added to the denominator.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': []. With ``batch=True``: [].

  References:
    Salehi et al., Tversky loss function for image segmentation using 3D
    fully convolutional deep networks, MLMI 2017,
    https://arxiv.org/abs/1706.05721; MONAI ``monai.losses.TverskyLoss``.
  """
  _check_options(reduction=reduction, activation=activation, batch=batch)
  _check_inputs(logits, labels, activation=activation, ignore_index=ignore_index)
  probs, targets = _region_inputs(
    logits,
    labels,
    activation=activation,
    include_background=include_background,
    ignore_index=ignore_index,
  )
  tp = _region_sum(probs * targets, batch=batch)
  fp = _region_sum(probs * (1.0 - targets), batch=batch)
  fn = _region_sum((1.0 - probs) * targets, batch=batch)
  per_class = 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
  return _reduce_examples(jnp.mean(per_class, axis=-1), reduction)


def generalized_dice_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  w_type: str = 'square',
  activation: str = 'softmax',
  include_background: bool = True,
  batch: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Generalized Dice loss (Sudre et al.), with MONAI semantics.

  Per example (or for the batch when ``batch=True``), with class weights
  from the target volume ``G_c = sum(g_c)``::

    w_c = 1 / G_c ** 2 ('square'),  1 / G_c ('simple'),  1 ('uniform')
    L = 1 - (2 * sum_c w_c * sum(p_c * g_c) + smooth_nr)
            / (sum_c w_c * (sum(p_c) + sum(g_c)) + smooth_dr)

  A class absent from the target (``G_c = 0``) gets the largest weight of
  the present classes, as in MONAI. Rare classes weigh as much as common
  ones, which suits highly unbalanced segmentation.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    w_type: 'square', 'simple' or 'uniform'.
    activation: 'softmax' (C >= 2) or 'sigmoid'.
    include_background: if False, channel 0 is left out (after the softmax).
    batch: sum over the batch too, giving one value for the whole batch.
    smooth_nr: added to the numerator.
    smooth_dr: added to the denominator.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': []. With ``batch=True``: [].

  References:
    Sudre et al., Generalised Dice overlap as a deep learning loss function
    for highly unbalanced segmentations, DLMIA 2017,
    https://arxiv.org/abs/1707.03237; MONAI
    ``monai.losses.GeneralizedDiceLoss``.
  """
  _check_options(reduction=reduction, activation=activation, batch=batch)
  if w_type not in _GDL_WEIGHTS:
    raise ValueError(f'w_type must be one of {_GDL_WEIGHTS}, got {w_type!r}.')
  _check_inputs(logits, labels, activation=activation, ignore_index=ignore_index)
  probs, targets = _region_inputs(
    logits,
    labels,
    activation=activation,
    include_background=include_background,
    ignore_index=ignore_index,
  )
  intersection = _region_sum(probs * targets, batch=batch)
  pred_o = _region_sum(probs, batch=batch)
  ground_o = _region_sum(targets, batch=batch)
  if w_type == 'uniform':
    weights = jnp.ones_like(ground_o)
  else:
    volume = ground_o**2 if w_type == 'square' else ground_o
    present = volume > 0
    weights = jnp.where(present, 1.0 / jnp.where(present, volume, 1.0), 0.0)
    largest = jnp.max(weights, axis=-1, keepdims=True)
    weights = jnp.where(present, weights, largest)
  numerator = 2.0 * jnp.sum(weights * intersection, axis=-1) + smooth_nr
  denominator = jnp.sum(weights * (pred_o + ground_o), axis=-1) + smooth_dr
  return _reduce_examples(1.0 - numerator / denominator, reduction)


# -----------------------------------------------------------------------------
# Combined losses.
# -----------------------------------------------------------------------------


def dice_bce_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  lambda_dice: float = 1.0,
  lambda_bce: float = 1.0,
  include_background: bool = True,
  squared_pred: bool = False,
  jaccard: bool = False,
  batch: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Sigmoid Dice + binary cross-entropy, the standard combined loss.

  ::

    L = lambda_dice * L_Dice + lambda_bce * L_BCE

  with ``L_Dice`` = `dice_loss` (``activation='sigmoid'``) and ``L_BCE`` =
  `binary_cross_entropy_loss`, each reduced as ``reduction`` says. Dice
  handles class imbalance, BCE gives dense per-pixel gradients. For binary
  segmentation use one logit per pixel (``C == 1``) and integer labels in
  {0, 1}; ``C > 1`` is multi-label.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    lambda_dice: weight of the Dice term.
    lambda_bce: weight of the BCE term.
    include_background: as in `dice_loss` (Dice term only).
    squared_pred: as in `dice_loss`.
    jaccard: as in `dice_loss`.
    batch: as in `dice_loss`.
    smooth_nr: as in `dice_loss`.
    smooth_dr: as in `dice_loss`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': [].

  References:
    The "Combined Loss" of the U-Net course text; MONAI
    ``DiceCELoss(sigmoid=True)`` for one channel.
  """
  dice = dice_loss(
    logits,
    labels,
    activation='sigmoid',
    include_background=include_background,
    squared_pred=squared_pred,
    jaccard=jaccard,
    batch=batch,
    smooth_nr=smooth_nr,
    smooth_dr=smooth_dr,
    ignore_index=ignore_index,
    reduction=reduction,
  )
  bce = binary_cross_entropy_loss(
    logits, labels, ignore_index=ignore_index, reduction=reduction
  )
  return lambda_dice * dice + lambda_bce * bce


def dice_ce_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  lambda_dice: float = 1.0,
  lambda_ce: float = 1.0,
  include_background: bool = True,
  squared_pred: bool = False,
  jaccard: bool = False,
  batch: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  class_weights: Any = None,
  label_smoothing: float = 0.0,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Softmax Dice + cross-entropy, with MONAI ``DiceCELoss`` semantics.

  ::

    L = lambda_dice * L_Dice + lambda_ce * L_CE

  with ``L_Dice`` = `dice_loss` (``activation='softmax'``) and ``L_CE`` =
  `cross_entropy_loss` (the mean over pixels). ``include_background`` and
  the Dice options act on the Dice term only; ``class_weights`` ([C]) weigh
  both terms, the background's weight being dropped from the Dice term when
  ``include_background=False``, as in MONAI.

  Args:
    logits: [N, *spatial, C] float, C >= 2.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    lambda_dice: weight of the Dice term.
    lambda_ce: weight of the cross-entropy term.
    include_background: as in `dice_loss` (Dice term only).
    squared_pred: as in `dice_loss`.
    jaccard: as in `dice_loss`.
    batch: as in `dice_loss`.
    smooth_nr: as in `dice_loss`.
    smooth_dr: as in `dice_loss`.
    class_weights: optional [C] non-negative class weights.
    label_smoothing: as in `cross_entropy_loss`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': [].

  References:
    Isensee et al., nnU-Net, Nature Methods 2021,
    https://arxiv.org/abs/1809.10486; MONAI ``monai.losses.DiceCELoss``.
  """
  dice = dice_loss(
    logits,
    labels,
    activation='softmax',
    include_background=include_background,
    squared_pred=squared_pred,
    jaccard=jaccard,
    batch=batch,
    smooth_nr=smooth_nr,
    smooth_dr=smooth_dr,
    class_weights=class_weights,
    ignore_index=ignore_index,
    reduction=reduction,
  )
  ce = cross_entropy_loss(
    logits,
    labels,
    label_smoothing=label_smoothing,
    class_weights=class_weights,
    ignore_index=ignore_index,
    reduction=reduction,
  )
  return lambda_dice * dice + lambda_ce * ce


def focal_dice_loss(
  logits: jax.Array,
  labels: jax.Array,
  *,
  gamma: float = 2.0,
  alpha: Any = None,
  activation: str = 'softmax',
  lambda_dice: float = 1.0,
  lambda_focal: float = 1.0,
  include_background: bool = True,
  squared_pred: bool = False,
  jaccard: bool = False,
  batch: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  ignore_index: int | None = None,
  reduction: str = 'mean',
) -> jax.Array:
  """Focal Dice: Dice plus a focal term (AnatomyNet's Dice + focal loss).

  ::

    L = lambda_dice * L_Dice + lambda_focal * L_Focal

  with ``L_Dice`` = `dice_loss` and ``L_Focal`` = `focal_loss`, both with
  the same ``activation``. The focal term's factor ``(1 - p_t) ** gamma``
  nearly removes the pixels the model already gets right with confidence,
  which in segmentation are mostly background, so the dense gradient goes to
  the hard pixels (usually missed foreground), while the Dice term keeps the
  loss normalised by the foreground size. ``gamma = 0`` gives Dice + CE
  (softmax) or Dice + BCE (sigmoid).

  Zhu et al. use ``L_Dice`` in Tversky form; with their alpha = beta = 0.5
  it is the Dice loss used here. This is also the structure of MONAI's
  ``DiceFocalLoss`` (whose focal term is additionally divided by C).

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    gamma: as in `focal_loss`.
    alpha: as in `focal_loss`.
    activation: 'softmax' (C >= 2) or 'sigmoid'.
    lambda_dice: weight of the Dice term.
    lambda_focal: weight of the focal term.
    include_background: as in `dice_loss` (Dice term only).
    squared_pred: as in `dice_loss`.
    jaccard: as in `dice_loss`.
    batch: as in `dice_loss`.
    smooth_nr: as in `dice_loss`.
    smooth_dr: as in `dice_loss`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': [].

  References:
    Zhu et al., AnatomyNet: Deep learning for fast and fully automated
    whole-volume segmentation of head and neck anatomy, Medical Physics
    46(2), 2019, https://arxiv.org/abs/1808.05238; Lin et al., ICCV 2017.
  """
  dice = dice_loss(
    logits,
    labels,
    activation=activation,
    include_background=include_background,
    squared_pred=squared_pred,
    jaccard=jaccard,
    batch=batch,
    smooth_nr=smooth_nr,
    smooth_dr=smooth_dr,
    ignore_index=ignore_index,
    reduction=reduction,
  )
  focal = focal_loss(
    logits,
    labels,
    gamma=gamma,
    alpha=alpha,
    activation=activation,
    ignore_index=ignore_index,
    reduction=reduction,
  )
  return lambda_dice * dice + lambda_focal * focal


# -----------------------------------------------------------------------------
# Registry.
# -----------------------------------------------------------------------------

LossFn = Callable[..., jax.Array]

LOSSES: dict[str, LossFn] = {
  'dice_bce': dice_bce_loss,
  'dice_ce': dice_ce_loss,
  'dice': dice_loss,
  'bce': binary_cross_entropy_loss,
  'ce': cross_entropy_loss,
  'focal': focal_loss,
  'focal_dice': focal_dice_loss,
  'tversky': tversky_loss,
  'generalized_dice': generalized_dice_loss,
}


def get_loss(name: str) -> LossFn:
  """The loss registered as ``name`` in `LOSSES`, for configs.

  Args:
    name: one of the keys of `LOSSES`.

  Returns:
    The loss function; call it as ``fn(logits, labels, **options)``.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(
      f'Unknown loss {name!r}; valid names: {", ".join(sorted(LOSSES))}.'
    ) from None
