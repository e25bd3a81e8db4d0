"""The cross-validation table: per case and class, its summary, printed and as CSV.

`crossval.csv` has one row per case and foreground class: the case, the workdir that
predicted it, the class, Dice, IoU, HD95 (in the spacing's units), NSD, and the Dice
after the chosen post-processing. `summary.csv` has one row per class and one for
the foreground (each case's mean over its classes, NaN left out): the mean and the
population standard deviation over cases of each measure, leaving out NaN (a class
in neither map). HD95 is summarised over its finite values, and `hd95_infinite`
counts the (case, class) pairs left out for being +inf (a structure missed or
predicted where there is none), as the 'boundary' evaluator reports it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from unet_jax import metrics
from unet_jax import reporting

COLUMNS = ('dice', 'iou', 'hd95', 'nsd', 'dice_postprocessed')
HEADER = ('case', 'workdir', 'class', *COLUMNS)
SUMMARY_HEADER = (
  'class',
  *(f'{c}_{s}' for c in COLUMNS for s in ('mean', 'std')),
  'hd95_infinite',
)


@dataclasses.dataclass(frozen=True)
class CaseResult:
  """One case's measures, each float64 [C - 1] (foreground classes)."""

  case: str
  workdir: str
  values: dict[str, np.ndarray]


def rows(results: list[CaseResult], classes: list[int]) -> list[list]:
  """The rows of crossval.csv."""
  return [
    [r.case, r.workdir, c, *(float(r.values[m][k]) for m in COLUMNS)]
    for r in results
    for k, c in enumerate(classes)
  ]


def _stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) over cases of [cases, classes], then of the per-case foreground mean."""
  foreground = np.asarray([[metrics.mean_over(v)] for v in values], np.float64)
  mean, std = metrics.nan_stats(np.concatenate([values, foreground], axis=1))
  return mean, std


def summary(results: list[CaseResult], classes: list[int]) -> list[list]:
  """The rows of summary.csv: per class, then 'foreground'."""
  out = [[c] for c in classes] + [['foreground']]
  for column in COLUMNS:
    values = np.stack([r.values[column] for r in results]).astype(np.float64)
    if column == 'hd95':
      infinite = np.isinf(values)
      values = np.where(infinite, np.nan, values)
    mean, std = _stats(values)
    for row, m, s in zip(out, mean, std):
      row += [float(m), float(s)]
  counts = list(infinite.sum(axis=0)) + [int(infinite.sum())]
  for row, count in zip(out, counts):
    row.append(int(count))
  return out


def write(output: str, results: list[CaseResult], classes: list[int]) -> list[list]:
  """Writes crossval.csv and summary.csv into `output`; returns the summary rows."""
  reporting.write_csv(os.path.join(output, 'crossval.csv'), HEADER, rows(results, classes))
  table = summary(results, classes)
  reporting.write_csv(os.path.join(output, 'summary.csv'), SUMMARY_HEADER, table)
  return table


def _pm(mean: float, std: float, width: int = 17) -> str:
  return f'{mean:.4f} ± {std:.4f}'.rjust(width) if np.isfinite(mean) else 'n/a'.rjust(width)


def format_table(results: list[CaseResult], classes: list[int], table: list[list]) -> str:
  """Each case's Dice per class (before -> after post-processing), then the summary."""
  width = max([len(r.case) for r in results] + [10])
  lines = [f'{"case":<{width}}  ' + '  '.join(f'{"dice_" + str(c):>15}' for c in classes)]
  for r in results:
    pairs = zip(r.values['dice'], r.values['dice_postprocessed'])
    lines.append(
      f'{r.case:<{width}}  ' + '  '.join(f'{a:6.4f} -> {b:6.4f}' for a, b in pairs)
    )
  names = ('Dice', 'IoU', 'HD95', 'NSD', 'Dice post-proc.')
  lines += ['', f'{"class":<{width}}  ' + '  '.join(f'{n:>17}' for n in names)]
  for row in table:
    cells = [_pm(row[1 + 2 * i], row[2 + 2 * i]) for i in range(len(COLUMNS))]
    lines.append(f'{row[0]!s:<{width}}  ' + '  '.join(cells) + f'  ({row[-1]} HD95 inf)')
  return '\n'.join(lines)
