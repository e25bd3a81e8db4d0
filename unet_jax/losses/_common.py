"""What every loss shares: option and input checks, targets from labels, reductions.

The conventions these implement are documented once, in the package docstring
(`unet_jax.losses`).
"""

from collections.abc import Callable
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ('mean', 'sum', 'none')
ACTIVATIONS = ('softmax', 'sigmoid')


def check_options(
  *,
  reduction: str,
  activation: str | None = None,
  batch: bool = False,
) -> None:
  """A ValueError for an unknown option, or `batch=True` with `reduction='none'`."""
  if reduction not in REDUCTIONS:
    raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}.')
  if activation is not None and activation not in ACTIVATIONS:
    raise ValueError(f'activation must be one of {ACTIVATIONS}, got {activation!r}.')
  if batch and reduction == 'none':
    raise ValueError(
      "reduction='none' gives one value per example, which batch=True does "
      "not have; use reduction='mean' or batch=False."
    )


def is_traced(value) -> bool:
  """Whether any array in `value` is a tracer (under `jax.jit`, `grad`, `vmap`).

  A tracer's values are not known when the loss is traced, so value checks skip it.
  """
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def _check_range(name: str, value, *, high: float | None) -> None:
  if value is None or is_traced(value):
    return
  try:
    array = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise ValueError(
      f'{name} must be a number or an array of them, got {value!r}.'
    ) from None
  if np.all(
    np.isfinite(array) & (array >= 0) & (array <= (np.inf if high is None else high))
  ):
    return
  shown = array.item() if array.ndim == 0 else array.tolist()
  bound = '>= 0' if high is None else f'in [0, {high:g}]'
  raise ValueError(f'{name} must be finite and {bound}, got {shown}.')


def check_nonnegative(**options) -> None:
  """A ValueError naming the first option that is not finite and >= 0.

  Each option is a number or an array of them (`class_weights`). None and
  traced values (options passed as arguments of a jitted function) are not
  checked: their values are not known at trace time.
  """
  for name, value in options.items():
    _check_range(name, value, high=None)


def check_unit_interval(**options) -> None:
  """As `check_nonnegative`, for options in [0, 1] (`label_smoothing`)."""
  for name, value in options.items():
    _check_range(name, value, high=1.0)


def check_target_values(labels: jax.Array) -> None:
  """A ValueError for a float target with values outside [0, 1] (or not finite).

  Checked on the host, for concrete arrays only (eager calls): under `jax.jit`
  the values are not known at trace time, and a check inside the computation
  would cost every step (`checkify`, a host callback), so traced targets are not
  checked. An array spread over several processes is not checked either.
  """
  if is_traced(labels) or not labels.is_fully_addressable or not labels.size:
    return
  values = np.asarray(labels, np.float32)
  finite = np.isfinite(values)
  if np.all(finite) and values.min() >= 0 and values.max() <= 1:
    return
  found = (
    f'min {values[finite].min():g}, max {values[finite].max():g}' if finite.any() else ''
  )
  if not finite.all():
    found += f'{", " if found else ""}{np.count_nonzero(~finite)} non-finite'
  raise ValueError(
    f'float labels are a one-hot or soft target (probabilities): every value must be'
    f' finite and in [0, 1], got {found} (shape {labels.shape}). For class indices'
    ' pass an integer class map of shape logits.shape[:-1].'
  )


