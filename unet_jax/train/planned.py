"""The plan step at the start of training: plan, check the planned config, time a step.

`unet_jax.planning` makes the plan from the data alone; what needs the trainer
lives here: `measure_step_time` runs train's own steps, and `plan_run` checks the
planned config as training would (`config_checks.validate_config`) before
measuring.
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from unet_jax import planning
from unet_jax import train
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import sources
from unet_jax.models import factory
from unet_jax.train import config_checks


def measure_step_time(
  config: ml_collections.ConfigDict, data, *, steps: int = 6, warmup: int = 4
) -> float:
  """Seconds per training step of `config` on `data` (an `input_pipeline.Dataset`
  opened for it), run as training runs it: train's runner, optimizer and state
  (`config.parallelism` over all devices, the global batch).

  Compiles, runs up to `warmup` more steps (for at most about 10 s) so the input
  pipeline's prefetch buffer is drained, then times `steps` steps (at least 2,
  fewer when they take over 15 s) with real batches, so the input pipeline's
  time counts; returns the mean.
  """
  # pylint: disable=protected-access  (train's own setup, not a copy of it)
  config = train._with_data_classes(config, data.info)
  tx = train.create_optimizer(config)
  runner = train._create_runner(config, tx)
  # pylint: enable=protected-access
  input_shape = (1, *data.info.spatial_shape, data.info.num_channels)
  state = train.create_train_state(
    jax.random.key(config.seed), factory.create_model(config.model), tx, input_shape
  )
  state = runner.put_state(state)
  batches = data.train_iterator(0, batch_size=config.batch_size, seed=config.seed)

  def step(state):
    state, metrics = runner.train(state, next(batches))
    jax.block_until_ready(metrics['loss'])
    return state

  state = step(state)  # Compiles.
  start = time.perf_counter()
  for _ in range(warmup):
    if time.perf_counter() - start > 10:
      break
    state = step(state)
  start, done = time.perf_counter(), 0
  while done < max(steps, 2):
    state = step(state)
    done += 1
    if done >= 2 and time.perf_counter() - start > 15:
      break
  return (time.perf_counter() - start) / done


def _stored_step_time(path: str, fp: planning.Fingerprint, time_budget) -> float | None:
  """The step time a workdir's plan.json measured for the same data and budget
  (a resumed run reuses it, so it plans the same number of steps)."""
  if not time_budget or not os.path.exists(path):
    return None
  try:
    inputs = planning.read_plan(path).inputs
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('Ignoring %s, which cannot be read (%s).', path, e)
    return None
  if inputs.get('key') == fp.key and inputs.get('time_budget') == time_budget:
    return inputs.get('step_time')
  return None


def _reopen(config, data):
  ndim = sources.config_ndim(config.data)
  return input_pipeline.open(
    config.data, divisor=factory.input_divisor_of(config.model, ndim=ndim)
  )


def plan_run(config: ml_collections.ConfigDict, data, workdir: str):
  """The plan step at the start of training (`train._prepare`).

  With `config.plan` set: fingerprints `data` (cached), plans with
  `config.plan_memory_budget` and `config.plan_time_budget` (measuring the step
  time of the planned model when a time budget is given; a resumed run reuses
  the time its plan.json recorded), keeps the fields `config.plan_keep` names
  (launch.py adds every field set on the command line), writes
  `workdir/plan.json` (process 0) and logs the table.

  Returns:
    (config, data): the planned config, and the data set opened for it; both
    unchanged when `config.plan` is False or missing.
  """
  if not config.get('plan', False):
    return config, data
  fp = planning.fingerprint(
    data, split=config.data.train_split, ignore_index=config.data.get('ignore_index')
  )
  keep = tuple(config.get('plan_keep') or ())
  time_budget = float(config.get('plan_time_budget') or 0) or None
  path = os.path.join(workdir, planning.PLAN_FILE)
  step_time = _stored_step_time(path, fp, time_budget)
  options = dict(
    memory_budget=config.get('plan_memory_budget') or '2GiB',
    fixed=planning.fixed_fields(config, keep),
    features=config.model.features,
    num_devices=jax.device_count(),
    time_budget=time_budget,
  )
  p = planning.plan(fp, step_time=step_time, **options)
  planned = planning.apply(config, p)
  config_checks.validate_config(
    planned, num_devices=jax.device_count(), process_count=jax.process_count()
  )
  data = _reopen(planned, data)
  if time_budget and step_time is None and 'num_train_steps' not in keep:
    step_time = measure_step_time(planned, data)
    if jax.process_count() > 1:  # Every process must plan the same number of steps.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      step_time = float(multihost_utils.broadcast_one_to_all(np.float32(step_time)))
    p = planning.plan(fp, step_time=step_time, **options)
    planned = planning.apply(config, p)
  if jax.process_index() == 0:
    planning.write_plan(path, p, fp)
  logging.info(
    'The plan (unet_jax/planning/rules.py; --config.plan=False for the fixed'
    ' settings), written to %s:\n%s',
    path,
    planning.format_table(p),
  )
  return planned, data
