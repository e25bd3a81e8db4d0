r"""Today's augmentation against nnU-Net's full set, at the same number of steps.

Trains `configs/folder.py` (planned) on the planning benchmark's generated data
sets (`benchmarks/planning.py`: `thin2d`, `aniso3d`, `ct2d`) and on a generated
mixed-spacing 3D data set (`benchmarks/resampling.py`'s brain-like phantoms at
(2, 2, 2) and (4, 1.5, 1.5) mm: `mixed3d`), each with two arms and >= 2 seeds:

* `full`: the plan as it ships: flips, rot90, elastic where the plan chooses
  them, plus nnU-Net's rotation, scaling (p 0.2), noise, blur, brightness,
  contrast, low resolution and gamma at nnU-Net's probabilities
  (`unet_jax/planning/rules.py`);
* `today`: the same plan with the augmentation the planner chose before the
  full set: the new transforms off, scaling always (p 1) in [0.85, 1.25] (or
  [1, 1.25] where the plan zooms in only) and the intensity jitter 0.1, set on
  the command line.

Reported: foreground Dice (the mean over the foreground classes, from the
validation split's confusion matrix, as `benchmarks/planning.py` reports it),
its mean and spread (min, max, standard deviation) over the seeds; and, in one
process, the training step's time with no augmentation, today's and the full
set (median of `--repeats` interleaved steps) on a 2D and a 3D batch.

    nice -n 10 .venv/bin/python benchmarks/augment_full.py [--steps=300] \
        [--seeds=0,1] [--only=thin2d,aniso3d,ct2d,mixed3d] [--repeats=7] \
        [--out=benchmarks/out/augment_full]
    .venv/bin/python benchmarks/augment_full.py --smoke --out=/tmp/x   # < 60 s idle

Writes <out>/results.json and <out>/results.md (the Markdown for RESULTS.md).
A short CPU run favours the lighter augmentation (more varied inputs need more
steps to pay off); it cannot show the long-run effect nnU-Net measured on GPUs.
"""

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import optax
import planning as planning_bench  # benchmarks/planning.py

from unet_jax import config as config_lib
from unet_jax import losses
from unet_jax import models
from unet_jax.data import folder as sf
from unet_jax.data import phantoms
from unet_jax.train import steps as steps_lib

# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETS = ('thin2d', 'aniso3d', 'ct2d', 'mixed3d')
NEW_OFF = (
  'rotation_p',
  'noise_p',
  'blur_p',
  'brightness_p',
  'contrast_p',
  'lowres_p',
  'gamma_p',
  'gamma_inverted_p',
)
# The plan's scale range now -> the one it chose before the full set.
TODAY_SCALE = {(0.7, 1.4): (0.85, 1.25), (1.0, 1.4): (1.0, 1.25)}


def today_flags(plan_scale) -> list[str]:
  """Command-line flags that turn the planned full set back into today's set."""
  low, high = TODAY_SCALE[tuple(plan_scale)]
  return [f'--config.augment.{f}=0.0' for f in NEW_OFF] + [
    '--config.augment.scale_p=1.0',
    f'--config.augment.scale=({low},{high})',
    '--config.augment.intensity=0.1',
  ]


def write_data(name: str, out: pathlib.Path, *, smoke: bool) -> pathlib.Path:
  """Writes a data set (once) and returns its root."""
  root = out / name
  if name == 'mixed3d':
    if not (root / 'dataset.json').exists():
      phantoms.write_nnunet_dataset(
        str(root), num_training=6 if smoke else 16, num_test=1, size=48.0, seed=0
      )
    return root
  if smoke:  # A few small thin2d images.
    if not (root / 'val' / 'masks').is_dir():
      rng = np.random.default_rng(1)
      for split, count in (('train', 4), ('val', 2)):
        for i in range(count):
          image, label = planning_bench.thin2d(rng)
          sf.write_pair(root, split, f'{split}{i}', image[:32, :32], label[:32, :32])
    return root
  planning_bench.write_set(name, root)
  return root


