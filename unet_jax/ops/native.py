"""C++ kernels for XLA:CPU, compiled on the machine at first use and called through FFI.

Stride-1 'same' 2D and 3D convolutions (`native/conv.cc`): the forward pass
(`conv_same`), which is also the input gradient (`conv_same_input_grad`), and the
kernel gradient (`conv_weight_grad`), which XLA:CPU computes far below its
matrix-product rate (benchmarks/RESULTS.md, "Train step against the same network in
PyTorch"). They read the input in place, skipping taps outside it, so neither a
padded copy nor, in 3D, a copy with the depth neighbours on the channel axis is
made. `winograd=True` computes all three for 3 x 3 kernels by Winograd's minimal
filtering: the forward pass by F(4x4, 3x3) (4 times fewer multiply-adds) or, on small
planes of many channels, F(2x2, 3x3) (2.25 times fewer), the kernel gradient by
F(3x3, 4x4) or, on small planes, F(3x3, 2x2). `unet_jax.ops.conv` uses them as
`weight_grad='native'`, `native_forward=True` and `winograd=True`.
Also max pooling over windows that tile the input (`max_pool`), which keeps the
index of each window's first maximum so that its gradient (`max_pool_grad`) is a
scatter; XLA:CPU builds that gradient from an index tensor per spatial axis.

Building. The source ships with the package. On first use it is compiled with the
machine's C++ compiler (`$CXX`, else `c++`) for the CPU it runs on (`-O3
-march=native`) against the FFI headers of the installed jaxlib, into
`$UNET_JAX_CACHE_DIR` (default `~/.cache/unet_jax`, or the system temp folder when
that is not writable). The file name holds a hash of the source, the compiler, the
flags, the jaxlib version and the CPU's feature flags, so a changed source, jaxlib or
CPU gets its own build; the build is written to a temporary name and renamed, so
concurrent processes never load a half-written file. A build takes a few seconds.

Failure. `available()` is False when there is no compiler, the build fails, the
backend is not the CPU, or `UNET_JAX_NATIVE=0` is set; the first failure is logged as
a warning with the compiler's message, and `UNet(kernels='auto')` falls back to
XLA's (`policy.auto`). Asking for the kernels explicitly (`kernels='native'`, or a
`KernelPolicy` with native fields) when they are not available raises
`NativeKernelError` with that message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).resolve().parent / 'native' / 'conv.cc'
# FFI target name: symbol in the library.
_CONV, _WGRAD = 'unet_jax_conv', 'unet_jax_conv_wgrad'
_CONV_WINOGRAD, _WGRAD_WINOGRAD = 'unet_jax_conv_winograd', 'unet_jax_conv_winograd_wgrad'
_CONV_WINOGRAD_TILE = 'unet_jax_conv_winograd_tile'
_WGRAD_WINOGRAD_TILE = 'unet_jax_conv_winograd_wgrad_tile'
_POOL, _POOL_GRAD = 'unet_jax_max_pool', 'unet_jax_max_pool_grad'
TARGETS = {
  _WGRAD: 'UnetConvWgrad',
  _CONV: 'UnetConv',
  _CONV_WINOGRAD: 'UnetConvWinograd',
  _CONV_WINOGRAD_TILE: 'UnetConvWinogradTile',
  _WGRAD_WINOGRAD: 'UnetConvWinogradWgrad',
  _WGRAD_WINOGRAD_TILE: 'UnetConvWinogradWgradTile',
  _POOL: 'UnetMaxPool',
  _POOL_GRAD: 'UnetMaxPoolGrad',
}
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


def _lanes_flags() -> tuple[str, ...]:
  """`UNET_JAX_NATIVE_LANES` (8 or 16): the kernels' vector width, for tests and A/Bs.

  Unset: 16 floats where the compiler targets AVX-512F, else 8 (`native/conv.cc`,
  `kLanes`). Either width computes the same function on any x86-64 CPU (16 on an
  AVX2 CPU as pairs of registers, slowly), so both are tested wherever CI runs.
  """
  lanes = os.environ.get('UNET_JAX_NATIVE_LANES', '')
  if lanes not in ('', '8', '16'):
    raise ValueError(f'UNET_JAX_NATIVE_LANES must be 8 or 16 (or unset); got {lanes!r}.')
  return (f'-DUNET_JAX_LANES={lanes}',) if lanes else ()


FLAGS += _lanes_flags()

_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeKernelError(RuntimeError):
  """The native kernel could not be built or loaded; the message says why."""


def _compiler() -> str:
  cxx = os.environ.get('CXX', 'c++')
  path = shutil.which(cxx)
  if path is None:
    raise NativeKernelError(
      f'no C++ compiler: {cxx!r} is not on PATH (set $CXX, or install g++).'
    )
  return path


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('flags'):
          return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_has_avx512() -> bool:
  """Whether this CPU reports AVX-512F (`/proc/cpuinfo`): the kernels then compute on
  16-float vectors (`native/conv.cc`, `kLanes`), else on 8-float ones."""
  return 'avx512f' in _cpu_flags().split()


def cpu_is_measured() -> bool:
  """Whether this CPU reports AVX-512F, or AVX2 with FMA: the two instruction sets the
  kernels' register tiles are sized for and measured on (`policy.native_usable`)."""
  flags = _cpu_flags().split()
  return 'avx512f' in flags or ('avx2' in flags and 'fma' in flags)


