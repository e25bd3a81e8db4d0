r"""The predict command: a trained run applied to an image, a volume or a folder of them.

    python launch.py --mode=predict --workdir=runs/demo --input=scans/ --output=masks/ \
        [--step=best|latest|N] [--overlap=0.5] [--tta] [--save_probabilities] \
        [--postprocessing=postprocessing.json]
    python launch.py --mode=predict --workdir=runs/f0,runs/f1,runs/f2 ...   # an ensemble

Inputs are PNG, TIFF or JPEG images (2D runs) or NIfTI volumes (3D runs); files in
nnU-Net's naming (`<case>_0000.nii.gz`, one per channel) are grouped into one case
each (`inputs.py`). For each case, the output folder gets:

* its mask, class indices, in the input's format and name: PNG for PNG, TIFF for
  TIFF, NIfTI for NIfTI, `<case>.nii.gz` for nnU-Net's naming. A NIfTI mask is
  written on the input's own grid: its orientation, shape, affine and header, so
  it overlays the scan in any viewer. JPEG inputs get PNG masks: JPEG's lossy
  compression would change class indices.
* `overlays/<name>.png`: the image with its mask drawn over it (3D: the middle
  slice along each axis).
* with `--save_probabilities`, `<stem>.npz`: its class probabilities, float16,
  channels last, on the input's grid (NIfTI: in canonical orientation, with the
  file's affine; `write_probabilities`). They are taken before post-processing.

Volumes are read in canonical orientation. When the run trained at a target
spacing (`config.data.target_spacing`, set by the plan), each volume is resampled
to it, predicted, and its class probabilities are resampled back to its own grid
before the argmax (`case_probabilities`, `predict_case`).

Several runs given as `--workdir=A,B,...` (a fold ensemble) are loaded and
checked to share classes, channels, normalisation and dimensionality
(`ensemble.py`); each predicts every case with its own patch and target spacing,
and their probabilities are averaged on the input's grid before the argmax
(`average_probabilities`). With `--postprocessing`, the rules of a
`postprocessing.json` (`postprocessing.py`) are applied to each mask before it
is written; the file is read before the runs are loaded.

Where a `masks/` folder sits beside the input folder (`data/val/images` ->
`data/val/masks`; nnU-Net's `imagesTs` -> `labelsTs`), each prediction is compared
with the mask of the same name, and a per-case table of Dice and IoU per class is
printed and written to `per_case.csv`.

The output folder is checked first, before the runs are loaded: it must not
be a file, nor hold an input (the input folder itself, or the folder of an
input file, compared by real path), as the masks would overwrite the inputs.
Two inputs whose outputs would share a name (`a.png` and `a.jpg`, `a.jpg` and
`a.jpeg`) are refused, naming both: outputs are named `<stem>.<ext>` as
nnU-Net's `<case>.nii.gz`, without the input's extension. Every input is then
checked before anything is predicted (readable, the run's dimensionality and
channel count, no NaN or +-Inf values unless the run's
`config.data.nonfinite` is 'zero', which predicts them as 0, and whether the
resampled volume and its probabilities, an ensemble's average and the saved
copy fit in the host memory available), and one error names every bad file.
Files are written under a temporary name and renamed, so the output folder
never holds a half-written file.

Prefetching (`run(prefetch=True)`, the default; `--noprefetch` turns it off):
each case goes through three stages (`pipelined.run_in_order`): read (the
files, the channel checks, canonical orientation, the resampling to the first
run's target spacing), compute (normalisation, the sliding window of each run)
and write (the probabilities resampled back and averaged, the argmax,
post-processing, the mask, probabilities and overlay files, the per-case row,
the progress line). While case i is computed, case i + 1 is read in one
background thread and case i - 1 written in another; the masks, probabilities,
overlays, the table, the order of the progress lines and the error a bad case
raises (after the cases before it are written) are those of the plain loop, bit
for bit. The memory check counts the two neighbouring cases in flight
(`inputs.check_inputs(prefetch=True)`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Sequence

from absl import logging
import numpy as np

from unet_jax import metrics
from unet_jax import reporting
from unet_jax import visualize
from unet_jax.data import folder as folder_lib
from unet_jax.data import geometry
from unet_jax.inference import ensemble
from unet_jax.inference import inputs
from unet_jax.inference import pipelined
from unet_jax.inference import postprocessing
from unet_jax.inference import predictor as inference


def _atomic(path: str, write) -> str:
  """Calls write(tmp) for a temporary name beside `path`, then renames it to `path`."""
  folder, name = os.path.split(path)
  tmp = os.path.join(
    folder, f'.{name}.partial-{os.getpid()}{inputs.split_extension(name)[1]}'
  )
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_mask(case: inputs.Case, mask: np.ndarray, output: str) -> str:
  """Writes a class map in the input's format (JPEG -> PNG); returns its path.

  NIfTI: `mask` is in canonical orientation (as read); it is written in the
  input's own orientation, shape, affine and header (`geometry.write_like`).
  """
  if case.ext in ('.nii', '.nii.gz'):
    path = os.path.join(output, case.stem + case.ext)
    geometry.write_like(path, mask, reference=case.path)
    return path
  from PIL import Image  # pylint: disable=g-import-not-at-top

  dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
  mask = mask.astype(dtype)
  ext = '.png' if case.ext in ('.jpg', '.jpeg') else case.ext
  fmt = 'PNG' if ext == '.png' else 'TIFF'
  return _atomic(
    os.path.join(output, case.stem + ext),
    lambda tmp: Image.fromarray(mask).save(tmp, format=fmt),
  )


_LABEL_FOLDERS = {'imagesTs': 'labelsTs', 'imagesTr': 'labelsTr'}  # nnU-Net's.


def _masks_beside(input_path: str) -> str | None:
  """`<parent>/masks` beside an input folder, or nnU-Net's labelsTs/labelsTr
  beside imagesTs/imagesTr, if it exists."""
  folder = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
  folder = os.path.abspath(folder)
  name = _LABEL_FOLDERS.get(os.path.basename(folder), 'masks')
  masks = os.path.join(os.path.dirname(folder), name)
  return masks if os.path.isdir(masks) else None


def _reference(case: inputs.Case, masks: str, ndim: int) -> np.ndarray | None:
  for ext in folder_lib.MASK_EXTENSIONS[ndim]:
    path = os.path.join(masks, case.stem + ext)
    if os.path.exists(path):
      return folder_lib.read_mask(path, ndim=ndim)[0]
  return None


def _scores(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
  cm = metrics.confusion_matrices_host(pred[None], label[None], num_classes)[0]
  return list(metrics.dice_per_class(cm)) + list(metrics.iou_per_class(cm))


def _run_grid(predictor: inference.Predictor, spacing) -> tuple[float, ...] | None:
  """The run's target spacing where it resamples an image of `spacing` (3D runs
  with `config.data.target_spacing`, images with a spacing), else None."""
  target = predictor.data.target_spacing
  return tuple(target) if (target and spacing and predictor.ndim == 3) else None


def _back(probs: np.ndarray, target, spacing, shape) -> np.ndarray:
  """Probabilities at `target` (None: on the image's grid already) on the image's grid."""
  if target is None:
    return probs
  return geometry.resample_probabilities(probs, target, spacing, shape=shape)


def case_probabilities(
  predictor: inference.Predictor,
  image: np.ndarray,
  spacing: tuple[float, ...] | None,
  *,
  overlap: float = 0.5,
  tta: bool = False,
) -> np.ndarray:
  """One run's class probabilities of one image [*spatial, C], on the image's grid.

  Softmax over the K classes, or a sigmoid for a one-logit run (K = 1). With a
  target spacing in the run's config (3D), the image is resampled to it,
  predicted, and its probabilities are resampled back to the image's grid
  (linearly), as nnU-Net does.

  Returns:
    float32 [*spatial, K].
  """
  target = _run_grid(predictor, spacing)
  if target is None:
    return predictor.predict(image, overlap=overlap, flip_tta=tta, output='probabilities')
  resampled = geometry.resample_image(image, spacing, target)
  probs = predictor.predict(
    resampled, overlap=overlap, flip_tta=tta, output='probabilities'
  )
  del resampled
  return _back(probs, target, spacing, image.shape[:-1])


def average_probabilities(
  predictors: Sequence[inference.Predictor],
  image: np.ndarray,
  spacing: tuple[float, ...] | None,
  *,
  overlap: float = 0.5,
  tta: bool = False,
) -> np.ndarray:
  """The mean of the runs' `case_probabilities`, on the image's grid.

  The runs are predicted one at a time, each at its own patch and target
  spacing, and added into one float32 buffer: the peak memory is that buffer
  and one run's prediction. One run gives its own probabilities unchanged.
  The runs must share their classes (`ensemble.check_compatible`).

  Returns:
    float32 [*spatial, K].
  """
  if not predictors:
    raise ValueError('average_probabilities needs at least one predictor.')
  total = None
  for predictor in predictors:
    probs = case_probabilities(predictor, image, spacing, overlap=overlap, tta=tta)
    if total is None:
      total = probs
    else:
      total += probs
    del probs
  if len(predictors) > 1:
    total /= len(predictors)
  return total


def labels_of(probs: np.ndarray) -> np.ndarray:
  """Class map int32 [*spatial] of probabilities [*spatial, K]: the argmax, or
  p > 0.5 for one sigmoid channel."""
  if probs.shape[-1] == 1:
    return (probs[..., 0] > 0.5).astype(np.int32)
  return np.argmax(probs, axis=-1).astype(np.int32)


def predict_case(
  predictor: inference.Predictor,
  image: np.ndarray,
  spacing: tuple[float, ...] | None,
  *,
  overlap: float = 0.5,
  tta: bool = False,
) -> np.ndarray:
  """The class map of one image [*spatial, C], on the image's own grid.

  The argmax of `case_probabilities`: the probabilities (not the labels) are
  resampled back from the run's target spacing. For several runs, use
  `labels_of(average_probabilities(...))`.

  Returns:
    int32 [*spatial].
  """
  return labels_of(case_probabilities(predictor, image, spacing, overlap=overlap, tta=tta))


def write_probabilities(case: inputs.Case, probs: np.ndarray, output: str) -> str:
  """Writes a case's probabilities as `<stem>.npz` beside its mask; returns its path.

  The file holds `probabilities`, float16 [*spatial, K], channels last, on the
  input's grid: [H, W, K] for an image; for NIfTI [D, H, W, K] in the canonical
  orientation `read_volume` gives (D, H, W run towards Superior, Anterior,
  Right: RAS+ reversed), not the file's own voxel order. A one-logit (sigmoid)
  run stores two channels, 1 - p and p. `axes` names the axes ('HWK' or 'DHWK');
  a NIfTI input adds `orientation` ('SAR'), `affine` (the input file's own) and
  `canonical_affine` (world mm of voxel (d, h, w) of `probabilities`,
  `geometry.canonical_affine`). `geometry.to_original` maps the array to the
  file's voxel order.
  """
  k = max(probs.shape[-1], 2)
  stored = np.empty(probs.shape[:-1] + (k,), np.float16)
  if probs.shape[-1] == 1:
    stored[..., 0] = 1 - probs[..., 0]
    stored[..., 1] = probs[..., 0]
  else:
    stored[...] = probs
  fields = {'probabilities': stored, 'axes': np.str_('HWK' if probs.ndim == 3 else 'DHWK')}
  if case.ext in ('.nii', '.nii.gz'):
    import nibabel  # pylint: disable=g-import-not-at-top

    header = nibabel.load(case.path)
    affine = np.asarray(header.affine, np.float64)
    fields['orientation'] = np.str_('SAR')
    fields['affine'] = affine
    fields['canonical_affine'] = geometry.canonical_affine(affine, header.shape[:3])
  return _atomic(
    os.path.join(output, case.stem + '.npz'),
    lambda tmp: np.savez_compressed(tmp, **fields),
  )


def _read_case(item, *, predictors, ndim, nonfinite):
  """Read stage: a case's image (`inputs.read_image`: canonical [*spatial, C]),
  its spacing, the first run's target spacing (None: not resampled) and the
  image resampled to it (`geometry.resample_image`)."""
  _, case = item
  image, spacing = inputs.read_image(case, ndim=ndim, nonfinite=nonfinite)
  target = _run_grid(predictors[0], spacing)
  resampled = None if target is None else geometry.resample_image(image, spacing, target)
  return image, spacing, target, resampled


def _compute_case(read, *, predictors, overlap, tta):
  """Device stage: each run's probabilities, as `average_probabilities` takes
  them, in its order. All but the last run's are resampled back and summed here;
  the last run's are returned at its own grid, with its target spacing, for
  `_write_case` to resample back and add."""
  image, spacing, first_target, first_resampled = read
  total = None
  for k, predictor in enumerate(predictors):
    target = _run_grid(predictor, spacing)
    if target is None:
      x = image
    elif target == first_target:
      x = first_resampled
    else:
      x = geometry.resample_image(image, spacing, target)
    probs = predictor.predict(x, overlap=overlap, flip_tta=tta, output='probabilities')
    del x
    if k == len(predictors) - 1:
      return [image, spacing, total, probs, target]  # A list: `_write_case` empties it.
    probs = _back(probs, target, spacing, image.shape[:-1])
    if total is None:
      total = probs
    else:
      total += probs
    del probs


def _write_case(
  item, computed, *, runs, rules, output, save, masks, ndim, classes, progress
):
  """Write stage: the mean probabilities (`average_probabilities`' sums, in
  its order), the mask (and probabilities, overlay); the per-case row; the
  progress line."""
  i, case = item
  image, spacing, total, probs, target = computed
  computed.clear()  # The caller holds the list: so the arrays are freed as they go.
  probs = _back(probs, target, spacing, image.shape[:-1])
  if total is None:
    total = probs
  else:
    total += probs
  del probs
  if runs > 1:
    total /= runs
  pred = labels_of(total)
  if save:
    write_probabilities(case, total, output)
  del total
  if rules is not None:
    pred = np.asarray(postprocessing.apply(pred, rules), np.int32)
  write_mask(case, pred, output)
  _atomic(
    os.path.join(output, 'overlays', case.stem + '.png'),
    lambda tmp: visualize.save_overlay(
      image, pred, tmp, num_classes=classes, title=case.stem
    ),
  )
  row = _row(case, pred, masks=masks, ndim=ndim, num_classes=classes)
  progress(i, case.stem)
  return row


def _stages(
  predictors, count, *, ndim, nonfinite, overlap, tta, rules, output, save, masks
):
  """The read, compute and write stages of `run` (`pipelined.run_in_order`),
  for items (i, case), i from 1 to `count`."""
  started = time.perf_counter()
  classes = max(predictors[0].model.num_classes, 2)
  return dict(
    read=functools.partial(
      _read_case, predictors=predictors, ndim=ndim, nonfinite=nonfinite
    ),
    compute=functools.partial(
      _compute_case, predictors=predictors, overlap=overlap, tta=tta
    ),
    write=functools.partial(
      _write_case,
      runs=len(predictors),
      rules=rules,
      output=output,
      save=save,
      masks=masks,
      ndim=ndim,
      classes=classes,
      progress=lambda i, name: reporting.progress(i, count, started, name),
    ),
  )


def _describe(predictors, workdirs) -> str:
  return ', '.join(
    f'{w} (step {p.step}'
    + (f', at spacing {p.data.target_spacing}' if p.data.target_spacing else '')
    + ')'
    for p, w in zip(predictors, workdirs)
  )


def _row(case, pred, *, masks, ndim, num_classes) -> list[Any] | None:
  """The case's row of the per-case table, if it has a reference mask of its shape."""
  label = _reference(case, masks, ndim) if masks else None
  if label is not None and label.shape == pred.shape:
    return [case.stem] + _scores(pred, label, num_classes)
  if label is not None:
    logging.warning(
      '%s: reference mask shape %s differs from the image %s; skipped in the table.',
      case.path,
      label.shape,
      pred.shape,
    )
  return None


def _checked_cases(predictors, input_path: str, *, save_probabilities, nonfinite, prefetch):
  """The cases of `input_path` (`inputs.list_inputs`), each checked
  (`inputs.check_inputs`) for every run, before any is predicted."""
  first = predictors[0]
  ndim, channels = first.ndim, first.num_channels
  cases = inputs.list_inputs(input_path, ndim=ndim, num_channels=channels)
  inputs.check_inputs(
    cases,
    ndim=ndim,
    num_channels=channels,
    target_spacings=[p.data.target_spacing if ndim == 3 else None for p in predictors],
    num_classes=max(first.model.num_classes, 2),
    save_probabilities=save_probabilities,
    nonfinite=nonfinite,
    prefetch=prefetch,
  )
  return cases


def run(
  workdir: str | Sequence[str],
  input_path: str,
  output: str,
  *,
  step: str | int = 'best',
  overlap: float = 0.5,
  tta: bool = False,
  save_probabilities: bool = False,
  postprocessing_file: str | None = None,
  nonfinite: str | None = None,
  prefetch: bool = True,
) -> list[list[Any]]:
  """Predicts every input; returns the per-case rows (empty without reference masks).

  Args:
    workdir: a run's folder, or several (a list): an ensemble
      (`ensemble.load_runs`), whose probabilities are averaged.
    input_path: a file, or a folder of them.
    output: the output folder.
    step: 'best', 'latest' or a step number, for every run.
    overlap: of the sliding windows.
    tta: average over all axis flips.
    save_probabilities: also write `<stem>.npz` (`write_probabilities`).
    postprocessing_file: a postprocessing.json whose rules are applied to each
      mask before it is written; read before the runs are loaded.
    nonfinite: NaN and +-Inf input values: 'error' names each file holding them
      before anything is predicted; 'zero' predicts them as 0. None: 'zero' if
      every run's `config.data.nonfinite` says so, else 'error'.
    prefetch: read case i + 1 and write case i - 1 in background threads while
      case i is predicted (module docstring); the plain loop's outputs and
      errors. On by default: it was faster in every round on 2 shared cores
      (benchmarks/RESULTS.md, "Prefetching"); `check_inputs` counts its memory.

  Raises:
    ValueError: before the runs are loaded, when `output` is a file or holds
      the inputs (`inputs.check_output`); before anything is predicted, naming
      every input that cannot be predicted (`inputs.list_inputs`,
      `inputs.check_inputs`).
  """
  inputs.check_output(input_path, output)
  rules = postprocessing.read(postprocessing_file) if postprocessing_file else None
  workdirs = [workdir] if isinstance(workdir, str) else list(workdir)
  predictors = ensemble.load_runs(workdirs, step=step)
  if nonfinite is None:
    zero = all(p.data.nonfinite == 'zero' for p in predictors)
    nonfinite = 'zero' if zero else 'error'
  ndim = predictors[0].ndim
  num_classes = max(predictors[0].model.num_classes, 2)
  cases = _checked_cases(
    predictors,
    input_path,
    save_probabilities=save_probabilities,
    nonfinite=nonfinite,
    prefetch=prefetch,
  )
  os.makedirs(os.path.join(output, 'overlays'), exist_ok=True)
  logging.info(
    'Predicting %d input(s) with %s.', len(cases), _describe(predictors, workdirs)
  )
  stages = _stages(
    predictors,
    len(cases),
    ndim=ndim,
    nonfinite=nonfinite,
    overlap=overlap,
    tta=tta,
    rules=rules,
    output=output,
    save=save_probabilities,
    masks=_masks_beside(input_path),
  )
  rows = pipelined.run_in_order(
    list(enumerate(cases, start=1)), **stages, prefetch=prefetch
  )
  rows = [row for row in rows if row]
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
