"""Tests for unet_jax.losses: hand-computed values, bounds, jit/grad/vmap."""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import losses
from unet_jax import metrics
from unet_jax import models

SIGMOID_ONLY = ('bce', 'dice_bce')  # Sigmoid-based; binary with one logit.
REGION = ('dice', 'tversky', 'generalized_dice')
SPATIAL = {'2d': (5, 6), '3d': (3, 4, 5)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Jitted functions are cached so tests that use the same loss, options and
# shapes share one compile: compiling dominates the run time of this file.


@functools.cache
def _jit(fn, **options):
  """`fn` with options bound, jitted."""
  return jax.jit(functools.partial(fn, **options))


@functools.cache
def _reductions(name, **options):
  """Jitted: {reduction: loss} for the loss `name` and the three reductions."""
  fn = functools.partial(losses.get_loss(name), **options)
  return jax.jit(
    lambda logits, labels: {
      r: fn(logits, labels, reduction=r) for r in ('none', 'mean', 'sum')
    }
  )


@functools.cache
def _value_and_grad(name, **options):
  """Jitted value and gradient (w.r.t. logits) of the loss `name`."""
  return jax.jit(jax.value_and_grad(functools.partial(losses.get_loss(name), **options)))


def _logit(p):
  return math.log(p / (1.0 - p))


def _inputs(name, spatial, *, seed=0, num_classes=3, batch_size=2):
  """Random logits and integer labels suited to the loss `name`."""
  rng = np.random.default_rng(seed)
  channels = 1 if name in SIGMOID_ONLY else num_classes
  high = 2 if name in SIGMOID_ONLY else num_classes
  logits = rng.normal(size=(batch_size, *spatial, channels)) * 2.0
  labels = rng.integers(0, high, size=(batch_size, *spatial))
  return jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32)


def _confident_logits(labels, channels, scale=30.0):
  """Logits that predict `labels` with near-certainty."""
  if channels == 1:
    return jnp.where(labels == 1, scale, -scale)[..., None].astype(jnp.float32)
  return (scale * (2.0 * jax.nn.one_hot(labels, channels) - 1.0)).astype(jnp.float32)


# --------------------------------------------------------------------------
# Hand-computed values.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
@pytest.mark.parametrize('dims', sorted(SPATIAL))
def test_perfect_prediction_gives_zero(name, dims):
  _, labels = _inputs(name, SPATIAL[dims])
  channels = 1 if name in SIGMOID_ONLY else 3
  logits = _confident_logits(labels, channels)
  for reduction, loss in _reductions(name)(logits, labels).items():
    np.testing.assert_allclose(loss, 0.0, atol=1e-5, err_msg=reduction)


@pytest.mark.parametrize('name', REGION + ('dice_jaccard',))
@pytest.mark.parametrize('dims', sorted(SPATIAL))
def test_disjoint_prediction_gives_one(name, dims):
  # Binary, one sigmoid logit; the prediction is the complement of the mask.
  rng = np.random.default_rng(1)
  labels = jnp.asarray(rng.integers(0, 2, size=(2, *SPATIAL[dims])))
  labels = labels.at[:, 0].set(1).at[:, -1].set(0)  # Both classes present.
  logits = _confident_logits(1 - labels, 1)
  options = {'activation': 'sigmoid'}
  if name == 'dice_jaccard':
    name, options['jaccard'] = 'dice', True
  loss = losses.get_loss(name)(logits, labels, **options)
  # 1 - smooth_nr / (weighted volume + smooth_dr): about 1. The weighted
  # volume is smallest for generalized Dice (1 / G^2 weights).
  assert loss <= 1.0
  np.testing.assert_allclose(loss, 1.0, atol=2e-4)


def test_binary_sigmoid_hand_values():
  # Four pixels, probabilities p and targets g; sums worked out by hand:
  # I = 0.8 + 0.6 + 0.1 = 1.5, P = 1.8, G = 3, sum p^2 = 1.1.
  p = [0.8, 0.6, 0.3, 0.1]
  logits = jnp.asarray([_logit(x) for x in p], jnp.float32).reshape(1, 2, 2, 1)
  labels = jnp.asarray([1, 1, 0, 1]).reshape(1, 2, 2)
  s = 1e-5
  cases = {
    'dice': (losses.dice_loss, {}, 1 - (3 + s) / (4.8 + s)),
    'jaccard': (losses.dice_loss, {'jaccard': True}, 1 - (3 + s) / (2 * (4.8 - 1.5) + s)),
    'squared': (losses.dice_loss, {'squared_pred': True}, 1 - (3 + s) / (1.1 + 3 + s)),
    # TP = 1.5, FP = 0.3, FN = 0.2 + 0.4 + 0.9 = 1.5.
    'tversky': (
      losses.tversky_loss,
      {'alpha': 0.3, 'beta': 0.7},
      1 - (1.5 + s) / (1.5 + 0.3 * 0.3 + 0.7 * 1.5 + s),
    ),
  }
  for key, (fn, options, expected) in cases.items():
    loss = fn(logits, labels, activation='sigmoid', **options)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=key)
  # p_t = probability of the true class at each pixel.
  p_t = np.array([0.8, 0.6, 0.7, 0.1])
  bce = -np.log(p_t).mean()
  np.testing.assert_allclose(
    losses.binary_cross_entropy_loss(logits, labels), bce, rtol=1e-5
  )
  focal = np.mean(-((1 - p_t) ** 2) * np.log(p_t))
  np.testing.assert_allclose(
    losses.focal_loss(logits, labels, activation='sigmoid'),
    focal,
    rtol=1e-5,
  )
  alpha_t = np.array([0.25, 0.25, 0.75, 0.25])
  np.testing.assert_allclose(
    losses.focal_loss(logits, labels, activation='sigmoid', alpha=0.25),
    np.mean(alpha_t * -((1 - p_t) ** 2) * np.log(p_t)),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    losses.dice_bce_loss(logits, labels),
    1 - (3 + s) / (4.8 + s) + bce,
    rtol=1e-5,
  )


