"""Setting up a run: checks, the data, the model, the runner and the restored state.

    run = setup.prepare(config, workdir)    # everything the loop needs, checked

Nothing is written before every check has passed, and a resumed run's recorded
config is compared with the one resuming (`config_checks.check_resume`). A new
run may take another run's plan (`config.plan_from`, `reuse_plan`) and start
from its parameters (`config.init_from`, unet_jax/train/finetune.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from unet_jax import checkpointing
from unet_jax import config as config_lib
from unet_jax import distributed
from unet_jax import evaluation as evaluators
from unet_jax import losses
from unet_jax import planning
from unet_jax import reporting
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import sources
from unet_jax.models import factory
from unet_jax.train import config_checks
from unet_jax.train import finetune
from unet_jax.train import runner as runner_lib
from unet_jax.train import steps as train_steps


@dataclasses.dataclass
class Run:
  """Everything a run needs, built and checked before the first step.

  `config` is the run's config after planning (and with the data's classes);
  `options` its run-level fields and sections, read once.
  """

  config: ml_collections.ConfigDict
  options: config_lib.RunOptions
  data: input_pipeline.Dataset
  runner: runner_lib.Runner
  state: Any
  start_step: int
  manager: Any
  record: dict[str, Any]
  evaluators: list[evaluators.Scheduled]
  writer: reporting.MetricWriter


def check_workdir(workdir: str) -> None:
  """The workdir is a folder (created if missing) that this process can write."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir!r} is a file, not a folder.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir {workdir!r} cannot be created: {e.strerror}.') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir {workdir!r} is not writable.')


def with_data_classes(config, info) -> ml_collections.ConfigDict:
  if config.model.num_classes:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.num_classes = info.num_classes
  logging.info('model.num_classes = %d, from the data.', info.num_classes)
  return config


def _restore(manager, state, record: dict[str, Any], workdir: str):
  """The newest intact checkpoint, after checking it was written with a compatible
  config. Damaged newer steps (`checkpointing.newest_intact` names each) are then
  set aside as `<step>.damaged`, so the resumed run writes those steps again."""
  step, damaged = checkpointing.newest_intact(manager)
  if step is None:
    if damaged:
      logging.warning('No intact checkpoint in %s: training starts from step 0.', workdir)
      checkpointing.set_aside(manager, damaged)
    return state, 0
  where = checkpointing.step_dir(manager, step)
  saved = checkpointing.read_record(manager, step)
  if saved is None:
    logging.warning(
      '%s records no config (written by an older unet_jax); resuming without checking it.',
      where,
    )
  else:
    for change in config_checks.check_resume(saved, record, where=where):
      logging.info('Changed on resume: %s', change)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  try:
    state = checkpointing.restore(manager, abstract, step=step)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Tensorstore raises a bare Exception for an unreadable file.
    verified = checkpointing.verify(where)
    if verified and not isinstance(e, (ValueError, KeyError, TypeError)):
      raise
    cause = (
      'its state does not fit this config'
      if verified
      else f'it has no {checkpointing.MANIFEST} to check its files against, so it is'
      ' damaged or does not fit this config'
    )
    raise ValueError(
      f'Cannot restore {where}: {cause} ({type(e).__name__}: {str(e)[:300]}).'
      ' Use a new --workdir'
      + ('.' if verified else f', or move {where} away to resume from an earlier step.')
    ) from None
  if damaged:
    checkpointing.set_aside(manager, damaged)
  logging.info('Resumed from %s at step %d.', where, int(state.step))
  return state, int(state.step)


def _init_from(state, run: config_lib.RunOptions, *, start_step: int, tx, model_config):
  """A new run's state from `config.init_from` (unet_jax/train/finetune.py); a
  resumed run keeps its own."""
  if not run.init_from:
    return state
  if start_step:
    logging.info(
      'config.init_from=%r is not used: the run resumes from its own checkpoint (step %d).',
      run.init_from,
      start_step,
    )
    return state
  return finetune.initialise(state, run.init_from, tx=tx, model_config=model_config)


