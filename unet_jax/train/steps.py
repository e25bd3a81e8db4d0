"""The train state and the pure steps: optimiser, schedule, train, logits and predict.

    tx = create_optimizer(run)               # run: config_lib.RunOptions (or the config)
    state = create_train_state(key, model, tx, input_shape)
    state, metrics = train_step(state, batch, model=..., tx=..., loss_fn=..., ...)
    classes = predict_step(state, images, model=model)

Each step is pure; `unet_jax.train.runner.Runner` runs it under jit or pmap.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from unet_jax import config as config_lib
from unet_jax import losses
from unet_jax import models
from unet_jax.data import augment as augment_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def _optimizer_options(run, num_train_steps) -> tuple[config_lib.OptimizerOptions, int]:
  """(optimizer options, steps) from RunOptions, a whole config, or OptimizerOptions
  with `num_train_steps`."""
  if isinstance(run, config_lib.OptimizerOptions):
    if num_train_steps is None:
      raise ValueError('num_train_steps is needed with OptimizerOptions.')
    return run, int(num_train_steps)
  run = config_lib.RunOptions.from_config(run)
  return run.optimizer, run.num_train_steps if num_train_steps is None else num_train_steps


def create_learning_rate_fn(run, num_train_steps: int | None = None) -> optax.Schedule:
  """Linear warmup, then cosine or polynomial (power 0.9, nnU-Net's) decay to 0.

  Args:
    run: `config_lib.RunOptions` (or the config), or `config_lib.OptimizerOptions`
      with `num_train_steps`.
    num_train_steps: the run's length; default: the run's.
  """
  opt, steps = _optimizer_options(run, num_train_steps)
  warmup = min(opt.warmup_steps, steps)
  decay_steps = max(steps - warmup, 1)
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


def create_optimizer(
  run, num_train_steps: int | None = None
) -> optax.GradientTransformation:
  """The optimiser the options name, with its schedule (see `create_learning_rate_fn`)."""
  opt, steps = _optimizer_options(run, num_train_steps)
  lr = create_learning_rate_fn(opt, steps)
  if opt.name == 'adam':
    tx = optax.adam(lr)
  elif opt.name == 'adamw':
    tx = optax.adamw(lr, weight_decay=opt.weight_decay)
  else:
    tx = optax.sgd(lr, momentum=opt.momentum, nesterov=True)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


# XLA options for compiling `create_train_state` on the CPU.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def create_train_state(
  key: jax.Array,
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, ...],
) -> TrainState:
  """The model's initial variables and the optimizer's state, on the default device.

  One compiled program: run eagerly, Flax's `init` compiles each of its hundreds of
  operations apart. What is left of the program once JAX has pruned the forward pass
  is random numbers for the parameters, which need no optimising, so on the CPU it is
  compiled without the backend's optimisation passes (`INIT_COMPILER_OPTIONS`), which
  take most of the compile time there (benchmarks/RESULTS.md, "Start-up").
  """

  def init(key):
    variables = model.init(
      {'params': key}, jnp.zeros(input_shape, jnp.float32), train=False
    )
    params = variables['params']
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
    )

  options = INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
  return jax.jit(init, compiler_options=options)(key)


def _augment(
  key: jax.Array,
  batch: dict[str, jax.Array],
  options: config_lib.AugmentOptions,
  first_index: jax.Array | int = 0,
) -> dict[str, jax.Array]:
  """Per-example keys from the example's global index, so the transform of an example
  does not depend on how the batch is split across devices."""
  n = batch['image'].shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(n))

  def one(k, image, label):
    image, label = augment_lib.augment(k, image[None], label[None], config=options)
    return image[0], label[0]

  image, label = jax.vmap(one)(keys, batch['image'], batch['label'])
  return dict(batch, image=image, label=label)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  loss_fn: Callable[..., jax.Array],
  learning_rate_fn: optax.Schedule,
  aug_config: config_lib.AugmentOptions,
  seed: int,
  axis_name: str | None = None,
) -> tuple[TrainState, dict[str, Any]]:
  """One optimisation step. Pure: (state, batch) -> (state, metrics).

  With `axis_name` (pmap) the batch is this device's shard, gradients are averaged
  over the axis and BatchNorm averages its statistics over it (the model is built with
  `bn_axis_name`). Without it (jit), the batch is the global, sharded batch.
  `aug_config` (`config_lib.AugmentOptions`, or `config.augment`) is applied to
  each example with a key from (seed, step, its index in the global batch).
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  aug_key, dropout_key = jax.random.split(key)
  first = 0
  if axis_name is not None:
    first = jax.lax.axis_index(axis_name) * batch['image'].shape[0]
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
  batch = _augment(aug_key, batch, aug_config, first)
  _, pools = models.level_shapes(
    ndim=batch['label'].ndim - 1, depth=model.depth, pool_sizes=model.pool_sizes
  )
  strides = losses.supervision_strides(pools, num_heads=model.deep_supervision)

  def compute_loss(params):
    variables = {'params': params}
    mutable = []
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      mutable = ['batch_stats']
    outputs, new_vars = model.apply(
      variables, batch['image'], train=True, mutable=mutable, rngs={'dropout': dropout_key}
    )
    loss = losses.deep_supervision_loss(loss_fn, outputs, batch['label'], strides=strides)
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
