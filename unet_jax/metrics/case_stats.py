"""Statistics over cases on the host: means and spreads that leave out NaN values.

Per-case metrics are NaN where there was nothing to measure (a class absent from
both the prediction and the ground truth), and these reductions skip such cases.
"""

import numpy as np


def nan_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation over axis 0, ignoring NaN (NaN where all are).

  Args:
    values: [cases, ...] float values, NaN where a case has no value.

  Returns:
    `(mean, std)`, each of shape `values.shape[1:]` in float64: the mean and the
    population standard deviation (ddof 0) of the non-NaN values, NaN where all of
    them are NaN.
  """
  values = np.asarray(values, np.float64)
  present = ~np.isnan(values)
  count = present.sum(axis=0)
  total = np.where(present, values, 0).sum(axis=0)
  mean = np.full(values.shape[1:], np.nan)
  np.divide(total, count, out=mean, where=count > 0)
  sq = np.where(present, (values - np.where(np.isnan(mean), 0, mean)) ** 2, 0).sum(axis=0)
  std = np.full(values.shape[1:], np.nan)
  np.divide(sq, count, out=std, where=count > 0)
  return mean, np.sqrt(std)


def mean_over(values) -> float:
  """The mean of the non-NaN values (inf counts); NaN when there are none.

  Args:
    values: float values of any shape.

  Returns:
    A float: the mean of the non-NaN entries; NaN if there are none.
  """
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float('nan')
