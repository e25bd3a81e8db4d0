"""Fold ensembles: averaged probabilities, compatible runs, saved probabilities,
post-processing at predict time and the memory plan, on one tiny trained 3D run.

Other runs are made from it without training: a copy, the same weights recorded
with another target spacing and patch, and a re-initialised model with another
class count.
"""

import copy
import functools
import importlib
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import nibabel
import numpy as np
import pytest

from unet_jax import checkpointing
from unet_jax import config as config_lib
from unet_jax import train
from unet_jax.data import folder as sf
from unet_jax.data import geometry
from unet_jax.data import phantoms
from unet_jax.inference import ensemble
from unet_jax.inference import inputs
from unet_jax.inference import postprocessing
from unet_jax.inference import predict
from unet_jax.inference import predictor as inference
from unet_jax.models import factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACING = (3.0, 1.0, 1.0)


def _config(base):
  config = importlib.import_module('configs.folder').get_config()
  overrides = {
    'data.root': str(base / 'data'),
    'data.data_dir': str(base / 'tfds'),
    'data.config': '3d',
    'model.features': 4,
    'model.depth': 2,
    'model.pool_sizes': (1, 2, 2),
    'kernels': 'xla',
    'batch_size': 2,
    'eval_batch_size': 2,
    'num_train_steps': 2,
    'log_every_steps': 1,
    'eval_every_steps': 2,
    'checkpoint_every_steps': 2,
    'plan': False,
  }
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def _derive(workdir, dest, edit, *, reinit=False):
  """A run folder holding `workdir`'s latest checkpoint under an edited record."""
  source = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  step = source.latest_step()
  record = copy.deepcopy(checkpointing.read_record(source, step))
  state = checkpointing.restore(source, None, step=step)
  source.close()
  edit(record)
  if reinit:  # Fresh variables of the model the edited record describes.
    model = factory.create_model(ml_collections.ConfigDict(record['model']), kernels='xla')
    shape = (1, 6, 16, 12, record['data_shape']['num_channels'])
    init = functools.partial(model.init, train=False)
    state = jax.device_get(init(jax.random.key(1), jnp.zeros(shape, jnp.float32)))
  manager = checkpointing.create_manager(os.path.join(dest, 'checkpoints'), keep=5)
  checkpointing.save(
    manager, step, {k: state[k] for k in ('params', 'batch_stats')}, record=record
  )
  manager.close()
  return str(dest)


