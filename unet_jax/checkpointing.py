"""A thin orbax wrapper: save every N steps, keep the last K plus the best by Dice.

Atomicity: orbax writes each step into a temporary folder and renames it into place
only once every file is written and synced, so a process killed at any moment (even
SIGKILL in the middle of a save) leaves either the complete step or a temporary folder
that is never read and is removed the next time a manager opens the folder
(`cleanup_tmp_directories=True`). `latest_step()` only lists finished steps.

Saves are synchronous on purpose: the train step donates its state buffers, and a
synchronous save has finished reading them before the next step runs.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

BEST_METRIC = 'dice'


def create_manager(directory: str, *, keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the latest `keep` steps and the best by 'dice'."""
  if keep < 1:
    raise ValueError(f'keep_checkpoints must be at least 1, got {keep}.')
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep),
      # Ascending sort keeps the last one: the highest Dice. Steps saved without an
      # evaluation carry no metrics and are left to LatestN.
      pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=False,
      create=True,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         metrics: dict[str, float] | None = None) -> None:
  """Saves `state` at `step` (overwrites nothing: an existing step is skipped)."""
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """Restores the latest finished step into the structure and shardings of
  `abstract_state` (a pytree of jax.ShapeDtypeStruct); None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
