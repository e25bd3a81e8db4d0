"""A trained U-Net as one self-contained file: StableHLO via `jax.export`.

`export_run` (`launch.py --mode=export`) writes the whole inference function of
`--mode=predict` for images of one declared spatial shape: raw intensities in,
the logits `predictor.predict` computes out. Inside the module:

1. the run's normalisation, per image and per channel, over the same pixels as
   predict (`config.data.normalization`: z-score, CT window, rescale, min-max or
   none; `normalise_jax`, the jnp twin of `data.pipeline.normalise`);
2. mirrored padding up to the patch where the image is smaller (or up to a
   multiple of the network's divisor, for runs predicted whole);
3. the Gaussian-weighted sliding window of `sliding_window.sliding_window_predict`
   over the run's patch (overlap 0.5 by default), with optional flip TTA;
4. the model in eval mode (BatchNorm's running statistics, no dropout), its
   trained variables baked in as constants.

Orientation is not inside: it is a matter of reading a file (a NIfTI affine), so
a 3D file takes volumes in canonical orientation, (D, H, W) towards (Superior,
Anterior, Right), as `geometry.read_volume` gives them. Resampling is inside only
when asked: a 3D run trained at `config.data.target_spacing` takes volumes at that
spacing (its contract says so and the export warns), unless `export_run` is given
the volumes' `input_spacing`. Then the file resamples them to the run's spacing
as predict does (`geometry.resample_image`: cubic splines, the separate-z rule;
separable, so one matrix per axis, `resampling_matrices`), and returns predict's
class probabilities (softmax at the run's spacing, resampled linearly back, as
`predict.case_probabilities`) on the input grid, not logits. The batch
dimension is symbolic; the spatial shape and the number of channels are fixed.

The file is a small container: `MAGIC` (16 bytes), the length of a JSON header
as an 8-byte little-endian integer, the header (the input contract: channels,
dtype, shape, axes, orientation, spacing, normalisation per channel, classes,
what the output is; `describe` prints it), then the serialised
`jax.export.Exported`. Loading needs JAX and nothing else: not this package, not
Flax.

    import json, struct, jax
    data = open('model.jax', 'rb').read()
    (n,) = struct.unpack('<Q', data[16:24])
    contract = json.loads(data[24 : 24 + n])
    exported = jax.export.deserialize(bytearray(data[24 + n :]))
    logits = exported.call(images)     # raw float32 [b, *spatial_shape, C]

`load_exported` does the same, checks the images' shape first with a clear
error, and also reads older files (a plain serialised `Exported`, contract None).
The module is lowered for CPU, CUDA and TPU by default (`platforms`), so a file
written on a CPU machine runs on an accelerator. Each new batch size compiles once
on first use; tracing and lowering are never repeated.

Reference: JAX documentation, "Exporting and serializing staged-out computations"
(jax.export) and "Shape polymorphism".
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
MAGIC = b'unet_jax.export\n'  # 16 bytes, then '<Q' header length, header, module.
FORMAT = 1
MODES = ('zscore', 'ct', 'rescale', 'minmax', 'none')  # config.NORMALIZATIONS.
_FIELDS = {'ct': ('low', 'high', 'mean', 'std'), 'rescale': ('low', 'high')}


def _check_normalization(normalization, num_channels: int) -> list[dict[str, Any]]:
  """One {'mode': ..., values} dict per channel; a ValueError naming a bad entry."""
  norms = list(normalization)
  if len(norms) != num_channels:
    raise ValueError(
      f'normalization has {len(norms)} entries for {num_channels} channel(s): give'
      ' one per channel.'
    )
  out = []
  for c, norm in enumerate(norms):
    mode = norm.get('mode') if isinstance(norm, dict) else None
    if mode not in MODES:
      raise ValueError(f'normalization[{c}]={norm!r}: mode must be one of {MODES}.')
    missing = [f for f in _FIELDS.get(mode, ()) if f not in norm]
    if missing:
      raise ValueError(f'normalization[{c}]={norm!r} needs {missing} for {mode!r}.')
    out.append({'mode': mode, **{f: float(norm[f]) for f in _FIELDS.get(mode, ())}})
  return out


def normalise_jax(images: jax.Array, normalization: Sequence[dict]) -> jax.Array:
  """`data.pipeline.normalise` in jnp, per image of a batch [b, *spatial, C].

  Channel c follows `normalization[c]` (`channel_normalizations`), each image's
  statistics taken over its own pixels of that channel:

    'zscore':  (x - mean(x)) / max(std(x), 1e-6)
    'ct':      (clip(x, low, high) - mean) / std
    'rescale': (x - low) / (high - low)
    'minmax':  (x - min(x)) / max(max(x) - min(x), 1e-8)
    'none':    x

  Returns:
    float32 [b, *spatial, C].
  """
  x = images.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  channels = []
  for c, norm in enumerate(normalization):
    v, mode = x[..., c], norm['mode']
    f = {k: np.float32(norm[k]) for k in _FIELDS.get(mode, ())}
    if mode == 'zscore':
      mean = v.mean(axis=axes, keepdims=True)
      std = jnp.sqrt(jnp.mean(jnp.square(v - mean), axis=axes, keepdims=True))
      v = (v - mean) * (1 / jnp.maximum(std, 1e-6))
    elif mode == 'minmax':
      lo, hi = v.min(axis=axes, keepdims=True), v.max(axis=axes, keepdims=True)
      v = (v - lo) / jnp.maximum(hi - lo, np.float32(1e-8))
    elif mode == 'ct':
      v = (jnp.clip(v, f['low'], f['high']) - f['mean']) / f['std']
    elif mode == 'rescale':
      v = (v - f['low']) / (f['high'] - f['low'])
    channels.append(v)
  return jnp.stack(channels, axis=-1)


def channel_normalizations(data, num_channels: int) -> list[dict[str, Any]]:
  """The normalisation of each channel that `config.data` gives, as JSON dicts.

  `data`: `config.DataOptions` (or `config.data`). Checked as predict checks it
  (`data.pipeline.normaliser`); each dict holds 'mode' and, for 'ct' and
  'rescale', the channel's 'low', 'high' (and 'mean', 'std').
  """
  from unet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from unet_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  options = config_lib.DataOptions.from_config(data)
  pipeline.normaliser(options, num_channels)  # Its checks: modes and values per channel.
  modes = options.normalization_modes()
  out = []
  for c in range(num_channels):
    mode = modes[c if len(modes) > 1 else 0]
    norm = {'mode': mode}
    for name in _FIELDS.get(mode, ()):
      values = options.intensity_values(name).reshape(-1)
      norm[name] = float(values[c if values.size > 1 else 0])
    out.append(norm)
  return out


def _window_plan(spatial_shape, patch, overlap):
  """Static plan of the sliding window: pads, padded shape, starts, weights."""
  from unet_jax.inference import sliding_window  # pylint: disable=g-import-not-at-top

  pads = [
    ((max(p - s, 0)) // 2, max(p - s, 0) - max(p - s, 0) // 2)
    for s, p in zip(spatial_shape, patch)
  ]
  padded = tuple(max(s, p) for s, p in zip(spatial_shape, patch))
  starts = sliding_window.patch_positions(padded, patch, overlap)
  weight = sliding_window.gaussian_importance_map(patch)
  total = np.zeros(padded, np.float32)
  for start in starts:
    total[tuple(slice(s, s + p) for s, p in zip(start, patch))] += weight
  return pads, padded, np.asarray(starts, np.int32), weight, total


def _flip_averaged(logits_fn, ndim: int, tta: bool):
  """logits_fn, or its mean over the 2**ndim axis flips (each flipped back)."""
  if not tta:
    return logits_fn
  flips = [
    tuple(1 + a for a in range(ndim) if mask[a])
    for mask in itertools.product((False, True), repeat=ndim)
  ]

  def averaged(x):
    total = None
    for axes in flips:
      y = logits_fn(jnp.flip(x, axes) if axes else x)
      y = jnp.flip(y, axes) if axes else y
      total = y if total is None else total + y
    return total / len(flips)

  return averaged


def sliding_window_fn(logits_fn, *, spatial_shape, patch, overlap=0.5, tta=False):
  """A jittable `sliding_window_predict(..., mode='gaussian')` for one image shape.

  Maps normalised images [b, *spatial_shape, C] to blended logits
  [b, *spatial_shape, K]: mirrored padding up to the patch, the patches of
  `sliding_window.patch_positions` one at a time in a `fori_loop` (the model is
  traced once), each weighted by the Gaussian importance map and summed, divided
  by the summed weights, cropped back. One patch covering the image: logits_fn.
  The device holds the batch's padded images and blended logits, and one patch's
  activations at a time.
  """
  ndim = len(spatial_shape)
  pads, padded, starts, weight, total = _window_plan(spatial_shape, patch, overlap)
  crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, spatial_shape))
  logits_fn = _flip_averaged(logits_fn, ndim, tta)

  def predict(x):
    if any(b or a for b, a in pads):
      x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode='reflect')
    if len(starts) == 1:
      return logits_fn(x)[(slice(None), *crop)]
    batch, channels = x.shape[0], x.shape[-1]
    k = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1, *patch, channels), x.dtype))
    w = jnp.asarray(weight)[None, ..., None]
    table = jnp.asarray(starts)

    def body(i, out):
      at = (0, *(table[i, a] for a in range(ndim)), 0)
      y = logits_fn(jax.lax.dynamic_slice(x, at, (batch, *patch, channels))) * w
      here = jax.lax.dynamic_slice(out, at, (batch, *patch, k.shape[-1]))
      return jax.lax.dynamic_update_slice(out, here + y, at)

    out = jnp.zeros((batch, *padded, k.shape[-1]), jnp.float32)
    out = jax.lax.fori_loop(0, len(starts), body, out)
    return (out / jnp.asarray(total)[None, ..., None])[(slice(None), *crop)]

  return predict


def _axis_matrices(shape, out_shape, resample) -> list[np.ndarray]:
  """`resample` (a `geometry` resampler) as one float32 matrix [m, n] per axis.

  Resampling is separable: splines along each axis, the separate-z rule axis by
  axis. Column j of axis a's matrix is the resampled unit impulse at voxel j of
  a probe that has one voxel on the other axes (taken as channels, one pass).
  """
  out = []
  for a, (n, m) in enumerate(zip(shape, out_shape)):
    probe = np.eye(n, dtype=np.float32).reshape(
      *(n if b == a else 1 for b in range(len(shape))), n
    )
    sizes = tuple(m if b == a else 1 for b in range(len(shape)))
    out.append(np.asarray(resample(probe, sizes), np.float32).reshape(m, n))
  return out


def resampling_matrices(shape, spacing, target) -> tuple[list, list]:
  """The resampling of `predict` for volumes of `shape` at `spacing`, as matrices.

  Returns:
    (to_target, back): one matrix per axis each; `to_target[a]` [m_a, n_a] is
    `geometry.resample_image` (cubic splines, the separate-z rule) from `spacing`
    to `target`, `back[a]` [n_a, m_a] is `geometry.resample_probabilities`
    (linear) from `target` back to the input grid, with m =
    `geometry.resampled_shape(shape, spacing, target)`.
  """
  from unet_jax.data import geometry  # pylint: disable=g-import-not-at-top

  shape = tuple(int(s) for s in shape)
  resampled = geometry.resampled_shape(shape, spacing, target)
  to_target = _axis_matrices(
    shape,
    resampled,
    lambda x, size: geometry.resample_image(x, spacing, target, shape=size),
  )
  back = _axis_matrices(
    resampled,
    shape,
    lambda x, size: geometry.resample_probabilities(x, target, spacing, shape=size),
  )
  return to_target, back


def resample_jax(images: jax.Array, matrices: Sequence[np.ndarray]) -> jax.Array:
  """Applies one matrix [m, n] per spatial axis of images [b, *spatial, C], in float32
  at full precision; an identity matrix is skipped."""
  x = images
  for a, m in enumerate(matrices):
    if m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(m.shape[0])):
      continue
    y = jnp.tensordot(
      jnp.asarray(m), x, axes=([1], [a + 1]), precision=jax.lax.Precision.HIGHEST
    )
    x = jnp.moveaxis(y, 0, a + 1)
  return x


def _check_export_arguments(model, variables, spatial_shape, num_channels, patch_size):
  """spatial_shape and patch as tuples; a ValueError for any bad argument."""
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
  patch = tuple(int(p) for p in (patch_size or spatial_shape))
  if len(patch) != len(spatial_shape) or min(patch) < 1:
    raise ValueError(f'patch_size={patch_size} must be {len(spatial_shape)} positive ints.')
  if hasattr(model, 'depth') and hasattr(model, 'pool_sizes'):
    from unet_jax import models  # pylint: disable=g-import-not-at-top

    models.check_spatial_shape(
      patch,
      models.input_divisor(ndim=len(patch), depth=model.depth, pool_sizes=model.pool_sizes),
    )
  return tuple(int(s) for s in spatial_shape), patch


def _check_resampling(resampling, spatial_shape, output) -> tuple[int, ...]:
  """The window's spatial shape: the resampled one, or `spatial_shape`."""
  if output not in ('logits', 'probabilities'):
    raise ValueError(f"output={output!r} is not 'logits' or 'probabilities'.")
  if resampling is None:
    return spatial_shape
  to_target, back = resampling
  shapes = [np.shape(m) for m in to_target], [np.shape(m) for m in back]
  window = tuple(s[0] for s in shapes[0])
  if [s[1] for s in shapes[0]] != list(spatial_shape) or shapes[1] != [
    (n, m) for n, m in zip(spatial_shape, window)
  ]:
    raise ValueError(
      f'resampling matrices {shapes} do not fit spatial_shape={spatial_shape}:'
      ' give resampling_matrices(spatial_shape, spacing, target).'
    )
  if output != 'probabilities':
    raise ValueError(
      "resampling needs output='probabilities': --mode=predict resamples the"
      ' probabilities back to the input grid, not the logits.'
    )
  return window


