r"""The predict command with and without prefetching, end to end, on 3D cases.

`predict.run(prefetch=True)` reads (and resamples) case i + 1 and writes case
i - 1 (resampled back, argmax, NIfTI, overlay) in background threads while case i
is predicted; `prefetch=False` is the plain loop. This times both, in one
process, taking turns (plain first in even rounds, prefetch first in odd ones),
after one warm-up call that compiles (the persistent compilation cache then
serves the later calls' compiles).

Setup: a tiny 3D run trained for 2 steps (`configs/folder.py`, features 8,
depth 3, patch 48 x 64 x 64, target spacing 2 x 1 x 1 mm), and `--cases` NIfTI
volumes (int16, gzip) of 96 x 128 x 128 voxels at 1.6 x 0.8 x 0.8 mm, so each is
resampled to 77 x 102 x 102 and back. Each timed call is the whole
`predict.run`: the run restored, the inputs checked, every case predicted and
written. Recorded per call: wall seconds, the process's CPU seconds (user +
system: how much of the 2 cores it kept busy) and the load average. Once, the
stages of the plain loop per case are timed apart with the same public
functions (read + resample; predict; resample back + argmax + write + overlay).

    .venv/bin/python benchmarks/predict_pipeline.py --repeats=3   # RESULTS.md
    .venv/bin/python benchmarks/predict_pipeline.py --smoke --out=/tmp/pp
    # --workdir=runs/mine: predict with that 3D run instead of training one

Writes `<out>/predict_pipeline.json` and prints a markdown table.
"""

import argparse
import importlib
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # This tree's unet_jax and configs.

FULL = dict(
  shape=(96, 128, 128),
  spacing=(1.6, 0.8, 0.8),
  target=(2.0, 1.0, 1.0),
  patch=(48, 64, 64),
  features=8,
  depth=3,
)
SMOKE = dict(
  shape=(12, 20, 20),
  spacing=(1.6, 0.8, 0.8),
  target=(2.0, 1.0, 1.0),
  patch=(8, 16, 16),
  features=2,
  depth=2,
)


