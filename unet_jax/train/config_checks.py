"""Config checks that need the registries, the devices or the data.

What a config section holds on its own (choices, ranges, shapes, unknown fields)
is checked where it is read, once, into options (`unet_jax.config`); here:

* `validate_config`: the options, then the loss name, the model, the evaluators
  and `best_metric` against them, and the batch against the device count.
* `check_same_on_all_processes`: every process of a job runs the same config.
* `validate_against_data`: `num_classes` and the input size against the data.
* `check_resume`: a workdir's recorded config against the one resuming in it;
  fields that fix the shape of the saved state must agree, and `init_from`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from unet_jax import config as config_lib
from unet_jax import distributed
from unet_jax import evaluation as evaluators
from unet_jax import losses
from unet_jax import models
from unet_jax.models import factory

OPTIMIZERS = config_lib.OPTIMIZERS
SCHEDULES = config_lib.SCHEDULES
DTYPES = tuple(factory.DTYPES)
BEST_MODES = config_lib.BEST_MODES
# Losses whose activation is a sigmoid: they accept one logit for a binary task.
SIGMOID_LOSSES = ('dice_bce', 'bce')
# What fixes the structure of the saved state: a checkpoint written under one
# value cannot be restored under another. Not `kernels` (how the convolutions run).
STATE_FIELDS = ('model', 'optimizer.name', 'optimizer.grad_clip_norm', 'data_shape')
# Fields under STATE_FIELDS that fix no structure: the compute dtype (parameters stay
# `param_dtype`), so a run recorded with 'float32' resumes under 'auto' (bfloat16 on
# a GPU) and back.
FREE_FIELDS = ('model.dtype',)
# What fixes the cases a run trains on: one fold is one workdir (a checkpoint that
# records no such field, from before folds, was fold 0 of the data's own split).
FOLD_FIELDS = ('data.fold', 'data.num_folds')
# Where a run's parameters came from: read at step 0 only, so a resume may not change
# it (the record would name another run than the one the parameters came from).
# `plan_from` may change, as the plan's fields may: the model fields above guard it.
HISTORY_FIELDS = ('init_from',)
# Fields a record may lack (written before they existed): missing equals ''.
EMPTY_WHEN_MISSING = ('init_from', 'plan_from')
# Model fields a record may lack (written before they existed): missing is the
# UNet's default, the network those runs trained.
DEFAULT_WHEN_MISSING = {'model.block': 'plain', 'model.blocks_per_stage': 1}


def _choice(field: str, value: Any, valid) -> None:
  if value not in valid:
    raise ValueError(f'config.{field}={value!r} is not one of {sorted(valid)}.')


def _check_model(model_config) -> None:
  """`config.model` against the UNet's fields; missing fields keep the UNet's defaults."""
  factory.check_options(model_config)
  for field, valid in (('dtype', factory.COMPUTE_DTYPES), ('param_dtype', DTYPES)):
    if field in model_config:
      _choice(f'model.{field}', model_config[field], valid)
  model = factory.create_model(model_config)  # A dataclass: nothing is built yet.
  _choice('model.upsample', model.upsample, models.UPSAMPLE_MODES)
  _choice('model.norm', model.norm, models.NORMS)
  if model.num_classes < 0:
    raise ValueError(
      'config.model.num_classes must be positive (or 0: from the'
      f' data), got {model.num_classes}.'
    )
  if not 0 <= model.deep_supervision < model.depth:
    raise ValueError(
      f'config.model.deep_supervision={model.deep_supervision} must be in'
      f' [0, depth - 1 = {model.depth - 1}].'
    )


def validate_config(
  config: ml_collections.ConfigDict, *, num_devices: int, process_count: int
) -> config_lib.RunOptions:
  """Raises ValueError for a config that cannot run, before anything compiles.

  Returns:
    The run's options (`config_lib.RunOptions.from_config`, which checks each
    section on its own).
  """
  losses.get_loss(config.loss.name)  # Raises, listing the valid names.
  run = config_lib.RunOptions.from_config(config)
  _check_model(config.model)
  for field in ('batch_size', 'eval_batch_size'):
    value = getattr(run, field)
    if value % num_devices:
      raise ValueError(
        f'config.{field}={value} (a global batch) is not divisible by the'
        f' {num_devices} devices; use a multiple of {num_devices}.'
      )
  if run.batch_size % process_count:
    raise ValueError(
      f'config.batch_size={run.batch_size} is not divisible by the'
      f' {process_count} processes.'
    )
  evaluators.check_config(run.evals)
  best_evaluator(run)
  return run


def check_same_on_all_processes(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError, on every process, when the processes run different configs.

  Every process of a multi-process job must run the same command: a process
  with another batch size or model would wait forever in the first collective
  instead of failing. Each process contributes the SHA-256 digest of its config
  and absolute workdir (JSON with sorted keys; 32 bytes, gathered with
  `multihost_utils.process_allgather`). When the digests differ, the texts are
  gathered too and the error names each field that differs from process 0,
  with both values. A no-op with one process. Call it before anything else
  that could fail on one process only.
  """
  if jax.process_count() == 1:
    return
  text = json.dumps(
    {
      'config': json.loads(config.to_json_best_effort()),
      'workdir': os.path.abspath(workdir),
    },
    sort_keys=True,
  ).encode()
  digest = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
  digests = distributed.gather_over_processes(digest[None])
  if (digests == digests[0]).all():
    return
  size = int(distributed.gather_over_processes(np.asarray([len(text)])).max())
  padded = np.zeros((1, size), np.uint8)
  padded[0, : len(text)] = np.frombuffer(text, np.uint8)
  texts = [
    bytes(row).rstrip(b'\0').decode() for row in distributed.gather_over_processes(padded)
  ]
  first = _flatten(json.loads(texts[0]))
  lines = []
  for p, other in enumerate(texts[1:], start=1):
    other = _flatten(json.loads(other))
    lines += [
      f'{k}: {first.get(k)!r} on process 0, {other.get(k)!r} on process {p}'
      for k in sorted(first.keys() | other.keys())
      if first.get(k) != other.get(k)
    ]
  raise ValueError(
    f'The {jax.process_count()} processes were started with different configs; every'
    ' process must run the same command (--config, --config.* overrides, --workdir):'
    '\n  ' + '\n  '.join(lines) + '\nNothing was trained or written.'
  )


