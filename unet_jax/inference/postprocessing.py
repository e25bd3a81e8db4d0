"""Post-processing of class maps by connected components, chosen on validation data.

    rules, report = choose(predictions, references, num_classes=3)
    write('cv/postprocessing.json', rules, report)
    mask = apply(mask, read('cv/postprocessing.json'))

Three rules, applied in this order by `apply` (removed voxels become 0):

1. `largest_foreground`: keep only the largest connected component of all
   foreground classes together (every label > 0 as one mask);
2. `largest_per_class`: for each class listed, keep only its largest component;
3. `min_size`: remove each class's components smaller than `min_size` voxels.

Connectivity is full: 26 neighbours in 3D, 8 in 2D (faces, edges and corners), as
nnU-Net v2 (`acvl_utils.morphology.morphology_helper.remove_all_but_largest_component`
labels with `skimage.measure.label(connectivity=None)`, i.e. full). Where several
components share the largest size, all of them are kept, as there.

`choose` decides the rules on cross-validation predictions, after nnU-Net v2's
`determine_postprocessing` (postprocessing/remove_connected_components.py). Dice is
each case's Dice per class (`metrics.dice_per_class`; NaN where a class is in
neither map), averaged over cases leaving out NaN (`metrics.nan_stats`); the
foreground Dice is the mean of those class means (NaN classes left out).

1. The foreground rule is kept only if it raises the mean Dice of the foreground
   classes and lowers no class's Dice (nnU-Net's defensive check).
2. With more than one foreground class, each class's rule is tried on top of what
   was kept, and kept only where it raises that class's Dice.
3. A minimum size (not in nnU-Net) is tried on top, for a few candidate sizes, and
   the best is kept only if it raises the foreground Dice. Candidates (`min_sizes=None`):
   the sizes of the predicted components that touch no reference voxel of their
   class (spurious components), at their 50th, 90th and 100th percentiles, plus one,
   so that each removes those spurious components up to that size.

"Raises" is strict: a tie, no change or a NaN keeps the rule out.

`postprocessing.json` holds `{"rules": {...}, "report": {...}}` (NaN written as
null); `read` takes the rules back and names the file for anything it cannot read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from unet_jax import metrics

_PERCENTILES = (50, 90, 100)  # Of the spurious components' sizes: min_size candidates.


@dataclasses.dataclass(frozen=True)
class Rules:
  """The post-processing to apply (module docstring); the default does nothing.

  Attributes:
    largest_foreground: keep only the largest connected component of all foreground
      classes together.
    largest_per_class: classes reduced to their own largest component.
    min_size: then remove components (per class) smaller than this many voxels; 0: off.
  """

  largest_foreground: bool = False
  largest_per_class: tuple[int, ...] = ()
  min_size: int = 0

  def __post_init__(self):
    classes = tuple(self.largest_per_class)
    if not all(_is_int(c) and c >= 1 for c in classes):
      raise ValueError(
        f'largest_per_class must hold foreground classes (ints >= 1), got {classes}.'
      )
    object.__setattr__(self, 'largest_per_class', tuple(int(c) for c in classes))
    if not isinstance(self.largest_foreground, (bool, np.bool_)):
      raise ValueError(
        f'largest_foreground must be a bool, got {self.largest_foreground!r}.'
      )
    if not _is_int(self.min_size) or self.min_size < 0:
      raise ValueError(f'min_size must be an int >= 0, got {self.min_size!r}.')


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(component ids [*spatial], size of each id, [0] = background) at full connectivity."""
  structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
  ids, _ = ndimage.label(mask, structure=structure)
  return ids, np.bincount(ids.ravel())


def _outside_largest(mask: np.ndarray) -> np.ndarray:
  """The voxels of `mask` outside its largest component(s)."""
  ids, sizes = _components(mask)
  if len(sizes) <= 2:  # No component, or one.
    return np.zeros_like(mask)
  sizes[0] = 0
  return mask & (sizes[ids] < sizes.max())


