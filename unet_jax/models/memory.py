r"""How much memory a U-Net needs: parameters, optimiser state and activations.

A planner, not a profiler: it walks the network of `unet_jax.models.UNet` layer by
layer without compiling anything, so it answers in microseconds for any size, including
sizes no machine here could compile or run:

    est = memory.estimate(spatial_shape=(128, 128, 128), in_channels=1, num_classes=3,
                          features=32, depth=4, batch=2, training=True)
    print(est.format())
    memory.largest_patch(memory.parse_bytes('16GiB'), ndim=3, in_channels=1,
                         num_classes=3, features=32, depth=4, training=True)

or from the shell:

    python -m unet_jax.models.memory --spatial=512,512,512 --features=64 --depth=4
    python -m unet_jax.models.memory --ndim=3 --features=32 --training --budget=16GiB

The model
---------
One feature map of a `B x S_1 x ... x S_n` input with `c` channels and `b` bytes per
element takes

.. math::
  \text{bytes} = B \, c \, b \prod_i S_i ,

so one 64-channel float32 map of a 512³ volume is 512³ × 64 × 4 B = 2³⁵ B = 34.4 GB
(32 GiB), and the 128-channel concatenation at the top of the decoder twice that.
(A figure of "8 GB" for the 64-channel map, as sometimes quoted, is 4x too small.)

The network is listed as a sequence of ops, each making one buffer (convolution, norm,
ReLU, pooling, upsampling, concatenation, the 1x1 head and, in training, the softmax
cross-entropy):

- **Inference**: the activation memory is the peak, over the ops in order, of the
  buffers alive at once. A buffer lives from the op that makes it to its last reader;
  an elementwise op may overwrite an input that dies there, as XLA does. The peak sits
  at the top of the decoder: skip, upsampled map and their concatenation, 4 maps of
  the top width at full resolution.
- **Training**: the forward pass keeps, for the backward pass, what each op's gradient
  reads, as JAX's autodiff leaves it: a convolution its input, a norm its input, a
  ReLU its input (where it is positive), max-pooling its input, the loss its
  probabilities. So each conv -> norm -> ReLU keeps three maps of its width (two
  without a norm). The backward pass then runs in reverse: gradient buffers appear and
  die, and kept buffers die after their last reader. The activation memory is the
  peak of kept + gradient buffers (the gradients of the parameters are counted
  apart). With `remat`, a conv block keeps only its input and recomputes its insides
  when the backward pass reaches it (`UNet(remat=True)` wraps each block in
  `nn.remat`).
- **Residual encoder** (`block='residual'`): the stem is a one-convolution block;
  each residual block keeps, besides the conv -> norm -> ReLU -> conv -> norm
  buffers, its shortcut (average pooling, whose gradient reads nothing, and the
  1x1 projection and its norm where the stride or width changes), the sum and the
  final ReLU's input; the strided convolution makes its map at the lower
  resolution. Each residual block is a unit of `remat`.
- **Parameters** are counted exactly (tests compare them with `model.init`), in
  float32 (`param_dtype`). With a bfloat16 compute dtype each layer's kernel is also
  cast to bfloat16, and in training those copies stay alive for the backward pass.
- **Optimiser state**: Adam keeps two float32 moments per parameter (`2 x` the
  parameters) and a step count.

Totals: inference = parameters (+ BatchNorm statistics) + input + logits +
activations; training = parameters + gradients + Adam moments + input + integer
labels + activations (the updated parameters and moments overwrite the old ones, as in
a jitted train step with donated state).

What is left out: XLA's own choices (fusing, layout copies, scratch space of
convolution algorithms, which differ between CPU, GPU and TPU), dropout masks, deep
supervision heads and data-parallel replicas (each device holds the whole model and
its share of the batch: plan with the per-device batch). The agreement with XLA's
compiled memory analysis on CPU, configuration by configuration, is in
benchmarks/RESULTS.md (`benchmarks/memory_check.py`).

One thing found doing that: on CPU, XLA removes the optimisation barriers that keep
`jax.checkpoint` recomputation from being merged back by common-subexpression
elimination (its `cse_barrier_expander` pass), so `remat=True` saves no memory on
CPU. With `XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander` it does, and GPU
and TPU keep the barriers.

Reference: T. Chen, B. Xu, C. Zhang, C. Guestrin, "Training Deep Nets with Sublinear
Memory Cost", arXiv:1604.06174 (activation memory and rematerialisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
from typing import Sequence

from unet_jax.models import factory
from unet_jax.models import unet as models
from unet_jax.ops import policy as policy_lib

DTYPE_BYTES = {'float32': 4, 'bfloat16': 2}
_UNITS = {
  '': 1,
  'b': 1,
  'k': 10**3,
  'kb': 10**3,
  'm': 10**6,
  'mb': 10**6,
  'g': 10**9,
  'gb': 10**9,
  't': 10**12,
  'tb': 10**12,
  'kib': 2**10,
  'mib': 2**20,
  'gib': 2**30,
  'tib': 2**40,
}


def parse_bytes(text: str | int) -> int:
  """'16GiB' -> 17179869184, '8GB' -> 8000000000, '512MiB', '1e9', 1024 -> bytes."""
  if isinstance(text, int):
    if text < 0:
      raise ValueError(f'A byte count must not be negative; got {text}.')
    return text
  match = re.fullmatch(
    r'\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*', str(text)
  )
  if not match or match.group(2).lower() not in _UNITS:
    raise ValueError(
      f'Cannot read {text!r} as a size: write a number with an optional unit, one'
      ' of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of'
      ' 1024), e.g. 16GiB.'
    )
  return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: int | float) -> str:
  """Both units, so neither reader is misled: '34.36 GB (32.00 GiB)'."""
  for unit, div, bunit, bdiv in (
    ('TB', 1e12, 'TiB', 2**40),
    ('GB', 1e9, 'GiB', 2**30),
    ('MB', 1e6, 'MiB', 2**20),
    ('KB', 1e3, 'KiB', 2**10),
  ):
    if n >= div:
      return f'{n / div:.2f} {unit} ({n / bdiv:.2f} {bunit})'
  return f'{int(n)} B'


@dataclasses.dataclass(frozen=True)
class FeatureMap:
  """One activation buffer: the op that makes it, its shape and its size."""

  name: str
  shape: tuple[int, ...]
  dtype: str
  bytes: int

  def __str__(self) -> str:
    return f'{self.name} {list(self.shape)} {self.dtype} = {format_bytes(self.bytes)}'


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Memory of one U-Net configuration, in bytes.

  Attributes:
    config: the arguments of `estimate`.
    param_count: number of trainable parameters.
    param_bytes: the parameters (float32) plus BatchNorm statistics.
    gradient_bytes: one float32 gradient per parameter (training; else 0).
    optimizer_bytes: Adam's two moments and step count (training; else 0).
    input_bytes: the float32 input batch, plus int32 labels in training.
    output_bytes: the float32 logits (inference; in training they are counted among
      the activations).
    activation_bytes: peak of the intermediate buffers alive at once (see the module
      docstring), without the gradients.
    total_bytes: the sum of the above.
    largest_feature_map: the largest single buffer the network makes.
    peak_op: the op at which the activations peak ('backward:decoder0/conv0' etc.).
    feature_maps: every buffer the forward pass makes, in order.
  """

  config: dict
  param_count: int
  param_bytes: int
  gradient_bytes: int
  optimizer_bytes: int
  input_bytes: int
  output_bytes: int
  activation_bytes: int
  largest_feature_map: FeatureMap
  peak_op: str
  feature_maps: tuple[FeatureMap, ...]

  @property
  def total_bytes(self) -> int:
    return (
      self.param_bytes
      + self.gradient_bytes
      + self.optimizer_bytes
      + self.input_bytes
      + self.output_bytes
      + self.activation_bytes
    )

  def format(self) -> str:
    """A human-readable table, every size in GB and GiB."""
    c = self.config
    mode = (
      ('training' + (' with remat' if c['remat'] else '')) if c['training'] else 'inference'
    )
    header = (
      f'U-Net {"x".join(map(str, c["spatial_shape"]))}, batch {c["batch"]},'
      f' {c["in_channels"]} -> {c["num_classes"]} channels, features'
      f' {c["features"]}, depth {c["depth"]}, norm {c["norm"]}, upsample'
      f' {c["upsample"]}, {c["dtype"]}, {mode}'
    )
    if c.get('block', 'plain') == 'residual':
      header += f', residual encoder, blocks per stage {c["blocks_per_stage"]}'
    if c.get('max_features'):
      header += f', widths at most {c["max_features"]}'

    rows = [
      (
        'parameters',
        (f'{format_bytes(self.param_bytes)} ({self.param_count:,} parameters)'),
      )
    ]
    if c['training']:
      rows += [
        ('gradients', format_bytes(self.gradient_bytes)),
        ('Adam moments', format_bytes(self.optimizer_bytes)),
        ('input + labels', format_bytes(self.input_bytes)),
      ]
    else:
      rows += [
        ('input', format_bytes(self.input_bytes)),
        ('output logits', format_bytes(self.output_bytes)),
      ]
    rows += [
      ('activations', (f'{format_bytes(self.activation_bytes)} (peak at {self.peak_op})')),
      ('total', format_bytes(self.total_bytes)),
      ('largest feature map', str(self.largest_feature_map)),
    ]
    top = [m for m in self.feature_maps if m.name == 'encoder0/conv0']
    if top:
      rows.append(('one top-level map', str(top[0])))
    width = max(len(name) for name, _ in rows)
    lines = [header] + [f'  {name:<{width}}  {value}' for name, value in rows]
    return '\n'.join(lines)