def test_multiclass_dice_hand_values():
  # Prediction [0, 1, 1, 2] against truth [0, 1, 2, 2]:
  # class 0: I=1, P=1, G=1 -> 0; class 1: I=1, P=2, G=1 -> 1/3;
  # class 2: I=1, P=1, G=2 -> 1/3.
  labels = jnp.asarray([[0, 1], [2, 2]]).reshape(1, 2, 2)
  logits = _confident_logits(jnp.asarray([[0, 1], [1, 2]]).reshape(1, 2, 2), 3)
  np.testing.assert_allclose(losses.dice_loss(logits, labels), 2 / 9, atol=1e-5)
  np.testing.assert_allclose(
    losses.dice_loss(logits, labels, include_background=False),
    1 / 3,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    losses.dice_loss(logits, labels, class_weights=[3.0, 1.5, 0.0]),
    (0 + 1.5 / 3 + 0) / 3,
    atol=1e-5,
  )
  # Generalized Dice: I = [1, 1, 1], P + G = [2, 3, 3], G = [1, 1, 2].
  gdl = {
    'uniform': 1 - 2 * 3 / 8,
    'simple': 1 - 2 * (1 + 1 + 0.5) / (2 + 3 + 1.5),
    'square': 1 - 2 * (1 + 1 + 0.25) / (2 + 3 + 0.75),
  }
  for w_type, expected in gdl.items():
    np.testing.assert_allclose(
      losses.generalized_dice_loss(logits, labels, w_type=w_type),
      expected,
      atol=1e-5,
      err_msg=w_type,
    )


def test_softmax_cross_entropy_hand_values():
  # Logits [log 3, 0] give p = [0.75, 0.25] at both pixels.
  logits = jnp.asarray([[math.log(3.0), 0.0]] * 2).reshape(1, 1, 2, 2)
  labels = jnp.asarray([0, 1]).reshape(1, 1, 2)
  ce = losses.cross_entropy_loss
  np.testing.assert_allclose(
    ce(logits, labels), -(math.log(0.75) + math.log(0.25)) / 2, rtol=1e-6
  )
  # Smoothing 0.1 over 2 classes: targets 0.95 / 0.05.
  smoothed = -(0.95 * math.log(0.75) + 0.05 * math.log(0.25)) - (
    0.05 * math.log(0.75) + 0.95 * math.log(0.25)
  )
  np.testing.assert_allclose(
    ce(logits, labels, label_smoothing=0.1), smoothed / 2, rtol=1e-6
  )
  # Weights 1 and 3: sum_i w_i l_i / sum_i w_i.
  weighted = (-math.log(0.75) - 3 * math.log(0.25)) / 4
  np.testing.assert_allclose(
    ce(logits, labels, class_weights=[1.0, 3.0]), weighted, rtol=1e-6
  )
  # Focal, softmax, gamma 2: mean of -(1 - p_t)^2 log p_t.
  focal = (-(0.25**2) * math.log(0.75) - 0.75**2 * math.log(0.25)) / 2
  np.testing.assert_allclose(losses.focal_loss(logits, labels), focal, rtol=1e-6)
  # A scalar alpha weighs class 0 by 1 - alpha and the others by alpha.
  np.testing.assert_allclose(
    losses.focal_loss(logits, labels, alpha=0.25),
    (-0.75 * 0.25**2 * math.log(0.75) - 0.25 * 0.75**2 * math.log(0.25)) / 2,
    rtol=1e-6,
  )


def test_batch_option_pools_examples():
  # Example 0 is perfect, example 1 disjoint. Per example: mean of 0 and ~1;
  # pooled (batch=True): one Dice over both.
  labels = jnp.asarray([[[1, 0]], [[1, 0]]])  # [2, 1, 2]
  logits = _confident_logits(jnp.asarray([[[1, 0]], [[0, 1]]]), 1)
  per_example = losses.dice_loss(logits, labels, activation='sigmoid', reduction='none')
  np.testing.assert_allclose(per_example, [0.0, 1.0], atol=1e-5)
  # Pooled: I = 1, P = 2, G = 2.
  pooled = losses.dice_loss(logits, labels, activation='sigmoid', batch=True)
  np.testing.assert_allclose(pooled, 0.5, atol=1e-5)


