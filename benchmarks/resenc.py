r"""The plain U-Net against the residual encoder, at the same steps and the same time.

Both arms are `configs/folder.py` planned from the data; the residual arm is
`configs/resenc_m.py` (`model.block='residual'`, blocks per stage (1, 3, 4, 6, 6,
6) cut to the planned depth). So that only the encoder differs, both get the same
top width (`--features`), width cap (`--max_features`) and memory budget
(`--memory_budget`; the preset's 9 GiB would plan GPU-sized patches). Each arm runs
twice per seed:

* `steps`: `--config.num_train_steps=--steps`, the same number of steps;
* `time`: `--config.plan_time_budget=--budget`, the same wall-clock seconds of
  training steps (the plan measures each network's step and sets the steps, and
  shrinks the patch or the width first when fewer than 250 steps would fit).

Data sets, generated here from a seed (nothing is downloaded): the planning
benchmark's `thin2d`, `aniso3d` and `ct2d` (benchmarks/planning.py), and `mixed3d`,
brain-like phantoms sampled at (2, 2, 2) or (4, 1.5, 1.5) mm, alternately
(`unet_jax.data.phantoms`, as benchmarks/resampling.py). Reported: foreground Dice
on the validation split (the mean over the foreground classes of the whole split's
Dice), its mean and spread (min..max) over the seeds, steps and seconds.

    nice -n 10 .venv/bin/python benchmarks/resenc.py [--steps=300] [--budget=150] \
        [--seeds=0,1] [--only=thin2d,aniso3d,ct2d,mixed3d] [--out=benchmarks/out/resenc]
    .venv/bin/python benchmarks/resenc.py --smoke       # tiny: checks the script runs

Writes <out>/results.json and <out>/results.md (the table for benchmarks/RESULTS.md).
A short CPU run favours the network whose steps are cheaper and that learns fastest
from few examples; it says nothing about where either ends after nnU-Net's 1000
epochs on a GPU.
"""

import argparse
import datetime
import importlib.util
import json
import pathlib
import shutil
import statistics
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax.data import folder as sf
from unet_jax.data import phantoms

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The planning benchmark's data sets and its run helper (`_run` reads Dice, steps and
# seconds from a finished launch.py run).
_spec = importlib.util.spec_from_file_location(
  'planning_benchmark', ROOT / 'benchmarks' / 'planning.py'
)
planning_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(planning_benchmark)
# pylint: enable=g-import-not-at-top,wrong-import-position

SETS = ('thin2d', 'aniso3d', 'ct2d', 'mixed3d')
ARMS = {'plain': 'configs/folder.py', 'residual': 'configs/resenc_m.py'}
MODES = ('steps', 'time')


def write_set(name: str, root: pathlib.Path, *, smoke: bool = False) -> None:
  """Writes data set `name` at `root`, if not written yet."""
  if smoke:  # 6 + 2 tiny 2D images of a bright rectangle.
    if (root / 'val').is_dir():
      return
    rng = np.random.default_rng(0)
    for split, count in (('train', 6), ('val', 2)):
      for i in range(count):
        label = np.zeros((16, 16), np.uint8)
        label[3:9, 4:12] = 1
        image = (rng.normal(60, 10, (16, 16)) + 60 * label).clip(0, 255)
        sf.write_pair(root, split, f'case{i}', image.astype(np.uint8), label)
    return
  if name == 'mixed3d':
    if not (root / 'dataset.json').exists():
      phantoms.write_nnunet_dataset(str(root), num_training=16, num_test=0, size=48.0)
    return
  planning_benchmark.write_set(name, root)


def _command(arm, mode, *, root, out, workdir, seed, args) -> list[str]:
  flags = [
    f'--config={ROOT / ARMS[arm]}',
    f'--workdir={workdir}',
    f'--config.data.root={root}',
    f'--config.data.data_dir={out / "tfds"}',
    f'--config.seed={seed}',
    f'--config.model.features={args.features}',
    f'--config.model.max_features={args.max_features}',
    f'--config.plan_memory_budget={args.memory_budget}',
    '--config.eval_every_steps=1000000',  # Evaluated once, after the last step.
    '--config.checkpoint_every_steps=1000000',
    '--config.log_every_steps=10',
  ]
  if mode == 'steps':
    flags.append(f'--config.num_train_steps={args.steps}')
  else:
    flags.append(f'--config.plan_time_budget={args.budget}')
  return [sys.executable, str(ROOT / 'launch.py'), *flags]