def best_evaluator(run) -> str:
  """The evaluator whose metric `best_metric` ('<evaluator>_<metric>') names.

  Args:
    run: `config_lib.RunOptions`, or the config.
  """
  run = config_lib.RunOptions.from_config(run)
  valid = sorted(
    f'{name}_{metric}'
    for name, options in run.evals.items()
    if options.type in evaluators.EVALUATORS
    for metric in evaluators.EVALUATORS[options.type].METRICS
  )
  if run.best_metric not in valid:
    # A typo would keep no best checkpoint, and --step=best would quietly load the latest.
    raise ValueError(
      f'config.best_metric={run.best_metric!r} is not a metric of the configured'
      f' evaluators; the valid names are {valid}.'
    )
  return max((n for n in run.evals if run.best_metric.startswith(n + '_')), key=len)


def validate_against_data(config: ml_collections.ConfigDict, info) -> None:
  """`num_classes` and the input size must fit the data (`input_pipeline.DatasetInfo`)."""
  loss = config_lib.LossOptions.from_config(config.loss)
  data = config_lib.DataOptions.from_config(config.data)
  c = config.model.num_classes
  sigmoid = loss.name in SIGMOID_LOSSES or loss.kwargs.get('activation') == 'sigmoid'

  binary_sigmoid = c == 1 and info.num_classes == 2 and sigmoid
  if c != info.num_classes and not binary_sigmoid:
    hint = (
      " (one logit works only with a sigmoid loss, 'dice_bce', 'bce' or"
      " loss.kwargs.activation='sigmoid', on a 2-class data set)"
      if c == 1
      else ''
    )
    raise ValueError(
      f'config.model.num_classes={c} does not match the data set'
      f' {data.name!r}, which has {info.num_classes} classes{hint}.'
    )
  divisor = factory.input_divisor_of(config.model, ndim=len(info.spatial_shape))
  try:
    models.check_spatial_shape(info.spatial_shape, divisor)
  except ValueError as e:
    field = 'data.patch_size' if data.patch_size else 'the data'
    raise ValueError(f'{field} does not fit the model: {e}') from None