def test_imbalance_bce_low_but_dice_near_one():
  """The imbalance argument: 5% foreground, 'all background' looks good to BCE."""
  labels = np.zeros((1, 20, 20), np.int32)
  labels[0, 2:6, 3:8] = 1  # 20 of 400 pixels: 5% foreground.
  assert labels.mean() == 0.05
  # The best constant predictor for BCE: p = 0.05 everywhere, so every pixel
  # is classified background (95% pixel accuracy).
  all_background = jnp.full((1, 20, 20, 1), _logit(0.05), jnp.float32)
  entropy = -(0.05 * math.log(0.05) + 0.95 * math.log(0.95))  # 0.1985
  bce = losses.binary_cross_entropy_loss(all_background, labels)
  dice = losses.dice_loss(all_background, labels, activation='sigmoid')
  np.testing.assert_allclose(bce, entropy, rtol=1e-5)
  # Dice = 2 * 0.05 * 20 / (0.05 * 400 + 20) = 0.05.
  np.testing.assert_allclose(dice, 0.95, rtol=1e-5)
  predictions = (all_background[..., 0] > 0).astype(jnp.int32)
  cm = metrics.confusion_matrix(predictions, labels, 2)
  assert metrics.pixel_accuracy(cm) == 0.95
  # A model that finds the lesion, but unsure (p = 0.6 on it, 0.3 elsewhere),
  # is worse by BCE and better by Dice.
  finds_it = jnp.where(labels == 1, _logit(0.6), _logit(0.3))[..., None]
  assert losses.binary_cross_entropy_loss(finds_it, labels) > bce
  assert losses.dice_loss(finds_it, labels, activation='sigmoid') < 0.85


# --------------------------------------------------------------------------
# Focal Dice.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('activation', ['softmax', 'sigmoid'])
def test_focal_dice_with_gamma_zero_is_dice_plus_cross_entropy(activation):
  logits, labels = _inputs('focal_dice', SPATIAL['2d'], num_classes=3)
  if activation == 'sigmoid':
    logits, labels = logits[..., :1], labels % 2
    reference = losses.dice_bce_loss(logits, labels)
  else:
    reference = losses.dice_ce_loss(logits, labels)
  loss = losses.focal_dice_loss(logits, labels, gamma=0.0, activation=activation)
  np.testing.assert_allclose(loss, reference, rtol=1e-6)


@pytest.mark.parametrize('activation', ['softmax', 'sigmoid'])
def test_focal_dice_down_weights_easy_background(activation):
  # 95 easy background pixels (p_fg = 0.02, correct) and 5 hard positives
  # (p_fg = 0.27, missed).
  labels = np.zeros((1, 10, 10), np.int32)
  labels[0, 0, :5] = 1
  foreground = np.where(labels == 1, -1.0, -4.0)[..., None]
  logits = foreground
  if activation == 'softmax':
    logits = np.concatenate([np.zeros_like(foreground), foreground], -1)
  logits = jnp.asarray(logits, jnp.float32)
  easy = labels == 0

  def easy_share(loss_fn, gamma):
    # gamma is traced: one compile serves both values.
    value_and_grad = jax.jit(
      jax.value_and_grad(lambda x, g: loss_fn(x, labels, gamma=g, activation=activation))
    )
    loss, grads = value_and_grad(logits, gamma)
    grads = jnp.abs(grads).sum(-1)
    return loss, float(grads[easy].sum() / grads.sum())

  # The focal term alone: easy background pixels lose almost all their
  # gradient (a 32% share with CE, under 0.1% with gamma = 2).
  assert easy_share(losses.focal_loss, 0.0)[1] > 0.3
  assert easy_share(losses.focal_loss, 2.0)[1] < 1e-3
  # The whole loss: a smaller share on easy background, so a larger one on
  # the hard positives, than Dice + CE (gamma = 0).
  loss_gamma0, share_gamma0 = easy_share(losses.focal_dice_loss, 0.0)
  loss_gamma2, share_gamma2 = easy_share(losses.focal_dice_loss, 2.0)
  assert share_gamma2 < share_gamma0 - 0.03
  # Never above Dice + CE, since (1 - p_t)^gamma <= 1.
  assert loss_gamma2 < loss_gamma0


# --------------------------------------------------------------------------
# Properties over all losses.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
@pytest.mark.parametrize('dims', sorted(SPATIAL))
def test_bounds_and_reductions(name, dims):
  logits, labels = _inputs(name, SPATIAL[dims])
  out = _reductions(name)(logits, labels)
  per_example, mean, total = out['none'], out['mean'], out['sum']
  assert per_example.shape == (2,)
  assert mean.shape == total.shape == ()
  assert np.all(np.asarray(per_example) >= 0)
  if name in REGION:
    assert np.all(np.asarray(per_example) <= 1)
  np.testing.assert_allclose(mean, per_example.mean(), rtol=1e-6)
  np.testing.assert_allclose(total, per_example.sum(), rtol=1e-6)


