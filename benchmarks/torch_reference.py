r"""The U-Net of `unet_jax.models.UNet` in PyTorch, to time the same train step.

Optional: it needs torch, which is never a dependency of unet_jax or of its tests.
Set up a separate venv once:

    python3 -m venv /work/torch_venv
    /work/torch_venv/bin/pip install torch==2.13.0 numpy

The network mirrors `UNet(num_classes, features, depth, upsample, norm='batch')`
layer for layer, with the same parameter count (checked by `benchmarks/speed.py`):

- each level: two (3x3[x3] 'same' convolution without bias -> BatchNorm(eps 1e-5,
  momentum 0.1) -> ReLU), `features * 2**level` channels; 2x max-pooling;
- bottleneck of `features * 2**depth` channels;
- upsampling: 'transpose' = ConvTranspose with kernel = stride = 2 (with bias);
  'bilinear' = a 1x1 convolution (with bias) to the level's width, then bilinear or
  trilinear interpolation with half-pixel centres (`align_corners=False`), in that
  order, exactly like unet_jax's `Upsample`;
- concatenation [skip, upsampled] on channels; a 1x1 head with bias.

The step is cross-entropy (mean over pixels), backward, Adam(lr 1e-3), in float32 on
2 threads; `--dtype=bfloat16` runs the forward pass under autocast to bfloat16 (AMP).
Channels-first (NCHW/NCDHW) tensors, PyTorch's default layout, unless
`--channels-last`.

On a GPU (`--device=cuda`) the usual speed options are there: `--channels-last`,
`--cudnn-benchmark` (cuDNN picks the fastest convolution algorithms for these
shapes) and `--compile` (`torch.compile` of the model; where it fails, the step runs
eagerly and the JSON says why under 'compile'). Steps are timed to the end of the
device's work (`loss.item()`).

    /work/torch_venv/bin/python benchmarks/torch_reference.py --device=cuda \
        --dtype=bfloat16 --channels-last --cudnn-benchmark --compile --ndim=3 \
        --features=32 --depth=5 --batch=2 --size=128 --upsample=transpose --steps=20

    /work/torch_venv/bin/python benchmarks/torch_reference.py --ndim=2 --features=32 \
        --depth=4 --batch=4 --size=128 --upsample=transpose --steps=5

prints one JSON object: per-step milliseconds (after warm-up) and the parameter count.
"""

import argparse
import json
import time

import torch
from torch import nn
from torch.nn import functional as F


def _conv(ndim):
  return nn.Conv2d if ndim == 2 else nn.Conv3d


def _block(ndim, cin, cout):
  conv, bn = _conv(ndim), (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)
  return nn.Sequential(
    conv(cin, cout, 3, padding=1, bias=False),
    bn(cout, eps=1e-5, momentum=0.1),
    nn.ReLU(inplace=True),
    conv(cout, cout, 3, padding=1, bias=False),
    bn(cout, eps=1e-5, momentum=0.1),
    nn.ReLU(inplace=True),
  )


class Upsample(nn.Module):
  def __init__(self, ndim, cin, cout, mode):
    super().__init__()
    self.mode = mode
    if mode == 'transpose':
      cls = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
      self.conv = cls(cin, cout, 2, stride=2)
    else:
      self.conv = _conv(ndim)(cin, cout, 1)
      self.interp = 'bilinear' if ndim == 2 else 'trilinear'

  def forward(self, x):
    if self.mode == 'transpose':
      return self.conv(x)
    # 1x1 convolution first: it commutes with linear interpolation (as in unet_jax).
    return F.interpolate(
      self.conv(x), scale_factor=2, mode=self.interp, align_corners=False
    )


class UNet(nn.Module):
  def __init__(self, *, ndim, in_channels, num_classes, features, depth, upsample):
    super().__init__()
    self.depth = depth
    widths = [features * 2**i for i in range(depth + 1)]
    self.encoders = nn.ModuleList()
    cin = in_channels
    for level in range(depth):
      self.encoders.append(_block(ndim, cin, widths[level]))
      cin = widths[level]
    self.bottleneck = _block(ndim, cin, widths[depth])
    self.ups = nn.ModuleList()
    self.decoders = nn.ModuleList()
    for level in reversed(range(depth)):
      self.ups.append(Upsample(ndim, widths[level + 1], widths[level], upsample))
      self.decoders.append(_block(ndim, 2 * widths[level], widths[level]))
    self.head = _conv(ndim)(widths[0], num_classes, 1)
    self.pool = F.max_pool2d if ndim == 2 else F.max_pool3d

  def forward(self, x):
    skips = []
    for enc in self.encoders:
      x = enc(x)
      skips.append(x)
      x = self.pool(x, 2)
    x = self.bottleneck(x)
    for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
      x = dec(torch.cat([skip, up(x)], dim=1))
    return self.head(x)


