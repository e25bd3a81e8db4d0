"""Checkpoints checked before they are trusted: real orbax steps of a tiny run, damaged
on disk (a flipped bit, a truncated file, an empty step folder, a missing item)."""

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
from orbax.checkpoint._src.path import async_path
import pytest

from tests import train_test
from unet_jax import checkpointing
from unet_jax import train
from unet_jax.data import pipeline as input_pipeline
from unet_jax.inference import predictor as inference
from unet_jax.train import loop

tiny_config = train_test.tiny_config
# Steps 1, 2 and 3 are kept; only step 3 is evaluated (eval_every_steps=3).
RUN = dict(num_train_steps=3, checkpoint_every_steps=1, keep_checkpoints=3)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  input_pipeline.open(tiny_config(path).data, divisor=4)
  return path


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A finished 3-step run that kept steps 1, 2 and 3; never modified."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(tiny_config(data_dir, **RUN), workdir)
  return workdir


def _copy(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  return workdir


def _step(workdir, step):
  return os.path.join(workdir, 'checkpoints', str(step))


def _largest_array_file(workdir, step):
  """The biggest data file of the step's arrays (the parameters and moments)."""
  folder = os.path.join(_step(workdir, step), 'default', 'ocdbt.process_0', 'd')
  return max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)


def _flip_a_bit(path):
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x01
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 2])


def _damage(workdir, step, kind):
  """Damages `step` as `kind`; returns the file or folder a message must name."""
  if kind in ('flip', 'truncate'):
    path = _largest_array_file(workdir, step)
    (_flip_a_bit if kind == 'flip' else _truncate)(path)
    return path
  folder = _step(workdir, step)
  if kind == 'empty':  # As `mkdir` before a copy that never ran.
    shutil.rmtree(folder)
    os.makedirs(folder)
  else:  # 'no item': a copy interrupted before default/.
    shutil.rmtree(os.path.join(folder, 'default'))
  return folder


def _params(workdir, step):
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=3)
  params = manager.restore(step)['params']
  manager.close()
  return params


def _warnings(caplog):
  """Our warnings (orbax adds its own, e.g. for an empty step folder)."""
  return [
    r.getMessage()
    for r in caplog.records
    if r.levelno == logging.WARNING
    and r.pathname.endswith(('checkpointing.py', 'predictor.py'))
  ]


def test_the_manifest_records_every_file_of_a_step(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=2)
  checkpointing.save(manager, 7, {'w': np.arange(6, dtype=np.float32)})
  folder = str(tmp_path / '7')
  with open(os.path.join(folder, checkpointing.MANIFEST)) as f:
    files = json.load(f)['files']
  on_disk = {
    os.path.relpath(os.path.join(d, n), folder)
    for d, _, names in os.walk(folder)
    for n in names
  } - {checkpointing.MANIFEST}
  assert set(files) == on_disk and '_CHECKPOINT_METADATA' in files
  metadata = open(os.path.join(folder, '_CHECKPOINT_METADATA'), 'rb').read()
  assert files['_CHECKPOINT_METADATA'] == {
    'size': len(metadata),
    'sha256': hashlib.sha256(metadata).hexdigest(),
  }
  assert checkpointing.verify(folder) is True
  manager.close()


def test_a_flipped_bit_and_an_empty_step_are_skipped_and_training_resumes(
  trained, data_dir, tmp_path, caplog
):
  workdir = _copy(trained, tmp_path)
  flipped = _damage(workdir, 3, 'flip')
  os.makedirs(_step(workdir, 4))  # An empty step folder, newer than all.
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(tiny_config(data_dir, **RUN), workdir)
  warned = _warnings(caplog)
  assert (
    f'Skipping checkpoint step 4: {_step(workdir, 4)} is empty (an interrupted copy?).'
    in warned
  )
  assert any(
    m.startswith(f'Skipping checkpoint step 3: {flipped} does not match the SHA-256')
    for m in warned
  ), warned
  logged = [r.getMessage() for r in caplog.records]
  assert f'Resumed from {_step(workdir, 2)} at step 2.' in logged
  assert 0 <= result['eval']['dice'] <= 1
  # The damaged steps are set aside; step 3 is written again, and matches the one
  # of the uninterrupted run (exact resume).
  folders = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert folders == ['1', '2', '3', '3.damaged', '4.damaged']
  assert checkpointing.verify(_step(workdir, 3)) is True
  _, again = train_test._final_state(workdir)
  _, original = train_test._final_state(trained)
  jax.tree.map(np.testing.assert_array_equal, again['params'], original['params'])


@pytest.mark.parametrize(
  'kind, problem',
  [
    ('flip', 'does not match the SHA-256 recorded when it was written'),
    ('truncate', 'bytes, {size} when it was written (truncated?)'),
    ('empty', 'is empty (an interrupted copy?)'),
    ('no item', "has no default/ item, only ['_CHECKPOINT_METADATA'"),
  ],
)
def test_load_skips_a_damaged_latest_step_naming_it(
  trained, tmp_path, caplog, kind, problem
):
  workdir = _copy(trained, tmp_path)
  size = os.path.getsize(_largest_array_file(workdir, 3))
  named = _damage(workdir, 3, kind)
  with caplog.at_level(logging.WARNING):
    predictor = inference.load(workdir, step='latest')
  assert predictor.step == 2
  (warning,) = _warnings(caplog)
  assert warning.startswith(f'Skipping checkpoint step 3: {named} '), warning
  assert problem.format(size=size) in warning
  jax.tree.map(
    np.testing.assert_array_equal, predictor.variables['params'], _params(trained, 2)
  )