def export_predict_fn(
  model,
  variables: Any,
  *,
  spatial_shape: Sequence[int],
  num_channels: int,
  normalization: Sequence[dict] | None = None,
  patch_size: Sequence[int] | None = None,
  overlap: float = 0.5,
  tta: bool = False,
  resampling: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
  output: str = 'logits',
  platforms: Sequence[str] | None = DEFAULT_PLATFORMS,
) -> bytes:
  """Serialises `images -> sliding-window logits of normalise(images)`.

  Args:
    model: a `unet_jax.models.UNet` (any Flax module whose `apply(variables, x,
      train=False)` returns logits, or `(logits, aux)` with deep supervision: only
      the logits are exported).
    variables: `{'params': ..., 'batch_stats': ...}`, baked in as constants.
    spatial_shape: (H, W) or (D, H, W) of the images the function takes.
    num_channels: channels of the input images (C).
    normalization: one dict per channel (`channel_normalizations`), applied to
      each image inside the module; None: the images go to the model as they are.
    patch_size: the sliding window's patch, a multiple of the network's divisor
      (`models.input_divisor`) on every axis; None: the image whole, so
      `spatial_shape` must be such a multiple.
    overlap: of the sliding windows, in [0, 1).
    tta: average the logits over all axis flips, as `predict --tta`.
    resampling: `resampling_matrices(spatial_shape, spacing, target)`: the images
      are resampled to the run's spacing inside (the window runs there) and the
      probabilities back to `spatial_shape`, as `--mode=predict` does; then
      `output` must be 'probabilities'. None: no resampling.
    output: 'logits', or 'probabilities' (softmax over K; a sigmoid for K == 1).
    platforms: the platforms to lower for ('cpu', 'cuda', 'rocm', 'tpu'), or None
      for the current backend only.

  Returns:
    The serialised `jax.export.Exported` (no contract; `write_exported` adds it): a
    function of one float32 array `[b, *spatial_shape, num_channels]`, any b >= 1,
    returning float32 logits (or probabilities) `[b, *spatial_shape, K]`.
  """
  spatial_shape, patch = _check_export_arguments(
    model, variables, spatial_shape, num_channels, patch_size
  )
  window_shape = _check_resampling(resampling, spatial_shape, output)
  norms = (
    None if normalization is None else _check_normalization(normalization, num_channels)
  )
  if hasattr(model, 'kernels'):
    # The exported program must run on any machine: the plain formulation, with no
    # call into this machine's native CPU kernels (FFI targets the loader lacks).
    model = model.clone(kernels='xla')
  variables = jax.tree.map(jnp.asarray, variables)

  def logits_of(images):
    out = model.apply(variables, images, train=False)
    logits = out[0] if isinstance(out, tuple) else out
    return logits.astype(jnp.float32)

  window = sliding_window_fn(
    logits_of, spatial_shape=window_shape, patch=patch, overlap=overlap, tta=tta
  )

  def predict(images):
    x = images if resampling is None else resample_jax(images, resampling[0])
    y = window(x if norms is None else normalise_jax(x, norms))
    if output == 'probabilities':
      y = jax.nn.sigmoid(y) if y.shape[-1] == 1 else jax.nn.softmax(y, axis=-1)
    return y if resampling is None else resample_jax(y, resampling[1])

  (batch,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, *spatial_shape, int(num_channels)), jnp.float32)
  exported = jax.export.export(
    jax.jit(predict), platforms=None if platforms is None else tuple(platforms)
  )(spec)
  return bytes(exported.serialize())


