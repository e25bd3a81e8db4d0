"""The network's topology per axis: pooling windows and kernels for each level.

    pools, kernels = topology((20, 128, 128), (5.0, 1.0, 1.0))
    # pools ((1, 2, 2), (1, 2, 2), (2, 2, 2), ...), kernels ((1, 3, 3), (1, 3, 3), ...)

The rule (in-plane first for thick slices, a bottleneck of 4 to 8 pixels per axis)
is one of the plan's, described with the others in `unet_jax/planning/rules.py`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from unet_jax import models
from unet_jax.planning.fingerprint import Fingerprint

MAX_DEPTH = 5  # Pooling levels at most: the UNet's widths double at every level.
MIN_POOL_SIZE = 8  # An axis is pooled while at least this long: bottleneck 4..8.


def topology(
  shape: Sequence[float], spacing: Sequence[float], *, depth: int | None = None
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
  """Pooling windows and kernels per level for an input `shape` of `spacing`.

  Level by level, an axis is pooled by 2 if its current spacing (the spacing
  times the pooling so far) is at most 2x the finest current spacing and its
  current size is at least `MIN_POOL_SIZE`; its kernel is 3 where the spacing
  is within 2x of the finest and 1 elsewhere. It stops when no axis can be
  pooled or at `MAX_DEPTH` levels (with `depth`: at exactly `depth` levels,
  pooling the spacing-eligible axes that are at least 2 long, when the size
  rule allows none). At least one level.

  Returns:
    (pool_sizes, kernel_sizes): `depth` pool tuples and `depth + 1` kernel
    tuples (the last for the bottleneck), as `models.UNet` takes them.
  """
  size = [float(s) for s in shape]
  current = [float(s) for s in spacing]
  pools, kernels = [], []
  while len(pools) < (depth or MAX_DEPTH):
    eligible = [s <= 2 * min(current) for s in current]
    pool = tuple(2 if ok and n >= MIN_POOL_SIZE else 1 for ok, n in zip(eligible, size))
    if max(pool) == 1:
      if depth is None and pools:
        break
      pool = tuple(2 if ok and n >= 2 else 1 for ok, n in zip(eligible, size))
      if max(pool) == 1:
        pool = tuple(2 if ok else 1 for ok in eligible)
    kernels.append(tuple(3 if ok else 1 for ok in eligible))
    pools.append(pool)
    size = [n / p for n, p in zip(size, pool)]
    current = [s * p for s, p in zip(current, pool)]
  kernels.append(tuple(3 if s <= 2 * min(current) else 1 for s in current))
  return tuple(pools), tuple(kernels)


def pooling_factor(pools) -> tuple[int, ...]:
  """The pooling factor per axis of all levels together: pools [depth][ndim]."""
  return tuple(math.prod(p[a] for p in pools) for a in range(len(pools[0])))


def _one_for_all(pools) -> bool:
  """Whether pool sizes are one int or one tuple for every level."""
  return isinstance(pools, int) or all(isinstance(p, int) for p in pools)


def layout(fp: Fingerprint, shape, fixed: Mapping[str, Any]):
  """(pools, kernels, depth_fixed) for an input `shape`, honouring a fixed depth,
  pooling or kernels (`fixed`: dotted config fields set on the command line)."""
  depth = fixed.get('model.depth')
  fixed_pools = fixed.get('model.pool_sizes')
  if depth is None and fixed_pools is not None and not _one_for_all(fixed_pools):
    depth = len(fixed_pools)
  pools, kernels = topology(shape, fp.spacing_median, depth=depth)
  if fixed_pools is not None:
    pools = models.level_shapes(ndim=fp.ndim, depth=len(pools), pool_sizes=fixed_pools)[1]
  if fixed.get('model.kernel_sizes') is not None:
    kernels = models.level_shapes(
      ndim=fp.ndim, depth=len(pools), kernel_sizes=fixed['model.kernel_sizes']
    )[0]
  return pools, kernels, depth is not None
