"""`confusion`: exact data-set-level Dice, IoU and pixel accuracy.

One confusion matrix is summed over every pixel of the split (int64, over all
processes), and the metrics come from it (`metrics.summarize`): the foreground
Dice 'dice', 'mean_iou', 'pixel_accuracy', and the per-class lists. Padding and
ignored pixels are not counted. With `samples > 0` it also draws a PNG grid of
the first examples: image, ground truth and prediction.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from unet_jax import distributed
from unet_jax import metrics
from unet_jax import visualize
from unet_jax.evaluation import common


class Evaluator:
  """Data-set-level metrics from one summed confusion matrix.

  Args:
    inputs: see `common.Inputs`.
    samples: examples drawn to `<workdir>/samples/<name>_step_<N>.png`; 0 draws none.
  """

  # The scalar metrics `run` returns: what `config.best_metric` may name.
  METRICS = ('dice', 'mean_dice', 'mean_iou', 'pixel_accuracy')

  def __init__(self, inputs: common.Inputs, *, samples: int = 0):
    self.inputs = inputs
    self.samples = int(samples)

  def run(self, state: Any) -> dict[str, Any]:
    c = self.inputs.num_classes
    total = np.zeros((c, c), np.int64)
    drawn = []
    for batch, preds in common.predictions(self.inputs, state):
      rows = common.real_rows(batch)
      total += metrics.confusion_matrices_host(preds[rows], batch['label'][rows], c).sum(0)
      for i in rows[: max(self.samples - len(drawn), 0)]:
        drawn.append((batch['image'][i], batch['label'][i], preds[i]))
    result = metrics.summarize(distributed.sum_over_processes(total))
    if drawn and self.inputs.workdir and distributed.is_main_process():
      step = common.step_of(state)
      visualize.save_sample_grid(
        drawn,
        os.path.join(self.inputs.workdir, 'samples', f'{self.inputs.name}_step_{step}.png'),
        title=f'{self.inputs.name}, step {step}: dice {result["dice"]:.3f}',
        num_classes=c,
      )
    return result
