"""The training loop: steps, finite checks, evaluation and checkpoints.

Exact resume: the batch at step s is a pure function of (seed, s), the augmentation
and dropout keys are `fold_in(key(seed), s)`, and the checkpoint holds the step, the
parameters, the BatchNorm statistics and the optimiser state. A run that is killed and
started again with the same command therefore ends with the same parameters as one
that never stopped.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from unet_jax import checkpointing
from unet_jax import distributed
from unet_jax import reporting
from unet_jax.train import config_checks
from unet_jax.train import setup


class Interrupted(Exception):
  """Training stopped on request (SIGINT or SIGTERM) after saving a checkpoint."""


def _last_good(run: setup.Run) -> str:
  """The step a rerun would resume from: the newest intact one, not the newest."""
  step, _ = checkpointing.newest_intact(run.manager)
  if step is not None:
    where = checkpointing.step_dir(run.manager, step)
    return f'the last good checkpoint is step {step} ({where})'
  return (
    'no intact checkpoint is left'
    if run.manager.all_steps()
    else 'no checkpoint was written'
  )


def _check_finite(
  run: setup.Run, state, pending: list, *, step: int, state_too: bool
) -> None:
  """Raises FloatingPointError at the first non-finite loss of `pending` (step, loss)
  pairs, or, with `state_too`, if the state after `step` is not finite. The message
  names the step a rerun resumes from (`checkpointing.newest_intact`)."""
  advice = (
    'Lower the learning rate, enable gradient clipping'
    ' (config.optimizer.grad_clip_norm) or check the data.'
  )
  for step, loss in pending:
    if not math.isfinite(float(loss)):
      raise FloatingPointError(
        f'Loss is {float(loss)} at step {step}. Training stopped; {_last_good(run)}.'
        f' {advice}'
      )
  if state_too and not run.runner.is_finite(state):
    raise FloatingPointError(
      f'The parameters or optimizer state are not finite after step {step}'
      ' (the loss was still finite). Training stopped and nothing was saved;'
      f' {_last_good(run)}. {advice}'
    )
  pending.clear()


def _evaluate(run: setup.Run, state, scheduled, step: int) -> dict[str, Any]:
  """Runs one evaluator; writes and logs its metrics, prefixed with its name."""
  result = scheduled.evaluator.run(state)
  run.writer.write(step, {f'{scheduled.name}_{k}': v for k, v in result.items()})
  shown = '  '.join(f'{k} {v:.4f}' for k, v in result.items() if isinstance(v, float))
  logging.info('eval %s at step %d: %s', scheduled.name, step, shown)
  return result


def _save(run: setup.Run, state, step: int, results: dict[str, dict]) -> None:
  best_metric = run.options.best_metric
  name = config_checks.best_evaluator(run.options)
  value = results.get(name, {}).get(best_metric[len(name) + 1 :])
  metrics = {best_metric: value} if value is not None else None
  checkpointing.save(
    run.manager, step, run.runner.get_state(state), record=run.record, metrics=metrics
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_requested: Callable[[], bool] | None = None,
) -> dict[str, dict[str, Any]]:
  """Trains, evaluates and checkpoints in `workdir`; resumes from its latest step.

  Args:
    config: the run's config (configs/default.py; its sections are read into
      `unet_jax.config` options, which hold the defaults).
    workdir: the run's folder.
    stop_requested: polled after every step; when it returns True, the run saves
      a checkpoint and raises `Interrupted` (launch.py sets it on SIGINT/SIGTERM).
      With several processes, the flags of all are combined after every step
      (`runner.agreed_stop`), so all stop after the same step.

  Returns:
    The last metrics of each evaluator, by evaluator name.
  """
  run = setup.prepare(config, workdir)
  if stop_requested is not None:
    stop_requested = distributed.agreed_stop(stop_requested)
  options, state, total = run.options, run.state, run.options.num_train_steps
  logging.info(
    'Training %s for %d steps from step %d on %d device(s) (%s), global'
    ' batch %d, input %s.',
    options.data.name,
    total,
    run.start_step,
    jax.device_count(),
    options.parallelism,
    options.batch_size,
    run.data.info.spatial_shape,
  )
  progress = reporting.Progress(
    total_steps=total,
    start_step=run.start_step,
    every_steps=options.log_every_steps,
    batch_size=options.batch_size,
    writer=run.writer,
  )
  batches = run.data.train_iterator(
    run.start_step, batch_size=options.batch_size, seed=options.seed
  )
  results, pending = {}, []
  for step in range(run.start_step + 1, total + 1):
    with progress.timed('data'):
      batch = next(batches)
    state, m = run.runner.train(state, batch)
    pending.append((step, m['loss']))
    extra = {'learning_rate': m['learning_rate'], 'grad_norm': m['grad_norm']}
    if progress.step_done(step, loss=m['loss'], extra=extra) is not None:
      _check_finite(run, state, pending, step=step, state_too=False)
    due = [s for s in run.evaluators if s.due(step, total)]
    stop = stop_requested is not None and stop_requested()
    if due or stop or step % options.checkpoint_every_steps == 0 or step == total:
      jax.block_until_ready(state)  # Steps still on the device are training time.
      with progress.paused():
        _check_finite(run, state, pending, step=step, state_too=True)
        for scheduled in due:
          results[scheduled.name] = _evaluate(run, state, scheduled, step)
        _save(run, state, step, {s.name: results[s.name] for s in due})
    if stop:
      raise Interrupted(
        f'Stopped at step {step} on request; checkpoint saved in'
        f' {os.path.join(workdir, "checkpoints", str(step))}. Run the same command'
        ' to resume.'
      )
  if run.start_step >= total:  # A finished run: evaluate what it left.
    results = {s.name: _evaluate(run, state, s, total) for s in run.evaluators}
  run.writer.close()
  run.manager.close()
  logging.info('Done in %s.', reporting.format_time(progress.elapsed()))
  return results
