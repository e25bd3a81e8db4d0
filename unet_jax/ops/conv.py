r"""Faster formulations of the U-Net's convolutions: the same functions, other kernels.

XLA:CPU runs some convolutions far below its matrix-product rate. This module computes
the same functions in forms it runs faster; each is exact up to float rounding and
each is a field of `policy.KernelPolicy`:

- **3D convolution folded to 2D** (`conv_general_dilated(..., fold_depth=True)`). A
  stride-1 'same' convolution with a `kd x kh x kw` kernel is a 2D `kh x kw`
  convolution over the `N * D` depth slices of an input whose channels hold the `kd`
  depth neighbours of each slice:

  .. math::
    y[n, d] = \sum_{i < k_d} \mathrm{conv2d}(x_p[n, d + i], K[i])
            = \mathrm{conv2d}\big([x_p[n, d], \dots, x_p[n, d + k_d - 1]]_c,
                                  [K[0]; \dots; K[k_d - 1]]_c\big),

  where `x_p` is `x` zero-padded along depth and `[.]_c` concatenates on channels.
  Shapes: `x [N, D, H, W, C] -> [N*D, H, W, kd*C]`, kernel `[kd, kh, kw, C, O] ->
  [kh, kw, kd*C, O]`. A custom VJP keeps only `x` and the kernel for the backward
  pass, so activation memory is that of the plain 3D convolution; the folded copy
  (`kd` times the input) is temporary.
- **Stride-s transposed convolution with an s x s kernel as a matrix product**
  (`conv_transpose_as_matmul`). With kernel = stride and 'VALID' padding, output
  pixel `s*i + a` sees exactly one input pixel, `i`:

  .. math::
    y[n, s i + a, o] = b[o] + \sum_c x[n, i, c]\, K[s - 1 - a, c, o]

  (Flax's `nn.ConvTranspose`, `transpose_kernel=False`, flips the kernel), i.e. a
  1x1 convolution to `s^d * O` channels followed by depth-to-space. Same function,
  same parameters as `nn.ConvTranspose`.
- **1x1 (1x1x1) convolutions as products over the channel axis**
  (`conv_general_dilated_fn(pointwise_as_matmul=True)`): `y = x K[0, 0]`, whose
  gradients are products too.
- **Native C++ kernels** (`weight_grad='native'`, `native_forward=True`): the kernel
  gradient, and optionally the forward pass and input gradient, of stride-1 'same'
  2D and 3D convolutions by `unet_jax.ops.native`, called through XLA's FFI.
  They read the input in place: a 3D convolution needs no fold. Float32 only, and
  only on images at least `NATIVE_MIN_WIDTH` wide (and, for the forward pass and
  input gradient, `NATIVE_MIN_TILED_CHANNELS` channels); other convolutions keep
  XLA's (folded, in 3D). With `winograd=True` the forward pass and input gradient of
  kernels 3 x 3 in H and W go by Winograd's minimal filtering instead (Lavin and
  Gray, arXiv:1509.09308): F(4x4, 3x3), 36 multiply-adds per input and output
  channel for a 4 x 4 block of output pixels against 144 directly, or F(2x2, 3x3)
  (16 against 36) on small planes of many channels; with `weight_grad='native'` too
  the kernel gradient by F(3x3, 4x4) (F(3x3, 2x2) on small planes); all in the same
  register tiles.
- **oneDNN's convolutions** (`onednn=True`): the forward pass, input gradient and
  kernel gradient of float32 stride-1 'same' 2D and 3D convolutions by oneDNN's
  primitives (`unet_jax.ops.onednn`), every size and channel count; a 3D one is read
  in place, no fold. Other dtypes keep XLA's (folded, in 3D).
- **Native max pooling** (`max_pool_native`): the C++ kernel keeps each window's
  first maximum, so the gradient is a scatter; `nn.max_pool`'s values and gradient,
  float32 only.

Which of them runs where is `policy.py`'s business (`KernelPolicy`, and `UNet(kernels=
...)`): this module computes whatever it is asked for, and keeps the size rules of the
native kernels (`NATIVE_MIN_WIDTH`, `NATIVE_MIN_TILED_CHANNELS`).

References: K. Chellapilla, S. Puri, P. Simard, "High Performance Convolutional Neural
Networks for Document Processing", 2006 (convolution as a matrix product);
W. Shi et al., "Real-Time Single Image and Video Super-Resolution Using an Efficient
Sub-Pixel Convolutional Neural Network", CVPR 2016, arXiv:1609.05158 (depth-to-space);
A. Lavin, S. Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016,
arXiv:1509.09308 (Winograd's minimal filtering).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from unet_jax.ops import native as native_kernels
from unet_jax.ops import onednn as onednn_kernels

WEIGHT_GRADS = ('xla', 'native')


def _same_pads(kernel_spatial: Sequence[int]) -> list[tuple[int, int]]:
  # XLA's 'SAME' for stride 1: k - 1 in total, the odd one on the high side.
  return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_spatial]


def _plain(x, kernel, precision=None):
  ndim = x.ndim - 2
  dn = lax.conv_dimension_numbers(
    x.shape,
    kernel.shape,
    ('NHWC', 'HWIO', 'NHWC') if ndim == 2 else ('NDHWC', 'DHWIO', 'NDHWC'),
  )
  return lax.conv_general_dilated(
    x,
    kernel,
    (1,) * ndim,
    _same_pads(kernel.shape[:-2]),
    dimension_numbers=dn,
    precision=precision,
  )


# Images narrower than this (the last spatial axis), by number of spatial axes, take
# `conv_same_patches` where a policy asks for it (`KernelPolicy.narrow_as_matmul`):
# there one matrix product over the gathered patches beat XLA:CPU's convolutions on
# the whole step, and from 16 wide the native Winograd kernels beat it
# (benchmarks/RESULTS.md, "The native kernels on 256-bit vectors").
PATCHES_MAX_WIDTH = {2: 16, 3: 16}


def patches_suit(x_shape: Sequence[int], kernel_shape: Sequence[int]) -> bool:
  """Whether `conv_same_patches` is the formulation for this (narrow) convolution."""
  ndim = len(x_shape) - 2
  return x_shape[-2] < PATCHES_MAX_WIDTH[ndim] and any(k > 1 for k in kernel_shape[:-2])


def conv_same_patches(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """A stride-1 'same' convolution as one matrix product over gathered patches.

  `x` [N, *spatial, C] is zero-padded as XLA's 'SAME' pads it, the kernel's taps
  (row-major over its spatial axes) are gathered as shifted slices side by side on
  the channel axis ([N, *spatial, taps * C]), and that matrix times the kernel
  reshaped to [taps * C, O] is the output. The same function as `lax`'s
  convolution; its gradients are products and slice sums too. It costs taps times
  the input's memory, so it suits narrow images (`patches_suit`), where the product
  is large enough to run near the CPU's matrix-product rate.
  """
  spatial = x.shape[1:-1]
  taps = kernel.shape[:-2]
  padded = jnp.pad(x, [(0, 0), *_same_pads(taps), (0, 0)])
  slices = [
    padded[(slice(None), *(slice(o, o + n) for o, n in zip(offset, spatial)))]
    for offset in itertools.product(*(range(k) for k in taps))
  ]
  patches = jnp.concatenate(slices, axis=-1) if len(slices) > 1 else slices[0]
  return lax.dot_general(
    patches,
    kernel.reshape(-1, kernel.shape[-1]),
    (((x.ndim - 1,), (0,)), ((), ())),
    precision=precision,
  )


# In the functions below `how` is `(weight_grad, native_forward, fold, winograd,
# onednn)`: the kernel-gradient formulation, whether the forward pass and the input
# gradient use the native kernel, whether the XLA parts of a 3D convolution fold it to
# 2D, whether 3x3 kernels go by the native Winograd kernels where they apply
# (`_winograd_suits`; before the direct native kernels; the kernel gradient only with
# 'native'), and whether all three parts go by oneDNN (before everything else). The
# native kernels and oneDNN take float32 only; other dtypes use XLA's convolutions.


# Below these image widths, by number of spatial axes, the native kernels do not beat
# XLA's convolutions, so those convolutions keep XLA's (`benchmarks/conv_kernels.py`
# and the levers in RESULTS.md). In 2D, on 16-wide images with 256 channels, the
# native forward pass and input gradient tie with XLA's (and the whole step was the
# same with either), and on 8-wide ones XLA's kernel gradient is faster too. In 3D,
# where XLA's alternative is the folded convolution, the native kernels tied or won
# on every layer measured, down to 8 wide.
NATIVE_MIN_WIDTH = {
  2: {'forward': 32, 'kernel_grad': 16, 'winograd': 16},
  3: {'forward': 8, 'kernel_grad': 8, 'winograd': 16},
}
# The native forward kernel has register tiles for one vector (16 floats with AVX-512,
# 8 with AVX2) or more output channels, and plain loops for fewer; the forward pass
# takes it from 16 output channels and the input gradient (the forward kernel with
# the channel axes swapped) from 16 input channels, on either vector width.
NATIVE_MIN_TILED_CHANNELS = 16


def _is_f32(*arrays):
  return all(a.dtype == jnp.float32 for a in arrays)


def _wide_enough(x, part):
  return x.shape[-2] >= NATIVE_MIN_WIDTH[x.ndim - 2][part]


def _native_forward_suits(x, kernel):
  """Whether the native forward pass is used for this convolution."""
  return (
    _is_f32(x, kernel)
    and _wide_enough(x, 'forward')
    and kernel.shape[-1] >= NATIVE_MIN_TILED_CHANNELS
  )


def _native_input_grad_suits(x, g, kernel):
  """Whether the native input gradient is used for this convolution."""
  return (
    _is_f32(x, g, kernel)
    and _wide_enough(x, 'forward')
    and kernel.shape[-2] >= NATIVE_MIN_TILED_CHANNELS
  )


def _winograd_suits(x, kernel):
  """Whether the convolution's parts go by Winograd's algorithm, where it is asked.

  Its matrix products take the register tiles of both channel counts (at least
  `NATIVE_MIN_TILED_CHANNELS` input and output channels), and it lost to the direct
  kernels on images narrower than `NATIVE_MIN_WIDTH[ndim]['winograd']`.
  """
  return (
    _is_f32(x, kernel)
    and _wide_enough(x, 'winograd')
    and native_kernels.winograd_suits(kernel.shape[:-2])
    and min(kernel.shape[-2:]) >= NATIVE_MIN_TILED_CHANNELS
  )


def _fold(x, kd):
  """`[N, D, H, W, C] -> [N*D, H, W, kd*C]`: depth neighbours on the channel axis."""
  n, d, h, w, c = x.shape
  if kd == 1:
    return x.reshape(n * d, h, w, c)
  ((lo, hi),) = _same_pads((kd,))
  xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
  xs = jnp.concatenate([xp[:, i : i + d] for i in range(kd)], axis=-1)
  return xs.reshape(n * d, h, w, kd * c)


def _fold_kernel(kernel):
  kd, kh, kw, c, o = kernel.shape
  return jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, o)


def _unfold_kernel(kernel2d, kd):
  kh, kw, kdc, o = kernel2d.shape
  return jnp.transpose(kernel2d.reshape(kh, kw, kd, kdc // kd, o), (2, 0, 1, 3, 4))


def _unfold_input_grad(dxs, shape, kd):
  """Adjoint of `_fold`: sums each depth neighbour's gradient back into place."""
  n, d, h, w, c = shape
  dxs = dxs.reshape(n, d, h, w, kd, c)
  if kd == 1:
    return dxs.reshape(shape)
  ((lo, hi),) = _same_pads((kd,))
  # Slice i of the fold at depth d holds x[d + i - lo]: shift it back and sum.
  padded = sum(
    jnp.pad(dxs[..., i, :], ((0, 0), (i, kd - 1 - i), (0, 0), (0, 0), (0, 0)))
    for i in range(kd)
  )
  return padded[:, lo : lo + d]


