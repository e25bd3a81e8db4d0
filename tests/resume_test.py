"""What a run refuses and what it keeps: changed models, poisoned states, bad workdirs."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import models_test
from tests import train_test
from unet_jax import checkpointing
from unet_jax import train
from unet_jax.data import pipeline as input_pipeline
from unet_jax.inference import predictor as inference
from unet_jax.models import factory
from unet_jax.train import config_checks
from unet_jax.train import steps as train_steps

tiny_config = train_test.tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  input_pipeline.open(tiny_config(path).data, divisor=4)
  return path


@pytest.fixture(scope='module')
def three_steps(data_dir, tmp_path_factory):
  """A finished 3-step run: its workdir and the files it holds."""
  workdir = str(tmp_path_factory.mktemp('three'))
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=3), workdir)
  return workdir


def _files(workdir):
  return {
    os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
    for d, _, files in os.walk(workdir)
    for f in files
  }


@pytest.mark.parametrize(
  'overrides, fields',
  [
    ({'model.features': 8}, ['model.features: 4 in the checkpoint, 8 now']),
    ({'model.depth': 3}, ['model.depth: 2 in the checkpoint, 3 now']),
    ({'optimizer.name': 'sgd'}, ["optimizer.name: 'adam' in the checkpoint, 'sgd' now"]),
  ],
)
def test_resume_refuses_a_changed_model_and_writes_nothing(
  three_steps, data_dir, overrides, fields
):
  before = _files(three_steps)
  with open(os.path.join(three_steps, 'config.json')) as f:
    config_json = f.read()
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(
      tiny_config(data_dir, num_train_steps=3, **overrides), three_steps
    )
  message = str(e.value)
  assert os.path.join(three_steps, 'checkpoints', '3') in message
  for field in fields:
    assert field in message
  assert _files(three_steps) == before
  with open(os.path.join(three_steps, 'config.json')) as f:
    assert f.read() == config_json


def test_fields_that_may_change_on_resume_are_logged(
  three_steps, data_dir, tmp_path, caplog
):
  workdir = str(tmp_path / 'longer')
  os.system(f'cp -r {three_steps} {workdir}')
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(
      tiny_config(data_dir, num_train_steps=5, **{'optimizer.learning_rate': 3e-4}), workdir
    )
  logged = [r.getMessage() for r in caplog.records]
  assert 'Changed on resume: num_train_steps: 3 -> 5' in logged
  assert 'Changed on resume: optimizer.learning_rate: 0.001 -> 0.0003' in logged
  assert 0 <= result['eval']['dice'] <= 1
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  assert manager.latest_step() == 5
  record = checkpointing.read_record(manager, 5)
  assert record['num_train_steps'] == 5 and record['data_shape'] == {
    'num_channels': 1,
    'ndim': 2,
  }


def test_kernels_may_change_on_resume_and_old_kernel_fields_are_dropped(caplog):
  saved = {'model': {'features': 4, **models_test.OLD_KERNEL_FIELDS}, 'seed': 0}
  current = {'model': {'features': 4}, 'kernels': 'xla', 'seed': 0}
  with caplog.at_level(logging.INFO):
    changes = config_checks.check_resume(saved, current, where='ckpt')
  assert changes == ["kernels: None -> 'xla'"]
  assert any('Ignoring the recorded config.model fields' in m for m in caplog.messages)
  with pytest.raises(ValueError, match='model.features: 4 in the checkpoint, 8 now'):
    config_checks.check_resume(saved, dict(current, model={'features': 8}), where='ckpt')


def test_the_compute_dtype_may_change_on_resume_but_not_the_parameter_dtype():
  saved = {'model': {'features': 4, 'dtype': 'float32', 'param_dtype': 'float32'}}
  current = {'model': {'features': 4, 'dtype': 'auto', 'param_dtype': 'float32'}}
  changes = config_checks.check_resume(saved, current, where='ckpt')
  assert changes == ["model.dtype: 'float32' -> 'auto'"]
  current['model']['param_dtype'] = 'bfloat16'
  with pytest.raises(ValueError, match="model.param_dtype: 'float32' in the checkpoint"):
    config_checks.check_resume(saved, current, where='ckpt')


def test_a_run_recorded_with_the_old_kernel_fields_loads_and_resumes(
  three_steps, data_dir, tmp_path, monkeypatch, caplog
):
  workdir = str(tmp_path / 'old')
  shutil.copytree(three_steps, workdir)
  real = checkpointing.read_record

  def old_record(manager, step):  # As a run before config.kernels recorded it.
    record = dict(real(manager, step))
    record['model'] = {**record['model'], **models_test.OLD_KERNEL_FIELDS}
    del record['kernels']
    return record

  monkeypatch.setattr(checkpointing, 'read_record', old_record)
  predictor = inference.load(workdir, step='latest')
  assert predictor.step == 3 and predictor.model.features == 4
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(
      tiny_config(data_dir, num_train_steps=4, kernels='xla'), workdir
    )
  logged = [r.getMessage() for r in caplog.records]
  assert "Changed on resume: kernels: None -> 'xla'" in logged
  assert 'Resumed from %s at step 3.' % os.path.join(workdir, 'checkpoints', '3') in logged


def test_a_non_finite_update_is_never_saved(data_dir, tmp_path, monkeypatch):
  # The optimizer's update of step 2 is infinite. The loss of step 2 is computed
  # before that update, from finite parameters, so it is finite: only the state
  # after it is not.
  real = train.create_optimizer

  def overflowing(config):
    blow_up = optax.scale_by_schedule(lambda count: jnp.where(count >= 1, jnp.inf, 1.0))
    return optax.chain(real(config), blow_up)

  monkeypatch.setattr(train_steps, 'create_optimizer', overflowing)  # What setup calls.
  workdir = str(tmp_path / 'overflow')
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(tiny_config(data_dir, checkpoint_every_steps=1), workdir)
  message = str(e.value)
  assert 'not finite after step 2' in message
  assert 'the last good checkpoint is step 1' in message
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1']
  _, state = train_test._final_state(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  losses = train_test._train_losses(workdir)
  assert len(losses) == 2 and np.isfinite(losses).all()


@pytest.mark.parametrize(
  'kind, match',
  [
    ('file', 'is a file, not a folder'),
    ('under a file', 'cannot be created'),
  ],
)
def test_a_bad_workdir_fails_before_the_data_is_built(tmp_path, kind, match):
  (tmp_path / 'a_file').write_text('not a folder')
  workdir = tmp_path / 'a_file' if kind == 'file' else tmp_path / 'a_file' / 'run'
  data_dir = tmp_path / 'tfds'
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config(str(data_dir)), str(workdir))
  assert not data_dir.exists()


def test_every_model_option_is_reachable_from_the_config(data_dir):
  config = tiny_config(
    data_dir,
    **{
      'model.norm': 'group',
      'model.norm_groups': 2,
      'model.upsample': 'bilinear',
      'model.upsample_conv_kernel': 3,
      'model.deep_supervision': 1,
      'model.param_dtype': 'bfloat16',
      'model.pool_sizes': ((2, 2), (1, 2)),
    },
  )
  model = factory.create_model(config.model)
  assert (
    model.norm,
    model.norm_groups,
    model.upsample,
    model.upsample_conv_kernel,
    model.deep_supervision,
  ) == ('group', 2, 'bilinear', 3, 1)
  assert model.param_dtype == jnp.bfloat16
  assert model.pool_sizes == ((2, 2), (1, 2))
  config.model.unlock()
  config.model.widht = 3
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['widht'\].*'features'"):
    factory.create_model(config.model)


def test_deep_supervision_trains_end_to_end(data_dir, tmp_path):
  config = tiny_config(data_dir, num_train_steps=3, **{'model.deep_supervision': 1})
  result = train.train_and_evaluate(config, str(tmp_path / 'ds'))
  assert 0 <= result['eval']['dice'] <= 1
  losses = train_test._train_losses(str(tmp_path / 'ds'))
  assert len(losses) == 3 and np.isfinite(losses).all()
  _, state = train_test._final_state(str(tmp_path / 'ds'))
  assert 'aux_head1' in state['params']


def test_best_checkpoint_follows_the_configured_metric(data_dir, tmp_path):
  config = tiny_config(
    data_dir,
    best_metric='eval_pixel_accuracy',
    **{'evals.eval.every_steps': 2, 'checkpoint_every_steps': 2},
  )
  workdir = str(tmp_path / 'best')
  train.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  accuracy = {
    r['step']: r['eval_pixel_accuracy'] for r in rows if 'eval_pixel_accuracy' in r
  }
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=2)
  best = checkpointing.best_step(manager, best_metric='eval_pixel_accuracy')
  assert accuracy[best] == max(accuracy.values())
