"""Parity of unet_jax.metrics.surface with MONAI: a development check, not a test.

Compares `hausdorff_distance_95` with `monai.metrics.compute_hausdorff_distance`
(percentiles 50, 95 and 100) and `normalized_surface_dice` with
`monai.metrics.compute_surface_dice` (`use_subvoxels=False`) on fixed random
blob maps (seeded), 2D and 3D, unit, isotropic and anisotropic spacing, several
tolerances (one for all classes, and one per class), with and without the
background class, classes missing from the prediction, the ground truth or both,
and padding removed with `ignore_index=-1`. The suite never installs torch; run
this in its own venv:

    python3 -m venv /work/monai_venv
    /work/monai_venv/bin/pip install torch==2.13.0 monai numpy scipy
    /work/monai_venv/bin/python benchmarks/monai_boundary_parity.py

Everything runs in that venv: unet_jax.metrics.surface needs only numpy and
scipy and is imported from this repository by path (no jax, no install).
Prints a table of the largest differences and exits 1 if a value differs by
more than 1e-6 relative, other than the documented difference below, with one
exception: compute_hausdorff_distance interpolates its percentile in float32
(torch.quantile), so its end-to-end values at percentiles below 100 are held
to 1e-5; the same MONAI boundaries and distances with the percentile taken in
float64 are held to 1e-6.

Documented difference: where a class is in only one of the two maps, HD is
+inf here, and MONAI returns NaN whenever a percentile is given (torch.quantile
interpolates between infinities); MONAI's own percentile=None gives +inf there,
which the script checks. See unet_jax/metrics/surface.py.

MONAI's `ignore_index` differs between the two functions: compute_surface_dice
with one-hot input and a sentinel (-1) removes the voxels where the ground truth
has no class from both maps, as here; compute_hausdorff_distance takes a class
index and returns NaN for that class. So the HD reference is fed one-hot maps
with the ignored voxels zeroed in both, and the surface Dice reference is given
both that and MONAI's own `ignore_index=-1`.
"""

import collections
import datetime
import os
import sys
import warnings

import monai
from monai.metrics import compute_hausdorff_distance
from monai.metrics import compute_surface_dice
from monai.metrics.hausdorff_distance import _compute_percentile_hausdorff_distance
from monai.metrics.utils import get_edge_surface_distance
from monai.metrics.utils import prepare_spacing
import numpy as np
import scipy
from scipy import ndimage
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from unet_jax.metrics import surface as sm  # noqa: E402

RTOL = 1e-6
# compute_hausdorff_distance interpolates its percentile in float32:
# torch.quantile rounds the position q * (n - 1) to float32, an error of up to
# about n * 2**-24 voxels in the position, times the gap between neighbouring
# sorted distances. Its end-to-end HD at percentiles below 100 is held to this.
RTOL_FLOAT32_QUANTILE = 1e-5
PERCENTILES = (50, 95, 100)
TOLERANCES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.3)
SPACINGS = {
  2: {
    'unit (None)': None,
    'isotropic 0.8': (0.8, 0.8),
    'anisotropic (1.0, 0.6)': (1.0, 0.6),
  },
  3: {
    'unit (None)': None,
    'isotropic 0.8': (0.8, 0.8, 0.8),
    'anisotropic (3.0, 0.8, 0.7)': (3.0, 0.8, 0.7),
  },
}
SHAPES = {2: (48, 40), 3: (20, 18, 14)}
# Perturbation strength: blurred noise averages more voxels in 3D.
NOISE = {2: 4.0, 3: 8.0}
NUM_CLASSES = 4
VARIANTS = (
  'plain',
  'absent from both',
  'missing in prediction',
  'missing in ground truth',
  'ignore_index=-1',
)


def _smooth_argmax(fields, sigma):
  blurred = ndimage.gaussian_filter(fields, (0,) + (sigma,) * (fields.ndim - 1))
  return np.argmax(blurred, axis=0).astype(np.int32)