def count_params(model):
  return sum(p.numel() for p in model.parameters())


def run(
  *,
  ndim,
  features,
  depth,
  batch,
  size,
  upsample,
  num_classes=2,
  in_channels=1,
  dtype='float32',
  steps=5,
  warmup=2,
  threads=2,
  channels_last=False,
  device='cpu',
  cudnn_benchmark=False,
  compile_model=False,
):
  """Times `steps` train steps after `warmup` ones; returns a dict of results."""
  torch.set_num_threads(threads)
  torch.backends.cudnn.benchmark = cudnn_benchmark
  torch.manual_seed(0)
  model = UNet(
    ndim=ndim,
    in_channels=in_channels,
    num_classes=num_classes,
    features=features,
    depth=depth,
    upsample=upsample,
  ).to(device)
  x = torch.randn((batch, in_channels) + (size,) * ndim, device=device)
  y = torch.randint(0, num_classes, (batch,) + (size,) * ndim, device=device)
  if channels_last:
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  model.train()
  autocast = dtype == 'bfloat16'
  forward = torch.compile(model) if compile_model else model

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      logits = forward(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return loss

  compiled = 'off'
  start = time.perf_counter()
  if compile_model:
    try:
      step()  # Compiles.
      compiled = 'on'
    except Exception as e:  # pylint: disable=broad-exception-caught
      compiled = f'failed: {type(e).__name__}: {str(e)[:300]}'
      forward = model
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    loss.item()
    times.append((time.perf_counter() - start) * 1e3)
  return {
    'ms_per_step': times,
    'params': count_params(model),
    'loss': float(loss.item()),
    'torch': torch.__version__,
    'threads': torch.get_num_threads(),
    'device': torch.cuda.get_device_name() if device == 'cuda' else device,
    'options': {
      'channels_last': channels_last,
      'cudnn_benchmark': cudnn_benchmark,
      'compile': compiled,
    },
    'compile_s': compile_s,
  }


def gemm_gflops(n=2048, repeats=10, threads=2, device='cpu'):
  """fp32 GFLOP/s of an n x n matrix product (median of `repeats`)."""
  torch.set_num_threads(threads)
  a = torch.randn(n, n, device=device)
  b = torch.randn(n, n, device=device)
  (a @ b).sum().item()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    (a @ b)[0, 0].item()  # Waits for the device.
    times.append(time.perf_counter() - start)
  times.sort()
  return 2 * n**3 / times[len(times) // 2] / 1e9


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--ndim', type=int, choices=(2, 3))
  parser.add_argument('--features', type=int)
  parser.add_argument('--depth', type=int)
  parser.add_argument('--batch', type=int)
  parser.add_argument('--size', type=int)
  parser.add_argument('--upsample', choices=('transpose', 'bilinear'))
  parser.add_argument('--num-classes', type=int, default=2)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--channels-last', action='store_true')
  parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
  parser.add_argument('--cudnn-benchmark', action='store_true')
  parser.add_argument(
    '--compile', action='store_true', help='torch.compile the model (eager if it fails).'
  )
  parser.add_argument(
    '--gemm', action='store_true', help='Print the 2048^2 fp32 matmul GFLOP/s instead.'
  )
  args = parser.parse_args(argv)
  if args.gemm:
    print(
      json.dumps({'gemm_gflops': gemm_gflops(threads=args.threads, device=args.device)})
    )
    return
  missing = [
    f
    for f in ('ndim', 'features', 'depth', 'batch', 'size', 'upsample')
    if getattr(args, f) is None
  ]
  if missing:
    parser.error(f'missing: {", ".join("--" + m for m in missing)}')
  print(
    json.dumps(
      run(
        ndim=args.ndim,
        features=args.features,
        depth=args.depth,
        batch=args.batch,
        size=args.size,
        upsample=args.upsample,
        num_classes=args.num_classes,
        dtype=args.dtype,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        channels_last=args.channels_last,
        device=args.device,
        cudnn_benchmark=args.cudnn_benchmark,
        compile_model=args.compile,
      )
    )
  )


if __name__ == '__main__':
  main()