def _folds(x, how):
  return x.ndim == 5 and how[2]


def _forward(x, kernel, how, precision):
  if how[4] and _is_f32(x, kernel):
    return onednn_kernels.conv_same(x, kernel)
  if how[3] and _winograd_suits(x, kernel):
    return native_kernels.conv_same(x, kernel, winograd=True)
  if how[1] and _native_forward_suits(x, kernel):
    return native_kernels.conv_same(x, kernel)
  if _folds(x, how):
    n, d, h, w, _ = x.shape
    y = _plain(_fold(x, kernel.shape[0]), _fold_kernel(kernel), precision)
    return y.reshape(n, d, h, w, -1)
  return _plain(x, kernel, precision)


def _input_grad(x, g, kernel, how, precision):
  if how[4] and _is_f32(x, g, kernel):
    return onednn_kernels.conv_same_input_grad(g, kernel)
  if how[3] and _is_f32(g) and _winograd_suits(x, kernel):
    return native_kernels.conv_same_input_grad(g, kernel, winograd=True)
  if how[1] and _native_input_grad_suits(x, g, kernel):
    return native_kernels.conv_same_input_grad(g, kernel)
  if _folds(x, how):
    kd = kernel.shape[0]
    xs, g2 = _fold(x, kd), g.reshape((-1,) + g.shape[2:])
    _, input_vjp = jax.vjp(lambda xs: _plain(xs, _fold_kernel(kernel), precision), xs)
    return _unfold_input_grad(input_vjp(g2)[0], x.shape, kd)
  _, input_vjp = jax.vjp(lambda x: _plain(x, kernel, precision), x)
  return input_vjp(g)[0]