def make_pair(ndim, seed, variant):
  """A seeded (prediction, label) pair: smooth blobs and a perturbed copy."""
  rng = np.random.default_rng(seed)
  shape = SHAPES[ndim]
  label = _smooth_argmax(rng.random((NUM_CLASSES, *shape)), 2.5)
  onehot = label == np.arange(NUM_CLASSES).reshape(-1, *[1] * ndim)
  noise = ndimage.gaussian_filter(rng.random((NUM_CLASSES, *shape)), (0,) + (1.0,) * ndim)
  pred = _smooth_argmax(onehot + NOISE[ndim] * (noise - 0.5), 1.0)
  last = NUM_CLASSES - 1
  if variant == 'absent from both':
    pred[pred == last] = 0
    label[label == last] = 0
  elif variant == 'missing in prediction':
    pred[pred == last] = 0
  elif variant == 'missing in ground truth':
    label[label == last] = 0
  elif variant == 'ignore_index=-1':
    padding = _smooth_argmax(rng.random((2, *shape)), 3.0) == 1
    label[padding] = -1
  return pred, label


def _onehot(x, ndim):
  """[1, C, *spatial] float one-hot; voxels of no class (-1) are all zero."""
  out = x[None] == np.arange(NUM_CLASSES).reshape(-1, *[1] * ndim)
  return torch.from_numpy(out[None].astype(np.float32))


def monai_values(pred, label, ndim, spacing, include_background, tolerances):
  """MONAI's values, keyed like `our_values`, each [classes] float64.

  'hd{p}': compute_hausdorff_distance(percentile=p), end to end (float32).
  'hd{p} f64': the same rule (the larger directed percentile) on MONAI's own
    boundaries and distances (get_edge_surface_distance, as
    compute_hausdorff_distance calls it), with the percentile taken in float64
    by MONAI's _compute_percentile_hausdorff_distance.
  'hd_max': compute_hausdorff_distance(percentile=None).
  'nsd {t}': compute_surface_dice(use_subvoxels=False) at tolerance t; with
    padding also '... (monai ignore_index)', using MONAI's ignore_index=-1.
  """
  keep = label != -1
  y_pred = _onehot(np.where(keep, pred, -1), ndim)
  y = _onehot(label, ndim)
  out = {}
  opts = dict(include_background=include_background, spacing=spacing)
  for p in PERCENTILES:
    out[f'hd{p}'] = compute_hausdorff_distance(y_pred, y, percentile=p, **opts)
  out['hd_max'] = compute_hausdorff_distance(y_pred, y, **opts)
  (spacing_b,) = prepare_spacing(spacing=spacing, batch_size=1, img_dim=ndim)
  first = 0 if include_background else 1
  for p in PERCENTILES:
    values = []
    for c in range(first, NUM_CLASSES):
      _, distances, _ = get_edge_surface_distance(
        y_pred[0, c], y[0, c], spacing=spacing_b, symmetric=True
      )
      values.append(
        torch.max(
          torch.stack(
            [_compute_percentile_hausdorff_distance(d.double(), p) for d in distances]
          )
        )
      )
    out[f'hd{p} f64'] = torch.stack(values)[None]
  num = NUM_CLASSES - first
  for name, tol in tolerances.items():
    thresholds = list(tol) if isinstance(tol, tuple) else [tol] * num
    out[f'nsd {name}'] = compute_surface_dice(
      y_pred, y, thresholds, use_subvoxels=False, **opts
    )
    if not keep.all():  # MONAI's own ignore_index on the unmasked prediction
      out[f'nsd {name} (monai ignore_index)'] = compute_surface_dice(
        _onehot(pred, ndim), y, thresholds, use_subvoxels=False, ignore_index=-1, **opts
      )
  return {k: v[0].double().numpy() for k, v in out.items()}


def our_values(pred, label, spacing, include_background, tolerances):
  ignore = -1 if (label == -1).any() else None
  opts = dict(
    num_classes=NUM_CLASSES,
    spacing=spacing,
    include_background=include_background,
    ignore_index=ignore,
  )
  out = {}
  for p in PERCENTILES:
    out[f'hd{p}'] = sm.hausdorff_distance_95(pred, label, percentile=p, **opts)
  for name, tol in tolerances.items():
    out[f'nsd {name}'] = sm.normalized_surface_dice(pred, label, tolerance=tol, **opts)
  both = sm.boundary_metrics(pred, label, tolerance=tolerances['1.5'], **opts)
  assert np.array_equal(both['hd95'], out['hd95'], equal_nan=True)
  assert np.array_equal(both['nsd'], out['nsd 1.5'], equal_nan=True)
  return out