def test_a_damaged_best_step_falls_back_naming_both_steps(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  assert inference.load(workdir, step='best').step == 3  # The one evaluated step.
  flipped = _damage(workdir, 3, 'flip')
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert inference.load(workdir, step='best').step == 2
  warning = _warnings(caplog)[-1]
  assert warning.startswith(
    f'The best checkpoint by eval_dice, step 3, is damaged ({flipped} does not match'
  ), warning
  assert warning.endswith(
    'and no intact step recorded eval_dice: using step 2, the newest intact one, instead.'
  )


def test_an_explicit_damaged_step_is_an_error_naming_it(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  truncated = _damage(workdir, 2, 'truncate')
  with pytest.raises(ValueError) as e:
    inference.load(workdir, step=2)
  message = str(e.value)
  assert message.startswith(f'Checkpoint step 2 is damaged: {truncated} has ')
  assert message.endswith('Choose another step of [1, 2, 3].')
  assert '\n' not in message
  assert inference.load(workdir, step=3).step == 3


def test_steps_without_a_manifest_are_used_and_a_truncated_one_is_named(
  trained, tmp_path, caplog
):
  workdir = _copy(trained, tmp_path)
  for step in (1, 2, 3):  # As written before unet_jax wrote manifests.
    os.remove(os.path.join(_step(workdir, step), checkpointing.MANIFEST))
  with caplog.at_level(logging.INFO):
    assert inference.load(workdir, step='latest').step == 3
  assert any(
    m.startswith(f'{_step(workdir, 3)} has no {checkpointing.MANIFEST}')
    and m.endswith('using it unverified.')
    for m in caplog.messages
  ), caplog.messages
  folder = os.path.dirname(_largest_array_file(workdir, 3))
  for name in os.listdir(folder):  # Every array file, so the parameters' too.
    _truncate(os.path.join(folder, name))
  with pytest.raises(ValueError) as e:
    inference.load(workdir, step=3)
  message = str(e.value)
  assert message.startswith(
    f'{_step(workdir, 3)} cannot be read: it has no {checkpointing.MANIFEST}'
  ), message
  assert 'damaged or does not fit' in message


def test_the_divergence_guard_names_the_newest_intact_step(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _damage(workdir, 3, 'flip')
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=3)
  run = types.SimpleNamespace(manager=manager)  # All `_check_finite` reads of a run.
  with pytest.raises(FloatingPointError) as e:
    loop._check_finite(run, None, [(4, float('nan'))], step=4, state_too=False)
  assert f'the last good checkpoint is step 2 ({_step(workdir, 2)})' in str(e.value)
  manager.close()


def test_a_full_disk_during_a_save_is_one_line(tmp_path, monkeypatch):
  """A mock: no full disk is at hand, so orbax's lowest Python write (its metadata
  file, after the arrays) raises the OSError(ENOSPC) a full disk raises."""
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  state = {'w': np.zeros((100, 10), np.float32)}
  checkpointing.save(manager, 1, state)
  size = sum(
    os.path.getsize(os.path.join(d, n))
    for d, _, names in os.walk(tmp_path / '1')
    for n in names
    if n != checkpointing.MANIFEST
  )

  async def disk_full(path, text):
    raise OSError(errno.ENOSPC, 'No space left on device', str(path))

  monkeypatch.setattr(async_path, 'write_text', disk_full)
  with pytest.raises(OSError) as e:
    checkpointing.save(manager, 2, state)
  assert e.value.errno == errno.ENOSPC
  message = str(e.value)
  assert '\n' not in message
  assert f'No space left on the device of {tmp_path} to save checkpoint step 2:' in message
  assert f'a step needs about {size / 1000:.1f} kB (the size of step 1)' in message
  assert e.value.__suppress_context__  # No orbax traceback chained to it.
  assert manager.all_steps() == [1]


# launch.py, given the disk-full error by a stand-in for training (as the save raises it).
_DISK_FULL_LAUNCH = r"""
import errno, sys
sys.path.insert(0, {root!r})
from absl import app
import launch
def disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, 'No space left on the device of /w to save step 2.')
launch.train.train_and_evaluate = disk_full
app.run(launch.main, argv=['launch.py', '--config={root}/configs/dice_bce.py',
                           '--workdir={workdir}'])
"""


def test_launch_reports_a_full_disk_in_one_line(tmp_path):
  """A stand-in raises the save's OSError(ENOSPC): launch.py prints one line, exit 1."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = _DISK_FULL_LAUNCH.format(root=root, workdir=tmp_path / 'run')
  proc = subprocess.run(
    [sys.executable, '-c', script],
    cwd=root,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == 'Error: No space left on the device of /w to save step 2.'
  assert 'Traceback' not in proc.stderr
