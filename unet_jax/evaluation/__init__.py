"""Evaluators, built from `config.evals`, after big_vision's `evaluators/`.

    config.evals.eval = dict(type='confusion', split='validation', every_steps=200)
    config.evals.cases = dict(type='per_case', split='test', every_steps=1000)

Each entry names a registered type (`EVALUATORS`: 'confusion', 'per_case',
'boundary') and its options (`unet_jax.config.EvalOptions`, with their defaults):

* type: the evaluator.
* split: the split to evaluate ('' = `config.data.eval_split`).
* every_steps: how often it runs; it also runs after the last step.
* batch_size: the global batch (0 = `config.eval_batch_size`).
* patch_size: examples larger than this are predicted by Gaussian-weighted
  sliding windows (3D volumes larger than the training patches); () = whole.
* overlap: the sliding windows' overlap.
* samples: examples drawn to a PNG grid at each evaluation (types that draw them).
* anything else is passed to the evaluator (e.g. `tolerance` for 'boundary');
  an unknown option is an error.

An evaluator has `run(state) -> dict of metrics`; the training loop writes
them prefixed with the evaluator's name ('eval_dice', 'cases_dice_std', ...),
and `config.best_metric` names the one that picks the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from unet_jax import config as config_lib
from unet_jax.evaluation import boundary
from unet_jax.evaluation import common
from unet_jax.evaluation import confusion
from unet_jax.evaluation import per_case

EVALUATORS: dict[str, Callable[..., Any]] = {
  'confusion': confusion.Evaluator,
  'per_case': per_case.Evaluator,
  'boundary': boundary.Evaluator,
}
COMMON_FIELDS = config_lib.EvalOptions.COMMON
_DEFAULT = config_lib.EvalOptions(type='', every_steps=1)


@dataclasses.dataclass
class Scheduled:
  """An evaluator with its name and period."""

  name: str
  evaluator: Any
  every_steps: int

  def due(self, step: int, last_step: int) -> bool:
    return step % self.every_steps == 0 or step == last_step


def _options(evals) -> dict[str, config_lib.EvalOptions]:
  """`config.evals` (entries as sections or `EvalOptions`) as options, by name."""
  return {
    name: config_lib.EvalOptions.from_config(entry, name=name)
    for name, entry in dict(evals).items()
  }


def _evaluator_class(options: config_lib.EvalOptions) -> Callable[..., Any]:
  """The registered class of `options.type`, after checking its extra options."""
  name, kind = options.name, options.type
  if kind not in EVALUATORS:
    raise ValueError(
      f'config.evals.{name}.type={kind!r} is not one of {sorted(EVALUATORS)}.'
    )
  cls = EVALUATORS[kind]
  accepted = [p for p in _parameters(cls) if p != 'samples']
  unknown = sorted(set(options.extras) - set(accepted))
  if unknown:
    raise ValueError(
      f'config.evals.{name} has unknown option(s) {unknown}; a {kind!r}'
      f' evaluator takes {sorted(COMMON_FIELDS) + accepted}.'
    )
  if 'samples' not in _parameters(cls) and options.samples != _DEFAULT.samples:
    raise ValueError(
      f'config.evals.{name}.samples={options.samples}: a {kind!r} evaluator draws'
      " no samples (a 'confusion' one does)."
    )
  return cls


def _parameters(cls) -> list[str]:
  """The options an evaluator class takes besides its inputs."""
  return [p for p in inspect.signature(cls).parameters if p != 'inputs']


def _extras(cls, options: config_lib.EvalOptions) -> dict[str, Any]:
  """The keyword options of the evaluator: its extras, and samples if it draws them."""
  if 'samples' in _parameters(cls):
    return {'samples': options.samples, **options.extras}
  return dict(options.extras)


def check_config(evals) -> None:
  """Raises ValueError for an unknown type or option, before anything is built."""
  for options in _options(evals).values():
    _evaluator_class(options)


def _patch(options: config_lib.EvalOptions, divisor) -> tuple[int, ...] | None:
  patch = options.patch_size
  if not patch:
    return None
  divisor = (divisor,) * len(patch) if isinstance(divisor, int) else tuple(divisor)
  if len(patch) != len(divisor) or any(p < 1 or p % d for p, d in zip(patch, divisor)):
    raise ValueError(
      f'config.evals.{options.name}.patch_size={patch} must have one positive'
      f' multiple of the model divisor {divisor} per axis.'
    )
  return patch


def from_config(
  evals,
  *,
  data,
  predict,
  num_classes: int,
  workdir: str | None,
  default_split: str,
  default_batch_size: int,
  logits=None,
  divisor=1,
) -> list[Scheduled]:
  """Builds the evaluators `config.evals` names, in the order of their names.

  Args:
    evals: `config.evals`, or a mapping of names to `config_lib.EvalOptions`.
    default_split: for entries whose split is ''.
    default_batch_size: for entries whose batch_size is 0.
    Others: see `common.Inputs`.
  """
  scheduled = []
  for name, options in _options(evals).items():
    cls = _evaluator_class(options)
    inputs = common.Inputs(
      name=name,
      data=data,
      predict=predict,
      num_classes=num_classes,
      workdir=workdir,
      split=options.split or default_split,
      batch_size=int(options.batch_size or default_batch_size),
      logits=logits,
      patch_size=_patch(options, divisor),
      overlap=float(options.overlap),
      divisor=divisor,
    )
    evaluator = cls(inputs, **_extras(cls, options))
    scheduled.append(Scheduled(name, evaluator, int(options.every_steps)))
  return scheduled
