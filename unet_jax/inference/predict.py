r"""The predict command: a trained run applied to an image, a volume or a folder of them.

    python launch.py --mode=predict --workdir=runs/demo --input=scans/ --output=masks/ \
        [--step=best|latest|N] [--overlap=0.5] [--tta]

Inputs are PNG, TIFF or JPEG images (2D runs) or NIfTI volumes (3D runs). For each,
the output folder gets:

* its mask, class indices, in the input's format and name: PNG for PNG, TIFF for
  TIFF, NIfTI for NIfTI (with the input's affine and header, so it overlays the
  scan in any viewer). JPEG inputs get PNG masks: JPEG's lossy compression would
  change class indices.
* `overlays/<name>.png`: the image with its mask drawn over it (3D: the middle
  slice along each axis).

Where a `masks/` folder sits beside the input folder (`data/val/images` ->
`data/val/masks`), each prediction is compared with the mask of the same name,
and a per-case table of Dice and IoU per class is printed and written to
`per_case.csv`.

Every input is checked before anything is predicted (readable, the run's
dimensionality and channel count), and one error names every bad file. Files
are written under a temporary name and renamed, so the output folder never
holds a half-written file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from absl import logging
import numpy as np

from unet_jax import metrics
from unet_jax import reporting
from unet_jax import visualize
from unet_jax.data import folder as folder_lib
from unet_jax.inference import predictor as inference

EXTENSIONS = {2: ('.png', '.tif', '.tiff', '.jpg', '.jpeg'), 3: ('.nii', '.nii.gz')}
_MODE_CHANNELS = {
  '1': 1,
  'L': 1,
  'LA': 1,
  'I': 1,
  'F': 1,
  'I;16': 1,
  'I;16B': 1,
  'I;16L': 1,
  'RGB': 3,
  'P': 3,
  'RGBA': 3,
  'CMYK': 3,
  'YCbCr': 3,
  'LAB': 3,
  'HSV': 3,
}  # What segmentation_folder.read_image gives.


@dataclasses.dataclass(frozen=True)
class Case:
  """One input file and what it is named as."""

  path: str
  stem: str
  ext: str


def _split(name: str) -> tuple[str, str]:
  if name.lower().endswith('.nii.gz'):
    return name[:-7], '.nii.gz'
  stem, ext = os.path.splitext(name)
  return stem, ext.lower()


def list_inputs(path: str, *, ndim: int) -> list[Case]:
  """The files to predict: `path` itself, or every image of the folder `path`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'--input {path!r} does not exist.')
  names = (
    [os.path.basename(path)]
    if os.path.isfile(path)
    else sorted(n for n in os.listdir(path) if not n.startswith('.'))
  )
  folder = os.path.dirname(path) if os.path.isfile(path) else path
  cases, wrong, other = [], [], []
  for name in names:
    stem, ext = _split(name)
    full = os.path.join(folder, name)
    if ext in EXTENSIONS[ndim] and os.path.isfile(full):
      cases.append(Case(full, stem, ext))
    elif ext in EXTENSIONS[5 - ndim] or os.path.isfile(path):
      wrong.append(
        f'{full}: a {5 - ndim}D input ({ext or "no extension"}), but this run'
        f' is {ndim}D and takes {list(EXTENSIONS[ndim])}.'
      )
    else:
      other.append(full)
  if wrong:
    raise ValueError('\n'.join(wrong))
  if not cases:
    raise ValueError(f'{path}: no {list(EXTENSIONS[ndim])} files to predict.')
  for full in other:
    logging.warning('Skipping %s: not an image or volume.', full)
  return cases


def _probe(case: Case, ndim: int) -> tuple[tuple[int, ...], int]:
  """(spatial shape, channels) from the file's header, without reading its pixels."""
  if ndim == 2:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(case.path) as im:
      if getattr(im, 'n_frames', 1) > 1:
        raise ValueError('a multi-page image (a volume), but this run is 2D')
      if im.mode not in _MODE_CHANNELS:
        raise ValueError(f'image mode {im.mode} is not supported')
      return (im.size[1], im.size[0]), _MODE_CHANNELS[im.mode]
  import nibabel  # pylint: disable=g-import-not-at-top

  shape = nibabel.load(case.path).shape
  if len(shape) not in (3, 4):
    raise ValueError(f'a {len(shape)}D array {shape}, but this run takes 3D volumes')
  return tuple(reversed(shape[:3])), shape[3] if len(shape) == 4 else 1


def check_inputs(cases: list[Case], predictor: inference.Predictor) -> None:
  """Raises one ValueError naming every file the run cannot predict."""
  errors = []
  for case in cases:
    try:
      _, channels = _probe(case, predictor.ndim)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f'{case.path}: unreadable or not a {predictor.ndim}D input ({e}).')
      continue
    if channels != predictor.num_channels:
      errors.append(
        f'{case.path}: {channels} channel(s), but the model takes {predictor.num_channels}.'
      )
  if errors:
    raise ValueError(
      f'{len(errors)} input(s) cannot be predicted:\n  ' + '\n  '.join(errors)
    )