def _cache_dir() -> pathlib.Path:
  explicit = os.environ.get('UNET_JAX_CACHE_DIR')
  candidates = (
    [pathlib.Path(explicit)]
    if explicit
    else [
      pathlib.Path.home() / '.cache' / 'unet_jax',
      pathlib.Path(tempfile.gettempdir()) / 'unet_jax',
    ]
  )
  for path in candidates:
    try:
      path.mkdir(parents=True, exist_ok=True)
      if os.access(path, os.W_OK):
        return path
    except OSError:
      continue
  raise NativeKernelError(
    f'no writable folder for the native kernel build among {candidates}'
    ' (set $UNET_JAX_CACHE_DIR).'
  )


def build(
  *,
  verbose: bool = False,
  source: pathlib.Path | None = None,
  flags: tuple[str, ...] | None = None,
  link: tuple[str, ...] = (),
) -> pathlib.Path:
  """Compiles `source` if no matching build is cached; returns the library's path.

  Args:
    verbose: log the compiler's command line.
    source: the C++ file; None: the module's `SOURCE`, `native/conv.cc` (read at
      call time). `unet_jax.ops.onednn` builds `native/onednn.cc` here too, with its
      own `flags` and `link`.
    flags: compiler flags, None: the module's `FLAGS`; jaxlib's FFI include folder is
      added.
    link: arguments after the source (include folders, libraries, rpaths); part of
      the cache key, so another installed library gets its own build.

  Raises:
    NativeKernelError: no compiler, no writable cache folder, or a failed build
      (the message ends with the compiler's output).
  """
  source = SOURCE if source is None else source
  flags = FLAGS if flags is None else flags
  cxx = _compiler()
  version = subprocess.run(
    [cxx, '--version'], capture_output=True, text=True, check=False
  ).stdout.splitlines()[:1]
  include = jax.ffi.include_dir()
  key = hashlib.sha256(
    '\0'.join(
      [source.read_text(), cxx, *version, *flags, *link, jaxlib.__version__, _cpu_flags()]
    ).encode()
  ).hexdigest()[:16]
  lib = _cache_dir() / f'{source.stem}_{key}.so'
  if lib.exists():
    return lib
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=lib.parent)
  os.close(fd)
  cmd = [cxx, *flags, f'-I{include}', str(source), *link, '-o', tmp]
  if verbose:
    logging.info('Building the native kernel: %s', ' '.join(cmd))
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(tmp)
    raise NativeKernelError(
      f'building {source.name} failed (exit {result.returncode}): {" ".join(cmd)}\n'
      f'{result.stderr[-2000:]}'
    )
  os.replace(tmp, lib)
  return lib


def _load() -> None:
  """Builds, loads and registers the FFI target once per process; raises on failure."""
  if os.environ.get('UNET_JAX_NATIVE', '1') == '0':
    raise NativeKernelError('UNET_JAX_NATIVE=0 turns the native kernels off.')
  if jax.default_backend() != 'cpu':
    raise NativeKernelError(
      f'the native kernels run on the CPU only; the backend is {jax.default_backend()!r}.'
    )
  path = build(verbose=True)
  try:
    library = ctypes.cdll.LoadLibrary(str(path))
    handlers = {name: getattr(library, symbol) for name, symbol in TARGETS.items()}
  except (OSError, AttributeError) as e:
    raise NativeKernelError(f'loading {path} failed: {e}') from e
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform='cpu')
  _state['library'] = library  # keep the handle alive


