r"""Data-parallel scaling on simulated CPU devices, and what an all-reduce must carry.

The same training step (configs/dice_bce.py's model, loss, optimiser and
augmentation, `train.train_step` run by `runner_lib.Runner` as in training) on:

- 1, 2 and 4 devices of one process (`--xla_force_host_platform_device_count=4`;
  the mesh takes the first n);
- 2 processes x 2 devices, joined by `jax.distributed.initialize` on 127.0.0.1,
  with gloo (JAX's CPU collectives) between the processes.

The batch per device is fixed (weak scaling: the global batch grows with the
devices). For each layout it reports:

- steps/s and examples/s of the step;
- the share of step time spent in collectives, 1 - t_local / t_step, where
  t_local is the same step under `jax.shard_map` with every cross-device
  reduction removed: each device computes its own gradient and BatchNorm
  statistics and nothing is exchanged (the gradient all-reduce, the BatchNorm
  and loss reductions over the global batch are what the difference measures);
- with 2 processes, the cost of the collective stop vote that training runs after
  every step (`runner.agreed_stop`), per step: t(step + vote) - t(step), and the
  time of one vote on its own (a loop of votes, no steps).

Each timing is a median over `--repeats` rounds of `--steps` steps; within a
round the variants alternate. It also prints, for the project's configs, the
parameter count and the bytes a ring all-reduce sends per device per step,
P * 4 B * 2 (N - 1) / N for N devices.

    .venv/bin/python benchmarks/scaling.py             # the figures in RESULTS.md
    .venv/bin/python benchmarks/scaling.py --quick --devices=2   # the tests' smoke run

Prints tables and writes benchmarks/out/scaling.json.
"""

import argparse
import functools
import importlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import dice_bce
from unet_jax import distributed
from unet_jax import losses
from unet_jax import train
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import sources
from unet_jax.models import factory
from unet_jax.train import runner as runner_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ('default', 'dice_bce', 'dice_ce', 'focal_dice', 'pets', 'unet3d')
# Image channels of each data set (what the first convolution takes).
CHANNELS = {
  'synthetic_shapes': 1,
  'synthetic_volumes': 1,
  'oxford_iiit_pet': 3,
  'segmentation_folder': 1,
}
FULL = dict(features=16, depth=3, size=64, per_device_batch=4, steps=10, repeats=7)
QUICK = dict(features=4, depth=2, size=32, per_device_batch=2, steps=2, repeats=1)


# ----------------------------------------------------------------- worker side


def _config(features, depth):
  config = dice_bce.get_config()
  config.model.features = features
  config.model.depth = depth
  return config


def _host_state(model, tx, size, seed=0):
  """A state with random parameters, without compiling the initialisers (their
  values do not matter for timing)."""
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False),
    {'params': jax.random.key(0)},
    jnp.zeros((1, size, size, 1)),
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1].key)
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  params = variables['params']
  return train.TrainState(
    step=np.zeros((), np.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=jax.device_get(jax.jit(tx.init)(params)),
  )


def _build(devices, args):
  """(model, tx, runner, local_step): the train step as training runs it on a mesh
  over `devices`, and the same step without collectives (shard_map)."""
  config = _config(args.features, args.depth)
  model = factory.create_model(config.model, kernels=config.kernels)
  tx = train.create_optimizer(config)
  step = functools.partial(
    train.train_step,
    model=model,
    tx=tx,
    loss_fn=functools.partial(
      losses.get_loss(config.loss.name), ignore_index=input_pipeline.IGNORE_LABEL
    ),
    learning_rate_fn=train.create_learning_rate_fn(config),
    aug_config=config.augment,
    seed=0,
  )
  mesh = runner_lib.create_mesh(devices)
  runner = runner_lib.Runner(
    'jit',
    train_step=step,
    mesh=mesh,
    predict_step=functools.partial(train.predict_step, model=model),
    logits_step=functools.partial(train.logits_step, model=model),
  )
  local_step = jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), P(runner_lib.AXIS)),
      out_specs=(P(), P()),
      check_vma=False,
    ),
    donate_argnums=(0,),
  )
  return model, tx, runner, local_step