def apply(labels: np.ndarray, rules: Rules) -> np.ndarray:
  """The class map with `rules` applied (module docstring); removed voxels -> 0.

  Args:
    labels: int [*spatial] class map (2D or 3D); values <= 0 are not foreground.
    rules: what to apply.

  Returns:
    A new array of the shape and dtype of `labels`.
  """
  out = np.array(labels, copy=True)
  if rules.largest_foreground:
    out[_outside_largest(out > 0)] = 0
  for c in rules.largest_per_class:
    out[_outside_largest(out == c)] = 0
  if rules.min_size > 0:
    for c in np.unique(out[out > 0]):
      ids, sizes = _components(out == c)
      small = sizes < rules.min_size
      small[0] = False
      out[small[ids]] = 0
  return out


def _class_dice(predictions, references, num_classes: int) -> np.ndarray:
  """Mean over cases of each foreground class's Dice: [num_classes - 1], NaN-aware."""
  per_case = [
    metrics.dice_per_class(
      metrics.confusion_matrices_host(p[None], r[None], num_classes)[0]
    )[1:]
    for p, r in zip(predictions, references)
  ]
  return metrics.nan_stats(np.asarray(per_case, np.float64))[0]


def _spurious_sizes(predictions, references, num_classes: int) -> list[int]:
  """The sizes of predicted components that touch no reference voxel of their class."""
  sizes = []
  for p, r in zip(predictions, references):
    for c in range(1, num_classes):
      ids, counts = _components(p == c)
      touched = np.unique(ids[(r == c) & (ids > 0)])
      spurious = np.setdiff1d(np.arange(1, len(counts)), touched)
      sizes.extend(counts[spurious].tolist())
  return sizes


def _candidates(predictions, references, num_classes, min_sizes) -> list[int]:
  if min_sizes is not None:
    return sorted({int(s) for s in min_sizes if int(s) > 0})
  sizes = _spurious_sizes(predictions, references, num_classes)
  if not sizes:
    return []
  return sorted({int(np.percentile(sizes, q)) + 1 for q in _PERCENTILES})


def _floats(values) -> list[float]:
  return [float(v) for v in values]


def _try(current, references, num_classes, rules: Rules):
  """(the predictions with `rules` applied, their class Dice)."""
  candidate = [apply(p, rules) for p in current]
  return candidate, _class_dice(candidate, references, num_classes)


def _largest_rules(current, references, num_classes, log: list):
  """Steps 1 and 2 of `choose`: (predictions after the kept rules, kept, classes)."""
  base = _class_dice(current, references, num_classes)
  candidate, with_rule = _try(
    current, references, num_classes, Rules(largest_foreground=True)
  )
  foreground = metrics.mean_over(with_rule) > metrics.mean_over(base)
  foreground = bool(foreground and not np.any(with_rule < base))
  log.append(
    {
      'rule': 'largest_foreground',
      'classes': list(range(1, num_classes)),
      'dice_without': _floats(base),
      'dice_with': _floats(with_rule),
      'kept': foreground,
    }
  )
  if foreground:
    current, base = candidate, with_rule
  kept = []
  for c in range(1, num_classes) if num_classes > 2 else ():
    candidate, with_rule = _try(
      current, references, num_classes, Rules(largest_per_class=(c,))
    )
    better = bool(with_rule[c - 1] > base[c - 1])
    log.append(
      {
        'rule': 'largest_per_class',
        'classes': [c],
        'dice_without': float(base[c - 1]),
        'dice_with': float(with_rule[c - 1]),
        'kept': better,
      }
    )
    if better:
      current, base = candidate, with_rule
      kept.append(c)
  return current, foreground, tuple(kept)


def _min_size_rule(current, references, num_classes, min_sizes, log: list) -> int:
  """Step 3 of `choose`: the kept minimum size, or 0."""
  base = metrics.mean_over(_class_dice(current, references, num_classes))
  best, best_dice = 0, base
  for size in _candidates(current, references, num_classes, min_sizes):
    dice = metrics.mean_over(
      _try(current, references, num_classes, Rules(min_size=size))[1]
    )
    log.append(
      {
        'rule': 'min_size',
        'min_size': size,
        'foreground_dice_without': float(base),
        'foreground_dice_with': float(dice),
        'kept': False,
      }
    )
    if dice > best_dice:
      best, best_dice = size, dice
  for entry in log:
    if entry['rule'] == 'min_size' and entry['min_size'] == best:
      entry['kept'] = True
  return best