def pack(serialised: bytes, contract: dict[str, Any]) -> bytes:
  """The file's bytes: `MAGIC`, '<Q' header length, JSON contract, the module."""
  header = json.dumps(contract, sort_keys=True).encode('utf-8')
  return MAGIC + struct.pack('<Q', len(header)) + header + bytes(serialised)


def unpack(data: bytes | bytearray, source: str = 'the given bytes'):
  """(serialised module, contract dict or None for a plain serialised Exported)."""
  data = bytes(data)
  if not data.startswith(MAGIC):
    return data, None
  start = len(MAGIC) + 8
  if len(data) < start:
    raise ValueError(f'{source} is a truncated unet_jax export (no header length).')
  (n,) = struct.unpack('<Q', data[len(MAGIC) : start])
  try:
    contract = json.loads(data[start : start + n].decode('utf-8'))
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f'{source}: its contract header is not JSON ({e}).') from e
  return data[start + n :], contract


def load_exported(
  path_or_bytes: str | os.PathLike | bytes | bytearray,
) -> Callable[[Any], jax.Array]:
  """A function `raw images -> logits` from a file or the bytes `export_run` writes.

  The function checks the images' rank, spatial shape and channels against the
  exported ones before it runs, and casts them to float32. `predict.exported` is
  the `jax.export.Exported`, for its `in_avals` and `out_avals`; `predict.contract`
  the file's input contract (a dict, `describe` prints it), or None for a file
  written before contracts (a plain serialised `Exported`, which loads as well).
  """
  if isinstance(path_or_bytes, (bytes, bytearray)):
    data, source = bytes(path_or_bytes), 'the given bytes'
  else:
    source = os.fspath(path_or_bytes)
    if not os.path.isfile(source):
      raise ValueError(f'No exported model at {source!r}.')
    with open(source, 'rb') as f:
      data = f.read()
  serialised, contract = unpack(data, source)
  try:
    exported = jax.export.deserialize(bytearray(serialised))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
      f'{source} is not a jax.export serialisation ({type(e).__name__}: {e}).'
    ) from e
  (spec,) = exported.in_avals
  check = _shape_check(tuple(spec.shape))

  def predict(images) -> jax.Array:
    check(tuple(np.shape(images)))
    return exported.call(jnp.asarray(images, jnp.float32))

  predict.exported = exported
  predict.contract = contract
  return predict


