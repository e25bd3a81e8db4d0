"""oneDNN's convolutions for XLA:CPU, called through FFI (`native/onednn.cc`).

oneDNN is the library PyTorch's CPU convolutions use. Stride-1 'same' 2D and 3D
float32 convolutions, channels-last with HWIO (DHWIO) kernels: the forward pass
(`conv_same`), the input gradient (`conv_same_input_grad`, oneDNN's backward-data
primitive) and the kernel gradient (`conv_weight_grad`, its backward-weights
primitive). `unet_jax.ops.conv` uses them as `onednn=True`; `policy.ONEDNN`
(`kernels='onednn'`) asks for them.

Layouts. In 2D, where both channel counts are multiples of 8, the activations go
to oneDNN in channel blocks ([N, C / 8, H, W, 8], `to_blocked`), the layout its AVX2
kernels read fastest; the transposes are XLA's, in the program around each call, so
XLA can fuse them into the BatchNorm and ReLU beside it (`act_block`, `ACT_BLOCK`).
Elsewhere they stay channels-last.

Where oneDNN comes from. The `onednn` and `onednn-devel` wheels (the `onednn` extra,
`pip install -e '.[onednn]'`), found through their installed files
(`importlib.metadata`): the headers from `onednn-devel`, `libdnnl.so` from `onednn`.
`native/onednn.cc` is compiled at first use by `native.build`, the same mechanism
and cache as the hand-written kernels, linked with `-ldnnl` and an rpath to the
wheel's library folder.

Threads. The 2026.1 wheel is built with the SYCL CPU runtime and TBB threading
(`dnnl_config.h`): its CPU engine is a SYCL device found through the OpenCL CPU
runtime that the wheel pulls in (`intel-opencl-rt`), so `_load` points the OpenCL
loader at it (`OCL_ICD_FILENAMES`) unless the variable already names it. TBB runs
each primitive on as many threads as the process may use (its CPU affinity);
XLA's intra-op pool waits meanwhile.

Failure. `available()` is False when the wheels are not installed, there is no
compiler, the build fails, oneDNN finds no CPU device, the backend is not the CPU,
or `UNET_JAX_ONEDNN=0` is set; the first failure is logged once as a warning.
`kernels='auto'` never chooses oneDNN (the native kernels beat it: `policy.auto`).
Asking for oneDNN (`kernels='onednn'`, or a `KernelPolicy` with `onednn_conv`)
where it is not available raises `native.NativeKernelError` with the reason.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import pathlib
import re
import threading

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.ops import native

SOURCE = pathlib.Path(__file__).resolve().parent / 'native' / 'onednn.cc'
_CONV, _INPUT_GRAD, _WGRAD = (
  'unet_jax_onednn_conv',
  'unet_jax_onednn_input_grad',
  ('unet_jax_onednn_wgrad'),
)
TARGETS = {
  _CONV: 'UnetOnednnConv',
  _INPUT_GRAD: 'UnetOnednnInputGrad',
  _WGRAD: 'UnetOnednnWgrad',
}
FLAGS = ('-O2', '-std=c++17', '-shared', '-fPIC')
# Let oneDNN choose the kernel's layout per primitive (reordered from and to HWIO on
# every call), rather than reading HWIO as stored: benchmarks/RESULTS.md, "oneDNN
# against the hand-written kernels and XLA".
BLOCKED_WEIGHTS = True
# Let the kernel gradient read its activations in oneDNN's blocked layout where
# `blocked_wgrad_activations` says it pays (False: always channels-last;
# UNET_JAX_ONEDNN_BLOCKED_WGRAD=0 sets that for a process, for A/B runs).
BLOCKED_WGRAD = os.environ.get('UNET_JAX_ONEDNN_BLOCKED_WGRAD', '1') != '0'
# Hand oneDNN its activations in channel blocks of this size ([N, C / b, *spatial,
# b], its nChw8c / nCdhw8c) where both channel counts are multiples of it (`act_block`):
# the transposes from and to channels-last are XLA's, in the program around the call,
# where XLA fuses them into the neighbouring BatchNorm and ReLU; on AVX2 oneDNN's
# kernels on 8-blocks are faster than on channels-last (benchmarks/RESULTS.md,
# "oneDNN on blocked activations"). 0: channels-last throughout.
# UNET_JAX_ONEDNN_ACT_BLOCK sets it for a process, for A/B runs.
BLOCKS = (0, 8, 16)


def _act_block_from_env() -> int:
  value = os.environ.get('UNET_JAX_ONEDNN_ACT_BLOCK', '8')
  if value not in {str(b) for b in BLOCKS}:
    raise ValueError(
      f'UNET_JAX_ONEDNN_ACT_BLOCK={value!r} must be one of {", ".join(map(str, BLOCKS))}.'
    )
  return int(value)


ACT_BLOCK = _act_block_from_env()


def blocked_wgrad_activations(ndim: int, in_channels: int, out_channels: int) -> bool:
  """Whether the kernel gradient reads its activations in oneDNN's blocked layout.

  Reordering the input and the output gradient from channels-last costs two passes
  over them; it pays only in 2D when the input has at least twice the output's
  channels (the decoder's convolutions of the concatenated skip), where oneDNN's
  channels-last backward-weights kernel is slowest; in 3D it lost on every layer
  (benchmarks/RESULTS.md, "oneDNN's kernel gradient in the blocked layout").
  """
  return BLOCKED_WGRAD and ndim == 2 and in_channels >= 2 * out_channels


def act_block(ndim: int, in_channels: int, out_channels: int) -> int:
  """The channel block of a convolution's activations: in 2D `ACT_BLOCK` where it
  divides both channel counts, else 0 (channels-last: the first convolution of a
  network on 1 or 3 input channels, narrow test networks). In 3D always 0: there
  oneDNN's blocked kernel gradient is a reference loop (seconds for one 64^3 layer),
  and its blocked forward pass lost on 16 channels."""
  b = ACT_BLOCK
  return b if ndim == 2 and b and in_channels % b == 0 and out_channels % b == 0 else 0


def to_blocked(x: jax.Array, block: int) -> jax.Array:
  """`[N, *spatial, C] -> [N, C / block, *spatial, block]` (oneDNN's nChw8c)."""
  n, *spatial, c = x.shape
  nd = len(spatial)
  y = x.reshape(n, *spatial, c // block, block)
  return jnp.transpose(y, (0, nd + 1, *range(1, nd + 1), nd + 2))


def from_blocked(y: jax.Array) -> jax.Array:
  """The inverse of `to_blocked`: `[N, C / b, *spatial, b] -> [N, *spatial, C]`."""
  nd = y.ndim - 3
  z = jnp.transpose(y, (0, *range(2, nd + 2), 1, nd + 2))
  return z.reshape(*z.shape[:-2], -1)


_lock = threading.Lock()
_state: dict[str, object] = {}


def _files(distribution: str) -> list[pathlib.Path]:
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError as e:
    raise native.NativeKernelError(
      f"the {distribution!r} wheel is not installed (pip install -e '.[onednn]')."
    ) from e
  return [pathlib.Path(dist.locate_file(f)).resolve() for f in dist.files or ()]


def locate() -> tuple[pathlib.Path, pathlib.Path]:
  """The include folder of `onednn-devel` and the library folder of `onednn`.

  Raises:
    NativeKernelError: a wheel is missing or lacks `dnnl.hpp` / `libdnnl.so*`.
  """
  headers = [f for f in _files('onednn-devel') if f.name == 'dnnl.hpp']
  include = next((f.parents[2] for f in headers if f.parent.name == 'dnnl'), None)
  libs = [f for f in _files('onednn') if re.fullmatch(r'libdnnl\.so(\.\d+)*', f.name)]
  if include is None or not libs:
    raise native.NativeKernelError(
      'the onednn wheels are installed but oneapi/dnnl/dnnl.hpp or libdnnl.so was'
      ' not found among their files.'
    )
  return include, libs[0].parent


def runtime(include: pathlib.Path) -> str:
  """oneDNN's CPU runtime as `dnnl_config.h` declares it: 'SYCL', 'OMP', 'TBB', ..."""
  text = (include / 'oneapi' / 'dnnl' / 'dnnl_config.h').read_text()
  found = re.search(r'#define DNNL_CPU_RUNTIME DNNL_RUNTIME_(\w+)', text)
  return found.group(1) if found else 'unknown'


def _point_opencl_at_cpu_runtime(lib: pathlib.Path) -> None:
  """The SYCL CPU device needs the OpenCL CPU runtime; the loader finds it by name."""
  icd = lib / 'libintelocl.so'
  if not icd.exists():
    raise native.NativeKernelError(
      f'oneDNN uses the SYCL CPU runtime but {icd} (intel-opencl-rt) is missing.'
    )
  current = os.environ.get('OCL_ICD_FILENAMES', '')
  if str(icd) not in current.split(':'):
    os.environ['OCL_ICD_FILENAMES'] = ':'.join(p for p in (current, str(icd)) if p)


def build(*, verbose: bool = False) -> pathlib.Path:
  """Compiles `native/onednn.cc` against the installed wheels (`native.build`)."""
  include, lib = locate()
  link = (f'-I{include}', f'-L{lib}', '-ldnnl', f'-Wl,--disable-new-dtags,-rpath,{lib}')
  return native.build(verbose=verbose, source=SOURCE, flags=FLAGS, link=link)


def _load() -> None:
  if os.environ.get('UNET_JAX_ONEDNN', '1') == '0':
    raise native.NativeKernelError('UNET_JAX_ONEDNN=0 turns oneDNN off.')
  if jax.default_backend() != 'cpu':
    raise native.NativeKernelError(
      f'oneDNN runs on the CPU only here; the backend is {jax.default_backend()!r}.'
    )
  include, lib = locate()
  if runtime(include) == 'SYCL':
    _point_opencl_at_cpu_runtime(lib)
  path = build(verbose=True)
  try:
    library = ctypes.cdll.LoadLibrary(str(path))
    handlers = {name: getattr(library, symbol) for name, symbol in TARGETS.items()}
    library.UnetOnednnProbe.restype = ctypes.c_char_p
    library.UnetOnednnImpl.restype = ctypes.c_char_p
  except (OSError, AttributeError) as e:
    raise native.NativeKernelError(f'loading {path} failed: {e}') from e
  problem = library.UnetOnednnProbe().decode()
  if problem:
    raise native.NativeKernelError(f'oneDNN found no usable CPU engine: {problem}')
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform='cpu')
  _state['library'] = library  # keep the handle alive


def ensure_available() -> None:
  """Builds and registers the FFI targets if needed; raises `NativeKernelError` if it
  can't (the reason is kept: later calls raise the same)."""
  with _lock:
    if 'error' in _state:
      raise native.NativeKernelError(_state['error'])
    if 'library' not in _state:
      try:
        _load()
      except native.NativeKernelError as e:
        _state['error'] = str(e)
        raise


def available() -> bool:
  """Whether oneDNN's convolutions can be used here; logs why not, once per process."""
  try:
    ensure_available()
    return True
  except native.NativeKernelError as e:
    if not _state.get('warned'):
      _state['warned'] = True
      logging.warning("oneDNN not available, using XLA's convolutions instead: %s", e)
    return False


def implementation(op: str, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> str:
  """oneDNN's implementation for a convolution part, e.g. 'brg_conv_fwd:avx2', with
  the activation layout the call would use (`act_block`, `blocked_wgrad_activations`).

  Args:
    op: 'forward', 'input_grad' or 'kernel_grad'.
    x_shape: the convolution's input, `[N, *spatial, C]`.
    kernel_shape: `[*kernel_spatial, C, O]`.
  """
  ensure_available()
  ops = ('forward', 'input_grad', 'kernel_grad')
  if op not in ops:
    raise ValueError(f'op={op!r} is not one of {ops}.')
  ndim = len(x_shape) - 2
  xs = (ctypes.c_int64 * len(x_shape))(*x_shape)
  ks = (ctypes.c_int64 * ndim)(*kernel_shape[:ndim])
  c, o = kernel_shape[-2:]
  block = act_block(ndim, c, o)
  impl = _state['library'].UnetOnednnImpl(
    ctypes.c_int64(ops.index(op)),
    ctypes.c_int64(ndim),
    xs,
    ks,
    ctypes.c_int64(o),
    ctypes.c_int64(int(BLOCKED_WEIGHTS)),
    ctypes.c_int64(
      op == 'kernel_grad' and not block and blocked_wgrad_activations(ndim, c, o)
    ),
    ctypes.c_int64(block),
  )
  return impl.decode()


def _check(name, x, kernel_rank, *arrays):
  if any(a.dtype != jnp.float32 for a in arrays):
    raise ValueError(
      f'{name}: the oneDNN convolutions take float32; got'
      f' {", ".join(str(a.dtype) for a in arrays)}.'
    )
  if x.ndim not in (4, 5) or kernel_rank != x.ndim:
    raise ValueError(
      f'{name}: a 2D convolution takes [N, H, W, C] and an HWIO kernel, a 3D one'
      f' [N, D, H, W, C] and a DHWIO kernel; got {x.shape} and a rank-{kernel_rank}'
      ' kernel.'
    )
  ensure_available()


def _call(target, out_shape, a, b, blocked, blocked_activations=False, block=0):
  blocked = BLOCKED_WEIGHTS if blocked is None else blocked
  out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method='sequential')(
    a,
    b,
    blocked_weights=np.int64(blocked),
    blocked_activations=np.int64(blocked_activations),
    act_block=np.int64(block),
  )


def _blocked_shape(shape, block):
  n, *spatial, c = shape
  return (n, c // block, *spatial, block)


def _block_for(block, ndim, in_channels, out_channels, name):
  if block is None:
    return act_block(ndim, in_channels, out_channels)
  if block not in BLOCKS or (block and (in_channels % block or out_channels % block)):
    raise ValueError(
      f'{name}: block={block!r} must be one of {BLOCKS} and divide both channel'
      f' counts ({in_channels} in, {out_channels} out).'
    )
  return block


def _activation_call(target, out_shape, a, b, blocked_weights, block, *, wgrad=False):
  """`_call` on channels-last activations, in channel blocks of `block` around the
  call when it is not 0: `a` and the result (the forward pass, the input gradient),
  or `a` and `b` (the kernel gradient, `wgrad`)."""
  if not block:
    return _call(target, out_shape, a, b, blocked_weights)
  if wgrad:
    return _call(
      target,
      out_shape,
      to_blocked(a, block),
      to_blocked(b, block),
      blocked_weights,
      block=block,
    )
  y = _call(
    target,
    _blocked_shape(out_shape, block),
    to_blocked(a, block),
    b,
    blocked_weights,
    block=block,
  )
  return from_blocked(y)


def conv_same(
  x: jax.Array,
  kernel: jax.Array,
  *,
  blocked_weights: bool | None = None,
  block: int | None = None,
) -> jax.Array:
  """Stride-1 'same' 2D or 3D convolution by oneDNN, as XLA's 'SAME'.

  Args:
    x: `[N, H, W, C]` or `[N, D, H, W, C]`, float32.
    kernel: `[kh, kw, C, O]` (HWIO) or `[kd, kh, kw, C, O]` (DHWIO), float32; pads
      `(k - 1) // 2` before and the rest after each spatial axis.
    blocked_weights: let oneDNN choose the kernel's layout; None: `BLOCKED_WEIGHTS`
      as it is when the call is traced.
    block: hand oneDNN the activations in channel blocks of this size (0:
      channels-last; 8 or 16, dividing C and O); None: `act_block(ndim, C, O)` when
      the call is traced.

  Returns:
    `[N, H, W, O]` or `[N, D, H, W, O]`.
  """
  _check('onednn.conv_same', x, kernel.ndim, x, kernel)
  block = _block_for(block, x.ndim - 2, *kernel.shape[-2:], 'onednn.conv_same')
  out_shape = x.shape[:-1] + kernel.shape[-1:]
  return _activation_call(_CONV, out_shape, x, kernel, blocked_weights, block)


def conv_same_input_grad(
  g: jax.Array,
  kernel: jax.Array,
  *,
  blocked_weights: bool | None = None,
  block: int | None = None,
) -> jax.Array:
  """dL/dx of `conv_same(x, kernel)` given its output gradient `g` `[N, *spatial, O]`
  (oneDNN's backward-data primitive); returns `[N, *spatial, C]`. Options as in
  `conv_same`."""
  _check('onednn.conv_same_input_grad', g, kernel.ndim, g, kernel)
  block = _block_for(block, g.ndim - 2, *kernel.shape[-2:], 'onednn.conv_same_input_grad')
  out_shape = g.shape[:-1] + kernel.shape[-2:-1]
  return _activation_call(_INPUT_GRAD, out_shape, g, kernel, blocked_weights, block)


def conv_weight_grad(
  x: jax.Array,
  g: jax.Array,
  kernel_spatial: tuple[int, ...],
  *,
  blocked_weights: bool | None = None,
  blocked_activations: bool | None = None,
  block: int | None = None,
) -> jax.Array:
  """dL/dK of `conv_same(x, kernel)` (oneDNN's backward-weights primitive).

  Args:
    x: the convolution's input, `[N, *spatial, C]`, float32.
    g: the gradient of its output, `[N, *spatial, O]`, float32.
    kernel_spatial: the kernel's spatial sizes.
    blocked_weights: as in `conv_same`.
    blocked_activations: where `block` is 0, let oneDNN choose the layout of `x` and
      `g` (reordered from channels-last inside the call); None:
      `blocked_wgrad_activations` when the call is traced.
    block: as in `conv_same`.

  Returns:
    `[*kernel_spatial, C, O]` (HWIO or DHWIO).
  """
  _check('onednn.conv_weight_grad', x, len(kernel_spatial) + 2, x, g)
  if g.shape[:-1] != x.shape[:-1]:
    raise ValueError(
      f'onednn.conv_weight_grad: x {x.shape} and g {g.shape} must agree on all but'
      ' the channel axis.'
    )
  c, o = x.shape[-1], g.shape[-1]
  block = _block_for(block, x.ndim - 2, c, o, 'onednn.conv_weight_grad')
  shape = tuple(kernel_spatial) + (c, o)
  if block:
    return _activation_call(_WGRAD, shape, x, g, blocked_weights, block, wgrad=True)
  if blocked_activations is None:
    blocked_activations = blocked_wgrad_activations(x.ndim - 2, c, o)
  return _call(_WGRAD, shape, x, g, blocked_weights, blocked_activations)
