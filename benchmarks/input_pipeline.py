r"""Input examples/s: grain + array_record against tf.data + TFRecord and the train step.

Measures, on synthetic_shapes/binary (64x64x1) at the default batch of 16:

1. input examples/s of `input_pipeline.train_iterator` (TFDS array_record read
   at random with grain, background threads), for 1, 2 and 4 read threads;
2. input examples/s of the equivalent tf.data pipeline over TFRecord
   (file shuffle, 1024-example shuffle buffer, parallel map, prefetch);
3. the cost of resuming at a late step: grain jumps there, tf.data must read
   and drop every earlier example;
4. train-step examples/s of the default config's model (augmentation inside the
   jitted step), alone on a fixed batch and fed by the pipeline: if the pipeline
   keeps up, the two agree;
5. input examples/s for 3D patches (synthetic_volumes/binary, 16x32x32
   patches, batch 2);
6. examples/s of `augment.augment` alone (jitted), default and full
   augmentation.

    .venv/bin/python benchmarks/input_pipeline.py [--steps 200] [--skip_train_step]

Prints a table and writes benchmarks/out/input_pipeline.json.

With `--accelerator_scale` it measures instead the sizes a GPU trains on, from
generated `segmentation_folder` data sets (written once under `--data_dir`, built
by the real pipeline into array_record):

- 3D: 128^3 patches, batch 2, a third of them centred on foreground
  (`config.data.foreground_fraction`, nnU-Net's oversampling), cut from
  160x192x160 volumes;
- 2D: whole 512^2 images, batch 12.

Each case runs `Dataset.train_iterator` as training does, with its batches built
by `--workers` grain worker processes (`mp_prefetch`); 0 workers is the
pipeline's default, one background thread in the training process (the
pipeline has no worker option: the benchmark swaps its thread prefetch,
`pipeline._iterate`, for `mp_prefetch`). After the first k + 1 batches of k
workers (their start), `--repeats` windows of `--batches` batches (default: 6)
are timed; a window's rate is patches/s, and the table gives the median
and that median divided by the workers (patches/s per worker process). It also
times the stages of one example (read and decompress, normalise, a patch on
foreground, a random patch) in this process, in wall and CPU seconds, gives the
workers nnU-Net's pace on an A100 needs (10 to 11 patches/s, from the CPU seconds
per patch and from one worker's rate), and writes the CPU model and the uptime load
before and after.

    .venv/bin/python benchmarks/input_pipeline.py --accelerator_scale \
        --workers=0,1,2 --out=benchmarks/out
    .venv/bin/python benchmarks/input_pipeline.py --smoke   # tiny sizes

Writes <out>/input_pipeline_accelerator.json.
"""

import argparse
import contextlib
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
import grain
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For `configs`.

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from unet_jax import config as config_lib
from unet_jax.data import folder
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import synthetic

# pylint: enable=g-import-not-at-top,wrong-import-position

tf.config.set_visible_devices([], 'GPU')


def _rate(iterator, *, steps, batch_size, warmup=5):
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def grain_rate(data_config, *, steps, batch_size, threads):
  saved = input_pipeline._READ_THREADS  # pylint: disable=protected-access
  input_pipeline._READ_THREADS = threads  # pylint: disable=protected-access
  try:
    it = input_pipeline.open(data_config, divisor=8).train_iterator(
      batch_size=batch_size, seed=0
    )
    return _rate(it, steps=steps, batch_size=batch_size)
  finally:
    input_pipeline._READ_THREADS = saved  # pylint: disable=protected-access


def tf_data_pipeline(data_dir, *, batch_size, skip_examples=0):
  """The tf.data equivalent of the train iterator (not exactly resumable)."""
  builder = tfds.builder('synthetic_shapes/binary', data_dir=data_dir)
  builder.download_and_prepare()  # TFRecord, TFDS's default format.

  def prepare(example):
    image = tf.cast(example['image'], tf.float32)
    mean, var = tf.nn.moments(image, axes=[0, 1], keepdims=True)
    image = (image - mean) / tf.maximum(tf.sqrt(var), 1e-6)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  ds = builder.as_dataset(
    split='train', shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=0)
  )
  ds = ds.repeat().shuffle(1024, seed=0).skip(skip_examples)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds))


