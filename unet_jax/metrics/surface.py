"""Boundary metrics of one segmented case on the host: HD95 and surface Dice.

Dice counts voxels, so a prediction that is right in bulk but ragged at the
edge scores well. The two metrics here look at the boundaries instead, in
physical units (millimetres when the voxel spacing is in millimetres):

* `hausdorff_distance_95`: the 95th-percentile symmetric Hausdorff distance.
* `normalized_surface_dice`: the share of both boundaries lying within a
  tolerance of the other boundary (Nikolov et al. 2021).
* `boundary_metrics`: both at once, sharing the distance transforms.

They run in NumPy and SciPy on the host (this module imports neither JAX nor
torch), on ONE case at a time: a prediction and a ground truth integer class
map of the same shape `[*spatial]` (2D `[H, W]` or 3D `[D, H, W]`, no
batch or channel axis), and return one float64 value per class.

Definitions, for one class `c`:

* The mask `M` is the set of voxels whose class is `c`.
* Its boundary `B(M)` is the set of voxels of `M` that have a face-
  connected neighbour (4-connected in 2D, 6-connected in 3D) outside `M`:
  `M & ~binary_erosion(M)` with the cross-shaped structuring element.
  Beyond the array counts as outside, so voxels of `M` on the array's edge
  are boundary voxels. This is MONAI's `get_mask_edges` with its default
  `spacing=None` (one boundary element per voxel, not DeepMind's sub-voxel
  surface elements).
* The distance from a boundary voxel `x` to a boundary `B` is the
  Euclidean distance between voxel centres in physical units,
  `d(x, B) = min_{y in B} ||(x - y) * spacing||_2`, computed with
  `scipy.ndimage.distance_transform_edt(..., sampling=spacing)` on the
  bounding box of both masks (plus one voxel), so a small structure in a
  large volume costs little.

Ignored voxels: voxels whose ground-truth label equals `ignore_index` (e.g.
-1 for padding) are removed from BOTH the prediction and the ground truth
before anything else: they belong to no class in either map, so a class
region that touches them has a boundary there.

Empty masks (after removing ignored voxels), per class:

* present in both maps: HD95 finite, NSD in `[0, 1]`;
* present in neither map: HD95 NaN, NSD NaN;
* present in only one of the two: HD95 +inf, NSD 0.

NaN means there was nothing to segment and nothing was predicted: average
per-class values with `np.nanmean` to leave such classes out. A structure
that was missed, or predicted where there is none, is at infinite distance
(the directed distance to an empty set is `min` over nothing, +inf), so it
cannot disappear from a mean. This equals MONAI's `compute_surface_dice`
and MONAI's `compute_hausdorff_distance` with `percentile=None`; given
any percentile (95, even 100) MONAI 1.6.1 returns NaN when one side is empty,
an artefact of `torch.quantile` interpolating between infinities
(`inf - inf`), which would make a missed structure vanish from a NaN-aware
mean. Report, next to
a mean over finite values, how many cases were infinite.

Example::

  out = surface_metrics.boundary_metrics(
      prediction, label, num_classes=3, spacing=(3.0, 0.8, 0.8),
      tolerance=2.0)
  out['hd95']  # [2] float64: classes 1 and 2, in the spacing's units
  out['nsd']   # [2] float64 in [0, 1]
"""

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Distances = tuple[np.ndarray, np.ndarray]


def _as_spacing(spacing, ndim: int) -> tuple[float, ...]:
  if spacing is None:
    return (1.0,) * ndim
  if np.ndim(spacing) != 1 or len(spacing) != ndim:
    raise ValueError(
      f'spacing must give one voxel size per spatial axis ({ndim} values '
      f'for a {ndim}D class map), got {spacing!r}.'
    )
  values = tuple(float(s) for s in spacing)
  if not all(np.isfinite(s) and s > 0 for s in values):
    raise ValueError(f'spacing must be finite and positive on every axis, got {spacing!r}.')
  return values


def _check_class_map(name: str, x: np.ndarray) -> None:
  if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
    raise ValueError(
      f'{name} must be an integer class map, got dtype {x.dtype}. Use '
      'np.argmax(logits, -1) for logits.'
    )


