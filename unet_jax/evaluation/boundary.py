"""`boundary`: 95th-percentile Hausdorff distance and normalised surface Dice.

Both measure how far the predicted boundary of each class lies from the true
one, in physical units (each case's voxel spacing), which overlap measures
such as Dice do not see: a thin wrong sliver costs little Dice but a large
Hausdorff distance. They are computed per case and per foreground class on
the host with scipy (`unet_jax.metrics.surface`, which states the policy for
empty masks).

Empty masks: a class absent from both a case's prediction and its ground truth
has neither measure (NaN) and is left out. A class present on one side only
(missed, or predicted where there is none) has HD95 = +inf and NSD = 0, the
worst cases. A mean with an infinity in it says nothing more, so 'hd95' is the
mean over the finite values and 'hd95_infinite' counts the (case, class) pairs
left out for being infinite; read the two together.

Metrics: 'hd95', 'hd95_infinite' and 'nsd' (over cases and foreground
classes), and 'hd95_per_class_mean' and 'nsd_per_class_mean'. Each evaluation
writes `<workdir>/eval/<name>_step_<N>.csv` with one row per case.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from unet_jax import distributed
from unet_jax import metrics
from unet_jax import reporting
from unet_jax.evaluation import common
from unet_jax.metrics import surface as surface_metrics


class Evaluator:
  """Per-case HD95 and normalised surface Dice.

  Args:
    inputs: see `common.Inputs`.
    tolerance: the surface Dice tolerance, in the data's physical units (mm for
      medical images with a recorded spacing, pixels otherwise).
  """

  # The scalar metrics `run` returns: what `config.best_metric` may name.
  METRICS = ('hd95', 'hd95_infinite', 'nsd', 'num_cases')

  def __init__(self, inputs: common.Inputs, *, tolerance: float = 1.0):
    if tolerance < 0:
      raise ValueError(
        f'boundary evaluator {inputs.name!r}: tolerance must be >= 0, got {tolerance}.'
      )
    self.inputs = inputs
    self.tolerance = float(tolerance)

  def run(self, state: Any) -> dict[str, Any]:
    c = self.inputs.num_classes
    index, ids, scores = [], [], []
    for batch, preds in common.predictions(self.inputs, state):
      for i in common.real_rows(batch):
        result = surface_metrics.boundary_metrics(
          preds[i],
          batch['label'][i],
          num_classes=c,
          spacing=tuple(float(s) for s in batch['spacing'][i]),
          tolerance=self.tolerance,
          include_background=False,
          ignore_index=-1,
        )
        scores.append(np.stack([result['hd95'], result['nsd']]))
        index.append(batch['index'][i])
        ids.append(batch['id'][i])
    values = np.stack(scores) if scores else np.zeros((0, 2, c - 1))
    names, values = common.gather_cases(np.asarray(index), ids, values)
    hd95, nsd = values[:, 0], values[:, 1]
    if self.inputs.workdir and distributed.is_main_process():
      step = common.step_of(state)
      header = (
        ['case'] + [f'hd95_{k}' for k in range(1, c)] + [f'nsd_{k}' for k in range(1, c)]
      )
      rows = [[n, *h, *s] for n, h, s in zip(names, hd95.tolist(), nsd.tolist())]
      reporting.write_csv(
        os.path.join(self.inputs.workdir, 'eval', f'{self.inputs.name}_step_{step}.csv'),
        header,
        rows,
      )
    finite = lambda v: np.where(np.isinf(v), np.nan, v)
    return {
      'hd95': metrics.mean_over(finite(hd95)),
      'hd95_infinite': int(np.isinf(hd95).sum()),
      'nsd': metrics.mean_over(nsd),
      'hd95_per_class_mean': [metrics.mean_over(h) for h in finite(hd95).T],
      'nsd_per_class_mean': [metrics.mean_over(s) for s in nsd.T],
      'num_cases': len(names),
    }
