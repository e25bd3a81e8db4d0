r"""The CPU's kernel policies side by side: XLA, the formulations, native and oneDNN.

A forward-and-gradient step of the default 2D (`configs/dice_bce.py`, 8 x 128² x 3)
and 3D (`configs/unet3d.py`, 2 x 32 x 64 x 64 x 1) networks, in train mode, under
`policy.XLA`, `policy.CPU.without_native()`, `policy.CPU` and `policy.ONEDNN` (with
oneDNN's chosen kernel layout, and as 'onednn_hwio' reading HWIO kernels as stored,
`onednn.BLOCKED_WEIGHTS=False`; as 'onednn_nhwc' with channels-last activations,
`onednn.ACT_BLOCK=0`, the decoder's kernel gradients reordered inside the call; as
'onednn_nhwc_wgrad' with those too on channels-last, `onednn.BLOCKED_WGRAD=False`;
and as 'onednn_xla_pool' with XLA's max pooling instead of the native kernel), in one
process, taking turns call by call; prints
the median of `--repeats` calls per policy and each one's speed over 'xla'. It
decides what `kernels='auto'` picks on a CPU (`policy.native_usable`,
`policy.auto`). oneDNN's policies run only where `onednn.available()` (the `onednn`
extra); `--policies` picks a subset.

    .venv/bin/python benchmarks/policy_ab.py --repeats=5
    .venv/bin/python benchmarks/policy_ab.py --policies=xla,onednn --cases=2d
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import dice_bce  # noqa: E402
from configs import unet3d  # noqa: E402
from unet_jax.models import factory  # noqa: E402
from unet_jax.ops import native  # noqa: E402
from unet_jax.ops import onednn  # noqa: E402
from unet_jax.ops import policy  # noqa: E402

CASES = {'2d': (dice_bce, (8, 128, 128, 3)), '3d': (unet3d, (2, 32, 64, 64, 1))}
POLICIES = {
  'xla': policy.XLA,
  'formulations': policy.CPU.without_native(),
  'native': policy.CPU,
  'onednn': policy.ONEDNN,
  'onednn_hwio': policy.ONEDNN,
  'onednn_nhwc': policy.ONEDNN,
  'onednn_nhwc_wgrad': policy.ONEDNN,
  'onednn_xla_pool': policy.ONEDNN.replace(native_pool=()),
}
# `unet_jax.ops.onednn` settings an arm changes while its step is traced.
SETTINGS = {
  'onednn_hwio': {'BLOCKED_WEIGHTS': False},
  'onednn_nhwc': {'ACT_BLOCK': 0},
  'onednn_nhwc_wgrad': {'ACT_BLOCK': 0, 'BLOCKED_WGRAD': False},
}


def _step(model_config, kernels, x, *, settings):
  before = {name: getattr(onednn, name) for name in settings}
  for name, value in settings.items():  # Read when the step is traced, below.
    setattr(onednn, name, value)
  model = factory.create_model(model_config, kernels=kernels)
  variables = model.init(jax.random.key(0), x[:1], train=False)

  def loss(params):
    y, _ = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    y = y[0] if isinstance(y, tuple) else y
    return jnp.mean(y**2)

  step = jax.jit(jax.value_and_grad(loss))
  jax.block_until_ready(step(variables['params']))  # Compiled before timing.
  for name, value in before.items():
    setattr(onednn, name, value)
  return lambda: jax.block_until_ready(step(variables['params']))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--policies', default=','.join(POLICIES))
  parser.add_argument('--cases', default=','.join(CASES))
  args = parser.parse_args()
  names = [n for n in args.policies.split(',') if n]
  unknown = sorted(set(names) - set(POLICIES)) + sorted(
    set(args.cases.split(',')) - set(CASES)
  )
  if unknown or 'xla' not in names:
    parser.error(f'--policies must include xla; unknown names: {unknown}')
  if not onednn.available():
    names = [n for n in names if not n.startswith('onednn')]
  print(f'AVX-512F: {native.cpu_has_avx512()}; policies: {names}', flush=True)
  for case in args.cases.split(','):
    module, shape = CASES[case]
    x = jnp.asarray(np.random.RandomState(0).randn(*shape), jnp.float32)
    steps = {
      k: _step(
        module.get_config().model,
        POLICIES[k],
        x,
        settings=SETTINGS.get(k, {}),
      )
      for k in names
    }
    times = {k: [] for k in steps}
    for _ in range(args.repeats):
      for k, step in steps.items():
        start = time.perf_counter()
        step()
        times[k].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(
      f'{case} {shape}: '
      + '  '.join(f'{k} {v:.3f} s' for k, v in med.items())
      + ' | speed over xla: '
      + ', '.join(f'{k} {med["xla"] / v:.2f}x' for k, v in med.items() if k != 'xla'),
      flush=True,
    )


if __name__ == '__main__':
  main()
