"""A trained U-Net as one self-contained file: StableHLO via `jax.export`.

`export_predict_fn` serialises the inference function, images -> logits, with the
model in eval mode (BatchNorm uses its running statistics, dropout is off) and the
trained variables baked into the module as constants. The file therefore holds
everything needed to predict, about the size of the float32 parameters; the batch
dimension is symbolic, the spatial shape and the number of channels are fixed.

Loading needs JAX and nothing else: not this package, not Flax.

    import jax
    exported = jax.export.deserialize(open('model.jax', 'rb').read())
    logits = exported.call(images)     # float32 [b, *spatial_shape, num_channels]

`load_exported` does the same and checks the images' shape first, with a clear error.
The module is lowered for CPU, CUDA and TPU by default (`platforms`), so a file
written on a CPU machine runs on an accelerator. Each new batch size compiles once
on first use; tracing and lowering are never repeated.

Reference: JAX documentation, "Exporting and serializing staged-out computations"
(jax.export) and "Shape polymorphism".
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def export_predict_fn(
  model,
  variables: Any,
  *,
  spatial_shape: Sequence[int],
  num_channels: int,
  platforms: Sequence[str] | None = DEFAULT_PLATFORMS,
) -> bytes:
  """Serialises `images -> model.apply(variables, images, train=False)`.

  Args:
    model: a `unet_jax.models.UNet` (any Flax module whose `apply(variables, x,
      train=False)` returns logits, or `(logits, aux)` with deep supervision: only
      the logits are exported).
    variables: `{'params': ..., 'batch_stats': ...}`, baked in as constants.
    spatial_shape: (H, W) or (D, H, W) of the images the function takes; every size
      a multiple of the network's divisor (`models.input_divisor`).
    num_channels: channels of the input images (C).
    platforms: the platforms to lower for ('cpu', 'cuda', 'rocm', 'tpu'), or None
      for the current backend only.

  Returns:
    The serialised `jax.export.Exported`: a function of one float32 array
    `[b, *spatial_shape, num_channels]`, any b >= 1, returning float32 logits
    `[b, *spatial_shape, K]`.
  """
  spatial_shape = tuple(spatial_shape)
  if len(spatial_shape) not in (2, 3) or not all(
    isinstance(s, (int, np.integer)) and s > 0 for s in spatial_shape
  ):
    raise ValueError(
      f'spatial_shape={spatial_shape} must be 2 (H, W) or 3 (D, H, W) positive ints.'
    )
  if not isinstance(num_channels, (int, np.integer)) or num_channels < 1:
    raise ValueError(f'num_channels={num_channels!r} must be a positive integer.')
  if not isinstance(variables, dict) or 'params' not in variables:
    raise ValueError(
      "variables must be a dict with 'params' (and 'batch_stats' for BatchNorm),"
      f' as model.init returns; got {type(variables).__name__} with keys'
      f' {sorted(variables) if isinstance(variables, dict) else None}.'
    )
  if hasattr(model, 'depth') and hasattr(model, 'pool_sizes'):
    from unet_jax import models  # pylint: disable=g-import-not-at-top

    models.check_spatial_shape(
      spatial_shape,
      models.input_divisor(
        ndim=len(spatial_shape), depth=model.depth, pool_sizes=model.pool_sizes
      ),
    )
  if hasattr(model, 'kernels'):
    # The exported program must run on any machine: the plain formulation, with no
    # call into this machine's native CPU kernels (FFI targets the loader lacks).
    model = model.clone(kernels='xla')
  variables = jax.tree.map(jnp.asarray, variables)

  def predict(images):
    out = model.apply(variables, images, train=False)
    logits = out[0] if isinstance(out, tuple) else out
    return logits.astype(jnp.float32)

  (batch,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, *spatial_shape, int(num_channels)), jnp.float32)
  exported = jax.export.export(
    jax.jit(predict), platforms=None if platforms is None else tuple(platforms)
  )(spec)
  return bytes(exported.serialize())


def load_exported(
  path_or_bytes: str | os.PathLike | bytes | bytearray,
) -> Callable[[Any], jax.Array]:
  """A function `images -> logits` from a file or the bytes of `export_predict_fn`.

  The function checks the images' rank, spatial shape and channels against the
  exported ones before it runs, and casts them to float32. `predict.exported` is the
  `jax.export.Exported`, for its `in_avals` and `out_avals`.
  """
  if isinstance(path_or_bytes, (bytes, bytearray)):
    data, source = bytearray(path_or_bytes), 'the given bytes'
  else:
    source = os.fspath(path_or_bytes)
    if not os.path.isfile(source):
      raise ValueError(f'No exported model at {source!r}.')
    with open(source, 'rb') as f:
      data = bytearray(f.read())
  try:
    exported = jax.export.deserialize(data)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
      f'{source} is not a jax.export serialisation ({type(e).__name__}: {e}).'
    ) from e
  (spec,) = exported.in_avals
  expected = tuple(spec.shape)
  readable = '[b, ' + ', '.join(str(d) for d in expected[1:]) + ']'

  def predict(images) -> jax.Array:
    shape = tuple(np.shape(images))
    if len(shape) != len(expected):
      hint = ' Add a batch axis: images[None].' if len(shape) == len(expected) - 1 else ''
      raise ValueError(
        f'The exported model takes images {readable} (any batch b >= 1); got'
        f' shape {shape} (rank {len(shape)}, not {len(expected)}).{hint}'
      )
    if shape[1:-1] != expected[1:-1]:
      raise ValueError(
        f'The exported model takes images {readable}; got spatial shape'
        f' {shape[1:-1]} (shape {shape}). Resize, pad or predict by sliding'
        ' window (unet_jax.inference.sliding_window).'
      )
    if shape[-1] != expected[-1]:
      raise ValueError(
        f'The exported model takes images {readable} with {expected[-1]}'
        f' channel(s); got {shape[-1]} (shape {shape}).'
      )
    if shape[0] < 1:
      raise ValueError(f'The batch is empty: shape {shape}.')
    return exported.call(jnp.asarray(images, jnp.float32))

  predict.exported = exported
  return predict


def export_run(
  workdir: str,
  output: str,
  *,
  step: str | int = 'best',
  spatial_shape: Sequence[int] | None = None,
) -> str:
  """Writes a run's inference function as a `jax.export` file (see this module's docstring).

  Args:
    workdir: the run's folder.
    output: the file to write (e.g. model.jax); written under a temporary name,
      then renamed.
    step: as in `predictor.load`.
    spatial_shape: the input size the file takes; default the size training fed
      the model (its patch size for patch-based runs).

  Returns:
    `output`. The file takes float32 [b, *spatial_shape, C] for any b and needs
    only JAX to run. Like normalisation, resampling is not in the file: a run
    trained at `config.data.target_spacing` takes volumes at that spacing (the
    log says so; `launch.py --mode=predict` does both).
  """
  # Here, not at the top: loading an exported file needs JAX only, not Flax.
  from absl import logging  # pylint: disable=g-import-not-at-top

  from unet_jax.inference import predictor as predictor_lib  # pylint: disable=g-import-not-at-top

  predictor = predictor_lib.load(workdir, step=step)
  shape = tuple(spatial_shape or ()) or predictor.train_shape or predictor.patch_size
  if not shape:
    raise ValueError(f'{workdir}: the run records no input size; pass --spatial_shape.')
  if predictor.data.target_spacing:
    logging.warning(
      'The exported model takes volumes at spacing %s (D, H, W), normalised as %r:'
      ' resample and normalise them before calling it.',
      predictor.data.target_spacing,
      predictor.data.normalization,
    )
  serialised = export_predict_fn(
    predictor.model,
    predictor.variables,
    spatial_shape=shape,
    num_channels=predictor.num_channels,
  )
  folder = os.path.dirname(os.path.abspath(output))
  os.makedirs(folder, exist_ok=True)
  partial = os.path.join(folder, f'.{os.path.basename(output)}.partial-{os.getpid()}')
  with open(partial, 'wb') as f:
    f.write(serialised)
  os.replace(partial, output)
  return output
