"""A trained run as a predictor: its model and variables, restored from the workdir.

    predictor = inference.load('runs/demo', step='best')
    logits = predictor.predict(image)            # [H, W, C] -> float32 [H, W, K]
    classes = predictor.classes(logits)          # [H, W] int

`load` reads the config each checkpoint recorded (or `config.json` for an older
checkpoint), rebuilds the model from it, and restores only the parameters and
BatchNorm statistics with orbax: the optimizer state is not read. The step's files
are checked first (`checkpointing.verify`): 'latest' and 'best' skip a damaged
step with a warning naming it, a damaged step asked for by number is an error.
`predict`
normalises an image as training did (the run's `config.data.normalization`, see
`input_pipeline.normalise`; a z-score per channel for runs that predate it), and
predicts it whole, or by Gaussian-weighted sliding windows when it is larger than
the patch (the run's training patch for 3D; `patch_size` to choose), with optional
flip test-time augmentation. A BatchNorm model predicts with its BatchNorm folded
into the convolutions (`folding.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unet_jax import checkpointing
from unet_jax import config as config_lib
from unet_jax import models
from unet_jax.data import pipeline as input_pipeline
from unet_jax.inference import folding
from unet_jax.inference import sliding_window
from unet_jax.models import factory

STEPS = ('best', 'latest')


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A restored model that predicts images.

  Attributes:
    model: the UNet, rebuilt from the run's config.
    variables: {'params': ..., 'batch_stats': ...}, host arrays.
    config: the config the checkpoint was written with.
    data: its data options (normalisation, patch size).
    step: the checkpoint's step.
    num_channels: input channels the model takes.
    ndim: 2 or 3 spatial axes.
    divisor: what input sizes must be multiples of, per axis.
    patch_size: the default sliding-window patch (the training patch), or None
      to predict images whole.
    train_shape: the spatial shape training fed the model, if recorded.
  """

  model: models.UNet
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  data: config_lib.DataOptions
  step: int
  num_channels: int
  ndim: int
  divisor: tuple[int, ...]
  patch_size: tuple[int, ...] | None
  train_shape: tuple[int, ...] | None = None

  @functools.cached_property
  def apply(self):
    """Jitted logits of a batch: float32 [b, *spatial, C] -> [b, *spatial, K].

    BatchNorm is folded into the convolutions (`folding.for_inference`): the same
    function to float rounding, one pass over each activation fewer.
    """
    model, variables = folding.for_inference(self.model, self.variables)
    variables = jax.device_put(variables)

    @jax.jit
    def apply(images):
      out = model.apply(variables, images, train=False)
      return out[0] if isinstance(out, tuple) else out

    return apply

  def check(self, image: np.ndarray, *, name: str = 'image') -> None:
    """Raises ValueError naming `name` if the model cannot take `image` [*spatial, C]."""
    image = np.asarray(image)
    if image.ndim != self.ndim + 1:
      kind = 'volume [D, H, W, C]' if self.ndim == 3 else 'image [H, W, C]'
      raise ValueError(
        f'{name}: shape {image.shape} is not a {kind}: the model of this'
        f' run is {self.ndim}D.'
      )
    if image.shape[-1] != self.num_channels:
      raise ValueError(
        f'{name}: {image.shape[-1]} channel(s), but the model takes {self.num_channels}.'
      )

  def predict(
    self,
    image: np.ndarray,
    *,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    flip_tta: bool = False,
    output: str = 'logits',
    batch_size: int = 4,
  ) -> np.ndarray:
    """Logits (or probabilities) of one raw image [*spatial, C], at its own size.

    The image is normalised as in training, padded by mirroring where the model
    cannot take its size, and predicted by sliding windows of `patch_size`
    (default: `self.patch_size`; whole when None), cropped back.

    Returns:
      float32 [*spatial, K].
    """
    self.check(image)
    normalise = input_pipeline.normaliser(self.data, self.num_channels)
    image = normalise(np.asarray(image, np.float32))
    patch = patch_size or self.patch_size
    return sliding_window.sliding_window_predict(
      self.apply,
      image,
      patch_size=patch,
      overlap=overlap,
      mode='gaussian',
      batch_size=batch_size,
      flip_tta=flip_tta,
      divisor=self.divisor,
      output=output,
    )

  @staticmethod
  def classes(logits: np.ndarray) -> np.ndarray:
    """Class maps from logits [..., K]: argmax, or logit > 0 for one sigmoid logit."""
    logits = np.asarray(logits)
    if logits.shape[-1] == 1:
      return (logits[..., 0] > 0).astype(np.int32)
    return np.argmax(logits, axis=-1).astype(np.int32)