def _kernel_grad(x, g, kernel, how, precision):
  """dL/dK of the convolution of `x` by `kernel` given the output gradient `g`."""
  weight_grad = how[0]
  if how[4] and _is_f32(x, g):
    return onednn_kernels.conv_weight_grad(x, g, tuple(kernel.shape[:-2])).astype(
      kernel.dtype
    )
  if weight_grad == 'native' and how[3] and _is_f32(g) and _winograd_suits(x, kernel):
    return native_kernels.conv_weight_grad(
      x, g, tuple(kernel.shape[:-2]), winograd=True
    ).astype(kernel.dtype)
  if weight_grad == 'native' and _is_f32(x, g) and _wide_enough(x, 'kernel_grad'):
    return native_kernels.conv_weight_grad(x, g, tuple(kernel.shape[:-2])).astype(
      kernel.dtype
    )
  if _folds(x, how):
    kd = kernel.shape[0]
    dk2 = _kernel_grad(
      _fold(x, kd), g.reshape((-1,) + g.shape[2:]), _fold_kernel(kernel), how, precision
    )
    return _unfold_kernel(dk2, kd).astype(kernel.dtype)
  # 'xla'; 'native' for other dtypes (the kernel takes float32 only) and for images
  # narrower than NATIVE_MIN_WIDTH['kernel_grad'].
  _, kernel_vjp = jax.vjp(lambda k: _plain(x, k, precision), kernel)
  return kernel_vjp(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_own_grads(x, kernel, how, precision):
  return _forward(x, kernel, how, precision)


def _conv_own_grads_fwd(x, kernel, how, precision):
  # Only the input and the kernel are kept for the backward pass: activation memory
  # is that of the plain convolution, whatever the formulation.
  return _forward(x, kernel, how, precision), (x, kernel)


def _conv_own_grads_bwd(how, precision, res, g):
  x, kernel = res
  return (
    _input_grad(x, g, kernel, how, precision),
    _kernel_grad(x, g, kernel, how, precision),
  )


_conv_own_grads.defvjp(_conv_own_grads_fwd, _conv_own_grads_bwd)


def _check_weight_grad(weight_grad):
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f'weight_grad={weight_grad!r} is not one of {WEIGHT_GRADS}.')