def run_set(name, root, out, args, results) -> None:
  """Trains every arm, mode and seed of one data set into `results[name]`."""
  entry = results.setdefault(name, {})
  for mode in args.modes:
    for arm in ARMS:
      runs = entry.setdefault(f'{arm}/{mode}', {})
      for seed in args.seeds:
        if str(seed) in runs:
          continue  # Done in an earlier invocation (results.json).
        workdir = out / 'runs' / f'{name}_{arm}_{mode}_s{seed}'
        cmd = _command(arm, mode, root=root, out=out, workdir=workdir, seed=seed, args=args)
        print(f'{name} {arm} {mode} seed {seed} ...', flush=True)
        row = planning_benchmark._run(cmd, workdir)  # pylint: disable=protected-access
        with open(workdir / 'plan.json') as f:
          choices = {c['field']: c['value'] for c in json.load(f)['choices']}
        with open(workdir / 'config.json') as f:
          model = json.load(f)['model']
        row['block'] = model.get('block', 'plain')
        row['patch'] = choices.get('data.patch_size') or choices.get('data.image_size')
        row['batch'] = choices.get('batch_size')
        row['blocks_per_stage'] = choices.get('model.blocks_per_stage')
        runs[str(seed)] = row
        if not args.keep_runs:
          shutil.rmtree(workdir, ignore_errors=True)
        _write(out, args, results)


def _summary(runs: dict) -> dict:
  dice = [r['dice'] for r in runs.values()]
  return {
    'dice_mean': statistics.fmean(dice),
    'dice_min': min(dice),
    'dice_max': max(dice),
    'steps': statistics.fmean(r['steps'] for r in runs.values()),
    'train_s': statistics.fmean(r['train_s'] for r in runs.values()),
    'seeds': len(dice),
  }


def table(results: dict) -> str:
  lines = [
    '| data set | budget | encoder | seeds | foreground Dice, mean (min..max) | steps |'
    ' training s | patch x batch | blocks per stage |',
    '| --- | --- | --- | ---: | --- | ---: | ---: | --- | --- |',
  ]
  for name, entry in results.items():
    if name == 'meta':
      continue
    for key, runs in entry.items():
      if not runs:
        continue
      arm, mode = key.split('/')
      s = _summary(runs)
      first = next(iter(runs.values()))
      patch = 'x'.join(str(p) for p in first['patch'] or ()) or 'whole'
      lines.append(
        f'| {name} | {"same steps" if mode == "steps" else "same time"} | {arm} |'
        f' {s["seeds"]} | {s["dice_mean"]:.4f} ({s["dice_min"]:.4f}..'
        f'{s["dice_max"]:.4f}) | {s["steps"]:.0f} | {s["train_s"]:.0f} |'
        f' {patch} x {first["batch"]} | {first["blocks_per_stage"] or "-"} |'
      )
  return '\n'.join(lines)


def _write(out: pathlib.Path, args, results: dict) -> None:
  results['meta'] = {
    'args': {k: v for k, v in vars(args).items() if k != 'out'},
    'date': str(datetime.date.today()),
  }
  (out / 'results.json').write_text(json.dumps(results, indent=1))
  (out / 'results.md').write_text(table(results) + '\n')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300, help="the 'steps' mode's steps")
  parser.add_argument('--budget', type=float, default=150.0, help="the 'time' mode's s")
  parser.add_argument('--seeds', default='0,1')
  parser.add_argument('--only', default=','.join(SETS))
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--features', type=int, default=16)
  parser.add_argument('--max_features', type=int, default=320)
  parser.add_argument('--memory_budget', default='2GiB')
  parser.add_argument('--keep_runs', action='store_true', help='keep the workdirs')
  parser.add_argument('--smoke', action='store_true', help='tiny: 2 steps, 1 seed, 2D')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'resenc'))
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.smoke:
    args.steps, args.seeds, args.only, args.modes = 2, '0', 'smoke2d', 'steps'
    args.features, args.max_features, args.memory_budget = 4, 8, '64MiB'
  args.seeds = [int(s) for s in args.seeds.split(',')]
  args.modes = args.modes.split(',')
  for mode in args.modes:
    if mode not in MODES:
      raise SystemExit(f'--modes: unknown mode {mode!r}; the modes are {MODES}.')
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  path = out / 'results.json'
  results = json.loads(path.read_text()) if path.exists() and not args.smoke else {}
  for name in args.only.split(','):
    if name not in SETS and not args.smoke:
      raise SystemExit(f'--only: unknown data set {name!r}; the sets are {SETS}.')
    root = out / 'data' / name
    write_set(name, root, smoke=args.smoke)
    run_set(name, root, out, args, results)
  _write(out, args, results)
  print(table(results))


if __name__ == '__main__':
  main()