def train_step_rate(config, batches, *, steps, rounds=3):
  """Examples/s of the default config's jitted train step (with augmentation)."""
  from unet_jax import losses  # pylint: disable=g-import-not-at-top
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  from unet_jax.models import factory  # pylint: disable=g-import-not-at-top

  model = factory.create_model(config.model, kernels=config.kernels)
  tx = train.create_optimizer(config)
  batch = next(batches)
  state = train.create_train_state(
    jax.random.key(0), model, tx, (1,) + batch['image'].shape[1:]
  )
  loss_fn = functools.partial(
    losses.get_loss(config.loss.name), **config.loss.kwargs.to_dict()
  )
  step = jax.jit(
    functools.partial(
      train.train_step,
      model=model,
      tx=tx,
      loss_fn=loss_fn,
      learning_rate_fn=train.create_learning_rate_fn(config),
      aug_config=config.augment,
      seed=0,
    )
  )
  fixed = jax.device_put(batch)
  for _ in range(3):
    state, metrics = step(state, fixed)
  jax.block_until_ready(metrics)

  def timed(next_batch):
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    return steps * config.batch_size / (time.perf_counter() - start)

  # Alternate the two measurements; other load on the machine shifts both alike.
  alone, fed = [], []
  for _ in range(rounds):
    alone.append(timed(lambda: fixed))
    fed.append(timed(lambda: next(batches)))
  return float(np.median(alone)), float(np.median(fed))


def augment_rate(config, batch, *, steps):
  """Examples/s of `augment` alone, jitted, on one batch."""
  from unet_jax.data import augment  # pylint: disable=g-import-not-at-top

  fn = jax.jit(lambda k, x, y: augment.augment(k, x, y, config=config.augment))
  image, label = jax.device_put(batch['image']), jax.device_put(batch['label'])
  jax.block_until_ready(fn(jax.random.key(0), image, label))
  start = time.perf_counter()
  for i in range(steps):
    out = fn(jax.random.key(i), image, label)
  jax.block_until_ready(out)
  return steps * batch['image'].shape[0] / (time.perf_counter() - start)


def _measure_input(config, args, data_dir, results):
  """Reading speed, resume cost and 3D patches: grain against tf.data."""
  batch_size = config.batch_size
  start = time.perf_counter()
  input_pipeline.open(config.data, divisor=8).info
  results['build_seconds_synthetic_shapes_binary'] = time.perf_counter() - start

  for threads in (1, 2, 4):
    results[f'grain_examples_per_s_{threads}_threads'] = grain_rate(
      config.data, steps=args.steps, batch_size=batch_size, threads=threads
    )
  tf_dir = os.path.join(data_dir, 'tfrecord')
  results['tf_data_examples_per_s'] = _rate(
    tf_data_pipeline(tf_dir, batch_size=batch_size),
    steps=args.steps,
    batch_size=batch_size,
  )

  start = time.perf_counter()
  next(
    input_pipeline.open(config.data, divisor=8).train_iterator(
      batch_size=batch_size, seed=0, start_step=args.resume_step
    )
  )
  results['grain_resume_seconds'] = time.perf_counter() - start
  start = time.perf_counter()
  next(
    tf_data_pipeline(
      tf_dir, batch_size=batch_size, skip_examples=args.resume_step * batch_size
    )
  )
  results['tf_data_resume_seconds'] = time.perf_counter() - start

  volumes = default.get_config().data
  volumes.update(
    name='synthetic_volumes', data_dir=config.data.data_dir, patch_size=(16, 32, 32)
  )
  results['grain_3d_patch_examples_per_s'] = _rate(
    input_pipeline.open(volumes, divisor=8).train_iterator(batch_size=2, seed=0),
    steps=args.steps,
    batch_size=2,
  )


