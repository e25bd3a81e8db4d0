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

Integrity: once orbax has finalised a step, `save` writes a manifest into its
folder (`MANIFEST`: the relative path, size and SHA-256 of every file of the
step), atomically, from process 0 alone (orbax's save ends with a barrier of all
processes, so every process's files are there). `verify` reads every file of a
step again and compares; `newest_intact` (and `restore` without a step) skips,
with a warning naming the folder and the file, a step that fails it, or that is
empty or lacks its `default/` item (what an interrupted copy leaves). A step
without a manifest (written before unet_jax wrote them) is unverified: it is used,
with an info log. Writing the manifest and `verify` each read every byte of one
step once; nothing else is read.

Saves are synchronous on purpose: the train step donates its state buffers, and a
synchronous save has finished reading them before the next step runs. A save that
runs out of disk space raises `OSError(ENOSPC)` with one line: the folder and
about how much free space a step needs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

MODES = ('max', 'min')
MANIFEST = 'unet_jax_manifest.json'  # In each step folder, beside orbax's files.
ITEM = 'default'  # The one item of a step (`StandardSave` writes it).
_CHUNK = 1 << 20


class DamagedCheckpoint(ValueError):
  """A step folder that is empty, lacks its item, or whose files do not match its
  manifest; the message names the folder or the file and what is wrong."""


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


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  """The folder of `step`."""
  return os.path.join(str(manager.directory), str(step))


def _step_files(path: str) -> dict[str, str]:
  """The files of a step folder (its manifest aside): relative path -> path."""
  found = {}
  for root, dirs, names in os.walk(path):
    dirs.sort()
    for name in sorted(names):
      full = os.path.join(root, name)
      relative = os.path.relpath(full, path)
      if not relative.startswith(MANIFEST):
        found[relative] = full
  return found


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def write_manifest(path: str) -> None:
  """Writes `path/MANIFEST`: the size and SHA-256 of each file of the step folder
  `path`, through a temporary file renamed into place (all of it or nothing)."""
  files = {
    relative: {'size': os.path.getsize(full), 'sha256': _sha256(full)}
    for relative, full in _step_files(path).items()
  }
  tmp = os.path.join(path, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump({'version': 1, 'files': files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(path, MANIFEST))


def _read_manifest(path: str) -> dict[str, dict[str, Any]]:
  try:
    with open(path) as f:
      files = json.load(f)['files']
    return {
      k: {'size': int(v['size']), 'sha256': str(v['sha256'])} for k, v in files.items()
    }
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpoint(f'{path} cannot be read ({type(e).__name__}: {e})') from None


def verify(path: str) -> bool:
  """Checks the step folder `path` against the manifest `save` wrote into it.

  Reads every file the manifest names (sizes first, then SHA-256).

  Returns:
    True when every file matches; False for a step without a manifest
    (unverified: written before unet_jax wrote manifests).

  Raises:
    DamagedCheckpoint: naming the folder or the file: an empty folder, a
      missing `default/` item, or a file missing, of another size or of
      another SHA-256 than when it was written.
  """
  if not os.path.isdir(path) or not os.listdir(path):
    raise DamagedCheckpoint(f'{path} is empty (an interrupted copy?)')
  if not os.path.isdir(os.path.join(path, ITEM)):
    raise DamagedCheckpoint(
      f'{path} has no {ITEM}/ item, only {sorted(os.listdir(path))} (an interrupted copy?)'
    )
  manifest = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest):
    return False
  recorded = _read_manifest(manifest)
  for relative, entry in recorded.items():
    full = os.path.join(path, relative)
    if not os.path.isfile(full):
      raise DamagedCheckpoint(f'{full} is missing')
    size = os.path.getsize(full)
    if size != entry['size']:
      raise DamagedCheckpoint(
        f'{full} has {size} bytes, {entry["size"]} when it was written (truncated?)'
      )
  for relative, entry in recorded.items():
    full = os.path.join(path, relative)
    if _sha256(full) != entry['sha256']:
      raise DamagedCheckpoint(
        f'{full} does not match the SHA-256 recorded when it was written'
        ' (changed on disk since)'
      )
  return True


def newest_intact(
  manager: ocp.CheckpointManager, *, steps: list[int] | None = None
) -> tuple[int | None, dict[int, str]]:
  """The newest of `steps` (default: every finished step) that passes `verify`.

  Each step it skips is logged as a warning naming it and what is wrong; a step
  without a manifest is taken, with an info log.

  Returns:
    (step or None when no step is intact, {skipped step: what is wrong}).
  """
  damaged = {}
  for step in sorted(manager.all_steps() if steps is None else steps, reverse=True):
    path = step_dir(manager, step)
    try:
      verified = verify(path)
    except DamagedCheckpoint as e:
      logging.warning('Skipping checkpoint step %d: %s.', step, e)
      damaged[step] = str(e)
      continue
    if not verified:
      logging.info(
        '%s has no %s (written before unet_jax checked checkpoints): using it unverified.',
        path,
        MANIFEST,
      )
    return step, damaged
  return None, damaged


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def set_aside(manager: ocp.CheckpointManager, steps) -> list[str]:
  """Renames the folders of `steps` to `<step>.damaged` (orbax lists them no
  more, so a resumed run writes those steps again) and reloads `manager`.

  Every process must call it, with the same steps; process 0 renames, between
  barriers. Returns the new folders.
  """
  _barrier('unet_jax.checkpointing.set_aside:start')
  moved = []
  for step in sorted(steps):
    source = step_dir(manager, step)
    target, n = f'{source}.damaged', 1
    while os.path.exists(target):
      target, n = f'{source}.damaged{n}', n + 1
    if jax.process_index() == 0:
      os.rename(source, target)
      logging.warning('Moved the damaged checkpoint %s to %s.', source, target)
    moved.append(target)
  _barrier('unet_jax.checkpointing.set_aside:end')
  manager.reload()
  return moved


def _is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is ENOSPC (orbax and
  tensorstore wrap it; tensorstore keeps only the message)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if 'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(p) for p in _step_files(path).values())


def _size(n: float) -> str:
  for unit in ('bytes', 'kB', 'MB', 'GB'):
    if n < 1000 or unit == 'GB':
      return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1000
  return ''


def _disk_full(manager: ocp.CheckpointManager, step: int, state: Any) -> OSError:
  """The one-line error of a save that ran out of space: the folder, what a
  step needs (the newest earlier step's size, or the state's bytes), what is free."""
  directory = str(manager.directory)
  earlier = [s for s in manager.all_steps() if s != step]
  if earlier:
    needed = _folder_bytes(step_dir(manager, max(earlier)))
    basis = f'the size of step {max(earlier)}'
  else:
    needed = sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(state))
    basis = 'the size of the state'
  free = shutil.disk_usage(directory).free
  return OSError(
    errno.ENOSPC,
    f'No space left on the device of {directory} to save checkpoint step {step}:'
    f' a step needs about {_size(needed)} ({basis}), {_size(free)} is free.'
    ' Free some space, then run the same command to resume.',
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  *,
  record: dict[str, Any] | None = None,
  metrics: dict[str, float] | None = None,
) -> None:
  """Saves `state` at `step` with its config `record` (an existing step is skipped),
  then its manifest (process 0).

  Raises:
    OSError: ENOSPC, in one line, when the disk is full.
  """
  if step in manager.all_steps():
    return
  if metrics:
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)} or None
  try:
    manager.save(
      step,
      args=ocp.args.StandardSave(state),
      metrics=metrics,
      force=True,
      custom_metadata={'config': record or {}, 'metrics': metrics or {}},
    )
    manager.wait_until_finished()  # Ends with a barrier: every process's files are in.
    if jax.process_index() == 0:
      write_manifest(step_dir(manager, step))
  except Exception as e:  # pylint: disable=broad-exception-caught
    if _is_disk_full(e):
      raise _disk_full(manager, step, state) from None
    raise


