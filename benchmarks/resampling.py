r"""Dice with and without resampling to one spacing, on a mixed-spacing 3D data set.

Generates an nnU-Net v2 data set of brain-like phantoms (`unet_jax.data.phantoms`,
not the MNI template): every case is one anatomy drawn in millimetres and sampled
at (2, 2, 2) mm or at (4, 1.5, 1.5) mm, alternately, with two channels; the
first test case is stored with its axes permuted and one flipped. Then trains
`configs/folder.py` on it twice, for the same number of steps (`--steps`; or, with
`--budget`, the same wall-clock budget of steps, which a busy machine skews), and
predicts the test cases with the predict command:

* `resampled`: the plan as it ships: every case resampled to the plan's target
  spacing when the data set is built, predictions resampled back;
* `own spacing`: `--config.data.target_spacing=()`: each case trained and
  predicted at its own spacing, as before this option existed.

Both read volumes in canonical orientation. Reported: grey- and white-matter
Dice per test case on its own grid (the predict command's `per_case.csv`
against `labelsTs/`), and their means.

    nice -n 10 .venv/bin/python benchmarks/resampling.py [--steps=300 | --budget=300] \
        [--cases=16] [--test=6] [--size=64] [--out=benchmarks/out/resampling]

Prints a Markdown table for benchmarks/RESULTS.md and writes <out>/results.json.
"""

import argparse
import csv
import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from unet_jax.data import phantoms

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARMS = {'resampled': [], 'own spacing': ['--config.data.target_spacing=()']}


def _run(cmd: list[str], log: pathlib.Path) -> float:
  """Runs `cmd` from the repository root, its output in `log`; returns seconds."""
  started = time.perf_counter()
  with open(log, 'w') as f:
    proc = subprocess.run(
      cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, check=False
    )
  if proc.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed; see {log}.')
  return time.perf_counter() - started


def _arm(name, flags, root, out, length: str) -> dict:
  """Trains one arm, predicts imagesTs, reads the per-case Dice."""
  slug = name.replace(' ', '_')
  workdir, predictions = out / f'run_{slug}', out / f'pred_{slug}'
  for path in (workdir, predictions):
    shutil.rmtree(path, ignore_errors=True)
  launch = [sys.executable, str(ROOT / 'launch.py')]
  train_seconds = _run(
    launch
    + [
      f'--config={ROOT / "configs/folder.py"}',
      f'--workdir={workdir}',
      f'--config.data.root={root}',
      f'--config.data.data_dir={out / "tfds"}',
      length,
      *flags,
    ],
    out / f'train_{slug}.log',
  )
  predict_seconds = _run(
    launch
    + [
      '--mode=predict',
      f'--workdir={workdir}',
      f'--input={root / "imagesTs"}',
      f'--output={predictions}',
    ],
    out / f'predict_{slug}.log',
  )
  with open(predictions / 'per_case.csv') as f:
    rows = {r['case']: (float(r['dice_1']), float(r['dice_2'])) for r in csv.DictReader(f)}
  with open(workdir / 'plan.json') as f:
    plan = {c['field']: c['value'] for c in json.load(f)['choices']}
  return {
    'dice': rows,
    'target_spacing': plan.get('data.target_spacing'),
    'steps': plan.get('num_train_steps') or _last_step(workdir),
    'train_seconds': train_seconds,
    'predict_seconds': predict_seconds,
  }


def _last_step(workdir: pathlib.Path) -> int | None:
  """The newest checkpoint's step."""
  steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  return max(steps, default=None)


def _table(results: dict) -> str:
  cases = [c for c in next(iter(results.values()))['dice'] if c != 'mean']
  lines = [
    '| case | ' + ' | '.join(f'{arm}: grey / white' for arm in results) + ' |',
    '| --- |' + ' --- |' * len(results),
  ]
  for case in cases + ['mean']:
    label = f'{case} (axes permuted)' if case.endswith('ts000') else case
    cells = [
      f'{r["dice"][case][0]:.3f} / {r["dice"][case][1]:.3f}' for r in results.values()
    ]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  means = [
    f'{(r["dice"]["mean"][0] + r["dice"]["mean"][1]) / 2:.3f}' for r in results.values()
  ]
  lines.append('| mean of both | ' + ' | '.join(means) + ' |')
  lines.append('')
  for arm, r in results.items():
    lines.append(
      f'- {arm}: target spacing {r["target_spacing"]}, {r["steps"]} steps,'
      f' train {r["train_seconds"]:.0f} s, predict {r["predict_seconds"]:.0f} s.'
    )
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--budget', type=float, default=0, help='seconds; 0: --steps')
  parser.add_argument('--cases', type=int, default=16)
  parser.add_argument('--test', type=int, default=6)
  parser.add_argument('--size', type=float, default=64.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/out/resampling'))
  args = parser.parse_args()
  out = pathlib.Path(args.out).resolve()
  root = out / 'Dataset001_Phantom'
  shutil.rmtree(root, ignore_errors=True)
  out.mkdir(parents=True, exist_ok=True)
  phantoms.write_nnunet_dataset(
    str(root), num_training=args.cases, num_test=args.test, size=args.size, seed=args.seed
  )
  length = (
    f'--config.plan_time_budget={args.budget}'
    if args.budget
    else f'--config.num_train_steps={args.steps}'
  )
  results = {}
  for name, flags in ARMS.items():
    print(f'{name}: training ({length}), then predicting ...', flush=True)
    results[name] = _arm(name, flags, root, out, length)
  with open(out / 'results.json', 'w') as f:
    json.dump(
      {'args': vars(args), 'date': str(datetime.date.today()), **results}, f, indent=1
    )
  print(_table(results))


if __name__ == '__main__':
  main()
