"""Across processes: each helper is a no-op, or the plain call, with one process.

`sum_over_processes` and `gather_over_processes` combine host arrays,
`is_main_process` picks the process that writes files, `agreed_stop` makes a stop
request that all processes act on after the same step, and `main_process_first`
lets process 0 do shared work (building a data set) before the others. The device
runner (jit over a mesh, or pmap) is the trainer's: `unet_jax.train.runner`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The sum of a host array over all processes (itself with one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)


def gather_over_processes(x: np.ndarray) -> np.ndarray:
  """Rows of a host array from all processes, concatenated in process order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def is_main_process() -> bool:
  """Whether this is process 0, which alone writes logs, metrics and pictures."""
  return jax.process_index() == 0


@functools.cache
def _count_over_devices():
  """A jitted sum over one int32 per device of all processes; replicated result."""
  mesh = Mesh(np.asarray(jax.devices()).reshape(-1), ('devices',))
  sharded, replicated = NamedSharding(mesh, P('devices')), NamedSharding(mesh, P())
  total = jax.jit(jnp.sum, out_shardings=replicated)

  def count(flag: bool) -> jax.Array:
    local = np.full((jax.local_device_count(),), int(flag), np.int32)
    return total(jax.make_array_from_process_local_data(sharded, local))

  return count


def agreed_stop(requested: Callable[[], bool]) -> Callable[[], bool]:
  """A stop request that every process sees at the same call.

  With several processes, a signal reaches one of them (or reaches them at
  different moments), but they must all stop after the same step: a process
  that carries on alone waits forever in the next step's gradient all-reduce.
  Each call of the returned callable starts a sum of the local `requested()`
  flags of all processes (one int32 per device: an all-reduce of 4 bytes per
  device) and returns the sum started by the call before, on every process:

    stop_k = sum_p requested_p(at call k - 1) > 0

  So every process gets the same answer at the same call, and the host only
  waits for the previous step's vote, which the devices run right after that
  step: the loop keeps one step in flight, as it does with one process. A
  request is acted on one call later than it is seen.

  Every process must call it the same number of times, in the same order
  relative to its other collectives: `train.train_and_evaluate` calls it once
  after each step. With one process it is `requested` itself.

  Args:
    requested: this process's flag (e.g. `threading.Event.is_set`).

  Returns:
    A callable with no arguments, collective over processes.
  """
  if jax.process_count() == 1:
    return requested
  count = _count_over_devices()
  pending = []  # The vote started by the previous call.

  def stop() -> bool:
    pending.append(count(requested()))
    return len(pending) > 1 and int(pending.pop(0)) > 0

  return stop


def main_process_first(fn: Callable[[], Any], *, what: str) -> Any:
  """Runs `fn` on process 0, then on the others; returns its result on each.

  For work that writes shared files, such as building a data set into a shared
  `data_dir`: process 0 does it while the others wait at a barrier
  (`multihost_utils.broadcast_one_to_all` of whether it succeeded), then they
  run `fn` themselves and find the work done. When `fn` fails on process 0, the
  others raise a RuntimeError naming `what` instead of repeating it. With one
  process, `fn()`.
  """
  if jax.process_count() == 1:
    return fn()
  result, ok = None, True
  if is_main_process():
    try:
      result = fn()
    except Exception:
      ok = False
      multihost_utils.broadcast_one_to_all(np.int32(ok))
      raise
  if not int(multihost_utils.broadcast_one_to_all(np.int32(ok))):
    raise RuntimeError(
      f'Process 0 failed to {what} (its log says why); process'
      f' {jax.process_index()} stops too.'
    )
  return result if is_main_process() else fn()
