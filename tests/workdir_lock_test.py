"""One training run per workdir (unet_jax/train/lock.py): the lock file, its owner,
stale and foreign locks, and two real launch.py runs on one workdir."""

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import multiprocess_test
from tests import train_test
from unet_jax.train import lock

ROOT = train_test.ROOT
TIMEOUT = 300  # Seconds a launch.py run of the tiny config may take on a loaded machine.
# Compiling fast matters more than running fast for the tiny model (as in
# tests/multiprocess_test.py); the runs share conftest.py's compilation cache.
ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0')


def _dead_pid() -> int:
  """The pid of a process of this host that has ended."""
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait(timeout=60)
  return proc.pid


def _here(pid, **fields) -> lock.Owner:
  """An owner on this host, in this PID namespace, started at STALE_START."""
  return dataclasses.replace(
    lock.this_process(), pid=pid, started=STALE_START, process_start=None, **fields
  )


def _write(workdir, owner: lock.Owner) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, lock.LOCK_FILE)
  with open(path, 'w') as f:
    json.dump(dataclasses.asdict(owner), f)
  return path


def _read(path) -> dict:
  with open(path) as f:
    return json.load(f)


STALE_START = '2026-01-02 03:04:05 UTC'


def test_the_lock_names_this_process_and_is_removed_after_the_block(tmp_path):
  workdir = str(tmp_path / 'new' / 'run')  # Created by the lock.
  path = os.path.join(workdir, lock.LOCK_FILE)
  with lock.hold(workdir):
    owner = _read(path)
    assert owner['pid'] == os.getpid() and owner['host'] == socket.gethostname()
    assert re.fullmatch(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC', owner['started'])
    assert owner['process_start'] == lock.this_process().process_start
  assert os.listdir(workdir) == []


def test_the_lock_is_removed_when_the_run_raises(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError):
    with lock.hold(workdir):
      assert os.path.exists(os.path.join(workdir, lock.LOCK_FILE))
      raise FloatingPointError('diverged')
  assert os.listdir(workdir) == []


def test_a_live_owner_is_refused_naming_it_and_how_to_proceed(tmp_path):
  workdir = str(tmp_path)
  with lock.hold(workdir):
    path = os.path.join(workdir, lock.LOCK_FILE)
    before = _read(path)
    with pytest.raises(lock.WorkdirBusy) as e:
      lock.acquire(workdir)
    assert _read(path) == before
  message = str(e.value)
  assert '\n' not in message
  assert (
    f'--workdir {workdir} is in use by another training run: process {os.getpid()}'
    f' on host {socket.gethostname()}, started {before["started"]} (lock file {path}).'
  ) in message
  assert 'Wait for it to finish, use another --workdir' in message


def test_a_stale_lock_of_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
  workdir = str(tmp_path)
  pid = _dead_pid()
  path = _write(workdir, _here(pid))
  with caplog.at_level(logging.WARNING):
    held = lock.acquire(workdir)
  assert (
    f'Taking over the stale lock {path} of process {pid} on host'
    f' {socket.gethostname()}, started {STALE_START}: that process no longer runs.'
  ) in caplog.messages
  assert _read(path)['pid'] == os.getpid()
  assert os.listdir(workdir) == [lock.LOCK_FILE]  # Nothing left aside.
  held.release()
  assert not os.path.exists(path)


def test_a_pid_reused_by_a_younger_process_is_stale(tmp_path, caplog):
  me = lock.this_process()
  assert me.process_start is not None  # Linux: /proc/<pid>/stat.
  path = _write(str(tmp_path), dataclasses.replace(me, process_start=me.process_start - 1))
  with caplog.at_level(logging.WARNING):
    held = lock.acquire(str(tmp_path))
  assert any(m.startswith(f'Taking over the stale lock {path}') for m in caplog.messages)
  assert _read(path)['process_start'] == me.process_start
  held.release()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
  workdir = str(tmp_path)
  path = _write(workdir, lock.Owner(_dead_pid(), 'gpu-node-17', STALE_START))
  before = _read(path)
  with pytest.raises(lock.WorkdirBusy) as e:
    lock.acquire(workdir)
  assert _read(path) == before
  message = str(e.value)
  assert f'process {before["pid"]} on host gpu-node-17, started {STALE_START}' in message
  assert (
    f'remove the lock file once that run is gone (its pid cannot be checked from'
    f' host {socket.gethostname()})'
  ) in message


def test_a_lock_from_another_pid_namespace_is_never_taken_over(tmp_path):
  path = _write(str(tmp_path), _here(_dead_pid(), pid_namespace='pid:[4026532999]'))
  before = _read(path)
  with pytest.raises(lock.WorkdirBusy) as e:
    lock.acquire(str(tmp_path))
  assert _read(path) == before
  assert (
    f'remove the lock file once that run is gone (its pid cannot be checked from'
    f' host {socket.gethostname()}, another PID namespace).'
  ) in str(e.value)


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_start(
  tmp_path, monkeypatch, caplog
):
  monkeypatch.setenv('SLURM_JOB_ID', '4242')
  monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
  earlier = lock.Owner(_dead_pid(), 'gpu-node-17', STALE_START, slurm_job='4242')
  path = _write(str(tmp_path), earlier)
  with caplog.at_level(logging.WARNING):
    held = lock.acquire(str(tmp_path))
  assert (
    f'Taking over the stale lock {path} of process {earlier.pid} on host gpu-node-17'
    f' (SLURM job 4242), started {STALE_START}: it ran in an earlier start of SLURM'
    ' job 4242, which SLURM ended before requeuing it.'
  ) in caplog.messages
  assert _read(path)['slurm_job'] == '4242' and _read(path)['slurm_restart'] == 1
  held.release()


@pytest.mark.parametrize('job, restart', [('4242', 1), ('4243', 0)])
def test_a_slurm_lock_of_another_host_is_kept_unless_the_job_was_requeued(
  tmp_path, monkeypatch, job, restart
):
  monkeypatch.setenv('SLURM_JOB_ID', '4242')
  monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
  path = _write(
    str(tmp_path),
    lock.Owner(
      _dead_pid(), 'gpu-node-17', STALE_START, slurm_job=job, slurm_restart=restart
    ),
  )
  before = _read(path)
  with pytest.raises(lock.WorkdirBusy, match=f'on host gpu-node-17 \\(SLURM job {job}\\)'):
    lock.acquire(str(tmp_path))
  assert _read(path) == before


def test_an_unreadable_lock_is_refused_naming_the_file(tmp_path, monkeypatch):
  monkeypatch.setattr(lock, '_READ_WAIT_SECONDS', 0.3)
  path = os.path.join(tmp_path, lock.LOCK_FILE)
  with open(path, 'w') as f:
    f.write('{"pid": 12')  # As a crash while writing it leaves it.
  with pytest.raises(lock.WorkdirBusy, match=f'The lock file {path} names no owner'):
    lock.acquire(str(tmp_path))


def test_release_keeps_a_lock_that_names_another_run(tmp_path, caplog):
  held = lock.acquire(str(tmp_path))
  other = lock.Owner(12345, 'gpu-node-17', STALE_START)
  path = _write(str(tmp_path), other)  # Removed by hand and taken by another run.
  with caplog.at_level(logging.WARNING):
    held.release()
  assert _read(path) == dataclasses.asdict(other)
  assert any('no longer names this run' in m for m in caplog.messages)


# Holds the lock with launch.py's signal handling, as training does, and waits.
_HOLDER = r"""
import sys, time
sys.path.insert(0, {root!r})
import launch
from unet_jax.train import lock
with lock.hold({workdir!r}) as release:
  launch._stop_on_signals(before_exit=release)
  print('holding', flush=True)
  time.sleep(300)
"""


def test_a_second_signal_releases_the_lock_before_it_exits(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(
    [sys.executable, '-c', _HOLDER.format(root=ROOT, workdir=workdir)],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    assert proc.stdout.readline() == 'holding\n', proc.stderr.read()
    assert _read(os.path.join(workdir, lock.LOCK_FILE))['pid'] == proc.pid
    for _ in range(2):
      proc.send_signal(signal.SIGTERM)
      time.sleep(0.5)  # One signal at a time, as a scheduler sends them.
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'Second SIGTERM: exiting now, without saving.' in stderr
  assert os.listdir(workdir) == []


# Two real launch.py runs on one workdir.


def _args(workdir, data_dir, **extra):
  long = dict(
    num_train_steps=10_000, eval_every_steps=10_000, checkpoint_every_steps=10_000
  )
  return [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config=' + os.path.join(ROOT, 'configs/dice_bce.py'),
    f'--workdir={workdir}',
  ] + train_test.flag_args(data_dir, **{**long, **extra})


def _run(args):
  return subprocess.run(
    args,
    cwd=ROOT,
    timeout=TIMEOUT,
    env=ENV,
    capture_output=True,
    text=True,
  )


def _wait_for(predicate, proc, err_path, what):
  deadline = time.monotonic() + TIMEOUT
  while not predicate():
    if proc.poll() is not None:
      with open(err_path) as f:
        pytest.fail(
          f'The first run ended ({proc.returncode}) before {what}:\n{f.read()[-3000:]}'
        )
    if time.monotonic() > deadline:
      pytest.fail(f'No {what} in {TIMEOUT} s.')
    time.sleep(0.2)


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
  """A first run holds the workdir; a second is started on it; then the first gets
  SIGTERM; then a third, after a stale lock was planted, finishes one more step."""
  tmp = tmp_path_factory.mktemp('wdlock')
  data_dir, workdir = str(tmp / 'tfds'), str(tmp / 'run')
  path = os.path.join(workdir, lock.LOCK_FILE)
  err_path = str(tmp / 'first.err')
  out = {'workdir': workdir, 'path': path}
  with open(err_path, 'w') as err:
    first = subprocess.Popen(
      _args(workdir, data_dir),
      cwd=ROOT,
      env=ENV,
      stdout=subprocess.DEVNULL,
      stderr=err,
      start_new_session=True,
    )
  try:
    _wait_for(lambda: os.path.exists(path), first, err_path, 'lock file')
    out['owner'] = _read(path)
    out['second'] = _run(_args(workdir, data_dir))
    out['owner_after_second'] = _read(path)

    def training():
      with open(err_path) as f:
        return ' steps from step ' in f.read()

    _wait_for(training, first, err_path, "'Training' line")  # Signals are handled.
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=TIMEOUT)
  finally:
    if first.poll() is None:
      os.killpg(first.pid, signal.SIGKILL)
      first.wait(timeout=60)
  with open(err_path) as f:
    out['first'] = (first.pid, first.returncode, f.read())
  out['lock_after_first'] = os.path.exists(path)
  stopped = re.search(r'Stopped at step (\d+) on request', out['first'][2])
  assert stopped, out['first'][2][-3000:]
  out['stopped_at'] = step = int(stopped.group(1))
  out['stale_pid'] = pid = _dead_pid()
  _write(workdir, _here(pid))
  out['third'] = _run(_args(workdir, data_dir, num_train_steps=step + 1))
  out['lock_after_third'] = os.path.exists(path)
  return out


def test_a_second_run_on_a_held_workdir_fails_at_once_naming_the_owner(two_runs):
  pid, _, _ = two_runs['first']
  owner = two_runs['owner']
  assert owner['pid'] == pid and owner['host'] == socket.gethostname()
  second = two_runs['second']
  assert second.returncode == 75, second.stderr[-3000:]
  last = second.stderr.strip().splitlines()[-1]
  assert last == (
    f'Error: --workdir {two_runs["workdir"]} is in use by another training run:'
    f' process {pid} on host {socket.gethostname()}, started {owner["started"]} (lock'
    f' file {two_runs["path"]}). Wait for it to finish, use another --workdir, or stop'
    ' that run first.'
  )
  # Before the data or the model: nothing built, planned or compiled.
  for later in ('Building', 'The plan', 'Training', 'Traceback'):
    assert later not in second.stderr
  assert two_runs['owner_after_second'] == owner


def test_sigterm_stops_the_owner_with_a_checkpoint_and_removes_the_lock(two_runs):
  _, code, stderr = two_runs['first']
  assert code == 130, stderr[-3000:]
  assert not two_runs['lock_after_first']
  step = two_runs['stopped_at']
  checkpoints = os.listdir(os.path.join(two_runs['workdir'], 'checkpoints'))
  assert str(step) in checkpoints


def test_a_stale_lock_is_taken_over_and_a_finished_run_removes_its_lock(two_runs):
  third, step = two_runs['third'], two_runs['stopped_at']
  assert third.returncode == 0, third.stderr[-3000:]
  assert (
    f'Taking over the stale lock {two_runs["path"]} of process {two_runs["stale_pid"]}'
    f' on host {socket.gethostname()}, started {STALE_START}: that process no longer'
    ' runs.'
  ) in third.stderr
  assert f'at step {step}.' in third.stderr  # Resumed where the first run stopped.
  assert not two_runs['lock_after_third']
  rows = train_test._read_jsonl(two_runs['workdir'])
  assert [r['step'] for r in rows if 'train_loss' in r] == list(range(1, step + 2))


def test_export_runs_while_a_training_run_holds_the_workdir(two_runs, tmp_path):
  workdir, output = two_runs['workdir'], str(tmp_path / 'model.jax')
  with lock.hold(workdir):  # This test's process is the training run.
    before = _read(two_runs['path'])
    proc = _run(
      [
        sys.executable,
        os.path.join(ROOT, 'launch.py'),
        '--mode=export',
        f'--workdir={workdir}',
        f'--output={output}',
        '--step=latest',
      ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'Wrote {output}.' in proc.stdout and os.path.getsize(output) > 0
    assert _read(two_runs['path']) == before


def test_multiprocess_process_0_refuses_a_held_workdir_and_process_1_stops_too(tmp_path):
  workdir, logs = str(tmp_path / 'run'), str(tmp_path / 'logs')
  os.makedirs(logs)
  with lock.hold(workdir):  # This test's process owns the workdir.
    path = os.path.join(workdir, lock.LOCK_FILE)
    before = _read(path)
    with multiprocess_test._launched(
      'held', workdir, str(tmp_path / 'tfds'), logs, str(tmp_path / 'cache')
    ) as procs:
      codes = multiprocess_test._wait(procs, timeout=TIMEOUT)
    assert _read(path) == before
  p0, p1 = procs
  assert codes == [75, 75], p0.stderr[-3000:] + p1.stderr[-3000:]
  assert f'process {os.getpid()} on host {socket.gethostname()}' in p0.stderr
  assert (
    f'Error: Process 0 could not take the lock of --workdir {workdir} (its error says'
    ' why); process 1 stops too.'
  ) in p1.stderr
  for proc in procs:
    assert 'Building' not in proc.stderr and 'Traceback' not in proc.stderr
  assert p1.wrote() == set()