def _best_intact(manager, run: config_lib.RunOptions, latest: int, damaged) -> int:
  """The best step by the run's `best_metric` whose files are intact; with a
  warning naming both steps when the best is damaged. `latest` (the newest
  intact step) when no intact step recorded the metric."""
  skipped = []
  for step in checkpointing.ranked_steps(
    manager, best_metric=run.best_metric, best_mode=run.best_mode
  ):
    try:
      if step in damaged:
        raise checkpointing.DamagedCheckpoint(damaged[step])
      checkpointing.verify(checkpointing.step_dir(manager, step))
    except checkpointing.DamagedCheckpoint as e:
      skipped.append((step, str(e)))
      continue
    if skipped:
      logging.warning(
        'The best checkpoint by %s, step %d, is damaged (%s): using step %d, the'
        ' best intact one, instead.',
        run.best_metric,
        *skipped[0],
        step,
      )
    return step
  if skipped:
    logging.warning(
      'The best checkpoint by %s, step %d, is damaged (%s), and no intact step'
      ' recorded %s: using step %d, the newest intact one, instead.',
      run.best_metric,
      *skipped[0],
      run.best_metric,
      latest,
    )
  return latest


def _pick_step(manager, step, workdir: str, where: str) -> int:
  """The step `load` restores; its files checked (`checkpointing.verify`)."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'{where} holds no finished checkpoint.')
  if step not in STEPS:
    if isinstance(step, str) and not step.isdigit():
      raise ValueError(f'step={step!r} must be one of {STEPS} or a step number.')
    if int(step) not in steps:
      raise FileNotFoundError(f'{where} has no checkpoint of step {step}; it has {steps}.')
    try:
      checkpointing.verify(checkpointing.step_dir(manager, int(step)))
    except checkpointing.DamagedCheckpoint as e:
      raise checkpointing.DamagedCheckpoint(
        f'Checkpoint step {step} is damaged: {e}. Choose another step of {steps}.'
      ) from None
    return int(step)
  latest, damaged = checkpointing.newest_intact(manager)
  if latest is None:
    raise checkpointing.DamagedCheckpoint(
      f'{where}: every checkpoint is damaged ({"; ".join(damaged.values())}).'
    )
  if step == 'latest':
    return latest
  first, _ = _run_config(manager, latest, workdir)
  return _best_intact(manager, config_lib.RunOptions.from_config(first), latest, damaged)


def _run_config(manager, step: int, workdir: str) -> tuple[dict, dict]:
  """The config a step was written with, and its data shape."""
  record = checkpointing.read_record(manager, step)
  if record is None:  # Written before checkpoints recorded their config.
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise FileNotFoundError(
        f'{workdir}: checkpoint {step} records no config and there'
        ' is no config.json to rebuild the model from.'
      )
    with open(path) as f:
      record = json.load(f)
  record = dict(record)
  data_shape = dict(record.pop('data_shape', None) or {})
  data_shape.update(record.pop('input', None) or {})
  return record, data_shape


def load(workdir: str, *, step: str | int = 'best') -> Predictor:
  """Restores a run's model for prediction.

  Args:
    workdir: the run's folder (what `launch.py --workdir` was given).
    step: 'best' (by the run's `best_metric`; the latest when no step was
      evaluated), 'latest', or a step number. 'best' and 'latest' take the best
      or newest intact step, with a warning naming each damaged one skipped.

  Returns:
    A `Predictor`.

  Raises:
    FileNotFoundError: naming the path, for a missing workdir or checkpoint.
    ValueError: naming the checkpoint, if it does not fit the config it records;
      `checkpointing.DamagedCheckpoint` (a ValueError), naming the file, when
      `step` is a number whose files are damaged, or when every step is.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir!r} does not exist.')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{workdir!r} holds no checkpoints/ folder: train first.')
  manager = checkpointing.create_manager(ckpt_dir, keep=1_000_000)
  try:
    chosen = _pick_step(manager, step, workdir, ckpt_dir)
    record, data_shape = _run_config(manager, chosen, workdir)
    config = ml_collections.ConfigDict(record)
    run = config_lib.RunOptions.from_config(config)
    data = run.data
    where = os.path.join(ckpt_dir, str(chosen))
    patch_axes = len(data.patch_size) if isinstance(data.patch_size, tuple) else 0
    ndim = int(data_shape.get('ndim') or patch_axes or 2)
    channels = int(data_shape.get('num_channels') or 1)
    variables = _restore_variables(ckpt_dir, chosen, config, ndim, channels, where)
  finally:
    manager.close()
  model = factory.create_model(config.model, kernels=run.kernels)
  return Predictor(
    model=model,
    variables=variables,
    config=config,
    data=data,
    step=chosen,
    num_channels=channels,
    ndim=ndim,
    divisor=factory.input_divisor_of(config.model, ndim=ndim),
    patch_size=data.patch_shape(ndim),
    train_shape=tuple(data_shape.get('spatial_shape') or ()) or None,
  )