def conv2d_same(
  x: jax.Array,
  kernel: jax.Array,
  *,
  weight_grad: str = 'xla',
  native_forward: bool = False,
  winograd: bool = False,
  onednn: bool = False,
  precision: Any = None,
) -> jax.Array:
  """Stride-1 'same' 2D convolution, `[N, H, W, C] x [kh, kw, C, O] -> [N, H, W, O]`.

  Args:
    x: channels-last input.
    kernel: HWIO kernel.
    weight_grad: 'xla' (autodiff of the XLA convolution) or 'native' (the C++
      kernel of `unet_jax.ops.native`, float32 only; other dtypes use 'xla').
    native_forward: the forward pass and the input gradient by the native kernel
      too. Both native options apply to float32 convolutions on images at least
      `NATIVE_MIN_WIDTH` wide (and, for the forward pass and input gradient, with at
      least `NATIVE_MIN_TILED_CHANNELS` output and input channels respectively); the
      others use XLA's convolutions.
    winograd: the forward pass and the input gradient of 3x3 kernels by the native
      Winograd kernel, F(4x4, 3x3) or F(2x2, 3x3) by shape
      (`native_kernels.conv_same(winograd=True)`), and
      with `weight_grad='native'` the kernel gradient by F(3x3, 4x4) or F(3x3, 2x2)
      (`native_kernels.conv_weight_grad(winograd=True)`), on float32 images at least
      `NATIVE_MIN_WIDTH[2]['winograd']` wide with at least
      `NATIVE_MIN_TILED_CHANNELS` input and output channels; it takes precedence over
      the direct native kernels there.
    onednn: the forward pass, input gradient and kernel gradient of float32
      convolutions by oneDNN (`unet_jax.ops.onednn`), before any native option.
    precision: passed to the XLA convolutions.
  """
  _check_weight_grad(weight_grad)
  if weight_grad == 'xla' and not native_forward and not winograd and not onednn:
    return _plain(x, kernel, precision)
  how = (weight_grad, bool(native_forward), False, bool(winograd), bool(onednn))
  return _conv_own_grads(x, kernel, how, precision)


