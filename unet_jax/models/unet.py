"""The U-Net (Ronneberger et al., 2015), one Linen module for 2D and 3D, with a plain
or a residual encoder (nnU-Net's ResEnc, Isensee et al., 2024).

Inputs are channels-last. `(N, H, W, C)` gives a 2D network and `(N, D, H, W, C)` a
3D one: the convolution dimensionality follows the input rank, so 2D and 3D share every
line of code. The model returns logits; softmax or sigmoid is the loss's job.

    model = UNet(num_classes=2)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)), train=False)
    logits = model.apply(variables, images, train=False)   # [N, H, W, 2]

The defaults are the paper's network: 64 features doubling over 4 levels to a 1024-wide
bottleneck, two 3x3 convolutions a level, 2x max-pooling, a learned 2x2 stride-2
transposed convolution to upsample, skip connections by concatenation and a 1x1 head.
With 'same' padding, 1 input channel, 2 classes and `norm='none'` it has exactly
31,030,658 parameters (tests/models_test.py).

The residual encoder (`block='residual'`) is nnU-Net's `ResidualEncoderUNet`
(dynamic_network_architectures): a stem of one conv -> norm -> ReLU to the top
width, then for each level a stage of `blocks_per_stage` `ResidualBlock`s, the first
of which downsamples by a strided convolution (stride = that level's `pool_sizes`,
so anisotropic plans such as (1, 2, 2) work; no max pooling). Its shortcut, where
the stride or the width changes, is average pooling over the stride and a 1x1
convolution with a norm (ResNet-D, as nnU-Net's `BasicBlockD`), chosen over a
strided 1x1 convolution, which would read one pixel in 2^ndim. The decoder is the
plain one: a double convolution per level.

Parameters against nnU-Net, for one plan: 3D, 1 channel, 3 classes, 6 stages of
widths 32, 64, 128, 256, 320, 320 (`features=32, depth=5, max_features=320`), 3x3x3
kernels, stride 2, `blocks_per_stage=(1, 3, 4, 6, 6, 6)`, instance norm. This UNet
has 107,451,683 parameters; nnU-Net's ResidualEncoderUNet with its ResEnc planner's
settings 102,350,575 (counted from its building blocks as published; the
arithmetic is in tests/resenc_test.py). The difference is exactly three things:
nnU-Net's convolutions carry a bias before their norm (13,056 parameters; here a
norm's shift replaces it), its ResEnc decoder has one convolution per stage where
this one has two (+5,116,480 here), and it builds a 1x1 head on every decoder stage
for deep supervision (2,316 for the four below the top; here `deep_supervision`
adds them). Apart from those biases, the encoders are equal parameter for parameter.

References: O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015, arXiv:1505.04597. F. Isensee, T. Wald
et al., "nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical Image
Segmentation", MICCAI 2024, arXiv:2404.09556. T. He et al., "Bag of Tricks for
Image Classification with Convolutional Neural Networks", CVPR 2019 (ResNet-D).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax import config as config_lib
from unet_jax.ops import conv as conv_lib
from unet_jax.ops import policy as policy_lib
from unet_jax.ops import resize as resize_lib

UPSAMPLE_MODES = ('transpose', 'bilinear')
NORMS = ('batch', 'group', 'instance', 'none')
BLOCKS = ('plain', 'residual')

IntOrTuple = int | Sequence[int]


def _is_shape(value: Any) -> bool:
  return isinstance(value, int) or all(isinstance(v, int) for v in value)


def level_shapes(
  *,
  ndim: int,
  depth: int,
  kernel_sizes: IntOrTuple | Sequence[IntOrTuple] = 3,
  pool_sizes: IntOrTuple | Sequence[IntOrTuple] = 2,
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
  """Per-level kernel and pooling shapes for a network of `ndim` spatial axes.

  Args:
    ndim: 2 or 3 spatial axes.
    depth: the number of pooling steps.
    kernel_sizes: one kernel for every level (an int, or a flat tuple of `ndim` ints),
      or a list of `depth + 1` kernels: the encoder levels from the top, then the
      bottleneck. Decoder level i uses the kernel of encoder level i.
    pool_sizes: one pooling window (= stride) for every level (an int or a flat
      tuple), or a list of `depth`.

  Returns:
    `(kernels, pools)`: `depth + 1` kernel tuples and `depth` pool tuples.
  """
  if depth < 1:
    raise ValueError(f'depth must be at least 1, got {depth}.')
  # An int, or a flat sequence of ints (one size per axis), applies to every level.
  if _is_shape(kernel_sizes):
    kernel_sizes = [kernel_sizes] * (depth + 1)
  if _is_shape(pool_sizes):
    pool_sizes = [pool_sizes] * depth
  if len(kernel_sizes) != depth + 1:
    raise ValueError(
      f'kernel_sizes has {len(kernel_sizes)} levels; depth={depth} needs'
      f' {depth + 1} (the encoder levels, then the bottleneck).'
    )
  if len(pool_sizes) != depth:
    raise ValueError(
      f'pool_sizes has {len(pool_sizes)} levels; depth={depth} needs {depth}.'
    )
  kernels = tuple(config_lib.per_axis(k, ndim, 'kernel_sizes') for k in kernel_sizes)
  pools = tuple(config_lib.per_axis(p, ndim, 'pool_sizes') for p in pool_sizes)
  for p in pools:
    if min(p) < 1:
      raise ValueError(f'pool sizes must be positive, got {p}.')
  return kernels, pools


def level_widths(
  *, features: int, depth: int, max_features: int | None = None
) -> tuple[int, ...]:
  """The width of each level, `features * 2**level` capped at `max_features`:
  `depth + 1` of them, the encoder levels from the top, then the bottleneck."""
  if max_features is not None and max_features < 1:
    raise ValueError(f'max_features must be positive or None, got {max_features}.')
  cap = max_features or math.inf
  return tuple(int(min(features * 2**level, cap)) for level in range(depth + 1))


def stage_blocks(*, block: str, blocks_per_stage: Any, depth: int) -> tuple[int, ...]:
  """The number of blocks of each encoder stage (`depth + 1`, the bottleneck last).

  Args:
    block: 'plain' or 'residual' (`UNet.block`).
    blocks_per_stage: an int for every stage, or `depth + 1` ints.
    depth: the number of downsampling steps.

  Raises:
    ValueError: naming the field and its value, for an unknown block, a count
      below 1, a list of the wrong length, or counts other than 1 with 'plain'.
  """
  if block not in BLOCKS:
    raise ValueError(f'block={block!r} is not one of {BLOCKS}.')
  counts = (
    (blocks_per_stage,) * (depth + 1)
    if isinstance(blocks_per_stage, int)
    else tuple(blocks_per_stage)
  )
  if len(counts) != depth + 1:
    raise ValueError(
      f'blocks_per_stage={tuple(counts)} has {len(counts)} entries; depth={depth}'
      f' needs {depth + 1} (the encoder stages from the top, then the bottleneck)'
      ' or one int for all.'
    )
  if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
    raise ValueError(f'blocks_per_stage={blocks_per_stage!r}: every count must be >= 1.')
  if block == 'plain' and any(c != 1 for c in counts):
    raise ValueError(
      f"blocks_per_stage={blocks_per_stage!r} needs block='residual': block='plain'"
      ' is the U-Net of the paper, one double convolution per level (blocks_per_stage=1).'
    )
  return counts


def input_divisor(
  *,
  ndim: int,
  depth: int,
  pool_sizes: IntOrTuple | Sequence[IntOrTuple] = 2,
) -> tuple[int, ...]:
  """What every spatial size of the input must be a multiple of, axis by axis."""
  _, pools = level_shapes(ndim=ndim, depth=depth, pool_sizes=pool_sizes)
  return tuple(math.prod(p[axis] for p in pools) for axis in range(ndim))


def check_spatial_shape(spatial_shape: Sequence[int], divisor: Sequence[int]) -> None:
  """Raises a ValueError naming the size and the nearest valid sizes."""
  axis_names = ('D', 'H', 'W')[-len(spatial_shape) :]
  for name, size, div in zip(axis_names, spatial_shape, divisor):
    if size % div:
      below = (size // div) * div
      above = below + div
      nearest = f'{below} or {above}' if below > 0 else f'{above}'
      raise ValueError(
        f'Spatial size {size} along axis {name} of input shape'
        f' {tuple(spatial_shape)} is not divisible by {div}, the product of the'
        f' pooling strides along that axis. Nearest valid sizes: {nearest}. Pad,'
        ' crop or resize the input (config.data.size_policy).'
      )


def _norm(
  kind: str, *, train: bool, dtype: Any, axis_name: str | None, groups: int, name: str
) -> nn.Module | None:
  if kind == 'batch':
    # momentum 0.9 is PyTorch's default of 0.1 in Flax's convention.
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      axis_name=axis_name,
      name=name,
    )
  if kind == 'group':
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, name=name)
  if kind == 'instance':
    return nn.InstanceNorm(epsilon=1e-5, dtype=dtype, name=name)
  return None


def _check_groups(norm: str, groups: int, width: int) -> None:
  if norm == 'group' and width % groups:
    raise ValueError(
      f"norm='group' with norm_groups={groups} needs widths divisible"
      f' by it; this level has {width} channels.'
    )


class ConvBlock(nn.Module):
  """`num_convs` (conv -> norm -> ReLU) layers, 'same' padding; two in a U-Net level,
  one in the residual encoder's stem. The unit of rematerialisation."""

  features: int
  kernel_size: tuple[int, ...]
  num_convs: int = 2
  norm: str = 'batch'
  norm_groups: int = 8
  train: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  kernels: policy_lib.KernelPolicy | str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv_fn = policy_lib.resolve(self.kernels).conv_general_dilated()
    _check_groups(self.norm, self.norm_groups, self.features)
    for i in range(self.num_convs):
      x = nn.Conv(
        self.features,
        self.kernel_size,
        padding='SAME',
        use_bias=self.norm == 'none',
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        conv_general_dilated=conv_fn,
        name=f'conv{i}',
      )(x)
      norm = _norm(
        self.norm,
        train=self.train,
        dtype=self.dtype,
        axis_name=self.bn_axis_name,
        groups=self.norm_groups,
        name=f'norm{i}',
      )
      if norm is not None:
        x = norm(x)
      x = nn.relu(x)
    return x