def _set(record, **fields):
  for key, value in fields.items():
    section, name = key.split('__')
    record[section][name] = value


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A tiny trained 3D run (3 classes, 1 channel) and runs made from it."""
  base = tmp_path_factory.mktemp('ensemble')
  rng = np.random.default_rng(1)
  for split, count in (('train', 2), ('val', 1)):
    for i in range(count):
      label = np.zeros((6, 16, 12), np.uint8)
      label[1:4, 4:9, 3:8] = 1
      label[2:5, 10:14, 2:6] = 2
      image = rng.normal(0, 1, label.shape).astype(np.float32) + 2 * label
      sf.write_pair(base / 'data', split, f'vol{i}', image, label, spacing=SPACING)
  run = str(base / 'run')
  train.train_and_evaluate(_config(base), run)
  copied = str(base / 'copy')
  shutil.copytree(run, copied)
  spaced = _derive(
    run,
    base / 'spaced',
    lambda r: _set(r, data__target_spacing=[3.0, 2.0, 2.0], data__patch_size=[4, 8, 8]),
  )
  four = _derive(run, base / 'four', lambda r: _set(r, model__num_classes=4), reinit=True)
  return {'run': run, 'copy': copied, 'spaced': spaced, 'four': four, 'base': base}


@pytest.fixture(scope='module')
def scans(runs):
  """Two NIfTI inputs: one stored as (x, y, z), one permuted with a flipped axis."""
  folder = runs['base'] / 'scans'
  folder.mkdir()
  rng = np.random.default_rng(7)
  for case, permute in (('plain', False), ('permuted', True)):
    image, label = phantoms.phantom(rng, spacing=SPACING, size=16.0)
    phantoms.write_case(
      str(folder), None, case, image[..., :1], label, SPACING, permute=permute
    )
  return folder


def _launch(*args):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, 'launch.py'), '--mode=predict', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )


@pytest.fixture(scope='module')
def predicted(runs, scans):
  """One run (in process), and the run with its copy (the command, comma-separated)."""
  out = {'one': runs['base'] / 'out_one', 'two': runs['base'] / 'out_two'}
  predict.run([runs['run']], str(scans), str(out['one']), save_probabilities=True)
  proc = _launch(
    f'--workdir={runs["run"]},{runs["copy"]}',
    f'--input={scans}',
    f'--output={out["two"]}',
    '--save_probabilities',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_two_identical_runs_average_to_one(predicted):
  for case in ('plain', 'permuted'):
    one = nibabel.load(predicted['one'] / f'{case}.nii.gz')
    two = nibabel.load(predicted['two'] / f'{case}.nii.gz')
    np.testing.assert_array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj))
    with (
      np.load(predicted['one'] / f'{case}.npz') as a,
      np.load(predicted['two'] / f'{case}.npz') as b,
    ):
      assert sorted(a.files) == sorted(b.files)
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_runs_with_another_spacing_and_patch_average_on_the_input_grid(runs, scans):
  a, b = inference.load(runs['run']), inference.load(runs['spaced'])
  assert b.data.target_spacing == (3.0, 2.0, 2.0) and b.patch_size == (4, 8, 8)
  image, spacing = inputs.read_image(inputs.list_inputs(str(scans), ndim=3)[0], ndim=3)
  pa = predict.case_probabilities(a, image, spacing)
  pb = predict.case_probabilities(b, image, spacing)
  assert pa.shape == pb.shape == image.shape[:-1] + (3,)  # Both on the input's grid.
  assert not np.allclose(pa, pb)  # b predicted at its own spacing, resampled back.
  mean = predict.average_probabilities([a, b], image, spacing)
  np.testing.assert_allclose(mean, (pa + pb) / 2, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
    predict.predict_case(a, image, spacing), np.argmax(pa, axis=-1)
  )
  np.testing.assert_array_equal(predict.average_probabilities([a, a], image, spacing), pa)


def test_incompatible_runs_are_refused_naming_the_field(runs, scans, tmp_path):
  proc = _launch(
    f'--workdir={runs["run"]},{runs["four"]}',
    f'--input={scans}',
    f'--output={tmp_path / "out"}',
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f'The runs {runs["run"]}, {runs["four"]} cannot be averaged' in proc.stderr
  assert f'classes: 3 in {runs["run"]}; 4 in {runs["four"]}' in proc.stderr
  assert 'channels' not in proc.stderr.split('differ in')[-1]
  assert not (tmp_path / 'out').exists()  # Refused before anything was predicted.


def test_every_differing_field_is_named():
  def fake(classes, channels, normalization, ndim):
    return inference.Predictor(
      model=types.SimpleNamespace(num_classes=classes),
      variables={},
      config=None,
      data=config_lib.DataOptions(normalization=normalization),
      step=0,
      num_channels=channels,
      ndim=ndim,
      divisor=(1,) * ndim,
      patch_size=None,
    )

  a, b = fake(2, 1, 'zscore', 3), fake(2, 2, 'minmax', 2)
  ensemble.check_compatible([a, a], ['A', 'B'])
  with pytest.raises(ValueError) as e:
    ensemble.check_compatible([a, a, b], ['A', 'B', 'C'])
  message = str(e.value)
  assert 'The runs A, B, C cannot be averaged' in message
  assert 'channels: 1 in A, B; 2 in C' in message
  assert 'normalisation: zscore in A, B; minmax in C' in message
  assert 'dimensionality: 3D in A, B; 2D in C' in message
  assert 'classes:' not in message
  with pytest.raises(ValueError, match='no empty entry'):
    ensemble.load_runs(['A', ''])


def test_saved_probabilities_sum_to_one_and_give_the_mask(predicted, scans):
  for case in ('plain', 'permuted'):
    source = nibabel.load(scans / f'{case}_0000.nii.gz')
    written = nibabel.load(predicted['one'] / f'{case}.nii.gz')
    assert written.shape == source.shape  # On the input's own grid, as stored.
    np.testing.assert_array_equal(written.affine, source.affine)
    mask = geometry.read_volume(str(predicted['one'] / f'{case}.nii.gz')).array
    with np.load(predicted['one'] / f'{case}.npz') as saved:
      probs = saved['probabilities']
      assert str(saved['axes']) == 'DHWK' and str(saved['orientation']) == 'SAR'
      np.testing.assert_array_equal(saved['affine'], source.affine)
      canonical = nibabel.as_closest_canonical(source).affine[:, [2, 1, 0, 3]]
      np.testing.assert_allclose(saved['canonical_affine'], canonical, atol=1e-6)
    assert probs.dtype == np.float16 and probs.shape == mask.shape + (3,)
    np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1, atol=3e-3)
    # The mask's class has the largest saved probability everywhere (float16
    # rounding keeps the order, but may tie two close classes).
    chosen = np.take_along_axis(probs, mask[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_array_equal(chosen, probs.max(-1))
    assert np.mean(np.argmax(probs, -1) == mask) > 0.99
  assert nibabel.aff2axcodes(nibabel.load(scans / 'permuted_0000.nii.gz').affine) != (
    'R',
    'A',
    'S',
  )


def test_one_sigmoid_channel_is_saved_as_two_classes(tmp_path):
  probs = np.array([[[0.2], [0.7]], [[0.5], [0.9]]], np.float32)  # [H, W, 1]
  case = inputs.Case((str(tmp_path / 'x.png'),), 'x', '.png')
  path = predict.write_probabilities(case, probs, str(tmp_path))
  with np.load(path) as saved:
    assert str(saved['axes']) == 'HWK' and 'affine' not in saved.files
    np.testing.assert_allclose(saved['probabilities'][..., 1], probs[..., 0], atol=1e-3)
    np.testing.assert_allclose(saved['probabilities'].sum(-1), 1, atol=1e-3)
    np.testing.assert_array_equal(
      np.argmax(saved['probabilities'], -1), predict.labels_of(probs)
    )
  assert os.listdir(tmp_path) == ['x.npz']


def test_postprocessing_is_applied_to_each_mask_before_it_is_written(
  runs, scans, predicted, tmp_path, monkeypatch
):
  rules_file = tmp_path / 'postprocessing.json'
  rules = postprocessing.Rules(largest_foreground=True, largest_per_class=(1,), min_size=3)
  postprocessing.write(str(rules_file), rules, {})
  events = []
  real_apply, real_write = predict.postprocessing.apply, predict.write_mask

  def apply(labels, got):
    events.append(('apply', got))
    return real_apply(labels, got)

  def write_mask(case, mask, output):
    events.append(('write', case.stem))
    return real_write(case, mask, output)

  monkeypatch.setattr(predict.postprocessing, 'apply', apply)
  monkeypatch.setattr(predict, 'write_mask', write_mask)
  out = tmp_path / 'out'
  predict.run([runs['run']], str(scans), str(out), postprocessing_file=str(rules_file))
  read = postprocessing.read(str(rules_file))
  assert events == [('apply', read), ('write', 'permuted')] + [
    ('apply', read),
    ('write', 'plain'),
  ]
  changed = 0
  for case in ('plain', 'permuted'):
    before = geometry.read_volume(str(predicted['one'] / f'{case}.nii.gz')).array
    after = geometry.read_volume(str(out / f'{case}.nii.gz')).array
    np.testing.assert_array_equal(after, real_apply(before.astype(np.int32), rules))
    changed += np.sum(after != before)
  assert changed  # The barely trained run predicts scattered voxels: rules remove some.


def test_a_bad_postprocessing_file_fails_before_anything_else(scans, tmp_path):
  bad = tmp_path / 'postprocessing.json'
  bad.write_text('{"largest_foreground": tru')
  proc = _launch(  # The workdir does not exist either: the rules are read first.
    f'--workdir={tmp_path / "no_run"}',
    f'--input={scans}',
    f'--output={tmp_path / "out"}',
    f'--postprocessing={bad}',
  )
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'Error: {bad}: unreadable JSON'), last
  assert not (tmp_path / 'out').exists()


def test_the_memory_error_names_the_probabilities_and_the_memory(scans):
  cases = inputs.list_inputs(str(scans), ndim=3)[:1]
  shape, _, spacing = inputs.probe(cases[0].path, 3)
  voxels = int(np.prod(shape))
  fine = (1.5, 0.5, 0.5)  # Twice as fine as the volume on every axis: 8x the voxels.
  run_bytes = geometry.resampled_bytes(shape, spacing, fine, channels=1, classes=3)
  assert run_bytes == 4 * (8 * voxels * (1 + 3) + voxels * 3)
  needed = run_bytes + 4 * voxels * 3  # + the running average of the two runs.
  options = dict(
    ndim=3,
    num_channels=1,
    num_classes=3,
    target_spacings=[SPACING, fine],
    save_probabilities=True,
  )
  inputs.check_inputs(cases, memory=needed, **options)
  with pytest.raises(ValueError) as e:
    inputs.check_inputs(cases, memory=needed - 1, **options)
  message = str(e.value)
  gib = lambda n: f'{n / 2**30:.3g} GiB'
  assert f'{cases[0].path}: predicting it needs {gib(needed)} of host memory' in message
  assert f'but {gib(needed - 1)} are available' in message
  assert (
    f'its 3 class probabilities on its own grid {shape} take {gib(4 * voxels * 3)}'
    in message
  )
  assert f'running average of its runs ({gib(4 * voxels * 3)}' in message
  assert 'predict on a machine with more memory' in message
  assert 'crop the volume' in message and 'coarser target spacing' in message
  assert 'a float16 copy' in message and 'leave out' not in message  # Not the peak.
  # A coarse run: writing the probabilities, their copy and the labels is the peak.
  coarse = (6.0, 2.0, 2.0)
  run_bytes = geometry.resampled_bytes(shape, spacing, coarse, channels=1, classes=3)
  writing = 4 * voxels * 3 + 2 * voxels * 3 + 4 * voxels
  assert writing > run_bytes
  options = dict(options, target_spacings=[coarse])
  inputs.check_inputs(cases, memory=writing, **options)
  with pytest.raises(ValueError, match='leave out --save_probabilities') as e:
    inputs.check_inputs(cases, memory=writing - 1, **options)
  assert 'running average' not in str(e.value) and 'coarser' not in str(e.value)
  with pytest.raises(ValueError, match='not both'):
    inputs.check_inputs(
      cases,
      target_spacing=SPACING,
      target_spacings=[SPACING],
      **{k: v for k, v in options.items() if k != 'target_spacings'},
    )