def state_record(config, info) -> dict[str, Any]:
  """What a checkpoint records of the config it was written with."""
  record = json.loads(config.to_json_best_effort())
  record['data_shape'] = {
    'num_channels': info.num_channels,
    'ndim': len(info.spatial_shape),
  }
  record['input'] = {'spatial_shape': list(info.spatial_shape)}  # What training fed.
  return record


def _flatten(tree, prefix='') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f'{prefix}.{key}' if prefix else key))
  return out


def _check_history(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
  for k in HISTORY_FIELDS:
    if old[k] != new[k]:
      started = repr(old[k]) if old[k] else f"random parameters (config.{k}='')"
      raise ValueError(
        f'Cannot resume from {where} with config.{k}={new[k]!r}: the run started'
        f' from {started}, which its config records (config.{k} is read at step 0'
        ' only). Resume with the recorded value, or use a new --workdir. Nothing was'
        ' written.'
      )


def check_resume(
  saved: dict[str, Any], current: dict[str, Any], *, where: str
) -> list[str]:
  """Compares a checkpoint's recorded config with the one that resumes from it.

  Args:
    saved: `state_record` of the checkpoint.
    current: `state_record` of the resuming run.
    where: the checkpoint folder, for the message.

  Returns:
    The other fields that differ ('field: old -> new'), which may change, such as
    `kernels`. The kernel fields older runs recorded under `model`
    (`factory.OLD_KERNEL_FIELDS`) are dropped from `saved` first, with a log.

  Raises:
    ValueError: naming `where` and each field that fixes the state's structure
      (the model, the optimizer's kind, the data's shape) with both values, or
      the fold (`FOLD_FIELDS`, when the checkpoint records it) that differs,
      or a changed `init_from` (`HISTORY_FIELDS`).
  """
  if isinstance(saved.get('model'), dict):  # Before config.kernels, kernels were here.
    saved = dict(saved, model=factory.drop_kernel_fields(saved['model']))
  old, new = _flatten(saved), _flatten(current)
  for k in EMPTY_WHEN_MISSING:
    for values in (old, new):
      values[k] = values.get(k) or ''
  for k, default in DEFAULT_WHEN_MISSING.items():
    for values in (old, new):
      values[k] = default if values.get(k) is None else values[k]
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  _check_history(old, new, where)
  fixed = [
    k
    for k in changed
    if k not in FREE_FIELDS and any(k == f or k.startswith(f + '.') for f in STATE_FIELDS)
  ]
  folds = [k for k in changed if k in FOLD_FIELDS and k in old]
  if folds:
    lines = '\n  '.join(
      f'{k}: {old[k]!r} in the checkpoint, {new.get(k)!r} now' for k in folds
    )
    raise ValueError(
      f'Cannot resume from {where}: it trains another fold:\n  {lines}\nEach fold'
      ' needs its own --workdir. Nothing was written.'
    )
  if fixed:
    lines = '\n  '.join(
      f'{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now' for k in fixed
    )
    raise ValueError(
      f'Cannot resume from {where}: the checkpoint was written with another model'
      f' or optimizer, and its state does not fit this config:\n  {lines}\nUse a new'
      " --workdir, or the checkpoint's values. Nothing was written."
    )
  return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed]
