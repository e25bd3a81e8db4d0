"""Training: the state, the steps, and the loop that ties the other modules together.

    create_model -> create_optimizer -> create_train_state
    train_step / predict_step (pure; run by runner.Runner under jit or pmap)
    train_and_evaluate: the loop

Where the rest lives: config checks in `config_checks`, devices in `runner`,
data in `input_pipeline`, evaluation in `evaluators`, metric files and the
progress line in `reporting`, checkpoints in `checkpointing`.

Exact resume: the batch at step s is a pure function of (seed, s), the augmentation
and dropout keys are `fold_in(key(seed), s)`, and the checkpoint holds the step, the
parameters, the BatchNorm statistics and the optimiser state. A run that is killed and
started again with the same command therefore ends with the same parameters as one
that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unet_jax import checkpointing
from unet_jax import distributed as runner_lib
from unet_jax import evaluation as evaluators
from unet_jax import losses
from unet_jax import models
from unet_jax import planning
from unet_jax import reporting
from unet_jax.data import augment as augment_lib
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import sources
from unet_jax.models import factory
from unet_jax.train import config_checks


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class Interrupted(Exception):
  """Training stopped on request (SIGINT or SIGTERM) after saving a checkpoint."""


# ------------------------------------------------------------------ construction


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup, then cosine or polynomial (power 0.9, nnU-Net's) decay to 0."""
  opt = config.optimizer
  warmup = min(opt.warmup_steps, config.num_train_steps)
  decay_steps = max(config.num_train_steps - warmup, 1)
  if opt.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(opt.learning_rate, decay_steps)
  elif opt.schedule == 'poly':
    decay = optax.polynomial_schedule(
      opt.learning_rate, 0.0, power=0.9, transition_steps=decay_steps
    )
  else:
    decay = optax.constant_schedule(opt.learning_rate)
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(0.0, opt.learning_rate, warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  lr = create_learning_rate_fn(config)
  if opt.name == 'adam':
    tx = optax.adam(lr)
  elif opt.name == 'adamw':
    tx = optax.adamw(lr, weight_decay=opt.weight_decay)
  else:
    tx = optax.sgd(lr, momentum=opt.momentum, nesterov=True)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def create_train_state(
  key: jax.Array,
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, ...],
) -> TrainState:
  variables = model.init({'params': key}, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
  )


# ------------------------------------------------------------------ steps


def _augment(
  key: jax.Array, batch: dict[str, jax.Array], aug_config, first_index: jax.Array | int = 0
) -> dict[str, jax.Array]:
  """Per-example keys from the example's global index, so the transform of an example
  does not depend on how the batch is split across devices."""
  n = batch['image'].shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(n))

  def one(k, image, label):
    image, label = augment_lib.augment(k, image[None], label[None], config=aug_config)
    return image[0], label[0]

  image, label = jax.vmap(one)(keys, batch['image'], batch['label'])
  return dict(batch, image=image, label=label)