def create_runner(model_config, run: config_lib.RunOptions, tx) -> runner_lib.Runner:
  axis = runner_lib.AXIS if run.parallelism == 'pmap' else None
  model = factory.create_model(model_config, kernels=run.kernels, bn_axis_name=axis)
  loss_fn = functools.partial(
    losses.get_loss(run.loss.name),
    ignore_index=input_pipeline.IGNORE_LABEL,
    **run.loss.kwargs,
  )
  step = functools.partial(
    train_steps.train_step,
    model=model,
    tx=tx,
    loss_fn=loss_fn,
    learning_rate_fn=train_steps.create_learning_rate_fn(run),
    aug_config=run.augment,
    seed=run.seed,
    axis_name=axis,
  )
  return runner_lib.Runner(
    run.parallelism,
    train_step=step,
    predict_step=functools.partial(train_steps.predict_step, model=model),
    logits_step=functools.partial(train_steps.logits_step, model=model),
  )


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
  config = with_data_classes(config, data.info)
  run = config_lib.RunOptions.from_config(config)
  tx = train_steps.create_optimizer(run)
  runner = create_runner(config.model, run, tx)
  input_shape = (1, *data.info.spatial_shape, data.info.num_channels)
  state = train_steps.create_train_state(
    jax.random.key(run.seed),
    factory.create_model(config.model, kernels=run.kernels),
    tx,
    input_shape,
  )
  state = runner.put_state(state)
  batches = data.train_iterator(0, batch_size=run.batch_size, seed=run.seed)

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
  """The plan step at the start of training (`prepare`).

  With `config.plan` set: fingerprints `data` (cached), plans with
  `config.plan_memory_budget` and `config.plan_time_budget` (measuring the step
  time of the planned model when a time budget is given; a resumed run reuses
  the time its plan.json recorded), keeps the fields `config.plan_keep` names
  (launch.py adds every field set on the command line), writes
  `workdir/plan.json` (process 0) and logs the table.

  Returns:
    (config, data): the planned config, and the data set opened for it; both
    unchanged when `config.plan` is False or missing, or `config.plan_from` is
    set (`reuse_plan` applied that plan before the data was opened).
  """
  plan_options = config_lib.PlanOptions.from_config(config)
  if not plan_options.plan or plan_options.plan_from:
    return config, data
  data_options = config_lib.DataOptions.from_config(config.data)
  fp = planning.fingerprint(  # Every labelled case of an nnU-Net data set, as nnU-Net.
    data,
    split=data.source.labelled_splits or data_options.train_split,
    ignore_index=data_options.ignore_index,
  )
  keep = plan_options.plan_keep
  time_budget = plan_options.plan_time_budget or None
  path = os.path.join(workdir, planning.PLAN_FILE)
  step_time = _stored_step_time(path, fp, time_budget)
  options = dict(
    memory_budget=plan_options.plan_memory_budget,
    fixed=planning.fixed_fields(config, keep),
    features=config.model.features,
    num_devices=jax.device_count(),
    time_budget=time_budget,
    network={k: config.model.get(k) for k in planning.NETWORK_FIELDS},
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


def _read_plan_from(source: str) -> tuple[planning.Plan, str]:
  """The plan `config.plan_from` names (a run folder, or a plan.json), and its path."""
  path = source if os.path.isfile(source) else os.path.join(source, planning.PLAN_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'config.plan_from={source!r}: there is no {path} (plan_from takes the folder'
      ' of a planned run, which holds a plan.json, or the file itself).'
    )
  try:
    return planning.read_plan(path), path
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f'config.plan_from={source!r}: {path} cannot be read as a plan'
      f' ({type(e).__name__}: {str(e)[:300]}).'
    ) from None


def reuse_plan(config: ml_collections.ConfigDict):
  """Another run's plan (`config.plan_from`), applied instead of planning.

  Reads its plan.json (no fingerprint, no step timing), keeps the fields
  `config.plan_keep` names (launch.py adds every field set on the command
  line) and checks the result. Nothing is written: `_write_reused_plan` does,
  once the data is open.

  Returns:
    (config, plan): the config with the other run's choices, and the plan
    (`planning.reused`: its inputs name the file as 'plan_from').

  Raises:
    FileNotFoundError, ValueError: naming the file, when it is missing or is
      not a plan.
  """
  options = config_lib.PlanOptions.from_config(config)
  p, path = _read_plan_from(options.plan_from)
  if options.plan_time_budget:
    logging.info('config.plan_time_budget is not used: the plan comes from %s.', path)
  fixed = planning.fixed_fields(config, options.plan_keep)
  p = planning.reused(p, fixed=fixed, source=os.path.abspath(path))
  planned = planning.apply(config, p)
  config_checks.validate_config(
    planned, num_devices=jax.device_count(), process_count=jax.process_count()
  )
  return planned, p