@pytest.mark.parametrize(
  'name, dims',
  [(name, '2d') for name in sorted(losses.LOSSES)]
  + [(name, '3d') for name in ('dice_bce', 'dice_ce', 'focal_dice')],
)
def test_jit_equals_eager(name, dims):
  logits, labels = _inputs(name, SPATIAL[dims], seed=2)
  eager = losses.get_loss(name)(logits, labels, reduction='none')
  np.testing.assert_allclose(
    _reductions(name)(logits, labels)['none'], eager, rtol=1e-5, atol=1e-7
  )


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_gradients_finite_and_non_zero(name):
  logits, labels = _inputs(name, SPATIAL['2d'], seed=3)
  _, grads = _value_and_grad(name)(logits, labels)
  assert grads.shape == logits.shape
  assert np.all(np.isfinite(grads))
  assert np.abs(np.asarray(grads)).sum() > 1e-3


@pytest.mark.parametrize(
  'name, activation',
  [(name, None) for name in ('bce', 'ce', 'dice_bce', 'dice_ce')]
  + [
    (name, activation)
    for name in ('dice', 'focal', 'focal_dice', 'generalized_dice', 'tversky')
    for activation in ('softmax', 'sigmoid')
  ],
)
def test_extreme_logits_give_finite_loss_and_gradients(name, activation):
  # The default activation (softmax, or none to choose) shares a compile
  # with the gradient test above.
  options = {'activation': 'sigmoid'} if activation == 'sigmoid' else {}
  logits, labels = _inputs(name, SPATIAL['2d'], seed=4)
  extreme = jnp.sign(logits) * 1e4  # Half of them confidently wrong.
  loss, grads = _value_and_grad(name, **options)(extreme, labels)
  assert np.isfinite(loss)
  assert np.all(np.isfinite(grads))
  # Some pixels are wrong with logit 1e4: the loss notices.
  assert loss > 0
  if name not in REGION:
    # Log-likelihood terms keep a gradient where the probability saturates;
    # a pure overlap loss of saturated probabilities has none (its slope,
    # p * (1 - p), is 0 in float32), which is correct, not a failure.
    assert np.abs(np.asarray(grads)).sum() > 0


@pytest.mark.parametrize('gamma', [0.0, 0.5, 2.0])
def test_focal_gradient_finite_where_saturated(gamma):
  # p_t == 1 exactly: (1 - p_t)^gamma has an infinite slope at 0 for
  # gamma < 1; the gradient must still be finite.
  labels = jnp.asarray([[[0, 1]]])
  logits = _confident_logits(labels, 2, scale=1e4)
  for activation in ('softmax', 'sigmoid'):
    fn = functools.partial(
      losses.focal_loss, labels=labels, gamma=gamma, activation=activation
    )
    grads = jax.jit(jax.grad(fn))(logits)
    assert np.all(np.isfinite(grads)), activation


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_vmap_over_a_leading_axis(name):
  logits, labels = _inputs(name, SPATIAL['2d'], seed=5, batch_size=4)
  logits = logits.reshape(2, 2, *logits.shape[1:])
  labels = labels.reshape(2, 2, *labels.shape[1:])
  batched = jax.jit(jax.vmap(losses.get_loss(name)))(logits, labels)
  fn = _reductions(name)
  np.testing.assert_allclose(
    batched,
    [fn(logits[0], labels[0])['mean'], fn(logits[1], labels[1])['mean']],
    rtol=1e-5,
  )


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_one_hot_float_labels_equal_integer_labels(name):
  logits, labels = _inputs(name, SPATIAL['2d'], seed=6)
  if name in SIGMOID_ONLY:
    targets = (labels == 1)[..., None].astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, 3)
  fn = _reductions(name)
  np.testing.assert_allclose(
    fn(logits, targets)['none'], fn(logits, labels)['none'], rtol=1e-6
  )


def test_sigmoid_with_several_channels_one_hot_encodes_integer_labels():
  logits, labels = _inputs('dice', SPATIAL['2d'], seed=7)
  targets = jax.nn.one_hot(labels, 3)
  for fn in (losses.binary_cross_entropy_loss, losses.dice_bce_loss):
    np.testing.assert_allclose(fn(logits, labels), fn(logits, targets), rtol=1e-6)


def test_bfloat16_logits_are_upcast():
  logits, labels = _inputs('dice_ce', SPATIAL['2d'], seed=8)
  low = logits.astype(jnp.bfloat16)
  loss = losses.dice_ce_loss(low, labels)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(
    loss, losses.dice_ce_loss(low.astype(jnp.float32), labels), rtol=1e-6
  )


def test_class_weights_options_agree():
  logits, labels = _inputs('dice', SPATIAL['2d'], seed=9, num_classes=4)
  dice = losses.dice_loss
  np.testing.assert_allclose(
    dice(logits, labels, class_weights=jnp.ones(4)),
    dice(logits, labels),
    rtol=1e-6,
  )
  # [C] and, as in MONAI, [C - 1] without background give the same result.
  np.testing.assert_allclose(
    dice(logits, labels, include_background=False, class_weights=[9.0, 1.0, 2.0, 0.5]),
    dice(logits, labels, include_background=False, class_weights=[1.0, 2.0, 0.5]),
    rtol=1e-6,
  )


def test_tversky_with_half_weights_is_dice():
  logits, labels = _inputs('dice', SPATIAL['3d'], seed=10)
  options = {'smooth_nr': 0.0, 'smooth_dr': 1e-9}
  np.testing.assert_allclose(
    losses.tversky_loss(logits, labels, **options),
    losses.dice_loss(logits, labels, **options),
    rtol=1e-5,
  )


