"""Training and evaluation: small top-level functions in the Flax examples' manner.

    create_mesh -> create_model -> create_optimizer -> create_train_state
    train_step / eval_step (pure, jitted, data-parallel) -> train_and_evaluate

Data parallelism: `jax.jit` over a 1-axis device `Mesh` ('data'); the global batch is
split over that axis with `NamedSharding`, the state is replicated and donated. The
same step runs under `jax.pmap` when `config.parallelism == 'pmap'`; gradients and
BatchNorm statistics are then averaged with `pmean` over the 'data' axis.

Exact resume: the batch at step s is a pure function of (seed, s), the augmentation
and dropout keys are `fold_in(key(seed), s)`, and the checkpoint holds the step, the
parameters, the BatchNorm statistics and the optimiser state. A run that is killed and
started again with the same command therefore ends with the same parameters as one
that never stopped.
"""

from __future__ import annotations

import functools
import json
import logging as py_logging
import math
import os
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from unet_jax import augment as augment_lib
from unet_jax import checkpointing
from unet_jax import input_pipeline
from unet_jax import losses
from unet_jax import metrics as metrics_lib
from unet_jax import models
from unet_jax import visualize

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'poly', 'constant')
PARALLELISM = ('jit', 'pmap')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Losses whose activation is a sigmoid: they accept one logit for a binary task.
SIGMOID_LOSSES = ('dice_bce', 'bce')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ------------------------------------------------------------------ construction


def create_mesh(devices=None) -> Mesh:
  """A 1-axis mesh named 'data' over all (global) devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ('data',))


def create_model(model_config: ml_collections.ConfigDict, *,
                 bn_axis_name: str | None = None) -> models.UNet:
  return models.UNet(
      num_classes=model_config.num_classes,
      features=model_config.features,
      depth=model_config.depth,
      upsample=model_config.upsample,
      norm=model_config.norm,
      kernel_sizes=_tuples(model_config.get('kernel_sizes', 3)),
      pool_sizes=_tuples(model_config.get('pool_sizes', 2)),
      dropout=model_config.dropout,
      dtype=DTYPES[model_config.dtype],
      remat=model_config.remat,
      bn_axis_name=bn_axis_name,
  )


def _tuples(value):
  """Config lists (which ml-collections may hand over as lists) to nested tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup, then cosine or polynomial (power 0.9, nnU-Net's) decay to 0."""
  opt = config.optimizer
  warmup = min(opt.warmup_steps, config.num_train_steps)
  decay_steps = max(config.num_train_steps - warmup, 1)
  if opt.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(opt.learning_rate, decay_steps)
  elif opt.schedule == 'poly':
    decay = optax.polynomial_schedule(opt.learning_rate, 0.0, power=0.9,
                                      transition_steps=decay_steps)
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


def create_train_state(key: jax.Array, model: nn.Module,
                       tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...]) -> TrainState:
  variables = model.init({'params': key}, jnp.zeros(input_shape, jnp.float32),
                         train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params))