def _shape_check(expected: tuple) -> Callable[[tuple], None]:
  """A function raising a ValueError for images whose shape the module cannot take."""
  readable = '[b, ' + ', '.join(str(d) for d in expected[1:]) + ']'

  def check(shape: tuple) -> None:
    if len(shape) != len(expected):
      hint = ' Add a batch axis: images[None].' if len(shape) == len(expected) - 1 else ''
      raise ValueError(
        f'The exported model takes images {readable} (any batch b >= 1); got'
        f' shape {shape} (rank {len(shape)}, not {len(expected)}).{hint}'
      )
    if shape[1:-1] != expected[1:-1]:
      raise ValueError(
        f'The exported model takes images {readable}; got spatial shape'
        f' {shape[1:-1]} (shape {shape}). Export for that shape'
        ' (--spatial_shape), or crop or pad the image.'
      )
    if shape[-1] != expected[-1]:
      raise ValueError(
        f'The exported model takes images {readable} with {expected[-1]}'
        f' channel(s); got {shape[-1]} (shape {shape}).'
      )
    if shape[0] < 1:
      raise ValueError(f'The batch is empty: shape {shape}.')

  return check


def _orientation(ndim: int) -> str:
  if ndim == 3:
    return (
      'canonical RAS+, (D, H, W) towards (Superior, Anterior, Right), as'
      ' geometry.read_volume gives a NIfTI file; a file in its own voxel order'
      ' must be reoriented first'
    )
  return '(H, W) = (rows, columns), as the image file is read'


