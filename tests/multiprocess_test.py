"""Two launch.py processes on one machine, as a multi-host job runs, checked end to end.

Each process sees 2 simulated CPU devices (`--xla_force_host_platform_device_count=2`),
the two meet at a coordinator on 127.0.0.1 (`jax.distributed.initialize`), and the
cross-process collectives run over gloo (JAX's default CPU collectives). This is
the way JAX tests its own multi-process code. One chain of runs is shared by the
checks:

  A. a fresh data_dir and workdir; process 1 alone receives a SIGTERM while it
     reads the batch of step 1: both stop after step 2 (the stop vote answers one
     step later, `runner.agreed_stop`) with a checkpoint;
  B. the same command resumes; both are killed with SIGKILL from outside while
     waiting for the batch of step 5 (the checkpoint of step 3 is the latest);
  C. the same command resumes from step 3 and finishes;
  R. one process with 4 devices trains the same config uninterrupted.

Every process runs in its own session and is killed (SIGKILL to its process
group) when the test is done with it, whatever happens. Select these tests with
`pytest -k multiprocess`.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import train_test
from unet_jax import checkpointing
from unet_jax.data import synthetic
from unet_jax.train import config_checks

pytestmark = pytest.mark.multiprocess

ROOT = train_test.ROOT
STEPS = train_test.STEPS
TIMEOUT = 420  # Seconds a run of the tiny config may take on a loaded machine.

# Runs launch.py in this process after installing the test's instruments: an audit
# hook that reports every file opened for writing in the workdir, and `patch`.
_DRIVER = r"""
import os, runpy, signal, sys, time
sys.path.insert(0, {root!r})
PROCESS, WORKDIR, MARKERS = {process}, {workdir!r}, {markers!r}

def _report_writes(event, args):
  if event != 'open' or not isinstance(args[0], str):
    return
  mode, flags = args[1], args[2]
  writes = (any(c in mode for c in 'wax+') if isinstance(mode, str)
            else bool(flags & (os.O_WRONLY | os.O_RDWR)))
  path = os.path.abspath(args[0])
  if writes and path.startswith(WORKDIR + os.sep):
    sys.stderr.write('WROTE ' + os.path.relpath(path, WORKDIR) + '\n')

sys.addaudithook(_report_writes)
{patch}
sys.argv = [{launch!r}] + {args!r}
runpy.run_path({launch!r}, run_name='__main__')
"""

# The chain's events, each happening once (a marker file remembers it), so that
# every run of the chain is started with the same command.
_CHAIN = """
from unet_jax.data import pipeline as input_pipeline
real = input_pipeline.Dataset.train_iterator

def first_time(name):
  path = os.path.join(MARKERS, f'{name}.{PROCESS}')
  if os.path.exists(path):
    return False
  open(path, 'w').close()
  return True

def train_iterator(self, start_step=0, **kwargs):
  for step, batch in enumerate(real(self, start_step, **kwargs), start=start_step + 1):
    if step == 1 and PROCESS == 1 and first_time('sigterm'):
      os.kill(os.getpid(), signal.SIGTERM)  # Process 1 only; both stop after step 2.
    if step == 5 and first_time('waiting'):
      time.sleep(600)  # The test kills both processes here.
    yield batch

input_pipeline.Dataset.train_iterator = train_iterator
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(cache_dir, devices):
  # Compiling fast matters more than running fast for the tiny model: the model's
  # initialisers alone take most of a minute to compile at XLA's default level on
  # a loaded machine, in every process. Every run here is compiled alike, and
  # process 0 reuses its compiled programs across the runs.
  return dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
    ' --xla_backend_optimization_level=0',
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )


