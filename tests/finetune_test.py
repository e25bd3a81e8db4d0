"""Fine-tuning: `config.init_from` (another run's parameters) and `config.plan_from`
(another run's plan), on tiny folder data sets."""

import importlib
import json
import logging
import os

import jax
import numpy as np
import pytest

from unet_jax import checkpointing
from unet_jax import planning
from unet_jax import train
from unet_jax.data import folder as sf
from unet_jax.data import pipeline as input_pipeline
from unet_jax.planning.fingerprint import as_tuples
from unet_jax.train import config_checks
from unet_jax.train import finetune
from unet_jax.train import setup


def _config(root, data_dir, **extra):
  config = importlib.import_module('configs.folder').get_config()
  overrides = {
    'data.root': str(root),
    'data.data_dir': str(data_dir),
    'model.features': 4,
    'model.depth': 2,
    'batch_size': 2,
    'eval_batch_size': 2,
    'num_train_steps': 2,
    'log_every_steps': 1,
    'eval_every_steps': 2,
    'checkpoint_every_steps': 2,
    'plan': False,
    **extra,
  }
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def _write_2d(root, *, classes=2, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  for split, count in (('train', 4), ('val', 2)):
    for i in range(count):
      label = np.zeros((16, 16), np.uint8)
      label[3:9, 4:12] = 1
      if classes > 2:
        label[10:14, 2:7] = 2
      shape = (16, 16) if channels == 1 else (16, 16, channels)
      noise = rng.normal(60, 10, shape)
      image = (noise + 60 * (label if channels == 1 else label[..., None])).clip(0, 255)
      sf.write_pair(root, split, f'case{i}', image.astype(np.uint8), label)
  return root


def _variables(workdir, step=None):
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  state = manager.restore(manager.latest_step() if step is None else step)
  manager.close()
  return {k: state[k] for k in ('params', 'batch_stats', 'step')}


def _by_path(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A finished 2-step run on 2 classes, grey images: its workdir."""
  base = tmp_path_factory.mktemp('source')
  workdir = str(base / 'run')
  train.train_and_evaluate(_config(_write_2d(base / 'data'), base / 'tfds'), workdir)
  return workdir


def test_a_three_class_run_keeps_every_layer_but_the_head(source, tmp_path, caplog):
  data = _write_2d(tmp_path / 'data', classes=3, seed=1)
  config = _config(data, tmp_path / 'tfds', init_from=f'{source}:latest')
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.INFO):
    run = setup.prepare(config, workdir)
  start = _by_path({'params': run.state.params, 'batch_stats': run.state.batch_stats})
  old = _by_path({k: v for k, v in _variables(source).items() if k != 'step'})
  assert run.start_step == 0 and int(run.state.step) == 0
  assert start.keys() == old.keys()
  fresh = {"['params']['head']['kernel']", "['params']['head']['bias']"}
  for path, value in start.items():
    if path in fresh:
      assert value.shape[-1] == 3 and old[path].shape[-1] == 2, path
    else:
      np.testing.assert_array_equal(value, old[path], err_msg=path)
  assert any("['batch_stats']" in p for p in start)  # BatchNorm statistics too.
  # A fresh optimizer: Adam's moments are zero.
  for leaf in jax.tree.leaves(run.state.opt_state):
    if np.ndim(leaf):
      assert not np.any(np.asarray(leaf)), leaf.shape
  logged = caplog.messages
  assert f'init_from: initialised anew, params/head/kernel: (1, 1, 4, 2) in {source}' in (
    ' '.join(logged)
  )
  assert any('params/head/bias: (2,) in' in m and '(3,) now' in m for m in logged)
  run.manager.close()
  # It trains, and its record names where it started.
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['init_from'] == f'{source}:latest'


def test_another_channel_count_reinitialises_only_the_first_convolution(
  source, tmp_path, caplog
):
  data = _write_2d(tmp_path / 'data', channels=3, seed=2)
  config = _config(data, tmp_path / 'tfds', init_from=source)  # 'best' by default.
  with caplog.at_level(logging.INFO):
    run = setup.prepare(config, str(tmp_path / 'run'))
  run.manager.close()
  start = _by_path({'params': run.state.params, 'batch_stats': run.state.batch_stats})
  old = _by_path({k: v for k, v in _variables(source).items() if k != 'step'})
  first = "['params']['encoder0']['conv0']['kernel']"
  assert start[first].shape == (3, 3, 3, 4) and old[first].shape == (3, 3, 1, 4)
  for path, value in start.items():
    if path != first:
      np.testing.assert_array_equal(value, old[path], err_msg=path)
  anew = [m for m in caplog.messages if m.startswith('init_from: initialised anew')]
  assert len(anew) == 1 and 'params/encoder0/conv0/kernel: (3, 3, 1, 4) in' in anew[0]


@pytest.mark.parametrize(
  'field, value, path',
  [
    ('model.depth', 3, 'params/bottleneck/conv0/kernel: (3, 3, 8, 16) in'),
    ('model.features', 8, 'params/bottleneck/conv0/kernel: (3, 3, 8, 16) in'),
  ],
)
def test_another_depth_or_width_is_refused_before_any_step(
  source, tmp_path, field, value, path
):
  data = _write_2d(tmp_path / 'data')
  config = _config(data, tmp_path / 'tfds', init_from=source, **{field: value})
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert 'The first difference: ' + path in message, message
  assert f'{field}: {4 if field == "model.features" else 2} in {source}' in message
  assert not (workdir / 'config.json').exists()
  assert not os.listdir(workdir / 'checkpoints')


def test_the_merge_rule():
  conv = lambda c, k: {'kernel': np.zeros((3, 3, c, k), np.float32)}
  head = lambda k: {
    'kernel': np.zeros((1, 1, 4, k), np.float32),
    'bias': np.zeros((k,), np.float32),
  }
  tree = lambda c, k, f=4: {
    'params': {'encoder0': {'conv0': conv(c, f)}, 'head': head(k), 'aux_head1': head(k)}
  }
  merged, fresh = finetune.merge(tree(1, 2), tree(2, 3), where='a')
  assert len(fresh) == 5 and merged['params']['head']['bias'].shape == (3,)
  with pytest.raises(ValueError, match=r'params/encoder0/conv0/kernel: \(3, 3, 1, 4\)'):
    finetune.merge(tree(1, 2), tree(1, 2, f=8), where='a')  # Another width.
  other = tree(1, 2)
  other['params']['decoder9'] = conv(1, 1)
  with pytest.raises(ValueError, match=r'params/decoder9/kernel: absent in a, \(3, 3'):
    finetune.merge(tree(1, 2), other, where='a')
  assert finetune.parse('runs/pre') == ('runs/pre', 'best')
  assert finetune.parse('runs/pre:40') == ('runs/pre', 40)
  assert finetune.parse('gs://b/pre:latest') == ('gs://b/pre', 'latest')
  assert finetune.parse('gs://b/pre') == ('gs://b/pre', 'best')


def test_a_resume_continues_from_its_own_checkpoint(source, tmp_path, monkeypatch, caplog):
  data = _write_2d(tmp_path / 'data', classes=3, seed=3)
  workdir = str(tmp_path / 'run')
  config = _config(data, tmp_path / 'tfds', init_from=source)
  train.train_and_evaluate(config, workdir)
  own = _variables(workdir)

  def never(*args, **kwargs):
    raise AssertionError('init_from read on resume')

  monkeypatch.setattr(finetune, 'initialise', never)
  with caplog.at_level(logging.INFO):
    run = setup.prepare(
      _config(data, tmp_path / 'tfds', init_from=source, num_train_steps=4), workdir
    )
  run.manager.close()
  assert run.start_step == 2
  start = _by_path({'params': run.state.params, 'batch_stats': run.state.batch_stats})
  for path, value in _by_path({k: own[k] for k in ('params', 'batch_stats')}).items():
    np.testing.assert_array_equal(start[path], value, err_msg=path)
  assert any(
    'is not used: the run resumes from its own checkpoint (step 2)' in m
    for m in caplog.messages
  )
  # Another init_from on resume is refused: the record would name another source.
  with pytest.raises(ValueError, match=r"config.init_from='elsewhere': the run started"):
    setup.prepare(_config(data, tmp_path / 'tfds', init_from='elsewhere'), workdir)


def test_init_from_a_missing_run_names_it(tmp_path):
  data = _write_2d(tmp_path / 'data')
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=f"config.init_from='{missing}'"):
    train.train_and_evaluate(
      _config(data, tmp_path / 'tfds', init_from=missing), str(tmp_path / 'run')
    )


def _write_3d(root, *, spacing, ct, seed):
  rng = np.random.default_rng(seed)
  for split, count in (('train', 3), ('val', 1)):
    for i in range(count):
      label = np.zeros((8, 24, 24), np.uint8)
      label[2:6, 6:14, 8:16] = 1
      if ct:  # Hounsfield units: the plan's 'ct' normalisation.
        image = np.where(label == 1, 40, -1000) + rng.normal(0, 20, label.shape)
        image = image.astype(np.int16)
      else:  # Floats: a z-score per image.
        image = (rng.normal(0, 1, label.shape) + 2 * label).astype(np.float32)
      sf.write_pair(root, split, f'vol{i}', image, label, spacing=spacing)
  return root


def test_plan_from_reuses_the_plan_without_a_fingerprint(tmp_path, monkeypatch, caplog):
  # The source: a plan made from CT volumes at 3 x 1 x 1 mm (no training needed).
  src = _write_3d(tmp_path / 'src', spacing=(3.0, 1.0, 1.0), ct=True, seed=4)
  config = _config(src, tmp_path / 'tfds', plan=True, **{'data.config': '3d'})
  data = input_pipeline.open(config.data, divisor=1)
  os.makedirs(tmp_path / 'pre')
  setup.plan_run(config, data, str(tmp_path / 'pre'))
  source = planning.read_plan(str(tmp_path / 'pre' / 'plan.json'))
  assert source['data.normalization'] == 'ct'
  # A new data set (floats at 2 x 0.8 x 0.8 mm), planned from the source's plan.
  new = _write_3d(tmp_path / 'new', spacing=(2.0, 0.8, 0.8), ct=False, seed=5)

  def no_fingerprint(*args, **kwargs):
    raise AssertionError('fingerprinted')

  monkeypatch.setattr(planning, 'fingerprint', no_fingerprint)
  monkeypatch.setattr(setup, 'measure_step_time', no_fingerprint)
  batch = source['batch_size'] + 1  # Set on the command line: it wins.
  config = _config(
    new,
    tmp_path / 'tfds_new',
    plan=True,
    plan_from=str(tmp_path / 'pre'),
    plan_keep=('batch_size',),
    plan_time_budget=30.0,
    batch_size=batch,
    **{'data.config': '3d'},
  )
  workdir = tmp_path / 'run'
  with caplog.at_level(logging.INFO):
    run = setup.prepare(config, str(workdir))
  run.manager.close()
  with open(workdir / 'config.json') as f:
    recorded = json.load(f)
  for field in (
    'data.patch_size',
    'data.target_spacing',
    'data.normalization',
    'data.intensity_mean',
    'model.depth',
    'model.pool_sizes',
  ):
    section, leaf = field.split('.')
    assert as_tuples(recorded[section][leaf]) == source[field], field
  assert recorded['data']['target_spacing'] == [3.0, 1.0, 1.0]
  assert recorded['batch_size'] == batch and recorded['plan_from'] == str(tmp_path / 'pre')
  written = planning.read_plan(str(workdir / 'plan.json'))
  by_field = {c.field: c for c in written.choices}
  assert (
    by_field['batch_size'].overridden
    and by_field['batch_size'].planned == (source['batch_size'])
  )
  assert written.inputs['plan_from'] == str(tmp_path / 'pre' / 'plan.json')
  assert written.inputs['key'] == source.inputs['key']  # The source data's.
  assert not list((tmp_path / 'tfds_new').glob('**/unet_jax_fingerprint*'))
  table = next(m for m in caplog.messages if m.startswith('The plan of '))
  assert str(tmp_path / 'pre' / 'plan.json') in table and 'config.plan_from' in table
  assert any('plan_time_budget is not used' in m for m in caplog.messages)


@pytest.mark.parametrize('content', [None, '{"choices": 3}'])
def test_a_missing_or_unreadable_plan_from_names_the_file(tmp_path, content):
  (tmp_path / 'pre').mkdir()
  path = tmp_path / 'pre' / 'plan.json'
  if content is not None:
    path.write_text(content)
  data = _write_2d(tmp_path / 'data')
  config = _config(data, tmp_path / 'tfds', plan=True, plan_from=str(tmp_path / 'pre'))
  error = FileNotFoundError if content is None else ValueError
  with pytest.raises(error, match=f'config.plan_from=.*{path}'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'tfds').exists()  # Before the data is built.


def test_reused_class_weights_for_other_classes_are_left_out(tmp_path, caplog):
  choices = [
    planning.Choice('loss.name', 'dice_ce', 'nnU-Net'),
    planning.Choice('loss.kwargs.class_weights', (1.0, 4.0), 'class 1 is rare'),
  ]
  p = planning.reused(planning.Plan(choices), source='pre/plan.json')
  config = planning.apply(importlib.import_module('configs.folder').get_config(), p)
  info = type('Info', (), {'num_classes': 3})()
  with caplog.at_level(logging.INFO):
    kept = setup._write_reused_plan(config, p, info, str(tmp_path))
  assert 'class_weights' not in kept.loss.kwargs and kept.loss.name == 'dice_ce'
  assert [c.field for c in planning.read_plan(str(tmp_path / 'plan.json')).choices] == [
    'loss.name'
  ]
  assert any('they weigh 2 classes, and this data has 3' in m for m in caplog.messages)
  info.num_classes = 2  # The same classes: kept.
  same = setup._write_reused_plan(config, p, info, str(tmp_path))
  assert tuple(same.loss.kwargs.class_weights) == (1.0, 4.0)


def test_check_resume_takes_a_missing_init_from_as_none():
  saved = {'model': {'features': 4}, 'seed': 0}  # Recorded before init_from existed.
  assert config_checks.check_resume(saved, dict(saved, init_from=''), where='c') == []
  with pytest.raises(
    ValueError, match=r"init_from='runs/pre': the run started from random parameters"
  ):
    config_checks.check_resume(saved, dict(saved, init_from='runs/pre'), where='c')