def _restore_variables(ckpt_dir, step, config, ndim, channels, where) -> dict[str, Any]:
  """Parameters and BatchNorm statistics only, checked against the model's shapes."""
  model = factory.create_model(config.model, kernels='xla')  # Shapes only.
  size = factory.input_divisor_of(config.model, ndim=ndim)
  abstract = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jnp.zeros((1, *size, channels), jnp.float32),
  )
  item = {'params': abstract['params']}
  if jax.tree.leaves(abstract.get('batch_stats', {})):
    item['batch_stats'] = abstract['batch_stats']
  # A partial restore (no optimizer state) needs the PyTree handler, not the
  # Standard one the training manager registers.
  reader = ocp.CheckpointManager(
    ckpt_dir,
    options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
  )
  try:
    restored = reader.restore(
      step,
      args=ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
      ),
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Tensorstore raises a bare Exception for an unreadable file.
    verified = checkpointing.verify(where)
    if verified and not isinstance(e, (ValueError, KeyError, TypeError)):
      raise
    if verified:  # Intact files: the model does not fit them.
      cause = 'does not fit the model its config describes'
    else:
      cause = (
        f'cannot be read: it has no {checkpointing.MANIFEST} to check its files'
        ' against, so it is damaged or does not fit the model its config describes'
      )
    raise ValueError(f'{where} {cause} ({type(e).__name__}: {str(e)[:300]}).') from None
  finally:
    reader.close()
  wanted = jax.tree_util.tree_flatten_with_path(item)[0]
  got = dict(jax.tree_util.tree_flatten_with_path({k: restored[k] for k in item})[0])
  for path, leaf in wanted:
    shape = np.shape(got.get(path))
    if shape != leaf.shape:
      raise ValueError(
        f'{where} does not fit the model its config describes:'
        f' {jax.tree_util.keystr(path)} has shape {shape} in the checkpoint, the'
        f' model needs {leaf.shape}.'
      )
  return {k: restored[k] for k in item}
