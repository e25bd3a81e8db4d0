"""Voxel geometry: reading NIfTI volumes in one orientation, and resampling.

Orientation. `read_volume` reorients every volume to nibabel's closest
canonical orientation (RAS+: voxel axes run towards Right, Anterior,
Superior, as `nibabel.as_closest_canonical` gives) and transposes it to the
codebase's (D, H, W[, C]) = (S, A, R[, c]) order; the spacing is the
canonical voxel size in the same (D, H, W) order. Two files holding the same
world content with different voxel orders (a transposed or flipped array
with a matching affine) read as the same array. The `Volume` keeps the
file's own affine, shape and orientation, so `to_original` maps a canonical
array (a label map, or class probabilities [D, H, W, K]) back to the file's
voxel order, `canonical_affine` gives the affine of the canonical array, and
`write_like` writes canonical labels in a reference file's orientation, shape,
affine and header.

Resampling (as nnU-Net v2's default resampling). An array at `spacing`
resampled to `target` has shape `resampled_shape` (round(shape * spacing /
target) per axis, at least 1). Voxels are aligned by their areas, not their
centres: voxel i of n covers [i, i + 1) * spacing, so the field of view is
kept (scipy.ndimage with `grid_mode`-style coordinates and edge values
repeated). Images use cubic splines; labels and probabilities linear
interpolation.

Separate-z rule. An axis is thick when its spacing is more than
`ANISOTROPY_THRESHOLD` times the finest. If the input spacing has a thick
axis, it decides: exactly one thick axis is resampled apart; otherwise, if
the target spacing has exactly one thick axis, that one is. The other axes
are then resampled slice by slice (order 3 for images, 1 for labels), and the
thick axis after them with `order_thick` (nearest by default), so that
interpolation never blends distant slices.

One-hot label rule. `resample_label` resamples the indicator of each value
present in the label map (background, each class, and any other value such
as an ignore value 255) and keeps, per voxel, the value of the largest one
(ties go to the smaller value). It keeps a running maximum, so memory stays
that of a few volumes whatever the number of classes.

Usage::

    vol = geometry.read_volume('case.nii.gz')  # vol.array: [D, H, W]
    image = vol.array.astype(np.float32)[..., None]  # [D, H, W, 1]
    image = geometry.resample_image(image, vol.spacing, target)
    probs = ...  # [*image.shape[:-1], K] at `target`
    probs = geometry.resample_probabilities(
        probs, target, vol.spacing, shape=vol.array.shape[:3])
    geometry.write_like('pred.nii.gz', probs.argmax(-1), 'case.nii.gz')
"""

from collections.abc import Sequence
import dataclasses
import math
import os

import nibabel
import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's: an axis whose spacing is > 3x the finest is 'thick'

_NIFTI_EXTENSIONS = ('.nii.gz', '.nii')
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """A NIfTI volume in canonical order, and what is needed to undo that.

  Attributes:
    array: RAS+ voxel axes transposed to (D, H, W[, C]) = (S, A, R[, c]),
      dtype as stored (scaled by the header's slope and intercept, as
      nibabel's `dataobj` gives it).
    spacing: (D, H, W) voxel size of `array`, mm.
    affine: The file's own 4x4 affine, float64.
    shape: The file's own spatial shape, (x, y, z) as stored.
    ornt: `nibabel.orientations.io_orientation(affine)`: for each stored
      axis, the RAS axis it runs along and its direction (1 or -1).
  """

  array: np.ndarray
  spacing: tuple[float, ...]
  affine: np.ndarray
  shape: tuple[int, ...]
  ornt: np.ndarray


