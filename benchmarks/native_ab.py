r"""A/B comparisons for tuning the native kernels: two sources, or two source trees.

Timings on this machine drift by tens of percent within minutes, so a change to
`unet_jax/ops/native/conv.cc` is judged side by side, never against an old figure:

- `--sources A.cc B.cc`: builds both versions of the kernel source, loads both into
  this process under their own FFI target names, and times each layer shape of
  `conv_kernels.py` (forward pass and kernel gradient, `--parts`) alternating A and
  B call by call; prints the best time of `--repeats` calls per side as GFLOP/s and
  B's speed over A's. Each B result is first checked against A's.
- `--trees OLD NEW`: the whole train step of `speed.py`'s cases (`--cases`), in fresh
  processes alternating between two checkouts of the project (for example a
  `git worktree` of an earlier commit and this one), each with its own build of the
  kernel; prints the median over `--rounds` rounds.

    git show HEAD~1:unet_jax/ops/native/conv.cc > /tmp/old.cc
    .venv/bin/python benchmarks/native_ab.py --sources /tmp/old.cc \
        unet_jax/ops/native/conv.cc
    git worktree add /tmp/old_tree HEAD~3
    .venv/bin/python benchmarks/native_ab.py --trees /tmp/old_tree . \
        --cases=3d_transpose,2d_transpose

Both sources must export `UnetConv`, `UnetConvWgrad`, `UnetConvWinograd` and
`UnetConvWinogradWgrad` with the calling convention of `unet_jax/ops/native.py`
(rank-5 operands, `pad_d`, `pad_h`, `pad_w`); `--parts=winograd,winograd_grad` times
the two Winograd kernels.
"""

import argparse
import ctypes
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


# FFI symbol -> suffix of its A/B target name.
_SYMBOLS = {
  'UnetConv': 'conv',
  'UnetConvWgrad': 'wgrad',
  'UnetConvWinograd': 'winograd',
  'UnetConvWinogradWgrad': 'winograd_wgrad',
}
# --parts -> (target suffix, whether it computes a kernel gradient).
_PARTS = {
  'forward': ('conv', False),
  'kernel_grad': ('wgrad', True),
  'winograd': ('winograd', False),
  'winograd_grad': ('winograd_wgrad', True),
}


def _build_and_register(tag, source, out_dir):
  import jax  # pylint: disable=g-import-not-at-top

  from unet_jax.ops import native as native_kernels  # pylint: disable=g-import-not-at-top

  lib_path = os.path.join(out_dir, f'{tag}.so')
  cmd = [
    native_kernels._compiler(),
    *native_kernels.FLAGS,  # pylint: disable=protected-access
    f'-I{jax.ffi.include_dir()}',
    str(source),
    '-o',
    lib_path,
  ]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise SystemExit(f'building {source} failed:\n{result.stderr[-2000:]}')
  library = ctypes.cdll.LoadLibrary(lib_path)
  for symbol, suffix in _SYMBOLS.items():
    jax.ffi.register_ffi_target(
      f'ab_{tag}_{suffix}', jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu'
    )
  return library


def _shapes(quick):
  """(name, x shape, kernel shape) as rank-5 operands, from conv_kernels.py."""
  import conv_kernels  # pylint: disable=g-import-not-at-top

  out = []
  for name, n, size, ndim, c, o in (
    conv_kernels.QUICK_SHAPES if quick else conv_kernels.SHAPES
  ):
    depth = size if ndim == 3 else 1
    kd = 3 if ndim == 3 else 1
    out.append((name, (n, depth, size, size, c), (kd, 3, 3, c, o)))
  return out