def ensure_available() -> None:
  """Builds and registers the kernel if needed; raises `NativeKernelError` if it can't."""
  with _lock:
    if 'error' in _state:
      raise NativeKernelError(_state['error'])
    if 'library' not in _state:
      try:
        _load()
      except NativeKernelError as e:
        _state['error'] = str(e)
        raise


def available() -> bool:
  """Whether the kernel can be used here; logs why not, once per process."""
  try:
    ensure_available()
    return True
  except NativeKernelError as e:
    if not _state.get('warned'):
      _state['warned'] = True
      logging.warning(
        "Native CPU kernels not available, using XLA's convolutions instead: %s", e
      )
    return False


def _pads(k: int) -> tuple[int, int]:
  return (k - 1) // 2, k - 1 - (k - 1) // 2  # XLA's 'SAME' for stride 1


def _check(x, kernel_rank, name, *arrays):
  if any(a.dtype != jnp.float32 for a in arrays):
    raise ValueError(
      f'{name}: the native kernels take float32; got'
      f' {", ".join(str(a.dtype) for a in arrays)}.'
    )
  if x.ndim not in (4, 5) or kernel_rank != x.ndim:
    raise ValueError(
      f'{name}: a 2D convolution takes [N, H, W, C] and an HWIO kernel, a 3D one'
      f' [N, D, H, W, C] and a DHWIO kernel; got {x.shape} and a rank-{kernel_rank}'
      ' kernel.'
    )
  ensure_available()


def _to_3d(x):
  """[N, H, W, C] -> [N, 1, H, W, C]: the kernels take rank 5; 3D is unchanged."""
  return x[:, None] if x.ndim == 4 else x


def _ffi(target, out_shape, a, b, pads, **attributes):
  pads = (0,) * (3 - len(pads)) + tuple(pads)
  out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method='sequential')(
    a,
    b,
    pad_d=np.int64(pads[0]),
    pad_h=np.int64(pads[1]),
    pad_w=np.int64(pads[2]),
    **{name: np.int64(value) for name, value in attributes.items()},
  )


@functools.partial(
  jax.jit, static_argnums=(2,), static_argnames=('winograd', 'winograd_tile')
)
def conv_weight_grad(
  x: jax.Array,
  g: jax.Array,
  kernel_spatial: tuple[int, ...],
  *,
  winograd: bool = False,
  winograd_tile: int | None = None,
) -> jax.Array:
  """dL/dK of a stride-1 'same' 2D or 3D convolution, by the native kernel.

  Args:
    x: the convolution's input, `[N, H, W, C]` or `[N, D, H, W, C]`, float32.
    g: the gradient of its output, `[N, H, W, O]` or `[N, D, H, W, O]`, float32.
    kernel_spatial: `(kh, kw)` or `(kd, kh, kw)`; XLA's 'SAME' padding, `(k - 1) //
      2` before.
    winograd: by Winograd's minimal filtering (`unet_jax/ops/native/conv.cc`), the
      same result to float rounding: F(3x3, 4x4), 4 times fewer multiply-adds, where
      a plane holds 64 tiles of 4 x 4 pixels, else F(3x3, 2x2), 2.25 times fewer
      (`wgrad_tile` there). Kernels 3 x 3 in H and W only (`winograd_suits`).
    winograd_tile: None for that choice; 2 or 4 for F(3x3, 2x2) or F(3x3, 4x4)
      whatever the shape (tests and A/Bs).

  Returns:
    `[*kernel_spatial, C, O]` (HWIO or DHWIO).

  Raises:
    NativeKernelError: the kernel is not available here.
    ValueError: shapes or dtypes the kernel does not take.
  """
  _check(x, len(kernel_spatial) + 2, 'conv_weight_grad', x, g)
  if g.shape[:-1] != x.shape[:-1]:
    raise ValueError(
      f'conv_weight_grad: x {x.shape} and g {g.shape} must agree on'
      ' all but the channel axis.'
    )
  target, attributes = _winograd_target(
    kernel_spatial, winograd, winograd_tile, (_WGRAD, _WGRAD_WINOGRAD, _WGRAD_WINOGRAD_TILE)
  )
  shape = tuple(kernel_spatial) + (x.shape[-1], g.shape[-1])
  dk = _ffi(
    target,
    (1,) * (5 - len(shape)) + shape,
    _to_3d(x),
    _to_3d(g),
    [_pads(k)[0] for k in kernel_spatial],
    **attributes,
  )
  return dk.reshape(shape)