def empty_batch_gives_zero(loss_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`loss_fn`, giving zeros and a zero gradient for an empty batch (N = 0).

  The loss is computed as usual first, so every input and option is checked;
  for N = 0 (a static shape) its value, NaN for a mean over no examples, is
  replaced by zeros of the same shape that do not depend on the inputs. Under
  `jax.jit` the unused computation is dropped.
  """

  @functools.wraps(loss_fn)
  def wrapped(logits, labels, **options):
    loss = loss_fn(logits, labels, **options)
    if jnp.shape(logits)[0] == 0:
      return jnp.zeros_like(loss)
    return loss

  return wrapped


def is_class_map(logits: jax.Array, labels: jax.Array) -> bool:
  """Whether `labels` is a class map [N, *spatial] rather than a target like `logits`."""
  return labels.ndim == logits.ndim - 1


def check_inputs(
  logits: jax.Array,
  labels: jax.Array,
  *,
  activation: str,
  ignore_index: int | None,
) -> None:
  """Trace-time checks of shapes and dtypes; raises ValueError."""
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  try:
    chex.assert_type(logits, float)
  except AssertionError as e:
    raise ValueError(f'logits must be floating point, got {logits.dtype}.') from e
  if logits.ndim < 3:
    raise ValueError(
      'logits must be [N, *spatial, C] with at least one spatial axis, got '
      f'shape {logits.shape}.'
    )
  try:
    if is_class_map(logits, labels):
      chex.assert_shape(labels, logits.shape[:-1])
      if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
        raise AssertionError('a class map must have an integer dtype')
    else:
      chex.assert_equal_shape([logits, labels])
      chex.assert_type(labels, float)
  except AssertionError as e:
    raise ValueError(
      f'labels must be an integer class map of shape {logits.shape[:-1]} or '
      f'a float target of shape {logits.shape}; got {labels.dtype} '
      f'{labels.shape}.'
    ) from e
  if not is_class_map(logits, labels):
    check_target_values(labels)
  if ignore_index is not None and not is_class_map(logits, labels):
    raise ValueError(
      'ignore_index needs an integer class map of shape '
      f'{logits.shape[:-1]}; got float labels of shape {labels.shape}.'
    )
  if activation == 'softmax' and logits.shape[-1] < 2:
    raise ValueError(
      'A softmax over a single channel is constant. For binary segmentation '
      "with one logit use activation='sigmoid' (or a sigmoid-based loss); "
      'otherwise give the model C >= 2 output channels.'
    )


def upcast(logits: jax.Array) -> jax.Array:
  logits = jnp.asarray(logits)
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def targets_and_mask(
  logits: jax.Array,
  labels: jax.Array,
  *,
  activation: str,
  ignore_index: int | None,
) -> tuple[jax.Array, jax.Array]:
  """Float targets [N, *spatial, C] and a validity mask [N, *spatial, 1].

  Ignored pixels have an all-zero target and a zero mask.
  """
  num_classes = logits.shape[-1]
  dtype = logits.dtype
  labels = jnp.asarray(labels)
  if not is_class_map(logits, labels):
    mask = jnp.ones(logits.shape[:-1] + (1,), dtype)
    return labels.astype(dtype), mask
  labels = labels.astype(jnp.int32)
  if ignore_index is None:
    valid = jnp.ones(labels.shape, jnp.bool_)
  else:
    valid = labels != ignore_index
    # Mask first, so an ignored value >= C is never one-hot encoded.
    labels = jnp.where(valid, labels, 0)
  mask = valid[..., None].astype(dtype)
  if activation == 'sigmoid' and num_classes == 1:
    targets = (labels == 1)[..., None].astype(dtype)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  return targets * mask, mask


def probabilities(logits: jax.Array, activation: str) -> jax.Array:
  if activation == 'softmax':
    return jax.nn.softmax(logits, axis=-1)
  return jax.nn.sigmoid(logits)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 where the denominator is 0."""
  positive = denominator > 0
  safe = jnp.where(positive, denominator, 1.0)
  return jnp.where(positive, numerator / safe, 0.0)


def reduce_pixels(
  weighted_losses: jax.Array, weights: jax.Array, reduction: str
) -> jax.Array:
  """Reduces weighted per-pixel (or per-element) losses, [N, ...]."""
  axes = tuple(range(1, weighted_losses.ndim))
  numerators = jnp.sum(weighted_losses, axis=axes)
  denominators = jnp.sum(weights, axis=axes)
  if reduction == 'mean':
    return safe_divide(jnp.sum(numerators), jnp.sum(denominators))
  per_example = safe_divide(numerators, denominators)
  if reduction == 'sum':
    return jnp.sum(per_example)
  return per_example


def reduce_examples(per_example: jax.Array, reduction: str) -> jax.Array:
  """Reduces per-example losses [N] (or one batch-level scalar)."""
  if per_example.ndim == 0 or reduction == 'none':
    return per_example
  if reduction == 'mean':
    return jnp.mean(per_example)
  return jnp.sum(per_example)
