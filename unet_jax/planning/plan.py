"""The plan: config choices made from a fingerprint by the rules, and using them.

    p = plan(fp, memory_budget='2GiB', time_budget=300, step_time=0.4)
    print(format_table(p))      # field, value, who set it, reason
    config = apply(config, p)   # the config with the plan's values
    write_plan(path, p, fp)     # <workdir>/plan.json; read_plan(path) reads it
    p = reused(read_plan(other), fixed=..., source=other)   # another run's plan

The rules are in `unet_jax/planning/rules.py`, which documents them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Mapping

import ml_collections

from unet_jax.models import memory
from unet_jax.planning import rules
from unet_jax.planning.fingerprint import as_tuples
from unet_jax.planning.fingerprint import Fingerprint
from unet_jax.planning.fingerprint import write_json
from unet_jax.planning.rules import Choice

PLAN_FILE = 'plan.json'


@dataclasses.dataclass(frozen=True)
class Plan:
  """Planned config fields, each with its reason, and what the plan was made from.

  Attributes:
    choices: one per planned field, in the order of the table.
    inputs: the budgets, the measured step time and the fingerprint key.
  """

  choices: tuple[Choice, ...]
  inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, 'choices', tuple(self.choices))
    object.__setattr__(self, 'inputs', dict(_as_tuples_in(self.inputs)))

  def values(self) -> dict[str, Any]:
    """{field: value} of every choice."""
    return {c.field: c.value for c in self.choices}

  def __getitem__(self, field: str) -> Any:
    return self.values()[field]

  def to_dict(self) -> dict[str, Any]:
    return {
      'inputs': dict(self.inputs),
      'choices': [dataclasses.asdict(c) for c in self.choices],
    }

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Plan:
    return cls(
      choices=tuple(Choice(**c) for c in values['choices']), inputs=values.get('inputs', {})
    )


def _as_tuples_in(mapping: Mapping[str, Any]) -> dict[str, Any]:
  return {k: as_tuples(v) for k, v in mapping.items()}


def write_plan(path: str, p: Plan, fp: Fingerprint | None = None) -> None:
  """Writes a plan (and the fingerprint it came from, for reading) as JSON."""
  values = p.to_dict()
  if fp is not None:
    values['fingerprint'] = fp.to_dict()
  write_json(path, values)


def read_plan(path: str) -> Plan:
  """The plan `write_plan` wrote: equal to the one written."""
  with open(path) as f:
    return Plan.from_dict(json.load(f))


# The `config.model` fields `plan` takes as `network`, beside `features`.
NETWORK_FIELDS = ('block', 'blocks_per_stage', 'max_features')


def plan(
  fp: Fingerprint,
  *,
  memory_budget: str | int = '2GiB',
  time_budget: float | None = None,
  step_time: float | None = None,
  fixed: Mapping[str, Any] | None = None,
  features: int = 16,
  num_devices: int = 1,
  network: Mapping[str, Any] | None = None,
) -> Plan:
  """The plan for a data set: config fields, each with its reason (the rules are
  in `unet_jax/planning/rules.py`). A pure function of its arguments. 3D data is
  planned at the target spacing it chooses: every rule after it sees the
  fingerprint of the resampled cases.

  Args:
    fp: the data set's fingerprint.
    memory_budget: per device, for a training step, in bytes or as '2GiB';
      estimated in float32 on every backend (`rules._step_bytes` says why).
    time_budget: seconds of training steps; with `step_time` it sets
      `num_train_steps`.
    step_time: measured seconds per training step of this plan.
    fixed: dotted config fields set on the command line, with their values:
      kept, planned around, and marked as overridden.
    features: the network's top width (`config.model.features`), for the
      memory estimates.
    num_devices: the batch is a multiple of it; the budget is per device.
    network: the config's `NETWORK_FIELDS` of `model` (missing: the UNet's
      defaults), for the memory estimates; with block 'residual' the plan
      chooses `model.blocks_per_stage` for its depth.

  Returns:
    A `Plan`.
  """
  fixed = _as_tuples_in(fixed or {})
  budget = memory.parse_bytes(memory_budget)
  network = {k: v for k, v in dict(network or {}).items() if v is not None}
  options = dict(budget=budget, num_devices=num_devices, network=network)
  spacing, data = rules.spacing_choices(fp, fixed)  # `data`: resampled to the target.
  choices, shape, batch = rules.input_choices(data, fixed, features=features, **options)
  timed = []
  if time_budget and step_time and 'num_train_steps' not in fixed:
    choices, timed, shape = rules.timed_choices(
      data,
      fixed,
      choices,
      shape,
      batch,
      time_budget=time_budget,
      step_time=step_time,
      features=features,
      **options,
    )
  choices = spacing + choices + rules.normalisation_choices(data, fixed)
  choices += rules.augment_choices(data, shape)
  choices += rules.loss_choices(data, fixed)
  choices += timed
  inputs = {
    'key': fp.key,
    'memory_budget': memory.format_bytes(budget),
    'time_budget': time_budget,
    'step_time': step_time,
    'features': features,
    'num_devices': num_devices,
  }
  if network:
    inputs['network'] = {k: as_tuples(v) for k, v in network.items()}
  if not any(c.field in fixed for c in choices):
    return Plan(tuple(choices), inputs)
  free = plan(
    fp,
    memory_budget=budget,
    time_budget=time_budget,
    step_time=step_time,
    features=features,
    num_devices=num_devices,
    network=network,
  )
  return Plan(_mark_fixed(choices, fixed, free), inputs)


def _mark_fixed(choices, fixed: Mapping[str, Any], free: Plan) -> tuple[Choice, ...]:
  """The choices, each of a `fixed` field marked as overridden, with the value and
  reason `free` (the plan made without `fixed`) gives it."""
  free_choices = {c.field: c for c in free.choices}
  marked = []
  for c in choices:
    if c.field in fixed:
      own = free_choices.get(c.field, c)
      c = Choice(c.field, fixed[c.field], own.reason, overridden=True, planned=own.value)
    marked.append(c)
  return tuple(marked)


def reused(p: Plan, *, fixed: Mapping[str, Any] | None = None, source: str) -> Plan:
  """Another run's plan, for this run (`config.plan_from`): no fingerprint needed.

  Its choices keep their values and reasons; those that the other run's command
  line set become plain choices whose reason says so. The `fixed` fields (this
  run's command line) are marked overridden, with the other run's value as the
  planned one, as `plan` marks them.

  Args:
    p: the other run's plan (`read_plan`).
    fixed: dotted config fields set on this run's command line, with their values.
    source: where `p` was read from; recorded in the inputs as 'plan_from'.

  Returns:
    A `Plan` whose inputs are `p`'s, plus 'plan_from'.
  """
  own = tuple(
    Choice(c.field, c.value, f'set on the command line of {source}') if c.overridden else c
    for c in p.choices
  )
  choices = _mark_fixed(own, _as_tuples_in(fixed or {}), Plan(own))
  return Plan(choices, {**p.inputs, 'plan_from': source})


# ---------------------------------------------------------------------------
# Using a plan.


def _node_and_leaf(config, field: str):
  *path, leaf = field.split('.')
  node = config
  for part in path:
    node = node[part]
  return node, leaf


def has_field(config, field: str) -> bool:
  try:
    node, leaf = _node_and_leaf(config, field)
  except (KeyError, AttributeError, TypeError):
    return False
  return leaf in node


def fixed_fields(config: ml_collections.ConfigDict, keep: Iterable[str]) -> dict[str, Any]:
  """{field: the config's value} of the kept fields the config has: `plan`'s `fixed`."""
  out = {}
  for field in keep:
    if has_field(config, field):
      node, leaf = _node_and_leaf(config, field)
      value = node[leaf]
      out[field] = (
        value.to_dict() if isinstance(value, ml_collections.ConfigDict) else (value)
      )
  return out


def apply(config: ml_collections.ConfigDict, p: Plan) -> ml_collections.ConfigDict:
  """A copy of `config` with every planned field set (overridden ones keep theirs)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for c in p.choices:
    node, leaf = _node_and_leaf(config, c.field)
    node[leaf] = c.value
  return config


def _text(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, tuple):
    inner = ', '.join(_text(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  return repr(value) if isinstance(value, str) else str(value)


def format_table(p: Plan) -> str:
  """The plan as a table: field, value, who set it, reason."""
  rows = [('field', 'value', 'set by', 'reason')]
  for c in p.choices:
    if c.overridden:
      rows.append(
        (
          c.field,
          _text(c.value),
          'command line',
          f"overrides the plan's {_text(c.planned)}: {c.reason}",
        )
      )
    else:
      rows.append((c.field, _text(c.value), 'plan', c.reason))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ['  '.join(r[i].ljust(widths[i]) for i in range(3)) + '  ' + r[3] for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths) + '  ' + '-' * 6)
  return '\n'.join(lines)


def format_fingerprint(fp: Fingerprint, *, cases: int = 3) -> str:
  """The fingerprint as 'field  value' lines; of the per-case fields (spacings,
  shapes) the first `cases` cases."""
  values = {k: _text(as_tuples(v)) for k, v in fp.to_dict().items()}
  for k in ('spacings', 'shapes'):
    per_case = getattr(fp, k)
    if len(per_case) > cases:
      shown = ', '.join(_text(v) for v in per_case[:cases])
      values[k] = f'({shown}, ...): {len(per_case)} cases'
  width = max(len(k) for k in values)
  return '\n'.join(f'{k.ljust(width)}  {v}' for k, v in values.items())