def winograd_suits(kernel_spatial: tuple[int, ...]) -> bool:
  """Whether the `winograd=True` kernels take a kernel of these spatial sizes.

  The Winograd kernels (F(4x4, 3x3) or F(2x2, 3x3); F(3x3, 4x4) or F(3x3, 2x2) for
  the kernel gradient) take kernels 3 x 3 in H and W ('same' pads (1, 1) there), with
  any depth size in 3D.
  """
  return tuple(kernel_spatial[-2:]) == (3, 3)


def _target(kernel_spatial, winograd, direct, by_winograd):
  if not winograd:
    return direct
  if not winograd_suits(kernel_spatial):
    raise ValueError(
      f'winograd=True takes kernels 3 x 3 in H and W; got spatial'
      f' sizes {tuple(kernel_spatial)}.'
    )
  return by_winograd


def _winograd_target(kernel_spatial, winograd, winograd_tile, targets):
  """The FFI target of (direct, Winograd, Winograd with a given tile) and its extra
  attributes."""
  direct, by_winograd, by_tile = targets
  if winograd_tile is None:
    return _target(kernel_spatial, winograd, direct, by_winograd), {}
  if not winograd or winograd_tile not in (2, 4):
    raise ValueError(
      f'winograd_tile={winograd_tile!r}: takes 2 or 4, with winograd=True'
      f' (winograd={winograd!r}).'
    )
  _target(kernel_spatial, winograd, direct, by_winograd)  # checks the kernel
  return by_tile, {'tile': winograd_tile}


def _conv_target(kernel_spatial, winograd, winograd_tile):
  """The forward kernel's FFI target and its extra attributes."""
  return _winograd_target(
    kernel_spatial, winograd, winograd_tile, (_CONV, _CONV_WINOGRAD, _CONV_WINOGRAD_TILE)
  )


@functools.partial(jax.jit, static_argnames=('winograd', 'winograd_tile'))
def conv_same(
  x: jax.Array,
  kernel: jax.Array,
  *,
  winograd: bool = False,
  winograd_tile: int | None = None,
) -> jax.Array:
  """Stride-1 'same' 2D or 3D convolution by the native kernel, as XLA's 'SAME'.

  Args:
    x: `[N, H, W, C]` or `[N, D, H, W, C]`, float32.
    kernel: `[kh, kw, C, O]` (HWIO) or `[kd, kh, kw, C, O]` (DHWIO), float32.
    winograd: compute it by Winograd's minimal filtering (`unet_jax/ops/native/conv.cc`),
      the same function to float rounding: F(4x4, 3x3), 4 times fewer multiply-adds,
      or F(2x2, 3x3), 2.25 times fewer, on small planes of many channels, where the
      larger transformed kernel of F(4x4, 3x3) costs more than it saves
      (`forward_tile` there). Kernels 3 x 3 in H and W only (`winograd_suits`).
    winograd_tile: None for that choice; 2 or 4 for F(2x2, 3x3) or F(4x4, 3x3)
      whatever the shape (tests and A/Bs).

  Returns:
    `[N, H, W, O]` or `[N, D, H, W, O]`. No padded copy of `x` is made: the kernel
    skips the taps that fall outside it.
  """
  _check(x, kernel.ndim, 'conv_same', x, kernel)
  target, attributes = _conv_target(kernel.shape[:-2], winograd, winograd_tile)
  out_shape = x.shape[:-1] + kernel.shape[-1:]
  y = _ffi(
    target,
    _to_3d(x).shape[:-1] + kernel.shape[-1:],
    _to_3d(x),
    kernel.reshape((1,) * (5 - kernel.ndim) + kernel.shape),
    [_pads(k)[0] for k in kernel.shape[:-2]],
    **attributes,
  )
  return y.reshape(out_shape)


