r"""The plan (`unet_jax/planning/`) against the fixed settings, on the same time budget.

Builds three folder data sets that differ in what the plan must react to, each
generated here from a seed (nothing is downloaded):

1. `thin2d`: 2D 8-bit grey images (96x96) of thin curved lines 1-3 pixels wide
   on an unevenly lit, noisy background with bright blobs that are not labelled.
2. `aniso3d`: 3D float volumes (16x64x64, spacing 4 x 0.8 x 0.8) of bright
   ellipsoids and polyhedra (`unet_jax.data.synthetic.render_example`),
   with a random gain, offset and smooth bias field per volume (MRI-like).
3. `ct2d`: 2D CT-like slices (128x128) in Hounsfield units (air -1000, fat
   -100, soft tissue 40, bone 700 and up) with an organ (class 1, 60 HU) on one
   side and, in half of the slices, a small lesion inside it (class 2, 25 HU,
   well under 1% of the pixels).

For each, three results on the validation split, foreground Dice (the mean over
the foreground classes, from the whole split's confusion matrix):

* `plan`: `configs/folder.py` as it ships, with `--config.plan_time_budget`;
* `fixed`: `--config.plan=False` (features 16, depth 3, batch 16, flips and
  rot90, z-score per image; 3D patches of the whole volume), with
  `num_train_steps` = the budget / its step time, measured the same way
  (`unet_jax.train.setup.measure_step_time`);
* a classical baseline: Otsu's threshold per image, and the global threshold
  (or, for ct2d, one intensity window per class) that maximises Dice on the
  train split.

    nice -n 10 .venv/bin/python benchmarks/planning.py [--budget=150] \
        [--only=thin2d,aniso3d,ct2d] [--out=benchmarks/out/planning]

Writes <out>/results.json and prints a Markdown table for benchmarks/RESULTS.md.
Budgets are wall-clock seconds of training steps, measured on the machine the
script runs on (shared machines make them noisy).
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For `configs`.

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import folder as folder_config
from unet_jax.data import folder as sf
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import sources
from unet_jax.data import synthetic
from unet_jax.models import factory
from unet_jax.train import setup

# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETS = ('thin2d', 'aniso3d', 'ct2d')
COUNTS = {'thin2d': (60, 20), 'aniso3d': (24, 8), 'ct2d': (60, 20)}


# ---------------------------------------------------------------------------
# Data sets.


def _curve_mask(rng, shape, width) -> np.ndarray:
  """A smooth random curve `width` pixels wide: bool [H, W]."""
  h, w = shape
  y, x = rng.uniform(0, h), rng.uniform(0, w)
  angle, turn = rng.uniform(0, 2 * np.pi), 0.0
  points = []
  for _ in range(int(rng.uniform(100, 220))):
    turn = 0.9 * turn + rng.normal(0, 0.06)
    angle += turn
    y, x = y + 0.7 * np.sin(angle), x + 0.7 * np.cos(angle)
    points.append((y, x))
  yy, xx = np.mgrid[0:h, 0:w]
  mask = np.zeros(shape, bool)
  for py, px in points:
    mask |= (yy - py) ** 2 + (xx - px) ** 2 <= (width / 2) ** 2
  return mask


def thin2d(rng) -> tuple[np.ndarray, np.ndarray]:
  shape = (96, 96)
  label = np.zeros(shape, np.uint8)
  for _ in range(int(rng.integers(3, 6))):
    label[_curve_mask(rng, shape, width=rng.uniform(1.0, 3.0))] = 1
  yy, xx = np.mgrid[0:96, 0:96] / 95.0
  light = 40 * (rng.uniform(-1, 1) * (yy - 0.5) + rng.uniform(-1, 1) * (xx - 0.5))
  smooth = ndimage.gaussian_filter(rng.normal(size=shape), 8)
  image = 90 + light + 10 * smooth / (smooth.std() + 1e-8)
  for _ in range(int(rng.integers(1, 3))):  # Bright blobs, not labelled.
    cy, cx, r = rng.uniform(10, 86), rng.uniform(10, 86), rng.uniform(4, 7)
    image += 45 * ((yy * 95 - cy) ** 2 + (xx * 95 - cx) ** 2 <= r**2)
  image += 35 * label + rng.normal(0, 8, shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def aniso3d(rng) -> tuple[np.ndarray, np.ndarray]:
  image, label = synthetic.render_example(
    rng,
    shape=(16, 64, 64),
    num_classes=2,
    foreground_fraction=0.08,
    spacing=(4.0, 0.8, 0.8),
  )
  bias = (
    1
    + 0.2
    * ndimage.zoom(rng.uniform(-1, 1, (2, 3, 3)), (8, 64 / 3, 64 / 3), order=1)[
      :16, :64, :64
    ]
  )
  gain, offset = rng.uniform(2, 8), rng.uniform(100, 600)
  volume = (image[..., 0].astype(np.float32) * gain + offset) * bias
  return volume.astype(np.float32), label


def ct2d(rng) -> tuple[np.ndarray, np.ndarray]:
  size = 128
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  cy, cx = size / 2 + rng.normal(0, 3, 2)
  ry, rx = rng.uniform(38, 48), rng.uniform(50, 60)
  body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  inner = ((yy - cy) / (ry - 4)) ** 2 + ((xx - cx) / (rx - 4)) ** 2 <= 1
  image = np.full((size, size), -1000.0)
  image[body] = -100  # Fat.
  image[inner] = 40  # Soft tissue.
  spine = (yy - (cy + ry - 14)) ** 2 + (xx - cx) ** 2 <= rng.uniform(6, 9) ** 2
  image[spine] = 700 + 300 * rng.random(spine.sum())
  # The organ: always on the same side (the patient's right, image left).
  oy, ox = cy + rng.normal(-8, 3), cx - rx * rng.uniform(0.35, 0.45)
  organ = (
    ((yy - oy) / rng.uniform(16, 22)) ** 2 + ((xx - ox) / rng.uniform(14, 19)) ** 2 <= 1
  ) & inner
  kidney = ((yy - (cy + 12)) / 9) ** 2 + ((xx - (cx + rx * 0.45)) / 6) ** 2 <= 1
  image[kidney & inner] = 30  # Unlabelled, close to the lesion's 25 HU.
  image[organ] = 60
  label = organ.astype(np.uint8)
  if rng.random() < 0.5:
    where = np.argwhere(ndimage.binary_erosion(organ, iterations=5))
    if len(where):
      ly, lx = where[rng.integers(len(where))]
      lesion = (yy - ly) ** 2 + (xx - lx) ** 2 <= rng.uniform(2.5, 4.5) ** 2
      image[lesion & organ] = 25
      label[lesion & organ] = 2
  image += ndimage.gaussian_filter(rng.normal(0, 30, image.shape), 1.0)
  image += rng.normal(0, 8, image.shape)
  return np.round(image).astype(np.float32), label


def write_set(name: str, root: pathlib.Path) -> None:
  """Writes a data set's folder (train/ and val/), if not written yet."""
  if (root / 'val' / 'masks').is_dir():
    return
  make = {'thin2d': thin2d, 'aniso3d': aniso3d, 'ct2d': ct2d}[name]
  rng = np.random.default_rng({'thin2d': 1, 'aniso3d': 2, 'ct2d': 3}[name])
  for split, count in zip(('train', 'val'), COUNTS[name]):
    for i in range(count):
      image, label = make(rng)
      if name == 'aniso3d':
        sf.write_pair(root, split, f'{split}{i:03d}', image, label, spacing=(4.0, 0.8, 0.8))
      else:
        sf.write_pair(
          root,
          split,
          f'{split}{i:03d}',
          image,
          label,
          image_format='tif' if name == 'ct2d' else 'png',
        )


