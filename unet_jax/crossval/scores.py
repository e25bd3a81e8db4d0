"""The metrics of one case, per foreground class, through the evaluators' functions.

Dice and IoU come from the case's exact confusion matrix (`evaluation.per_case`),
HD95 and the normalised surface Dice from `metrics.surface`, in physical units at
the case's own spacing. Empty masks follow those modules: a class in neither map
has NaN for every measure; a class in one map only has Dice 0, HD95 +inf, NSD 0.
Voxels whose reference is -1 (the data set's ignore value) count in neither map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from unet_jax import metrics
from unet_jax.evaluation import per_case
from unet_jax.metrics import surface as surface_metrics

METRICS = ('dice', 'iou', 'hd95', 'nsd')


def case_metrics(
  prediction: np.ndarray,
  reference: np.ndarray,
  *,
  num_classes: int,
  spacing: Sequence[float] | None,
  tolerance: float,
) -> dict[str, np.ndarray]:
  """Dice, IoU, HD95 and NSD of each foreground class of one case.

  Args:
    prediction: int [*spatial] classes in [0, num_classes).
    reference: int [*spatial] true classes, -1 where ignored.
    num_classes: C, background included.
    spacing: voxel size per axis (None: 1).
    tolerance: the surface Dice tolerance, in the units of `spacing`.

  Returns:
    {metric: float64 [C - 1]} for `METRICS`.
  """
  cm = metrics.confusion_matrices_host(prediction[None], reference[None], num_classes)
  dice, iou = per_case.case_scores(cm)[0]
  surface = surface_metrics.boundary_metrics(
    prediction,
    reference,
    num_classes=num_classes,
    spacing=spacing,
    tolerance=tolerance,
    ignore_index=-1,
  )
  return {'dice': dice[1:], 'iou': iou[1:], 'hd95': surface['hd95'], 'nsd': surface['nsd']}


def dice(prediction: np.ndarray, reference: np.ndarray, *, num_classes: int) -> np.ndarray:
  """Dice of each foreground class of one case: float64 [C - 1]."""
  cm = metrics.confusion_matrices_host(prediction[None], reference[None], num_classes)
  return per_case.case_scores(cm)[0, 0, 1:]
