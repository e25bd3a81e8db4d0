"""Evaluators on a real data set of several sizes: only real pixels count, by hand."""

import csv
import dataclasses
import types

import ml_collections
import numpy as np
import pytest

from unet_jax import evaluation as evaluators
from unet_jax.data import folder as sf
from unet_jax.data import pipeline as input_pipeline
from unet_jax.metrics import surface as surface_metrics

SIZES = ((20, 30), (27, 18), (24, 24), (9, 13), (16, 16))


def _predict(state, images):
  """A stand-in model, pixel by pixel: bright is class 1, dark class 2."""
  del state
  z = images[..., 0]
  return np.where(z > 0.5, 1, np.where(z < -0.8, 2, 0)).astype(np.int32)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A folder of 3-class examples of different sizes, padded to 32x32 to evaluate."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for i, (h, w) in enumerate(SIZES):
      label = np.zeros((h, w), np.uint8)
      label[2:8, 3:9] = 1
      label[h - 3 :, w - 4 :] = 2
      noisy = rng.integers(0, 255, (h, w)) * (rng.random((h, w)) < 0.2)
      image = 40 + 120 * (label == 1) - 40 * (label == 2) + noisy
      image = np.clip(image, 0, 255).astype(np.uint8)
      sf.write_pair(root, split, f'case{i}', image, label)
  config = ml_collections.ConfigDict(
    {
      'name': 'segmentation_folder',
      'config': '2d',
      'root': str(root),
      'data_dir': str(tmp_path_factory.mktemp('tfds')),
      'train_split': 'train',
      'eval_split': 'val',
      'size_policy': 'pad',
    }
  )
  return input_pipeline.open(config, divisor=8)


def _by_hand(data):
  """Each val example unpadded, with the stand-in model's prediction on it."""
  records = data.split('val')
  cases = []
  for i in range(len(records)):
    example = data.read(records, i)
    cases.append((example.case_id, _predict(None, example.image[None])[0], example.label))
  return cases


def _inputs(data, workdir, batch_size=2, name='eval'):
  return evaluators.common.Inputs(
    name=name,
    data=data,
    predict=_predict,
    num_classes=3,
    workdir=workdir,
    split='val',
    batch_size=batch_size,
  )


STATE = types.SimpleNamespace(step=np.int32(7))


def test_padding_is_left_out_of_every_metric(data):
  assert data.info.eval_spatial_shape == (32, 32)
  result = evaluators.confusion.Evaluator(_inputs(data, None)).run(STATE)
  cm = np.zeros((3, 3), np.int64)
  for _, pred, label in _by_hand(data):
    for t, p in zip(label.ravel(), pred.ravel()):
      cm[t, p] += 1
  assert cm.sum() == sum(h * w for h, w in SIZES)  # Only the real pixels.
  tp = np.diag(cm)
  dice = 2 * tp / (cm.sum(0) + cm.sum(1))
  iou = tp / (cm.sum(0) + cm.sum(1) - tp)
  np.testing.assert_allclose(result['dice_per_class'], dice)
  np.testing.assert_allclose(result['iou_per_class'], iou)
  assert result['pixel_accuracy'] == pytest.approx(tp.sum() / cm.sum())
  assert result['dice'] == pytest.approx(dice[1:].mean())
  # Counting the padding as background would have changed the figures.
  assert result['pixel_accuracy'] < 0.99


def test_the_batch_size_does_not_change_the_result(data):
  a = evaluators.confusion.Evaluator(_inputs(data, None, batch_size=2)).run(STATE)
  b = evaluators.confusion.Evaluator(_inputs(data, None, batch_size=4)).run(STATE)
  assert a == b


def test_samples_are_drawn(data, tmp_path):
  evaluators.confusion.Evaluator(_inputs(data, str(tmp_path)), samples=3).run(STATE)
  assert (tmp_path / 'samples' / 'eval_step_7.png').stat().st_size > 1000