def conv3d_same(
  x: jax.Array,
  kernel: jax.Array,
  *,
  fold_depth: bool = True,
  weight_grad: str = 'xla',
  native_forward: bool = False,
  winograd: bool = False,
  onednn: bool = False,
  precision: Any = None,
) -> jax.Array:
  """Stride-1 'same' 3D convolution, `[N, D, H, W, C] x [kd, kh, kw, C, O]`.

  Args:
    x: channels-last input, `[N, D, H, W, C]`.
    kernel: DHWIO kernel.
    fold_depth: the parts XLA computes (all of them, unless a native option below
      applies) as one 2D convolution over `N*D` slices with the `kd` depth
      neighbours stacked on channels (module docstring); else as XLA's 3D
      convolution.
    weight_grad: 'xla' or 'native' (the 3D C++ kernel, which reads the depth
      neighbours in place).
    native_forward: the forward pass and the input gradient by the 3D native kernel
      too. The native options apply as in `conv2d_same`.
    winograd: as in `conv2d_same`, for kernels 3 x 3 in H and W (any depth size:
      the depth taps are summed), on images at least
      `NATIVE_MIN_WIDTH[3]['winograd']` wide.
    onednn: as in `conv2d_same`, by oneDNN's 3D primitives (no fold).
    precision: passed to the XLA convolutions.

  Returns:
    `[N, D, H, W, O]`.
  """
  _check_weight_grad(weight_grad)
  own = weight_grad == 'native' or native_forward or winograd or onednn
  if not fold_depth and not own:
    return _plain(x, kernel, precision)
  how = (weight_grad, bool(native_forward), fold_depth, bool(winograd), bool(onednn))
  return _conv_own_grads(x, kernel, how, precision)


def _is_same_stride1(
  x_shape,
  kernel_shape,
  window_strides,
  padding,
  lhs_dilation,
  rhs_dilation,
  dimension_numbers,
  feature_group_count,
):
  ndim = len(x_shape) - 2
  if ndim not in (2, 3) or feature_group_count != 1:
    return False
  if any(s != 1 for s in window_strides):
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  channels_last = lax.conv_dimension_numbers(
    x_shape,
    kernel_shape,
    ('NHWC', 'HWIO', 'NHWC') if ndim == 2 else ('NDHWC', 'DHWIO', 'NDHWC'),
  )
  if lax.conv_dimension_numbers(x_shape, kernel_shape, dimension_numbers) != channels_last:
    return False
  pads = _same_pads(kernel_shape[:-2])
  if isinstance(padding, str):
    return padding.upper() == 'SAME'
  return [tuple(p) for p in padding] == pads


_LAX_CONV = inspect.signature(lax.conv_general_dilated)


def _takes_own(a: dict[str, Any]) -> bool:
  """Whether a `lax.conv_general_dilated` call (its bound arguments `a`) is one the
  formulations here take: channels-last, stride 1, 'same', no dilation or groups, and
  no output dtype or sharding asked for."""
  if (
    a['batch_group_count'] != 1
    or a['preferred_element_type'] is not None
    or a.get('out_sharding') is not None
    or a['dimension_numbers'] is None
  ):
    return False
  return _is_same_stride1(
    a['lhs'].shape,
    a['rhs'].shape,
    a['window_strides'],
    a['padding'],
    a['lhs_dilation'],
    a['rhs_dilation'],
    a['dimension_numbers'],
    a['feature_group_count'],
  )