def deep_supervision_loss(
  loss_fn: Callable[..., jax.Array],
  outputs,
  labels: jax.Array,
  *,
  strides: tuple[tuple[int, ...], ...],
) -> jax.Array:
  """The loss of a model's main and auxiliary outputs, weighted as nnU-Net does.

  ::

    L = sum_i w_i L(logits_i, labels_i),   w_i = 2^-i / sum_j 2^-j

  where i = 0 is the full-resolution output and i >= 1 the auxiliary heads, each
  compared with the labels subsampled to its resolution (nearest neighbour: the
  pixel nearest the centre of each block, so ignored pixels stay ignored).

  Args:
    loss_fn: (logits, labels) -> scalar.
    outputs: logits [N, *spatial, C], or (logits, (aux_1, aux_2, ...)) from a
      UNet with `deep_supervision`.
    labels: [N, *spatial] integer classes.
    strides: for each auxiliary output, its downsampling factor per axis.

  Returns:
    A scalar.
  """
  if not isinstance(outputs, tuple):
    return loss_fn(outputs, labels)
  logits, aux = outputs
  terms = [loss_fn(logits, labels)]
  for head, stride in zip(aux, strides):
    window = (slice(None),) + tuple(slice(s // 2, None, s) for s in stride)
    terms.append(loss_fn(head, labels[window]))
  weights = jnp.asarray([0.5**i for i in range(len(terms))])
  return jnp.sum(weights / weights.sum() * jnp.stack(terms))


def supervision_strides(model: models.UNet, ndim: int) -> tuple[tuple[int, ...], ...]:
  """The downsampling factor per axis of each auxiliary head of `model`."""
  _, pools = models.level_shapes(ndim=ndim, depth=model.depth, pool_sizes=model.pool_sizes)
  strides, total = [], (1,) * ndim
  for level in range(model.deep_supervision):
    total = tuple(t * p for t, p in zip(total, pools[level]))
    strides.append(total)
  return tuple(strides)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  loss_fn: Callable[..., jax.Array],
  learning_rate_fn: optax.Schedule,
  aug_config: ml_collections.ConfigDict,
  seed: int,
  axis_name: str | None = None,
) -> tuple[TrainState, dict[str, Any]]:
  """One optimisation step. Pure: (state, batch) -> (state, metrics).

  With `axis_name` (pmap) the batch is this device's shard, gradients are averaged
  over the axis and BatchNorm averages its statistics over it (the model is built with
  `bn_axis_name`). Without it (jit), the batch is the global, sharded batch.
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  aug_key, dropout_key = jax.random.split(key)
  first = 0
  if axis_name is not None:
    first = jax.lax.axis_index(axis_name) * batch['image'].shape[0]
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
  batch = _augment(aug_key, batch, aug_config, first)
  strides = supervision_strides(model, batch['label'].ndim - 1)

  def compute_loss(params):
    variables = {'params': params}
    mutable = []
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      mutable = ['batch_stats']
    outputs, new_vars = model.apply(
      variables, batch['image'], train=True, mutable=mutable, rngs={'dropout': dropout_key}
    )
    loss = deep_supervision_loss(loss_fn, outputs, batch['label'], strides=strides)
    return loss, new_vars

  (loss, new_vars), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=new_vars.get('batch_stats', state.batch_stats),
    opt_state=opt_state,
  )
  return new_state, {
    'loss': loss,
    'learning_rate': learning_rate_fn(state.step),
    'grad_norm': optax.tree.norm(grads),
  }


def logits_step(state: TrainState, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Float32 logits [N, *spatial, K] of the main output, in inference mode."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  outputs = model.apply(variables, images, train=False)
  return outputs[0] if isinstance(outputs, tuple) else outputs


def to_classes(logits: jax.Array) -> jax.Array:
  """Integer class maps [N, *spatial] from logits. One logit: sigmoid > 0.5."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def predict_step(state: TrainState, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Integer class predictions [N, *spatial]."""
  return to_classes(logits_step(state, images, model=model))


# ------------------------------------------------------------------ setting up a run


@dataclasses.dataclass
class _Run:
  """Everything a run needs, built and checked before the first step."""

  config: ml_collections.ConfigDict
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


def _with_data_classes(config, info) -> ml_collections.ConfigDict:
  if config.model.num_classes:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.num_classes = info.num_classes
  logging.info('model.num_classes = %d, from the data.', info.num_classes)
  return config


def _restore(manager, state, record: dict[str, Any], workdir: str):
  """The latest checkpoint, after checking it was written with a compatible config."""
  step = manager.latest_step()
  if step is None:
    return state, 0
  where = os.path.join(workdir, 'checkpoints', str(step))
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
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f'Cannot restore {where}: its state does not fit this config'
      f' ({type(e).__name__}: {str(e)[:300]}). Use a new --workdir.'
    ) from None
  logging.info('Resumed from %s at step %d.', where, int(state.step))
  return state, int(state.step)


