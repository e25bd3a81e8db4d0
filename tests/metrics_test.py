"""Tests for unet_jax.metrics, against scikit-learn and hand-computed values."""

import fractions
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from unet_jax import metrics

SPATIAL = {'2d': (6, 7), '3d': (3, 4, 5)}


def _class_maps(spatial, *, num_classes=4, seed=0, batch_size=3):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=(batch_size, *spatial))
  predictions = np.where(
    rng.random(labels.shape) < 0.6,
    labels,
    rng.integers(0, num_classes, size=labels.shape),
  )
  return predictions.astype(np.int32), labels.astype(np.int32)


def _sklearn_cm(predictions, labels, num_classes):
  return skm.confusion_matrix(
    np.ravel(labels), np.ravel(predictions), labels=range(num_classes)
  )


# --------------------------------------------------------------------------
# confusion_matrix.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('dims', sorted(SPATIAL))
def test_confusion_matrix_equals_sklearn(dims):
  predictions, labels = _class_maps(SPATIAL[dims])
  cm = metrics.confusion_matrix(predictions, labels, 4)
  assert cm.shape == (4, 4)
  assert cm.dtype == jnp.int32
  np.testing.assert_array_equal(cm, _sklearn_cm(predictions, labels, 4))


def test_confusion_matrix_hand_values():
  # Rows true, columns predicted.
  labels = np.array([[0, 0, 1, 1, 2]])
  predictions = np.array([[0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(
    metrics.confusion_matrix(predictions, labels, 3),
    [[1, 1, 0], [0, 2, 0], [1, 0, 0]],
  )


@pytest.mark.parametrize('ignore_index', [255, 0, -1])
def test_confusion_matrix_ignore_index(ignore_index):
  predictions, labels = _class_maps(SPATIAL['2d'], seed=1)
  labels[:, :2] = ignore_index
  keep = labels != ignore_index
  cm = metrics.confusion_matrix(predictions, labels, 4, ignore_index=ignore_index)
  np.testing.assert_array_equal(cm, _sklearn_cm(predictions[keep], labels[keep], 4))
  assert int(cm.sum()) == keep.sum()


def test_confusion_matrix_drops_out_of_range_values():
  labels = np.array([[0, 1, 7, -3, 1]])
  predictions = np.array([[0, 1, 1, 0, 9]])
  cm = metrics.confusion_matrix(predictions, labels, 2)
  np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])


def test_confusion_matrix_jit_equals_eager():
  predictions, labels = _class_maps(SPATIAL['3d'], seed=2)
  cm_fn = jax.jit(
    functools.partial(metrics.confusion_matrix, num_classes=4, ignore_index=3)
  )
  np.testing.assert_array_equal(
    cm_fn(predictions, labels),
    metrics.confusion_matrix(predictions, labels, 4, ignore_index=3),
  )


def test_confusion_matrices_add_up_under_psum():
  # Batches on a named axis (as on devices): psum gives the whole-set matrix.
  predictions, labels = _class_maps(SPATIAL['2d'], seed=3, batch_size=4)

  def shard_cm(p, y):
    return jax.lax.psum(metrics.confusion_matrix(p, y, 4), 'shards')

  summed = jax.vmap(shard_cm, axis_name='shards')(
    predictions.reshape(2, 2, *SPATIAL['2d']),
    labels.reshape(2, 2, *SPATIAL['2d']),
  )
  whole = _sklearn_cm(predictions, labels, 4)
  np.testing.assert_array_equal(summed[0], whole)
  np.testing.assert_array_equal(summed[1], whole)


def test_confusion_matrix_in_shard_map_on_four_devices():
  # Runs in a subprocess: the device count is fixed when jax starts.
  script = textwrap.dedent("""
      import functools
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, PartitionSpec as P
      from unet_jax import metrics
      assert jax.device_count() == 4
      rng = np.random.default_rng(0)
      labels = rng.integers(0, 3, size=(8, 5, 5)).astype(np.int32)
      predictions = rng.integers(0, 3, size=(8, 5, 5)).astype(np.int32)
      mesh = Mesh(np.array(jax.devices()), ('data',))

      @jax.jit
      @functools.partial(jax.shard_map, mesh=mesh,
                         in_specs=(P('data'), P('data')), out_specs=P())
      def global_cm(p, y):
        return jax.lax.psum(metrics.confusion_matrix(p, y, 3), 'data')

      expected = np.zeros((3, 3), np.int64)
      np.add.at(expected, (labels.ravel(), predictions.ravel()), 1)
      np.testing.assert_array_equal(global_cm(predictions, labels), expected)
      print('ok')
  """)
  env = dict(
    os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu'
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, '-c', script],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'


def test_confusion_matrix_exact_past_2_to_the_24_pixels():
  # 4097^2 = 2^24 + 8193 pixels, all background: an odd count above 2^24,
  # which float32 cannot represent.
  count = 4097 * 4097
  assert int(np.float32(count)) != count
  labels = jnp.zeros((1, 4097, 4097), jnp.uint8)
  cm = metrics.confusion_matrix(labels, labels, 2)
  assert int(cm[0, 0]) == count
  assert int(cm.sum()) == count


# --------------------------------------------------------------------------
# Metrics from a confusion matrix.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('dims', sorted(SPATIAL))
def test_per_class_metrics_equal_sklearn(dims):
  predictions, labels = _class_maps(SPATIAL[dims], num_classes=5, seed=4)
  # Class 4: in the ground truth only; class 3: in neither (absent).
  labels[labels == 3] = 4
  predictions[predictions >= 3] = 0
  y_true, y_pred = labels.ravel(), predictions.ravel()
  cm = np.asarray(metrics.confusion_matrix(predictions, labels, 5))
  iou = metrics.iou_per_class(cm)
  dice = metrics.dice_per_class(cm)
  np.testing.assert_allclose(
    dice,
    skm.f1_score(y_true, y_pred, labels=range(5), average=None, zero_division=np.nan),
  )
  # jaccard_score takes zero_division in {0, 1} only: it gives the absent
  # class 0 where this module gives NaN; the other classes agree.
  sk_iou = skm.jaccard_score(y_true, y_pred, labels=range(5), average=None, zero_division=0)
  np.testing.assert_allclose(np.nan_to_num(iou, nan=0.0), sk_iou)
  assert np.isnan(iou[3]) and np.isnan(dice[3])
  assert iou[4] == 0.0 and dice[4] == 0.0  # Missed entirely: 0, not NaN.
  # Means leave the absent class out and keep the missed one.
  assert metrics.mean_iou(cm) == pytest.approx(np.mean(iou[[0, 1, 2, 4]]))
  assert metrics.mean_dice(cm) == pytest.approx(np.mean(dice[[0, 1, 2, 4]]))
  assert metrics.pixel_accuracy(cm) == pytest.approx(skm.accuracy_score(y_true, y_pred))


def test_metrics_hand_values():
  # TP = [3, 1], FP = [1, 2], FN = [2, 1].
  cm = np.array([[3, 2], [1, 1]])
  np.testing.assert_allclose(metrics.iou_per_class(cm), [3 / 6, 1 / 4])
  np.testing.assert_allclose(metrics.dice_per_class(cm), [6 / 9, 2 / 5])
  assert metrics.mean_iou(cm) == pytest.approx((3 / 6 + 1 / 4) / 2)
  assert metrics.mean_dice(cm) == pytest.approx((6 / 9 + 2 / 5) / 2)
  assert metrics.pixel_accuracy(cm) == pytest.approx(4 / 7)


def test_perfect_and_disjoint_predictions():
  labels = np.array([[0, 1, 1, 2]])
  perfect = np.asarray(metrics.confusion_matrix(labels, labels, 3))
  np.testing.assert_array_equal(metrics.iou_per_class(perfect), [1, 1, 1])
  assert metrics.mean_dice(perfect) == 1.0
  assert metrics.pixel_accuracy(perfect) == 1.0
  disjoint = np.asarray(metrics.confusion_matrix((labels + 1) % 3, labels, 3))
  np.testing.assert_array_equal(metrics.dice_per_class(disjoint), [0, 0, 0])
  assert metrics.mean_iou(disjoint) == 0.0
  assert metrics.pixel_accuracy(disjoint) == 0.0


def test_empty_matrix_gives_nan_without_warnings():
  cm = np.zeros((3, 3), np.int64)
  with np.errstate(all='raise'):
    assert np.all(np.isnan(metrics.iou_per_class(cm)))
    assert np.isnan(metrics.mean_iou(cm))
    assert np.isnan(metrics.mean_dice(cm))
    assert np.isnan(metrics.pixel_accuracy(cm))


def test_host_metrics_exact_for_int64_counts():
  # Counts past int32 and float32 range, as a host-side int64 total has.
  big = 3 * 2**31 + 1
  cm = np.array([[big, 1], [2, 2**40]], np.int64)
  expected = fractions.Fraction(big + 2**40, big + 2**40 + 3)
  assert metrics.pixel_accuracy(cm) == float(expected)
  np.testing.assert_array_equal(
    metrics.iou_per_class(cm),
    [float(fractions.Fraction(big, big + 3)), float(fractions.Fraction(2**40, 2**40 + 3))],
  )
  # Device int32 matrices accumulate exactly into int64 on the host.
  total = np.zeros((2, 2), np.int64)
  for _ in range(3):
    total += np.asarray(jnp.array([[2**30, 0], [0, 1]], jnp.int32))
  assert total[0, 0] == 3 * 2**30
  assert metrics.pixel_accuracy(total) == 1.0


# --------------------------------------------------------------------------
# per_image_dice.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('dims', sorted(SPATIAL))
def test_per_image_dice_equals_sklearn(dims):
  predictions, labels = _class_maps(SPATIAL[dims], seed=5)
  predictions[0][predictions[0] == 2] = 0
  labels[0][labels[0] == 2] = 1  # Class 2 absent from example 0.
  dice = jax.jit(functools.partial(metrics.per_image_dice, num_classes=4))(
    predictions, labels
  )
  assert dice.shape == (3, 4)
  for n in range(3):
    expected = skm.f1_score(
      labels[n].ravel(),
      predictions[n].ravel(),
      labels=range(4),
      average=None,
      zero_division=np.nan,
    )
    np.testing.assert_allclose(dice[n], expected, rtol=1e-6)
  assert np.isnan(dice[0, 2])
  assert not np.any(np.isnan(dice[1:]))


def test_per_image_dice_ignore_index():
  labels = np.array([[[1, 1, 255, 0]], [[0, 255, 255, 255]]])
  predictions = np.array([[[1, 0, 1, 0]], [[0, 1, 1, 1]]])
  dice = metrics.per_image_dice(predictions, labels, 2, ignore_index=255)
  # Example 0: class 0 TP 1, FP 1; class 1 TP 1, FN 1. Example 1: one pixel.
  np.testing.assert_allclose(dice[0], [2 / 3, 2 / 3])
  np.testing.assert_allclose(dice[1, 0], 1.0)
  assert np.isnan(dice[1, 1])


# --------------------------------------------------------------------------
# Input validation.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  'call',
  [
    lambda: metrics.confusion_matrix(np.zeros((2, 3), int), np.zeros((2, 4), int), 2),
    lambda: metrics.confusion_matrix(np.zeros((2, 3)), np.zeros((2, 3), int), 2),
    lambda: metrics.confusion_matrix(np.zeros((2, 3), int), np.zeros((2, 3), int), 0),
    lambda: metrics.iou_per_class(np.zeros((2, 3), int)),
    lambda: metrics.mean_dice(np.zeros((4,), int)),
    lambda: metrics.per_image_dice(np.zeros((2, 3), int), np.zeros((2, 3, 1), int), 2),
  ],
)
def test_bad_inputs_raise_value_error(call):
  with pytest.raises(ValueError):
    call()