def run_contract(predictor, *, spatial_shape, input_spacing, patch, overlap, tta, workdir):
  """The input contract of a run's export (stored in the file, printed on export).

  `input_spacing`: the spacing the file resamples from (None: it does not resample).
  """
  ndim, channels = len(spatial_shape), predictor.num_channels
  k = predictor.model.num_classes
  target = list(predictor.data.target_spacing) if ndim == 3 else []
  resampled = input_spacing is not None
  what = (
    'class probabilities of --mode=predict (softmax, or sigmoid for one class, at'
    " the run's spacing), resampled linearly back to the input grid"
    if resampled
    else 'logits of --mode=predict (before softmax), on the input grid'
  )
  return {
    'format': FORMAT,
    'input': {
      'shape': ['b', *spatial_shape, channels],
      'dtype': 'float32',
      'axes': 'b' + 'DHW'[-ndim:] + 'C',
      'num_channels': channels,
      'orientation': _orientation(ndim),
      'spacing': list(input_spacing) if resampled else (target or None),
      'resampled_inside': resampled,
      'target_spacing': target or None,
      'intensities': 'raw: the normalisation below is applied inside, per image',
      'normalization': channel_normalizations(predictor.data, channels),
    },
    'output': {
      'shape': ['b', *spatial_shape, k],
      'dtype': 'float32',
      'what': what,
      'num_classes': max(k, 2),
      'classes': 'argmax over the last axis'
      if k > 1
      else ('p > 0.5' if resampled else 'logit > 0 (sigmoid)'),
    },
    'inference': {
      'patch_size': list(patch),
      'overlap': float(overlap),
      'blending': 'gaussian, sigma = patch / 8',
      'padding': 'reflect, up to the patch',
      'tta': bool(tta),
    },
    'run': {'workdir': os.path.abspath(workdir), 'step': int(predictor.step)},
  }


