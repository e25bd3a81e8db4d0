# Docstrings in losses/, metrics/: Google style, `code` in backticks, math in `.. math::`.
"""Segmentation metrics: confusion-matrix metrics, boundary metrics, case statistics.

* `unet_jax.metrics.confusion`: an exact integer confusion matrix, counted on the
  device (`confusion_matrix`, jit-able) or the host (`confusion_matrices_host`), and
  the metrics it gives on the host (`pixel_accuracy`, `iou_per_class`, `mean_iou`,
  `dice_per_class`, `mean_dice`, `summarize`), plus `per_image_dice`.
* `unet_jax.metrics.surface`: boundary metrics of one case (HD95, surface Dice), in
  NumPy and SciPy.
* `unet_jax.metrics.case_stats`: means and spreads over cases that leave out NaN
  (`nan_stats`, `mean_over`).

The names of `confusion` and `case_stats` are available here too. Those of
`confusion` are loaded on first use, since it needs JAX: importing this package,
`surface` or `case_stats` does not start JAX, so host-only evaluation stays cheap.
"""

from unet_jax.metrics.case_stats import mean_over
from unet_jax.metrics.case_stats import nan_stats

_CONFUSION_NAMES = (
  'confusion_matrices_host',
  'confusion_matrix',
  'dice_per_class',
  'iou_per_class',
  'mean_dice',
  'mean_iou',
  'per_image_dice',
  'pixel_accuracy',
  'summarize',
)

__all__ = [*_CONFUSION_NAMES, 'mean_over', 'nan_stats']


def __getattr__(name: str):
  """Loads `confusion` (and JAX) on first use of one of its names."""
  if name in _CONFUSION_NAMES:
    from unet_jax.metrics import confusion  # pylint: disable=g-import-not-at-top

    value = getattr(confusion, name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_CONFUSION_NAMES))