@dataclasses.dataclass
class _Op:
  name: str
  out: str
  shape: tuple[int, ...]
  itemsize: int
  ins: tuple[str, ...]
  saves: tuple[str, ...] = ()  # buffers this op's backward pass reads
  elementwise: bool = False  # may write into an input that dies here
  block: str | None = None  # the conv block it belongs to (remat unit)

  @property
  def bytes(self) -> int:
    return math.prod(self.shape) * self.itemsize


def _check_positive(**values):
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')


def _conv_params(k, cin, cout, use_bias) -> int:
  return math.prod(k) * cin * cout + (cout if use_bias else 0)


class _Graph:
  """Collects the forward ops of a UNet, its parameter and statistics counts."""

  def __init__(self, *, batch, itemsize, norm):
    self.batch, self.itemsize, self.norm = batch, itemsize, norm
    self.ops: list[_Op] = []
    self.params = 0
    self.stats = 0

  def add(self, name, out, size, width, inputs, **kwargs) -> str:
    self.ops.append(
      _Op(name, out, (self.batch, *size, width), self.itemsize, inputs, **kwargs)
    )
    return out

  def block(self, prefix, x, cin, width, k, size, *, convs=2) -> str:
    """`convs` (conv -> norm -> ReLU) layers; returns the name of the output."""
    for i in range(convs):
      pre = self.add(
        f'{prefix}/conv{i}', f'{prefix}/c{i}', size, width, (x,), saves=(x,), block=prefix
      )
      self.params += _conv_params(k, cin, width, self.norm == 'none')
      if self.norm != 'none':
        # The norm's gradient reads its input (and per-channel statistics).
        pre = self.add(
          f'{prefix}/norm{i}',
          f'{prefix}/n{i}',
          size,
          width,
          (pre,),
          saves=(pre,),
          elementwise=True,
          block=prefix,
        )
        self.params += 2 * width
        self.stats += 2 * width if self.norm == 'batch' else 0
      # ReLU's gradient reads its input (where it is positive).
      x = self.add(
        f'{prefix}/relu{i}',
        f'{prefix}/r{i}',
        size,
        width,
        (pre,),
        saves=(pre,),
        elementwise=True,
        block=prefix,
      )
      cin = width
    return x

  def _conv_norm(self, prefix, name, x, cin, width, k, size, *, block) -> str:
    """A convolution (its backward reads its input) and, unless norm='none', a norm
    (its backward reads its input); returns the name of the last."""
    pre = self.add(
      f'{prefix}/{name}_conv',
      f'{prefix}/{name}c',
      size,
      width,
      (x,),
      saves=(x,),
      block=block,
    )
    self.params += _conv_params(k, cin, width, self.norm == 'none')
    if self.norm == 'none':
      return pre
    self.params += 2 * width
    self.stats += 2 * width if self.norm == 'batch' else 0
    return self.add(
      f'{prefix}/{name}_norm',
      f'{prefix}/{name}n',
      size,
      width,
      (pre,),
      saves=(pre,),
      elementwise=True,
      block=block,
    )

  def residual_block(self, prefix, x, cin, width, k, size_in, stride) -> str:
    """`models.ResidualBlock`: conv -> norm -> ReLU -> conv -> norm, the shortcut
    (average pooling where strided, a 1x1 conv and norm where the width or stride
    changes), the sum and a ReLU. Returns the name of the output."""
    size = tuple(s // p for s, p in zip(size_in, stride))
    y = self._conv_norm(prefix, 'c0', x, cin, width, k, size, block=prefix)
    y = self.add(
      f'{prefix}/relu0',
      f'{prefix}/r0',
      size,
      width,
      (y,),
      saves=(y,),
      elementwise=True,
      block=prefix,
    )
    y = self._conv_norm(prefix, 'c1', y, width, width, k, size, block=prefix)
    skip = x
    if any(p != 1 for p in stride):  # Average pooling: its gradient reads nothing.
      skip = self.add(f'{prefix}/avg_pool', f'{prefix}/ap', size, cin, (x,), block=prefix)
    if cin != width:
      ones = (1,) * len(size)
      skip = self._conv_norm(prefix, 'proj', skip, cin, width, ones, size, block=prefix)
    y = self.add(
      f'{prefix}/add',
      f'{prefix}/sum',
      size,
      width,
      (y, skip),
      elementwise=True,
      block=prefix,
    )
    return self.add(
      f'{prefix}/relu1',
      f'{prefix}/r1',
      size,
      width,
      (y,),
      saves=(y,),
      elementwise=True,
      block=prefix,
    )

  def upsample(self, prefix, x, cin, width, size, pool, *, mode, conv_kernel) -> str:
    """The decoder's upsampling to `size` and `width`, as `models.Upsample` runs it."""
    if mode == 'transpose':
      self.params += _conv_params(pool, cin, width, True)
      return self.add(f'{prefix}/upsample', f'{prefix}/u', size, width, (x,), saves=(x,))
    self.params += _conv_params((conv_kernel,) * len(size), cin, width, True)
    if conv_kernel == 1:  # the 1x1 conv runs before the resize
      low = tuple(s // p for s, p in zip(size, pool))
      uc = self.add(f'{prefix}/upsample_conv', f'{prefix}/uc', low, width, (x,), saves=(x,))
      return self.add(f'{prefix}/upsample', f'{prefix}/u', size, width, (uc,))
    ur = self.add(f'{prefix}/upsample_resize', f'{prefix}/ur', size, cin, (x,))
    return self.add(f'{prefix}/upsample', f'{prefix}/u', size, width, (ur,), saves=(ur,))


def _graph(
  *,
  spatial_shape,
  in_channels,
  num_classes,
  features,
  depth,
  kernel_sizes,
  pool_sizes,
  norm,
  upsample,
  upsample_conv_kernel,
  batch,
  itemsize,
  training,
  block='plain',
  blocks_per_stage=1,
  max_features=None,
):
  """The forward ops of `models.UNet` and its exact parameter count."""
  ndim = len(spatial_shape)
  kernels, pools = models.level_shapes(
    ndim=ndim, depth=depth, kernel_sizes=kernel_sizes, pool_sizes=pool_sizes
  )
  divisor = models.input_divisor(ndim=ndim, depth=depth, pool_sizes=pool_sizes)
  models.check_spatial_shape(spatial_shape, divisor)
  counts = models.stage_blocks(block=block, blocks_per_stage=blocks_per_stage, depth=depth)
  widths = models.level_widths(features=features, depth=depth, max_features=max_features)
  g = _Graph(batch=batch, itemsize=itemsize, norm=norm)
  encoder = _residual_encoder if block == 'residual' else _plain_encoder
  x, sizes, skips = encoder(
    g, spatial_shape, in_channels, widths, kernels, pools, counts=counts
  )
  cin = widths[depth]
  for level in reversed(range(depth)):
    width, size, prefix = widths[level], sizes[level], f'decoder{level}'
    up = g.upsample(
      prefix,
      x,
      cin,
      width,
      size,
      pools[level],
      mode=upsample,
      conv_kernel=upsample_conv_kernel,
    )
    cat = g.add(f'{prefix}/concat', f'{prefix}/cat', size, 2 * width, (skips[level], up))
    x = g.block(prefix, cat, 2 * width, width, kernels[level], size)
    cin = width
  g.ops.append(
    _Op('head', 'logits', (batch, *spatial_shape, num_classes), 4, (x,), saves=(x,))
  )
  g.params += _conv_params((1,) * ndim, cin, num_classes, True)
  if training:
    g.ops.append(
      _Op(
        'loss',
        'probabilities',
        (batch, *spatial_shape, num_classes),
        4,
        ('logits',),
        saves=('probabilities',),
      )
    )
  return g.ops, g.params, g.stats


def _plain_encoder(g, spatial_shape, in_channels, widths, kernels, pools, *, counts):
  """The plain encoder's ops: a double convolution a level, then max pooling.
  Returns the bottleneck's output, each level's size and its skip."""
  del counts  # One block a level.
  size, sizes, skips = tuple(spatial_shape), [], []
  x, cin = 'input', in_channels
  for level, pool in enumerate(pools):
    x = g.block(f'encoder{level}', x, cin, widths[level], kernels[level], size)
    sizes.append(size)
    skips.append(x)
    size = tuple(s // p for s, p in zip(size, pool))
    x = g.add(
      f'encoder{level}/pool', f'encoder{level}/p', size, widths[level], (x,), saves=(x,)
    )
    cin = widths[level]
  x = g.block('bottleneck', x, cin, widths[-1], kernels[-1], size)
  return x, sizes, skips


def _residual_encoder(g, spatial_shape, in_channels, widths, kernels, pools, *, counts):
  """The residual encoder's ops: the stem, then the residual blocks of each stage,
  the first strided. Returns the bottleneck's output, each level's size and skip."""
  size = tuple(spatial_shape)
  x = g.block('stem', 'input', in_channels, widths[0], kernels[0], size, convs=1)
  sizes, skips, cin = [], [], widths[0]
  for level, count in enumerate(counts):
    stage = f'encoder{level}' if level < len(pools) else 'bottleneck'
    stride = pools[level - 1] if level else (1,) * len(size)
    for i in range(count):
      x = g.residual_block(
        f'{stage}/block{i}',
        x,
        cin,
        widths[level],
        kernels[level],
        size,
        stride if i == 0 else (1,) * len(size),
      )
      size = tuple(s // p for s, p in zip(size, stride)) if i == 0 else size
      cin = widths[level]
    sizes.append(size)
    skips.append(x)
  return x, sizes[:-1], skips[:-1]


def _inference_peak(ops: Sequence[_Op]) -> tuple[int, str]:
  """Peak bytes of intermediate buffers alive at once over a forward pass."""
  size = {op.out: op.bytes for op in ops}
  last = {}
  for i, op in enumerate(ops):
    for b in op.ins:
      last[b] = i
  final = ops[-1].out  # the logits: an output, not a temporary
  live: dict[str, int] = {}
  peak, at = 0, ops[0].name
  for i, op in enumerate(ops):
    shared = op.elementwise and any(
      last.get(b) == i and size.get(b) == op.bytes and b in live for b in op.ins
    )
    if op.out != final:
      now = sum(live.values()) + (0 if shared else op.bytes)
      if now > peak:
        peak, at = now, op.name
      live[op.out] = op.bytes
    for b in op.ins:
      if last.get(b) == i:
        live.pop(b, None)
  return peak, at


def _training_peak(ops: Sequence[_Op], remat: bool) -> tuple[int, str]:
  """Peak bytes of kept + gradient buffers over a forward and a backward pass."""
  size = {op.out: op.bytes for op in ops}
  size['input'] = 0  # an argument; its gradient is never made
  block_of = {op.out: op.block for op in ops}
  readers: dict[str, list[int]] = {}  # forward ops reading each buffer
  savers: dict[str, list[int]] = {}  # ops whose backward pass reads it
  for i, op in enumerate(ops):
    for b in op.ins:
      readers.setdefault(b, []).append(i)
    for b in op.saves:
      if b != 'input':
        savers.setdefault(b, []).append(i)
  # Under remat a block keeps nothing of its own insides: its input is kept (it is
  # the rematerialised function's argument) and its output by the ops outside that
  # read it. The insides are recomputed when the backward pass enters the block.
  internal = lambda b: (
    remat
    and block_of.get(b) is not None
    and all(ops[j].block == block_of[b] for j in savers[b])
  )
  kept = {b for b in savers if not internal(b)}

  peak, at = 0, ''
  live: dict[str, int] = {}
  for i, op in enumerate(ops):  # forward
    now = sum(live.values()) + op.bytes
    if now > peak:
      peak, at = now, f'forward:{op.name}'
    live[op.out] = op.bytes
    for b in op.ins:
      if max(readers[b]) == i and b not in kept:
        live.pop(b, None)
  live = {b: size[b] for b in kept}
  grads = {ops[-1].out: size[ops[-1].out]}
  for i in reversed(range(len(ops))):  # backward
    op = ops[i]
    if (
      remat and op.block is not None and (i + 1 == len(ops) or ops[i + 1].block != op.block)
    ):
      live.update({b: size[b] for b in savers if internal(b) and block_of[b] == op.block})
    new = sum(size[b] for b in op.ins if b not in grads)
    if op.elementwise and grads.get(op.out) == new:
      new = 0  # the input's gradient overwrites the output's
    now = sum(live.values()) + sum(grads.values()) + new
    if now > peak:
      peak, at = now, f'backward:{op.name}'
    for b in op.ins:
      grads.setdefault(b, size[b])
    grads.pop(op.out, None)
    for b in [b for b in live if min(savers[b]) == i]:
      live.pop(b)
  return peak, at


def estimate(
  *,
  spatial_shape: Sequence[int],
  in_channels: int = 1,
  num_classes: int = 2,
  features: int = 64,
  depth: int = 4,
  kernel_sizes: models.IntOrTuple | Sequence[models.IntOrTuple] = 3,
  pool_sizes: models.IntOrTuple | Sequence[models.IntOrTuple] = 2,
  norm: str = 'batch',
  upsample: str = 'transpose',
  upsample_conv_kernel: int = 1,
  batch: int = 1,
  dtype: str = 'float32',
  training: bool = False,
  remat: bool = False,
  block: str = 'plain',
  blocks_per_stage: int | Sequence[int] = 1,
  max_features: int | None = None,
) -> MemoryEstimate:
  """Memory of `models.UNet` on a `[batch, *spatial_shape, in_channels]` input.

  The arguments are the `UNet` attributes of the same names (the network is the same),
  plus the input and what is done with it. `dtype='auto'` is the dtype
  `config.model.dtype='auto'` computes in on the backend this process runs on
  (`factory.compute_dtype`: bfloat16 on GPU and TPU, float32 on the CPU); the
  estimate's `config` records the dtype it resolved to. `training=True` counts a
  jitted Adam train step (forward, backward and update) with softmax cross-entropy;
  `remat` applies only there.

  Returns:
    A `MemoryEstimate`; `.format()` prints it, `.total_bytes` sums it.
  """
  if dtype == 'auto':
    dtype = factory.compute_dtype(dtype)
  config = dict(
    spatial_shape=tuple(spatial_shape),
    in_channels=in_channels,
    num_classes=num_classes,
    features=features,
    depth=depth,
    kernel_sizes=kernel_sizes,
    pool_sizes=pool_sizes,
    norm=norm,
    upsample=upsample,
    batch=batch,
    dtype=dtype,
    training=training,
    remat=remat,
    block=block,
    blocks_per_stage=blocks_per_stage,
    max_features=max_features,
  )
  _check_arguments(**config, upsample_conv_kernel=upsample_conv_kernel)
  itemsize = DTYPE_BYTES[config['dtype']]
  graph_args = {k: v for k, v in config.items() if k not in ('dtype', 'remat')}
  ops, params, stats = _graph(
    **graph_args, upsample_conv_kernel=upsample_conv_kernel, itemsize=itemsize
  )
  maps = tuple(
    FeatureMap(
      op.name, op.shape, 'float32' if op.itemsize == 4 else config['dtype'], op.bytes
    )
    for op in ops
  )
  return MemoryEstimate(
    config=config,
    param_count=params,
    param_bytes=4 * (params + stats),
    largest_feature_map=max(maps, key=lambda m: m.bytes),
    feature_maps=maps,
    **_totals(ops, params, config, itemsize),
  )


def _check_arguments(
  *,
  spatial_shape,
  in_channels,
  num_classes,
  features,
  depth,
  batch,
  upsample_conv_kernel,
  dtype,
  norm,
  upsample,
  training,
  remat,
  **unused,
) -> None:
  """The ValueErrors of `estimate`, naming each bad argument."""
  del unused  # kernel_sizes, pool_sizes and the block fields: checked by the graph
  if len(spatial_shape) not in (2, 3):
    raise ValueError(
      f'spatial_shape={spatial_shape} must have 2 (H, W) or 3 (D, H, W) entries.'
    )
  _check_positive(
    in_channels=in_channels,
    num_classes=num_classes,
    features=features,
    depth=depth,
    batch=batch,
    upsample_conv_kernel=upsample_conv_kernel,
    **{f'spatial_shape[{i}]': s for i, s in enumerate(spatial_shape)},
  )
  if dtype not in DTYPE_BYTES:
    raise ValueError(f'dtype={dtype!r} is not one of {("auto", *DTYPE_BYTES)}.')
  if norm not in models.NORMS:
    raise ValueError(f'norm={norm!r} is not one of {models.NORMS}.')
  if upsample not in models.UPSAMPLE_MODES:
    raise ValueError(f'upsample={upsample!r} is not one of {models.UPSAMPLE_MODES}.')
  if remat and not training:
    raise ValueError('remat=True only changes training memory; set training=True.')


def _totals(ops, params, config, itemsize) -> dict[str, int | str]:
  """The byte counts of `MemoryEstimate` other than the parameters, and the peak op."""
  voxels = config['batch'] * math.prod(config['spatial_shape'])
  in_channels, num_classes = config['in_channels'], config['num_classes']
  if config['training']:
    activations, at = _training_peak(ops, config['remat'])
    if itemsize != 4:
      activations += params * itemsize  # compute-dtype copies of the kernels
    return dict(
      activation_bytes=activations,
      peak_op=at,
      gradient_bytes=4 * params,
      optimizer_bytes=8 * params + 4,
      input_bytes=voxels * (4 * in_channels + 4),
      output_bytes=0,
    )
  activations, at = _inference_peak(ops)
  return dict(
    activation_bytes=activations,
    peak_op=at,
    gradient_bytes=0,
    optimizer_bytes=0,
    input_bytes=voxels * 4 * in_channels,
    output_bytes=voxels * 4 * num_classes,
  )


def largest_patch(budget_bytes: int, *, ndim: int, **kwargs) -> int | None:
  """The largest cubic (3D) or square (2D) patch side whose estimate fits the budget.

  The side is a multiple of the network's divisor (the product of the pooling
  strides, `models.input_divisor`); for anisotropic pooling the patch is
  `side` along every axis, so the side is a multiple of every axis's divisor.

  Args:
    budget_bytes: the memory to fit in (e.g. `parse_bytes('16GiB')`).
    ndim: 2 (square patches) or 3 (cubic).
    **kwargs: the other arguments of `estimate` (not `spatial_shape`).

  Returns:
    The side in pixels, or None when not even the smallest valid patch fits.
  """
  if ndim not in (2, 3):
    raise ValueError(f'ndim must be 2 or 3, got {ndim}.')
  budget_bytes = parse_bytes(budget_bytes)
  defaults = inspect.signature(estimate).parameters  # Its defaults, in one place.
  divisor = models.input_divisor(
    ndim=ndim,
    depth=kwargs.get('depth', defaults['depth'].default),
    pool_sizes=kwargs.get('pool_sizes', defaults['pool_sizes'].default),
  )
  step = math.lcm(*divisor)
  fits = lambda n: (
    estimate(spatial_shape=(n * step,) * ndim, **kwargs).total_bytes <= budget_bytes
  )
  if not fits(1):
    return None
  lo, hi = 1, 2
  while fits(hi):  # memory grows with the side: double, then bisect
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo * step


# The `estimate` arguments that are `models.UNet` fields of the same name.
_MODEL_ARGS = (
  'features',
  'depth',
  'kernel_sizes',
  'pool_sizes',
  'norm',
  'upsample',
  'block',
  'blocks_per_stage',
  'max_features',
)


def compiled_memory(
  *,
  spatial_shape: Sequence[int],
  in_channels: int = 1,
  num_classes: int = 2,
  features: int = 64,
  depth: int = 4,
  kernel_sizes: models.IntOrTuple | Sequence[models.IntOrTuple] = 3,
  pool_sizes: models.IntOrTuple | Sequence[models.IntOrTuple] = 2,
  norm: str = 'batch',
  upsample: str = 'transpose',
  upsample_conv_kernel: int = 1,
  batch: int = 1,
  dtype: str = 'float32',
  training: bool = False,
  remat: bool = False,
  block: str = 'plain',
  blocks_per_stage: int | Sequence[int] = 1,
  max_features: int | None = None,
  kernels: policy_lib.KernelPolicy | str = 'xla',
) -> dict[str, int]:
  """XLA's own memory figures for what `estimate` models, on the default backend.

  `kernels='xla'` compiles XLA's formulation of `UNet`, which is what runs on GPU
  and TPU and what `estimate` models. `kernels='auto'` compiles `UNet`'s choice
  for this backend (`unet_jax/ops/policy.py`): on the CPU the faster formulations,
  whose temporaries differ (folded 3D convolutions hold their depth taps side by
  side; see benchmarks/RESULTS.md).

  Compiles (never runs) the same computation: the eval-mode forward pass, or a jitted
  train step (forward, backward, softmax cross-entropy, an Adam update) with the
  parameters, BatchNorm statistics and Adam state donated. Nothing is allocated: the
  variables are abstract (`jax.eval_shape`).

  Returns:
    `temp`, `argument`, `output` and `alias` bytes from
    `compiled.memory_analysis()`, and `total = argument + output - alias + temp`,
    comparable with `estimate(...).total_bytes`; `temp` is comparable with
    `activation_bytes` (inference) or `activation_bytes + gradient_bytes` (training).
  """
  arguments = {k: v for k, v in locals().items() if k != 'kernels'}  # estimate's
  c = estimate(**arguments).config  # the same checks
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  model = models.UNet(
    num_classes=num_classes,
    **{k: c[k] for k in _MODEL_ARGS},
    upsample_conv_kernel=upsample_conv_kernel,
    dtype=jnp.dtype(c['dtype']),
    remat=remat,
    kernels=kernels,
  )
  x = jax.ShapeDtypeStruct((batch, *c['spatial_shape'], in_channels), jnp.float32)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype))
  )
  if training:
    compiled = _compiled_train_step(model, variables, x)
  else:
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled = forward.lower(variables, x).compile()
  return _figures(compiled.memory_analysis())


def _figures(m) -> dict[str, int]:
  """`compiled_memory`'s figures from XLA's memory analysis `m`."""
  out = dict(
    temp=m.temp_size_in_bytes,
    argument=m.argument_size_in_bytes,
    output=m.output_size_in_bytes,
    alias=m.alias_size_in_bytes,
  )
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def _compiled_train_step(model, variables, x):
  """The compiled Adam train step of `compiled_memory`, state donated."""
  # pylint: disable=g-import-not-at-top
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  tx = optax.adam(1e-3)
  opt_state = jax.eval_shape(tx.init, variables['params'])
  labels = jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32)
  stats = variables.get('batch_stats', {})

  def loss_fn(params, stats, x, labels):
    logits, new = model.apply(
      {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new.get('batch_stats', {})

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train_step(params, stats, opt_state, x, labels):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, stats, x, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return train_step.lower(variables['params'], stats, opt_state, x, labels).compile()


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.replace('x', ',').split(',') if v.strip())


def _shape_arg(text: str):
  """'3' -> 3; '1,3,3' -> (1, 3, 3); '1,3,3;3,3,3;...' -> per-level list."""
  levels = [_ints(t) for t in text.split(';') if t.strip()]
  if len(levels) == 1:
    return levels[0][0] if len(levels[0]) == 1 else levels[0]
  return [lv[0] if len(lv) == 1 else lv for lv in levels]


def _blocks_arg(text: str) -> int | tuple[int, ...]:
  """'2' -> 2; '1,3,4,6' -> (1, 3, 4, 6)."""
  counts = _ints(text)
  return counts[0] if len(counts) == 1 else counts


def _parser() -> argparse.ArgumentParser:
  """The command line of `main`."""
  parser = argparse.ArgumentParser(
    prog='python -m unet_jax.models.memory',
    description='Memory of a unet_jax U-Net: parameters, Adam state, activations.',
  )
  parser.add_argument('--spatial', help='spatial size, e.g. 512,512,512 or 256x256')
  parser.add_argument(
    '--ndim',
    type=int,
    default=None,
    help='2 or 3, with --budget when --spatial is not given',
  )
  parser.add_argument('--in_channels', type=int, default=1)
  parser.add_argument('--num_classes', type=int, default=2)
  parser.add_argument('--features', type=int, default=64)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument(
    '--kernel_sizes',
    default='3',
    help="3, or 1,3,3 (every level), or '1,3,3;3,3,3;...' per level",
  )
  parser.add_argument(
    '--pool_sizes',
    default='2',
    help="2, or 1,2,2 (every level), or '1,2,2;2,2,2;...' per level",
  )
  parser.add_argument('--norm', default='batch', choices=models.NORMS)
  parser.add_argument('--upsample', default='transpose', choices=models.UPSAMPLE_MODES)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument(
    '--dtype',
    default='float32',
    choices=('auto', *DTYPE_BYTES),
    help="compute dtype; 'auto': this machine's backend's (bfloat16 on GPU and TPU)",
  )
  parser.add_argument(
    '--training',
    action='store_true',
    help='a train step (forward, backward, Adam); else inference',
  )
  parser.add_argument('--remat', action='store_true', help='with --training')
  parser.add_argument('--block', default='plain', choices=models.BLOCKS)
  parser.add_argument(
    '--blocks_per_stage',
    default='1',
    help='with --block=residual: 2 (every stage), or 1,3,4,6,6 (depth + 1 stages)',
  )
  parser.add_argument('--max_features', type=int, default=None, help='widest level')
  parser.add_argument(
    '--budget',
    default=None,
    help='e.g. 16GiB: print the largest square/cubic patch that fits',
  )
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  kwargs = dict(
    in_channels=args.in_channels,
    num_classes=args.num_classes,
    features=args.features,
    depth=args.depth,
    kernel_sizes=_shape_arg(args.kernel_sizes),
    pool_sizes=_shape_arg(args.pool_sizes),
    norm=args.norm,
    upsample=args.upsample,
    batch=args.batch,
    dtype=args.dtype,
    training=args.training,
    remat=args.remat,
    block=args.block,
    blocks_per_stage=_blocks_arg(args.blocks_per_stage),
    max_features=args.max_features,
  )
  if args.spatial is None and args.budget is None:
    parser.error('give --spatial, --budget (with --ndim), or both.')
  ndim = args.ndim
  if args.spatial is not None:
    spatial = _ints(args.spatial)
    ndim = ndim or len(spatial)
    print(estimate(spatial_shape=spatial, **kwargs).format())
  if args.budget is not None:
    if ndim is None:
      parser.error('--budget needs --ndim (or --spatial to take it from).')
    budget = parse_bytes(args.budget)
    side = largest_patch(budget, ndim=ndim, **kwargs)
    if side is None:
      print(
        f'Nothing fits in {format_bytes(budget)}: even the smallest patch the'
        ' network takes is too large.'
      )
    else:
      est = estimate(spatial_shape=(side,) * ndim, **kwargs)
      print(
        f'Largest {"cubic" if ndim == 3 else "square"} patch in'
        f' {format_bytes(budget)}: {"x".join([str(side)] * ndim)}'
        f' (total {format_bytes(est.total_bytes)})'
      )


if __name__ == '__main__':
  main(sys.argv[1:])
