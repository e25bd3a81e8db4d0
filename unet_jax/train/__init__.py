"""Training: the state, the steps, and the loop that ties the other modules together.

    create_model -> create_optimizer -> create_train_state      (steps.py)
    train_step / predict_step (pure; run by train.runner.Runner under jit or pmap)
    setup.prepare: checks, data, model, runner, restore         (setup.py)
    init_from: another run's parameters, for a new run          (finetune.py)
    train_and_evaluate: the loop                                 (loop.py)
    lock.hold: one training run per workdir (launch.py)          (lock.py)

Where the rest lives: the config's options and defaults in `unet_jax.config`,
registry-dependent config checks in `config_checks`, devices in
`unet_jax.distributed`, data in `unet_jax.data`, evaluation in
`unet_jax.evaluation`, metric files and the progress line in `unet_jax.reporting`,
checkpoints in `unet_jax.checkpointing`.
"""

from unet_jax.models.factory import create_model
from unet_jax.train import config_checks
from unet_jax.train.loop import Interrupted
from unet_jax.train.loop import train_and_evaluate
from unet_jax.train.setup import check_workdir
from unet_jax.train.steps import create_learning_rate_fn
from unet_jax.train.steps import create_optimizer
from unet_jax.train.steps import create_train_state
from unet_jax.train.steps import logits_step
from unet_jax.train.steps import predict_step
from unet_jax.train.steps import to_classes
from unet_jax.train.steps import train_step
from unet_jax.train.steps import TrainState

__all__ = [
  'Interrupted',
  'TrainState',
  'check_workdir',
  'config_checks',
  'create_learning_rate_fn',
  'create_model',
  'create_optimizer',
  'create_train_state',
  'logits_step',
  'predict_step',
  'to_classes',
  'train_and_evaluate',
  'train_step',
]