def _spacing_line(i: dict) -> str:
  if not i['spacing']:
    return 'as read (no resampling)'
  if i['resampled_inside']:
    return (
      f"{tuple(i['spacing'])} (D, H, W) mm, resampled inside to the run's"
      f' {tuple(i["target_spacing"])}'
    )
  return f'{tuple(i["spacing"])} (D, H, W) mm: resample to it first'


def describe(contract: dict | None) -> str:
  """The contract as a few readable lines (what `export_run` prints)."""
  if contract is None:
    return 'No contract: a file written before contracts (images -> logits of the model).'
  i, o, w = contract['input'], contract['output'], contract['inference']
  shape = lambda s: '[' + ', '.join(map(str, s)) + ']'
  norms = ', '.join(
    f'{c}: ' + n['mode'] + ''.join(f' {k}={n[k]:g}' for k in _FIELDS.get(n['mode'], ()))
    for c, n in enumerate(i['normalization'])
  )
  lines = [
    f'input:  {i["dtype"]} {shape(i["shape"])} ({i["axes"]}), raw intensities',
    f'        orientation: {i["orientation"]}',
    f'        spacing: {_spacing_line(i)}',
    f'        normalised inside, per channel: {norms}',
    f'output: {o["dtype"]} {shape(o["shape"])}: {o["what"]}; {o["num_classes"]}'
    f' classes, {o["classes"]}',
    f'window: patch {tuple(w["patch_size"])}, overlap {w["overlap"]}, {w["blending"]},'
    f' {w["padding"]}, tta {w["tta"]}',
  ]
  return '\n'.join(lines)