def test_generalized_dice_absent_class_gets_largest_weight():
  # Class 2 never occurs in the target; it takes the largest weight of the
  # present classes, 1 / 1^2 from class 1, instead of 1 / 0.
  labels = jnp.asarray([[0, 0], [0, 1]]).reshape(1, 2, 2)
  logits = _confident_logits(labels, 3, scale=0.0)  # p = 1/3 everywhere.
  # G = [3, 1, 0] -> w = [1/9, 1, 1]; I = [1, 1/3, 0]; P = [4/3] * 3.
  w = np.array([1 / 9, 1.0, 1.0])
  numerator = 2 * (w * [1.0, 1 / 3, 0.0]).sum()
  denominator = (w * (np.array([4 / 3] * 3) + [3.0, 1.0, 0.0])).sum()
  np.testing.assert_allclose(
    losses.generalized_dice_loss(logits, labels),
    1 - numerator / denominator,
    rtol=1e-5,
  )


# --------------------------------------------------------------------------
# ignore_index.
# --------------------------------------------------------------------------


def _with_ignored(labels, seed, *, fraction=0.3, value=255):
  """Sets `fraction` of each example's pixels, at random places, to `value`.

  Every example loses the same number of pixels, so the kept pixels of the
  batch stack into one [N, K, 1] image (one compile, not one per example).
  """
  rng = np.random.default_rng(seed)
  labels = np.array(labels)
  rows = labels.reshape(labels.shape[0], -1)  # A view into `labels`.
  num_ignored = int(fraction * rows.shape[1])
  for row in rows:
    row[rng.permutation(row.size)[:num_ignored]] = value
  return jnp.asarray(labels)


def _kept(logits, labels, value=255):
  """The non-ignored pixels of each example, as a [N, K, 1, C] image."""
  keep = np.asarray(labels) != value
  num_examples = labels.shape[0]
  kept_logits = np.asarray(logits)[keep].reshape(num_examples, -1, 1, logits.shape[-1])
  kept_labels = np.asarray(labels)[keep].reshape(num_examples, -1, 1)
  return jnp.asarray(kept_logits), jnp.asarray(kept_labels)


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
@pytest.mark.parametrize('dims', sorted(SPATIAL))
def test_ignore_index_equals_loss_on_other_pixels(name, dims):
  logits, labels = _inputs(name, SPATIAL[dims], seed=11)
  labels = _with_ignored(labels, seed=12)  # 255 >= C: masked, not one-hot.
  fn = _jit(losses.get_loss(name), ignore_index=255, reduction='none')
  np.testing.assert_allclose(
    fn(logits, labels), fn(*_kept(logits, labels)), rtol=1e-5, atol=1e-7
  )


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_ignored_pixels_get_zero_gradient(name):
  logits, labels = _inputs(name, SPATIAL['2d'], seed=16)
  labels = _with_ignored(labels, seed=17)
  _, grads = _value_and_grad(name, ignore_index=255)(logits, labels)
  ignored = np.asarray(labels) == 255
  assert np.all(np.asarray(grads)[ignored] == 0)
  assert np.abs(np.asarray(grads)[~ignored]).sum() > 0


@pytest.mark.parametrize('name', ['bce', 'ce', 'focal', 'dice_pooled'])
def test_ignore_index_mean_pools_the_batch(name):
  # Pixel-averaged losses (and batch=True Dice) average over all kept pixels
  # of the batch: the loss of the concatenated kept pixels. Examples here
  # keep different numbers of pixels, so this is not a mean of example means.
  options = {'ignore_index': 255}
  if name == 'dice_pooled':
    name, options['batch'] = 'dice', True
  logits, labels = _inputs(name, SPATIAL['2d'], seed=13)
  labels = labels.at[0, :2].set(255).at[1, 0, 0].set(255)
  fn = _jit(losses.get_loss(name), **options)
  keep = np.asarray(labels) != 255
  kept_logits = jnp.asarray(np.asarray(logits)[keep])[None, :, None, :]
  kept_labels = jnp.asarray(np.asarray(labels)[keep])[None, :, None]
  np.testing.assert_allclose(fn(logits, labels), fn(kept_logits, kept_labels), rtol=1e-5)
  assert not np.isclose(fn(logits, labels), _jit(losses.get_loss(name))(logits, labels))


def test_ignore_index_inside_class_range():
  # Ignoring a real class value (here 0, background) masks those pixels.
  logits, labels = _inputs('dice_ce', SPATIAL['2d'], seed=15)
  fn = _jit(losses.dice_ce_loss, reduction='none')
  masked = fn(logits, labels, ignore_index=0)
  for n in range(labels.shape[0]):
    keep = np.asarray(labels[n]) != 0
    kept = (logits[n][keep][None, :, None, :], labels[n][keep][None, :, None])
    np.testing.assert_allclose(masked[n], fn(*kept)[0], rtol=1e-5)


# --------------------------------------------------------------------------
# Registry and input validation.
# --------------------------------------------------------------------------


