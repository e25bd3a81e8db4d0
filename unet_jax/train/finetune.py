"""Starting a new run from another run's parameters: `config.init_from='RUN[:step]'`.

    state = finetune.initialise(state, 'runs/pre:best', tx=tx, model_config=config.model)

The new run takes RUN's parameters and BatchNorm statistics (the checkpoint of
`step`: a number, 'best' or 'latest'; default 'best', as `inference.load`), a
fresh optimizer state, and starts at step 0. The two models' variables are
matched leaf by leaf, by path:

* equal shapes: RUN's values (cast to this model's dtype);
* the input convolution's kernel (`INPUT_CONVS`) with another number of input
  channels (axis -2: the image's channels), or a head's kernel or bias
  (`params/head`, `params/aux_head<k>`) with another number of outputs (axis
  -1: the classes): this model's own initial values, and a log line naming the
  leaf and both shapes;
* anything else (a path in one model only, or any other difference of shape:
  another depth, width, kernel size or normalisation) is an error, raised
  before the first step, naming the first such path (parameters before
  BatchNorm statistics, each in sorted order) and the model fields the two
  runs' configs differ in.

`unet_jax.train.setup.prepare` calls `initialise` only when the run starts from
scratch: a resumed run restores its own checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import inference

# The leaves that may change shape; the names are those of unet_jax.models.UNet.
INPUT_CONV = ('params', 'encoder0', 'conv0', 'kernel')
# The residual encoder's (block='residual') input convolution is its stem's.
INPUT_CONVS = (INPUT_CONV, ('params', 'stem', 'conv0', 'kernel'))
HEAD = re.compile(r'(aux_)?head\d*')
COLLECTIONS = ('params', 'batch_stats')
STEPS = ('best', 'latest')


def parse(init_from: str) -> tuple[str, str | int]:
  """'RUN[:step]' as (RUN, step); the step is 'best' when not given.

  A suffix after the last ':' is a step only when it is a number, 'best' or
  'latest', so paths with a ':' (gs://...) stay whole.
  """
  run, sep, step = init_from.rpartition(':')
  if sep and run and (step in STEPS or step.isdigit()):
    return run, int(step) if step.isdigit() else step
  return init_from, 'best'


def _leaves(variables: dict[str, Any]) -> dict[tuple[str, ...], Any]:
  """{path: leaf} of the collections, parameters first, each in sorted order."""
  out = {}
  for name in COLLECTIONS:
    flat = jax.tree_util.tree_flatten_with_path(variables.get(name) or {})[0]
    for path, leaf in sorted(flat, key=lambda item: _path(item[0])):
      out[(name, *_path(path))] = leaf
  return out


def _path(key_path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in key_path)


def _new_axis(path: tuple[str, ...], old: tuple, new: tuple) -> bool:
  """Whether `path` may take a new shape: the input convolution's channels, or a
  head's classes."""
  if len(old) != len(new) or not old:
    return False
  differ = [i - len(old) for i in range(len(old)) if old[i] != new[i]]
  if path in INPUT_CONVS:
    return differ == [-2]
  is_head = len(path) == 3 and path[0] == 'params' and HEAD.fullmatch(path[1])
  return bool(is_head) and path[2] in ('kernel', 'bias') and differ == [-1]


def _shape_text(leaves, path) -> str:
  return str(tuple(np.shape(leaves[path]))) if path in leaves else 'absent'


def merge(
  source: dict[str, Any], target: dict[str, Any], *, where: str, hint: str = ''
) -> tuple[dict[str, Any], list[str]]:
  """`target`'s variables with `source`'s values where the rule allows (module doc).

  Args:
    source: {'params': ..., 'batch_stats': ...} of the run to start from.
    target: the same collections of the new model, freshly initialised.
    where: the source, for the messages ('runs/pre step 40').
    hint: appended to the error (the model fields the configs differ in).

  Returns:
    (variables, fresh): the merged collections, and one line per leaf left at
    its new initial value ('path: old shape in <where>, new shape now').

  Raises:
    ValueError: naming the first path that differs beyond the rule.
  """
  old, new = _leaves(source), _leaves(target)
  paths = sorted(old.keys() | new.keys(), key=lambda p: (COLLECTIONS.index(p[0]), p))
  merged, fresh, wrong = {}, [], []
  for path in paths:
    a, b = _shape_text(old, path), _shape_text(new, path)
    line = f'{"/".join(path)}: {a} in {where}, {b} now'
    if path not in old or path not in new:
      wrong.append(line)
    elif np.shape(old[path]) == np.shape(new[path]):
      merged[path] = jnp.asarray(old[path], dtype=new[path].dtype)
    elif _new_axis(path, np.shape(old[path]), np.shape(new[path])):
      merged[path] = new[path]
      fresh.append(line)
    else:
      wrong.append(line)
  if wrong:
    raise ValueError(
      f'config.init_from: the model of {where} does not fit this one beyond the'
      ' input convolution (channels) and the heads (classes). The first difference:'
      f' {wrong[0]} ({len(wrong)} differing leaves in all).{hint}'
    )
  out = {name: {} for name in COLLECTIONS if name in target}
  for path, leaf in merged.items():
    node = out[path[0]]
    for part in path[1:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = leaf
  return out, fresh


def _model_hint(saved: dict[str, Any], model_config, where: str) -> str:
  """' The model fields ... differ: ...' between a run's recorded model and this one."""
  plain = lambda c: json.loads(json.dumps(c.to_dict() if hasattr(c, 'to_dict') else c))
  now, before = plain(model_config or {}), plain(saved or {})
  keys = sorted(k for k in before.keys() | now.keys() if k != 'num_classes')
  lines = [
    f'model.{k}: {before.get(k)!r} in {where}, {now.get(k)!r} now'
    for k in keys
    if before.get(k) != now.get(k) and k in before and k in now
  ]
  return (' The model fields that differ: ' + '; '.join(lines) + '.') if lines else ''


def initialise(state, init_from: str, *, tx, model_config) -> Any:
  """`state` (a fresh `TrainState`) started from the run `init_from` names.

  Args:
    state: the new run's initial state.
    init_from: 'RUN[:step]' (`parse`).
    tx: the new run's optimizer: its state is made anew for the new parameters.
    model_config: the new run's `config.model`, for the error's hint.

  Returns:
    The state with RUN's parameters and BatchNorm statistics where they fit,
    a fresh optimizer state and step 0.

  Raises:
    FileNotFoundError: naming the run, when it has no such checkpoint.
    ValueError: naming the first path that does not fit (`merge`).
  """
  run, step = parse(init_from)
  if not os.path.isdir(run):
    raise FileNotFoundError(
      f'config.init_from={init_from!r}: there is no run folder {run!r}'
      " ('RUN[:step]', step a number, 'best' or 'latest')."
    )
  try:
    source = inference.load(run, step=step)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f'config.init_from={init_from!r}: {e}') from None
  where = f'{run} step {source.step}'
  target = {'params': state.params, 'batch_stats': state.batch_stats}
  hint = _model_hint(source.config.get('model'), model_config, run)
  variables, fresh = merge(source.variables, target, where=where, hint=hint)
  for line in fresh:
    logging.info('init_from: initialised anew, %s', line)
  logging.info(
    'Initialised from %s (config.init_from): %d leaves of parameters and BatchNorm'
    ' statistics, %d anew; a fresh optimizer, from step 0.',
    where,
    len(_leaves(variables)) - len(fresh),
    len(fresh),
  )
  params = variables['params']
  return state.replace(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
  )
