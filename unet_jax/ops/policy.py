"""Which kernel computes each convolution and pooling of the U-Net: one policy object.

`models.UNet(kernels=...)` takes a `KernelPolicy`, or one of its names:

- `'auto'` (the default): the choice for `jax.default_backend()` (`AUTO`). On the CPU,
  the faster formulations of `conv.py` and, in a single-device process, for float32
  convolutions: on a CPU with AVX-512F or AVX2 where they build, the native C++
  kernels of `native.py` and their pooling (`native_usable`); else XLA's. On GPU
  and TPU `'xla'`.
- `'xla'`: XLA's own kernels on every backend, nothing native: `lax` convolutions and
  `nn.max_pool`, with the kernel-equals-stride transposed convolution as a matrix
  product and depth-to-space (`conv.ConvTranspose`). `nn.ConvTranspose` lowers it to
  a convolution with lhs dilation, the transposed-convolution path JAX users have
  measured 5 to 32 times slower than PyTorch on CUDA (jax-ml/jax#8537, #31662,
  #23783); the product has none. What `models/memory.py` compiles and what
  `inference/export.py` serialises for CPU, CUDA and TPU.
- `'native'`: the CPU's choice without its fallback: an error (`NativeKernelError`,
  saying why) where the native kernels cannot be built, instead of XLA.
- `'onednn'`: the CPU's formulations with every float32 stride-1 'same' convolution
  (forward, input gradient, kernel gradient) by oneDNN's primitives
  (`unet_jax.ops.onednn`, the `onednn` extra), 2D max pooling by the native kernel
  (`ONEDNN`); an error (`NativeKernelError`) where oneDNN or the native kernels are
  not installed or cannot be built.

`KernelPolicy()`, every field off, is the plain formulation (`nn.ConvTranspose`
included): the reference the tests compare the others with.

A policy changes neither the parameters (names, shapes, dtypes, initialisation) nor
the function beyond float rounding, so it is not part of a checkpoint's state: a run
may resume or predict under another one. The size rules (which image widths and
channel counts the native kernels take) stay with the kernels, in `conv.py`.

    policy = policy_lib.resolve('auto')             # a KernelPolicy for this process
    slower = policy.replace(native_winograd=False)  # one lever off, for an A/B
    model = UNet(num_classes=2, kernels=slower)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax.ops import conv
from unet_jax.ops import native as native_kernels
from unet_jax.ops import onednn as onednn_kernels

NDIMS = (2, 3)
NAMES = ('auto', 'xla', 'native', 'onednn')


def _dims(value: Any, name: str) -> tuple[int, ...]:
  """True -> (2, 3), False or None -> (), a sequence of dimensionalities -> sorted."""
  if value is None or isinstance(value, bool):
    return NDIMS if value else ()
  dims = tuple(sorted({int(d) for d in value}))
  if not set(dims) <= set(NDIMS):
    raise ValueError(
      f'KernelPolicy.{name}={value!r}: give a bool or numbers of spatial axes among'
      f' {NDIMS}.'
    )
  return dims


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
  """The formulation and kernel of each kind of operation (`conv.py`, `native.py`).

  Fields that take dimensionalities hold the numbers of spatial axes (2, 3) they
  apply to; True means both and False neither.

  Attributes:
    transpose_as_matmul: the kernel-equals-stride transposed convolution as a matrix
      product and depth-to-space (`conv.ConvTranspose`), instead of
      `nn.ConvTranspose`.
    conv3d_as_2d: the 3D convolutions XLA computes as 2D ones over depth slices, the
      depth taps on the channel axis (`conv.conv3d_same(fold_depth=True)`); where a
      native field applies to 3D, the parts left to XLA are folded anyway.
    pointwise_as_matmul: 1x1 (1x1x1) convolutions as products over the channel axis.
    native_weight_grad: the kernel gradient of stride-1 'same' convolutions by the
      native kernel, in these dimensionalities (`conv.conv2d_same(weight_grad=
      'native')`).
    native_forward: their forward pass and input gradient by the native kernel.
    native_winograd: 3x3 (3x3xkd) convolutions by the native Winograd kernels
      (the forward pass and input gradient; the kernel gradient too where
      `native_weight_grad` applies).
    native_pool: float32 max pooling by the native kernel (`conv.max_pool_native`).
    onednn_conv: float32 stride-1 'same' convolutions (forward, input gradient and
      kernel gradient) by oneDNN, in these dimensionalities (`conv.conv2d_same(
      onednn=True)`); it takes precedence over the native convolution fields.
    upsample_as_stencil: 'bilinear' upsampling by factors of 1 and 2 as a fixed
      stencil of slices and products (`resize.upsample_2x`) instead of
      `jax.image.resize`'s weight matrices, in these dimensionalities (on the CPU
      it won in 2D and lost in 3D: benchmarks/RESULTS.md, "oneDNN on blocked
      activations, native pooling and the bilinear stencil").
    narrow_as_matmul: float32 stride-1 'same' convolutions on images narrower than
      `conv.PATCHES_MAX_WIDTH` (the U-Net's bottleneck) as one matrix product over
      gathered patches (`conv.conv_same_patches`), in these dimensionalities; it
      takes precedence over the native and oneDNN fields there. Pure XLA, so
      `without_native()` keeps it.
  """

  transpose_as_matmul: bool = False
  conv3d_as_2d: bool = False
  pointwise_as_matmul: bool = False
  native_weight_grad: tuple[int, ...] = ()
  native_forward: tuple[int, ...] = ()
  native_winograd: tuple[int, ...] = ()
  native_pool: tuple[int, ...] = ()
  onednn_conv: tuple[int, ...] = ()
  upsample_as_stencil: tuple[int, ...] = ()
  narrow_as_matmul: tuple[int, ...] = ()

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.startswith('native_') or field.name in _DIMS_FIELDS:
        object.__setattr__(self, field.name, _dims(value, field.name))
      elif not isinstance(value, bool):
        raise ValueError(f'KernelPolicy.{field.name}={value!r} must be a bool.')

  def replace(self, **changes: Any) -> KernelPolicy:
    """This policy with some fields changed (`dataclasses.replace`)."""
    return dataclasses.replace(self, **changes)

  @property
  def uses_native(self) -> bool:
    """Whether any operation asks for the native kernels."""
    return any(getattr(self, f) for f in _NATIVE_FIELDS)

  @property
  def uses_native_conv(self) -> bool:
    """Whether any convolution asks for the native kernels."""
    return bool(self.native_weight_grad or self.native_forward or self.native_winograd)

  def without_native(self) -> KernelPolicy:
    """The same formulations, with XLA's kernels where this one asks for native ones."""
    return self.replace(**{f: () for f in _NATIVE_FIELDS})

  @property
  def uses_onednn(self) -> bool:
    """Whether any convolution asks for oneDNN."""
    return bool(self.onednn_conv)

  def without_onednn(self) -> KernelPolicy:
    """The same formulations, with XLA's convolutions where this one asks for oneDNN."""
    return self.replace(onednn_conv=())

  def conv_general_dilated(self) -> Callable[..., jax.Array] | None:
    """The convolution for `nn.Conv(conv_general_dilated=...)`; None: `lax`'s own."""
    own = self.uses_native_conv or self.uses_onednn or self.narrow_as_matmul
    if not (self.conv3d_as_2d or self.pointwise_as_matmul or own):
      return None
    grad = lambda ndim: 'native' if ndim in self.native_weight_grad else 'xla'
    return conv.conv_general_dilated_fn(
      fold_depth=self.conv3d_as_2d,
      pointwise_as_matmul=self.pointwise_as_matmul,
      weight_grad=grad(2),
      weight_grad_3d=grad(3),
      native_forward=2 in self.native_forward,
      native_forward_3d=3 in self.native_forward,
      winograd=2 in self.native_winograd,
      winograd_3d=3 in self.native_winograd,
      onednn=2 in self.onednn_conv,
      onednn_3d=3 in self.onednn_conv,
      narrow_as_matmul=2 in self.narrow_as_matmul,
      narrow_as_matmul_3d=3 in self.narrow_as_matmul,
    )

  def max_pool(self, x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """`nn.max_pool(x, window, strides=window, padding='VALID')`, by this policy."""
    if x.ndim - 2 in self.native_pool and x.dtype == jnp.float32:
      return conv.max_pool_native(x, window)
    return nn.max_pool(x, window, strides=window, padding='VALID')


_DIMS_FIELDS = ('onednn_conv', 'upsample_as_stencil', 'narrow_as_matmul')
_NATIVE_FIELDS = ('native_weight_grad', 'native_forward', 'native_winograd', 'native_pool')

# No lhs-dilated convolution on any backend: the transposed convolutions as products.
XLA = KernelPolicy(transpose_as_matmul=True)
# The CPU's choice where the native kernels build; each lever's A/B on the whole
# train step is in benchmarks/RESULTS.md ("The levers").
# - transpose_as_matmul, pointwise_as_matmul, conv3d_as_2d: the first session's wins
#   (the fold keeps the 3D convolutions the native kernels do not take: bfloat16,
#   narrow images, few channels).
# - native_weight_grad: faster than XLA's kernel gradient in 2D and 3D.
# - native_forward: the forward pass and input gradient too; both won on the whole
#   step, 2D once narrow images were left to XLA (`conv.NATIVE_MIN_WIDTH`).
# - native_winograd: F(2x2, 3x3) and F(3x3, 2x2), 2.25 times fewer multiply-adds;
#   they won per layer from 16 wide and on the whole step. Both by F(4x4, 3x3) /
#   F(3x3, 4x4) since, where the larger transforms pay (`conv.cc`, `forward_tile`,
#   `wgrad_tile`).
# - native_pool: the first-max index as uint8, a scatter for the gradient.
# - narrow_as_matmul: the 8-wide 2D bottleneck as one product over its patches
#   (1.04x on the 2D step; 1.01x in 3D, so 2D only).
CPU = KernelPolicy(
  transpose_as_matmul=True,
  conv3d_as_2d=True,
  pointwise_as_matmul=True,
  upsample_as_stencil=(2,),
  narrow_as_matmul=(2,),
  native_weight_grad=NDIMS,
  native_forward=NDIMS,
  native_winograd=NDIMS,
  native_pool=NDIMS,
)
# The CPU's formulations with oneDNN's convolutions instead of the hand-written kernels:
# `kernels='onednn'` (not 'auto': the native kernels beat it, benchmarks/RESULTS.md,
# "The native kernels on 256-bit vectors"). 2D max pooling by the native kernel:
# beside oneDNN's convolutions it won in 2D and lost in 3D (benchmarks/RESULTS.md,
# "oneDNN on blocked activations").
ONEDNN = KernelPolicy(
  transpose_as_matmul=True,
  conv3d_as_2d=True,
  pointwise_as_matmul=True,
  upsample_as_stencil=(2,),
  onednn_conv=NDIMS,
  native_pool=(2,),
)
# What 'auto' starts from, by `jax.default_backend()`; a backend not named here gets
# `XLA` too. GPU and TPU: XLA's convolutions (cuDNN, the TPU's convolution units),
# the transposed ones as products (`XLA`); their max-pool gradient is XLA's
# select-and-scatter, which both compile natively. tests/lowering_test.py lowers
# the train and predict programs for 'cuda' and 'tpu' and checks them.
AUTO = {'cpu': CPU, 'gpu': XLA, 'tpu': XLA}


def native_usable() -> bool:
  """Whether 'auto' may call the native kernels in this process.

  Not when they cannot be built here (`native_kernels.available()`, which logs why,
  e.g. `UNET_JAX_NATIVE=0`), nor when the process sees more than one device: under
  `jit` over a mesh XLA's partitioner cannot split an FFI call by batch, and would
  gather every device's input to each device instead. Nor on a CPU with neither
  AVX-512F nor AVX2 and FMA (`native_kernels.cpu_is_measured`): the kernels' register
  tiles are sized for those two and measured only there; `kernels='native'` still
  asks for them elsewhere.
  """
  if jax.device_count() != 1:
    return False
  if not native_kernels.cpu_is_measured():
    if not _logged.get('isa'):
      _logged['isa'] = True
      logging.info(
        "This CPU has neither AVX-512F nor AVX2 with FMA: 'auto' keeps XLA's"
        ' convolutions, not the native kernels (measured on those two);'
        " kernels='native' or 'onednn' forces them."
      )
    return False
  return native_kernels.available()


_logged: dict[str, bool] = {}


def auto() -> KernelPolicy:
  """`AUTO[jax.default_backend()]`, without the native kernels where they are unusable
  (`native_usable`). oneDNN is never chosen by 'auto': on both CPUs measured the
  native kernels beat it on the whole step (benchmarks/RESULTS.md, "The native
  kernels on 256-bit vectors")."""
  policy = AUTO.get(jax.default_backend(), XLA)
  if policy.uses_native and not native_usable():
    policy = policy.without_native()
  return policy


def check(kernels: Any) -> None:
  """A ValueError unless `kernels` is one of `NAMES` or a `KernelPolicy`."""
  if isinstance(kernels, KernelPolicy) or (isinstance(kernels, str) and kernels in NAMES):
    return
  raise ValueError(
    f'kernels={kernels!r} is not one of {NAMES} or a KernelPolicy (unet_jax.ops.policy).'
  )


def resolve(kernels: KernelPolicy | str) -> KernelPolicy:
  """The policy `kernels` names (`NAMES`), or `kernels` itself.

  Raises:
    ValueError: an unknown name, listing the valid ones.
    NativeKernelError: 'native' or 'onednn', or a policy that asks for the native
      kernels or oneDNN, where they cannot be built (the message says why); 'auto'
      falls back instead.
  """
  check(kernels)
  if kernels == 'auto':
    return auto()
  if isinstance(kernels, str):
    kernels = {'xla': XLA, 'native': CPU, 'onednn': ONEDNN}[kernels]
  if kernels.uses_native:
    native_kernels.ensure_available()  # Asked for: an error that says why, no fallback.
  if kernels.uses_onednn:
    onednn_kernels.ensure_available()
  return kernels