def test_per_case_mean_and_std_over_cases(data, tmp_path):
  result = evaluators.per_case.Evaluator(_inputs(data, str(tmp_path), name='cases')).run(
    STATE
  )
  dice, names = [], []
  for name, pred, label in _by_hand(data):
    names.append(name)
    row = []
    for c in range(3):
      tp = np.sum((pred == c) & (label == c))
      total = np.sum(pred == c) + np.sum(label == c)
      row.append(2 * tp / total if total else np.nan)
    dice.append(row)
  dice = np.asarray(dice)
  foreground = np.nanmean(dice[:, 1:], axis=1)
  assert result['num_cases'] == len(SIZES)
  assert set(evaluators.per_case.Evaluator.METRICS) <= set(result)  # best_metric's names.
  assert result['dice'] == pytest.approx(foreground.mean())
  assert result['dice_std'] == pytest.approx(foreground.std())
  np.testing.assert_allclose(result['dice_per_class_mean'], np.nanmean(dice, axis=0))
  np.testing.assert_allclose(result['dice_per_class_std'], np.nanstd(dice, axis=0))
  with open(tmp_path / 'eval' / 'cases_step_7.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['case'] for r in rows] == names  # In the order of the split.
  assert sorted(names) == [f'case{i}' for i in range(len(SIZES))]
  np.testing.assert_allclose([float(r['dice_1']) for r in rows], dice[:, 1], rtol=1e-5)


def test_boundary_per_case_in_physical_units(data, tmp_path):
  result = evaluators.boundary.Evaluator(
    _inputs(data, str(tmp_path), name='edge'), tolerance=1.0
  ).run(STATE)
  hd95, nsd = [], []
  for _, pred, label in _by_hand(data):
    values = surface_metrics.boundary_metrics(
      pred, label, num_classes=3, spacing=(1.0, 1.0), tolerance=1.0
    )
    hd95.append(values['hd95'])
    nsd.append(values['nsd'])
  hd95, nsd = np.asarray(hd95), np.asarray(nsd)
  assert np.isfinite(hd95).all()  # Both classes are predicted in every case.
  assert set(evaluators.boundary.Evaluator.METRICS) <= set(result)  # best_metric's names.
  assert result['hd95'] == pytest.approx(hd95.mean())
  assert result['hd95_infinite'] == 0
  assert result['nsd'] == pytest.approx(nsd.mean())
  np.testing.assert_allclose(result['nsd_per_class_mean'], nsd.mean(axis=0))
  with open(tmp_path / 'eval' / 'edge_step_7.csv') as f:
    header = next(csv.reader(f))
  assert header == ['case', 'hd95_1', 'hd95_2', 'nsd_1', 'nsd_2']


def test_an_infinite_distance_is_counted_not_averaged(data):
  def misses_class_2(state, images):
    return np.minimum(_predict(state, images), 1)

  inputs = dataclasses.replace(_inputs(data, None), predict=misses_class_2)
  result = evaluators.boundary.Evaluator(inputs).run(STATE)
  assert result['hd95_infinite'] == len(SIZES)  # Class 2 is missed in every case.
  assert np.isfinite(result['hd95'])
  assert result['hd95_per_class_mean'][1] != result['hd95_per_class_mean'][1]  # NaN.


def test_from_config_builds_and_checks():
  evals = ml_collections.ConfigDict(
    {
      'eval': {
        'type': 'confusion',
        'split': '',
        'every_steps': 5,
        'batch_size': 0,
        'samples': 2,
      },
      'cases': {'type': 'per_case', 'split': 'test', 'every_steps': 10, 'batch_size': 4},
    }
  )
  scheduled = evaluators.from_config(
    evals,
    data=None,
    predict=_predict,
    num_classes=2,
    workdir=None,
    default_split='val',
    default_batch_size=8,
  )
  by_name = {s.name: s for s in scheduled}
  assert sorted(by_name) == ['cases', 'eval']
  assert by_name['eval'].evaluator.inputs.split == 'val'
  assert by_name['cases'].evaluator.inputs.split == 'test'
  assert by_name['eval'].evaluator.inputs.batch_size == 8
  assert by_name['cases'].evaluator.inputs.batch_size == 4
  assert by_name['eval'].evaluator.samples == 2
  assert by_name['eval'].due(5, 12) and not by_name['cases'].due(5, 12)
  assert by_name['eval'].due(10, 12) and by_name['cases'].due(10, 12)
  assert by_name['cases'].due(12, 12)  # The last step.


@pytest.mark.parametrize(
  'entry, match',
  [
    ({'type': 'hausdorff', 'every_steps': 1}, r"type='hausdorff' is not one of"),
    (
      {'type': 'confusion', 'every_steps': 1, 'tolerance': 2.0},
      r"unknown option\(s\) \['tolerance'\].*samples",
    ),
    ({'type': 'boundary', 'every_steps': 0}, 'every_steps must be positive'),
  ],
)
def test_bad_evaluator_configs(entry, match):
  with pytest.raises(ValueError, match=match):
    evaluators.check_config({'x': entry})


def test_volumes_larger_than_the_patch_are_evaluated_in_sliding_windows(tmp_path):
  config = ml_collections.ConfigDict(
    {
      'name': 'synthetic_volumes',
      'config': 'tiny',
      'data_dir': str(tmp_path),
      'train_split': 'train',
      'eval_split': 'validation',
      'size_policy': 'pad',
    }
  )
  volumes = input_pipeline.open(config, divisor=4)
  assert volumes.info.eval_spatial_shape == (16, 32, 32)
  calls = []

  def logits(state, images):  # Pixel by pixel, so windows blend to the same result.
    del state
    calls.append(images.shape)
    z = images[..., :1]
    return np.concatenate([np.zeros_like(z), z - 0.5], axis=-1)

  def predict(state, images):
    return np.argmax(logits(state, images), axis=-1)

  inputs = evaluators.common.Inputs(
    name='eval',
    data=volumes,
    predict=predict,
    num_classes=2,
    workdir=None,
    split='validation',
    batch_size=2,
    logits=logits,
  )
  whole = evaluators.confusion.Evaluator(inputs).run(STATE)
  assert calls == [(2, 16, 32, 32, 1)] * 2  # 4 volumes, 2 a batch, whole.
  calls.clear()
  windows = evaluators.confusion.Evaluator(
    dataclasses.replace(inputs, patch_size=(8, 16, 16), divisor=4)
  ).run(STATE)
  # 3 x 3 x 3 windows of each volume, 2 windows a call.
  assert calls == [(2, 8, 16, 16, 1)] * (4 * 14)
  assert windows == whole
  assert 0 < whole['dice'] < 1


def test_a_patch_the_model_cannot_take_is_refused():
  evals = {'eval': {'type': 'confusion', 'every_steps': 1, 'patch_size': (8, 12, 16)}}
  with pytest.raises(ValueError, match=r'patch_size=\(8, 12, 16\) must have one'):
    evaluators.from_config(
      evals,
      data=None,
      predict=_predict,
      num_classes=2,
      workdir=None,
      default_split='val',
      default_batch_size=2,
      divisor=(1, 8, 8),
    )
