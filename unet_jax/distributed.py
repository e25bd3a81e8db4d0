"""The device runner: places state and batches, and runs the steps under jit or pmap.

`config.parallelism` picks one of two equivalent forms of data parallelism:

* 'jit' (the default): `jax.jit` over a 1-axis device `Mesh` named 'data'.
  The global batch is split over that axis with `NamedSharding`; the state is
  replicated and donated. Each process feeds its own rows of the global batch
  (`jax.make_array_from_process_local_data`).
* 'pmap': `jax.pmap` over the local devices; the state carries a leading
  device axis, and the step averages gradients and BatchNorm statistics with
  `pmean` over the axis 'data'. pmap is in maintenance mode in JAX; it is kept
  for code that relies on it.

The runner hides the difference: `put_state` / `get_state` move the state to
and from the devices, `train` runs a step, `predict` gives this process's rows
of the predictions.

Across processes (each a no-op or the plain call with one process):
`sum_over_processes` and `gather_over_processes` combine host arrays,
`agreed_stop` makes a stop request that all processes act on after the same
step, and `main_process_first` lets process 0 do shared work (building a data
set) before the others.
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

AXIS = 'data'
MODES = ('jit', 'pmap')


def create_mesh(devices=None) -> Mesh:
  """A 1-axis mesh named 'data' over all (global) devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (AXIS,))


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


class Runner:
  """Runs the train, prediction and logits steps on the devices.

  Args:
    mode: 'jit' or 'pmap'.
    train_step: (state, batch) -> (state, metrics), pure; under pmap it must
      average over the axis 'data'.
    predict_step: (state, images) -> class maps, per example.
    logits_step: (state, images) -> logits, per example.
    mesh: the device mesh ('jit').
  """

  def __init__(
    self,
    mode: str,
    *,
    train_step: Callable,
    predict_step: Callable,
    logits_step: Callable,
    mesh: Mesh | None = None,
  ):
    if mode not in MODES:
      raise ValueError(f'parallelism must be one of {MODES}, got {mode!r}.')
    self.mode = mode
    if mode == 'pmap':
      self.n_local = jax.local_device_count()
      self._train = jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,))
      self._predict = jax.pmap(predict_step, axis_name=AXIS)
      self._logits = jax.pmap(logits_step, axis_name=AXIS)
      self._finite = jax.pmap(_all_finite)
      return
    mesh = mesh or create_mesh()
    self.replicated = NamedSharding(mesh, P())
    self.sharded = NamedSharding(mesh, P(AXIS))
    self._train = jax.jit(
      train_step,
      in_shardings=(self.replicated, self.sharded),
      out_shardings=(self.replicated, self.replicated),
      donate_argnums=(0,),
    )
    per_example = dict(
      in_shardings=(self.replicated, self.sharded), out_shardings=self.sharded
    )
    self._predict = jax.jit(predict_step, **per_example)
    self._logits = jax.jit(logits_step, **per_example)
    self._finite = jax.jit(_all_finite, out_shardings=self.replicated)

  def put_state(self, state: Any) -> Any:
    """A host state on the devices: replicated, or stacked per device (pmap)."""
    if self.mode == 'pmap':
      return jax.tree.map(
        lambda x: np.stack([np.asarray(x)] * self.n_local), jax.device_get(state)
      )
    return jax.device_put(state, self.replicated)

  def get_state(self, state: Any) -> Any:
    """The state as host numpy arrays (one replica)."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(state))
    return jax.device_get(state)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a global batch, on the devices."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: x.reshape((self.n_local, -1) + x.shape[1:]), batch)
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self.sharded, x), batch
    )

  def train(self, state: Any, batch: dict[str, np.ndarray]) -> tuple[Any, dict]:
    """One step on this process's rows {'image', 'label'} of the global batch."""
    state, metrics = self._train(state, self.put_batch(batch))
    if self.mode == 'pmap':
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return state, metrics

  def predict(self, state: Any, images: np.ndarray) -> np.ndarray:
    """Class maps of this process's rows of a global batch, on the host."""
    return self._local_rows(self._predict(state, self._put_images(images)))

  def logits(self, state: Any, images: np.ndarray) -> np.ndarray:
    """Logits of this process's rows of a global batch, on the host."""
    return self._local_rows(self._logits(state, self._put_images(images)))

  def _put_images(self, images: np.ndarray) -> jax.Array:
    return self.put_batch({'image': images})['image']

  def _local_rows(self, out: jax.Array) -> np.ndarray:
    """This process's rows of a per-example output, in order, on the host."""
    if self.mode == 'pmap':
      return np.asarray(out).reshape((-1,) + out.shape[2:])
    # This process's rows of the global batch, in order: what it fed in.
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
      start = s.index[0].start or 0
      if start not in seen:  # Replicas along other mesh axes hold the same rows.
        seen.add(start)
        rows.append(np.asarray(s.data))
    return np.concatenate(rows)

  def is_finite(self, state: Any) -> bool:
    """Whether every float in the state is finite: one reduction on the devices."""
    finite = self._finite(state)
    if self.mode == 'pmap':
      finite = finite.all()
    return bool(finite)


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
  mesh = create_mesh()
  sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
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