def _write_reused_plan(config, p: planning.Plan, info, workdir: str):
  """Drops the other run's class weights when this data has another number of
  classes, then writes `workdir/plan.json` (process 0) and logs the table.

  Returns:
    The config.
  """
  classes = config.model.num_classes or info.num_classes
  weights = p.values().get('loss.kwargs.class_weights')
  by_field = {c.field: c for c in p.choices}
  if weights is not None and len(weights) != classes:
    if not by_field['loss.kwargs.class_weights'].overridden:
      logging.info(
        "Leaving out the reused plan's loss.kwargs.class_weights %s: they weigh %d"
        ' classes, and this data has %d.',
        weights,
        len(weights),
        classes,
      )
      p = planning.Plan(
        [c for c in p.choices if c.field != 'loss.kwargs.class_weights'], p.inputs
      )
      config = ml_collections.ConfigDict(config.to_dict())
      del config.loss.kwargs['class_weights']
  path = os.path.join(workdir, planning.PLAN_FILE)
  if jax.process_index() == 0:
    planning.write_plan(path, p)
  logging.info(
    'The plan of %s (config.plan_from: not planned from this data; the command'
    ' line still wins), written to %s:\n%s',
    p.inputs['plan_from'],
    path,
    planning.format_table(p),
  )
  return config


def _open_and_plan(config, run: config_lib.RunOptions, workdir: str):
  """The data set, opened for the model; then the plan (a no-op unless config.plan),
  or, with config.plan_from, another run's plan, applied before the data is opened.

  Returns the (planned) config, its options and the data.
  """
  reused = None
  if config_lib.PlanOptions.from_config(config).plan_from:
    config, reused = reuse_plan(config)
    run = config_lib.RunOptions.from_config(config)
  ndim = sources.config_ndim(run.data)
  data = input_pipeline.open(
    run.data, divisor=factory.input_divisor_of(config.model, ndim=ndim)
  )
  if reused is None:
    planned, data = plan_run(config, data, workdir)  # No-op unless config.plan.
  else:
    planned = _write_reused_plan(config, reused, data.info, workdir)
  if planned is not config or reused is not None:
    run = config_lib.RunOptions.from_config(planned)  # The plan's choices, read once.
  planned = with_data_classes(planned, data.info)
  config_checks.validate_against_data(planned, data.info)
  return planned, run, data


def _evals_with_data(run: config_lib.RunOptions, data) -> dict[str, Any]:
  """`config.evals`, less those of a split that `config.data.fold='all'` left out.

  With fold 'all' every case trains and there is no validation split: its
  evaluators do not run, no checkpoint records `best_metric`, and the best
  checkpoint is the latest (`checkpointing.best_step` finds none). Under
  any other fold a missing split stays an error (the evaluator names it).
  """
  if run.data.fold != 'all':
    return run.evals
  split_of = lambda options: options.split or run.data.eval_split
  kept = {n: o for n, o in run.evals.items() if data.source.has_split(split_of(o))}
  dropped = sorted(set(run.evals) - set(kept))
  if dropped:
    logging.info(
      "config.data.fold='all': every case trains and there is no validation split"
      ' (%s); evaluator(s) %s will not run, and the best checkpoint is the latest.',
      ', '.join(sorted({split_of(run.evals[n]) for n in dropped})),
      dropped,
    )
  return kept


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks, opens the data, builds and restores the state; writes nothing on error."""
  config_checks.check_same_on_all_processes(config, workdir)  # First: it is collective.
  check_workdir(workdir)
  run = config_checks.validate_config(
    config, num_devices=jax.device_count(), process_count=jax.process_count()
  )
  config, run, data = _open_and_plan(config, run, workdir)
  ndim = len(data.info.spatial_shape)
  divisor = factory.input_divisor_of(config.model, ndim=ndim)  # Of the planned model.
  tx = train_steps.create_optimizer(run)
  input_shape = (1, *data.info.spatial_shape, data.info.num_channels)
  state = train_steps.create_train_state(
    jax.random.key(run.seed),
    factory.create_model(config.model, kernels=run.kernels),
    tx,
    input_shape,
  )
  manager = checkpointing.create_manager(
    os.path.join(workdir, 'checkpoints'),
    keep=run.keep_checkpoints,
    best_metric=run.best_metric,
    best_mode=run.best_mode,
  )
  record = config_checks.state_record(config, data.info)
  state, start_step = _restore(manager, state, record, workdir)
  state = _init_from(state, run, start_step=start_step, tx=tx, model_config=config.model)
  if distributed.is_main_process():
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  runner = create_runner(config.model, run, tx)
  scheduled = evaluators.from_config(
    _evals_with_data(run, data),
    data=data,
    predict=runner.predict,
    num_classes=max(data.info.num_classes, 2),
    workdir=workdir,
    default_split=run.data.eval_split,
    default_batch_size=run.eval_batch_size,
    logits=runner.logits,
    divisor=divisor,
  )
  return Run(
    config=config,
    options=run,
    data=data,
    runner=runner,
    state=runner.put_state(state),
    start_step=start_step,
    manager=manager,
    record=record,
    evaluators=scheduled,
    writer=reporting.MetricWriter(workdir, start_step=start_step),
  )
