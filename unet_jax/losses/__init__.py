# Docstrings in losses/, metrics/: Google style, `code` in backticks, math in `.. math::`.
"""Segmentation losses: pure `jax.numpy` functions of logits and labels.

Every loss here has the signature::

  loss_fn(logits, labels, *, ...options..., ignore_index=None,
          reduction='mean') -> jax.Array

and shares these conventions.

Shapes:

* `logits`: `[N, *spatial, C]`, channels-last: `[N, H, W, C]` in 2D,
  `[N, D, H, W, C]` in 3D (any number of spatial axes works). Losses are
  computed in at least float32 (bfloat16 logits are upcast).
* `labels`: either an integer (or bool) class map of shape
  `logits.shape[:-1]`, or a float one-hot / soft target of shape
  `logits.shape`.

From integer labels to targets:

* `activation='softmax'`: the target is `one_hot(labels, C)`. Softmax needs
  `C >= 2`: a softmax over one channel is constant.
* `activation='sigmoid'`: channels are independent (binary or multi-label).
  With `C == 1` the target is `labels == 1` as a single channel (binary
  segmentation with one logit); with `C > 1` it is `one_hot(labels, C)`.
* Labels outside `[0, C)` that are not `ignore_index` give all-zero target
  rows. Use `ignore_index` to leave such pixels out.

`ignore_index` (integer labels only): pixels whose label equals it contribute
nothing to any loss, so the loss equals the loss computed on the other pixels
alone and the gradient at ignored pixels is exactly zero. The value may lie
outside `[0, C)` (e.g. 255): such pixels are masked before one-hot encoding.

`reduction`:

* `'none'`: shape `[N]`, one value per example.
* `'mean'`: a scalar. Region losses (Dice, Tversky, generalized Dice): the
  mean of the per-example values. Pixel-averaged losses (BCE, CE, focal): the
  mean over all non-ignored pixels of the batch, which equals the mean of the
  per-example values when no pixel is ignored.
* `'sum'`: a scalar, the sum of the per-example values.

With `batch=True` a region loss sums over the batch and spatial axes
together, so there is one value for the whole batch: `'mean'` and `'sum'`
both return it and `'none'` raises a ValueError.

Edge cases, the same for every loss here (`LOSSES`, and so `deep_supervision_loss`
over them):

* An empty batch (`N = 0`) gives 0 for 'mean' and 'sum', an empty `[0]` array
  for 'none', and a zero gradient, whatever the options (`batch=True` too).
  A mean over no examples would be 0 / 0, and a NaN gradient spoils every
  parameter it reaches. Zero rather than an error:
  code that filters a batch (examples with foreground, a shard that came out
  empty) can call the loss without a branch, the sum over no examples is 0
  anyway, and `N` is a static shape, so choosing costs nothing under jit.
* Float labels (one-hot or soft targets) are probabilities: every value must be
  finite and in `[0, 1]`, or a ValueError says which values are out. Above 1 is
  refused too: with a target `y > 1` the binary cross-entropy
  `softplus(x) - y x` falls without bound as the logit `x` grows. The values
  are checked on the host in eager calls only (concrete arrays): under
  `jax.jit` or `jax.vmap` they are not known when the loss is traced, and a
  check inside the compiled step would cost every step (`checkify`, a host
  callback), so the jitted loss carries none. The
  trainer never passes float targets: its labels are integer class maps from
  the data pipeline. An integer class map holds class indices, not
  probabilities: values outside `[0, C)` give all-zero targets (above).
* Numeric options, when they are Python numbers or concrete arrays, are checked
  on every call, with a ValueError naming the option and its value: `gamma`,
  `smooth_nr`, `smooth_dr`, `class_weights` and the `lambda_*` weights must be
  finite and >= 0, `label_smoothing` in `[0, 1]`; the focal `alpha` in
  `[0, 1]` (a scalar, or each entry with `activation='sigmoid'`) or >= 0 (a
  softmax `[C]` array); the Tversky `alpha` and `beta` >= 0 and not both 0.
  Options passed traced (arguments of a jitted function) are not checked.
  `unet_jax.config.LossOptions` checks a config's `loss.kwargs` the same way
  when the config is read.

All functions are pure and safe under `jax.jit`, `jax.grad` and `jax.vmap`:
shapes are checked at trace time and nothing branches in Python on array
values. Sigmoid and softmax are taken from logits in stable form (log-sigmoid,
log-sum-exp), so logits of +-1e4 give finite losses and gradients. String and
bool options are static: bind them with `functools.partial` before `jax.jit`.

Where they come from. The project follows a U-Net course handout (a lab text
on semantic segmentation; "the U-Net course text" below) that names BCE, Dice,
their sum and a focal variant; MONAI's losses fix the options and their
semantics, and `benchmarks/monai_parity.py` checks the values against MONAI.

Why not `optax.losses.dice_loss`: it has no `ignore_index`, which training
needs (padding and "don't care" pixels must not count), and none of MONAI's
options (`include_background`, `squared_pred`, `jaccard`, `batch`,
the smoothing terms), so it could not match MONAI's values.

Example::

  loss_fn = functools.partial(losses.dice_ce_loss, include_background=False)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(logits, labels)

Layout: one private module per family, every public name re-exported here.

* `_common`: option, input and target-value checks, targets from labels, the
  reductions, the zero loss of an empty batch (`empty_batch_gives_zero`).
* `_cross_entropy`: `binary_cross_entropy_loss`, `cross_entropy_loss`.
* `_focal`: `focal_loss`.
* `_region`: `dice_loss`, `tversky_loss`, `generalized_dice_loss`.
* `_combined`: `dice_bce_loss`, `dice_ce_loss`, `focal_dice_loss`.
* `deep_supervision`: `deep_supervision_loss` over a network's main and
  auxiliary outputs, and `supervision_strides` for its heads.
* Here: `LOSSES`, the registry of the losses above by name, and `get_loss`.
"""

from collections.abc import Callable

import jax

from unet_jax.losses._combined import dice_bce_loss
from unet_jax.losses._combined import dice_ce_loss
from unet_jax.losses._combined import focal_dice_loss
from unet_jax.losses._cross_entropy import binary_cross_entropy_loss
from unet_jax.losses._cross_entropy import cross_entropy_loss
from unet_jax.losses._focal import focal_loss
from unet_jax.losses._region import dice_loss
from unet_jax.losses._region import generalized_dice_loss
from unet_jax.losses._region import tversky_loss
from unet_jax.losses.deep_supervision import deep_supervision_loss
from unet_jax.losses.deep_supervision import supervision_strides

__all__ = [
  'LOSSES',
  'LossFn',
  'binary_cross_entropy_loss',
  'cross_entropy_loss',
  'deep_supervision_loss',
  'dice_bce_loss',
  'dice_ce_loss',
  'dice_loss',
  'focal_dice_loss',
  'focal_loss',
  'generalized_dice_loss',
  'get_loss',
  'supervision_strides',
  'tversky_loss',
]

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
  """The loss registered as `name` in `LOSSES`, for configs.

  Args:
    name: one of the keys of `LOSSES`.

  Returns:
    The loss function; call it as `fn(logits, labels, **options)`.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(
      f'Unknown loss {name!r}; valid names: {", ".join(sorted(LOSSES))}.'
    ) from None
