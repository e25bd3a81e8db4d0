"""End-to-end training on generated data: outputs, exact resume, SIGKILL, devices, NaN."""

import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from unet_jax import checkpointing
from unet_jax import train
from unet_jax.data import pipeline as input_pipeline
from unet_jax.models import factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6

# The tiny run, as command-line overrides (for launch.py) and as a config (in-process).
OVERRIDES = {
  'data.config': 'tiny',
  'model.features': 4,
  'model.depth': 2,
  'batch_size': 4,
  'eval_batch_size': 4,
  'num_train_steps': STEPS,
  'log_every_steps': 1,
  'eval_every_steps': 3,
  'checkpoint_every_steps': 3,
  'optimizer.warmup_steps': 2,
  'augment.elastic': 2.0,
  'augment.intensity': 0.1,
}


def tiny_config(data_dir, **extra):
  config = importlib.import_module('configs.dice_bce').get_config()
  for key, value in {**OVERRIDES, 'data.data_dir': data_dir, **extra}.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def flag_args(data_dir, **extra):
  items = {**OVERRIDES, 'data.data_dir': data_dir, **extra}
  return [f'--config.{k}={v}' for k, v in items.items()]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  # Builds the tiny data set once for the module.
  input_pipeline.open(tiny_config(path).data, divisor=4).info
  return path


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """One uninterrupted in-process run: (workdir, final metrics, final state)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = train.train_and_evaluate(tiny_config(data_dir), workdir)
  return workdir, result, _final_state(workdir)


def _final_state(workdir):
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  step = manager.latest_step()
  state = manager.restore(step)
  manager.close()
  return step, state


def _read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir):
  return [r['train_loss'] for r in _read_jsonl(workdir) if 'train_loss' in r]


def _assert_states_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_end_to_end_writes_checkpoints_metrics_and_samples(reference):
  workdir, result, (step, _) = reference
  assert step == STEPS
  assert set(os.listdir(os.path.join(workdir, 'checkpoints'))) >= {'3', '6'}
  records = _read_jsonl(workdir)
  train_steps = [r['step'] for r in records if 'train_loss' in r]
  assert train_steps == list(range(1, STEPS + 1))
  evals = [r for r in records if 'eval_dice' in r]
  assert [r['step'] for r in evals] == [3, 6]
  for key in (
    'eval_mean_iou',
    'eval_pixel_accuracy',
    'eval_dice_per_class',
    'eval_iou_per_class',
  ):
    assert key in evals[-1]
  assert all(np.isfinite(r['train_loss']) for r in records if 'train_loss' in r)
  assert {'learning_rate', 'steps_per_sec'} <= set(records[0])
  for step in (3, 6):
    with Image.open(os.path.join(workdir, 'samples', f'eval_step_{step}.png')) as png:
      assert png.format == 'PNG' and min(png.size) > 100
  assert any(
    f.startswith('events.out.tfevents')
    for f in os.listdir(os.path.join(workdir, 'tensorboard'))
  )
  assert 0.0 <= result['eval']['mean_iou'] <= 1.0
  assert 0.0 <= result['eval']['pixel_accuracy'] <= 1.0
  assert len(result['eval']['dice_per_class']) == 2
  assert result['eval']['dice'] == evals[-1]['eval_dice']


class _Preempted(Exception):
  pass


def test_interrupted_and_resumed_run_equals_uninterrupted(
  reference, data_dir, tmp_path, monkeypatch
):
  _, _, (_, expected) = reference
  real = input_pipeline.Dataset.train_iterator

  def dies_after_five(self, start_step=0, **kwargs):
    for i, batch in enumerate(real(self, start_step, **kwargs)):
      if i == 4 and start_step == 0:
        raise _Preempted()  # Step 5 never runs; the checkpoint of step 3 is the latest.
      yield batch

  monkeypatch.setattr(input_pipeline.Dataset, 'train_iterator', dies_after_five)
  workdir = str(tmp_path / 'run')
  with pytest.raises(_Preempted):
    train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3']
  # Step 4 was logged before the run died; its row goes when the run resumes at 3.
  assert [r['step'] for r in _read_jsonl(workdir) if 'train_loss' in r] == [1, 2, 3, 4]
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  step, state = _final_state(workdir)
  assert step == STEPS
  _assert_states_equal(state, expected)
  assert [r['step'] for r in _read_jsonl(workdir) if 'train_loss' in r] == list(
    range(1, STEPS + 1)
  )


# Runs launch.py in this process after patching something, for the subprocess tests.
_DRIVER = r"""
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
{patch}
sys.argv = [{launch!r}] + {args!r}
runpy.run_path({launch!r}, run_name='__main__')
"""

# Kills the process with SIGKILL inside orbax's save of step 2: the files are written
# to the temporary folder, but the rename that commits them has not happened.
_KILL_IN_SAVE = """
from orbax.checkpoint._src.path import atomicity
real = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  if self.get_final().name == '2':
    os.kill(os.getpid(), signal.SIGKILL)
  return await real(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""

# Sends this process `count` SIGTERMs while step 4's batch is read.
_SIGTERM_AT_STEP_4 = """
from unet_jax.data import pipeline as input_pipeline
real = input_pipeline.Dataset.train_iterator
def train_iterator(self, start_step=0, **kwargs):
  for step, batch in enumerate(real(self, start_step, **kwargs), start=start_step + 1):
    if step == 4 and start_step == 0:
      for _ in range({count}):
        os.kill(os.getpid(), signal.SIGTERM)
    yield batch
input_pipeline.Dataset.train_iterator = train_iterator
"""


def _launch(workdir, data_dir, *, patch='', timeout=300, **extra):
  """Runs launch.py on the tiny config in a subprocess; returns the finished process."""
  args = [
    '--config=' + os.path.join(ROOT, 'configs/dice_bce.py'),
    f'--workdir={workdir}',
  ] + flag_args(data_dir, **extra)
  script = _DRIVER.format(
    root=ROOT, patch=patch, args=args, launch=os.path.join(ROOT, 'launch.py')
  )
  return subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT,
    timeout=timeout,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
  )


