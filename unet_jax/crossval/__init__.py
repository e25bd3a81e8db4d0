r"""Cross-validation: each fold's validation cases, predicted by the fold's best checkpoint.

    python -m unet_jax.crossval --workdirs=runs/f0,runs/f1,runs/f2,runs/f3,runs/f4 \
        --output=runs/crossval        # or --workdirs='runs/f*'

For each workdir (one fold's run, `runs.py`), the run is loaded at its best
checkpoint and each case of its fold's validation split is predicted from its raw
files, on its own grid (`inference.predict.predict_case`: resampled to the run's
target spacing and the probabilities back), and compared with its raw label at its
own spacing (`scores.py`: Dice, IoU, HD95, NSD, as the evaluators compute them).
Together the folds cover the training set once: each case is predicted by the fold
that did not train on it (a case validated twice is an error; cases no run
validates are a warning, and left out).

Then the post-processing is chosen on all these predictions
(`inference.postprocessing.choose`, nnU-Net's rule) and written to
`<output>/postprocessing.json`; each case's Dice after it is in the table.

Writes `<output>/crossval.csv` (per case and class), `<output>/summary.csv` (mean
± std over cases, per class and for the foreground) and
`<output>/postprocessing.json`, and prints the table (`table.py`). The predictions
are held in host memory (one byte per voxel) until the post-processing is chosen.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import logging
import numpy as np

from unet_jax import reporting
from unet_jax.crossval import runs as runs_lib
from unet_jax.crossval import scores
from unet_jax.crossval import table
from unet_jax.data import folder as folder_lib
from unet_jax.inference import inputs
from unet_jax.inference import postprocessing
from unet_jax.inference import predict

__all__ = ['run']


def _read_case(files, case_id: str, run: runs_lib.Run):
  """(image [*spatial, C], spacing, reference [*spatial], -1 where ignored)."""
  paths, label_path = files[case_id]
  ndim = run.predictor.ndim
  case = inputs.Case(tuple(paths), case_id, inputs.split_extension(paths[0])[1])
  nonfinite = run.predictor.data.nonfinite  # As the run was trained ('zero': as 0).
  image, spacing = inputs.read_image(case, ndim=ndim, nonfinite=nonfinite)
  reference = folder_lib.read_mask(label_path, ndim=ndim)[0]
  ignore = run.predictor.data.ignore_index
  if ignore is not None:
    reference = np.where(reference == ignore, -1, reference)
  if reference.shape != image.shape[:-1]:
    raise ValueError(
      f'{label_path}: shape {reference.shape}, but its image {paths[0]} is'
      f' {image.shape[:-1]}.'
    )
  return image, spacing, reference.astype(np.int16)


def _predict_all(runs, files, owners, *, overlap, tta, tolerance):
  """Predicts and scores every case: (results, predictions, references)."""
  num_classes = runs_lib.num_classes_of(runs[0].predictor)
  dtype = np.uint8 if num_classes <= 256 else np.int32
  results, predictions, references = [], [], []
  started = time.perf_counter()
  for done, (case_id, index) in enumerate(owners.items(), start=1):
    run = runs[index]
    image, spacing, reference = _read_case(files, case_id, run)
    prediction = predict.predict_case(
      run.predictor, image, spacing, overlap=overlap, tta=tta
    ).astype(dtype)
    values = scores.case_metrics(
      prediction,
      reference,
      num_classes=num_classes,
      spacing=spacing,
      tolerance=tolerance,
    )
    results.append(table.CaseResult(case_id, run.workdir, values))
    predictions.append(prediction)
    references.append(reference)
    reporting.progress(done, len(owners), started, case_id)
  return results, predictions, references


def run(
  workdirs: str | Sequence[str],
  output: str,
  *,
  step: str | int = 'best',
  overlap: float = 0.5,
  tta: bool = False,
  tolerance: float = 1.0,
  min_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
  """Runs the cross-validation (module docstring).

  Args:
    workdirs: the folds' runs: a list, or a comma-separated string; globs expand.
    output: the folder the table and postprocessing.json go to.
    step: the checkpoint of each run ('best', 'latest' or a number).
    overlap: the sliding windows' overlap.
    tta: flip test-time augmentation.
    tolerance: the surface Dice tolerance, in the data's physical units (mm).
    min_sizes: the minimum component sizes post-processing tries (None: from the
      data; see `postprocessing.choose`).

  Returns:
    {'rules', 'report' (postprocessing.choose's), 'summary' (summary.csv's rows),
    'rows' (crossval.csv's)}.
  """
  runs, files, owners = runs_lib.load(workdirs, step=step)
  num_classes = runs_lib.num_classes_of(runs[0].predictor)
  logging.info('Cross-validation of %d run(s) over %d case(s).', len(runs), len(owners))
  results, predictions, references = _predict_all(
    runs, files, owners, overlap=overlap, tta=tta, tolerance=tolerance
  )
  rules, report = postprocessing.choose(
    predictions, references, num_classes=num_classes, min_sizes=min_sizes
  )
  os.makedirs(output, exist_ok=True)
  postprocessing.write(os.path.join(output, 'postprocessing.json'), rules, report)
  for result, prediction, reference in zip(results, predictions, references):
    result.values['dice_postprocessed'] = scores.dice(
      postprocessing.apply(prediction, rules), reference, num_classes=num_classes
    )
  classes = list(range(1, num_classes))
  summary = table.write(output, results, classes)
  print(table.format_table(results, classes, summary))
  print(f'Post-processing chosen: {rules}; written to {output}/postprocessing.json.')
  return {
    'rules': rules,
    'report': report,
    'summary': summary,
    'rows': table.rows(results, classes),
  }
