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
of the predictions. The helpers that combine host values across processes are
`unet_jax.distributed`'s.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
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