def _check_values(
  name: str, x: np.ndarray, num_classes: int, ignore_index: int | None
) -> None:
  bad = (x < 0) | (x >= num_classes)
  if ignore_index is not None:
    bad &= x != ignore_index
  if bad.any():
    allowed = f'[0, {num_classes})'
    if ignore_index is not None:
      allowed += f' or ignore_index={ignore_index}'
    raise ValueError(
      f'{name} holds values outside {allowed}: {np.unique(x[bad])[:10].tolist()}.'
    )


def _prepare(
  prediction, label, num_classes, spacing, include_background, ignore_index
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], range]:
  """Validates the inputs; returns int32 maps with ignored voxels set to -1."""
  prediction, label = np.asarray(prediction), np.asarray(label)
  if prediction.shape != label.shape:
    raise ValueError(
      'prediction and label must have the same shape, got '
      f'{prediction.shape} and {label.shape}.'
    )
  if prediction.ndim < 1:
    raise ValueError('prediction and label need at least one spatial axis.')
  _check_class_map('prediction', prediction)
  _check_class_map('label', label)
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise ValueError(f'num_classes must be an int, got {num_classes!r}.')
  first = 0 if include_background else 1
  if num_classes < first + 1:
    raise ValueError(
      f'num_classes={num_classes} leaves no class to score with '
      f'include_background={include_background}.'
    )
  if ignore_index is not None and (
    isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))
  ):
    raise ValueError(f'ignore_index must be an int, got {ignore_index!r}.')
  spacing = _as_spacing(spacing, prediction.ndim)
  _check_values('prediction', prediction, num_classes, None)
  _check_values('label', label, num_classes, ignore_index)
  ignored = None if ignore_index is None else label == ignore_index
  prediction = prediction.astype(np.int32)
  label = label.astype(np.int32)
  if ignored is not None:
    prediction[ignored] = -1
    label[ignored] = -1
  return prediction, label, spacing, range(first, num_classes)