def _to_canonical(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """Stored [x, y, z, ...] -> canonical [D, H, W, ...] (RAS+ then reversed)."""
  ras = nibabel.orientations.apply_orientation(array, ornt)
  return np.swapaxes(ras, 0, 2)


def _from_canonical(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """Canonical [D, H, W, ...] -> stored [x, y, z, ...]; inverse of `_to_canonical`."""
  back = nibabel.orientations.ornt_transform(_RAS, ornt)
  return nibabel.orientations.apply_orientation(np.swapaxes(array, 0, 2), back)


def read_volume(path: str, *, channels_last_4d: bool = True) -> Volume:
  """Reads a NIfTI (.nii / .nii.gz) volume into canonical (D, H, W[, C]) order.

  3D arrays [x, y, z] give [D, H, W]; 4D arrays [x, y, z, c] give
  [D, H, W, C] (or [C, D, H, W] with `channels_last_4d=False`).

  Args:
    path: The file.
    channels_last_4d: Where a 4D file's channel axis goes: last (default) or
      first.

  Returns:
    The `Volume`.

  Raises:
    ValueError: naming `path`, for an unreadable file or a 2D or 5D+ array.
  """
  try:
    image = nibabel.load(path)
    array = np.asanyarray(image.dataobj)
    zooms = image.header.get_zooms()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: unreadable NIfTI volume ({type(e).__name__}: {e}).') from e
  if array.ndim not in (3, 4):
    raise ValueError(
      f'{path}: a {array.ndim}D array {array.shape}; a volume must be 3D'
      ' [x, y, z] or 4D [x, y, z, channels].'
    )
  affine = np.asarray(image.affine, dtype=np.float64)
  ornt = nibabel.orientations.io_orientation(affine)
  canonical = np.empty(3)
  canonical[ornt[:, 0].astype(int)] = [float(z) for z in zooms[:3]]
  array = _to_canonical(array, ornt)
  if array.ndim == 4 and not channels_last_4d:
    array = np.moveaxis(array, 3, 0)
  return Volume(
    array=array,
    spacing=tuple(float(s) for s in canonical[::-1]),
    affine=affine,
    shape=tuple(int(s) for s in image.shape[:3]),
    ornt=ornt,
  )


def to_original(array: np.ndarray, volume: Volume) -> np.ndarray:
  """Inverse of `read_volume`'s reorientation.

  Args:
    array: Canonical [D, H, W, ...]; trailing axes (e.g. K class
      probabilities) are kept.
    volume: The `Volume` read from the file `array` belongs to.

  Returns:
    [x, y, z, ...] in the file's own voxel order; `volume.shape` spatially.

  Raises:
    ValueError: if `array`'s spatial shape does not match the volume's.
  """
  array = np.asarray(array)
  out = _from_canonical(array, volume.ornt) if array.ndim >= 3 else None
  if out is None or tuple(out.shape[:3]) != tuple(volume.shape):
    raise ValueError(
      f'array of shape {array.shape} does not match the volume: its canonical'
      f' spatial shape is {_canonical_shape(volume)}.'
    )
  return out


def canonical_grid(shape, zooms, affine) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """(shape, spacing) in canonical (D, H, W) order from a header's own (x, y, z)
  shape, zooms and affine, without reading the data: what `read_volume` gives.

  Raises:
    ValueError: for an affine whose orientation cannot be told (degenerate).
  """
  order = nibabel.orientations.io_orientation(np.asarray(affine, np.float64))[:, 0]
  if np.any(np.isnan(order)):
    raise ValueError(f'degenerate affine {np.asarray(affine).tolist()}')
  grid, spacing = [0] * 3, [0.0] * 3
  for axis, target in enumerate(order.astype(int)):
    grid[target], spacing[target] = int(shape[axis]), float(zooms[axis])
  return tuple(reversed(grid)), tuple(reversed(spacing))


def canonical_affine(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """The affine of a file's canonical array, as `read_volume` orders it.

  Maps a voxel index (d, h, w, 1) of the canonical (D, H, W) = (S, A, R) array
  to world millimetres, as `affine` maps (x, y, z, 1) of the stored array: the
  same point for the same voxel.

  Args:
    affine: The file's own 4x4 affine.
    shape: The file's own spatial shape, (x, y, z) as stored.

  Returns:
    float64 [4, 4].
  """
  affine = np.asarray(affine, dtype=np.float64)
  ornt = nibabel.orientations.io_orientation(affine)
  ras = affine @ nibabel.orientations.inv_ornt_aff(ornt, tuple(shape)[:3])
  return ras[:, [2, 1, 0, 3]]


GRID_TOLERANCE = 1e-3  # `grid_differences`: relative, as nnU-Net's relaxed integrity check.


def _grid_parts(affine) -> dict[str, np.ndarray]:
  """A 4x4 affine as its spacing (column norms), direction (unit columns) and origin."""
  affine = np.asarray(affine, np.float64)
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  direction = affine[:3, :3] / np.where(spacing > 0, spacing, 1.0)
  return {'spacing': spacing, 'direction': direction, 'origin': affine[:3, 3]}


def grid_differences(a, b, *, tolerance: float = GRID_TOLERANCE) -> list[str]:
  """How the voxel grid of affine `b` differs from that of affine `a`.

  Each 4x4 affine is split into the voxel spacing (the norms of its columns),
  the direction (its unit columns) and the origin (its translation), and each
  part is compared: it differs when max |a - b| > tolerance * max(1, max |a|,
  max |b|), so direction cosines are compared to within `tolerance` and
  spacings and origins to within `tolerance` of their size (at least 1 mm).
  Both layouts' checks (`folder.validate`, `nnunet.check`) use it for an image
  and its mask, and for the channel files of one case.

  Args:
    a, b: 4x4 affines (voxel index -> world mm), in the files' own voxel order.
    tolerance: See above; non-negative.

  Returns:
    One line per differing part, e.g. 'direction differs ([[1.0, 0.0, 0.0], ...]
    vs [[-1.0, 0.0, 0.0], ...])'; empty when the grids agree.
  """
  parts_a, parts_b = _grid_parts(a), _grid_parts(b)
  differences = []
  for name in ('spacing', 'direction', 'origin'):
    x, y = parts_a[name], parts_b[name]
    scale = max(1.0, float(np.max(np.abs(x))), float(np.max(np.abs(y))))
    if not float(np.max(np.abs(x - y))) <= tolerance * scale:
      differences.append(
        f'{name} differs ({np.round(x, 4).tolist()} vs {np.round(y, 4).tolist()})'
      )
  return differences


def _canonical_shape(volume: Volume) -> tuple[int, ...]:
  ras = np.empty(3, dtype=int)
  ras[volume.ornt[:, 0].astype(int)] = volume.shape
  return tuple(int(s) for s in ras[::-1])


def _label_dtype(labels: np.ndarray) -> type:
  low, high = int(labels.min(initial=0)), int(labels.max(initial=0))
  if low >= 0 and high < 256:
    return np.uint8
  if low >= 0 and high < 65536:
    return np.uint16
  return np.int32


def _nifti_extension(path: str) -> str:
  for ext in _NIFTI_EXTENSIONS:
    if path.lower().endswith(ext):
      return ext
  raise ValueError(f'{path}: not a NIfTI file name; use .nii or .nii.gz.')


def write_like(path: str, labels: np.ndarray, reference: str) -> None:
  """Writes canonical labels as NIfTI in a reference file's geometry.

  The file gets the reference's orientation, shape, affine and header, with
  the data type set to uint8 if the labels fit, else uint16, else int32,
  and scl_slope 1, scl_inter 0. It is written to a temporary name beside
  `path` and renamed, so no half-written file is left.

  Args:
    path: The output, .nii or .nii.gz.
    labels: Canonical [D, H, W] integer labels, as `read_volume(reference)`
      orders them.
    reference: The NIfTI file the labels belong to.

  Raises:
    ValueError: for non-integer labels, a shape that does not match the
      reference, or a path that is not a NIfTI file name.
  """
  ext = _nifti_extension(path)
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 3:
    raise ValueError(
      f'labels must be a 3D integer array, got {labels.dtype} {labels.shape}.'
    )
  ref = nibabel.load(reference)
  volume = Volume(
    array=labels,
    spacing=(),
    affine=np.asarray(ref.affine, dtype=np.float64),
    shape=tuple(int(s) for s in ref.shape[:3]),
    ornt=nibabel.orientations.io_orientation(ref.affine),
  )
  dtype = _label_dtype(labels)
  stored = to_original(labels, volume).astype(dtype)
  header = ref.header.copy()
  header.set_data_dtype(dtype)
  image = nibabel.Nifti1Image(stored, ref.affine, header)
  image.header.set_slope_inter(1, 0)
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f'.{name[: -len(ext)]}.partial-{os.getpid()}{ext}')
  try:
    nibabel.save(image, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_spacing(name: str, spacing, rank: int) -> np.ndarray:
  """`spacing` as float64 [rank]; ValueError unless positive, finite, of length rank."""
  try:
    values = np.asarray(spacing, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be a sequence of numbers, got {spacing!r}.') from e
  if values.ndim != 1 or values.size != rank:
    raise ValueError(
      f'{name} must have one value per spatial axis ({rank}), got {spacing!r}.'
    )
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise ValueError(f'{name} must be positive and finite, got {spacing!r}.')
  return values


def _check_shape(shape, rank: int) -> tuple[int, ...]:
  values = tuple(shape)
  if len(values) != rank or any(int(s) != s or s < 1 for s in values):
    raise ValueError(f'shape must be {rank} positive integers, got {shape!r}.')
  return tuple(int(s) for s in values)


def is_thick(spacing: Sequence[float]) -> np.ndarray:
  """bool [rank]: spacing > ANISOTROPY_THRESHOLD * min(spacing), per axis."""
  values = _check_spacing('spacing', spacing, len(spacing))
  return values > ANISOTROPY_THRESHOLD * values.min()


def separate_axis(spacing: Sequence[float], target: Sequence[float]) -> int | None:
  """The axis the separate-z rule resamples apart, or None.

  The input spacing decides if it has a thick axis (`is_thick`): its only
  thick axis, or None if it has several. Otherwise the target spacing's only
  thick axis, if exactly one.
  """
  for values in (spacing, target):
    thick = np.flatnonzero(is_thick(values))
    if thick.size:
      return int(thick[0]) if thick.size == 1 else None
  return None


def resampled_shape(
  shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
  """round(shape * spacing / target) per axis, at least 1 (nnU-Net's rule)."""
  spacing = _check_spacing('spacing', spacing, len(shape))
  target = _check_spacing('target', target, len(shape))
  return tuple(
    max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True)
  )


def _zoom(x: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
  """float32 [*S] -> [*shape], voxels aligned by area, edge values repeated.

  Output voxel o samples input coordinate (o + 0.5) * n / m - 0.5 along an
  axis of n -> m voxels; an axis with n == m is sampled at its voxel
  centres.
  """
  scale = np.array(x.shape, dtype=np.float64) / np.array(shape, dtype=np.float64)
  return ndimage.affine_transform(
    x,
    scale,
    offset=0.5 * scale - 0.5,
    output_shape=shape,
    output=np.float32,
    order=order,
    mode='nearest',
  )


def _resample(
  x: np.ndarray, shape: tuple[int, ...], *, order: int, order_thick: int, axis: int | None
) -> np.ndarray:
  """One channel, float32 [*S] -> [*shape], by the separate-z rule on `axis`."""
  if x.shape == shape:
    return np.array(x, dtype=np.float32)
  if axis is None:
    return _zoom(x, shape, order)
  plane = shape[:axis] + shape[axis + 1 :]
  if x.shape[:axis] + x.shape[axis + 1 :] != plane:
    slices = np.moveaxis(x, axis, 0)
    out = np.empty((slices.shape[0],) + plane, dtype=np.float32)
    for i, s in enumerate(slices):
      out[i] = _zoom(np.asarray(s, dtype=np.float32), plane, order)
    x = np.moveaxis(out, 0, axis)
  if x.shape[axis] != shape[axis]:
    x = _zoom(x, shape, order_thick)
  return np.ascontiguousarray(x, dtype=np.float32)


def _check_order(name: str, order: int) -> None:
  if not isinstance(order, (int, np.integer)) or not 0 <= order <= 5:
    raise ValueError(f'{name} must be a spline order in 0..5, got {order!r}.')


def _resample_channels(
  array, spacing, target, *, shape, order: int, order_thick: int, what: str
) -> np.ndarray:
  """float [*S, C] -> float32 [*shape, C], channel by channel."""
  array = np.asarray(array)
  rank = array.ndim - 1
  if rank not in (2, 3):
    raise ValueError(f'{what} must be [H, W, C] or [D, H, W, C], got shape {array.shape}.')
  _check_order('order', order)
  _check_order('order_thick', order_thick)
  spacing = _check_spacing('spacing', spacing, rank)
  target = _check_spacing('target', target, rank)
  if shape is None:
    shape = resampled_shape(array.shape[:-1], spacing, target)
  shape = _check_shape(shape, rank)
  axis = separate_axis(spacing, target)
  out = np.empty(shape + array.shape[-1:], dtype=np.float32)
  for c in range(array.shape[-1]):
    out[..., c] = _resample(
      np.asarray(array[..., c], dtype=np.float32),
      shape,
      order=order,
      order_thick=order_thick,
      axis=axis,
    )
  return out


def resample_image(
  image: np.ndarray,
  spacing: Sequence[float],
  target: Sequence[float],
  *,
  shape: Sequence[int] | None = None,
  order: int = 3,
  order_thick: int = 0,
) -> np.ndarray:
  """Resamples an image to the target spacing, channel by channel.

  Cubic splines by default; by the separate-z rule (module docstring), a
  lone thick axis is resampled apart with `order_thick`. Voxels are aligned
  by area, so the field of view is kept. A shape that does not change is
  returned as a float32 copy, without interpolation.

  Args:
    image: [H, W, C] or [D, H, W, C] at `spacing`.
    spacing: The spacing of `image`, one value per spatial axis.
    target: The spacing of the output grid.
    shape: The output's spatial shape; default `resampled_shape(...)`.
    order: Spline order (0..5) of the interpolation.
    order_thick: Spline order along a thick axis resampled apart.

  Returns:
    float32 [*shape, C].

  Raises:
    ValueError: for a bad rank, spacing, target, shape or order.
  """
  return _resample_channels(
    image, spacing, target, shape=shape, order=order, order_thick=order_thick, what='image'
  )


def resample_label(
  label: np.ndarray,
  spacing: Sequence[float],
  target: Sequence[float],
  *,
  num_classes: int,
  shape: Sequence[int] | None = None,
) -> np.ndarray:
  """Resamples a label map by its one-hot encoding (module docstring).

  Each value present (classes in [0, num_classes) and any other, e.g. an
  ignore value 255, which is kept) has its indicator resampled linearly
  (nearest along a thick axis resampled apart); each output voxel takes the
  value with the largest result, computed value by value with a running
  maximum.

  Args:
    label: Integer [H, W] or [D, H, W] at `spacing`.
    spacing: The spacing of `label`.
    target: The spacing of the output grid.
    num_classes: The number of classes, at least 1.
    shape: The output's spatial shape; default `resampled_shape(...)`.

  Returns:
    int32 [*shape].

  Raises:
    ValueError: for a non-integer label, a bad rank, spacing, target, shape
      or num_classes.
  """
  label = np.asarray(label)
  if not np.issubdtype(label.dtype, np.integer) and label.dtype != bool:
    raise ValueError(f'label must hold integers, got dtype {label.dtype}.')
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}.')
  if label.ndim not in (2, 3):
    raise ValueError(f'label must be [H, W] or [D, H, W], got shape {label.shape}.')
  spacing = _check_spacing('spacing', spacing, label.ndim)
  target = _check_spacing('target', target, label.ndim)
  if shape is None:
    shape = resampled_shape(label.shape, spacing, target)
  shape = _check_shape(shape, label.ndim)
  if label.shape == shape:
    return label.astype(np.int32)
  axis = separate_axis(spacing, target)
  best = np.full(shape, -1.0, dtype=np.float32)
  out = np.zeros(shape, dtype=np.int32)
  for value in np.unique(label):
    score = _resample(
      (label == value).astype(np.float32), shape, order=1, order_thick=0, axis=axis
    )
    wins = score > best
    best[wins] = score[wins]
    out[wins] = value
  return out


def resample_probabilities(
  probs: np.ndarray, spacing: Sequence[float], target: Sequence[float], *, shape
) -> np.ndarray:
  """Maps class probabilities (or logits) to another grid, channel by channel.

  Linear interpolation, nearest along a thick axis resampled apart (module
  docstring). Used to bring predictions back to the input's grid before the
  argmax.

  Args:
    probs: float [H, W, K] or [D, H, W, K] at `spacing`.
    spacing: The spacing of `probs` (the grid the network predicted on).
    target: The spacing of the output grid (the input's).
    shape: The output's spatial shape (the input's).

  Returns:
    float32 [*shape, K].

  Raises:
    ValueError: for a bad rank, spacing, target or shape.
  """
  return _resample_channels(
    probs, spacing, target, shape=shape, order=1, order_thick=0, what='probs'
  )


def resampled_bytes(
  shape: Sequence[int],
  spacing: Sequence[float],
  target: Sequence[float],
  *,
  channels: int,
  classes: int,
) -> int:
  """Peak host bytes predicting one volume of spatial `shape` needs.

  The resampled image (float32 x channels), the probabilities at the
  resampled shape (float32 x classes) and the probabilities at the input
  shape (float32 x classes).

  Raises:
    ValueError: for a bad spacing or target, or channels or classes < 1.
  """
  for name, count in (('channels', channels), ('classes', classes)):
    if not isinstance(count, (int, np.integer)) or count < 1:
      raise ValueError(f'{name} must be an integer >= 1, got {count!r}.')
  resampled = math.prod(resampled_shape(shape, spacing, target))
  original = math.prod(int(s) for s in shape)
  return 4 * (resampled * (channels + classes) + original * classes)