def train(name, root, out, *, arm, seed, steps, flags) -> dict:
  workdir = out / f'{name}_{arm}_s{seed}'
  cmd = planning_bench._launch(  # pylint: disable=protected-access
    workdir,
    name,
    root,
    out / 'tfds',
    f'--config.seed={seed}',
    f'--config.num_train_steps={steps}',
    *flags,
  )
  entry = planning_bench._run(cmd, workdir)  # pylint: disable=protected-access
  with open(workdir / 'plan.json') as f:
    plan = {c['field']: c['value'] for c in json.load(f)['choices']}
  entry['augment'] = {k: v for k, v in plan.items() if k.startswith('augment.')}
  return entry


def _spread(values: list[float]) -> dict:
  return {
    'mean': float(np.mean(values)),
    'min': float(np.min(values)),
    'max': float(np.max(values)),
    'std': float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    'values': values,
  }


def dice_runs(name, root, out, *, seeds, steps, extra) -> dict:
  runs = {'full': [], 'today': []}
  for seed in seeds:
    full = train(name, root, out, arm='full', seed=seed, steps=steps, flags=extra)
    runs['full'].append(full)
    flags = extra + today_flags(full['augment']['augment.scale'])
    runs['today'].append(
      train(name, root, out, arm='today', seed=seed, steps=steps, flags=flags)
    )
    print(name, seed, {a: r[-1]['dice'] for a, r in runs.items()}, flush=True)
  return {
    arm: {'dice': _spread([r['dice'] for r in rs]), 'runs': rs} for arm, rs in runs.items()
  }


# ---------------------------------------------------------------------------
# The cost inside the step.


def _timing_options(ndim: int) -> dict[str, config_lib.AugmentOptions]:
  today = dict(scale=(0.85, 1.25), intensity=0.1)
  full = dict(
    scale=(0.7, 1.4),
    scale_p=0.2,
    rotation_p=0.2,
    rotation=(-180.0, 180.0),
    noise_p=0.1,
    blur_p=0.2,
    brightness_p=0.15,
    contrast_p=0.15,
    lowres_p=0.25,
    gamma_p=0.3,
    gamma_inverted_p=0.1,
  )
  if ndim == 2:
    today['elastic'] = full['elastic'] = 1.9  # The plan's, for 96x96 (2%).
  else:
    full.update(rotation_axes=(0,), lowres_axes=(1, 2))
  return {
    'none': config_lib.AugmentOptions(flip=False, rot90=False),
    'today': config_lib.AugmentOptions(**today),
    'full': config_lib.AugmentOptions(**full),
  }


def step_times(*, repeats: int, smoke: bool) -> dict:
  """Median seconds of a jitted training step per augmentation, interleaved."""
  cases = {
    '2d': ((8, 96, 96, 1), dict(depth=4)),
    '3d': ((2, 16, 64, 64, 1), dict(depth=3, pool_sizes=((1, 2, 2), (1, 2, 2), (2, 2, 2)))),
  }
  if smoke:
    cases = {'2d': ((2, 16, 16, 1), dict(depth=1))}
  rng = np.random.default_rng(0)
  results = {}
  for case, (shape, layout) in cases.items():
    batch = {
      'image': jnp.asarray(rng.normal(size=shape).astype(np.float32)),
      'label': jnp.asarray(rng.integers(0, 2, shape[:-1]).astype(np.int32)),
    }
    model = models.UNet(
      num_classes=2, features=4 if smoke else 16, norm='instance', **layout
    )
    tx = optax.adam(1e-3)
    state = steps_lib.create_train_state(jax.random.key(0), model, tx, shape)
    fns = {}
    for arm, opts in _timing_options(len(shape) - 2).items():
      fns[arm] = jax.jit(
        functools.partial(
          steps_lib.train_step,
          model=model,
          tx=tx,
          loss_fn=losses.get_loss('dice_ce'),
          learning_rate_fn=lambda s: 1e-3,
          aug_config=opts,
          seed=0,
        )
      )
      jax.block_until_ready(fns[arm](state, batch))  # Compile.
    times = {arm: [] for arm in fns}
    for _ in range(repeats):
      for arm, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(state, batch))
        times[arm].append(time.perf_counter() - start)
    results[case] = {
      'batch': list(shape),
      **{arm: {'median_s': statistics.median(t), 'all_s': t} for arm, t in times.items()},
    }
    print(
      case, {a: round(r['median_s'], 4) for a, r in results[case].items() if a != 'batch'}
    )
  return results


