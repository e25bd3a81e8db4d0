r"""Transposed convolution against bilinear upsampling: throughput and memory.

The two U-Nets differ only in their upsampling layers (`UNet(upsample=...)`): the
decoder widths are the same, so this compares the upsampling and nothing else. For
each case it measures, side by side in one process:

- train-step examples/s (forward, backward and an Adam update, jitted);
- forward (inference) examples/s;
- XLA's temporary buffer size for the train step (activation memory), from the
  compiled executable's memory analysis;
- parameter counts.

Timings are medians over `--repeats` rounds. Within each round the modes run one after
the other, so that drift in the machine's load hits both alike. The figure to read is
the ratio bilinear / transpose.

    .venv/bin/python benchmarks/upsampling.py                # --preset=cpu: RESULTS.md
    .venv/bin/python benchmarks/upsampling.py --preset=gpu   # an accelerator's scale
    .venv/bin/python benchmarks/upsampling.py --quick        # a smoke run (tests use it)

Presets: 'cpu' is the cases in RESULTS.md, sized to finish in under 5 minutes on 2
CPU cores. 'gpu' is a training scale for an accelerator: 2D tiles of 576 x 576 (the
paper's 572 x 572 tile, rounded up to the next multiple of 2^depth = 16, which
'same' padding needs) with the default 64-feature network, and 3D patches of 128^3.
Both networks use `UNet`'s default `kernels='auto'` (the CPU formulations and native
kernels of `unet_jax/ops/` on the CPU, plain XLA elsewhere).

Prints a table and writes benchmarks/out/upsampling.json and benchmarks/out/upsampling.png.
"""

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import losses
from unet_jax import models

MODES = ('transpose', 'bilinear')

# name: (input shape [N, *spatial, C], features, depth, classes)
PRESETS = {
  'cpu': {
    '2d_128x128_b8_f32': ((8, 128, 128, 1), 32, 4, 2),
    '3d_32x64x64_b1_f8': ((1, 32, 64, 64, 1), 8, 3, 2),
  },
  'gpu': {
    '2d_576x576_b4_f64': ((4, 576, 576, 1), 64, 4, 2),
    '3d_128x128x128_b1_f32': ((1, 128, 128, 128, 1), 32, 4, 2),
  },
}
CASES = PRESETS['cpu']
QUICK_CASES = {
  '2d_32x32_b2_f4': ((2, 32, 32, 1), 4, 2, 2),
}


def _build(mode, shape, features, depth, classes):
  model = models.UNet(
    num_classes=classes, features=features, depth=depth, upsample=mode, norm='batch'
  )
  x = jax.random.normal(jax.random.key(0), shape)
  y = (jax.random.uniform(jax.random.key(1), shape[:-1]) > 0.9).astype(jnp.int32)
  # XLA's optimiser spends ~20 s on the truncated-normal initialisers; the values
  # do not need it, so initialise without it.
  variables = (
    jax.jit(model.init)
    .lower(jax.random.key(2), x)
    .compile(compiler_options={'xla_backend_optimization_level': 0})(jax.random.key(2), x)
  )
  tx = optax.adam(1e-3)
  opt_state = tx.init(variables['params'])

  def loss_fn(params, batch_stats):
    logits, new = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
    )
    return losses.dice_ce_loss(logits, y), new['batch_stats']

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train_step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  # The train step donates its inputs; the forward pass keeps its own copy.
  args = jax.tree.map(jnp.copy, (variables['params'], variables['batch_stats'], opt_state))
  compiled = train_step.lower(*args).compile()
  memory = compiled.memory_analysis()
  temp_bytes = int(getattr(memory, 'temp_size_in_bytes', 0)) if memory else 0
  return {
    'train_step': train_step,
    'forward': forward,
    'state': args,
    'variables': variables,
    'x': x,
    'params': models.count_params(variables['params']),
    'train_temp_bytes': temp_bytes,
  }


def _time_train(built, steps):
  params, stats, opt = built['state']
  start = time.perf_counter()
  for _ in range(steps):
    params, stats, opt, loss = built['train_step'](params, stats, opt)
  loss.block_until_ready()
  built['state'] = (params, stats, opt)
  return time.perf_counter() - start


def _time_forward(built, steps):
  start = time.perf_counter()
  for _ in range(steps):
    out = built['forward'](built['variables'], built['x'])
  out.block_until_ready()
  return time.perf_counter() - start