# ---------------------------------------------------------------------------
# Classical baselines.


def _read_split(root: pathlib.Path, split: str, ndim: int):
  pairs = sf.list_pairs(root, ndim=ndim)[split]
  for pair in pairs:
    image, _ = sf.read_image(pair.image, ndim=ndim)
    mask, _ = sf.read_mask(pair.mask, ndim=ndim)
    yield image[..., 0], mask


def _otsu(values: np.ndarray) -> float:
  """Otsu's threshold: the split of a 256-bin histogram with the largest
  between-class variance (Otsu, IEEE Trans. SMC 1979)."""
  counts, edges = np.histogram(values, bins=256)
  centres = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(counts)
  w1 = w0[-1] - w0
  m0 = np.cumsum(counts * centres) / np.maximum(w0, 1)
  m1 = ((counts * centres).sum() - np.cumsum(counts * centres)) / np.maximum(w1, 1)
  between = w0 * w1 * (m0 - m1) ** 2
  return float(centres[int(np.argmax(between))])


def _confusion(cm, pred, label, k):
  cm += np.bincount(
    k * label.ravel().astype(np.int64) + pred.ravel(), minlength=k * k
  ).reshape(k, k)


def _foreground_dice(cm) -> tuple[float, list[float]]:
  dice = []
  for c in range(1, len(cm)):
    tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c, :].sum() - cm[c, c]
    dice.append(float(2 * tp / (2 * tp + fp + fn)) if 2 * tp + fp + fn else float('nan'))
  return float(np.nanmean(dice)), dice


