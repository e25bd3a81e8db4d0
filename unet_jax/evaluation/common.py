"""What every evaluator shares: its inputs, the prediction pass, and CSV output."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from unet_jax import distributed
from unet_jax.data import pipeline as input_pipeline
from unet_jax.inference import sliding_window

_ID_BYTES = 256  # Case names travel between processes as fixed-width bytes.


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What an evaluator is built with.

  Attributes:
    name: the evaluator's name in `config.evals`; prefixes its metrics.
    data: the opened data set.
    predict: (state, images [b, *spatial, C]) -> class maps [b, *spatial] of
      this process's rows (`Runner.predict`).
    num_classes: classes counted by the metrics (2 for a one-logit binary model).
    workdir: where CSV files and pictures go; None writes nothing.
    split: the split to evaluate.
    batch_size: the global evaluation batch.
    logits: (state, images) -> logits of this process's rows (`Runner.logits`),
      for sliding windows.
    patch_size: predict examples larger than this patch by sliding windows
      (Gaussian-weighted, `sliding_window.sliding_window_predict`); None: whole.
    overlap: the windows' overlap, in [0, 1).
    divisor: what the model's input sizes must be multiples of, per axis.
  """

  name: str
  data: input_pipeline.Dataset
  predict: Callable[[Any, np.ndarray], np.ndarray]
  num_classes: int
  workdir: str | None
  split: str
  batch_size: int
  logits: Callable[[Any, np.ndarray], np.ndarray] | None = None
  patch_size: tuple[int, ...] | None = None
  overlap: float = 0.5
  divisor: tuple[int, ...] | int = 1


def step_of(state: Any) -> int:
  """The step a (replicated or per-device) train state is at."""
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def _classes(logits: np.ndarray) -> np.ndarray:
  """Class maps from logits, as the model's predict step makes them."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(np.int32)
  return np.argmax(logits, axis=-1).astype(np.int32)


def predictions(inputs: Inputs, state: Any) -> Iterator[tuple[dict, np.ndarray]]:
  """One pass over the split: (batch, predicted class maps) for this process's rows.

  Examples larger than `inputs.patch_size` are predicted by sliding windows,
  one example at a time, each window batch on all devices. Padding examples
  (batch['mask'] == 0) are included, so that every process makes the same
  device calls; leave them out with `real_rows`.
  """
  patch = inputs.patch_size
  for batch in inputs.data.eval_iterator(inputs.split, batch_size=inputs.batch_size):
    images = batch['image']
    if patch is None or all(s <= p for s, p in zip(images.shape[1:-1], patch)):
      yield batch, inputs.predict(state, images)
      continue
    apply = functools.partial(inputs.logits, state)
    logits = [
      sliding_window.sliding_window_predict(
        apply,
        image,
        patch_size=patch,
        overlap=inputs.overlap,
        divisor=inputs.divisor,
        batch_size=len(images),
        jit_apply=False,
      )
      for image in images
    ]
    yield batch, _classes(np.stack(logits))


def real_rows(batch: dict) -> np.ndarray:
  """Indices of the real (not padding) examples of an eval batch."""
  return np.flatnonzero(batch['mask'] > 0)


def gather_cases(
  index: np.ndarray, ids: Sequence[str], values: np.ndarray
) -> tuple[list[str], np.ndarray]:
  """Per-case rows of all processes, ordered by their index in the split.

  Args:
    index: [n] int, each case's index in the split (this process's cases).
    ids: n case names.
    values: [n, ...] float per-case values.

  Returns:
    (case names, values) of every process's cases, sorted by index.
  """
  encoded = np.zeros((len(ids), _ID_BYTES), np.uint8)
  for i, name in enumerate(ids):
    raw = name.encode('utf-8')[:_ID_BYTES]
    encoded[i, : len(raw)] = np.frombuffer(raw, np.uint8)
  index = distributed.gather_over_processes(np.asarray(index, np.int64))
  encoded = distributed.gather_over_processes(encoded)
  values = distributed.gather_over_processes(np.asarray(values, np.float64))
  order = np.argsort(index, kind='stable')
  names = [bytes(encoded[i]).rstrip(b'\0').decode('utf-8', 'replace') for i in order]
  return names, values[order]