def run(cases, *, steps, repeats):
  results = {}
  for name, (shape, features, depth, classes) in cases.items():
    print(f'[{name}] compiling both modes ...', flush=True)
    built = {m: _build(m, shape, features, depth, classes) for m in MODES}
    for m in MODES:  # Warm-up: first runs, caches.
      _time_train(built[m], 1)
      _time_forward(built[m], 1)
    train = {m: [] for m in MODES}
    fwd = {m: [] for m in MODES}
    for r in range(repeats):
      order = MODES if r % 2 == 0 else MODES[::-1]  # Alternate who goes first.
      for m in order:
        train[m].append(shape[0] * steps / _time_train(built[m], steps))
        fwd[m].append(shape[0] * steps / _time_forward(built[m], steps))
      print(
        f'[{name}] round {r + 1}/{repeats}: '
        + ', '.join(f'{m} train {train[m][-1]:.1f} ex/s' for m in MODES),
        flush=True,
      )
    row = {'input_shape': list(shape), 'features': features, 'depth': depth}
    for m in MODES:
      row[m] = {
        'params': built[m]['params'],
        'train_examples_per_s_median': statistics.median(train[m]),
        'train_examples_per_s_all': train[m],
        'forward_examples_per_s_median': statistics.median(fwd[m]),
        'forward_examples_per_s_all': fwd[m],
        'train_temp_bytes': built[m]['train_temp_bytes'],
      }
    t, b = row['transpose'], row['bilinear']
    row['ratio_bilinear_over_transpose'] = {
      'train_throughput': b['train_examples_per_s_median']
      / t['train_examples_per_s_median'],
      'forward_throughput': b['forward_examples_per_s_median']
      / t['forward_examples_per_s_median'],
      'train_temp_bytes': (
        b['train_temp_bytes'] / t['train_temp_bytes']
        if t['train_temp_bytes']
        else float('nan')
      ),
      'params': b['params'] / t['params'],
    }
    results[name] = row
  return results


def _print_table(results):
  print()
  print(
    f'{"case":24s} {"mode":10s} {"params":>10s} {"train ex/s":>11s} '
    f'{"fwd ex/s":>10s} {"train temp MiB":>15s}'
  )
  for name, row in results.items():
    for m in MODES:
      r = row[m]
      print(
        f'{name:24s} {m:10s} {r["params"]:10,d} '
        f'{r["train_examples_per_s_median"]:11.2f} '
        f'{r["forward_examples_per_s_median"]:10.2f} '
        f'{r["train_temp_bytes"] / 2**20:15.1f}'
      )
    ratio = row['ratio_bilinear_over_transpose']
    print(
      f'{name:24s} {"ratio b/t":10s} {ratio["params"]:10.3f} '
      f'{ratio["train_throughput"]:11.3f} {ratio["forward_throughput"]:10.3f} '
      f'{ratio["train_temp_bytes"]:15.3f}'
    )


def _plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(results)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  width = 0.38
  for ax, key, label in (
    (axes[0], 'train', 'train step'),
    (axes[1], 'forward', 'forward (inference)'),
  ):
    for i, m in enumerate(MODES):
      med = [results[n][m][f'{key}_examples_per_s_median'] for n in names]
      runs = [results[n][m][f'{key}_examples_per_s_all'] for n in names]
      xs = np.arange(len(names)) + (i - 0.5) * width
      ax.bar(xs, med, width, label=m)
      for x, r in zip(xs, runs):
        ax.plot([x] * len(r), r, 'k.', markersize=3)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel('examples/s (median; dots: each round)')
    ax.set_title(label)
    ax.legend()
  fig.suptitle(
    f'U-Net upsampling on {jax.devices()[0].platform.upper()} '
    f'({os.cpu_count()} cores): transposed conv vs bilinear + 1x1 conv'
  )
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='Tiny smoke run.')
  parser.add_argument(
    '--preset',
    choices=sorted(PRESETS),
    default='cpu',
    help="'cpu': the RESULTS.md cases; 'gpu': 576^2 and 128^3.",
  )
  parser.add_argument('--steps', type=int, default=None, help='Steps per round.')
  parser.add_argument('--repeats', type=int, default=None, help='Rounds.')
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'out'))
  args = parser.parse_args(argv)
  cases = QUICK_CASES if args.quick else PRESETS[args.preset]
  steps = args.steps or (2 if args.quick else 3)
  repeats = args.repeats or (3 if args.quick else 5)
  results = run(cases, steps=steps, repeats=repeats)
  _print_table(results)
  os.makedirs(args.out, exist_ok=True)
  meta = {
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'device_kind': jax.devices()[0].device_kind,
    'preset': 'quick' if args.quick else args.preset,
    'cpu_count': os.cpu_count(),
    'steps_per_round': steps,
    'repeats': repeats,
  }
  with open(os.path.join(args.out, 'upsampling.json'), 'w') as f:
    json.dump({'meta': meta, 'results': results}, f, indent=2)
  _plot(results, os.path.join(args.out, 'upsampling.png'))
  print(f'\nwrote {args.out}/upsampling.json and upsampling.png')
  return results


if __name__ == '__main__':
  main()