def _best_window(images, labels, c) -> tuple[float, float]:
  """The intensity window [lo, hi] whose pixels give class c the best train Dice."""
  values = np.concatenate([i.ravel() for i in images])
  truth = np.concatenate([(m == c).ravel() for m in labels])
  inside = values[truth]
  grid = np.unique(np.percentile(inside, np.linspace(0, 100, 41)))
  best, window = -1.0, (grid[0], grid[-1])
  for lo in grid:
    for hi in grid[grid > lo]:
      pred = (values >= lo) & (values <= hi)
      tp = np.sum(pred & truth)
      dice = 2 * tp / (pred.sum() + truth.sum())
      if dice > best:
        best, window = dice, (float(lo), float(hi))
  return window


def classical(name: str, root: pathlib.Path) -> dict[str, float]:
  """Otsu per image, and a threshold (windows for ct2d) fitted on train."""
  ndim = 3 if name == 'aniso3d' else 2
  train = list(_read_split(root, 'train', ndim))
  val = list(_read_split(root, 'val', ndim))
  k = 3 if name == 'ct2d' else 2
  results = {}
  if name == 'ct2d':
    windows = {
      c: _best_window([i for i, _ in train], [m for _, m in train], c) for c in (1, 2)
    }
    cm = np.zeros((k, k), np.int64)
    for image, label in val:
      pred = np.zeros(label.shape, np.int64)
      for c in (1, 2):
        lo, hi = windows[c]
        pred[(image >= lo) & (image <= hi)] = c
      _confusion(cm, pred, label, k)
    results['HU windows fitted on train'] = _foreground_dice(cm)
  else:
    # One global threshold: the one with the best train Dice.
    values = np.concatenate([i.ravel() for i, _ in train])
    truth = np.concatenate([(m > 0).ravel() for _, m in train])
    candidates = np.percentile(values, np.linspace(50, 99.9, 200))
    scores = [
      2 * np.sum((values > t) & truth) / (np.sum(values > t) + truth.sum())
      for t in candidates
    ]
    threshold = candidates[int(np.argmax(scores))]
    cm = np.zeros((k, k), np.int64)
    for image, label in val:
      _confusion(cm, (image > threshold).astype(np.int64), label, k)
    results['threshold fitted on train'] = _foreground_dice(cm)
  cm = np.zeros((k, k), np.int64)
  for image, label in val:
    pred = (image > _otsu(image.ravel())).astype(np.int64)
    _confusion(cm, pred, label, k)
  results['Otsu per image'] = _foreground_dice(cm)
  return results


# ---------------------------------------------------------------------------
# Training runs.


def _flags(name: str, root: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
  flags = [
    f'--config.data.root={root}',
    f'--config.data.data_dir={data_dir}',
    '--config.eval_every_steps=1000000',
    '--config.checkpoint_every_steps=1000000',
    '--config.log_every_steps=100',
  ]
  if name == 'aniso3d':
    flags.append('--config.data.config=3d')
  return flags


def _fixed_config(name, root, data_dir):
  config = folder_config.get_config()
  config.plan = False
  config.data.root, config.data.data_dir = str(root), str(data_dir)
  if name == 'aniso3d':
    config.data.config = '3d'
    config.data.patch_size = (16, 64, 64)
  return config


def _fixed_steps(name, root, data_dir, budget) -> tuple[int, float]:
  """The fixed settings' steps for the budget, from their measured step time."""
  config = _fixed_config(name, root, data_dir)
  ndim = sources.config_ndim(config.data)
  data = input_pipeline.open(
    config.data, divisor=factory.input_divisor_of(config.model, ndim=ndim)
  )
  # Slow 3D steps (a batch of 16 volumes) need no warm-up to drain the prefetch.
  step_time = (
    setup.measure_step_time(config, data, steps=2, warmup=0)
    if (name == 'aniso3d')
    else setup.measure_step_time(config, data)
  )
  return max(1, math.floor(budget / step_time)), step_time


def _train_seconds(workdir: pathlib.Path) -> float:
  """Seconds from the start of the training loop to its last step (the first step's
  compilation included, the final evaluation excluded), from the log's timestamps."""
  text = (workdir / 'stderr.txt').read_text()
  stamp = r'^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*'
  first = re.search(stamp + r'Training .* for \d+ steps', text, re.M)
  last = re.findall(stamp + r'\] step \d+/\d+ ', text, re.M)
  if not first or not last:
    raise RuntimeError(f'No training start or last step in {workdir}/stderr.txt.')
  seconds = lambda h, m, s: 3600 * int(h) + 60 * int(m) + float(s)
  return round((seconds(*last[-1][:3]) - seconds(*first.groups())) % 86400, 1)


def _run(cmd: list[str], workdir: pathlib.Path) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)  # A fresh run, never a resumed one.
  start = time.perf_counter()
  proc = subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu')
  )
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-4000:]}')
  (workdir / 'stderr.txt').write_text(proc.stderr)  # _train_seconds reads it.
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  last = [r for r in rows if 'eval_dice' in r][-1]
  steps = max(r['step'] for r in rows if 'train_loss' in r)
  done = re.search(r'Done in ([\d:]+)', proc.stderr)
  return {
    'dice': last['eval_dice'],
    'dice_per_class': last['eval_dice_per_class'][1:],
    'steps': steps,
    'wall_s': round(wall, 1),
    'train_s': _train_seconds(workdir),
    'loop': done.group(1) if done else None,
  }


