"""Pictures a person would rather look at than read: sample prediction grids."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def middle_slice(array: np.ndarray, spatial_ndim: int) -> np.ndarray:
  """The middle slice along the first spatial axis of a 3D example; 2D unchanged."""
  if spatial_ndim == 3:
    return array[array.shape[0] // 2]
  return array


def _display_image(image: np.ndarray) -> np.ndarray:
  """[H, W, C] float to something imshow takes: grey, or the first three channels."""
  image = np.asarray(image, np.float32)
  if image.shape[-1] >= 3:
    image = image[..., :3]
  else:
    image = image[..., 0]
  lo, hi = np.percentile(image, 1), np.percentile(image, 99)
  return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def save_sample_grid(
  samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
  path: str,
  *,
  title: str = '',
  num_classes: int | None = None,
) -> str:
  """Writes a PNG grid: one row per example, columns image / ground truth / prediction.

  Args:
    samples: (image [*spatial, C], label [*spatial], prediction [*spatial]) triplets,
      2D or 3D (3D shows the middle slice along the first spatial axis, D).
    path: the PNG to write; its folder is created.
    title: a figure title.
    num_classes: fixes the colour scale of masks; by default the largest label seen.

  Returns:
    `path`.
  """
  if not samples:
    raise ValueError('save_sample_grid needs at least one sample.')
  spatial_ndim = np.asarray(samples[0][1]).ndim
  rows = []
  for image, label, pred in samples:
    rows.append(
      (
        _display_image(middle_slice(np.asarray(image), spatial_ndim)),
        middle_slice(np.asarray(label), spatial_ndim),
        middle_slice(np.asarray(pred), spatial_ndim),
      )
    )
  vmax = (
    (num_classes - 1)
    if num_classes
    else max(1, max(int(max(r[1].max(), r[2].max())) for r in rows))
  )
  fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
  for r, (image, label, pred) in enumerate(rows):
    axes[r, 0].imshow(image, cmap='gray')
    axes[r, 1].imshow(label, cmap='viridis', vmin=0, vmax=vmax, interpolation='nearest')
    axes[r, 2].imshow(pred, cmap='viridis', vmin=0, vmax=vmax, interpolation='nearest')
    for ax in axes[r]:
      ax.set_xticks([])
      ax.set_yticks([])
  for ax, name in zip(axes[0], ('image', 'ground truth', 'prediction')):
    ax.set_title(name)
  if spatial_ndim == 3:
    title = f'{title} (middle slice along D)' if title else 'middle slice along D'
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def _blend(image: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
  """RGB [H, W, 3]: the image in grey (or colour) with classes >= 1 tinted over it."""
  shown = _display_image(image)
  rgb = np.repeat(shown[..., None], 3, axis=-1) if shown.ndim == 2 else shown
  colours = plt.get_cmap('tab10')(np.arange(max(num_classes, 2)) % 10)[:, :3]
  tint = colours[np.clip(mask, 0, num_classes - 1)]
  alpha = np.where(mask[..., None] > 0, 0.45, 0.0)
  return (1 - alpha) * rgb + alpha * tint


def save_overlay(
  image: np.ndarray, mask: np.ndarray, path: str, *, num_classes: int, title: str = ''
) -> str:
  """Writes a PNG of an image with its class map drawn over it.

  Args:
    image: [H, W, C] or [D, H, W, C].
    mask: [H, W] or [D, H, W] class indices; 0 (background) is left clear.
    path: the PNG to write (format from the name).
    num_classes: fixes the colour of each class (matplotlib's tab10 cycle).
    title: a figure title.

  Returns:
    `path`. A 3D example shows the middle slice along each axis (D, H, W).
  """
  image, mask = np.asarray(image), np.asarray(mask)
  if mask.ndim == 2:
    panels = [(_blend(image, mask, num_classes), '')]
  else:
    panels = []
    for axis, name in enumerate('DHW'):
      middle = mask.shape[axis] // 2
      panels.append(
        (
          _blend(
            np.take(image, middle, axis=axis), np.take(mask, middle, axis=axis), num_classes
          ),
          f'middle slice along {name}',
        )
      )
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
  for ax, (rgb, name) in zip(axes[0], panels):
    ax.imshow(rgb, interpolation='nearest')
    ax.set_title(name, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80, format='png')
  plt.close(fig)
  return path