# ------------------------------------------------------------------ validation


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    process_count: int) -> None:
  """Raises ValueError for a config that cannot run, before anything compiles."""
  def choice(field, value, valid):
    if value not in valid:
      raise ValueError(f'config.{field}={value!r} is not one of {sorted(valid)}.')

  if config.loss.name not in losses.LOSSES:
    losses.get_loss(config.loss.name)  # Raises, listing the valid names.
  choice('optimizer.name', config.optimizer.name, OPTIMIZERS)
  choice('optimizer.schedule', config.optimizer.schedule, SCHEDULES)
  choice('parallelism', config.parallelism, PARALLELISM)
  choice('model.upsample', config.model.upsample, models.UPSAMPLE_MODES)
  choice('model.norm', config.model.norm, models.NORMS)
  choice('model.dtype', config.model.dtype, tuple(DTYPES))
  if config.model.num_classes < 0:
    raise ValueError('config.model.num_classes must be positive (or 0: from the'
                     f' data), got {config.model.num_classes}.')
  for field in ('batch_size', 'eval_batch_size', 'num_train_steps', 'log_every_steps',
                'eval_every_steps', 'checkpoint_every_steps'):
    if config[field] < 1:
      raise ValueError(f'config.{field} must be positive, got {config[field]}.')
  if config.batch_size % num_devices:
    raise ValueError(
        f'config.batch_size={config.batch_size} (the global batch) is not divisible'
        f' by the {num_devices} devices; use a multiple of {num_devices}.')
  if config.eval_batch_size % num_devices:
    raise ValueError(
        f'config.eval_batch_size={config.eval_batch_size} is not divisible by the'
        f' {num_devices} devices; use a multiple of {num_devices}.')
  if config.batch_size % process_count:
    raise ValueError(
        f'config.batch_size={config.batch_size} is not divisible by the'
        f' {process_count} processes.')
  if config.optimizer.learning_rate <= 0:
    raise ValueError('config.optimizer.learning_rate must be positive.')


def validate_against_data(config: ml_collections.ConfigDict,
                          info: input_pipeline.DatasetInfo) -> None:
  """`num_classes` and the input size must fit the data."""
  c = config.model.num_classes
  sigmoid = (config.loss.name in SIGMOID_LOSSES
             or config.loss.kwargs.get('activation') == 'sigmoid')
  binary_sigmoid = c == 1 and info.num_classes == 2 and sigmoid
  if c != info.num_classes and not binary_sigmoid:
    hint = (" (one logit works only with a sigmoid loss, 'dice_bce', 'bce' or"
            " loss.kwargs.activation='sigmoid', on a 2-class data set)"
            if c == 1 else '')
    raise ValueError(
        f'config.model.num_classes={c} does not match the data set'
        f' {config.data.name!r}, which has {info.num_classes} classes{hint}.')
  divisor = models.input_divisor(ndim=len(info.spatial_shape),
                                 depth=config.model.depth,
                                 pool_sizes=_tuples(config.model.get('pool_sizes', 2)))
  try:
    models.check_spatial_shape(info.spatial_shape, divisor)
  except ValueError as e:
    field = 'data.patch_size' if config.data.get('patch_size') else 'the data'
    raise ValueError(f'{field} does not fit the model: {e}') from None


# ------------------------------------------------------------------ steps


def _loss_fn(config: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
  fn = losses.get_loss(config.loss.name)
  return functools.partial(fn, **config.loss.kwargs.to_dict())


def _augment(key: jax.Array, batch: dict[str, jax.Array], aug_config,
             first_index: jax.Array | int = 0) -> dict[str, jax.Array]:
  """Per-example keys from the example's global index, so the transform of an example
  does not depend on how the batch is split across devices."""
  n = batch['image'].shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(n))

  def one(k, image, label):
    image, label = augment_lib.augment(k, image[None], label[None], config=aug_config)
    return image[0], label[0]

  image, label = jax.vmap(one)(keys, batch['image'], batch['label'])
  return dict(batch, image=image, label=label)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: nn.Module, tx: optax.GradientTransformation,
               loss_fn: Callable[..., jax.Array], learning_rate_fn: optax.Schedule,
               aug_config: ml_collections.ConfigDict, seed: int,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, Any]]:
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

  def compute_loss(params):
    variables = {'params': params}
    mutable = []
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      mutable = ['batch_stats']
    logits, new_vars = model.apply(variables, batch['image'], train=True,
                                   mutable=mutable, rngs={'dropout': dropout_key})
    return loss_fn(logits, batch['label']), new_vars

  (loss, new_vars), grads = jax.value_and_grad(compute_loss, has_aux=True)(
      state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=new_vars.get('batch_stats', state.batch_stats),
                            opt_state=opt_state)
  return new_state, {'loss': loss, 'learning_rate': learning_rate_fn(state.step),
                     'grad_norm': optax.tree.norm(grads)}


