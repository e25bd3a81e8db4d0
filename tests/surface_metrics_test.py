"""Tests for unet_jax.metrics.surface: hand-counted boundaries, a brute force.

Torch-free. benchmarks/monai_boundary_parity.py checks agreement with MONAI.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from unet_jax.metrics import surface as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _box(shape, *bounds, value=1):
  """A class map of `shape` with `value` on the box [lo, hi) per axis."""
  out = np.zeros(shape, np.int32)
  out[tuple(slice(lo, hi) for lo, hi in bounds)] = value
  return out


def _blobs(shape, num_classes, seed):
  """A smooth random class map (argmax of blurred noise)."""
  rng = np.random.default_rng(seed)
  noise = rng.random((num_classes, *shape))
  blurred = ndimage.gaussian_filter(noise, sigma=(0,) + (1.5,) * len(shape))
  return np.argmax(blurred, axis=0).astype(np.int32)


# A rectangle of 8 x 10 pixels and the same rectangle moved down by d = 2.
# Boundary of each: 2 * 10 + 2 * (8 - 2) = 32 pixels. Distances of the moved
# one's boundary to the other's (the reverse direction is its mirror image):
#   side columns, rows 3..8 of the moved box: 0 where they overlap the
#     other's side columns (5 per side), 1 for the last one (1 per side);
#   top row: 0 at the two corners (they lie on the other's side columns),
#     1 next to them (2 pixels), 2 elsewhere (6 pixels);
#   bottom row: 2 (10 pixels).
# Sorted: 12 zeros, 4 ones, 16 twos.
SHIFT_LABEL = _box((20, 20), (5, 13), (4, 14))
SHIFT_PRED = _box((20, 20), (7, 15), (4, 14))


# --------------------------------------------------------------------------
# Hausdorff distance: hand-counted values.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  'percentile, expected',
  [
    (95, 2.0),  # position 0.95 * 31 = 29.45 lies among the twos
    (100, 2.0),
    # Position 0.5 * 31 = 15.5, between sorted[15] = 1 and sorted[16] = 2.
    (50, 1.5),
    (0, 0.0),
  ],
)
def test_hd_of_a_shifted_rectangle(percentile, expected):
  hd = sm.hausdorff_distance_95(
    SHIFT_PRED, SHIFT_LABEL, num_classes=2, percentile=percentile
  )
  np.testing.assert_array_equal(hd, [expected])


@pytest.mark.parametrize('k', [1, 2])
def test_hd_of_concentric_squares(k):
  # Filled squares of side 80 and 80 + 2k. Every inner-boundary pixel is k
  # from the outer boundary. Of the 4 (80 + 2k - 1) outer-boundary pixels,
  # 4 (2k - 1) near the corners are farther than k, up to k * sqrt(2) at the
  # corners themselves: 4 or 12 of 324 or 332 (under 5%), so the 95th
  # percentile is k and the maximum k * sqrt(2).
  inner = _box((100, 100), (10, 90), (10, 90))
  outer = _box((100, 100), (10 - k, 90 + k), (10 - k, 90 + k))
  hd95 = sm.hausdorff_distance_95(inner, outer, num_classes=2)
  hd100 = sm.hausdorff_distance_95(inner, outer, num_classes=2, percentile=100)
  np.testing.assert_array_equal(hd95, [k])
  np.testing.assert_allclose(hd100, [k * math.sqrt(2)], rtol=1e-15)


def test_hd_of_concentric_cubes():
  # Cubes of side 40 and 42. Inner-surface voxels are all 1 from the outer
  # surface; of the 42^3 - 40^3 = 10088 outer-surface voxels, the 12 * 40
  # edge voxels are sqrt(2) away and the 8 corners sqrt(3): 488 voxels,
  # 4.8%, so the 95th percentile (position 0.95 * 10087 = 9582.65 < 9600)
  # is 1 and the maximum sqrt(3).
  inner = _box((44, 44, 44), (2, 42), (2, 42), (2, 42))
  outer = _box((44, 44, 44), (1, 43), (1, 43), (1, 43))
  hd95 = sm.hausdorff_distance_95(inner, outer, num_classes=2)
  hd100 = sm.hausdorff_distance_95(inner, outer, num_classes=2, percentile=100)
  np.testing.assert_array_equal(hd95, [1.0])
  np.testing.assert_allclose(hd100, [math.sqrt(3)], rtol=1e-15)


@pytest.mark.parametrize('axis, expected', [(0, 2 * 2.5), (1, 2 * 0.5)])
def test_anisotropic_spacing_scales_the_shifted_axis_only_2d(axis, expected):
  # The rectangle moved by 2 pixels along `axis`: the farthest boundary pixel
  # (the far edge, 10 or 8 of 32 pixels, over 5%) is 2 pixels from the other
  # boundary along `axis` and no other boundary pixel is closer.
  pred = np.moveaxis(SHIFT_PRED, 0, axis)
  label = np.moveaxis(SHIFT_LABEL, 0, axis)
  spacing = (2.5, 0.5)
  for percentile in (95, 100):
    hd = sm.hausdorff_distance_95(
      pred, label, num_classes=2, spacing=spacing, percentile=percentile
    )
    np.testing.assert_allclose(hd, [expected], rtol=1e-15)


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_anisotropic_spacing_scales_the_shifted_axis_only_3d(axis):
  # A 6 x 8 x 8 box moved by 2 voxels along `axis`: its far face (48 or 64 of
  # 240 surface voxels, over 5%) is 2 voxels from the other surface along
  # `axis`, and nothing is farther, so HD95 = HD = 2 * spacing[axis].
  spacing = (2.5, 1.0, 0.4)
  bounds = [(3, 9), (3, 11), (3, 11)]
  moved = list(bounds)
  moved[axis] = (bounds[axis][0] + 2, bounds[axis][1] + 2)
  label = _box((14, 14, 14), *bounds)
  pred = _box((14, 14, 14), *moved)
  for percentile in (95, 100):
    hd = sm.hausdorff_distance_95(
      pred, label, num_classes=2, spacing=spacing, percentile=percentile
    )
    np.testing.assert_allclose(hd, [2 * spacing[axis]], rtol=1e-15)


def test_pixels_on_the_array_edge_are_boundary():
  # Label: the whole 5 x 5 array, boundary the 16 edge pixels. Prediction: the
  # middle 3 x 3, boundary its 8-pixel ring. Ring -> edge: 1 for all 8.
  # Edge -> ring: 1 for 12 pixels, sqrt(2) at the 4 corners (sorted
  # positions 12..15; 0.95 * 15 = 14.25 falls among them).
  label = np.ones((5, 5), np.int32)
  pred = _box((5, 5), (1, 4), (1, 4))
  hd = sm.hausdorff_distance_95(pred, label, num_classes=2)
  np.testing.assert_allclose(hd, [math.sqrt(2)], rtol=1e-15)
  nsd = sm.normalized_surface_dice(pred, label, num_classes=2, tolerance=1.0)
  np.testing.assert_allclose(nsd, [(8 + 12) / (8 + 16)], rtol=1e-15)


# --------------------------------------------------------------------------
# Normalised surface Dice: hand-counted values.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  'tolerance, within',
  [
    (0.0, 12),  # the 12 zeros of each direction
    (0.5, 12),
    (1.0, 16),  # distances equal to the tolerance count (d <= tau)
    (1.9, 16),  # just below d = 2
    (2.0, 32),  # d itself: every boundary pixel
    (2.1, 32),  # just above d
  ],
)
def test_nsd_of_a_shifted_rectangle(tolerance, within):
  # Both directions have the same 32 distances, so NSD = 2 within / 64.
  nsd = sm.normalized_surface_dice(
    SHIFT_PRED, SHIFT_LABEL, num_classes=2, tolerance=tolerance
  )
  np.testing.assert_array_equal(nsd, [within / 32])


def test_nsd_tolerance_in_physical_units():
  # Spacing 0.5 along both axes halves every distance: tolerance 0.95 in
  # physical units is 1.9 pixels, 1.0 is 2 pixels.
  for tolerance, expected in ((0.95, 16 / 32), (1.0, 1.0)):
    nsd = sm.normalized_surface_dice(
      SHIFT_PRED, SHIFT_LABEL, num_classes=2, tolerance=tolerance, spacing=(0.5, 0.5)
    )
    np.testing.assert_array_equal(nsd, [expected])


@pytest.mark.parametrize('spatial', [(24, 20), (10, 12, 9)])
def test_identical_maps_give_hd_zero_and_nsd_one(spatial):
  label = _blobs(spatial, 4, seed=0)
  out = sm.boundary_metrics(
    label,
    label,
    num_classes=4,
    spacing=(0.7,) * len(spatial),
    tolerance=0.0,
    include_background=True,
  )
  np.testing.assert_array_equal(out['hd95'], np.zeros(4))
  np.testing.assert_array_equal(out['nsd'], np.ones(4))


# --------------------------------------------------------------------------
# Empty masks, ignored pixels, symmetry and class order.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('ndim', [2, 3])
def test_empty_masks(ndim):
  empty = np.zeros((6,) * ndim, np.int32)
  full = _box((6,) * ndim, *[(1, 4)] * ndim)
  cases = {  # (prediction, label) -> (HD95, NSD)
    'both empty': (empty, empty, np.nan, np.nan),
    'prediction empty': (empty, full, np.inf, 0.0),
    'ground truth empty': (full, empty, np.inf, 0.0),
  }
  for name, (pred, label, hd, nsd) in cases.items():
    out = sm.boundary_metrics(pred, label, num_classes=2, spacing=None, tolerance=1.0)
    np.testing.assert_array_equal(out['hd95'], [hd], err_msg=name)
    np.testing.assert_array_equal(out['nsd'], [nsd], err_msg=name)
    for percentile in (0, 95, 100):
      np.testing.assert_array_equal(
        sm.hausdorff_distance_95(pred, label, num_classes=2, percentile=percentile),
        [hd],
        err_msg=name,
      )
    np.testing.assert_array_equal(
      sm.normalized_surface_dice(pred, label, num_classes=2, tolerance=5.0),
      [nsd],
      err_msg=name,
    )


def test_ignored_pixels_leave_both_maps():
  # The label's right half is padding (-1). The prediction covers the whole
  # square and spills into the padding; both become the left half.
  label = _box((12, 12), (2, 10), (2, 10))
  label[:, 6:] = -1
  pred = _box((12, 12), (2, 10), (2, 12))
  out = sm.boundary_metrics(
    pred, label, num_classes=2, spacing=None, tolerance=0.0, ignore_index=-1
  )
  np.testing.assert_array_equal(out['hd95'], [0.0])
  np.testing.assert_array_equal(out['nsd'], [1.0])
  # Removed from the label only, the prediction would stay wider.
  kept = np.where(label == -1, 0, label)
  hd = sm.hausdorff_distance_95(pred, kept, num_classes=2, percentile=100)
  assert hd[0] > 0


def test_ignore_index_equals_background_in_both_maps():
  # Removing ignored pixels = setting them to a class not reported.
  pred = _blobs((20, 18), 3, seed=1)
  label = _blobs((20, 18), 3, seed=2)
  ignored = _blobs((20, 18), 2, seed=3) == 1
  padded = np.where(ignored, 255, label)
  ours = sm.boundary_metrics(
    pred, padded, num_classes=3, spacing=(1.0, 2.0), tolerance=1.5, ignore_index=255
  )
  expected = sm.boundary_metrics(
    np.where(ignored, 0, pred),
    np.where(ignored, 0, label),
    num_classes=3,
    spacing=(1.0, 2.0),
    tolerance=1.5,
  )
  for key in ('hd95', 'nsd'):
    np.testing.assert_array_equal(ours[key], expected[key])
  assert not np.array_equal(
    ours['hd95'], sm.hausdorff_distance_95(pred, label, num_classes=3, spacing=(1.0, 2.0))
  )


def test_ignore_index_outside_int32():
  # The ignored voxels are found before the maps are cast to int32.
  label = SHIFT_LABEL.astype(np.int64)
  label[0, :] = 2**40 + 1  # would wrap to class 1 in int32
  hd = sm.hausdorff_distance_95(SHIFT_PRED, label, num_classes=2, ignore_index=2**40 + 1)
  np.testing.assert_array_equal(hd, [2.0])


def test_ignore_index_inside_the_class_range_empties_that_class():
  pred = SHIFT_PRED + _box((20, 20), (0, 3), (0, 3), value=2)
  label = SHIFT_LABEL + _box((20, 20), (0, 3), (0, 3), value=2)
  out = sm.boundary_metrics(
    pred, label, num_classes=3, spacing=None, tolerance=2.0, ignore_index=2
  )
  # Class 2's ground truth is all ignored, and so is the prediction there.
  np.testing.assert_array_equal(out['hd95'], [2.0, np.nan])
  np.testing.assert_array_equal(out['nsd'], [1.0, np.nan])
  pred[19, 19] = 2  # a predicted class-2 pixel outside the ignored region
  out = sm.boundary_metrics(
    pred, label, num_classes=3, spacing=None, tolerance=2.0, ignore_index=2
  )
  np.testing.assert_array_equal(out['hd95'], [2.0, np.inf])
  np.testing.assert_array_equal(out['nsd'], [1.0, 0.0])


@pytest.mark.parametrize('spatial', [(24, 20), (10, 12, 9)])
def test_symmetric_in_its_arguments(spatial):
  a = _blobs(spatial, 3, seed=4)
  b = _blobs(spatial, 3, seed=5)
  spacing = (1.0, 0.6, 2.0)[: len(spatial)]
  for percentile in (50, 95, 100):
    np.testing.assert_array_equal(
      sm.hausdorff_distance_95(a, b, num_classes=3, spacing=spacing, percentile=percentile),
      sm.hausdorff_distance_95(b, a, num_classes=3, spacing=spacing, percentile=percentile),
    )
  np.testing.assert_array_equal(
    sm.normalized_surface_dice(a, b, num_classes=3, tolerance=1.2, spacing=spacing),
    sm.normalized_surface_dice(b, a, num_classes=3, tolerance=1.2, spacing=spacing),
  )


def test_one_value_per_class_in_class_order():
  # Class 1: the rectangle moved by 2 (tolerance 2: NSD 1). Class 2: a 4 x 4
  # square moved by 1 along the columns; of each 12-pixel boundary ring, the
  # 6 pixels on the shared top and bottom rows (columns 16..18 and 15..17)
  # are at 0 and the other 6 at 1 (tolerance 0.5: NSD 12 / 24). Class 3:
  # absent from both.
  pred = SHIFT_PRED + _box((20, 20), (15, 19), (15, 19), value=2)
  label = SHIFT_LABEL + _box((20, 20), (15, 19), (16, 20), value=2)
  out = sm.boundary_metrics(
    pred, label, num_classes=4, spacing=None, tolerance=(2.0, 0.5, 1.0)
  )
  np.testing.assert_array_equal(out['hd95'], [2.0, 1.0, np.nan])
  np.testing.assert_array_equal(out['nsd'], [1.0, 0.5, np.nan])
  with_background = sm.hausdorff_distance_95(
    pred, label, num_classes=4, include_background=True
  )
  assert with_background.shape == (4,)
  np.testing.assert_array_equal(with_background[1:], out['hd95'])


@pytest.mark.parametrize(
  'spatial, spacing', [((24, 20), (1.0, 0.6)), ((10, 12, 9), (2.0, 1.0, 0.7))]
)
def test_matches_brute_force(spatial, spacing):
  # Boundary by explicit neighbour checks, distances by all pairs.
  def boundary(mask):
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in spatial)
    interior = mask.copy()
    for axis in range(mask.ndim):
      for step in (1, -1):
        interior &= np.roll(padded, step, axis)[inner]
    return mask & ~interior

  def distances(a, b):
    pa = np.argwhere(a) * np.asarray(spacing)
    pb = np.argwhere(b) * np.asarray(spacing)
    return np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(axis=1)

  pred = _blobs(spatial, 4, seed=6)
  label = _blobs(spatial, 4, seed=7)
  hd95 = sm.hausdorff_distance_95(
    pred, label, num_classes=4, spacing=spacing, include_background=True
  )
  nsd = sm.normalized_surface_dice(
    pred, label, num_classes=4, spacing=spacing, include_background=True, tolerance=1.3
  )
  for c in range(4):
    bp, bl = boundary(pred == c), boundary(label == c)
    d_pl, d_lp = distances(bp, bl), distances(bl, bp)
    assert d_pl.size and d_lp.size
    np.testing.assert_allclose(
      hd95[c], max(np.percentile(d_pl, 95), np.percentile(d_lp, 95)), rtol=1e-12
    )
    within = np.sum(d_pl <= 1.3) + np.sum(d_lp <= 1.3)
    np.testing.assert_allclose(nsd[c], within / (d_pl.size + d_lp.size), rtol=1e-12)


def test_boundary_metrics_equals_the_two_functions():
  pred = _blobs((16, 14, 12), 3, seed=8)
  label = _blobs((16, 14, 12), 3, seed=9)
  opts = dict(num_classes=3, spacing=(1.5, 1.0, 1.0), include_background=True)
  out = sm.boundary_metrics(pred, label, tolerance=2.0, **opts)
  assert set(out) == {'hd95', 'nsd'}
  np.testing.assert_array_equal(out['hd95'], sm.hausdorff_distance_95(pred, label, **opts))
  np.testing.assert_array_equal(
    out['nsd'], sm.normalized_surface_dice(pred, label, tolerance=2.0, **opts)
  )
  assert out['hd95'].dtype == out['nsd'].dtype == np.float64


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------

GOOD = dict(num_classes=2, spacing=(1.0, 1.0), tolerance=1.0)


@pytest.mark.parametrize(
  'pred_shape, overrides, match',
  [
    ((5, 6), {}, r'same shape.*\(5, 6\) and \(6, 6\)'),
    ((6, 6), dict(spacing=(1.0, 1.0, 1.0)), r'2 values.*\(1\.0, 1\.0, 1\.0\)'),
    ((6, 6), dict(spacing=2.0), r'one voxel size per spatial axis'),
    ((6, 6), dict(spacing=(1.0, 0.0)), r'positive.*\(1\.0, 0\.0\)'),
    ((6, 6), dict(spacing=(-1.0, 1.0)), r'positive.*\(-1\.0, 1\.0\)'),
    ((6, 6), dict(spacing=(np.nan, 1.0)), r'positive'),
    ((6, 6), dict(tolerance=-0.5), r'tolerance.*>= 0.*-0\.5'),
    ((6, 6), dict(tolerance=np.inf), r'tolerance.*finite'),
    ((6, 6), dict(tolerance=(1.0, 2.0)), r'1 values.*\(1\.0, 2\.0\)'),
    ((6, 6), dict(num_classes=1), r'num_classes=1 leaves no class'),
    ((6, 6), dict(num_classes=2.0), r'num_classes must be an int'),
    ((6, 6), dict(ignore_index=1.5), r'ignore_index must be an int, got 1\.5'),
  ],
)
def test_bad_input_raises(pred_shape, overrides, match):
  pred = np.zeros(pred_shape, np.int32)
  label = np.zeros((6, 6), np.int32)
  with pytest.raises(ValueError, match=match):
    sm.boundary_metrics(pred, label, **{**GOOD, **overrides})


def test_bad_values_raise():
  label = np.zeros((6, 6), np.int32)
  bad_pred = label + np.array([0, 2, 5, 0, 0, 0], np.int32)
  with pytest.raises(ValueError, match=r'prediction holds .* \[0, 2\): \[2, 5\]'):
    sm.boundary_metrics(bad_pred, label, **GOOD)
  with pytest.raises(ValueError, match=r'label holds .* \[0, 2\): \[-1\]'):
    sm.boundary_metrics(label, label - 1, **GOOD)
  with pytest.raises(ValueError, match=r'\[0, 2\) or ignore_index=255: \[-1\]'):
    sm.boundary_metrics(label, label - 1, ignore_index=255, **GOOD)
  with pytest.raises(ValueError, match='integer class map, got dtype float32'):
    sm.boundary_metrics(label.astype(np.float32), label, **GOOD)
  with pytest.raises(ValueError, match=r'lie in \[0, 100\], got 101'):
    sm.hausdorff_distance_95(label, label, num_classes=2, percentile=101)


def test_imports_only_numpy_and_scipy():
  code = (
    'import sys; import unet_jax.metrics.surface; '
    'bad = sorted({m.split(".")[0] for m in sys.modules} & '
    '{"jax", "jaxlib", "flax", "torch", "tensorflow", "chex"}); '
    'assert not bad, bad'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
