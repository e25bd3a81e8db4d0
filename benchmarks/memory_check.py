"""The memory planner (`unet_jax.models.memory.estimate`) against XLA's compiled memory
analysis.

For each configuration it compiles, without running, the eval-mode forward pass or a
jitted Adam train step (`memory.compiled_memory`) and sets XLA's figures beside the
planner's:

- temp: XLA's temporary buffers, against the planner's activations (inference) or
  activations + gradients (training);
- total: XLA's argument + output - aliased + temp bytes, against the planner's total.

On CPU, XLA removes the optimisation barriers of `jax.checkpoint` and merges the
recomputation away, so `remat=True` saves nothing there. The remat cases are therefore
compiled twice: as they are, and in a subprocess with
`XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander`, which keeps the barriers as
GPU and TPU compilers do.

    .venv/bin/python benchmarks/memory_check.py            # the table in RESULTS.md
    .venv/bin/python benchmarks/memory_check.py --quick    # two small cases
    .venv/bin/python benchmarks/memory_check.py --preset=gpu   # on the accelerator

`--preset=gpu` compiles an accelerator's training sizes (2D 512² in batches of 12, 3D
128³ in batches of 2, float32 and bfloat16) on the default backend; only compiled,
never run, so it also works on a CPU. GPU and TPU compilers
keep the remat barriers, so off the CPU the remat cases are compiled once, as they are.

Prints a Markdown table and writes benchmarks/out/memory_check.json.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from unet_jax.models import memory

REMAT_FLAG = '--xla_disable_hlo_passes=cse_barrier_expander'
ANISO = dict(
  kernel_sizes=[(1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)],
  pool_sizes=[(1, 2, 2), (2, 2, 2), (2, 2, 2)],
)

# name: (estimate/compiled_memory keyword arguments, modes, note)
CASES = {
  '2D 128², b2, f16, d3, batch': (
    dict(spatial_shape=(128, 128), batch=2, features=16, depth=3),
    ('inference', 'training', 'remat'),
    '',
  ),
  '2D 64², b2, 3 ch, f32, d4, batch': (
    dict(spatial_shape=(64, 64), batch=2, in_channels=3, features=32, depth=4),
    ('inference', 'training'),
    '',
  ),
  '2D 128², b2, f16, d3, group, bilinear': (
    dict(
      spatial_shape=(128, 128),
      batch=2,
      features=16,
      depth=3,
      norm='group',
      upsample='bilinear',
    ),
    ('inference', 'training'),
    '',
  ),
  '3D 32³, 2 ch, f8, d3, none': (
    dict(spatial_shape=(32, 32, 32), in_channels=2, features=8, depth=3, norm='none'),
    ('inference', 'training', 'remat'),
    '',
  ),
  '3D 32×64×64, f8, d3, batch': (
    dict(spatial_shape=(32, 64, 64), features=8, depth=3),
    ('inference', 'training'),
    '',
  ),
  '3D 16×64×64, f8, d3, instance, bilinear, anisotropic': (
    dict(
      spatial_shape=(16, 64, 64),
      features=8,
      depth=3,
      norm='instance',
      upsample='bilinear',
      **ANISO,
    ),
    ('inference', 'training', 'remat'),
    '',
  ),
  '2D 32², b2, 3 ch, f32, d4, batch (2×2 bottleneck)': (
    dict(spatial_shape=(32, 32), batch=2, in_channels=3, features=32, depth=4),
    ('inference', 'training'),
    'bottleneck smaller than the 3×3 kernel: XLA:CPU keeps reversed kernel copies',
  ),
  '2D 128², b2, f16, d3, batch, bfloat16': (
    dict(spatial_shape=(128, 128), batch=2, features=16, depth=3, dtype='bfloat16'),
    ('inference', 'training'),
    'XLA:CPU computes bfloat16 convolutions in float32',
  ),
}
GPU_CASES = {
  '2D 512², b12, f32, d5, batch': (
    dict(spatial_shape=(512, 512), batch=12, features=32, depth=5),
    ('inference', 'training', 'remat'),
    '',
  ),
  '3D 128³, b2, f32, d4, batch': (
    dict(spatial_shape=(128, 128, 128), batch=2, features=32, depth=4),
    ('inference', 'training', 'remat'),
    '',
  ),
  '3D 128³, b2, f32, d4, instance, bfloat16': (
    dict(
      spatial_shape=(128, 128, 128),
      batch=2,
      features=32,
      depth=4,
      norm='instance',
      dtype='bfloat16',
    ),
    ('training',),
    '',
  ),
}
QUICK_CASES = {
  '2D 32², f4, d2, batch': (
    dict(spatial_shape=(32, 32), features=4, depth=2),
    ('inference', 'training'),
    '',
  ),
  '3D 16³, f4, d2, none': (
    dict(spatial_shape=(16, 16, 16), features=4, depth=2, norm='none'),
    ('training',),
    '',
  ),
}


def _kwargs(config, mode):
  return dict(config, training=mode != 'inference', remat=mode == 'remat')


def _compiled_in_subprocess(jobs):
  """compiled_memory for each (config, mode) with the remat flag set."""
  env = dict(os.environ, XLA_FLAGS=REMAT_FLAG, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, __file__, '--compile-json', json.dumps(jobs)],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(cases, *, flag_remat: bool) -> list[dict]:
  """One row per case and mode: the planner's and XLA's figures side by side."""
  rows = []
  flagged_jobs = []
  for name, (config, modes, note) in cases.items():
    for mode in modes:
      est = memory.estimate(**_kwargs(config, mode))
      xla = memory.compiled_memory(**_kwargs(config, mode))
      plan_temp = est.activation_bytes + est.gradient_bytes
      rows.append(
        dict(
          case=name,
          mode=mode,
          note=note,
          xla_flags='',
          plan_temp=plan_temp,
          plan_total=est.total_bytes,
          peak_op=est.peak_op,
          **{f'xla_{k}': v for k, v in xla.items()},
        )
      )
      if mode == 'remat' and flag_remat:
        flagged_jobs.append((len(rows) - 1, config, mode))
  if flagged_jobs:
    results = _compiled_in_subprocess([(c, m) for _, c, m in flagged_jobs])
    flagged = {
      i: dict(rows[i], xla_flags=REMAT_FLAG, **{f'xla_{k}': v for k, v in xla.items()})
      for (i, _, _), xla in zip(flagged_jobs, results)
    }
    rows = [
      r
      for i, row in enumerate(rows)
      for r in ([row, flagged[i]] if i in flagged else [row])
    ]
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--preset', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'out'))
  parser.add_argument('--compile-json', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.compile_json is not None:  # the subprocess with XLA_FLAGS set
    jobs = json.loads(args.compile_json)
    print(json.dumps([memory.compiled_memory(**_kwargs(c, m)) for c, m in jobs]))
    return None

  cases = QUICK_CASES if args.quick else {'cpu': CASES, 'gpu': GPU_CASES}[args.preset]
  backend = jax.default_backend()
  rows = _rows(cases, flag_remat=backend == 'cpu')

  print(
    '| case | mode | XLA flags | planner temp MiB | XLA temp MiB | ratio |'
    ' planner total MiB | XLA total MiB | ratio |'
  )
  print('| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  mib = lambda b: f'{b / 2**20:.2f}'
  for r in rows:
    r['ratio_temp'] = r['plan_temp'] / r['xla_temp']
    r['ratio_total'] = r['plan_total'] / r['xla_total']
    flags = '`cse_barrier_expander` off' if r['xla_flags'] else ''
    print(
      f'| {r["case"]} | {r["mode"]} | {flags} | {mib(r["plan_temp"])} |'
      f' {mib(r["xla_temp"])} | {r["ratio_temp"]:.2f} | {mib(r["plan_total"])} |'
      f' {mib(r["xla_total"])} | {r["ratio_total"]:.2f} |'
    )
  notes = {r['case']: r['note'] for r in rows if r['note']}
  for case, note in notes.items():
    print(f'\n{case}: {note}.')
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(backend=backend, device_kind=jax.devices()[0].device_kind)
  with open(out / 'memory_check.json', 'w') as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  return rows


if __name__ == '__main__':
  main()
