"""Segmentation metrics from an exact integer confusion matrix.

The device side counts; the host side divides:

* `confusion_matrix` (jit-able, `jax.numpy`) turns predicted and true class
  maps into a `[C, C]` int32 matrix of pixel counts, rows true and columns
  predicted. Matrices of batches and devices add up (`jax.lax.psum` inside
  `shard_map` or `pmap`, or `+` on the host), so dataset-level metrics
  are exact rather than averages of batch averages. Counting uses integer
  scatter-adds, never float32, so counts stay exact past 2**24 pixels.
* `pixel_accuracy`, `iou_per_class`, `mean_iou`, `dice_per_class` and
  `mean_dice` take such a matrix and run in NumPy on the host, in int64 and
  float64: accumulate the per-batch int32 matrices into an int64 NumPy array.
* `per_image_dice` (jit-able) gives per-example Dice for imbalance analysis.
* `confusion_matrices_host` counts per-example matrices in NumPy (int64), and
  `summarize` turns a summed matrix into the figures training reports.

Absent classes: a class with no pixel in either the prediction or the ground
truth has `TP + FP + FN = 0`, so its IoU and Dice are 0 / 0. Libraries
disagree on that value (scikit-learn returns 0 and warns by default, some
return 1, some NaN); here it is NaN in the per-class arrays and left out of
`mean_iou` and `mean_dice`, since nothing was there to be segmented. A class
present in the ground truth but never predicted (or the reverse) scores 0 and
counts in the means. The values equal scikit-learn's `confusion_matrix`,
`f1_score(average=None, zero_division=np.nan)` and
`jaccard_score(average=None)` (which has no NaN option and gives 0 for an
absent class).

Example::

  cm_fn = jax.jit(functools.partial(metrics.confusion_matrix, num_classes=3))
  total = np.zeros((3, 3), np.int64)
  for batch in eval_batches:
    predictions = jnp.argmax(model_fn(batch['image']), axis=-1)
    total += np.asarray(cm_fn(predictions, batch['label']))
  print(metrics.mean_iou(total), metrics.dice_per_class(total))
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _check_class_maps(predictions: jax.Array, labels: jax.Array) -> None:
  try:
    chex.assert_equal_shape([predictions, labels])
  except AssertionError as e:
    raise ValueError(
      'predictions and labels must have the same shape, got '
      f'{jnp.shape(predictions)} and {jnp.shape(labels)}.'
    ) from e
  for name, x in (('predictions', predictions), ('labels', labels)):
    dtype = jnp.asarray(x).dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
      raise ValueError(
        f'{name} must be an integer class map, got {dtype}. For logits use '
        'jnp.argmax(logits, -1) (softmax) or logits[..., 0] > 0 (one '
        'sigmoid logit).'
      )


def confusion_matrix(
  predictions: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Pixel counts of (true class, predicted class) pairs.

  .. math::
    \mathrm{cm}[i, j] = \#\{\text{pixels with label } i \text{ and prediction } j\}

  Pixels whose label equals `ignore_index`, or whose label or prediction
  lies outside `[0, num_classes)`, are not counted (under jit nothing can
  be raised for them; check labels on the host if a stray value would hide a
  bug). Counting is an int32 scatter-add, exact while one call sees fewer than
  2**31 pixels; sum the matrices of many calls on the host in int64. Works
  under `jax.jit` (`num_classes` static), `jax.vmap`, and inside
  `shard_map` / `pmap`, where `jax.lax.psum` gives the global matrix.

  Args:
    predictions: [N, *spatial] integer predicted classes (any shape).
    labels: integer true classes, same shape as `predictions`.
    num_classes: C, a Python int.
    ignore_index: optional label value to leave out; may lie outside
      `[0, C)` (e.g. 255).

  Returns:
    [C, C] int32 counts, rows true and columns predicted (scikit-learn's
    `confusion_matrix` layout).

  References:
    scikit-learn `sklearn.metrics.confusion_matrix`.
  """
  _check_class_maps(predictions, labels)
  num_classes = int(num_classes)
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  predictions = jnp.asarray(predictions).astype(jnp.int32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  valid = (
    (labels >= 0)
    & (labels < num_classes)
    & (predictions >= 0)
    & (predictions < num_classes)
  )
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  num_cells = num_classes * num_classes
  # Uncounted pixels go to one extra bin, dropped below.
  cells = jnp.where(valid, labels * num_classes + predictions, num_cells)
  counts = jnp.bincount(cells.ravel(), length=num_cells + 1)[:num_cells]
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def _counts(cm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """True positives, false positives and false negatives per class."""
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'A confusion matrix must be [C, C], got {cm.shape}.')
  if np.issubdtype(cm.dtype, np.integer) or cm.dtype == np.bool_:
    cm = cm.astype(np.int64)
  else:
    cm = cm.astype(np.float64)
  tp = np.diagonal(cm)
  return tp, cm.sum(axis=0) - tp, cm.sum(axis=1) - tp


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator in float64, NaN where the denominator is 0."""
  out = np.full(np.shape(denominator), np.nan, np.float64)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def _nanmean(values: np.ndarray) -> float:
  present = ~np.isnan(values)
  return float(values[present].mean()) if present.any() else float('nan')


def pixel_accuracy(cm) -> float:
  r"""Share of counted pixels predicted correctly (host, NumPy).

  .. math::
    \mathrm{acc} = \frac{\operatorname{tr}(\mathrm{cm})}{\sum_{i, j} \mathrm{cm}[i, j]}

  Misleading under class imbalance: all-background on 95% background data
  scores 0.95.

  Args:
    cm: [C, C] confusion matrix (NumPy or JAX; integers are summed in int64).

  Returns:
    A float; NaN if the matrix is empty.
  """
  tp, _, fn = _counts(cm)
  return float(_ratio(np.sum(tp), np.sum(tp + fn)))


def iou_per_class(cm) -> np.ndarray:
  r"""Intersection over union (Jaccard index) per class (host, NumPy).

  .. math::
    \mathrm{IoU}_c = \frac{TP_c}{TP_c + FP_c + FN_c}

  with `TP_c = cm[c, c]`, `FP_c` the rest of column `c` and `FN_c`
  the rest of row `c`.

  Args:
    cm: [C, C] confusion matrix, rows true and columns predicted.

  Returns:
    [C] float64; NaN for a class absent from both prediction and ground truth.
    Equals `sklearn.metrics.jaccard_score(average=None)` for every other
    class.

  References:
    Everingham et al., The PASCAL Visual Object Classes (VOC) Challenge,
    IJCV 2010.
  """
  tp, fp, fn = _counts(cm)
  return _ratio(tp, tp + fp + fn)


def mean_iou(cm) -> float:
  r"""Mean IoU over the classes present in prediction or ground truth (host).

  .. math::
    \mathrm{mIoU} = \operatorname*{mean}_{c \,:\, TP_c + FP_c + FN_c > 0} \mathrm{IoU}_c

  Args:
    cm: [C, C] confusion matrix, rows true and columns predicted.

  Returns:
    A float; NaN if no class is present at all.
  """
  return _nanmean(iou_per_class(cm))


def dice_per_class(cm) -> np.ndarray:
  r"""Dice coefficient (F1 score) per class (host, NumPy).

  .. math::
    \mathrm{Dice}_c = \frac{2 \, TP_c}{2 \, TP_c + FP_c + FN_c}

  Args:
    cm: [C, C] confusion matrix, rows true and columns predicted.

  Returns:
    [C] float64; NaN for a class absent from both prediction and ground truth.
    Equals `sklearn.metrics.f1_score(average=None, zero_division=np.nan)`.

  References:
    Dice, Measures of the amount of ecologic association between species,
    Ecology 26(3), 1945.
  """
  tp, fp, fn = _counts(cm)
  return _ratio(2 * tp, 2 * tp + fp + fn)


def mean_dice(cm) -> float:
  """Mean Dice over the classes present in prediction or ground truth (host).

  Args:
    cm: [C, C] confusion matrix, rows true and columns predicted.

  Returns:
    A float; NaN if no class is present at all.
  """
  return _nanmean(dice_per_class(cm))


def per_image_dice(
  predictions: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  ignore_index: int | None = None,
) -> jax.Array:
  r"""Dice per example and class, for imbalance analysis (jit-able).

  .. math::
    \mathrm{Dice}[n, c] = \frac{2 \, TP_{nc}}{2 \, TP_{nc} + FP_{nc} + FN_{nc}}

  from each example's own confusion matrix (see `confusion_matrix` for the
  pixels counted).

  Args:
    predictions: [N, *spatial] integer predicted classes.
    labels: [N, *spatial] integer true classes.
    num_classes: C, a Python int.
    ignore_index: optional label value to leave out.

  Returns:
    [N, C] float32; NaN where the class is absent from both the example's
    prediction and its ground truth.
  """
  _check_class_maps(predictions, labels)
  if jnp.ndim(labels) < 1:
    raise ValueError('predictions and labels need a leading batch axis.')
  matrices = jax.vmap(
    functools.partial(confusion_matrix, num_classes=num_classes, ignore_index=ignore_index)
  )(predictions, labels)
  tp = jnp.diagonal(matrices, axis1=-2, axis2=-1)
  denominator = jnp.sum(matrices, axis=-2) + jnp.sum(matrices, axis=-1)
  present = denominator > 0
  safe = jnp.where(present, denominator, 1).astype(jnp.float32)
  return jnp.where(present, 2 * tp.astype(jnp.float32) / safe, jnp.nan)


def confusion_matrices_host(
  predictions: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
) -> np.ndarray:
  r"""Per-example confusion matrices on the host (NumPy), exact in int64.

  .. math::
    \mathrm{cm}[n, i, j] = \#\{\text{pixels of example } n \text{ with label } i
      \text{ and prediction } j\}

  Labels outside `[0, num_classes)` (the input pipeline's -1 for padding and
  ignored pixels) are not counted; nor are predictions outside that range.

  Args:
    predictions: [N, *spatial] integer predicted classes.
    labels: [N, *spatial] integer true classes.
    num_classes: C.

  Returns:
    [N, C, C] int64, rows true and columns predicted; sum over N for the
    data set's matrix.
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  if predictions.shape != labels.shape or predictions.ndim < 1:
    raise ValueError(
      'predictions and labels must have the same shape with a leading batch'
      f' axis, got {predictions.shape} and {labels.shape}.'
    )
  n, c = labels.shape[0], int(num_classes)
  predictions = predictions.reshape(n, -1).astype(np.int64)
  labels = labels.reshape(n, -1).astype(np.int64)
  valid = (labels >= 0) & (labels < c) & (predictions >= 0) & (predictions < c)
  example = np.broadcast_to(np.arange(n)[:, None], labels.shape)
  cells = (example * c + labels) * c + predictions
  counts = np.bincount(cells[valid], minlength=n * c * c)
  return counts.reshape(n, c, c)


def summarize(cm) -> dict:
  """Data-set-level metrics from a summed confusion matrix (host).

  Args:
    cm: [C, C] confusion matrix, rows true and columns predicted.

  Returns:
    A dict with 'pixel_accuracy', 'mean_iou', 'mean_dice' (floats),
    'dice_per_class' and 'iou_per_class' (lists of C floats, NaN for absent
    classes), and 'dice': the foreground Dice, the mean over classes 1..C-1
    present (the figure segmentation papers quote).
  """
  dice = dice_per_class(cm)
  iou = iou_per_class(cm)
  foreground = np.asarray(dice[1:], np.float64)
  return {
    'pixel_accuracy': pixel_accuracy(cm),
    'mean_iou': mean_iou(cm),
    'mean_dice': mean_dice(cm),
    'dice_per_class': [float(v) for v in dice],
    'iou_per_class': [float(v) for v in iou],
    'dice': _nanmean(foreground),
  }
