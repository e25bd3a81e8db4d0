"""`per_case`: Dice and IoU per class for each image or volume, mean and std over cases.

Papers quote the mean (and standard deviation) over cases of each case's
Dice, which weights every case alike; the `confusion` evaluator's data-set
Dice weights every pixel alike instead, so large cases count more. Both are
exact; they answer different questions.

A class absent from both a case's prediction and its ground truth has no Dice
for that case (NaN) and is left out of that class's mean. Each evaluation
writes `<workdir>/eval/<name>_step_<N>.csv`: one row per case, one column per
class and measure.

Metrics: 'dice' and 'dice_std' (each case's foreground Dice, the mean over
classes 1..C-1 present, then the mean and std over cases),
'dice_per_class_mean' and 'dice_per_class_std' (over cases, per class), and
'iou_per_class_mean'.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from unet_jax import distributed
from unet_jax import metrics
from unet_jax import reporting
from unet_jax.evaluation import common


def case_scores(cm: np.ndarray) -> np.ndarray:
  """Per-case Dice and IoU from per-case confusion matrices.

  Args:
    cm: [N, C, C] counts, rows true and columns predicted.

  Returns:
    [N, 2, C] float64: Dice then IoU of each class, NaN for a class absent
    from both the case's prediction and its ground truth.
  """
  return (
    np.stack([np.stack([metrics.dice_per_class(m), metrics.iou_per_class(m)]) for m in cm])
    if len(cm)
    else np.zeros((0, 2, cm.shape[-1]))
  )


class Evaluator:
  """Per-case Dice and IoU, summarised over cases and written as CSV."""

  # The scalar metrics `run` returns: what `config.best_metric` may name.
  METRICS = ('dice', 'dice_std', 'num_cases')

  def __init__(self, inputs: common.Inputs):
    self.inputs = inputs

  def run(self, state: Any) -> dict[str, Any]:
    c = self.inputs.num_classes
    index, ids, scores = [], [], []
    for batch, preds in common.predictions(self.inputs, state):
      rows = common.real_rows(batch)
      cm = metrics.confusion_matrices_host(preds[rows], batch['label'][rows], c)
      index.extend(batch['index'][rows])
      ids.extend(batch['id'][rows])
      scores.append(case_scores(cm))
    names, scores = common.gather_cases(np.asarray(index), ids, np.concatenate(scores))
    dice, iou = scores[:, 0], scores[:, 1]
    foreground = np.asarray([metrics.mean_over(d[1:]) for d in dice])
    mean, std = metrics.nan_stats(dice)
    fg_mean, fg_std = metrics.nan_stats(foreground[:, None])
    if self.inputs.workdir and distributed.is_main_process():
      step = common.step_of(state)
      header = (
        ['case', 'foreground_dice']
        + [f'dice_{k}' for k in range(c)]
        + [f'iou_{k}' for k in range(c)]
      )
      rows = [
        [n, f, *d, *i] for n, f, d, i in zip(names, foreground, dice.tolist(), iou.tolist())
      ]
      reporting.write_csv(
        os.path.join(self.inputs.workdir, 'eval', f'{self.inputs.name}_step_{step}.csv'),
        header,
        rows,
      )
    return {
      'dice': float(fg_mean[0]),
      'dice_std': float(fg_std[0]),
      'dice_per_class_mean': mean.tolist(),
      'dice_per_class_std': std.tolist(),
      'iou_per_class_mean': metrics.nan_stats(iou)[0].tolist(),
      'num_cases': len(names),
    }
