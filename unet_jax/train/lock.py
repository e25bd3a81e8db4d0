"""One training run per workdir: an exclusive lock file, `<workdir>/train.lock`.

    with lock.hold(workdir):                    # launch.py, around the training
      train.train_and_evaluate(config, workdir)

Two runs on one workdir write the same checkpoints and metrics: one crashes
mid-save, the other leaves duplicate rows. The run holding the lock owns the
workdir; a second run fails at once (`WorkdirBusy`), before it builds data or
compiles anything, with one line naming the owner and what to do.

The mechanism is a file created with `O_CREAT | O_EXCL`, holding the owner as
JSON: pid, host, start time (UTC) and, on Linux, the process's start time in
clock ticks since boot (`/proc/<pid>/stat`), which tells a live owner from a
process that reuses its pid, and its PID namespace (`/proc/self/ns/pid`).
Exclusive creation is atomic on local file systems and on NFS (v3 and later)
and Lustre, where a workdir shared by a cluster lives.
`fcntl.flock` is not used: it would end with the process even under SIGKILL,
but on network file systems it is emulated per client or not at all, so it
could let two hosts in at once; and it cannot say who holds the lock.

The file is removed when the run ends: normally, on an exception, or on
SIGINT/SIGTERM (the run saves and raises `Interrupted`; a second signal exits at
once, and launch.py releases the lock before it does). SIGKILL or a lost node
leaves the file, and the next run decides:

* the owner ran on this host, in this PID namespace, and its process is gone
  (`os.kill(pid, 0)` raises ProcessLookupError, or the pid now belongs to a
  younger process): the lock is stale and taken over, with a warning naming
  the old owner;
* the owner ran on another host (or in another PID namespace: another
  container): its pid cannot be checked, so the lock is never taken over; the
  error says to remove the file once that run is gone.
  One exception: under SLURM the file records the job's id and restart count,
  and a requeued job (`#SBATCH --requeue`, SLURM_RESTART_COUNT higher) takes
  over the lock of its own earlier start, wherever that ran: SLURM ends a job
  before it requeues it;
* the owner is alive: the run stops.

With several processes (`jax.distributed`), process 0 alone takes the lock,
while the others wait at a barrier that says whether it succeeded; when it did
not, every process stops with an error (`hold`).

Only training takes the lock, and only through `hold`: launch.py holds it
around `train.train_and_evaluate`, which takes none itself (tests and notebooks
call it on folders of their own); another program that trains in a shared
workdir should hold it the same way. Prediction, export and cross-validation read
finished checkpoints (orbax commits a checkpoint by renaming it) and may run
while a training run holds the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from typing import Callable, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from unet_jax import distributed
from unet_jax.train import setup

LOCK_FILE = 'train.lock'
# A lock file that is still empty or half-written is read again for this long
# (its owner writes it right after creating it).
_READ_WAIT_SECONDS = 2.0


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir's lock (or process 0 could not take it)."""


@dataclasses.dataclass(frozen=True)
class Owner:
  """The process that holds a lock, as its lock file records it."""

  pid: int
  host: str
  started: str  # UTC, 'YYYY-MM-DD HH:MM:SS UTC'.
  process_start: int | None = None  # Linux: /proc/<pid>/stat starttime (ticks).
  pid_namespace: str | None = None  # Linux: /proc/self/ns/pid (containers differ).
  slurm_job: str | None = None  # SLURM_JOB_ID, under SLURM.
  slurm_restart: int = 0  # SLURM_RESTART_COUNT: how often SLURM requeued the job.

  def describe(self) -> str:
    job = f' (SLURM job {self.slurm_job})' if self.slurm_job else ''
    return f'process {self.pid} on host {self.host}{job}, started {self.started}'


def _process_start(pid: int) -> int | None:
  """When process `pid` started, in clock ticks since boot (Linux); else None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rpartition(')')[2].split()
    return int(fields[19])  # Field 22 of proc(5); fields 1 and 2 end at ')'.
  except (OSError, ValueError, IndexError):
    return None


def _pid_namespace() -> str | None:
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return None


def this_process() -> Owner:
  """This process, as a lock file records its owner."""
  return Owner(
    pid=os.getpid(),
    host=socket.gethostname(),
    started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
    process_start=_process_start(os.getpid()),
    pid_namespace=_pid_namespace(),
    slurm_job=os.environ.get('SLURM_JOB_ID') or None,
    slurm_restart=int(os.environ.get('SLURM_RESTART_COUNT') or 0),
  )


def is_alive(owner: Owner) -> bool:
  """Whether `owner`, a process of this host, still runs (a pid now used by a
  younger process does not count)."""
  try:
    os.kill(owner.pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    pass
  now = _process_start(owner.pid)
  return owner.process_start is None or now is None or now == owner.process_start


def stale_because(owner: Owner, me: Owner) -> str | None:
  """Why the lock of `owner` may be taken over by `me`; None when it may not."""
  if owner.slurm_job and owner.slurm_job == me.slurm_job:
    if owner.slurm_restart < me.slurm_restart:
      return (
        f'it ran in an earlier start of SLURM job {owner.slurm_job}, which SLURM'
        ' ended before requeuing it'
      )
  if can_check(owner, me) and not is_alive(owner):
    return 'that process no longer runs'
  return None


def can_check(owner: Owner, me: Owner) -> bool:
  """Whether `me` can see `owner`'s pid: same host, same PID namespace (two
  containers may share a host name, never a PID namespace)."""
  return owner.host == me.host and owner.pid_namespace == me.pid_namespace


def _read(path: str) -> Owner | None:
  """The owner a lock file names; None when the file is gone."""
  deadline = time.monotonic() + _READ_WAIT_SECONDS
  while True:
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      owner = Owner(**json.loads(text))
      if not isinstance(owner.pid, int) or owner.pid <= 0:
        raise ValueError(f'pid {owner.pid!r}')
      return owner
    except (ValueError, TypeError) as e:
      if time.monotonic() > deadline:
        raise WorkdirBusy(
          f'The lock file {path} names no owner ({type(e).__name__}: {e}); if no run'
          ' uses this workdir, remove it.'
        ) from None
    time.sleep(0.1)


def _create(path: str, owner: Owner) -> bool:
  """Creates the lock file naming `owner`; False when it exists."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    json.dump(dataclasses.asdict(owner), f)
    f.flush()
    os.fsync(f.fileno())
  return True


