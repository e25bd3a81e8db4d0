"""Region (overlap) losses: Dice and Jaccard, Tversky, generalized Dice."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.losses import _common

_GDL_WEIGHTS = ('square', 'simple', 'uniform')


def _region_inputs(
  logits: jax.Array,
  labels: jax.Array,
  *,
  activation: str,
  include_background: bool,
  ignore_index: int | None,
) -> tuple[jax.Array, jax.Array]:
  """Masked probabilities and targets [N, *spatial, C'] for region losses.

  Checks the inputs first (`_common.check_inputs`): a ValueError for bad ones.
  """
  _common.check_inputs(logits, labels, activation=activation, ignore_index=ignore_index)
  logits = _common.upcast(logits)
  targets, mask = _common.targets_and_mask(
    logits, labels, activation=activation, ignore_index=ignore_index
  )
  probs = _common.probabilities(logits, activation) * mask
  if not include_background and logits.shape[-1] > 1:
    probs, targets = probs[..., 1:], targets[..., 1:]
  return probs, targets


def _region_sum(x: jax.Array, *, batch: bool) -> jax.Array:
  """Sums over the spatial axes ([N, C]), or batch and spatial axes ([C])."""
  axes = tuple(range(0 if batch else 1, x.ndim - 1))
  return jnp.sum(x, axis=axes)


def _dice_overlap(
  probs: jax.Array, targets: jax.Array, *, squared_pred: bool, jaccard: bool, batch: bool
) -> tuple[jax.Array, jax.Array]:
  """The Dice (or Jaccard) intersection `I` and denominator, [N, C'] (or [C'])."""
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
  return intersection, denominator


def _weigh_classes(per_class: jax.Array, class_weights: Any, num_classes: int) -> jax.Array:
  """Per-class losses [..., C'] times the weights of the channels kept (if any)."""
  if class_weights is None:
    return per_class
  num_kept = per_class.shape[-1]
  weights = jnp.asarray(class_weights, jnp.float32)
  if weights.ndim == 1 and weights.shape[0] == num_classes:
    return per_class * weights[num_classes - num_kept :]
  if weights.ndim == 1 and weights.shape[0] == num_kept:
    return per_class * weights
  raise ValueError(
    f'class_weights must have shape [{num_classes}] (one per channel) or, '
    f'with include_background=False, [{num_kept}]; got {weights.shape}.'
  )


@_common.empty_batch_gives_zero
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
  r"""Soft Dice (or Jaccard) loss, with MONAI `DiceLoss` semantics.

  With `p` the softmax or sigmoid of `logits` and `g` the target, for
  each example and class (sums over the spatial axes; over the batch and
  spatial axes together when `batch=True`):

  .. math::
    I = \sum p \, g,\quad P = \sum p,\quad G = \sum g

    L_c^{\mathrm{dice}} = 1 - \frac{2 I + s_{nr}}{P + G + s_{dr}},\qquad
    L_c^{\mathrm{jaccard}} = 1 - \frac{2 I + s_{nr}}{2 (P + G - I) + s_{dr}}

  with `s_nr = smooth_nr` and `s_dr = smooth_dr`. `squared_pred=True` uses
  `P = sum(p ** 2)` and `G = sum(g ** 2)`. The loss of an example is `mean_c(w_c * L_c)`
  over the classes kept (`w_c = 1` without `class_weights`). Perfect overlap gives about
  0 and disjoint masks about 1; a class absent from both prediction and target gives
  `1 - smooth_nr / smooth_dr` (0 with the defaults).

  For the same options the values agree with MONAI's
  `DiceLoss(sigmoid=..., softmax=..., to_onehot_y=..., ...)` with
  `reduction='mean'` (MONAI's 'sum' and 'none' keep the class axis; here
  they sum or keep per-example class means). With one channel (`C == 1`, sigmoid)
  `include_background` has no effect: that channel is the foreground.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    activation: 'softmax' (mutually exclusive classes, C >= 2) or 'sigmoid'
      (independent channels, binary or multi-label).
    include_background: if False, channel 0 is left out (after the softmax).
    squared_pred: square p and g in the denominator.
    jaccard: the Jaccard (soft IoU) form instead of Dice.
    batch: sum over the batch too, giving one value for the whole batch.
    smooth_nr: added to the numerator, >= 0.
    smooth_dr: added to the denominator, >= 0.
    class_weights: optional non-negative weights, [C] (the background's is
      dropped when `include_background=False`) or, as in MONAI, [C - 1]
      when `include_background=False`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': []. With `batch=True`: [] ('none': ValueError).

  References:
    Milletari et al., V-Net, 3DV 2016, https://arxiv.org/abs/1606.04797;
    MONAI `monai.losses.DiceLoss`.
  """
  _common.check_options(reduction=reduction, activation=activation, batch=batch)
  _common.check_nonnegative(
    smooth_nr=smooth_nr, smooth_dr=smooth_dr, class_weights=class_weights
  )
  probs, targets = _region_inputs(
    logits,
    labels,
    activation=activation,
    include_background=include_background,
    ignore_index=ignore_index,
  )
  intersection, denominator = _dice_overlap(
    probs, targets, squared_pred=squared_pred, jaccard=jaccard, batch=batch
  )
  per_class = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
  per_class = _weigh_classes(per_class, class_weights, logits.shape[-1])
  return _common.reduce_examples(jnp.mean(per_class, axis=-1), reduction)


def _check_tversky_weights(alpha: float, beta: float) -> None:
  """A ValueError unless alpha and beta are >= 0 and not both 0 (concrete values)."""
  _common.check_nonnegative(alpha=alpha, beta=beta)
  if not _common.is_traced((alpha, beta)) and np.any(np.add(alpha, beta) <= 0):
    raise ValueError(
      f'alpha + beta must be > 0 (with both 0 the Tversky loss is constant), got'
      f' alpha={alpha}, beta={beta}.'
    )


@_common.empty_batch_gives_zero
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
  r"""Tversky loss, with MONAI `TverskyLoss` semantics.

  For each example and class (sums over the spatial axes; also over the batch
  when `batch=True`), with `s_nr = smooth_nr` and `s_dr = smooth_dr`:

  .. math::
    TP = \sum p \, g,\quad FP = \sum p \, (1 - g),\quad FN = \sum (1 - p) \, g

    L_c = 1 - \frac{TP + s_{nr}}{TP + \alpha \, FP + \beta \, FN + s_{dr}}

  The loss of an example is the mean of `L_c` over the classes kept.
  `alpha = beta = 0.5` is the Dice loss (up to smoothing) and
  `alpha = beta = 1` the Jaccard loss; `beta > alpha` penalises missed
  foreground more than false alarms.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    alpha: weight of the false positives, >= 0.
    beta: weight of the false negatives, >= 0; `alpha + beta > 0`.
    activation: 'softmax' (C >= 2) or 'sigmoid'.
    include_background: if False, channel 0 is left out (after the softmax).
    batch: sum over the batch too, giving one value for the whole batch.
    smooth_nr: added to the numerator, >= 0.
    smooth_dr: added to the denominator, >= 0.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': []. With `batch=True`: [].

  References:
    Salehi et al., Tversky loss function for image segmentation using 3D
    fully convolutional deep networks, MLMI 2017,
    https://arxiv.org/abs/1706.05721; MONAI `monai.losses.TverskyLoss`.
  """
  _common.check_options(reduction=reduction, activation=activation, batch=batch)
  _check_tversky_weights(alpha, beta)
  _common.check_nonnegative(smooth_nr=smooth_nr, smooth_dr=smooth_dr)
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
  return _common.reduce_examples(jnp.mean(per_class, axis=-1), reduction)


@_common.empty_batch_gives_zero
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
  r"""Generalized Dice loss (Sudre et al.), with MONAI semantics.

  Per example (or for the batch when `batch=True`), with class weights
  from the target volume `G_c = sum(g_c)`, `s_nr = smooth_nr` and
  `s_dr = smooth_dr`:

  .. math::
    w_c = 1 / G_c^2 \ (\text{'square'}),\quad 1 / G_c \ (\text{'simple'}),\quad
      1 \ (\text{'uniform'})

    L = 1 - \frac{2 \sum_c w_c \sum p_c \, g_c + s_{nr}}
                 {\sum_c w_c \left(\sum p_c + \sum g_c\right) + s_{dr}}

  A class absent from the target (`G_c = 0`) gets the largest weight of
  the present classes, as in MONAI. Rare classes weigh as much as common
  ones, which suits highly unbalanced segmentation.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    w_type: 'square', 'simple' or 'uniform'.
    activation: 'softmax' (C >= 2) or 'sigmoid'.
    include_background: if False, channel 0 is left out (after the softmax).
    batch: sum over the batch too, giving one value for the whole batch.
    smooth_nr: added to the numerator, >= 0.
    smooth_dr: added to the denominator, >= 0.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': []. With `batch=True`: [].

  References:
    Sudre et al., Generalised Dice overlap as a deep learning loss function
    for highly unbalanced segmentations, DLMIA 2017,
    https://arxiv.org/abs/1707.03237; MONAI
    `monai.losses.GeneralizedDiceLoss`.
  """
  _common.check_options(reduction=reduction, activation=activation, batch=batch)
  _common.check_nonnegative(smooth_nr=smooth_nr, smooth_dr=smooth_dr)
  if w_type not in _GDL_WEIGHTS:
    raise ValueError(f'w_type must be one of {_GDL_WEIGHTS}, got {w_type!r}.')
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
  return _common.reduce_examples(1.0 - numerator / denominator, reduction)