def test_sigkill_during_a_save_leaves_a_checkpoint_that_restores(
  reference, data_dir, tmp_path
):
  _, _, (_, expected) = reference
  workdir = str(tmp_path / 'killed')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  proc = _launch(workdir, data_dir, patch=_KILL_IN_SAVE, checkpoint_every_steps=1)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # The kill landed inside the save of step 2: its files are in orbax's temporary
  # folder, which is never read, and step 1 is the latest finished checkpoint.
  names = os.listdir(ckpt_dir)
  assert '2' not in names and any(n.startswith('2.orbax-checkpoint-tmp') for n in names)
  manager = checkpointing.create_manager(ckpt_dir, keep=5)
  assert manager.latest_step() == 1
  assert int(manager.restore(1)['step']) == 1
  manager.close()
  # The same command again resumes and ends exactly where an unbroken run ends.
  proc = _launch(workdir, data_dir, checkpoint_every_steps=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step, state = _final_state(workdir)
  assert step == STEPS
  _assert_states_equal(state, expected)


def test_sigterm_saves_at_the_step_and_the_same_command_resumes(
  reference, data_dir, tmp_path
):
  _, _, (_, expected) = reference
  workdir = str(tmp_path / 'preempted')
  proc = _launch(workdir, data_dir, patch=_SIGTERM_AT_STEP_4.format(count=1))
  assert proc.returncode == 130, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('Stopped at step 4 on request') and 'same command' in last
  assert 'Traceback' not in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '4']
  proc = _launch(workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step, state = _final_state(workdir)
  assert step == STEPS
  _assert_states_equal(state, expected)
  assert [r['step'] for r in _read_jsonl(workdir) if 'train_loss' in r] == list(
    range(1, STEPS + 1)
  )


def test_a_second_signal_exits_at_once(data_dir, tmp_path):
  workdir = str(tmp_path / 'twice')
  proc = _launch(workdir, data_dir, patch=_SIGTERM_AT_STEP_4.format(count=2))
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
  assert 'exiting now, without saving' in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3']


_DEVICES_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax
import numpy as np
from tests import train_test
from unet_jax import train
assert jax.device_count() == 4, jax.devices()
out = {{}}
for mode in ('jit', 'pmap'):
  workdir = {tmp!r} + '/' + mode
  result = train.train_and_evaluate(
      train_test.tiny_config({data_dir!r}, parallelism=mode), workdir)
  _, state = train_test._final_state(workdir)
  out[mode] = dict(losses=train_test._train_losses(workdir), eval=result['eval'],
                   params=[np.asarray(x).tolist() for x in
                           jax.tree.leaves(state['params'])])
print('RESULT=' + json.dumps(out))
"""


def test_one_device_jit_and_four_device_jit_and_pmap_agree(reference, data_dir, tmp_path):
  workdir, result, (_, state) = reference
  one_device = dict(
    losses=_train_losses(workdir),
    eval=result['eval'],
    params=jax.tree.leaves(state['params']),
  )
  script = _DEVICES_SCRIPT.format(root=ROOT, tmp=str(tmp_path), data_dir=data_dir)
  env = dict(
    os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4'
  )
  proc = subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [s for s in proc.stdout.splitlines() if s.startswith('RESULT=')][-1]
  runs = json.loads(line[len('RESULT=') :])
  # The learning rate is 0 only at step 0 (warmup 2); five real updates follow.
  assert float(train.create_learning_rate_fn(tiny_config(data_dir))(1)) > 0
  for mode in ('jit', 'pmap'):
    run = runs[mode]
    np.testing.assert_allclose(run['losses'], one_device['losses'], rtol=2e-4)
    for got, want in zip(run['params'], one_device['params']):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=2e-5)
    for key in ('dice', 'mean_iou', 'pixel_accuracy'):
      assert run['eval'][key] == pytest.approx(one_device['eval'][key], abs=2e-3)
  # The trajectory moves: the comparison is not between constants.
  assert abs(one_device['losses'][-1] - one_device['losses'][0]) > 1e-3
  initial = train.create_train_state(
    jax.random.key(0),
    factory.create_model(tiny_config(data_dir).model),
    train.create_optimizer(tiny_config(data_dir)),
    (1, 32, 32, 1),
  ).params
  moved = [
    np.abs(np.asarray(a) - b).max()
    for a, b in zip(jax.tree.leaves(initial), one_device['params'])
  ]
  assert min(moved) > 1e-4


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
  data_dir, tmp_path, monkeypatch
):
  real = input_pipeline.Dataset.train_iterator

  def poisoned(self, start_step=0, **kwargs):
    for step, batch in enumerate(real(self, start_step, **kwargs), start=start_step + 1):
      if step == 5:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline.Dataset, 'train_iterator', poisoned)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='at step 5'):
    train.train_and_evaluate(tiny_config(data_dir), workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpt_dir)) == ['3']
  _, state = _final_state(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state))


def test_unknown_data_set_fails_before_compiling(data_dir, tmp_path):
  with pytest.raises(ValueError, match='no_such_data'):
    train.train_and_evaluate(
      tiny_config(data_dir, **{'data.name': 'no_such_data'}), str(tmp_path)
    )
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_trains_on_a_folder_of_images_and_masks(tmp_path):
  """A user's own folder trains with one command, RGB images with 3 classes."""
  from unet_jax.data import folder as segmentation_folder  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  root = tmp_path / 'my_data'
  for split, count in (('train', 6), ('val', 3)):
    for i in range(count):
      label = np.zeros((24, 24), np.uint8)  # 24: padded to 24 (divisor 4).
      label[4:12, 4:12] = 1
      label[14:20, 10:22] = 2
      image = (rng.normal(80, 10, (24, 24, 3)) + 60 * label[..., None]).clip(0, 255)
      segmentation_folder.write_pair(root, split, f'case{i}', image.astype(np.uint8), label)
  workdir = str(tmp_path / 'run')
  cmd = [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config=' + os.path.join(ROOT, 'configs/folder.py'),
    f'--workdir={workdir}',
    f'--config.data.root={root}',
    f'--config.data.data_dir={tmp_path / "tfds"}',
    '--config.model.features=4',
    '--config.model.depth=2',
    '--config.batch_size=2',
    '--config.eval_batch_size=2',
    '--config.num_train_steps=4',
    '--config.eval_every_steps=4',
    '--config.log_every_steps=2',
  ]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Final validation: dice' in proc.stdout
  # Three classes, read from the masks.
  assert 'model.num_classes = 3, from the data' in proc.stderr
  evals = [r for r in _read_jsonl(workdir) if 'eval_dice_per_class' in r]
  assert len(evals[-1]['eval_dice_per_class']) == 3
  assert os.path.exists(os.path.join(workdir, 'samples', 'eval_step_4.png'))


def test_folder_with_a_bad_mask_fails_naming_the_file(tmp_path):
  from unet_jax.data import folder as segmentation_folder  # pylint: disable=g-import-not-at-top

  root = tmp_path / 'bad'
  for split in ('train', 'val'):
    for i in range(2):
      segmentation_folder.write_pair(
        root, split, f'case{i}', np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
      )
  segmentation_folder.write_pair(
    root, 'train', 'broken', np.zeros((8, 8), np.uint8), np.full((8, 8), 7, np.uint8)
  )
  config = tiny_config(
    str(tmp_path / 'tfds'),
    **{
      'data.name': 'segmentation_folder',
      'data.root': str(root),
      'data.config': '2d',
      'data.num_classes': 2,
      'loss.name': 'dice_ce',
      'model.num_classes': 2,
    },
  )
  with pytest.raises(ValueError, match=r'broken\.png'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_the_train_state_is_the_models_init_as_one_program():
  model = factory.create_model(tiny_config('unused').model)
  tx = train.create_optimizer(tiny_config('unused'))
  shape = (1, 24, 40, 1)  # A shape no other test initialises: a fresh compile.
  key = jax.random.key(7)
  with jax.log_compiles(True), _compile_messages() as messages:
    state = train.create_train_state(key, model, tx, shape)
  assert len(messages) == 1, messages  # Eagerly, Flax's init compiles dozens.
  eager = model.init({'params': key}, np.zeros(shape, np.float32), train=False)
  # The same numbers; the unoptimised program may round the last bit differently.
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(eager['params'])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
  for got, want in zip(
    jax.tree.leaves(state.batch_stats), jax.tree.leaves(eager['batch_stats'])
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(state.step) == 0
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(eager['params']))


@contextlib.contextmanager
def _compile_messages():
  """The 'Finished XLA compilation' messages that JAX logs while the block runs."""
  messages = []

  class Handler(logging.Handler):
    def emit(self, record):
      if 'Finished XLA compilation' in record.getMessage():
        messages.append(record.getMessage())

  handler = Handler()
  jax_logger = logging.getLogger('jax')
  jax_logger.addHandler(handler)
  try:
    yield messages
  finally:
    jax_logger.removeHandler(handler)