def read_record(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The config a step was written with; None for a checkpoint that recorded none."""
  custom = manager.metadata(step).custom_metadata or {}
  return custom.get('config') or None


def ranked_steps(
  manager: ocp.CheckpointManager, *, best_metric: str, best_mode: str = 'max'
) -> list[int]:
  """The steps that recorded a finite `best_metric`, best first."""
  scored = []
  for step in manager.all_steps():
    try:
      custom = manager.metadata(step).custom_metadata or {}
    except (OSError, ValueError) as e:  # A damaged step: its metadata is unreadable.
      logging.warning('Cannot read the metrics of checkpoint step %d (%s).', step, e)
      continue
    value = custom.get('metrics', {}).get(best_metric)
    if value is not None and math.isfinite(value):
      scored.append((value if best_mode == 'max' else -value, step))
  return [step for _, step in sorted(scored, reverse=True)]


def best_step(
  manager: ocp.CheckpointManager, *, best_metric: str, best_mode: str = 'max'
) -> int | None:
  """The step with the best recorded `best_metric`; None when no step has one."""
  ranked = ranked_steps(manager, best_metric=best_metric, best_mode=best_mode)
  return ranked[0] if ranked else None


def restore(
  manager: ocp.CheckpointManager, abstract_state: Any, *, step: int | None = None
) -> Any | None:
  """Restores `step` into the structure and shardings of `abstract_state` (a
  pytree of jax.ShapeDtypeStruct); None when there is no checkpoint.

  Without `step`, the newest intact step (`newest_intact`: damaged newer steps
  are skipped with a warning); a `step` given is verified.

  Raises:
    DamagedCheckpoint: `step` fails `verify`.
  """
  if step is None:
    step, _ = newest_intact(manager)
    if step is None:
      return None
  else:
    verify(step_dir(manager, step))
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