def compare_sources(source_a, source_b, *, parts, repeats, quick):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    libraries = [
      _build_and_register(tag, src, tmp) for tag, src in (('a', source_a), ('b', source_b))
    ]
    del libraries  # registered; the handles stay loaded
    rows = []
    for name, x_shape, k_shape in _shapes(quick):
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
      k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
      g = jnp.asarray(rng.normal(size=x_shape[:-1] + k_shape[-1:]), jnp.float32)
      pads = {
        f'pad_{axis}': np.int64((size - 1) // 2) for axis, size in zip('dhw', k_shape[:3])
      }
      flops = 2 * np.prod(x_shape[:-1]) * np.prod(k_shape)
      row = {'name': name}
      for part in parts:
        suffix, kernel_grad = _PARTS[part]
        out = (
          jax.ShapeDtypeStruct(k_shape, jnp.float32)
          if kernel_grad
          else jax.ShapeDtypeStruct(x_shape[:-1] + k_shape[-1:], jnp.float32)
        )
        fns = {}
        for tag in 'ab':
          call = jax.ffi.ffi_call(f'ab_{tag}_{suffix}', out)
          fns[tag] = jax.jit(
            (lambda x, k, g, call=call: call(x, g, **pads))
            if kernel_grad
            else (lambda x, k, g, call=call: call(x, k, **pads))
          )
        want, got = np.asarray(fns['a'](x, k, g)), np.asarray(fns['b'](x, k, g))
        np.testing.assert_allclose(
          got,
          want,
          rtol=1e-3,
          atol=1e-3 * float(np.abs(want).max()),
          err_msg=f'{name} {part}: B differs from A',
        )
        times = {'a': [], 'b': []}
        for _ in range(repeats):
          for tag in 'ab':
            start = time.perf_counter()
            jax.block_until_ready(fns[tag](x, k, g))
            times[tag].append(time.perf_counter() - start)
        rate = {tag: flops / min(t) / 1e9 for tag, t in times.items()}
        row[part] = {'a': rate['a'], 'b': rate['b'], 'ratio': rate['b'] / rate['a']}
      rows.append(row)
      print(
        f'{name}: '
        + ', '.join(
          f'{p} {row[p]["a"]:.0f} -> {row[p]["b"]:.0f} GFLOP/s ({row[p]["ratio"]:.2f}x)'
          for p in parts
        ),
        flush=True,
      )
  return rows


def compare_trees(tree_a, tree_b, *, cases, rounds, steps, warmup):
  import speed  # pylint: disable=g-import-not-at-top

  trees = {'a': os.path.abspath(tree_a), 'b': os.path.abspath(tree_b)}
  all_cases = {**speed.CASES, **speed.QUICK_CASES}
  results = {}
  for name in cases:
    ms = {'a': [], 'b': []}
    for r in range(rounds):
      for tag in 'ab' if r % 2 == 0 else 'ba':
        cmd = [
          sys.executable,
          os.path.join(trees[tag], 'benchmarks', 'speed.py'),
          '--worker=jax',
          f'--case={json.dumps(all_cases[name])}',
          '--dtype=float32',
          f'--steps={steps}',
          f'--warmup={warmup}',
          '--kwargs={}',
          '--donate=1',
        ]
        proc = subprocess.run(
          cmd,
          capture_output=True,
          text=True,
          cwd=trees[tag],
          check=False,
          env={**os.environ, **speed._jax_env(), 'PYTHONPATH': trees[tag]},  # pylint: disable=protected-access
        )
        if proc.returncode != 0:
          raise SystemExit(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
        step_ms = statistics.median(
          json.loads(proc.stdout.strip().splitlines()[-1])['ms_per_step']
        )
        ms[tag].append(step_ms)
        print(
          f'[{name}] round {r + 1}/{rounds} {tag.upper()}: {step_ms:.0f} ms/step',
          flush=True,
        )
    a, b = statistics.median(ms['a']), statistics.median(ms['b'])
    results[name] = {'a_ms': a, 'b_ms': b, 'ratio': a / b}
    print(f'{name}: A {a:.0f} ms, B {b:.0f} ms, B speed / A speed {a / b:.2f}x', flush=True)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument('--sources', nargs=2, metavar=('A', 'B'))
  mode.add_argument('--trees', nargs=2, metavar=('A', 'B'))
  parser.add_argument(
    '--parts',
    default='forward,kernel_grad',
    help=f'comma-separated, of {",".join(_PARTS)} (winograd*: the Winograd kernels)',
  )
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--quick', action='store_true', help='conv_kernels quick shapes')
  parser.add_argument('--cases', default='3d_transpose,2d_transpose')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--out', default=None, help='write the results here, as JSON')
  args = parser.parse_args(argv)
  if args.sources:
    for path in args.sources:
      if not os.path.isfile(path):
        parser.error(f'--sources: {path} is not a file')
    parts = args.parts.split(',')
    for part in parts:
      if part not in _PARTS:
        parser.error(f'--parts: {part!r} is not one of {", ".join(_PARTS)}')
    result = compare_sources(
      *args.sources, parts=parts, repeats=args.repeats, quick=args.quick
    )
  else:
    for path in args.trees:
      if not os.path.isfile(os.path.join(path, 'benchmarks', 'speed.py')):
        parser.error(f'--trees: {path} has no benchmarks/speed.py')
    import speed  # pylint: disable=g-import-not-at-top

    for name in args.cases.split(','):
      if name not in {**speed.CASES, **speed.QUICK_CASES}:
        parser.error(f"--cases: {name!r} is not one of speed.py's cases")
    result = compare_trees(
      *args.trees,
      cases=args.cases.split(','),
      rounds=args.rounds,
      steps=args.steps,
      warmup=args.warmup,
    )
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