def _machine() -> dict:
  cpu = ''
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    cpu = next(
      (x.split(':', 1)[1].strip() for x in lscpu.splitlines() if 'Model name' in x), ''
    )
  except OSError:
    pass
  return {'cpu': cpu or platform.processor(), 'load_average': list(os.getloadavg())}


def table(results: dict) -> str:
  lines = [
    '| data set | augmentation | steps | seeds | foreground Dice: mean | min | max | std |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for name, r in results.get('dice', {}).items():
    for arm in ('today', 'full'):
      d = r[arm]['dice']
      lines.append(
        f'| {name} | {arm} | {results["steps"]} | {len(d["values"])} | {d["mean"]:.4f} |'
        f' {d["min"]:.4f} | {d["max"]:.4f} | {d["std"]:.4f} |'
      )
  if results.get('step_time'):
    lines += [
      '',
      '| batch | no augmentation s/step | today s/step | full s/step | full / today |',
      '| --- | ---: | ---: | ---: | ---: |',
    ]
  for case, r in results.get('step_time', {}).items():
    lines.append(
      f'| {case} {"x".join(map(str, r["batch"]))} | {r["none"]["median_s"]:.4f} |'
      f' {r["today"]["median_s"]:.4f} | {r["full"]["median_s"]:.4f} |'
      f' {r["full"]["median_s"] / r["today"]["median_s"]:.2f} |'
    )
  machine = results.get('machine', {})
  lines.append(
    f'\nCPU: {machine.get("cpu")}; load average before: {machine.get("load_average")}.'
  )
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--seeds', default='0,1')
  parser.add_argument('--only', default=','.join(SETS))
  parser.add_argument('--repeats', type=int, default=7, help='timed steps per arm')
  parser.add_argument('--skip_dice', action='store_true', help='only the step times')
  parser.add_argument('--skip_timing', action='store_true', help='only the Dice runs')
  parser.add_argument('--smoke', action='store_true', help='a tiny run of everything')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'augment_full'))
  args = parser.parse_args()
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(',')]
  steps, names, extra = args.steps, args.only.split(','), []
  if args.smoke:
    steps, names, seeds, args.repeats = 2, ['thin2d'], seeds[:1], 2
    extra = ['--config.model.features=4', '--config.model.depth=1', '--config.batch_size=2']
  results = {
    'date': datetime.date.today().isoformat(),
    'steps': steps,
    'seeds': seeds,
    'machine': _machine(),
    'dice': {},
  }
  path = out / 'results.json'
  if not args.skip_timing:
    results['step_time'] = step_times(repeats=args.repeats, smoke=args.smoke)
    path.write_text(json.dumps(results, indent=1))
  for name in [] if args.skip_dice else names:
    if name not in SETS:
      raise SystemExit(f'--only: unknown data set {name!r}; the sets are {SETS}.')
    root = write_data(name, out, smoke=args.smoke)
    results['dice'][name] = dice_runs(
      name, root, out, seeds=seeds, steps=steps, extra=extra
    )
    path.write_text(json.dumps(results, indent=1))  # After each set: a later failure
  markdown = table(results)  # keeps the earlier ones.
  (out / 'results.md').write_text(markdown + '\n')
  print(markdown)


if __name__ == '__main__':
  main()