class _Process:
  """One launch.py process, its stdout and stderr in files."""

  def __init__(self, name, args, *, process, workdir, markers, patch, env, logs):
    script = _DRIVER.format(
      root=ROOT,
      process=process,
      workdir=workdir,
      markers=markers,
      patch=patch,
      args=args,
      launch=os.path.join(ROOT, 'launch.py'),
    )
    self.out_path = os.path.join(logs, f'{name}.out')
    self.err_path = os.path.join(logs, f'{name}.err')
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.popen = subprocess.Popen(
        [sys.executable, '-c', script],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=err,
        start_new_session=True,
      )
    self.pid = self.popen.pid

  def kill(self):
    if self.popen.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(self.pid, signal.SIGKILL)
    self.popen.wait(timeout=60)

  @property
  def stderr(self):
    with open(self.err_path) as f:
      return f.read()

  @property
  def stdout(self):
    with open(self.out_path) as f:
      return f.read()

  def wrote(self):
    """Files this process opened for writing in the workdir, checkpoints aside."""
    return {
      line[len('WROTE ') :]
      for line in self.stderr.splitlines()
      if line.startswith('WROTE ') and not line.startswith('WROTE checkpoints')
    }


@contextlib.contextmanager
def _launched(
  name, workdir, data_dir, logs, cache_dir, *, processes=2, patch='', markers='', extra=None
):
  """Starts `processes` launch.py processes of the tiny config (2 devices each, or
  4 devices in one process); yields them; kills what is left on the way out."""
  port = _free_port()
  started = []
  try:
    for p in range(processes):
      args = [
        '--config=' + os.path.join(ROOT, 'configs/dice_bce.py'),
        f'--workdir={workdir}',
      ] + train_test.flag_args(data_dir, **((extra or [{}] * processes)[p]))
      if processes > 1:
        args += [
          f'--coordinator_address=127.0.0.1:{port}',
          f'--num_processes={processes}',
          f'--process_id={p}',
        ]
      started.append(
        _Process(
          f'{name}{p}',
          args,
          process=p,
          workdir=workdir,
          markers=markers,
          patch=patch,
          env=_env(cache_dir, 4 // processes),
          logs=logs,
        )
      )
    yield started
  finally:
    for proc in started:
      proc.kill()


def _wait(procs, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  for proc in procs:
    try:
      proc.popen.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      pytest.fail(f'{proc.err_path} did not finish in {timeout} s:\n' + proc.stderr[-3000:])
  return [proc.popen.returncode for proc in procs]


def _wait_for_files(paths, procs, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  while not all(os.path.exists(p) for p in paths):
    for proc in procs:
      if proc.popen.poll() is not None:
        pytest.fail(
          f'{proc.err_path} ended ({proc.popen.returncode}) before'
          f' {paths}:\n' + proc.stderr[-3000:]
        )
    if time.monotonic() > deadline:
      pytest.fail(f'{paths} did not appear in {timeout} s.')
    time.sleep(0.5)


def _checkpoints(workdir):
  return sorted(
    int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()
  )


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """Runs A, B, C and R (see the module docstring); returns what each left."""
  tmp = tmp_path_factory.mktemp('multiprocess')
  data_dir, workdir, markers, logs, cache = (
    str(tmp / n) for n in ('tfds', 'run', 'markers', 'logs', 'jax_cache')
  )
  for d in (markers, logs):
    os.makedirs(d)
  out = {'workdir': workdir, 'data_dir': data_dir}
  common = dict(patch=_CHAIN, markers=markers)
  with _launched('a', workdir, data_dir, logs, cache, **common) as procs:
    out['a'] = (procs, _wait(procs), _checkpoints(workdir))
  with _launched('b', workdir, data_dir, logs, cache, **common) as procs:
    _wait_for_files([os.path.join(markers, f'waiting.{p}') for p in (0, 1)], procs)
    # Both wait for the batch of step 5; the checkpoint of step 3 is written.
    for proc in procs:
      os.killpg(proc.pid, signal.SIGKILL)
    out['b'] = (procs, _wait(procs), _checkpoints(workdir))
  with _launched('c', workdir, data_dir, logs, cache, **common) as procs:
    out['c'] = (procs, _wait(procs), _checkpoints(workdir))
  reference = str(tmp / 'reference')
  with _launched('r', reference, data_dir, logs, cache, processes=1) as procs:
    out['r'] = (procs, _wait(procs), _checkpoints(reference))
  out['reference'] = reference
  return out


def test_multiprocess_data_set_is_built_by_process_0_only_and_both_train(chain):
  (p0, p1), codes, _ = chain['a']
  assert codes == [130, 130], p0.stderr[-3000:] + p1.stderr[-3000:]
  building = f'Building synthetic_shapes/tiny/{synthetic.SyntheticShapes.VERSION} into'
  assert p0.stderr.count(building) == 1
  assert building not in p1.stderr
  for proc in (p0, p1):
    assert 'JAX process %d/2' % (proc is p1) in proc.stderr
    assert 'on 4 device(s) (jit), global batch 4' in proc.stderr
    assert re.search(r'step 1/6  loss \d', proc.stderr), proc.stderr[-3000:]
  for run in ('b', 'c'):
    assert all(building not in proc.stderr for proc in chain[run][0])


def test_multiprocess_sigterm_to_one_process_stops_both_after_the_same_step(chain):
  (p0, p1), codes, checkpoints = chain['a']
  assert codes == [130, 130]
  # Only process 1 received the signal ...
  assert 'SIGTERM: stopping after this step' in p1.stderr
  assert 'SIGTERM' not in p0.stderr
  # ... and both stopped after step 2, saved it and said how to resume.
  for proc in (p0, p1):
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('Stopped at step 2 on request'), proc.stderr[-3000:]
    assert 'same command' in last and 'Traceback' not in proc.stderr
  assert checkpoints == [2]


def test_multiprocess_killed_run_resumes_with_the_same_command(chain):
  (b0, b1), codes, checkpoints = chain['b']
  assert codes == [-signal.SIGKILL] * 2
  assert checkpoints == [2, 3]
  for proc in (b0, b1):
    assert 'Resumed from' in proc.stderr and 'at step 2.' in proc.stderr
  (c0, c1), codes, checkpoints = chain['c']
  assert codes == [0, 0], c0.stderr[-3000:] + c1.stderr[-3000:]
  assert checkpoints[-1] == STEPS
  for proc in (c0, c1):
    assert re.search(r'Resumed from \S+/checkpoints/3 at step 3\.', proc.stderr)
  # Each step's row once, although steps 4 were logged by run B before the kill.
  rows = train_test._read_jsonl(chain['workdir'])
  assert [r['step'] for r in rows if 'train_loss' in r] == list(range(1, STEPS + 1))
  assert [r['step'] for r in rows if 'eval_dice' in r] == [3, 6]
  assert 'Final validation: dice' in c0.stdout
  assert 'Final validation' not in c1.stdout


def _params(workdir, step=None):
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  step = manager.latest_step() if step is None else step
  state = manager.restore(step)
  manager.close()
  assert int(state['step']) == step
  return jax.tree.leaves(state['params']), jax.tree.leaves(state['opt_state'])


def test_multiprocess_run_equals_a_single_process_run_on_4_devices(chain):
  (r,), codes, checkpoints = chain['r']
  assert codes == [0], r.stderr[-3000:]
  assert 'JAX process 0/1' in r.stderr and 'on 4 device(s)' in r.stderr
  params, opt_state = _params(chain['workdir'], STEPS)
  want_params, want_opt_state = _params(chain['reference'], STEPS)
  at_step_3, _ = _params(chain['reference'], 3)
  for got, want, before in zip(params, want_params, at_step_3):
    # Float tolerance: the two runs sum gradients over the 4 devices in another
    # order (gloo across processes, in memory within one).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.abs(want - before).max() > 1e-4  # Steps 4 to 6 moved every leaf.
  for got, want in zip(opt_state, want_opt_state):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  rows = train_test._read_jsonl(chain['workdir'])
  want_rows = train_test._read_jsonl(chain['reference'])
  losses = [r['train_loss'] for r in rows if 'train_loss' in r]
  want_losses = [r['train_loss'] for r in want_rows if 'train_loss' in r]
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  evals = [r for r in rows if 'eval_dice' in r]
  want_evals = [r for r in want_rows if 'eval_dice' in r]
  for got, want in zip(evals, want_evals):
    for key in ('eval_dice', 'eval_mean_iou', 'eval_pixel_accuracy'):
      assert got[key] == pytest.approx(want[key], abs=1e-6)


def test_multiprocess_only_process_0_writes_metrics_samples_and_tensorboard(chain):
  for run in ('a', 'b', 'c'):
    p0, p1 = chain[run][0]
    assert p1.wrote() == set(), (run, p1.wrote())
    assert 'metrics.jsonl' in p0.wrote() and 'config.json' in p0.wrote()
  assert 'samples/eval_step_3.png' in chain['b'][0][0].wrote()
  assert 'samples/eval_step_6.png' in chain['c'][0][0].wrote()
  # TensorFlow writes event files from C++, out of the audit hook's sight; their
  # names end in '.<pid>.<n>.v2'.
  events = os.listdir(os.path.join(chain['workdir'], 'tensorboard'))
  pids = {int(name.split('.')[-3]) for name in events}
  assert pids == {chain[run][0][0].pid for run in ('a', 'b', 'c')}
  # Orbax: every process takes part in each save; the replicated state is written
  # once, by process 0, and restores in one process (above) and in two (run C).
  step = os.path.join(chain['workdir'], 'checkpoints', str(STEPS), 'default')
  assert 'ocdbt.process_0' in os.listdir(step)


def _two_runs(tmp_path, extra):
  """Two processes of the tiny config with per-process overrides `extra`."""
  data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
  logs = str(tmp_path / 'logs')
  os.makedirs(logs)
  with _launched(
    'm', workdir, data_dir, logs, str(tmp_path / 'cache'), extra=extra
  ) as procs:
    return procs, _wait(procs), workdir


def test_multiprocess_different_configs_fail_before_training(tmp_path):
  procs, codes, workdir = _two_runs(
    tmp_path, [{'optimizer.learning_rate': 0.001}, {'optimizer.learning_rate': 0.002}]
  )
  for proc, code in zip(procs, codes):
    assert code == 1, proc.stderr[-3000:]
    assert 'The 2 processes were started with different configs' in proc.stderr
    assert (
      'config.optimizer.learning_rate: 0.001 on process 0, 0.002 on process 1'
      in proc.stderr
    ), proc.stderr[-3000:]
    assert 'Building' not in proc.stderr
  assert not os.path.exists(workdir)


def test_multiprocess_data_error_on_process_0_stops_process_1_too(tmp_path):
  from unet_jax.data import folder as segmentation_folder  # pylint: disable=g-import-not-at-top

  root = tmp_path / 'folder'
  for split in ('train', 'val'):
    for i in range(2):
      segmentation_folder.write_pair(
        root, split, f'case{i}', np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
      )
  segmentation_folder.write_pair(
    root, 'train', 'broken', np.zeros((8, 8), np.uint8), np.full((8, 8), 7, np.uint8)
  )
  folder = {
    'data.name': 'segmentation_folder',
    'data.root': str(root),
    'data.config': '2d',
    'data.num_classes': 2,
    'loss.name': 'dice_ce',
    'model.num_classes': 2,
  }
  (p0, p1), codes, _ = _two_runs(tmp_path, [folder, folder])
  assert codes == [1, 1], p0.stderr[-3000:] + p1.stderr[-3000:]
  assert 'BadDataError: 1 problem(s)' in p0.stderr and 'broken.png' in p0.stderr
  assert (
    'RuntimeError: Process 0 failed to open the data set'
    " 'segmentation_folder' (its log says why); process 1 stops too." in p1.stderr
  ), p1.stderr[-3000:]
  assert 'broken.png' not in p1.stderr  # It did not validate the folder itself.


@pytest.mark.parametrize('field', ['batch_size', 'eval_batch_size'])
def test_multiprocess_global_batch_not_divisible_by_all_devices(field):
  # 2 processes x 2 devices: 6 divides by the processes but not by the 4 devices.
  config = train_test.tiny_config('', **{field: 6})
  with pytest.raises(
    ValueError,
    match=rf'config.{field}=6 .* not divisible by the 4'
    ' devices',
  ):
    config_checks.validate_config(config, num_devices=4, process_count=2)


def test_multiprocess_agreed_stop_is_the_local_flag_in_one_process():
  from unet_jax import distributed  # pylint: disable=g-import-not-at-top

  flags = iter([False, True])
  stop = distributed.agreed_stop(lambda: next(flags))
  assert [stop(), stop()] == [False, True]


def test_multiprocess_main_process_first_runs_once_in_one_process():
  from unet_jax import distributed  # pylint: disable=g-import-not-at-top

  calls = []
  assert distributed.main_process_first(lambda: calls.append(1) or 7, what='x') == 7
  assert calls == [1]