def _measure(devices, args):
  """Times the step, the step without collectives and (several processes) the
  step followed by the stop vote, on a mesh over `devices`."""
  model, tx, runner, local_step = _build(devices, args)
  rows = args.per_device_batch * sum(
    d.process_index == jax.process_index() for d in devices
  )
  rng = np.random.default_rng(jax.process_index())
  batch = runner.put_batch(
    {
      'image': rng.standard_normal((rows, args.size, args.size, 1), np.float32),
      'label': (rng.random((rows, args.size, args.size)) > 0.9).astype(np.int32),
    }
  )
  host = _host_state(model, tx, args.size)
  vote = distributed.agreed_stop(lambda: False)
  states = {
    'step': runner.put_state(host),
    'local': runner.put_state(host),
    'step_and_vote': runner.put_state(host),
  }

  def run(kind, n):
    state = states.get(kind)
    start = time.perf_counter()
    if kind == 'vote':
      for _ in range(n + 1):
        vote()  # Each call waits for the vote of the call before.
      return (time.perf_counter() - start) / n
    for _ in range(n):
      if kind == 'local':
        state, _ = local_step(state, batch)
      else:
        state, _ = runner._train(state, batch)  # pylint: disable=protected-access
        if kind == 'step_and_vote':
          vote()
    jax.block_until_ready(state)
    states[kind] = state
    return (time.perf_counter() - start) / n

  kinds = ['step', 'local'] + (['step_and_vote', 'vote'] if jax.process_count() > 1 else [])
  for kind in kinds:
    run(kind, 1)  # Compiles.
  times = {k: [] for k in kinds}
  for r in range(args.repeats):
    for kind in kinds if r % 2 == 0 else kinds[::-1]:
      times[kind].append(run(kind, args.steps))
  return _summary(times, len(devices), args)


def _summary(times, n, args):
  """The row of one measurement: medians and every repeat, in ms."""
  med = {k: statistics.median(v) for k, v in times.items()}
  out = {
    'devices': n,
    'processes': jax.process_count(),
    'global_batch': args.per_device_batch * n,
    'step_ms': 1e3 * med['step'],
    'local_step_ms': 1e3 * med['local'],
    'steps_per_s': 1 / med['step'],
    'examples_per_s': args.per_device_batch * n / med['step'],
    'collective_share': max(0.0, 1 - med['local'] / med['step']),
    'step_ms_all': [1e3 * t for t in times['step']],
    'local_step_ms_all': [1e3 * t for t in times['local']],
  }
  if 'step_and_vote' in med:
    out['stop_vote_ms'] = 1e3 * (med['step_and_vote'] - med['step'])
    out['step_and_vote_ms_all'] = [1e3 * t for t in times['step_and_vote']]
    out['vote_alone_ms'] = 1e3 * med['vote']
  return out


def worker(args):
  if args.worker == 'multi':
    jax.distributed.initialize(f'127.0.0.1:{args.port}', 2, args.process_id)
    results = [_measure(jax.devices(), args)]
  else:
    results = [_measure(jax.devices()[: int(n)], args) for n in args.devices.split(',')]
  if jax.process_index() == 0:
    print('RESULT=' + json.dumps(results), flush=True)


# ----------------------------------------------------------------- driver side


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(args, mode, devices, *, process_id=0, port=0):
  cmd = [
    sys.executable,
    __file__,
    f'--worker={mode}',
    f'--process_id={process_id}',
    f'--port={port}',
    f'--devices={args.devices}',
  ] + [f'--{k}={getattr(args, k)}' for k in FULL]
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )
  # stderr to a file: a full pipe would stall a worker that the other one waits for.
  err = tempfile.TemporaryFile('w+')
  proc = subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=err,
    text=True,
    start_new_session=True,
  )
  proc.err = err
  return proc


def _collect(procs, timeout):
  results = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      if proc.returncode != 0:
        proc.err.seek(0)
        raise RuntimeError(
          f'A worker failed ({proc.returncode}):\n{proc.err.read()[-3000:]}'
        )
      results += [
        json.loads(line[len('RESULT=') :])
        for line in out.splitlines()
        if line.startswith('RESULT=')
      ]
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()
  return [row for rows in results for row in rows]