def _own_formulation(lhs, rhs, precision, options):
  """A stride-1 'same' convolution by the formulations `options` ask for; None: XLA's."""
  if options['pointwise_as_matmul'] and all(k == 1 for k in rhs.shape[:-2]):
    return lax.dot_general(
      lhs,
      rhs.reshape(rhs.shape[-2:]),
      (((lhs.ndim - 1,), (0,)), ((), ())),
      precision=precision,
    )
  suffix = '_3d' if lhs.ndim == 5 else ''
  narrow = options['narrow_as_matmul' + suffix] and _is_f32(lhs, rhs)
  if narrow and patches_suit(lhs.shape, rhs.shape):  # measured in float32 only
    return conv_same_patches(lhs, rhs, precision)
  kw = {
    name: options[name + suffix]
    for name in ('weight_grad', 'native_forward', 'winograd', 'onednn')
  }
  own = kw['weight_grad'] == 'native' or kw['native_forward'] or kw['winograd']
  own = own or kw['onednn']
  if lhs.ndim == 5:
    if options['fold_depth'] or own:
      # The XLA parts fold whenever the convolution takes its own gradients.
      return conv3d_same(lhs, rhs, fold_depth=True, precision=precision, **kw)
    return None
  if own:
    return conv2d_same(lhs, rhs, precision=precision, **kw)
  return None


def conv_general_dilated_fn(
  *,
  fold_depth: bool = False,
  weight_grad: str = 'xla',
  weight_grad_3d: str | None = None,
  pointwise_as_matmul: bool = False,
  native_forward: bool = False,
  native_forward_3d: bool | None = None,
  winograd: bool = False,
  winograd_3d: bool | None = None,
  onednn: bool = False,
  onednn_3d: bool | None = None,
  narrow_as_matmul: bool = False,
  narrow_as_matmul_3d: bool | None = None,
) -> Callable[..., jax.Array]:
  """A drop-in for `lax.conv_general_dilated`, for `nn.Conv(conv_general_dilated=...)`.

  Channels-last stride-1 'same' convolutions without dilation or groups (those of
  the U-Net) take the formulations above; any other call goes to
  `lax.conv_general_dilated` unchanged. Passing it to `nn.Conv` keeps `nn.Conv`'s
  parameters (names, shapes, dtypes, initialisation) exactly.

  Args:
    fold_depth: 3D convolutions as folded 2D ones (`conv3d_same`).
    weight_grad: 'xla' or 'native' for the kernel gradient of 2D convolutions.
    weight_grad_3d: the same for 3D convolutions (default: `weight_grad`).
    pointwise_as_matmul: 1x1 (1x1x1) convolutions as a product over the channel
      axis, `y = x K[0, 0]`, whose gradients are products too.
    native_forward: the forward pass and input gradient of 2D convolutions by the
      native kernel (`conv2d_same`).
    native_forward_3d: the same for 3D convolutions (default: `native_forward`).
    winograd, winograd_3d: 3x3 (3x3xkd) convolutions by the native Winograd
      kernels (`conv2d_same`, `conv3d_same`; `winograd_3d` defaults to
      `winograd`).
    onednn, onednn_3d: 2D and 3D convolutions by oneDNN (`conv2d_same`,
      `conv3d_same`; `onednn_3d` defaults to `onednn`).
    narrow_as_matmul, narrow_as_matmul_3d: 2D and 3D float32 convolutions on
      images narrower than `PATCHES_MAX_WIDTH` as one product over gathered patches
      (`conv_same_patches`), before every other option; `narrow_as_matmul_3d`
      defaults to `narrow_as_matmul`.
  """
  options = dict(
    fold_depth=fold_depth,
    pointwise_as_matmul=pointwise_as_matmul,
    weight_grad=weight_grad,
    weight_grad_3d=weight_grad if weight_grad_3d is None else weight_grad_3d,
    native_forward=native_forward,
    native_forward_3d=native_forward if native_forward_3d is None else native_forward_3d,
    winograd=winograd,
    winograd_3d=winograd if winograd_3d is None else winograd_3d,
    onednn=onednn,
    onednn_3d=onednn if onednn_3d is None else onednn_3d,
    narrow_as_matmul=narrow_as_matmul,
    narrow_as_matmul_3d=(
      narrow_as_matmul if narrow_as_matmul_3d is None else narrow_as_matmul_3d
    ),
  )
  for value in (options['weight_grad'], options['weight_grad_3d']):
    _check_weight_grad(value)

  def conv(*args, **kwargs):
    call = _LAX_CONV.bind(*args, **kwargs)
    call.apply_defaults()
    if _takes_own(call.arguments):
      a = call.arguments
      own = _own_formulation(a['lhs'], a['rhs'], a['precision'], options)
      if own is not None:
        return own
    return lax.conv_general_dilated(*args, **kwargs)

  return conv