def predict(model: nn.Module, state: TrainState, images: jax.Array) -> jax.Array:
  """Integer class predictions [N, *spatial]. One logit: sigmoid > 0.5."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  logits = model.apply(variables, images, train=False)
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              num_classes: int, axis_name: str | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """Confusion matrix [C, C] of the batch (padding examples excluded) and predictions."""
  preds = predict(model, state, batch['image'])
  # Padding examples (mask 0) get the label -1, which the confusion matrix drops.
  keep = batch['mask'].reshape((-1,) + (1,) * (preds.ndim - 1)) > 0
  labels = jnp.where(keep, batch['label'], -1)
  cm = metrics_lib.confusion_matrix(preds, labels, num_classes, ignore_index=-1)
  if axis_name is not None:
    cm = jax.lax.psum(cm, axis_name)
  return cm, preds


# ------------------------------------------------------------------ the loop


class _Runner:
  """Places batches and runs the jitted or pmapped steps; hides jit vs pmap."""

  def __init__(self, config, model_fn, tx, mesh, num_metric_classes, lr_fn):
    self.mode = config.parallelism
    self.mesh = mesh
    self.repl = NamedSharding(mesh, P())
    self.data = NamedSharding(mesh, P('data'))
    axis = 'data' if self.mode == 'pmap' else None
    self.model = model_fn(bn_axis_name=axis)
    step = functools.partial(
        train_step, model=self.model, tx=tx, loss_fn=_loss_fn(config),
        learning_rate_fn=lr_fn, aug_config=config.augment, seed=config.seed,
        axis_name=axis)
    ev = functools.partial(eval_step, model=self.model,
                           num_classes=num_metric_classes, axis_name=axis)
    if self.mode == 'pmap':
      self.n_local = jax.local_device_count()
      self._train = jax.pmap(step, axis_name='data', donate_argnums=(0,))
      self._eval = jax.pmap(ev, axis_name='data')
    else:
      self._train = jax.jit(step, in_shardings=(self.repl, self.data),
                            out_shardings=(self.repl, self.repl), donate_argnums=(0,))
      self._eval = jax.jit(ev, in_shardings=(self.repl, self.data),
                           out_shardings=(self.repl, self.data))

  def put_state(self, state):
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: np.stack([np.asarray(x)] * self.n_local),
                          jax.device_get(state))
    return jax.device_put(state, self.repl)

  def get_state(self, state):
    """The state as host numpy arrays (one replica)."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(state))
    return jax.device_get(state)

  def put_batch(self, batch):
    if self.mode == 'pmap':
      return jax.tree.map(
          lambda x: x.reshape((self.n_local, -1) + x.shape[1:]), batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data, x), batch)

  def train(self, state, batch):
    state, m = self._train(state, self.put_batch(batch))
    if self.mode == 'pmap':
      m = jax.tree.map(lambda x: x[0], m)
    return state, m

  def evaluate(self, state, batch):
    cm, preds = self._eval(state, self.put_batch(batch))
    if self.mode == 'pmap':
      cm = cm[0]
      preds = preds.reshape((-1,) + preds.shape[2:])
    else:
      # This process's rows of the global batch, in order: what it fed in.
      shards = sorted(preds.addressable_shards, key=lambda s: s.index[0].start or 0)
      preds = np.concatenate([np.asarray(s.data) for s in shards])
    return np.asarray(cm, np.int64), np.asarray(preds)


def evaluate(runner: _Runner, state, config, info, *, num_metric_classes: int,
             num_samples: int = 4):
  """Full pass over the eval split. Returns (metrics dict, a few sample triplets)."""
  total = np.zeros((num_metric_classes, num_metric_classes), np.int64)
  samples = []
  divisor = _divisor(config)
  for batch in input_pipeline.eval_iterator(
      config.data, batch_size=config.eval_batch_size, divisor=divisor):
    cm, preds = runner.evaluate(state, batch)
    total += cm
    if len(samples) < num_samples and jax.process_index() == 0:
      n_real = int(batch['mask'].sum())
      for i in range(min(n_real, num_samples - len(samples), len(preds))):
        samples.append((batch['image'][i], batch['label'][i], preds[i]))
  return summarize_confusion(total), samples