def volumes(device_counts=(8, 64, 256)):
  """Parameters of each config and the ring all-reduce bytes per device per step."""
  table = {}
  for name in CONFIGS:
    config = importlib.import_module(f'configs.{name}').get_config()
    if not config.model.num_classes:
      config.model.num_classes = 2
    ndim = sources.config_ndim(config.data)
    divisor = factory.input_divisor_of(config.model, ndim=ndim)
    shape = (1, *divisor, CHANNELS[config.data.name])
    model = factory.create_model(config.model, kernels=config.kernels)
    params = jax.eval_shape(
      functools.partial(model.init, train=False),
      {'params': jax.random.key(0)},
      jnp.zeros(shape),
    )['params']
    leaves = jax.tree.leaves(params)
    count = sum(int(np.prod(p.shape)) for p in leaves)
    nbytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in leaves)
    table[name] = {
      'params': count,
      'param_bytes': nbytes,
      'allreduce_bytes_per_device': {n: nbytes * 2 * (n - 1) / n for n in device_counts},
    }
  return table


def _print(rows, table):
  print(
    f'\n{"layout":22s} {"global batch":>12s} {"step ms":>8s} {"steps/s":>8s} '
    f'{"examples/s":>10s} {"no-comm ms":>10s} {"in collectives":>14s} '
    f'{"stop vote ms (alone)":>20s}'
  )
  for r in rows:
    layout = (
      f'{r["processes"]} processes x {r["devices"] // r["processes"]}'
      if r['processes'] > 1
      else f'1 process x {r["devices"]}'
    )
    vote = (
      f'{r["stop_vote_ms"]:5.1f} ({r["vote_alone_ms"]:.1f})' if 'stop_vote_ms' in r else '-'
    )
    print(
      f'{layout:22s} {r["global_batch"]:12d} {r["step_ms"]:8.1f} '
      f'{r["steps_per_s"]:8.2f} {r["examples_per_s"]:10.1f} '
      f'{r["local_step_ms"]:10.1f} {100 * r["collective_share"]:13.0f}% {vote:>20s}'
    )
  counts = list(next(iter(table.values()))['allreduce_bytes_per_device'])
  print(
    f'\n{"config":12s} {"params":>10s} {"MB":>8s} '
    + ' '.join(f'{"MB sent, N=" + str(n):>14s}' for n in counts)
  )
  for name, v in table.items():
    sent = v['allreduce_bytes_per_device']
    print(
      f'{name:12s} {v["params"]:10,d} {v["param_bytes"] / 1e6:8.3f} '
      + ' '.join(f'{sent[n] / 1e6:14.3f}' for n in counts)
    )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='Tiny smoke run.')
  for key, value in FULL.items():
    parser.add_argument(
      f'--{key}', type=int, default=None, help=f'Default {value} (--quick: {QUICK[key]}).'
    )
  parser.add_argument(
    '--devices',
    default='1,2,4',
    help='Device counts of the one-process layouts (at most 4).',
  )
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'out'))
  parser.add_argument('--timeout', type=int, default=1800, help='Seconds per worker.')
  parser.add_argument('--worker', choices=('single', 'multi'), help=argparse.SUPPRESS)
  parser.add_argument('--process_id', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--port', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for key in FULL:
    if getattr(args, key) is None:
      setattr(args, key, (QUICK if args.quick else FULL)[key])
  if args.worker:
    return worker(args)
  rows = _collect([_spawn(args, 'single', 4)], args.timeout)
  port = _free_port()
  rows += _collect(
    [_spawn(args, 'multi', 2, process_id=p, port=port) for p in (0, 1)], args.timeout
  )
  table = volumes()
  _print(rows, table)
  os.makedirs(args.out, exist_ok=True)
  settings = {k: getattr(args, k) for k in FULL}
  with open(os.path.join(args.out, 'scaling.json'), 'w') as f:
    json.dump(
      {
        'settings': settings,
        'cpu_count': os.cpu_count(),
        'layouts': rows,
        'volumes': table,
      },
      f,
      indent=2,
    )
  print(f'\nwrote {args.out}/scaling.json')
  return rows, table


if __name__ == '__main__':
  main()
