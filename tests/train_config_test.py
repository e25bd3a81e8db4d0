"""Config handling: every config loads, bad configs fail before anything compiles."""

import importlib

import numpy as np
import pytest

from unet_jax import train
from unet_jax.data import pipeline as input_pipeline
from unet_jax.models import factory
from unet_jax.train import config_checks

CONFIGS = (
  'default',
  'dice_bce',
  'dice_ce',
  'focal_dice',
  'unet3d',
  'pets',
  'folder',
  'resenc_m',
  'resenc_l',
  'resenc_xl',
)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_is_valid_and_documents_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__
  config = module.get_config()
  config_checks.validate_config(config, num_devices=1, process_count=1)
  model = factory.create_model(config.model, kernels=config.kernels)
  for field in ('features', 'depth', 'upsample', 'norm', 'num_classes'):
    assert getattr(model, field) == config.model[field]
  lr = train.create_learning_rate_fn(config)
  warmup = min(config.optimizer.warmup_steps, config.num_train_steps)
  assert float(lr(warmup)) == pytest.approx(config.optimizer.learning_rate)
  assert train.create_optimizer(config).init({'w': np.zeros(3)}) is not None


def _config(**overrides):
  config = importlib.import_module('configs.default').get_config()
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize(
  'overrides,match',
  [
    ({'loss.name': 'dicey'}, r'dicey.*dice_bce'),
    ({'optimizer.name': 'lamb'}, r"optimizer.name='lamb'.*adam"),
    ({'optimizer.schedule': 'step'}, r'optimizer.schedule'),
    ({'parallelism': 'pjit'}, r'parallelism'),
    ({'model.upsample': 'nearest'}, r'model.upsample'),
    ({'model.dtype': 'float16'}, r'model.dtype'),
    ({'batch_size': 0}, r'batch_size must be positive'),
    ({'optimizer.learning_rate': -1.0}, r'learning_rate'),
    ({'model.num_classes': -2}, r'num_classes must be positive'),
    # A typo used to keep no best checkpoint, silently (--step=best then loads the latest).
    (
      {'best_metric': 'eval_dcie'},
      r"best_metric='eval_dcie' is not a metric of the configured evaluators; the valid"
      r" names are \['eval_dice', 'eval_mean_dice', 'eval_mean_iou',"
      r" 'eval_pixel_accuracy'\]",
    ),
    ({'best_metric': 'val_dice'}, r"best_metric='val_dice' is not a metric"),
    ({'optimizer.grad_clip_norm': -1.0}, r'grad_clip_norm must be finite and >= 0'),
  ],
)
def test_bad_config_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_checks.validate_config(_config(**overrides), num_devices=1, process_count=1)


def test_batch_not_divisible_by_devices():
  with pytest.raises(ValueError, match=r'batch_size=6 .* 4 devices'):
    config_checks.validate_config(_config(batch_size=6), num_devices=4, process_count=1)


def _info(num_classes, spatial_shape):
  return input_pipeline.DatasetInfo(
    num_classes=num_classes,
    num_channels=1,
    spatial_shape=spatial_shape,
    num_train=8,
    num_eval=4,
    spacing=None,
  )


def test_num_classes_must_match_the_data():
  config = _config(**{'model.num_classes': 3, 'loss.name': 'dice_ce'})
  with pytest.raises(ValueError, match=r'num_classes=3 .* 4 classes'):
    config_checks.validate_against_data(config, _info(4, (64, 64)))
  # One sigmoid logit for a binary data set is fine with dice_bce, not with dice_ce.
  config_checks.validate_against_data(_config(), _info(2, (64, 64)))
  with pytest.raises(ValueError, match='sigmoid loss'):
    config_checks.validate_against_data(
      _config(**{'loss.name': 'dice_ce'}), _info(2, (64, 64))
    )


def test_patch_size_the_model_cannot_take():
  config = importlib.import_module('configs.unet3d').get_config()
  with pytest.raises(ValueError, match=r'patch_size .* 20 along axis H'):
    config_checks.validate_against_data(config, _info(2, (16, 20, 32)))


@pytest.mark.parametrize('schedule', config_checks.SCHEDULES)
def test_learning_rate_schedule_warms_up_then_decays(schedule):
  config = _config(
    **{
      'optimizer.schedule': schedule,
      'optimizer.warmup_steps': 10,
      'num_train_steps': 100,
      'optimizer.learning_rate': 0.5,
    }
  )
  lr = train.create_learning_rate_fn(config)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 0.5, rtol=1e-6)
  if schedule == 'constant':
    np.testing.assert_allclose(float(lr(100)), 0.5, rtol=1e-6)
  else:
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)
    assert 0 < float(lr(55)) < 0.5


def test_every_evaluator_metric_named_for_best_metric_is_returned(tmp_path):
  # METRICS (what best_metric may name) against what the confusion evaluator returns.
  from unet_jax import metrics  # pylint: disable=g-import-not-at-top
  from unet_jax.evaluation import confusion  # pylint: disable=g-import-not-at-top

  summary = metrics.summarize(np.asarray([[5, 1], [2, 3]], np.int64))
  assert set(confusion.Evaluator.METRICS) <= set(summary)
  for name in confusion.Evaluator.METRICS:
    assert isinstance(summary[name], float)


def test_best_metric_of_a_per_case_evaluator_is_accepted():
  config = _config(best_metric='cases_dice_std')
  config.evals.cases = dict(config.evals.eval.to_dict(), type='per_case', samples=4)
  run = config_checks.validate_config(config, num_devices=1, process_count=1)
  assert config_checks.best_evaluator(run) == 'cases'