@functools.partial(jax.jit, static_argnames=('winograd', 'winograd_tile'))
def conv_same_input_grad(
  g: jax.Array,
  kernel: jax.Array,
  *,
  winograd: bool = False,
  winograd_tile: int | None = None,
) -> jax.Array:
  """dL/dx of `conv_same(x, kernel)` given its output gradient `g`.

  The same kernel as the forward pass: a convolution of `g` with the kernel flipped
  in space and its channel axes swapped, padded the other way round (`k - 1 - p`
  before, which differs from `p` for even kernel sizes). `winograd` and
  `winograd_tile` as in `conv_same` (a 3 x 3 kernel's pads are 1 both ways).
  """
  _check(g, kernel.ndim, 'conv_same_input_grad', g, kernel)
  spatial = kernel.shape[:-2]
  target, attributes = _conv_target(spatial, winograd, winograd_tile)
  flipped = jnp.swapaxes(kernel[(slice(None, None, -1),) * len(spatial)], -2, -1)
  dx = _ffi(
    target,
    _to_3d(g).shape[:-1] + kernel.shape[-2:-1],
    _to_3d(g),
    flipped.reshape((1,) * (5 - kernel.ndim) + flipped.shape),
    [_pads(k)[1] for k in spatial],
    **attributes,
  )
  return dx.reshape(g.shape[:-1] + kernel.shape[-2:-1])


def _window_3d(x, window, name):
  """The window checked against `x`, as 3 sizes (depth 1 in 2D)."""
  window = tuple(int(w) for w in window)
  if len(window) != x.ndim - 2 or any(w < 1 for w in window):
    raise ValueError(
      f'{name}: window {window} must have one positive size per spatial axis of {x.shape}.'
    )
  if any(size % w for size, w in zip(x.shape[1:-1], window)):
    raise ValueError(
      f'{name}: spatial shape {x.shape[1:-1]} is not a multiple of the window {window}.'
    )
  return (1,) * (3 - len(window)) + window


@functools.partial(jax.jit, static_argnums=(1,))
def max_pool(x: jax.Array, window: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """`nn.max_pool(x, window, strides=window, padding='VALID')`, and where each max is.

  Args:
    x: `[N, H, W, C]` or `[N, D, H, W, C]`, float32, each spatial size a multiple of
      its window.
    window: one size per spatial axis, at most 255 positions in all.

  Returns:
    `(y, index)`: the pooled `[N, H/wh, W/ww, C]` (or 3D), and, as uint8 of the same
    shape, each window's first maximum in row-major order (NaN counts as the maximum).
  """
  _check(x, x.ndim, 'max_pool', x)
  win = _window_3d(x, window, 'max_pool')
  x5 = _to_3d(x)
  pooled = tuple(s // w for s, w in zip(x5.shape[1:4], win))
  shape = x5.shape[:1] + pooled + x5.shape[-1:]
  y, index = jax.ffi.ffi_call(
    _POOL,
    (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.uint8)),
    vmap_method='sequential',
  )(x5, wd=np.int64(win[0]), wh=np.int64(win[1]), ww=np.int64(win[2]))
  out_shape = (
    x.shape[:1] + tuple(s // w for s, w in zip(x.shape[1:-1], window)) + (x.shape[-1],)
  )
  return y.reshape(out_shape), index.reshape(out_shape)


@functools.partial(jax.jit, static_argnums=(2,))
def max_pool_grad(g: jax.Array, index: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """dL/dx of `max_pool(x, window)[0]` given its output gradient `g` and `index`.

  Each window's gradient goes to its first maximum (`index`), the rest is zero: the
  gradient of `nn.max_pool`.
  """
  _check(g, g.ndim, 'max_pool_grad', g)
  if index.shape != g.shape or index.dtype != jnp.uint8:
    raise ValueError(
      f'max_pool_grad: index {index.shape} {index.dtype} must be uint8'
      f' of the shape of g {g.shape}.'
    )
  window = tuple(int(w) for w in window)
  x_shape = (
    g.shape[:1] + tuple(s * w for s, w in zip(g.shape[1:-1], window)) + (g.shape[-1],)
  )
  win = (1,) * (3 - len(window)) + window
  x5_shape = ((x_shape[0], 1) + x_shape[1:]) if len(x_shape) == 4 else x_shape
  dx = jax.ffi.ffi_call(
    _POOL_GRAD, jax.ShapeDtypeStruct(x5_shape, jnp.float32), vmap_method='sequential'
  )(_to_3d(g), _to_3d(index), wd=np.int64(win[0]), wh=np.int64(win[1]), ww=np.int64(win[2]))
  return dx.reshape(x_shape)
