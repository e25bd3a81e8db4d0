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
"""

import argparse
import functools
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For `configs`.

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from unet_jax.data import pipeline as input_pipeline

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--steps', type=int, default=200, help='Batches timed per measurement.'
  )
  parser.add_argument('--resume_step', type=int, default=2000, help='Step to resume at.')
  parser.add_argument(
    '--data_dir', default='', help='TFDS data_dir; default a temporary folder.'
  )
  parser.add_argument('--skip_train_step', action='store_true')
  args = parser.parse_args()
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
  out = pathlib.Path(__file__).resolve().parent / 'out'
  out.mkdir(exist_ok=True)
  (out / 'input_pipeline.json').write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
