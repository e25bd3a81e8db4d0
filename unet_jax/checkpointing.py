"""A thin orbax wrapper: save every N steps, keep the last K plus the best by a metric.

Each checkpoint also records, in its orbax metadata, the config it was written
with and its evaluation metrics (`record` and `metrics` of `save`), so a run
resuming in the same workdir can be checked against it before anything is
restored (`read_record`), and `best_step` can pick the best one later.

Atomicity: orbax writes each step into a temporary folder and renames it into place
only once every file is written and synced, so a process killed at any moment (even
SIGKILL in the middle of a save) leaves either the complete step or a temporary folder
that is never read and is removed the next time a manager opens the folder
(`cleanup_tmp_directories=True`). `latest_step()` only lists finished steps.

Saves are synchronous on purpose: the train step donates its state buffers, and a
synchronous save has finished reading them before the next step runs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

MODES = ('max', 'min')


def create_manager(
  directory: str, *, keep: int, best_metric: str = 'eval_dice', best_mode: str = 'max'
) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the latest `keep` steps and the best by `best_metric`.

  `best_mode='max'` keeps the highest value (Dice), 'min' the lowest (a distance).
  """
  if keep < 1:
    raise ValueError(f'keep_checkpoints must be at least 1, got {keep}.')
  if best_mode not in MODES:
    raise ValueError(f'best_mode must be one of {MODES}, got {best_mode!r}.')
  policy = pp.AnyPreservationPolicy(
    [
      pp.LatestN(n=keep),
      # Sorted ascending ('max') or descending ('min'), BestN keeps the last one.
      # Steps saved without an evaluation carry no metrics and are left to LatestN.
      pp.BestN(
        get_metric_fn=lambda m: m[best_metric],
        reverse=best_mode == 'min',
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    cleanup_tmp_directories=True,
    enable_async_checkpointing=False,
    create=True,
  )
  # The handler named up front lets `metadata` read steps without warnings.
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  *,
  record: dict[str, Any] | None = None,
  metrics: dict[str, float] | None = None,
) -> None:
  """Saves `state` at `step` with its config `record` (an existing step is skipped)."""
  if step in manager.all_steps():
    return
  if metrics:
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)} or None
  manager.save(
    step,
    args=ocp.args.StandardSave(state),
    metrics=metrics,
    force=True,
    custom_metadata={'config': record or {}, 'metrics': metrics or {}},
  )
  manager.wait_until_finished()


def read_record(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The config a step was written with; None for a checkpoint that recorded none."""
  custom = manager.metadata(step).custom_metadata or {}
  return custom.get('config') or None


def best_step(
  manager: ocp.CheckpointManager, *, best_metric: str, best_mode: str = 'max'
) -> int | None:
  """The step with the best recorded `best_metric`; None when no step has one."""
  scored = []
  for step in manager.all_steps():
    value = (
      (manager.metadata(step).custom_metadata or {}).get('metrics', {}).get(best_metric)
    )
    if value is not None and math.isfinite(value):
      scored.append((value if best_mode == 'max' else -value, step))
  return max(scored)[1] if scored else None


def restore(
  manager: ocp.CheckpointManager, abstract_state: Any, *, step: int | None = None
) -> Any | None:
  """Restores `step` (default: the latest finished one) into the structure and
  shardings of `abstract_state` (a pytree of jax.ShapeDtypeStruct); None when
  there is no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