def _atomic(path: str, write) -> str:
  """Calls write(tmp) for a temporary name beside `path`, then renames it to `path`."""
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f'.{name}.partial-{os.getpid()}{_split(name)[1]}')
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_mask(case: Case, mask: np.ndarray, output: str) -> str:
  """Writes a class map in the input's format (JPEG -> PNG); returns its path."""
  dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
  mask = mask.astype(dtype)
  if case.ext in ('.nii', '.nii.gz'):
    import nibabel  # pylint: disable=g-import-not-at-top

    source = nibabel.load(case.path)
    header = source.header.copy()
    header.set_data_dtype(dtype)
    volume = nibabel.Nifti1Image(mask.transpose(2, 1, 0), source.affine, header)
    volume.header.set_slope_inter(1, 0)
    return _atomic(
      os.path.join(output, case.stem + case.ext), lambda tmp: nibabel.save(volume, tmp)
    )
  from PIL import Image  # pylint: disable=g-import-not-at-top

  ext = '.png' if case.ext in ('.jpg', '.jpeg') else case.ext
  fmt = 'PNG' if ext == '.png' else 'TIFF'
  return _atomic(
    os.path.join(output, case.stem + ext),
    lambda tmp: Image.fromarray(mask).save(tmp, format=fmt),
  )


def _masks_beside(input_path: str) -> str | None:
  folder = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
  masks = os.path.join(os.path.dirname(os.path.abspath(folder)), 'masks')
  return masks if os.path.isdir(masks) else None


def _reference(case: Case, masks: str, ndim: int) -> np.ndarray | None:
  for ext in folder_lib.MASK_EXTENSIONS[ndim]:
    path = os.path.join(masks, case.stem + ext)
    if os.path.exists(path):
      return folder_lib.read_mask(path, ndim=ndim)[0]
  return None


def _scores(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
  cm = metrics.confusion_matrices_host(pred[None], label[None], num_classes)[0]
  return list(metrics.dice_per_class(cm)) + list(metrics.iou_per_class(cm))


def _progress(done: int, total: int, started: float, name: str) -> None:
  elapsed = time.perf_counter() - started
  eta = elapsed / done * (total - done)
  bar = '#' * (20 * done // total)
  print(
    f'\r[{bar:<20}] {done}/{total}  ETA {reporting.format_time(eta)}  {name[:40]:<40}',
    end='' if done < total else '\n',
    file=sys.stderr,
    flush=True,
  )


def run(
  workdir: str,
  input_path: str,
  output: str,
  *,
  step: str | int = 'best',
  overlap: float = 0.5,
  tta: bool = False,
) -> list[list[Any]]:
  """Predicts every input; returns the per-case rows (empty without reference masks)."""
  predictor = inference.load(workdir, step=step)
  cases = list_inputs(input_path, ndim=predictor.ndim)
  check_inputs(cases, predictor)
  os.makedirs(os.path.join(output, 'overlays'), exist_ok=True)
  masks = _masks_beside(input_path)
  num_classes = max(predictor.model.num_classes, 2)
  logging.info(
    'Predicting %d input(s) with %s at step %d.', len(cases), workdir, predictor.step
  )
  rows, started = [], time.perf_counter()
  for i, case in enumerate(cases, start=1):
    image, _ = folder_lib.read_image(case.path, ndim=predictor.ndim)
    pred = predictor.classes(predictor.predict(image, overlap=overlap, flip_tta=tta))
    write_mask(case, pred, output)
    _atomic(
      os.path.join(output, 'overlays', case.stem + '.png'),
      lambda tmp, image=image, pred=pred: visualize.save_overlay(
        image, pred, tmp, num_classes=num_classes, title=case.stem
      ),
    )
    label = _reference(case, masks, predictor.ndim) if masks else None
    if label is not None and label.shape == pred.shape:
      rows.append([case.stem] + _scores(pred, label, num_classes))
    elif label is not None:
      logging.warning(
        '%s: reference mask shape %s differs from the image %s; skipped in the table.',
        case.path,
        label.shape,
        pred.shape,
      )
    _progress(i, len(cases), started, case.stem)
  if rows:
    _write_table(rows, num_classes, output)
  return rows


def _write_table(rows: list[list[Any]], num_classes: int, output: str) -> None:
  header = (
    ['case']
    + [f'dice_{c}' for c in range(num_classes)]
    + [f'iou_{c}' for c in range(num_classes)]
  )
  values = np.asarray([r[1:] for r in rows], np.float64)
  mean = ['mean'] + metrics.nan_stats(values)[0].tolist()
  reporting.write_csv(os.path.join(output, 'per_case.csv'), header, rows + [mean])
  width = max(len(str(r[0])) for r in rows + [mean])
  print(f'{"case":<{width}}  ' + '  '.join(f'{h:>7}' for h in header[1:]))
  for row in rows + [mean]:
    print(f'{row[0]:<{width}}  ' + '  '.join(f'{v:7.4f}' for v in row[1:]))