def test_registry_names():
  assert set(losses.LOSSES) == {
    'dice_bce',
    'dice_ce',
    'dice',
    'bce',
    'ce',
    'focal',
    'focal_dice',
    'tversky',
    'generalized_dice',
  }
  assert losses.get_loss('dice_bce') is losses.dice_bce_loss
  assert losses.get_loss('generalized_dice') is losses.generalized_dice_loss


def test_get_loss_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match='dice_bce.*generalized_dice'):
    losses.get_loss('dice_focal')


def test_training_loop_calls():
  # The calls the training loop makes: binary with one logit, and softmax.
  logits, labels = _inputs('dice_bce', SPATIAL['2d'])
  assert losses.get_loss('dice_bce')(logits, labels).shape == ()
  logits, labels = _inputs('dice_ce', SPATIAL['2d'])
  loss = losses.get_loss('dice_ce')(logits, labels, include_background=False)
  assert loss.shape == ()


LOGITS = jnp.zeros((2, 4, 4, 3))
LABELS = jnp.zeros((2, 4, 4), jnp.int32)


@pytest.mark.parametrize(
  'call',
  [
    lambda: losses.dice_loss(LOGITS, LABELS, reduction='average'),
    lambda: losses.dice_loss(LOGITS, LABELS, activation='relu'),
    lambda: losses.dice_loss(LOGITS, LABELS[:, :3]),
    lambda: losses.dice_loss(LOGITS, LABELS.astype(jnp.float32)),
    lambda: losses.dice_loss(LOGITS, jnp.zeros((2, 4, 4, 2))),
    lambda: losses.dice_loss(LOGITS[0, 0], LABELS[0, 0, :, None]),
    lambda: losses.dice_loss(LOGITS, LABELS, batch=True, reduction='none'),
    lambda: losses.dice_loss(LOGITS, LABELS, class_weights=[1.0, 2.0]),
    lambda: losses.dice_loss(LOGITS, jax.nn.one_hot(LABELS, 3), ignore_index=255),
    lambda: losses.dice_loss(LOGITS[..., :1], LABELS),  # Softmax, C = 1.
    lambda: losses.cross_entropy_loss(LOGITS[..., :1], LABELS),
    lambda: losses.dice_ce_loss(LOGITS[..., :1], LABELS),
    lambda: losses.cross_entropy_loss(LOGITS, LABELS, class_weights=[1.0]),
    lambda: losses.focal_loss(LOGITS, LABELS, alpha=[0.5, 0.5]),
    lambda: losses.generalized_dice_loss(LOGITS, LABELS, w_type='cube'),
    lambda: losses.binary_cross_entropy_loss(LOGITS.astype(jnp.int32), LABELS),
  ],
)
def test_bad_inputs_raise_value_error(call):
  with pytest.raises(ValueError):
    call()


# ------------------------------------------------------------------ deep supervision


def test_deep_supervision_loss_by_hand():
  labels = jnp.arange(16).reshape(1, 4, 4) % 3
  mean_label = lambda logits, labels: jnp.mean(labels.astype(jnp.float32))
  logits = jnp.zeros((1, 4, 4, 3))
  aux = (jnp.zeros((1, 2, 2, 3)),)
  loss = losses.deep_supervision_loss(mean_label, (logits, aux), labels, strides=((2, 2),))
  # Full resolution: the mean of all labels; half resolution: labels[1::2, 1::2].
  full = float(jnp.mean(labels))
  half = float(jnp.mean(labels[:, 1::2, 1::2]))
  assert float(loss) == pytest.approx(2 / 3 * full + 1 / 3 * half)
  assert half != full


def test_deep_supervision_loss_of_plain_logits_is_the_loss():
  fn = functools.partial(losses.dice_ce_loss, ignore_index=255)
  loss = losses.deep_supervision_loss(fn, LOGITS, LABELS, strides=())
  np.testing.assert_array_equal(loss, fn(LOGITS, LABELS))


