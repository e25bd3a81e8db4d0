"""Several trained runs as one predictor: loaded, checked, their probabilities averaged.

    predictors = load_runs(['runs/f0', 'runs/f1'], step='best')
    probs = predict.average_probabilities(predictors, image, spacing)

An ensemble (nnU-Net's fold ensemble) averages the class probabilities of its
runs (softmax; sigmoid for a one-logit binary run), then takes the argmax. The
runs must agree on what the average is over and what they are given: the
classes (the model's output channels), the input channels, the normalisation
modes and the dimensionality (`SHARED`); `check_compatible` names the runs and
every field that differs. Anything else may differ: each run predicts with its
own patch, at its own target spacing and with its own intensity statistics
(the `intensity_*` values of a 'ct' or 'rescale' normalisation, which each run
applies to its own copy of the input), and its probabilities are resampled back
to the input's grid before they are averaged (`predict.average_probabilities`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from unet_jax.inference import predictor as inference

# What the runs of an ensemble must share, and how to read it from a predictor.
SHARED: dict[str, Callable[[inference.Predictor], Any]] = {
  'classes': lambda p: p.model.num_classes,
  'channels': lambda p: p.num_channels,
  'normalisation': lambda p: ','.join(p.data.normalization_modes()),
  'dimensionality': lambda p: f'{p.ndim}D',
}


def check_compatible(
  predictors: Sequence[inference.Predictor], workdirs: Sequence[str]
) -> None:
  """Raises one ValueError naming the runs and every `SHARED` field that differs.

  Args:
    predictors: the loaded runs.
    workdirs: their folders, in the same order (the names the error uses).
  """
  if len(predictors) != len(workdirs):
    raise ValueError(f'{len(predictors)} predictors for {len(workdirs)} workdirs.')
  differences = []
  for field, value_of in SHARED.items():
    runs_by_value: dict[Any, list[str]] = {}
    for predictor, workdir in zip(predictors, workdirs):
      runs_by_value.setdefault(value_of(predictor), []).append(workdir)
    if len(runs_by_value) > 1:
      differences.append(
        f'{field}: ' + '; '.join(f'{v} in {", ".join(w)}' for v, w in runs_by_value.items())
      )
  if differences:
    raise ValueError(
      f"The runs {', '.join(workdirs)} cannot be averaged: an ensemble's runs must"
      f' share {", ".join(SHARED)}, and they differ in\n  ' + '\n  '.join(differences)
    )


def load_runs(
  workdirs: Sequence[str], *, step: str | int = 'best'
) -> list[inference.Predictor]:
  """Loads every run (`predictor.load`) and checks that they can be averaged.

  Args:
    workdirs: one or more run folders; the same folder twice is allowed (it
      averages to itself).
    step: 'best', 'latest' or a step number, for every run.

  Returns:
    One `Predictor` per workdir, in order.

  Raises:
    ValueError: for no or an empty workdir, and from `check_compatible`.
    FileNotFoundError: from `predictor.load`, naming the path.
  """
  workdirs = list(workdirs)
  if not workdirs or not all(workdirs):
    raise ValueError(
      f'--workdir {",".join(workdirs)!r}: give one run folder, or several separated'
      ' by commas (no empty entry).'
    )
  predictors = [inference.load(w, step=step) for w in workdirs]
  check_compatible(predictors, workdirs)
  return predictors