def _strided_padding(kernel: Sequence[int]) -> list[tuple[int, int]]:
  # PyTorch's (and nnU-Net's) padding of k // 2 on both sides for odd kernels: output
  # i of a stride-s convolution is centred on input s * i. For stride 1 it is 'SAME'.
  return [((k - 1) // 2, k // 2) for k in kernel]


class ResidualBlock(nn.Module):
  """conv -> norm -> ReLU -> conv -> norm, plus the input, then ReLU (He et al. 2016).

  The first convolution has stride `strides` (the downsampling of a residual
  encoder's stage). Where the stride or the width changes, the shortcut is
  nnU-Net's `BasicBlockD` (ResNet-D, He et al. 2019): average pooling over the
  stride, then a 1x1 (1x1x1) convolution and a norm to the width; where neither
  changes, the identity. Parameter names: conv0, norm0, conv1, norm1, and
  proj_conv, proj_norm for the projection (`inference/folding.py` folds each
  normX into convX). The unit of rematerialisation of a residual encoder.
  """

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  norm: str = 'batch'
  norm_groups: int = 8
  train: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  kernels: policy_lib.KernelPolicy | str = 'xla'

  def _norm(self, name: str) -> nn.Module | None:
    return _norm(
      self.norm,
      train=self.train,
      dtype=self.dtype,
      axis_name=self.bn_axis_name,
      groups=self.norm_groups,
      name=name,
    )

  def _conv(self, width, kernel, name, *, strides=None, conv_fn=None) -> nn.Module:
    strided = strides is not None and any(s != 1 for s in strides)
    return nn.Conv(
      width,
      kernel,
      strides=strides if strided else 1,
      padding=_strided_padding(kernel) if strided else 'SAME',
      use_bias=self.norm == 'none',
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_general_dilated=conv_fn,
      name=name,
    )

  def _normed(self, y: jax.Array, name: str) -> jax.Array:
    norm = self._norm(name)
    return y if norm is None else norm(y)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # The kernel policy takes stride-1 'same' convolutions; the strided one goes to
    # lax.conv_general_dilated unchanged (ops/conv.py, `conv_general_dilated_fn`).
    conv_fn = policy_lib.resolve(self.kernels).conv_general_dilated()
    _check_groups(self.norm, self.norm_groups, self.features)
    ndim = x.ndim - 2
    strided = any(s != 1 for s in self.strides)
    y = self._conv(
      self.features, self.kernel_size, 'conv0', strides=self.strides, conv_fn=conv_fn
    )(x)
    y = nn.relu(self._normed(y, 'norm0'))
    y = self._conv(self.features, self.kernel_size, 'conv1', conv_fn=conv_fn)(y)
    y = self._normed(y, 'norm1')
    skip = x
    if strided:
      skip = nn.avg_pool(skip, tuple(self.strides), strides=tuple(self.strides))
    if x.shape[-1] != self.features:
      skip = self._conv(self.features, (1,) * ndim, 'proj_conv', conv_fn=conv_fn)(skip)
      skip = self._normed(skip, 'proj_norm')
    return nn.relu(y + skip)


class ResidualStage(nn.Module):
  """`num_blocks` `ResidualBlock`s (block0, block1, ...); the first has `strides`.
  With `remat`, each block is rematerialised."""

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  num_blocks: int
  remat: bool = False
  norm: str = 'batch'
  norm_groups: int = 8
  train: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  kernels: policy_lib.KernelPolicy | str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    ones = (1,) * len(self.strides)
    for i in range(self.num_blocks):
      x = block_cls(
        self.features,
        self.kernel_size,
        self.strides if i == 0 else ones,
        norm=self.norm,
        norm_groups=self.norm_groups,
        train=self.train,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        bn_axis_name=self.bn_axis_name,
        kernels=self.kernels,
        name=f'block{i}',
      )(x)
    return x


class Upsample(nn.Module):
  """2x (or `strides`) upsampling to `features` channels.

  'transpose': a learned transposed convolution, kernel = stride (2x2 by default).
  'bilinear': parameter-free linear interpolation (bilinear in 2D, trilinear in 3D),
    half-pixel centres (PyTorch's align_corners=False), with a convolution to
    `features` channels. With the default 1x1 kernel the convolution is applied before
    the resize: a 1x1 convolution commutes with linear interpolation (whose weights sum
    to one), so the output is identical and the work is 2^ndim times smaller.
  `kernels` as in `UNet` (here 'xla' by default); the parameters are the same under
  every policy.
  """

  features: int
  strides: tuple[int, ...]
  mode: str = 'transpose'
  conv_kernel: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernels: policy_lib.KernelPolicy | str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    policy = policy_lib.resolve(self.kernels)
    if self.mode == 'transpose' and policy.transpose_as_matmul:
      # Same function and parameters as the nn.ConvTranspose below (conv.py).
      return conv_lib.ConvTranspose(
        self.features,
        self.strides,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='conv',
      )(x)
    if self.mode == 'transpose':
      return nn.ConvTranspose(
        self.features,
        self.strides,
        strides=self.strides,
        padding='VALID',
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='conv',
      )(x)
    shape = (x.shape[0],) + tuple(s * r for s, r in zip(x.shape[1:-1], self.strides))
    conv = nn.Conv(
      self.features,
      (self.conv_kernel,) * ndim,
      padding='SAME',
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_general_dilated=policy.conv_general_dilated(),
      name='conv',
    )

    def resize(x):
      if ndim in policy.upsample_as_stencil and resize_lib.suits(self.strides):
        return resize_lib.upsample_2x(x, self.strides)
      return jax.image.resize(x, shape + (x.shape[-1],), method='linear')

    if self.conv_kernel == 1:
      return resize(conv(x))
    return conv(resize(x))


class UNet(nn.Module):
  """A U-Net for 2D or 3D inputs, by input rank.

  Attributes:
    num_classes: output channels of the 1x1 head (logits). 1 for a sigmoid binary task.
    features: width of the top level; level i has `features * 2**i`, the bottleneck
      `features * 2**depth` (at most `max_features`).
    depth: number of pooling steps (4 in the paper).
    upsample: 'transpose' (learned 2x2 stride-2 transposed conv) or 'bilinear'
      (parameter-free interpolation + a `upsample_conv_kernel` conv to the same width).
      Decoder widths are identical in both modes.
    upsample_conv_kernel: kernel of the convolution after bilinear upsampling.
    norm: 'batch', 'group', 'instance' or 'none' (no norm; convolutions get biases).
    norm_groups: groups for `norm='group'`.
    bn_axis_name: the mapped axis over which BatchNorm averages its statistics, for
      `pmap`. Under `jax.jit` with a sharded batch, statistics are global already.
    kernel_sizes: an int, one tuple for every level, or `depth + 1` per-level kernels
      (encoder levels from the top, then the bottleneck), e.g. `[(1, 3, 3), (1, 3, 3),
      (3, 3, 3), (3, 3, 3), (3, 3, 3)]` for thick-slice CT. Decoder level i uses the
      kernel of encoder level i. A `(1, 3, 3)` kernel makes that level 2D inside a 3D
      network: this is how a mixed 2D/3D design (2D levels in a 3D net) is expressed.
    pool_sizes: an int, one tuple, or `depth` per-level pooling windows (= strides),
      e.g. `[(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]`. Upsampling mirrors them.
    dropout: dropout rate at the end of the contracting path (the bottleneck), as in
      the paper. Needs a 'dropout' rng when `train=True` and the rate is positive.
    dtype: compute dtype of the convolutions, activations and the norms' outputs
      (e.g. jnp.bfloat16); the norms' statistics are computed in float32 (Flax's
      `force_float32_reductions`) and the logits are returned in float32. A
      config's `model.dtype='auto'` picks it by backend (`factory.compute_dtype`).
    param_dtype: parameter dtype (float32 for mixed precision).
    remat: rematerialise each conv block (and each residual block) in the backward
      pass (saves activation memory, mostly for 3D, at the cost of recomputation).
    deep_supervision: number of extra 1x1 heads on the decoder levels below the top
      (nnU-Net style). When positive, `__call__` returns `(logits, aux)` where `aux` is
      a tuple of logits at 1/2, 1/4, ... of the resolution, highest first.
    block: 'plain' (the paper's encoder: a double convolution a level, then max
      pooling; exactly the network before residual blocks existed) or 'residual'
      (nnU-Net's residual encoder, the module docstring). The decoder is the same.
    blocks_per_stage: residual blocks per encoder stage: an int for every stage, or
      `depth + 1` ints (the encoder levels from the top, then the bottleneck), e.g.
      (1, 3, 4, 6, 6, 6) for depth 5 as nnU-Net's ResEnc M and L. It must be 1 with
      `block='plain'`.
    max_features: the widest level: widths double down to it, then stay (nnU-Net
      caps at 320 in 3D and 512 in 2D). None: no cap.
    kernels: how the convolutions and pooling are computed, not what they compute:
      'auto' (the backend's choice: on a single-device CPU process the faster
      formulations and native C++ kernels of `unet_jax/ops/`, 'xla' on GPU and
      TPU), 'xla' (XLA's kernels everywhere, the transposed convolutions as
      products), 'native', or a `KernelPolicy` for each
      choice apart (`unet_jax/ops/policy.py`). The parameters (names, shapes, dtypes,
      initialisation) are the same under every policy, and the function is the same
      to float rounding, so it is not part of a checkpoint's state.
  """

  num_classes: int
  features: int = 64
  depth: int = 4
  upsample: str = 'transpose'
  upsample_conv_kernel: int = 1
  norm: str = 'batch'
  norm_groups: int = 8
  bn_axis_name: str | None = None
  kernel_sizes: Any = 3
  pool_sizes: Any = 2
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  deep_supervision: int = 0
  block: str = 'plain'
  blocks_per_stage: Any = 1
  max_features: int | None = None
  kernels: policy_lib.KernelPolicy | str = 'auto'

  def _check(self, x: jax.Array) -> int:
    if x.ndim not in (4, 5):
      raise ValueError(
        f'UNet takes (N, H, W, C) or (N, D, H, W, C) channels-last inputs; got'
        f' shape {x.shape} (rank {x.ndim}).'
      )
    if self.num_classes < 1 or self.features < 1:
      raise ValueError(
        f'num_classes ({self.num_classes}) and features ({self.features}) must be positive.'
      )
    if self.upsample not in UPSAMPLE_MODES:
      raise ValueError(f'upsample={self.upsample!r} is not one of {UPSAMPLE_MODES}.')
    if self.norm not in NORMS:
      raise ValueError(f'norm={self.norm!r} is not one of {NORMS}.')
    if not 0 <= self.deep_supervision < self.depth:
      raise ValueError(
        f'deep_supervision={self.deep_supervision} must be in [0, depth-1='
        f'{self.depth - 1}].'
      )
    stage_blocks(block=self.block, blocks_per_stage=self.blocks_per_stage, depth=self.depth)
    ndim = x.ndim - 2
    check_spatial_shape(
      x.shape[1:-1], input_divisor(ndim=ndim, depth=self.depth, pool_sizes=self.pool_sizes)
    )
    return ndim

  def _block_options(self, train: bool, policy) -> dict[str, Any]:
    return dict(
      norm=self.norm,
      norm_groups=self.norm_groups,
      train=train,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      bn_axis_name=self.bn_axis_name,
      kernels=policy,
    )

  def _plain_encoder(self, x, *, widths, kernels, pools, train, policy):
    """Today's encoder: a double convolution a level, then max pooling."""
    block_cls = nn.remat(ConvBlock) if self.remat else ConvBlock
    options = self._block_options(train, policy)
    skips = []
    for level in range(self.depth):
      x = block_cls(widths[level], kernels[level], **options, name=f'encoder{level}')(x)
      skips.append(x)
      x = policy.max_pool(x, tuple(pools[level]))
    x = block_cls(widths[-1], kernels[-1], **options, name='bottleneck')(x)
    return x, skips

  def _residual_encoder(self, x, *, widths, kernels, pools, train, policy):
    """nnU-Net's residual encoder: a stem (one conv -> norm -> ReLU to the top
    width), then a `ResidualStage` a level, downsampling by a strided first block."""
    block_cls = nn.remat(ConvBlock) if self.remat else ConvBlock
    options = self._block_options(train, policy)
    counts = stage_blocks(
      block=self.block, blocks_per_stage=self.blocks_per_stage, depth=self.depth
    )
    x = block_cls(widths[0], kernels[0], num_convs=1, **options, name='stem')(x)
    ndim = x.ndim - 2
    skips = []
    for level in range(self.depth + 1):
      x = ResidualStage(
        widths[level],
        kernels[level],
        tuple(pools[level - 1]) if level else (1,) * ndim,
        counts[level],
        remat=self.remat,
        **options,
        name=f'encoder{level}' if level < self.depth else 'bottleneck',
      )(x)
      skips.append(x)
    return x, skips[:-1]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False):
    """Logits `[N, *spatial, num_classes]` (float32) for `x` of `[N, *spatial, C]`."""
    ndim = self._check(x)
    kernels, pools = level_shapes(
      ndim=ndim,
      depth=self.depth,
      kernel_sizes=self.kernel_sizes,
      pool_sizes=self.pool_sizes,
    )
    widths = level_widths(
      features=self.features, depth=self.depth, max_features=self.max_features
    )
    policy = policy_lib.resolve(self.kernels)
    conv_fn = policy.conv_general_dilated()
    encoder = self._residual_encoder if self.block == 'residual' else self._plain_encoder
    x, skips = encoder(
      x.astype(self.dtype),
      widths=widths,
      kernels=kernels,
      pools=pools,
      train=train,
      policy=policy,
    )
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)

    block_cls = nn.remat(ConvBlock) if self.remat else ConvBlock
    options = self._block_options(train, policy)
    aux = []
    for level in reversed(range(self.depth)):
      x = Upsample(
        widths[level],
        pools[level],
        mode=self.upsample,
        conv_kernel=self.upsample_conv_kernel,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernels=policy,
        name=f'upsample{level}',
      )(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = block_cls(widths[level], kernels[level], **options, name=f'decoder{level}')(x)
      if 0 < level <= self.deep_supervision:
        aux.append(self._head(x, f'aux_head{level}', conv_fn))

    logits = self._head(x, 'head', conv_fn)
    if self.deep_supervision:
      return logits, tuple(reversed(aux))
    return logits

  def _head(self, x: jax.Array, name: str, conv_fn: Any = None) -> jax.Array:
    ndim = x.ndim - 2
    y = nn.Conv(
      self.num_classes,
      (1,) * ndim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_general_dilated=conv_fn,
      name=name,
    )(x)
    return y.astype(jnp.float32)


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