def test_supervision_strides_match_the_unet_heads():
  pool_sizes = ((2, 2), (1, 2), (2, 2))
  model = models.UNet(
    num_classes=3,
    features=4,
    depth=3,
    norm='none',
    deep_supervision=2,
    pool_sizes=pool_sizes,
  )
  x = jnp.zeros((1, 8, 16, 1))
  _, aux = model.apply(model.init(jax.random.key(0), x), x)
  _, pools = models.level_shapes(ndim=2, depth=3, pool_sizes=pool_sizes)
  strides = losses.supervision_strides(pools, num_heads=2)
  assert strides == ((2, 2), (2, 4))
  labels = jnp.zeros((1, 8, 16), jnp.int32)
  for head, stride in zip(aux, strides):
    window = (slice(None),) + tuple(slice(s // 2, None, s) for s in stride)
    assert labels[window].shape == head.shape[:-1]
  assert losses.supervision_strides(pools, num_heads=0) == ()
  with pytest.raises(ValueError, match=r'num_heads=4 must be in \[0, 3\]'):
    losses.supervision_strides(pools, num_heads=4)


def test_import_loads_neither_flax_nor_models_nor_train():
  # Losses must stay cheap to import into other JAX code.
  code = (
    'import sys; import unet_jax.losses; '
    'bad = sorted(m for m in sys.modules if m.split(".")[0] == "flax" '
    'or m.startswith(("unet_jax.models", "unet_jax.train"))); '
    'assert not bad, bad'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------
# Edge cases: an empty batch, targets out of range, option values.
# --------------------------------------------------------------------------


def _empty_inputs(name):
  """Logits [0, 4, 4, C] and integer labels [0, 4, 4] for the loss `name`."""
  channels = 1 if name in SIGMOID_ONLY else 3
  return jnp.zeros((0, 4, 4, channels)), jnp.zeros((0, 4, 4), jnp.int32)


@functools.cache
def _scaled_value_and_grad(name, **options):
  """Jitted value and gradient w.r.t. `w` of `loss(w * logits, labels)`.

  The gradient reaching a scalar parameter stands for the one reaching a model's
  weights: with no examples it must be exactly 0, not NaN.
  """
  fn = functools.partial(losses.get_loss(name), **options)
  return jax.jit(jax.value_and_grad(lambda w, logits, labels: fn(w * logits, labels)))


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_an_empty_batch_gives_zero_and_a_zero_gradient(name, reduction):
  # Dice, Tversky, generalized Dice and the sums with them gave NaN for 'mean'.
  logits, labels = _empty_inputs(name)
  eager = losses.get_loss(name)(logits, labels, reduction=reduction)
  loss, grad = _scaled_value_and_grad(name, reduction=reduction)(1.0, logits, labels)
  assert eager.shape == loss.shape == ()
  assert float(eager) == 0.0 and float(loss) == 0.0
  assert float(grad) == 0.0  # Finite and zero.
  per_example = losses.get_loss(name)(logits, labels, reduction='none')
  assert per_example.shape == (0,)


@pytest.mark.parametrize(
  'name', ['dice', 'tversky', 'generalized_dice', 'dice_ce', 'dice_bce', 'focal_dice']
)
def test_an_empty_batch_gives_zero_with_batch_true_and_any_smoothing(name):
  # batch=True sums over no pixels: 1 - smooth_nr / smooth_dr = 0.5 before, not 0.
  logits, labels = _empty_inputs(name)
  options = {'batch': True, 'smooth_nr': 1.0, 'smooth_dr': 2.0}
  loss, grad = _scaled_value_and_grad(name, **options)(1.0, logits, labels)
  assert float(loss) == 0.0 and float(grad) == 0.0
  assert float(losses.get_loss(name)(logits, labels, **options)) == 0.0


def test_an_empty_batch_of_soft_targets_gives_zero():
  logits = jnp.zeros((0, 4, 4, 3))
  assert float(losses.dice_ce_loss(logits, jnp.zeros((0, 4, 4, 3)))) == 0.0


def test_deep_supervision_of_an_empty_batch_gives_zero_and_a_zero_gradient():
  fn = functools.partial(losses.dice_ce_loss, ignore_index=255)
  labels = jnp.zeros((0, 8, 8), jnp.int32)
  main, aux = jnp.ones((0, 8, 8, 3)), (jnp.ones((0, 4, 4, 3)), jnp.ones((0, 2, 2, 3)))

  def loss(w):
    outputs = (w * main, tuple(w * head for head in aux))
    return losses.deep_supervision_loss(fn, outputs, labels, strides=((2, 2), (4, 4)))

  value, grad = jax.value_and_grad(loss)(1.0)
  assert float(value) == 0.0 and float(grad) == 0.0


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
@pytest.mark.parametrize(
  'where, value, found',
  [
    ('negative', -0.25, r'min -0.25, max 1'),
    ('above one', 1.5, r'min .*, max 1.5'),
    ('not a number', math.nan, r'min .*, max 1, 1 non-finite'),
  ],
)
def test_a_soft_target_outside_zero_one_raises(name, where, value, found):
  del where
  channels = 1 if name in SIGMOID_ONLY else 3
  targets = np.zeros((2, 4, 4, channels), np.float32)
  targets[..., 0] = 1.0
  targets[1, 2, 3, 0] = value
  with pytest.raises(ValueError, match=r'must be finite and in \[0, 1\], got ' + found):
    losses.get_loss(name)(jnp.zeros(targets.shape), jnp.asarray(targets))


def test_soft_targets_inside_zero_one_and_class_indices_are_accepted():
  logits = jnp.zeros((1, 1, 2, 2))  # Two pixels, two classes, probabilities 1/2.
  soft = jnp.asarray([[[[0.0, 1.0], [0.25, 0.75]]]])
  # Every pixel's cross-entropy is log 2, whatever its (soft) target.
  assert float(losses.cross_entropy_loss(logits, soft)) == pytest.approx(math.log(2))
  # Class indices outside [0, C) are not probabilities: all-zero targets, no error.
  assert float(losses.cross_entropy_loss(logits, jnp.asarray([[[0, -1]]]))) == (
    pytest.approx(math.log(2) / 2)
  )


def test_soft_target_values_are_not_checked_under_jit():
  # Under jit the values are unknown when the loss is traced: the jitted step
  # carries no check (documented in unet_jax.losses), and the data pipeline
  # produces integer class maps, not soft targets.
  targets = jnp.full((1, 2, 2, 2), 0.5).at[0, 0, 0, 0].set(-1.0)
  loss = jax.jit(losses.cross_entropy_loss)(jnp.zeros((1, 2, 2, 2)), targets)
  jaxpr = jax.make_jaxpr(losses.dice_ce_loss)(jnp.zeros((1, 2, 2, 2)), targets)
  assert not [e for e in jaxpr.eqns if 'callback' in e.primitive.name]
  # Hand value: three pixels of log 2, one of -(-1 + 0.5) * log(1/2) = -0.5 log 2.
  assert float(loss) == pytest.approx(2.5 * math.log(2) / 4)
  with pytest.raises(ValueError, match='in \\[0, 1\\]'):
    losses.cross_entropy_loss(jnp.zeros((1, 2, 2, 2)), targets)


@pytest.mark.parametrize(
  'call, match',
  [
    (
      lambda: losses.focal_loss(LOGITS, LABELS, gamma=-1.0),
      r'gamma must be .* >= 0, got -1.0',
    ),
    (lambda: losses.focal_dice_loss(LOGITS, LABELS, gamma=math.inf), 'gamma .* got inf'),
    (
      lambda: losses.focal_loss(LOGITS, LABELS, alpha=1.5),
      r'alpha .* in \[0, 1\], got 1.5',
    ),
    (
      lambda: losses.focal_loss(LOGITS, LABELS, alpha=[1.0, 2.0, -3.0]),
      r'alpha must be finite and >= 0, got \[1.0, 2.0, -3.0\]',
    ),
    (
      lambda: losses.focal_loss(
        LOGITS, LABELS, alpha=[0.5, 2.0, 1.0], activation='sigmoid'
      ),
      r'alpha must be finite and in \[0, 1\], got \[0.5, 2.0, 1.0\]',
    ),
    (lambda: losses.tversky_loss(LOGITS, LABELS, alpha=-0.5), 'alpha .* >= 0, got -0.5'),
    (lambda: losses.tversky_loss(LOGITS, LABELS, beta=math.nan), 'beta .* got nan'),
    (
      lambda: losses.tversky_loss(LOGITS, LABELS, alpha=0.0, beta=0.0),
      r'alpha \+ beta must be > 0 .* got alpha=0.0, beta=0.0',
    ),
    (lambda: losses.dice_loss(LOGITS, LABELS, smooth_dr=-1e-5), 'smooth_dr .* got -1e-05'),
    (
      lambda: losses.generalized_dice_loss(LOGITS, LABELS, smooth_nr=-1.0),
      'smooth_nr .* got -1.0',
    ),
    (
      lambda: losses.dice_loss(LOGITS, LABELS, class_weights=[1.0, -1.0, 1.0]),
      r'class_weights .* >= 0, got \[1.0, -1.0, 1.0\]',
    ),
    (
      lambda: losses.cross_entropy_loss(LOGITS, LABELS, class_weights=[1.0, math.nan, 1.0]),
      'class_weights .* got',
    ),
    (
      lambda: losses.cross_entropy_loss(LOGITS, LABELS, label_smoothing=1.5),
      r'label_smoothing must be finite and in \[0, 1\], got 1.5',
    ),
    (lambda: losses.dice_ce_loss(LOGITS, LABELS, lambda_ce=-1.0), 'lambda_ce .* got -1.0'),
    (
      lambda: losses.dice_bce_loss(LOGITS[..., :1], LABELS, lambda_dice=math.nan),
      'lambda_dice .* got nan',
    ),
    (
      lambda: losses.focal_dice_loss(LOGITS, LABELS, lambda_focal=-2.0),
      'lambda_focal .* got -2.0',
    ),
    (lambda: losses.dice_loss(LOGITS, LABELS, smooth_nr='a'), 'smooth_nr must be a number'),
  ],
)
def test_option_values_out_of_range_raise_naming_the_option(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_traced_options_are_not_checked_and_still_work():
  # Numbers such as gamma may be arguments of a jitted function (README).
  logits, labels = _inputs('focal', SPATIAL['2d'], seed=9)
  traced = jax.jit(lambda gamma: losses.focal_loss(logits, labels, gamma=gamma))(2.0)
  np.testing.assert_allclose(
    traced, losses.focal_loss(logits, labels, gamma=2.0), rtol=1e-6
  )
  tversky = jax.jit(lambda a, b: losses.tversky_loss(logits, labels, alpha=a, beta=b))
  np.testing.assert_allclose(
    tversky(0.5, 0.5), losses.tversky_loss(logits, labels), rtol=1e-6
  )


def test_option_values_at_their_bounds_are_accepted():
  # 0 is allowed wherever >= 0 is asked; a softmax class-balance alpha may exceed 1.
  logits, labels = _inputs('focal', SPATIAL['2d'], seed=10)
  for loss in (
    losses.focal_loss(logits, labels, gamma=0.0, alpha=[0.0, 2.0, 1.0]),
    losses.tversky_loss(logits, labels, alpha=0.0, beta=1.0),
    losses.cross_entropy_loss(logits, labels, label_smoothing=1.0, class_weights=[0, 1, 1]),
    losses.dice_ce_loss(logits, labels, lambda_dice=0.0, smooth_nr=0.0),
  ):
    assert np.isfinite(float(loss))