def choose(
  predictions: Sequence[np.ndarray],
  references: Sequence[np.ndarray],
  *,
  num_classes: int,
  min_sizes: Sequence[int] | None = None,
) -> tuple[Rules, dict[str, Any]]:
  """The rules the data supports, decided as nnU-Net does (module docstring).

  Args:
    predictions: int [*spatial] class maps, one per case.
    references: the true class maps, same shapes; values outside [0, num_classes)
      (e.g. -1 for ignored voxels) are not counted.
    num_classes: C, background included (2 for binary).
    min_sizes: the minimum sizes to try; None: from the spurious components'
      sizes (module docstring); (): no minimum size.

  Returns:
    (rules, report): the report holds 'num_cases', 'classes' (1..C-1), 'dice_before'
    and 'dice_after' (per class, mean over cases), 'foreground_dice_before' and
    '_after', and 'rules': per rule tried, the Dice without and with it and whether
    it was kept.
  """
  if len(predictions) != len(references) or not len(predictions):
    raise ValueError(
      f'choose needs as many references as predictions, at least one; got'
      f' {len(predictions)} and {len(references)}.'
    )
  for i, (p, r) in enumerate(zip(predictions, references)):
    if np.shape(p) != np.shape(r):
      raise ValueError(f'case {i}: prediction {np.shape(p)} and reference {np.shape(r)}.')
  before = _class_dice(predictions, references, num_classes)
  log = []
  current, foreground, per_class = _largest_rules(
    list(predictions), references, num_classes, log
  )
  size = _min_size_rule(current, references, num_classes, min_sizes, log)
  rules = Rules(largest_foreground=foreground, largest_per_class=per_class, min_size=size)
  after = _class_dice([apply(p, rules) for p in predictions], references, num_classes)
  report = {
    'num_cases': len(predictions),
    'classes': list(range(1, num_classes)),
    'dice_before': _floats(before),
    'dice_after': _floats(after),
    'foreground_dice_before': metrics.mean_over(before),
    'foreground_dice_after': metrics.mean_over(after),
    'rules': log,
  }
  return rules, report


def _json_safe(value):
  """NaN and infinities as null (JSON has neither); tuples as lists."""
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write(path: str, rules: Rules, report: dict) -> None:
  """Writes `{"rules": ..., "report": ...}` to `path` (temporary file, then renamed)."""
  content = _json_safe({'rules': dataclasses.asdict(rules), 'report': report})
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.partial-{os.getpid()}')
  try:
    with open(tmp, 'w') as f:
      json.dump(content, f, indent=2, allow_nan=False)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read(path: str) -> Rules:
  """The rules of a `postprocessing.json`.

  Raises:
    FileNotFoundError: naming `path`.
    ValueError: naming `path`, for a file that is not such JSON, an unknown key, or
      a value of the wrong kind.
  """
  try:
    with open(path) as f:
      content = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: no such post-processing file.') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: unreadable JSON ({type(e).__name__}: {e}).') from None
  known = {f.name for f in dataclasses.fields(Rules)}
  if not isinstance(content, dict) or not isinstance(content.get('rules'), dict):
    raise ValueError(f'{path}: must hold a JSON object with a "rules" object.')
  unknown = sorted(set(content) - {'rules', 'report'}) + sorted(
    set(content['rules']) - known
  )
  if unknown:
    raise ValueError(
      f'{path}: unknown key(s) {unknown}; "rules" takes {sorted(known)}'
      ' (and the file "rules" and "report").'
    )
  rules = dict(content['rules'])
  if isinstance(rules.get('largest_per_class'), list):
    rules['largest_per_class'] = tuple(rules['largest_per_class'])
  try:
    return Rules(**rules)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: {e}') from None