def _boundary(mask: np.ndarray) -> np.ndarray:
  """Voxels of `mask` with a face-connected neighbour outside it."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_distances(
  prediction: np.ndarray, label: np.ndarray, spacing: tuple[float, ...]
) -> Distances:
  """Distances of each boundary voxel of one mask to the other's boundary.

  Args:
    prediction: [*spatial] bool mask of the predicted class.
    label: [*spatial] bool mask of the true class.
    spacing: voxel size per axis.

  Returns:
    `(d_pred_to_label, d_label_to_pred)`: float64 arrays with one entry per
    boundary voxel of the prediction and of the label. Distances to an empty
    boundary are +inf.
  """
  edges_pred, edges_label = _boundary(prediction), _boundary(label)
  if not edges_pred.any() or not edges_label.any():
    return (
      np.full(np.count_nonzero(edges_pred), np.inf),
      np.full(np.count_nonzero(edges_label), np.inf),
    )
  to_label = ndimage.distance_transform_edt(~edges_label, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~edges_pred, sampling=spacing)
  return to_label[edges_pred], to_pred[edges_label]


def _crop(box_a, box_b, shape: tuple[int, ...], margin: int = 1):
  """The union of two bounding boxes (either may be None), plus a margin."""
  boxes = [b for b in (box_a, box_b) if b is not None]
  if not boxes:
    return None
  return tuple(
    slice(
      max(min(b[i].start for b in boxes) - margin, 0),
      min(max(b[i].stop for b in boxes) + margin, n),
    )
    for i, n in enumerate(shape)
  )


def _class_distances(
  prediction: np.ndarray,
  label: np.ndarray,
  classes: range,
  spacing: tuple[float, ...],
) -> list[Distances]:
  """`_directed_distances` for each class, each on its own bounding box.

  Args:
    prediction: [*spatial] int32 classes from `_prepare` (-1: no class).
    label: [*spatial] int32 classes from `_prepare` (-1: no class).
    classes: the classes to report.
    spacing: voxel size per axis.
  """
  # One pass over each map finds every class's bounding box (0 = no class).
  boxes_pred = ndimage.find_objects(prediction + 1, max_label=classes.stop)
  boxes_label = ndimage.find_objects(label + 1, max_label=classes.stop)
  out = []
  for c in classes:
    box = _crop(boxes_pred[c], boxes_label[c], prediction.shape)
    if box is None:
      out.append((np.zeros(0), np.zeros(0)))
    else:
      out.append(_directed_distances(prediction[box] == c, label[box] == c, spacing))
  return out


def _check_percentile(percentile) -> float:
  percentile = float(percentile)
  if not 0 <= percentile <= 100:
    raise ValueError(f'percentile must lie in [0, 100], got {percentile}.')
  return percentile


def _tolerances(tolerance, num_reported: int) -> np.ndarray:
  values = np.asarray(tolerance, np.float64)
  if values.ndim == 0:
    values = np.full(num_reported, float(values))
  elif values.shape != (num_reported,):
    raise ValueError(
      f'tolerance must be one number or one per reported class '
      f'({num_reported} values), got {tolerance!r}.'
    )
  if not np.all(np.isfinite(values) & (values >= 0)):
    raise ValueError(f'tolerance must be finite and >= 0, got {tolerance!r}.')
  return values


def _hd(distances: Distances, percentile: float) -> float:
  d_pred, d_label = distances
  if d_pred.size == 0 and d_label.size == 0:
    return np.nan
  if d_pred.size == 0 or d_label.size == 0:
    return np.inf
  return max(
    float(np.percentile(d_pred, percentile)),
    float(np.percentile(d_label, percentile)),
  )


def _nsd(distances: Distances, tolerance: float) -> float:
  d_pred, d_label = distances
  total = d_pred.size + d_label.size
  if total == 0:
    return np.nan
  within = np.count_nonzero(d_pred <= tolerance) + np.count_nonzero(d_label <= tolerance)
  return within / total


def hausdorff_distance_95(
  prediction: np.ndarray,
  label: np.ndarray,
  *,
  num_classes: int,
  spacing: Sequence[float] | None = None,
  include_background: bool = False,
  percentile: float = 95,
  ignore_index: int | None = None,
) -> np.ndarray:
  r"""Percentile Hausdorff distance between boundaries, per class (host).

  With `B_P` and `B_G` the boundaries of the predicted and true masks of
  a class and `d(x, B)` the physical distance from voxel `x` to the
  nearest voxel of `B` (see the module docstring):

  .. math::
    \mathrm{HD}_p = \max\big(P_p\{d(x, B_G) : x \in B_P\},\;
      P_p\{d(y, B_P) : y \in B_G\}\big)

  the larger of the two DIRECTED percentiles, not the percentile of the
  union of both distance sets. `P_p` is the `p`-th percentile with
  linear interpolation between order statistics (`np.percentile`'s
  default, which is `torch.quantile`'s default too). `percentile=100`
  gives the classic Hausdorff distance (the largest distance). This is
  MONAI's `compute_hausdorff_distance(y_pred, y, percentile=p, spacing=...)`
  with its defaults (euclidean, symmetric), on one-hot maps of one case.

  Empty masks: NaN if the class is in neither map, +inf if it is in only one
  (MONAI gives NaN there with a percentile; see the module docstring).
  Ignored voxels (ground truth equal to `ignore_index`) are removed from
  both maps first.

  Args:
    prediction: [*spatial] integer predicted classes of ONE case (no batch
      axis), values in `[0, num_classes)`.
    label: [*spatial] integer true classes, same shape; values in
      `[0, num_classes)` or equal to `ignore_index`.
    num_classes: C.
    spacing: physical voxel size along each spatial axis, in array axis
      order; default 1 on every axis (distances in voxels).
    include_background: score class 0 too.
    percentile: `p` in `[0, 100]`.
    ignore_index: optional ground-truth value (e.g. -1 or 255) whose voxels
      are removed from both maps. A value inside `[0, C)` removes that
      class's whole ground truth, which then counts as empty.

  Returns:
    [C] float64 (classes `0..C-1`) with `include_background`, otherwise
    [C - 1] (classes `1..C-1`), in the units of `spacing`.

  Raises:
    ValueError: shapes differ, a map is not integer or holds values outside
      its range, `spacing` has the wrong length or a non-positive value,
      or `percentile` lies outside `[0, 100]`.

  References:
    Huttenlocher et al., Comparing images using the Hausdorff distance,
    IEEE TPAMI 15(9), 1993. MONAI `monai.metrics.compute_hausdorff_distance`.
  """
  percentile = _check_percentile(percentile)
  prediction, label, spacing, classes = _prepare(
    prediction, label, num_classes, spacing, include_background, ignore_index
  )
  distances = _class_distances(prediction, label, classes, spacing)
  return np.array([_hd(d, percentile) for d in distances], np.float64)


def normalized_surface_dice(
  prediction: np.ndarray,
  label: np.ndarray,
  *,
  num_classes: int,
  tolerance: float | Sequence[float],
  spacing: Sequence[float] | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> np.ndarray:
  r"""Normalised surface Dice at a tolerance, per class (host).

  The share of boundary voxels of both masks lying within `tau` of the
  other mask's boundary (notation of `hausdorff_distance_95`):

  .. math::
    \mathrm{NSD}_\tau = \frac{|\{x \in B_P : d(x, B_G) \le \tau\}|
      + |\{y \in B_G : d(y, B_P) \le \tau\}|}{|B_P| + |B_G|}

  Each boundary voxel weighs 1 (MONAI's `compute_surface_dice` with
  `use_subvoxels=False`); Nikolov et al. weigh sub-voxel surface elements
  by their area instead, which differs slightly on oblique surfaces.

  Empty masks: NaN if the class is in neither map, 0 if it is in only one
  (as MONAI). Ignored voxels (ground truth equal to `ignore_index`) are
  removed from both maps first.

  Args:
    prediction: [*spatial] integer predicted classes of ONE case (no batch
      axis), values in `[0, num_classes)`.
    label: [*spatial] integer true classes, same shape; values in
      `[0, num_classes)` or equal to `ignore_index`.
    num_classes: C.
    tolerance: `tau` in the units of `spacing` (>= 0): one number, or one
      per reported class in output order (MONAI's `class_thresholds`).
    spacing: physical voxel size along each spatial axis; default 1.
    include_background: score class 0 too.
    ignore_index: optional ground-truth value whose voxels are removed from
      both maps (see `hausdorff_distance_95`).

  Returns:
    [C] float64 with `include_background`, otherwise [C - 1] (classes
    `1..C-1`), each in `[0, 1]` or NaN.

  Raises:
    ValueError: as `hausdorff_distance_95`, or `tolerance` negative, not
      finite, or of the wrong length.

  References:
    Nikolov et al., Clinically applicable segmentation of head and neck
    anatomy for radiotherapy, JMIR 2021, arXiv:1809.04430. MONAI
    `monai.metrics.compute_surface_dice`.
  """
  prediction, label, spacing, classes = _prepare(
    prediction, label, num_classes, spacing, include_background, ignore_index
  )
  tolerances = _tolerances(tolerance, len(classes))
  distances = _class_distances(prediction, label, classes, spacing)
  return np.array([_nsd(d, t) for d, t in zip(distances, tolerances)], np.float64)


def boundary_metrics(
  prediction: np.ndarray,
  label: np.ndarray,
  *,
  num_classes: int,
  spacing: Sequence[float] | None,
  tolerance: float | Sequence[float],
  include_background: bool = False,
  ignore_index: int | None = None,
) -> dict[str, np.ndarray]:
  """`hausdorff_distance_95` and `normalized_surface_dice` in one pass.

  Computes the boundaries and distance transforms once for both metrics;
  the arguments mean what they mean there.

  Returns:
    `{'hd95': [C or C - 1] float64, 'nsd': [C or C - 1] float64}`.
  """
  prediction, label, spacing, classes = _prepare(
    prediction, label, num_classes, spacing, include_background, ignore_index
  )
  tolerances = _tolerances(tolerance, len(classes))
  distances = _class_distances(prediction, label, classes, spacing)
  return {
    'hd95': np.array([_hd(d, 95.0) for d in distances], np.float64),
    'nsd': np.array([_nsd(d, t) for d, t in zip(distances, tolerances)], np.float64),
  }