def compare(ours, reference, one_side, rtol):
  """(max abs diff, max rel diff, #values, #documented, [failures])."""
  abs_diff = rel_diff = 0.0
  documented, failures = 0, []
  for a, b, one in zip(ours, reference, one_side):
    if np.isnan(a) and np.isnan(b) or (np.isinf(a) and a == b):
      continue
    if one and a == np.inf and np.isnan(b):
      documented += 1
      continue
    d = abs(a - b)
    if not np.isfinite(d):
      failures.append((a, b))
      continue
    abs_diff = max(abs_diff, d)
    rel = d / max(abs(a), abs(b)) if d else 0.0
    rel_diff = max(rel_diff, rel)
    if rel > rtol:
      failures.append((a, b))
  return abs_diff, rel_diff, len(ours), documented, failures


def reference_kind(key):
  """The table row of a reference value and the tolerance it is held to."""
  if key.startswith('nsd'):
    return 'NSD: compute_surface_dice', RTOL
  if key.endswith('f64'):
    return 'HD, p in {50, 95, 100}: MONAI distances, percentile in float64', RTOL
  if key == 'hd100':
    return 'HD, p = 100: compute_hausdorff_distance', RTOL
  return (
    'HD, p in {50, 95}: compute_hausdorff_distance (float32 percentile)',
    RTOL_FLOAT32_QUANTILE,
  )


def main():
  warnings.filterwarnings('ignore', message='the (ground truth|prediction) of')
  warnings.filterwarnings('ignore', category=FutureWarning, module='monai')
  rows = collections.defaultdict(lambda: [0.0, 0.0, 0, 0, 0.0])
  failures, cases = [], 0
  for ndim in (2, 3):
    for spacing_name, spacing in SPACINGS[ndim].items():
      for seed, variant in enumerate(VARIANTS):
        for include_background in (False, True):
          pred, label = make_pair(ndim, seed + 10 * ndim, variant)
          num = NUM_CLASSES - (0 if include_background else 1)
          tolerances = {str(t): t for t in TOLERANCES}
          tolerances['per class'] = tuple(0.5 + 0.7 * i for i in range(num))
          ours = our_values(pred, label, spacing, include_background, tolerances)
          ref = monai_values(pred, label, ndim, spacing, include_background, tolerances)
          cases += 1
          classes = range(0 if include_background else 1, NUM_CLASSES)
          keep = label != -1
          in_pred = [bool(((pred == c) & keep).any()) for c in classes]
          in_label = [bool((label == c).any()) for c in classes]
          one_side = [p != g for p, g in zip(in_pred, in_label)]
          # The claim behind the documented difference: MONAI's max is +inf.
          for c, flag in enumerate(one_side):
            if flag and ref['hd_max'][c] != np.inf:
              failures.append((ndim, spacing_name, variant, 'hd_max', c))
          for key, reference in ref.items():
            if key == 'hd_max':
              continue
            kind, rtol = reference_kind(key)
            ours_key = key.replace(' (monai ignore_index)', '').replace(' f64', '')
            result = compare(ours[ours_key], reference, one_side, rtol)
            row = rows[(kind, f'{ndim}D')]
            row[0] = max(row[0], result[0])
            row[1] = max(row[1], result[1])
            row[2] += result[2]
            row[3] += result[3]
            row[4] = rtol
            failures += [(ndim, spacing_name, variant, key, f) for f in result[4]]
  print(
    f'MONAI {monai.__version__}, torch {torch.__version__}, '
    f'numpy {np.__version__}, scipy {scipy.__version__}; '
    f'{datetime.date.today()}; {cases} cases'
  )
  print(
    '| reference | dims | values | max abs diff | max rel diff '
    '| allowed rel | inf here, NaN in MONAI |'
  )
  print('| --- | --- | ---: | ---: | ---: | ---: | ---: |')
  for (kind, dims), r in sorted(rows.items()):
    print(f'| {kind} | {dims} | {r[2]} | {r[0]:.1e} | {r[1]:.1e} | {r[4]:g} | {r[3]} |')
  total = sum(r[2] for r in rows.values())
  print(
    f'{total} values compared; {len(failures)} disagreements beyond '
    'the allowed relative difference.'
  )
  for f in failures[:20]:
    print('  DISAGREE', f)
  sys.exit(1 if failures else 0)


if __name__ == '__main__':
  main()