def _measure_train_step(config, args, results):
  """The train step alone and fed by the pipeline, with and without augmentation."""
  batch_size = config.batch_size
  for name, overrides in (
    ('default_augment', {}),
    ('full_augment', dict(scale=(0.8, 1.25), elastic=4.0, intensity=0.1)),
  ):
    config.augment.update(overrides)
    batches = input_pipeline.open(config.data, divisor=8).train_iterator(
      batch_size=batch_size, seed=1
    )
    results[f'augment_alone_examples_per_s_{name}'] = augment_rate(
      config, next(batches), steps=args.steps
    )
    alone, fed = train_step_rate(config, batches, steps=max(args.steps // 10, 10))
    results[f'train_step_examples_per_s_{name}'] = alone
    results[f'train_step_fed_by_pipeline_examples_per_s_{name}'] = fed


# ---------------------------------------------------------------------------
# Accelerator scale: 128^3 patches and 512^2 images, with grain worker processes.

# name: generated data set and batch. nnU-Net's 3d_fullres trains on batches of 2
# patches of about 128^3; its 2d configuration on batches of about 12 512^2 images.
ACCELERATOR_CASES = {
  '3d_128_patches_fg': dict(
    shape=(160, 192, 160), patch=(128, 128, 128), batch=2, num_train=3, batches=6
  ),
  '2d_512_images': dict(shape=(512, 512), patch=None, batch=12, num_train=24, batches=6),
}
SMOKE_CASES = {
  '3d_128_patches_fg': dict(
    shape=(20, 40, 24), patch=(16, 16, 16), batch=2, num_train=2, batches=2
  ),
  '2d_512_images': dict(shape=(64, 64), patch=None, batch=4, num_train=4, batches=2),
}
# nnU-Net's pace on an A100 (3d_fullres): 250 iterations of 2 patches in 45 to 50 s.
NNUNET_PATCHES_PER_S = (2 * 250 / 50, 2 * 250 / 45)


def uptime() -> str:
  """`uptime`'s line (with the load average), or 'unknown'."""
  try:
    return subprocess.run(
      ['uptime'], capture_output=True, text=True, check=False, timeout=10
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def cpu_model() -> str:
  """`lscpu`'s model name, or 'unknown'."""
  try:
    out = subprocess.run(
      ['lscpu'], capture_output=True, text=True, check=False, timeout=10
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  names = [
    line.split(':', 1)[1].strip() for line in out.splitlines() if 'Model name' in line
  ]
  return names[0] if names else 'unknown'


def write_folder(root, *, shape, num_train, seed=0) -> None:
  """A `segmentation_folder` of synthetic cases (5% foreground), unless it exists."""
  root = pathlib.Path(root)
  if (root / 'done').exists():
    return
  for split, count in (('train', num_train), ('val', 1)):
    for i in range(count):
      rng = np.random.default_rng([seed, i, split == 'val'])
      image, label = synthetic.render_example(
        rng, shape=shape, num_classes=2, foreground_fraction=0.05
      )
      folder.write_pair(root, split, f'{split}_{i:03d}', image[..., 0], label)
  (root / 'done').write_text('')


def open_case(case, data_dir) -> input_pipeline.Dataset:
  """The case's data set, generated and built under `data_dir` on first use."""
  ndim = len(case['shape'])
  name = 'x'.join(map(str, case['shape']))
  root = os.path.join(data_dir, f'folder_{name}_{case["num_train"]}')
  write_folder(root, shape=case['shape'], num_train=case['num_train'])
  options = config_lib.DataOptions(
    name='segmentation_folder',
    config=f'{ndim}d',
    root=root,
    data_dir=os.path.join(data_dir, 'tfds'),
    patch_size=case['patch'] or (),
  )
  return input_pipeline.open(options, divisor=8)


@contextlib.contextmanager
def grain_workers(workers: int):
  """The pipeline's iterators built by `workers` grain processes (0: its default)."""
  saved = input_pipeline._iterate  # pylint: disable=protected-access

  def iterate(batches):
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    dataset = batches.to_iter_dataset(options)
    if workers:
      dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1)
      )
    return iter(dataset)

  input_pipeline._iterate = iterate if workers else saved  # pylint: disable=protected-access
  try:
    yield
  finally:
    input_pipeline._iterate = saved  # pylint: disable=protected-access


def worker_rates(data, *, batch, workers, warmup, batches, repeats) -> dict:
  """Patches/s of `train_iterator` with `workers` grain processes."""
  with grain_workers(workers):
    start = time.perf_counter()
    iterator = data.train_iterator(batch_size=batch, seed=0)
    for _ in range(warmup):
      next(iterator)
    startup = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(batches):
        out = next(iterator)
      rates.append(batches * batch / (time.perf_counter() - start))
    if hasattr(iterator, 'close'):
      iterator.close()
  median = statistics.median(rates)
  return {
    'workers': workers,
    'patches_per_s_median': median,
    'patches_per_s_all': rates,
    'patches_per_s_per_worker': median / max(workers, 1),
    'startup_s': startup,
    'batch_shape': list(out['image'].shape),
  }


def _timed(fn, wall: list, cpu: list):
  """fn(), appending its wall and this thread's CPU seconds."""
  start, start_cpu = time.perf_counter(), time.thread_time()
  out = fn()
  wall.append(time.perf_counter() - start)
  cpu.append(time.thread_time() - start_cpu)
  return out


def stage_seconds(data, *, patch, fraction, examples=3) -> dict:
  """Median wall and CPU seconds of each stage of one training example, here.

  CPU seconds (this thread's) hardly depend on the machine's load; wall seconds do.
  'cpu_s_per_example' adds the stages as the pipeline mixes them: read, normalise,
  then a foreground patch for a share `fraction` of the examples and a random one
  for the rest.
  """
  records = data.split(data.options.train_split)
  names = ('read', 'normalise') + (('foreground_patch', 'random_patch') if patch else ())
  wall = {k: [] for k in names}
  cpu = {k: [] for k in names}
  for i in range(min(examples, len(records))):
    example = _timed(lambda: data.source.read(records, i), wall['read'], cpu['read'])
    image = _timed(
      lambda: data._normalise(example.image),  # pylint: disable=protected-access
      wall['normalise'],
      cpu['normalise'],
    )
    for key, on_foreground in (('foreground_patch', True), ('random_patch', False)):
      if patch:
        _timed(
          lambda: input_pipeline._random_patch(  # pylint: disable=protected-access
            image,
            example.label,
            patch,
            np.random.default_rng(i),
            on_foreground=on_foreground,
          ),
          wall[key],
          cpu[key],
        )
  wall = {k: statistics.median(v) for k, v in wall.items()}
  cpu = {k: statistics.median(v) for k, v in cpu.items()}
  per_example = cpu['read'] + cpu['normalise']
  if patch:
    per_example += fraction * cpu['foreground_patch'] + (1 - fraction) * cpu['random_patch']
  return {'wall': wall, 'cpu': cpu, 'cpu_s_per_example': per_example}


def workers_needed(per_worker: float) -> dict:
  """Workers for nnU-Net's A100 pace (10 to 11 patches/s), if they scale linearly."""
  return {
    f'{pace:.1f}_patches_per_s': int(np.ceil(pace / per_worker))
    for pace in NNUNET_PATCHES_PER_S
  }


def accelerator_scale(args) -> dict:
  """The `--accelerator_scale` measurements: {'meta': ..., 'cases': {name: ...}}."""
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags.
  cases = SMOKE_CASES if args.smoke else ACCELERATOR_CASES
  workers = [int(w) for w in args.workers.split(',')]
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='unet_jax_bench_')
  meta = {
    'cpu_model': cpu_model(),
    'cpu_count': os.cpu_count(),
    'jax': jax.__version__,
    'grain': getattr(grain, '__version__', 'unknown'),
    'uptime_before': uptime(),
    'smoke': args.smoke,
    'repeats': args.repeats,
  }
  results = {}
  for name, case in cases.items():
    start = time.perf_counter()
    data = open_case(case, data_dir)
    row = {'case': case, 'prepare_s': time.perf_counter() - start}
    row['stage_s'] = stage_seconds(
      data, patch=case['patch'], fraction=data.options.foreground_fraction
    )
    row['by_workers'] = {}
    for k in workers:
      row['by_workers'][str(k)] = worker_rates(
        data,
        batch=case['batch'],
        workers=k,
        warmup=max(k, 1) + 1,
        batches=args.batches or case['batches'],
        repeats=args.repeats,
      )
      r = row['by_workers'][str(k)]
      print(
        f'[{name}] {k} workers: {r["patches_per_s_median"]:.2f} patches/s'
        f' ({r["patches_per_s_per_worker"]:.2f} per worker), start {r["startup_s"]:.1f} s',
        flush=True,
      )
    if case['patch']:
      # From the CPU seconds of one patch: each worker with a core to itself.
      pace = {'from_cpu_seconds': workers_needed(1 / row['stage_s']['cpu_s_per_example'])}
      if '1' in row['by_workers']:  # From one worker's measured rate, under the load.
        pace['from_1_worker'] = workers_needed(
          row['by_workers']['1']['patches_per_s_median']
        )
      row['workers_for_nnunet_pace'] = pace
    results[name] = row
  meta['uptime_after'] = uptime()
  return {'meta': meta, 'cases': results}


def accelerator_table(report) -> str:
  """The markdown table of `accelerator_scale`'s report."""
  lines = [
    '| case | workers | patches/s (median) | per worker | start s |',
    '| --- | ---: | ---: | ---: | ---: |',
  ]
  for name, row in report['cases'].items():
    for k, r in row['by_workers'].items():
      lines.append(
        f'| {name} | {k} | {r["patches_per_s_median"]:.2f} |'
        f' {r["patches_per_s_per_worker"]:.2f} | {r["startup_s"]:.1f} |'
      )
  return '\n'.join(lines)


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--steps', type=int, default=200, help='Batches timed per measurement.'
  )
  parser.add_argument('--resume_step', type=int, default=2000, help='Step to resume at.')
  parser.add_argument(
    '--data_dir', default='', help='Where data sets are built; default a temporary folder.'
  )
  parser.add_argument('--skip_train_step', action='store_true')
  parser.add_argument(
    '--accelerator_scale',
    action='store_true',
    help='128^3 patches and 512^2 images with grain worker processes instead.',
  )
  parser.add_argument('--smoke', action='store_true', help='Accelerator scale, tiny.')
  parser.add_argument('--workers', default='1,2,4', help='Grain worker processes.')
  parser.add_argument('--repeats', type=int, default=3, help='Timed windows.')
  parser.add_argument(
    '--batches', type=int, default=0, help='Batches per window; 0: per case.'
  )
  parser.add_argument('--out', default=str(pathlib.Path(__file__).resolve().parent / 'out'))
  return parser.parse_args(argv)


def main(argv=None):
  args = _parse(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.accelerator_scale or args.smoke:
    report = accelerator_scale(args)
    print(accelerator_table(report))
    print(f'load: before [{report["meta"]["uptime_before"]}]')
    print(f'      after  [{report["meta"]["uptime_after"]}]')
    (out / 'input_pipeline_accelerator.json').write_text(json.dumps(report, indent=2))
    return report
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='unet_jax_bench_')
  config = default.get_config()
  config.data.data_dir = os.path.join(data_dir, 'array_record')
  results = {
    'machine': (
      f'{os.cpu_count()} CPU cores, jax {jax.__version__}, backend {jax.default_backend()}'
    )
  }

  _measure_input(config, args, data_dir, results)
  if not args.skip_train_step:
    _measure_train_step(config, args, results)

  width = max(map(len, results))
  for key, value in results.items():
    print(
      f'{key:<{width}}  {value:.1f}'
      if isinstance(value, float)
      else f'{key:<{width}}  {value}'
    )
  (out / 'input_pipeline.json').write_text(json.dumps(results, indent=2))
  return results


if __name__ == '__main__':
  main()