def _run_shapes(predictor, spatial_shape, input_spacing, workdir):
  """(input shape, resampling matrices or None, window shape, patch) of an export."""
  shape = tuple(spatial_shape or ())
  if input_spacing is not None:
    if not (predictor.ndim == 3 and predictor.data.target_spacing):
      raise ValueError(
        f'input_spacing={tuple(input_spacing)}: {workdir} has no'
        ' config.data.target_spacing (a 3D run planned at one), so --mode=predict'
        ' does not resample its inputs; export without it.'
      )
    if not shape:
      raise ValueError("input_spacing needs spatial_shape: the volumes' own shape.")
  shape = shape or predictor.train_shape or predictor.patch_size
  if not shape:
    raise ValueError(f'{workdir}: the run records no input size; pass --spatial_shape.')
  shape = tuple(int(s) for s in shape)
  if len(shape) != predictor.ndim:
    raise ValueError(
      f'spatial_shape={shape}: the run is {predictor.ndim}D; give {predictor.ndim} sizes.'
    )
  resampling, window = None, shape
  if input_spacing is not None:
    resampling = resampling_matrices(shape, input_spacing, predictor.data.target_spacing)
    window = tuple(m.shape[0] for m in resampling[0])
  patch = predictor.patch_size or tuple(
    -(-s // d) * d for s, d in zip(window, predictor.divisor)
  )
  return shape, resampling, window, patch


def export_run(
  workdir: str,
  output: str,
  *,
  step: str | int = 'best',
  spatial_shape: Sequence[int] | None = None,
  input_spacing: Sequence[float] | None = None,
  overlap: float = 0.5,
  tta: bool = False,
) -> str:
  """Writes a run's whole inference function for one image shape (module docstring).

  Args:
    workdir: the run's folder.
    output: the file to write (e.g. model.jax); written under a temporary name,
      then renamed.
    step: as in `predictor.load`.
    spatial_shape: the shape of the images the file takes (in canonical
      orientation for 3D; at the run's target spacing unless `input_spacing`);
      default the size training fed the model (its patch size for patch-based runs).
    input_spacing: 3D runs with a target spacing only: the (D, H, W) spacing of
      the volumes the file takes. The file then resamples them to the run's
      spacing inside (`resampling_matrices`) and returns predict's probabilities
      on their own grid; `spatial_shape` is required.
    overlap, tta: of the sliding window, as `--mode=predict` takes them.

  Returns:
    `output`. The file takes raw float32 [b, *spatial_shape, C] for any b and gives
    the logits `predictor.predict` computes of each image (with `input_spacing`,
    the probabilities `--mode=predict` takes the argmax of); it needs only JAX to
    run. Its contract (`describe`) is printed.
  """
  # Here, not at the top: loading an exported file needs JAX only, not Flax.
  from absl import logging  # pylint: disable=g-import-not-at-top

  from unet_jax.inference import predictor as predictor_lib  # pylint: disable=g-import-not-at-top

  predictor = predictor_lib.load(workdir, step=step)
  shape, resampling, _, patch = _run_shapes(
    predictor, spatial_shape, input_spacing, workdir
  )
  contract = run_contract(
    predictor,
    spatial_shape=shape,
    input_spacing=None if input_spacing is None else tuple(map(float, input_spacing)),
    patch=patch,
    overlap=overlap,
    tta=tta,
    workdir=workdir,
  )
  serialised = export_predict_fn(
    predictor.model,
    predictor.variables,
    spatial_shape=shape,
    num_channels=predictor.num_channels,
    normalization=contract['input']['normalization'],
    patch_size=patch,
    overlap=overlap,
    tta=tta,
    resampling=resampling,
    output='logits' if resampling is None else 'probabilities',
  )
  if contract['input']['spacing'] and resampling is None:
    logging.warning(
      'The exported model does not resample: it takes volumes at spacing %s (D, H, W)'
      ' in canonical RAS orientation (geometry.read_volume, then'
      ' geometry.resample_image), as --mode=predict feeds its network; pass'
      ' --input_spacing to resample inside.',
      tuple(contract['input']['spacing']),
    )
  folder = os.path.dirname(os.path.abspath(output))
  os.makedirs(folder, exist_ok=True)
  partial = os.path.join(folder, f'.{os.path.basename(output)}.partial-{os.getpid()}')
  with open(partial, 'wb') as f:
    f.write(pack(serialised, contract))
  os.replace(partial, output)
  print(f'{output}:\n{describe(contract)}', flush=True)
  return output
