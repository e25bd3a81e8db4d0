"""Brain-like phantoms defined in millimetres, written as an nnU-Net v2 data set.

    root = write_nnunet_dataset('/tmp/Dataset001_Phantom', num_training=8,
                                num_test=2, size=48.0, seed=0)

Each case is one anatomy drawn in world space: a head (class 0 outside the
brain), a folded cortex shell (class 1, "grey matter") around an inner
ellipsoid (class 2, "white matter"), with a random centre, size and tilt. It is
then sampled on the case's voxel grid: cases alternate between the spacings of
`spacings` ((D, H, W) in mm), so the same anatomy appears at different scales
in voxels, as in a data set pooled from several scanners. Two channels ('T1',
'T2') give the classes different contrasts, plus a smooth bias field and
noise.

The layout is nnU-Net v2's raw format (`documentation/dataset_format.md`):
`dataset.json`, `imagesTr/<case>_0000.nii.gz` and `_0001`, `labelsTr/<case>.nii.gz`,
`imagesTs/` and, for scoring, `labelsTs/`. With `permute_test`, the first
test case is stored with its axes in another order and one axis flipped (the
affine says so), so a reader that ignores the affine sees a different volume.

Used by the tests and by `benchmarks/resampling.py`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import ndimage

CHANNEL_NAMES = ('T1', 'T2')
LABELS = {'background': 0, 'grey_matter': 1, 'white_matter': 2}
_CONTRAST = {'T1': (0.2, 0.6, 1.0), 'T2': (0.3, 1.0, 0.55)}  # Outside, grey, white.


def _world_grid(shape, spacing) -> list[np.ndarray]:
  """Voxel centres in mm from the volume's centre, per (D, H, W) axis."""
  axes = [(np.arange(n) + 0.5) * s - n * s / 2 for n, s in zip(shape, spacing)]
  return np.meshgrid(*axes, indexing='ij', sparse=True)


def phantom(
  rng: np.random.Generator, *, spacing, size: float = 48.0, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
  """One case at `spacing` (D, H, W): image float32 [D, H, W, 2], label uint8.

  The field of view is a cube of `size` mm; the anatomy scales with it.
  """
  shape = tuple(max(int(round(size / s)), 1) for s in spacing)
  z, y, x = _world_grid(shape, spacing)
  centre = rng.uniform(-0.05, 0.05, 3) * size
  radii = size * np.array([0.36, 0.40, 0.34]) * rng.uniform(0.9, 1.1, 3)
  tilt = rng.uniform(-0.3, 0.3)
  zz = z - centre[0]
  yy = (y - centre[1]) * np.cos(tilt) - (x - centre[2]) * np.sin(tilt)
  xx = (y - centre[1]) * np.sin(tilt) + (x - centre[2]) * np.cos(tilt)
  r = np.sqrt((zz / radii[0]) ** 2 + (yy / radii[1]) ** 2 + (xx / radii[2]) ** 2)
  angle = np.arctan2(yy, xx) * rng.integers(5, 9)
  folds = 0.06 * np.sin(angle + rng.uniform(0, 2 * np.pi)) * np.cos(3 * zz / size)
  label = np.zeros(shape, np.uint8)
  label[r < 1.0 + folds] = LABELS['grey_matter']
  label[r < 0.72 + folds] = LABELS['white_matter']
  bias = 1 + 0.15 * np.cos(zz / size * 2 + rng.uniform(0, 6)) * np.sin(yy / size * 2)
  channels = []
  for name in CHANNEL_NAMES:
    levels = np.asarray(_CONTRAST[name], np.float32)[label]
    levels = ndimage.gaussian_filter(levels, 0.5) * bias
    channels.append(levels + rng.normal(0, noise, shape))
  return np.stack(channels, axis=-1).astype(np.float32), label


def _store(array: np.ndarray, spacing, *, permute: bool):
  """(array in file order, affine) of a canonical [D, H, W, ...] array.

  Normally the file holds (x, y, z) = (W, H, D) with a diagonal affine; with
  `permute`, it holds (y, z, x) with x flipped, and an affine that says so.
  """
  data = np.swapaxes(array, 0, 2)  # (x, y, z, ...).
  affine = np.diag(list(reversed(spacing)) + [1.0])
  affine[:3, 3] = [-n * s / 2 for n, s in zip(data.shape[:3], reversed(spacing))]
  if not permute:
    return data, affine
  order = (1, 2, 0)
  data = np.moveaxis(data, order, (0, 1, 2))
  affine = affine[:, list(order) + [3]]
  n = data.shape[2]
  data = np.flip(data, axis=2)
  affine[:3, 3] += affine[:3, 2] * (n - 1)
  affine[:3, 2] *= -1
  return np.ascontiguousarray(data), affine


def _save(path: str, array: np.ndarray, affine: np.ndarray) -> None:
  import nibabel  # pylint: disable=g-import-not-at-top

  nibabel.save(nibabel.Nifti1Image(array, affine), path)


def write_case(folder_images, folder_labels, case_id, image, label, spacing, *, permute):
  """Writes one case in nnU-Net's naming: a file per channel, and its label."""
  for c in range(image.shape[-1]):
    data, affine = _store(image[..., c], spacing, permute=permute)
    _save(os.path.join(folder_images, f'{case_id}_{c:04d}.nii.gz'), data, affine)
  if folder_labels is not None:
    data, affine = _store(label, spacing, permute=permute)
    _save(os.path.join(folder_labels, f'{case_id}.nii.gz'), data, affine)


def write_nnunet_dataset(
  root: str,
  *,
  num_training: int = 8,
  num_test: int = 2,
  spacings=((2.0, 2.0, 2.0), (4.0, 1.5, 1.5)),
  size: float = 48.0,
  seed: int = 0,
  permute_test: bool = True,
) -> str:
  """Writes phantoms as an nnU-Net v2 raw data set at `root`; returns `root`.

  Case i uses `spacings[i % len(spacings)]`. Test cases get labels in
  `labelsTs/` (nnU-Net's layout has none; the predict command scores against
  them when present).
  """
  rng = np.random.default_rng(seed)
  folders = {
    name: os.path.join(root, name)
    for name in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs')
  }
  for folder in folders.values():
    os.makedirs(folder, exist_ok=True)
  for split, count in (('Tr', num_training), ('Ts', num_test)):
    for i in range(count):
      spacing = tuple(float(s) for s in spacings[i % len(spacings)])
      image, label = phantom(rng, spacing=spacing, size=size)
      case_id = f'phantom_{split.lower()}{i:03d}'
      permute = permute_test and split == 'Ts' and i == 0
      write_case(
        folders[f'images{split}'],
        folders[f'labels{split}'],
        case_id,
        image,
        label,
        spacing,
        permute=permute,
      )
  dataset = {
    'channel_names': {str(i): name for i, name in enumerate(CHANNEL_NAMES)},
    'labels': dict(LABELS),
    'numTraining': num_training,
    'file_ending': '.nii.gz',
  }
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(dataset, f, indent=1)
  return root
