"""The runs of a cross-validation: found, loaded, checked alike, and given their cases.

Each workdir is one fold's run, loaded at a checkpoint (`inference.predictor.load`).
Its recorded config names its data set and fold; `sources.fold_ids` gives the fold's
validation cases and `sources.case_files` their raw files.

Checks, before anything is predicted:

* the runs must share the data set and the model's interface: `data.name`,
  `data.root`, the number of classes, input channels and dimensionality; a
  ValueError names the field and the workdirs that differ (`data.data_dir`, where
  built copies are cached, may differ);
* a case validated by two runs is an error naming the case and both workdirs (the
  table must hold each case once, predicted by the fold that did not train on it);
* cases no run validates (folds not trained yet) are a warning naming them: the
  table covers the rest.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Sequence

from absl import logging

from unet_jax.data import sources
from unet_jax.inference import predictor as predictor_lib

_LISTED = 10  # Case ids named in a warning or error, at most.


@dataclasses.dataclass(frozen=True)
class Run:
  """One fold's run.

  Attributes:
    workdir: its folder, as given (after glob expansion).
    predictor: the model restored at the chosen checkpoint.
    val_ids: the cases its fold validates on, sorted.
  """

  workdir: str
  predictor: predictor_lib.Predictor
  val_ids: tuple[str, ...]


def expand(workdirs: str | Sequence[str]) -> list[str]:
  """Workdirs from a comma-separated string or a list; each entry may be a glob.

  Raises:
    FileNotFoundError: naming an entry that matches no folder.
  """
  entries = workdirs.split(',') if isinstance(workdirs, str) else list(workdirs)
  found = []
  for entry in (e.strip() for e in entries if e.strip()):
    matches = sorted(p for p in glob.glob(os.path.expanduser(entry)) if os.path.isdir(p))
    if not matches:
      raise FileNotFoundError(f'--workdirs entry {entry!r} matches no folder.')
    found.extend(m for m in matches if m not in found)
  if not found:
    raise ValueError('--workdirs names no run.')
  return found


def num_classes_of(predictor: predictor_lib.Predictor) -> int:
  """Classes the metrics count: 2 for a one-logit binary model."""
  return max(int(predictor.model.num_classes), 2)


def _identity(predictor: predictor_lib.Predictor) -> dict[str, Any]:
  data = predictor.data
  return {
    'data.name': data.name,
    'data.root': os.path.abspath(os.path.expanduser(data.root)) if data.root else '',
    'model.num_classes': num_classes_of(predictor),
    'input channels': predictor.num_channels,
    'spatial dimensions': predictor.ndim,
  }


def check_alike(workdirs: Sequence[str], predictors: Sequence[Any]) -> None:
  """Raises ValueError naming each field in which the runs differ."""
  identities = [_identity(p) for p in predictors]
  errors = []
  for field, first in identities[0].items():
    values = {w: i[field] for w, i in zip(workdirs, identities)}
    if any(v != first for v in values.values()):
      listed = ', '.join(f'{w}: {v!r}' for w, v in values.items())
      errors.append(f'{field} differs ({listed})')
  if errors:
    raise ValueError(
      'The runs of a cross-validation must share the data set and the model'
      ' interface; ' + '; '.join(errors) + '.'
    )


def assign(runs: Sequence[Run], case_ids: Sequence[str]) -> dict[str, int]:
  """{case id: index of the run that validates it}, sorted by case id.

  Raises:
    ValueError: a case validated by two runs, or a validation case that is not
      among `case_ids`, named with the workdirs.
  """
  owner, errors = {}, []
  known = set(case_ids)
  for index, run in enumerate(runs):
    unknown = sorted(set(run.val_ids) - known)
    if unknown:
      errors.append(f'{run.workdir} validates unknown case(s) {unknown[:_LISTED]}')
    for case in run.val_ids:
      if case in owner:
        errors.append(
          f'{case} is validated by both {runs[owner[case]].workdir} and {run.workdir}'
        )
      owner.setdefault(case, index)
  if errors:
    raise ValueError(
      'Each case must be validated by exactly one run (one workdir per fold):\n  '
      + '\n  '.join(errors[: 2 * _LISTED])
    )
  missing = sorted(known - set(owner))
  if missing:
    logging.warning(
      '%d of %d case(s) are validated by no run given (a fold not trained yet?);'
      ' the table leaves them out: %s%s',
      len(missing),
      len(known),
      missing[:_LISTED],
      ' ...' if len(missing) > _LISTED else '',
    )
  return dict(sorted((c, i) for c, i in owner.items() if c in known))


def load(
  workdirs: str | Sequence[str], *, step: str | int = 'best'
) -> tuple[list[Run], dict[str, tuple[tuple[str, ...], str]], dict[str, int]]:
  """Loads and checks the runs: (runs, case files, {case: run index}).

  The case files are `sources.case_files` of the first run's data set.
  """
  paths = expand(workdirs)
  predictors = [predictor_lib.load(w, step=step) for w in paths]
  check_alike(paths, predictors)
  runs = [
    Run(w, p, tuple(sorted(sources.fold_ids(p.data)[1]))) for w, p in zip(paths, predictors)
  ]
  files = sources.case_files(predictors[0].data)
  owners = assign(runs, sorted(files))
  if not owners:
    raise ValueError(f'The runs {paths} validate no case of their data set.')
  return runs, files, owners
