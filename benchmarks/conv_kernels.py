r"""Each 3x3 convolution of the benchmark U-Nets: XLA:CPU against the native kernel.

For the layer shapes of `benchmarks/speed.py`'s 2D and 3D networks, it times the
three parts of a 'same' convolution's train step on their own:

- forward: `y = conv(x, k)`;
- input gradient: `dL/dx` given `dL/dy`;
- kernel gradient: `dL/dk` given `dL/dy`;

as XLA's convolutions, as the direct native C++ kernels (`unet_jax.ops.native`)
and as the native Winograd kernels (`winograd=True`: F(4x4, 3x3) or F(2x2, 3x3) by
shape, and F(3x3, 4x4) or F(3x3, 2x2) for the kernel gradient), and prints GFLOP/s
(2 * pixels * taps * C * O over the median time of `--repeats` calls, after one
warm-up; for Winograd too, so it is the speed of the same work, not of its fewer
products).
XLA's side is what the library falls back to: autodiff of `lax.conv_general_dilated`
in 2D, the folded 2D convolution in 3D (`conv.conv3d_same(fold_depth=True)`; XLA's
own 3D convolution is slower still). All run in this process, one after the other,
shape by shape; every native result is checked against XLA's to float tolerance
before it is timed.

    .venv/bin/python benchmarks/conv_kernels.py            # about 3 minutes
    .venv/bin/python benchmarks/conv_kernels.py --quick    # smoke run (tests)

Writes benchmarks/out/conv_kernels.json.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# (name, batch, spatial size, number of spatial axes, C, O): the 3x3 (3x3x3)
# convolutions of speed.py's 2d cases (features 32, depth 4, batch 4, 128^2) and 3d
# cases (features 16, depth 3, batch 1, 64^3).
SHAPES = [
  ('2d enc0 conv0', 4, 128, 2, 1, 32),
  ('2d enc0 conv1', 4, 128, 2, 32, 32),
  ('2d enc1', 4, 64, 2, 64, 64),
  ('2d enc2', 4, 32, 2, 128, 128),
  ('2d enc3', 4, 16, 2, 256, 256),
  ('2d bottleneck', 4, 8, 2, 512, 512),
  ('2d dec0 conv0', 4, 128, 2, 64, 32),
  ('3d enc0 conv0', 1, 64, 3, 1, 16),
  ('3d enc0 conv1', 1, 64, 3, 16, 16),
  ('3d enc1', 1, 32, 3, 32, 32),
  ('3d enc2', 1, 16, 3, 64, 64),
  ('3d bottleneck', 1, 8, 3, 128, 128),
  ('3d dec0 conv0', 1, 64, 3, 32, 16),
]
QUICK_SHAPES = [('quick 2d', 2, 8, 2, 5, 17), ('quick 3d', 1, 6, 3, 3, 16)]


def _median_seconds(fn, args, repeats):
  import jax  # pylint: disable=g-import-not-at-top

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(shape, repeats):
  """{part: {'xla': GFLOP/s, 'native': GFLOP/s[, 'winograd': GFLOP/s]}} for one layer."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from unet_jax.ops import conv as conv_lib  # pylint: disable=g-import-not-at-top
  from unet_jax.ops import native as native_kernels  # pylint: disable=g-import-not-at-top

  _, n, size, ndim, c, o = shape
  keys = jax.random.split(jax.random.key(0), 3)
  spatial = (size,) * ndim
  x = jax.random.normal(keys[0], (n,) + spatial + (c,))
  k = jax.random.normal(keys[1], (3,) * ndim + (c, o)) / np.sqrt(3**ndim * c)
  g = jax.random.normal(keys[2], (n,) + spatial + (o,))

  def conv(x, k):  # XLA's convolutions, as the library runs them without the kernels
    if ndim == 3:
      return conv_lib.conv3d_same(x, k, fold_depth=True)
    return conv_lib.conv2d_same(x, k)

  fwd = native_kernels.conv_same
  igrad = native_kernels.conv_same_input_grad
  wgrad = native_kernels.conv_weight_grad
  parts = {  # part: (args, {side: function})
    'forward': (
      (x, k),
      {
        'xla': jax.jit(conv),
        'native': jax.jit(fwd),
        'winograd': jax.jit(lambda x, k: fwd(x, k, winograd=True)),
      },
    ),
    'input_grad': (
      (x, k, g),
      {
        'xla': jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
        'native': jax.jit(lambda x, k, g: igrad(g, k)),
        'winograd': jax.jit(lambda x, k, g: igrad(g, k, winograd=True)),
      },
    ),
    'kernel_grad': (
      (x, k, g),
      {
        'xla': jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]),
        'native': jax.jit(lambda x, k, g: wgrad(x, g, (3,) * ndim)),
        'winograd': jax.jit(lambda x, k, g: wgrad(x, g, (3,) * ndim, winograd=True)),
      },
    ),
  }
  flops = 2 * n * size**ndim * 3**ndim * c * o
  out = {}
  for part, (args, sides) in parts.items():
    want = np.asarray(sides['xla'](*args))
    scale = float(np.abs(want).max()) + 1e-6
    for name, fn in sides.items():
      np.testing.assert_allclose(
        np.asarray(fn(*args)),
        want,
        atol=1e-4 * scale,
        rtol=1e-4,
        err_msg=f'{shape[0]} {part} {name}',
      )
    out[part] = {
      name: flops / _median_seconds(fn, args, repeats) / 1e9 for name, fn in sides.items()
    }
  return out


def markdown_table(rows):
  lines = [
    '| layer | N | size | C | O | forward XLA / native / Winograd'
    ' | input grad XLA / native / Winograd | kernel grad XLA / native / Winograd |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for row in rows:
    cells = [
      ' / '.join(f'{v:.0f}' for v in row[p].values())
      for p in ('forward', 'input_grad', 'kernel_grad')
    ]
    size = '×'.join([str(row['size'])] * row['ndim'])
    lines.append(
      f'| {row["name"]} | {row["n"]} | {size} | {row["c"]} |'
      f' {row["o"]} | ' + ' | '.join(cells) + ' |'
    )
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--out', default=str(HERE / 'out'))
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  if jax.default_backend() != 'cpu':
    parser.error(
      f'the native kernels are for the CPU; the backend is'
      f' {jax.default_backend()!r} (set JAX_PLATFORMS=cpu).'
    )
  shapes = QUICK_SHAPES if args.quick else SHAPES
  repeats = args.repeats or (2 if args.quick else 7)
  rows = []
  for i, shape in enumerate(shapes):
    result = measure(shape, repeats)
    rows.append(
      dict(
        name=shape[0],
        n=shape[1],
        size=shape[2],
        ndim=shape[3],
        c=shape[4],
        o=shape[5],
        **result,
      )
    )
    print(
      f'[{i + 1}/{len(shapes)}] {shape[0]}: '
      + ', '.join(
        f'{p} ' + ' / '.join(f'{v:.0f}' for v in r.values()) for p, r in result.items()
      )
      + ' GFLOP/s',
      flush=True,
    )
  print()
  print(markdown_table(rows))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'conv_kernels.json')
  with open(path, 'w') as f:
    json.dump(
      {'date': time.strftime('%Y-%m-%d'), 'repeats': repeats, 'rows': rows}, f, indent=1
    )
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