def summarize_confusion(cm: np.ndarray) -> dict[str, Any]:
  """Dataset-level metrics from a summed confusion matrix."""
  dice = metrics_lib.dice_per_class(cm)
  iou = metrics_lib.iou_per_class(cm)
  out = {
      'pixel_accuracy': float(metrics_lib.pixel_accuracy(cm)),
      'mean_iou': float(metrics_lib.mean_iou(cm)),
      'mean_dice': float(metrics_lib.mean_dice(cm)),
      'dice_per_class': [float(v) for v in dice],
      'iou_per_class': [float(v) for v in iou],
  }
  # The figure researchers quote: foreground Dice (mean over classes 1..C-1).
  fg = np.asarray(dice[1:], np.float64)
  out['dice'] = float(np.nanmean(fg)) if np.any(np.isfinite(fg)) else float('nan')
  return out


def _divisor(config) -> int | tuple[int, ...]:
  """What input sizes must be a multiple of: an int for every axis when the pooling
  is isotropic, else a tuple with one entry per spatial axis."""
  pools = _tuples(config.model.get('pool_sizes', 2))
  if isinstance(pools, int):
    return pools**config.model.depth
  shape = pools if all(isinstance(p, int) for p in pools) else pools[0]
  return models.input_divisor(ndim=len(shape), depth=config.model.depth,
                              pool_sizes=pools)