def _take_over(path: str, stale: Owner, me: Owner, *, why: str) -> None:
  """Removes the stale lock file naming `stale`, unless another run replaced it
  meanwhile: the file is first renamed aside (atomic), then checked."""
  aside = f'{path}.stale.{me.pid}'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # Another run took it over first; the next attempt finds its lock.
  if _read(aside) == stale:
    logging.warning('Taking over the stale lock %s of %s: %s.', path, stale.describe(), why)
  else:  # A run took it over between our read and the rename: give it back.
    with contextlib.suppress(FileExistsError):
      os.link(aside, path)
  os.remove(aside)


def _busy(workdir: str, path: str, owner: Owner, me: Owner) -> WorkdirBusy:
  gone = (
    'stop that run first'
    if can_check(owner, me)
    else 'remove the lock file once that run is gone (its pid cannot be checked from'
    f' host {me.host}' + (')' if owner.host != me.host else ', another PID namespace)')
  )
  return WorkdirBusy(
    f'--workdir {workdir} is in use by another training run: {owner.describe()}'
    f' (lock file {path}). Wait for it to finish, use another --workdir, or {gone}.'
  )


@dataclasses.dataclass
class Lock:
  """A held lock: `release()` removes its file (once; only while it names us)."""

  path: str
  owner: Owner
  released: bool = False

  def release(self) -> None:
    if self.released:
      return
    self.released = True
    try:
      current = _read(self.path)
    except WorkdirBusy:
      current = None
    if current == self.owner:
      os.remove(self.path)
    else:
      logging.warning(
        'Not removing %s: it no longer names this run (%s).',
        self.path,
        current.describe() if current else 'it is gone or unreadable',
      )


def acquire(workdir: str, *, attempts: int = 3) -> Lock:
  """Takes the workdir's lock for this process (creating the workdir).

  Args:
    workdir: the run's folder.
    attempts: how often to try again after taking over a stale lock (or finding
      the lock gone), in case another run races for it.

  Returns:
    The held `Lock`.

  Raises:
    ValueError: the workdir is not a writable folder (`setup.check_workdir`).
    WorkdirBusy: a live process (or one on another host) holds it; the message
      names it (pid, host, start time), the lock file and what to do.
  """
  setup.check_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  me = this_process()
  for _ in range(attempts):
    if _create(path, me):
      return Lock(path, me)
    owner = _read(path)
    if owner is None:
      continue  # Released between the two calls.
    why = stale_because(owner, me)
    if why is None:
      raise _busy(workdir, path, owner, me)
    _take_over(path, owner, me, why=why)
  raise WorkdirBusy(
    f'Could not take the lock file {path} in {attempts} attempts: other runs are'
    ' taking it at the same time. Use one --workdir per run.'
  )


def _acquire_on_process_0(workdir: str) -> Lock | None:
  """Process 0 takes the lock while the others wait; all raise if it could not."""
  held, error = None, None
  if distributed.is_main_process():
    try:
      held = acquire(workdir)
    except Exception as e:  # pylint: disable=broad-except  # Re-raised below.
      error = e
  ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise WorkdirBusy(
      f'Process 0 could not take the lock of --workdir {workdir} (its error says'
      f' why); process {jax.process_index()} stops too.'
    )
  return held


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[Callable[[], None]]:
  """Holds the workdir's lock for the block; yields a `release` callable (a no-op
  on processes other than 0), which a hard exit may call first.

  With several processes, every process must enter it (it is collective): process
  0 takes the lock and the others wait for it; when it fails, each raises
  (process 0 the reason, the others `WorkdirBusy`). Call it before any work on the
  workdir, after the processes have checked they run the same config.
  """
  if jax.process_count() == 1:
    held = acquire(workdir)
  else:
    held = _acquire_on_process_0(workdir)
  release = held.release if held is not None else (lambda: None)
  try:
    yield release
  finally:
    release()
