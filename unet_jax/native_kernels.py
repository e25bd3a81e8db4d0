"""C++ kernels for XLA:CPU, compiled on the machine at first use and called through FFI.

Stride-1 'same' 2D convolutions (`native/conv2d.cc`): the forward pass
(`conv2d_same`), which is also the input gradient (`conv2d_same_input_grad`), and the
kernel gradient (`conv2d_weight_grad`), which XLA:CPU computes far below its
matrix-product rate (benchmarks/RESULTS.md, "Train step against the same network in
PyTorch"). `unet_jax.conv` uses them as `weight_grad='native'` and
`native_forward=True`.

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
a warning with the compiler's message, and the default formulation falls back to
XLA's. Asking for the kernel explicitly (`conv_weight_grad='native'`) when it is not
available raises `NativeKernelError` with that message.
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

SOURCE = pathlib.Path(__file__).resolve().parent / 'native' / 'conv2d.cc'
# FFI target name: symbol in the library.
TARGETS = {'unet_jax_conv_wgrad': 'UnetConvWgrad', 'unet_jax_conv2d': 'UnetConv2d'}
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')

_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeKernelError(RuntimeError):
  """The native kernel could not be built or loaded; the message says why."""


def _compiler() -> str:
  cxx = os.environ.get('CXX', 'c++')
  path = shutil.which(cxx)
  if path is None:
    raise NativeKernelError(
        f'no C++ compiler: {cxx!r} is not on PATH (set $CXX, or install g++).')
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


def _cache_dir() -> pathlib.Path:
  explicit = os.environ.get('UNET_JAX_CACHE_DIR')
  candidates = ([pathlib.Path(explicit)] if explicit else
                [pathlib.Path.home() / '.cache' / 'unet_jax',
                 pathlib.Path(tempfile.gettempdir()) / 'unet_jax'])
  for path in candidates:
    try:
      path.mkdir(parents=True, exist_ok=True)
      if os.access(path, os.W_OK):
        return path
    except OSError:
      continue
  raise NativeKernelError(
      f'no writable folder for the native kernel build among {candidates}'
      ' (set $UNET_JAX_CACHE_DIR).')


def build(*, verbose: bool = False) -> pathlib.Path:
  """Compiles `SOURCE` if no matching build is cached; returns the library's path.

  Raises:
    NativeKernelError: no compiler, no writable cache folder, or a failed build
      (the message ends with the compiler's output).
  """
  cxx = _compiler()
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True,
                           check=False).stdout.splitlines()[:1]
  include = jax.ffi.include_dir()
  key = hashlib.sha256('\0'.join(
      [SOURCE.read_text(), cxx, *version, *FLAGS, jaxlib.__version__,
       _cpu_flags()]).encode()).hexdigest()[:16]
  lib = _cache_dir() / f'conv2d_{key}.so'
  if lib.exists():
    return lib
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=lib.parent)
  os.close(fd)
  cmd = [cxx, *FLAGS, f'-I{include}', str(SOURCE), '-o', tmp]
  if verbose:
    logging.info('Building the native kernel: %s', ' '.join(cmd))
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(tmp)
    raise NativeKernelError(
        f'building {SOURCE.name} failed (exit {result.returncode}): {" ".join(cmd)}\n'
        f'{result.stderr[-2000:]}')
  os.replace(tmp, lib)
  return lib


def _load() -> None:
  """Builds, loads and registers the FFI target once per process; raises on failure."""
  if os.environ.get('UNET_JAX_NATIVE', '1') == '0':
    raise NativeKernelError('UNET_JAX_NATIVE=0 turns the native kernels off.')
  if jax.default_backend() != 'cpu':
    raise NativeKernelError(
        f'the native kernels run on the CPU only; the backend is'
        f' {jax.default_backend()!r}.')
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
      logging.warning('Native CPU kernels not available, using XLA\'s'
                      ' convolutions instead: %s', e)
    return False


@functools.partial(jax.jit, static_argnums=(2,))
def conv2d_weight_grad(x: jax.Array, g: jax.Array,
                       kernel_spatial: tuple[int, int]) -> jax.Array:
  """dL/dK of a stride-1 'same' 2D convolution, `[kh, kw, C, O]`, by the native kernel.

  Args:
    x: the convolution's input, `[N, H, W, C]`, float32.
    g: the gradient of its output, `[N, H, W, O]`, float32.
    kernel_spatial: `(kh, kw)`; XLA's 'SAME' padding, `(k - 1) // 2` before.

  Raises:
    NativeKernelError: the kernel is not available here.
    ValueError: shapes or dtypes the kernel does not take.
  """
  _check_f32(x, g)
  if x.ndim != 4 or g.ndim != 4 or x.shape[:3] != g.shape[:3]:
    raise ValueError(f'x {x.shape} and g {g.shape} must be [N, H, W, C] and'
                     ' [N, H, W, O] with the same N, H, W.')
  ensure_available()
  kh, kw = kernel_spatial
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call('unet_jax_conv_wgrad', out, vmap_method='sequential')(x, g)


def _pads(k: int) -> tuple[int, int]:
  return (k - 1) // 2, k - 1 - (k - 1) // 2  # XLA's 'SAME' for stride 1


def _check_f32(*arrays):
  if any(a.dtype != jnp.float32 for a in arrays):
    raise ValueError('the native kernels take float32; got'
                     f' {", ".join(str(a.dtype) for a in arrays)}.')


@jax.jit
def conv2d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' 2D convolution by the native kernel, as XLA's 'SAME'.

  Args:
    x: `[N, H, W, C]`, float32.
    kernel: `[kh, kw, C, O]` (HWIO), float32.

  Returns:
    `[N, H, W, O]`.
  """
  _check_f32(x, kernel)
  ensure_available()
  kh, kw = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0), _pads(kh), _pads(kw), (0, 0)))
  out = jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call('unet_jax_conv2d', out, vmap_method='sequential')(xp, kernel)


@jax.jit
def conv2d_same_input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """dL/dx of `conv2d_same(x, kernel)` given its output gradient `g`, `[N, H, W, C]`.

  The same kernel as the forward pass: a convolution of `g`, padded the other way
  round, with the kernel flipped in space and its channel axes swapped.
  """
  _check_f32(g, kernel)
  ensure_available()
  kh, kw = kernel.shape[:2]
  (hl, hh), (wl, wh) = _pads(kh), _pads(kw)
  gp = jnp.pad(g, ((0, 0), (hh, hl), (wh, wl), (0, 0)))
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  out = jax.ShapeDtypeStruct(g.shape[:3] + kernel.shape[2:3], jnp.float32)
  return jax.ffi.ffi_call('unet_jax_conv2d', out, vmap_method='sequential')(
      gp, flipped)