def _launch(workdir, name, root, data_dir, *flags) -> list[str]:
  return [
    sys.executable,
    str(ROOT / 'launch.py'),
    '--config=configs/folder.py',
    f'--workdir={workdir}',
    *_flags(name, root, data_dir),
    *flags,
  ]


def train_runs(name, root, out, budget, arms, results) -> None:
  """Runs the `arms` ('plan', 'fixed', 'fixed3') of one data set into `results`."""
  data_dir = out / 'tfds'
  if 'plan' in arms:
    workdir = out / f'{name}_plan'
    entry = _run(
      _launch(workdir, name, root, data_dir, f'--config.plan_time_budget={budget}'), workdir
    )
    with open(workdir / 'plan.json') as f:
      plan = json.load(f)
    entry['measured_step_time'] = plan['inputs']['step_time']  # Of the plan before
    entry['step_time'] = budget / entry['steps']  # the time rule; then as planned.
    entry['choices'] = {c['field']: c['value'] for c in plan['choices']}
    results['plan'] = entry
  if 'fixed' in arms:
    steps, step_time = _fixed_steps(name, root, data_dir, budget)
    results['fixed_steps'], results['fixed'] = steps, {'step_time': step_time}
  fixed = ['--config.plan=False']
  if name == 'aniso3d':
    fixed.append('--config.data.patch_size=(16,64,64)')
  for arm, factor in (('fixed', 1), ('fixed3', 3)):
    if arm in arms:
      workdir = out / f'{name}_{arm}'
      base = (
        results['fixed_steps'] if 'fixed_steps' in results else results['fixed']['steps']
      )
      steps = factor * base
      step_time = results['fixed']['step_time']
      results[arm] = _run(
        _launch(workdir, name, root, data_dir, *fixed, f'--config.num_train_steps={steps}'),
        workdir,
      )
      results[arm]['step_time'] = step_time


def _table(results: dict) -> str:
  lines = [
    '| data set | method | steps | s/step (planned) | training s | run s |'
    ' foreground Dice | per class |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |',
  ]
  for name, r in results.items():
    for method in ('plan', 'fixed', 'fixed3'):
      if method not in r:
        continue
      m = r[method]
      lines.append(
        f'| {name} | {method} | {m["steps"]} | {m["step_time"]:.3f} |'
        f' {m["train_s"]:.0f} | {m["wall_s"]:.0f} | {m["dice"]:.4f} |'
        f' {", ".join(f"{d:.3f}" for d in m["dice_per_class"])} |'
      )
    for method, (dice, per_class) in r['classical'].items():
      lines.append(
        f'| {name} | {method} | | | | | {dice:.4f} |'
        f' {", ".join(f"{d:.3f}" for d in per_class)} |'
      )
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--budget', type=float, default=150.0, help='seconds of training steps per run'
  )
  parser.add_argument('--only', default=','.join(SETS))
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'planning'))
  parser.add_argument(
    '--arms',
    default='plan,fixed,fixed3',
    help="'plan', 'fixed' (the same budget) and 'fixed3' (3x its"
    ' steps, to see how much the budget alone explains)',
  )
  parser.add_argument(
    '--table_only',
    action='store_true',
    help='print the table of the results in --out; run nothing',
  )
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / 'results.json'
  results = json.loads(path.read_text()) if path.exists() else {}
  if args.table_only:
    for name, entry in results.items():
      for method in ('plan', 'fixed', 'fixed3'):
        if method in entry:
          entry[method]['train_s'] = _train_seconds(out / f'{name}_{method}')
      entry['plan']['step_time'] = entry['budget_s'] / entry['plan']['steps']
    print(_table(results))
    return
  for name in args.only.split(','):
    if name not in SETS:
      raise SystemExit(f'--only: unknown data set {name!r}; the sets are {SETS}.')
    root = out / name
    write_set(name, root)
    entry = results.get(name, {})
    entry['classical'] = classical(name, root)
    print(name, 'classical:', entry['classical'], flush=True)
    train_runs(name, root, out, args.budget, args.arms.split(','), entry)
    entry['budget_s'] = args.budget
    entry['date'] = datetime.date.today().isoformat()
    results[name] = entry
    path.write_text(json.dumps(results, indent=1))
    print(
      name, {k: v.get('dice') for k, v in entry.items() if isinstance(v, dict)}, flush=True
    )
  print(_table(results))


if __name__ == '__main__':
  main()