def _create_runner(config, tx) -> runner_lib.Runner:
  axis = runner_lib.AXIS if config.parallelism == 'pmap' else None
  model = factory.create_model(config.model, kernels=config.kernels, bn_axis_name=axis)
  loss_fn = functools.partial(
    losses.get_loss(config.loss.name),
    ignore_index=input_pipeline.IGNORE_LABEL,
    **config.loss.kwargs.to_dict(),
  )
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    loss_fn=loss_fn,
    learning_rate_fn=create_learning_rate_fn(config),
    aug_config=config.augment,
    seed=config.seed,
    axis_name=axis,
  )
  return runner_lib.Runner(
    config.parallelism,
    train_step=step,
    predict_step=functools.partial(predict_step, model=model),
    logits_step=functools.partial(logits_step, model=model),
  )


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Checks, opens the data, builds and restores the state; writes nothing on error."""
  config_checks.check_same_on_all_processes(config, workdir)  # First: it is collective.
  check_workdir(workdir)
  config_checks.validate_config(
    config, num_devices=jax.device_count(), process_count=jax.process_count()
  )
  ndim = sources.config_ndim(config.data)
  data = input_pipeline.open(
    config.data, divisor=factory.input_divisor_of(config.model, ndim=ndim)
  )
  config, data = planning.plan_run(config, data, workdir)  # No-op unless config.plan.
  divisor = factory.input_divisor_of(config.model, ndim=ndim)  # Of the planned model.
  config = _with_data_classes(config, data.info)
  config_checks.validate_against_data(config, data.info)
  tx = create_optimizer(config)
  input_shape = (1, *data.info.spatial_shape, data.info.num_channels)
  state = create_train_state(
    jax.random.key(config.seed),
    factory.create_model(config.model, kernels=config.kernels),
    tx,
    input_shape,
  )
  manager = checkpointing.create_manager(
    os.path.join(workdir, 'checkpoints'),
    keep=config.keep_checkpoints,
    best_metric=config.best_metric,
    best_mode=config.best_mode,
  )
  record = config_checks.state_record(config, data.info)
  state, start_step = _restore(manager, state, record, workdir)
  if runner_lib.is_main_process():
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  num_metric_classes = max(data.info.num_classes, 2)
  runner = _create_runner(config, tx)
  scheduled = evaluators.from_config(
    config.evals,
    data=data,
    predict=runner.predict,
    num_classes=num_metric_classes,
    workdir=workdir,
    default_split=config.data.eval_split,
    default_batch_size=config.eval_batch_size,
    logits=runner.logits,
    divisor=divisor,
  )
  return _Run(
    config=config,
    data=data,
    runner=runner,
    state=runner.put_state(state),
    start_step=start_step,
    manager=manager,
    record=record,
    evaluators=scheduled,
    writer=reporting.MetricWriter(workdir, start_step=start_step),
  )


# ------------------------------------------------------------------ the loop


def _check_finite(run: _Run, state, pending: list, *, step: int, state_too: bool) -> None:
  """Raises FloatingPointError at the first non-finite loss of `pending` (step, loss)
  pairs, or, with `state_too`, if the state after `step` is not finite."""
  last = run.manager.latest_step()
  kept = (
    f'the last good checkpoint is step {last}'
    if last is not None
    else 'no checkpoint was written'
  )
  advice = (
    'Lower the learning rate, enable gradient clipping'
    ' (config.optimizer.grad_clip_norm) or check the data.'
  )
  for step, loss in pending:
    if not math.isfinite(float(loss)):
      raise FloatingPointError(
        f'Loss is {float(loss)} at step {step}. Training stopped; {kept}. {advice}'
      )
  if state_too and not run.runner.is_finite(state):
    raise FloatingPointError(
      f'The parameters or optimizer state are not finite after step {step}'
      f' (the loss was still finite). Training stopped and nothing was saved; {kept}.'
      f' {advice}'
    )
  pending.clear()


def _evaluate(run: _Run, state, scheduled, step: int) -> dict[str, Any]:
  """Runs one evaluator; writes and logs its metrics, prefixed with its name."""
  result = scheduled.evaluator.run(state)
  run.writer.write(step, {f'{scheduled.name}_{k}': v for k, v in result.items()})
  shown = '  '.join(f'{k} {v:.4f}' for k, v in result.items() if isinstance(v, float))
  logging.info('eval %s at step %d: %s', scheduled.name, step, shown)
  return result


def _save(run: _Run, state, step: int, results: dict[str, dict]) -> None:
  name = config_checks.best_evaluator(run.config)
  value = results.get(name, {}).get(run.config.best_metric[len(name) + 1 :])
  metrics = {run.config.best_metric: value} if value is not None else None
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
    config: the run's config (see configs/default.py).
    workdir: the run's folder.
    stop_requested: polled after every step; when it returns True, the run saves
      a checkpoint and raises `Interrupted` (launch.py sets it on SIGINT/SIGTERM).
      With several processes, the flags of all are combined after every step
      (`runner.agreed_stop`), so all stop after the same step.

  Returns:
    The last metrics of each evaluator, by evaluator name.
  """
  run = _prepare(config, workdir)
  if stop_requested is not None:
    stop_requested = runner_lib.agreed_stop(stop_requested)
  config, state, total = run.config, run.state, run.config.num_train_steps
  logging.info(
    'Training %s for %d steps from step %d on %d device(s) (%s), global'
    ' batch %d, input %s.',
    config.data.name,
    total,
    run.start_step,
    jax.device_count(),
    config.parallelism,
    config.batch_size,
    run.data.info.spatial_shape,
  )
  progress = reporting.Progress(
    total_steps=total,
    start_step=run.start_step,
    every_steps=config.log_every_steps,
    batch_size=config.batch_size,
    writer=run.writer,
  )
  batches = run.data.train_iterator(
    run.start_step, batch_size=config.batch_size, seed=config.seed
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
    if due or stop or step % config.checkpoint_every_steps == 0 or step == total:
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