def conv_transpose_as_matmul(
  x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
  """`nn.ConvTranspose(O, s, strides=s, padding='VALID')` as a product + depth-to-space.

  Args:
    x: `[N, *spatial, C]`, 2 or 3 spatial axes.
    kernel: `[*s, C, O]`, the kernel of `nn.ConvTranspose` (`transpose_kernel=False`)
      whose kernel size equals its strides `s`.
    bias: `[O]` or None.

  Returns:
    `[N, *(spatial * s), O]`: `y[n, s*i + a, o] = b[o] + sum_c x[n, i, c] K[s-1-a, c, o]`.
  """
  ndim = x.ndim - 2
  s = kernel.shape[:ndim]
  c, o = kernel.shape[-2:]
  # Flip the taps (Flax's convention), then put them after the input channels.
  k = kernel[(slice(None, None, -1),) * ndim]
  k = jnp.moveaxis(k, ndim, 0).reshape(c, math.prod(s) * o)
  y = lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())))
  n, spatial = x.shape[0], x.shape[1:-1]
  y = y.reshape((n,) + spatial + tuple(s) + (o,))
  # [n, i1.., a1.., o] -> [n, i1, a1, i2, a2, .., o]
  perm = [0] + [p for a in range(ndim) for p in (1 + a, 1 + ndim + a)] + [1 + 2 * ndim]
  y = jnp.transpose(y, perm).reshape((n,) + tuple(d * r for d, r in zip(spatial, s)) + (o,))
  if bias is not None:
    y = y + bias
  return y


class ConvTranspose(nn.Module):
  """`nn.ConvTranspose` with kernel = strides and 'VALID' padding, as a matrix product.

  The parameters are those of `nn.ConvTranspose(features, strides, strides=strides,
  padding='VALID')`: 'kernel' `[*strides, C, features]` (LeCun normal) and 'bias'
  `[features]` (zeros), in `param_dtype`; checkpoints of either restore into the
  other. The function is the same (`conv_transpose_as_matmul`).
  """

  features: int
  strides: tuple[int, ...]
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.strides) != x.ndim - 2:
      raise ValueError(
        f'strides={self.strides} has {len(self.strides)} entries, but the input'
        f' {x.shape} has {x.ndim - 2} spatial axes.'
      )
    kernel = self.param(
      'kernel',
      self.kernel_init,
      tuple(self.strides) + (x.shape[-1], self.features),
      self.param_dtype,
    )
    bias = (
      self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv_transpose_as_matmul(x, kernel, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_native(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """`nn.max_pool(x, window, strides=window, padding='VALID')` by the native kernel.

  The same values and gradient as `nn.max_pool` (ties: all of a window's gradient to
  its first maximum in row-major order), float32 only: the forward kernel keeps each
  window's first maximum as a uint8 index, and the gradient scatters to it.
  XLA:CPU instead builds that gradient from one int32 index tensor per spatial axis
  (`benchmarks/RESULTS.md`).

  Args:
    x: `[N, *spatial, C]`, float32, each spatial size a multiple of its window.
    window: one size per spatial axis.
  """
  return native_kernels.max_pool(x, tuple(window))[0]


def _max_pool_native_fwd(x, window):
  y, index = native_kernels.max_pool(x, tuple(window))
  return y, index


def _max_pool_native_bwd(window, index, g):
  return (native_kernels.max_pool_grad(g, index, tuple(window)),)


max_pool_native.defvjp(_max_pool_native_fwd, _max_pool_native_bwd)