def _volume(shape, seed):
  """int16 [*shape], a smooth random image with a bright blob, and its mask."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  x = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2)
  mask = np.zeros(shape, np.uint8)
  mask[tuple(slice(n // 4, n // 2) for n in shape)] = 1
  image = 100 + 400 * x + 300.0 * mask + 5 * rng.standard_normal(shape)
  return image.astype(np.int16), mask


def train_run(base, setup):
  """A tiny 3D run trained for 2 steps at the setup's target spacing and patch."""
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  from unet_jax.data import folder  # pylint: disable=g-import-not-at-top

  for split, count in (('train', 2), ('val', 1)):
    for i in range(count):
      image, mask = _volume(setup['patch'], seed=10 + i)
      folder.write_pair(base / 'data', split, f'v{i}', image, mask, spacing=setup['target'])
  config = importlib.import_module('configs.folder').get_config()
  overrides = {
    'data.root': str(base / 'data'),
    'data.data_dir': str(base / 'tfds'),
    'data.config': '3d',
    'data.target_spacing': setup['target'],
    'data.patch_size': setup['patch'],
    'model.features': setup['features'],
    'model.depth': setup['depth'],
    'batch_size': 2,
    'eval_batch_size': 1,
    'num_train_steps': 2,
    'log_every_steps': 1,
    'eval_every_steps': 2,
    'checkpoint_every_steps': 2,
    'plan': False,
  }
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  workdir = str(base / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def write_cases(folder, setup, count):
  """`count` NIfTI volumes (RAS voxel order) at the setup's spacing."""
  import nibabel  # pylint: disable=g-import-not-at-top

  os.makedirs(folder, exist_ok=True)
  d, h, w = setup['spacing']  # Canonical (S, A, R); the file's axes are (R, A, S).
  for i in range(count):
    image, _ = _volume(setup['shape'], seed=i)
    stored = np.ascontiguousarray(np.transpose(image, (2, 1, 0)))
    nibabel.save(
      nibabel.Nifti1Image(stored, np.diag([w, h, d, 1.0])),
      os.path.join(folder, f'case{i}.nii.gz'),
    )


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def timed_call(workdir, folder, out, prefetch):
  from unet_jax.inference import predict  # pylint: disable=g-import-not-at-top

  load, cpu, start = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
  predict.run(workdir, folder, out, prefetch=prefetch)
  return {
    'wall_s': time.perf_counter() - start,
    'cpu_s': _cpu_seconds() - cpu,
    'load_before': load,
    'load_after': os.getloadavg()[0],
  }


def stage_times(workdir, folder, out):
  """Seconds per stage of the plain loop, summed over the cases (public functions)."""
  from unet_jax import visualize  # pylint: disable=g-import-not-at-top
  from unet_jax.data import geometry  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import inputs  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import predict  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import predictor as inference  # pylint: disable=g-import-not-at-top

  os.makedirs(out, exist_ok=True)
  predictor = inference.load(workdir)
  target = predictor.data.target_spacing
  stages = {'read_resample': 0.0, 'predict': 0.0, 'write': 0.0}
  for case in inputs.list_inputs(folder, ndim=3):
    start = time.perf_counter()
    image, spacing = inputs.read_image(case, ndim=3)
    resampled = geometry.resample_image(image, spacing, target)
    mid = time.perf_counter()
    probs = predictor.predict(resampled, output='probabilities')
    end = time.perf_counter()
    probs = geometry.resample_probabilities(probs, target, spacing, shape=image.shape[:-1])
    mask = predict.labels_of(probs)
    predict.write_mask(case, mask, out)
    visualize.save_overlay(
      image, mask, os.path.join(out, case.stem + '.png'), num_classes=2, title=case.stem
    )
    stages['read_resample'] += mid - start
    stages['predict'] += end - mid
    stages['write'] += time.perf_counter() - end
  return stages


def _same_masks(a, b):
  import nibabel  # pylint: disable=g-import-not-at-top

  names = sorted(n for n in os.listdir(a) if n.endswith('.nii.gz'))
  return bool(names) and all(
    np.array_equal(
      np.asarray(nibabel.load(os.path.join(a, n)).dataobj),
      np.asarray(nibabel.load(os.path.join(b, n)).dataobj),
    )
    for n in names
  )


def measure(setup, *, cases, repeats, base, workdir=None, smoke=False):
  workdir = workdir or train_run(base, setup)
  folder = str(base / 'cases')
  write_cases(folder, setup, cases)
  outs = {m: str(base / f'out_{m}') for m in ('plain', 'prefetch')}
  warm = None if smoke else timed_call(workdir, folder, str(base / 'out_warm'), False)
  stages = stage_times(workdir, folder, str(base / 'out_stages'))
  calls = {'plain': [], 'prefetch': []}
  for r in range(repeats):
    for mode in ('plain', 'prefetch') if r % 2 == 0 else ('prefetch', 'plain'):
      calls[mode].append(timed_call(workdir, folder, outs[mode], mode == 'prefetch'))
      print(f'round {r} {mode}: {calls[mode][-1]}', flush=True)
  summary = {
    m: {
      'wall_s': statistics.median(c['wall_s'] for c in v),
      'cpu_s': statistics.median(c['cpu_s'] for c in v),
    }
    for m, v in calls.items()
  }
  return {
    'setup': setup,
    'cases': cases,
    'warmup': warm,
    'stages_plain_s': stages,
    'calls': calls,
    'median': summary,
    'speedup': summary['plain']['wall_s'] / summary['prefetch']['wall_s'],
    'same_masks': _same_masks(outs['plain'], outs['prefetch']),
  }


def markdown(result):
  lines = [
    '| mode | wall s (median) | each call | CPU s (median) | speed vs plain |',
    '|---|---:|---|---:|---:|',
  ]
  for mode in ('plain', 'prefetch'):
    med = result['median'][mode]
    each = ', '.join(f'{c["wall_s"]:.1f}' for c in result['calls'][mode])
    ratio = result['median']['plain']['wall_s'] / med['wall_s']
    lines.append(
      f'| {mode} | {med["wall_s"]:.2f} | {each} | {med["cpu_s"]:.1f} | {ratio:.2f}× |'
    )
  return '\n'.join(lines)


def _lscpu_model():
  proc = subprocess.run(['lscpu'], capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith('Model name'):
      return line.split(':', 1)[1].strip()
  return 'unknown'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', type=int, default=6)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--smoke', action='store_true', help='tiny sizes, 2 cases, 1 round, no warm-up call'
  )
  parser.add_argument('--out', default=str(HERE / 'out'))
  parser.add_argument(
    '--workdir', default=None, help='a trained 3D run to predict with (default: train one)'
  )
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_platforms', 'cpu')
  setup = SMOKE if args.smoke else FULL
  report = {
    'cpu': _lscpu_model(),
    'cores': os.cpu_count(),
    'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    'uptime_before': os.getloadavg(),
  }
  with tempfile.TemporaryDirectory() as base:
    jax.config.update('jax_compilation_cache_dir', os.path.join(base, 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    report['result'] = measure(
      setup,
      cases=2 if args.smoke else args.cases,
      repeats=1 if args.smoke else args.repeats,
      base=pathlib.Path(base),
      workdir=args.workdir,
      smoke=args.smoke,
    )
  report['uptime_after'] = os.getloadavg()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'predict_pipeline.json'), 'w') as f:
    json.dump(report, f, indent=1)
  print(markdown(report['result']))
  print(f'CPU: {report["cpu"]}; load {report["uptime_before"]} -> {report["uptime_after"]}')


if __name__ == '__main__':
  main()
