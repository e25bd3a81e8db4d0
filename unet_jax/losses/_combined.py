"""Combined losses: a region term plus a pixel term."""

from typing import Any

import jax

from unet_jax.losses import _common
from unet_jax.losses import _cross_entropy
from unet_jax.losses import _focal
from unet_jax.losses import _region


@_common.empty_batch_gives_zero
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
  r"""Sigmoid Dice + binary cross-entropy, the standard combined loss.

  .. math::
    L = \lambda_\text{dice} L_\text{Dice} + \lambda_\text{bce} L_\text{BCE}

  with `L_Dice` = `dice_loss` (`activation='sigmoid'`) and `L_BCE` =
  `binary_cross_entropy_loss`, each reduced as `reduction` says. Dice
  handles class imbalance, BCE gives dense per-pixel gradients. For binary
  segmentation use one logit per pixel (`C == 1`) and integer labels in
  {0, 1}; `C > 1` is multi-label.

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    lambda_dice: weight of the Dice term, >= 0.
    lambda_bce: weight of the BCE term, >= 0.
    include_background: as in `dice_loss` (Dice term only).
    squared_pred, jaccard, batch, smooth_nr, smooth_dr: as in `dice_loss`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': [].

  References:
    The "Combined Loss" of the U-Net course text; MONAI
    `DiceCELoss(sigmoid=True)` for one channel.
  """
  _common.check_nonnegative(lambda_dice=lambda_dice, lambda_bce=lambda_bce)
  dice = _region.dice_loss(
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
  bce = _cross_entropy.binary_cross_entropy_loss(
    logits, labels, ignore_index=ignore_index, reduction=reduction
  )
  return lambda_dice * dice + lambda_bce * bce


@_common.empty_batch_gives_zero
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
  r"""Softmax Dice + cross-entropy, with MONAI `DiceCELoss` semantics.

  .. math::
    L = \lambda_\text{dice} L_\text{Dice} + \lambda_\text{ce} L_\text{CE}

  with `L_Dice` = `dice_loss` (`activation='softmax'`) and `L_CE` =
  `cross_entropy_loss` (the mean over pixels). `include_background` and
  the Dice options act on the Dice term only; `class_weights` ([C]) weigh
  both terms, the background's weight being dropped from the Dice term when
  `include_background=False`, as in MONAI.

  Args:
    logits: [N, *spatial, C] float, C >= 2.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    lambda_dice: weight of the Dice term, >= 0.
    lambda_ce: weight of the cross-entropy term, >= 0.
    include_background: as in `dice_loss` (Dice term only).
    squared_pred, jaccard, batch, smooth_nr, smooth_dr: as in `dice_loss`.
    class_weights: optional [C] non-negative class weights.
    label_smoothing: as in `cross_entropy_loss`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': [].

  References:
    Isensee et al., nnU-Net, Nature Methods 2021,
    https://arxiv.org/abs/1809.10486; MONAI `monai.losses.DiceCELoss`.
  """
  _common.check_nonnegative(lambda_dice=lambda_dice, lambda_ce=lambda_ce)
  dice = _region.dice_loss(
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
  ce = _cross_entropy.cross_entropy_loss(
    logits,
    labels,
    label_smoothing=label_smoothing,
    class_weights=class_weights,
    ignore_index=ignore_index,
    reduction=reduction,
  )
  return lambda_dice * dice + lambda_ce * ce


@_common.empty_batch_gives_zero
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
  r"""Focal Dice: Dice plus a focal term (AnatomyNet's Dice + focal loss).

  .. math::
    L = \lambda_\text{dice} L_\text{Dice} + \lambda_\text{focal} L_\text{Focal}

  with `L_Dice` = `dice_loss` and `L_Focal` = `focal_loss`, both with
  the same `activation`. The focal term's factor `(1 - p_t) ** gamma`
  nearly removes the pixels the model already gets right with confidence,
  which in segmentation are mostly background, so the dense gradient goes to
  the hard pixels (usually missed foreground), while the Dice term keeps the
  loss normalised by the foreground size. `gamma = 0` gives Dice + CE
  (softmax) or Dice + BCE (sigmoid).

  Zhu et al. use `L_Dice` in Tversky form; with their alpha = beta = 0.5
  it is the Dice loss used here. This is also the structure of MONAI's
  `DiceFocalLoss` (whose focal term is additionally divided by C).

  Args:
    logits: [N, *spatial, C] float.
    labels: [N, *spatial] integer class map or [N, *spatial, C] float target.
    gamma, alpha: as in `focal_loss`.
    activation: 'softmax' (C >= 2) or 'sigmoid'.
    lambda_dice: weight of the Dice term, >= 0.
    lambda_focal: weight of the focal term, >= 0.
    include_background: as in `dice_loss` (Dice term only).
    squared_pred, jaccard, batch, smooth_nr, smooth_dr: as in `dice_loss`.
    ignore_index: label value whose pixels are left out (integer labels only).
    reduction: 'mean', 'sum' or 'none'.

  Returns:
    'none': [N]. 'mean' and 'sum': [].

  References:
    Zhu et al., AnatomyNet: Deep learning for fast and fully automated
    whole-volume segmentation of head and neck anatomy, Medical Physics
    46(2), 2019, https://arxiv.org/abs/1808.05238; Lin et al., ICCV 2017.
  """
  _common.check_nonnegative(lambda_dice=lambda_dice, lambda_focal=lambda_focal)
  dice = _region.dice_loss(
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
  focal = _focal.focal_loss(
    logits,
    labels,
    gamma=gamma,
    alpha=alpha,
    activation=activation,
    ignore_index=ignore_index,
    reduction=reduction,
  )
  return lambda_dice * dice + lambda_focal * focal