class _MetricWriter:
  """metrics.jsonl and TensorBoard event files, written by process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
    self._tf = tf
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()
    with self._tb.as_default(step=step):
      for name, value in values.items():
        if isinstance(value, (list, tuple)):
          for i, v in enumerate(value):
            if math.isfinite(v):
              self._tf.summary.scalar(f'{name}/{i}', v)
        elif isinstance(value, (int, float)) and math.isfinite(value):
          self._tf.summary.scalar(name, value)
    self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()


class _LibraryInfoFilter:
  """Drops INFO records from orbax and TFDS internals (every save logs ~20 lines);
  their warnings and errors still show."""
  _NOISY = (os.sep + 'orbax' + os.sep, os.sep + 'tensorflow_datasets' + os.sep)

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def _quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def _check_finite(pending: list[tuple[int, jax.Array]]) -> None:
  """Raises naming the first step whose loss is NaN or Inf."""
  for step, loss in pending:
    value = float(loss)
    if not math.isfinite(value):
      raise FloatingPointError(
          f'Loss is {value} at step {step}. Training stopped; the last checkpoint'
          ' written before this step is intact. Lower the learning rate, enable'
          ' gradient clipping (config.optimizer.grad_clip_norm) or check the data.')
  pending.clear()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; resumes from its latest step.

  Returns the final evaluation metrics.
  """
  _quiet_library_logs()
  validate_config(config, num_devices=jax.device_count(),
                  process_count=jax.process_count())
  mesh = create_mesh()
  info = input_pipeline.get_info(config.data, divisor=_divisor(config))
  if config.model.num_classes == 0:  # From the data set.
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_classes = info.num_classes
    logging.info('model.num_classes = %d, from the data.', info.num_classes)
  validate_against_data(config, info)
  num_metric_classes = max(info.num_classes, 2)
  model_fn = functools.partial(create_model, config.model)

  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  lr_fn = create_learning_rate_fn(config)
  tx = create_optimizer(config)
  runner = _Runner(config, model_fn, tx, mesh, num_metric_classes, lr_fn)
  input_shape = (1, *info.spatial_shape, info.num_channels)
  state = create_train_state(jax.random.key(config.seed), model_fn(), tx, input_shape)

  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'),
                                         keep=config.keep_checkpoints)
  restored = checkpointing.restore_latest(
      manager, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  if restored is not None:
    state = restored
    logging.info('Resumed from %s at step %d.', manager.directory, int(state.step))
  start_step = int(state.step)
  state = runner.put_state(state)

  writer = _MetricWriter(workdir)
  divisor = _divisor(config)
  train_iter = input_pipeline.train_iterator(
      config.data, batch_size=config.batch_size, seed=config.seed, divisor=divisor,
      start_step=start_step)
  total = config.num_train_steps
  logging.info('Training %s for %d steps from step %d on %d device(s) (%s), global '
               'batch %d, input %s.', config.data.name, total, start_step,
               jax.device_count(), config.parallelism, config.batch_size,
               input_shape[1:])

  eval_metrics: dict[str, Any] = {}
  pending: list[tuple[int, jax.Array]] = []
  t_last, step_last, t_start = time.time(), start_step, time.time()
  losses_since_log = []
  input_wait = 0.0  # Seconds blocked on the input pipeline since the last log.
  for step in range(start_step + 1, total + 1):
    t_wait = time.time()
    batch = next(train_iter)
    input_wait += time.time() - t_wait
    state, m = runner.train(state, batch)
    pending.append((step, m['loss']))
    losses_since_log.append(m['loss'])
    is_last = step == total
    do_eval = step % config.eval_every_steps == 0 or is_last
    do_ckpt = do_eval or step % config.checkpoint_every_steps == 0

    if step % config.log_every_steps == 0 or is_last:
      _check_finite(pending)
      now = time.time()
      steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
      loss = float(np.mean([float(x) for x in losses_since_log]))
      losses_since_log.clear()
      eta = (total - step) / max(steps_per_sec, 1e-9)
      # The share of wall time spent waiting for input: near 0 means the pipeline
      # keeps up with the train step.
      wait = input_wait / max(now - t_last, 1e-9)
      writer.write(step, {'train_loss': loss,
                          'learning_rate': float(m['learning_rate']),
                          'grad_norm': float(m['grad_norm']),
                          'steps_per_sec': steps_per_sec,
                          'examples_per_sec': steps_per_sec * config.batch_size,
                          'input_wait_fraction': wait})
      logging.info('step %d/%d  loss %.4f  %.2f steps/s  input wait %.0f%%  ETA %s',
                   step, total, loss, steps_per_sec, 100 * wait, _fmt_time(eta))
      t_last, step_last, input_wait = now, step, 0.0

    if do_eval:
      _check_finite(pending)  # Never evaluate, log or save a diverged state.
      eval_metrics, samples = evaluate(runner, state, config, info,
                                       num_metric_classes=num_metric_classes)
      writer.write(step, {f'eval_{k}': v for k, v in eval_metrics.items()})
      logging.info('eval step %d: dice %.4f  mIoU %.4f  pixel acc %.4f', step,
                   eval_metrics['dice'], eval_metrics['mean_iou'],
                   eval_metrics['pixel_accuracy'])
      if jax.process_index() == 0 and samples:
        visualize.save_sample_grid(
            samples, os.path.join(workdir, 'samples', f'step_{step}.png'),
            title=f'step {step}: dice {eval_metrics["dice"]:.3f}')
      t_last, step_last, input_wait = time.time(), step, 0.0  # Not training time.

    if do_ckpt:
      _check_finite(pending)
      ckpt_metrics = None
      if do_eval and math.isfinite(eval_metrics['dice']):
        ckpt_metrics = {checkpointing.BEST_METRIC: eval_metrics['dice']}
      checkpointing.save(manager, step, runner.get_state(state), metrics=ckpt_metrics)
      t_last, step_last, input_wait = time.time(), step, 0.0

  if start_step >= total:
    eval_metrics, _ = evaluate(runner, state, config, info,
                               num_metric_classes=num_metric_classes)
  writer.close()
  manager.close()
  logging.info('Done in %s.', _fmt_time(time.time() - t_start))
  return eval_metrics


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'
