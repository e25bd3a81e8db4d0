r"""The U-Net train step in JAX against the same network in PyTorch, on this machine.

For each case it times the train step (forward, backward, Adam update) of
`unet_jax.models.UNet` and of `benchmarks/torch_reference.py`'s identical network:
BatchNorm, 'same' padding, cross-entropy, Adam(lr 1e-3), fp32, 2 threads; plus a
bfloat16 row per case (JAX `UNet(dtype=bfloat16)`, with fp32 parameters, loss and
BatchNorm statistics; PyTorch CPU autocast to bfloat16).

Method: every measurement is a fresh process (compile or first run, `--warmup` steps,
then `--steps` timed steps; the process reports its median). The two sides alternate
(JAX first in even rounds, PyTorch first in odd ones) for `--repeats` rounds, and the
table shows the median over rounds. The ratio is JAX speed / PyTorch speed in
images/s, i.e. PyTorch ms / JAX ms. GFLOP/s is the arithmetic of the plain XLA
formulation of the train step (XLA's cost analysis of the un-optimised program with
`UNet(kernels='xla')`, so that levers do not change the count) divided by
the step time; "share of GEMM" divides that by this machine's fp32 2048 x 2048 matrix
product rate in XLA, measured in the same run.

    # The table in RESULTS.md (about 30 minutes on 2 cores):
    .venv/bin/python benchmarks/speed.py --torch-python=/work/torch_venv/bin/python
    # One lever, A/B (JAX only, alternating fresh processes):
    .venv/bin/python benchmarks/speed.py --lever=native_winograd --cases=2d_transpose
    # Smoke run (tests use it): tiny shapes, JAX only, well under a minute.
    .venv/bin/python benchmarks/speed.py --quick
    # On a GPU: JAX on the device against PyTorch on CUDA with AMP bf16,
    # channels_last, cudnn.benchmark and torch.compile (accelerator.py runs this).
    .venv/bin/python benchmarks/speed.py --preset=gpu --platform=cuda \
        --torch-python=/work/torch_venv/bin/python --torch-device=cuda \
        --torch-options=channels_last,cudnn_benchmark,compile --dtypes=bfloat16

The PyTorch side needs torch in its own interpreter (`--torch-python`, see
torch_reference.py); without it the PyTorch columns say 'unavailable'. `--platform`
sets JAX_PLATFORMS for the JAX workers (default 'cpu'; '' lets JAX pick its
accelerator); `--torch-device` and `--torch-options` set the PyTorch side's device and
speed options, recorded per row. `--timeout` bounds each worker process, in
seconds. Prints a table and writes benchmarks/out/speed.json (or speed_<lever>.json).

Each JAX worker runs under glibc's allocator settings of
`unet_jax/ops/host_memory.py`, as `launch.py` does (`--lever=host_malloc` measures
them); `--torch-options=host_malloc_keep` gives the PyTorch workers the same
settings, which speed PyTorch up too (RESULTS.md, "glibc's allocator and XLA's
temporary buffers").
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
# This tree's unet_jax, not an installed one: the workers, and native_ab.py --trees,
# must measure the code beside this script.
sys.path.insert(0, str(ROOT))

from unet_jax.ops import host_memory  # noqa: E402  (no JAX: the driver stays light)

# name: network and input. 2 classes, 1 input channel, BatchNorm.
CASES = {
  '2d_transpose': dict(
    ndim=2, features=32, depth=4, batch=4, size=128, upsample='transpose'
  ),
  '2d_bilinear': dict(ndim=2, features=32, depth=4, batch=4, size=128, upsample='bilinear'),
  '3d_transpose': dict(
    ndim=3, features=16, depth=3, batch=1, size=64, upsample='transpose'
  ),
  '3d_trilinear': dict(ndim=3, features=16, depth=3, batch=1, size=64, upsample='bilinear'),
}
# An accelerator's training scale (--preset=gpu): nnU-Net-like 3D patches of 128^3 in
# batches of 2, and 2D tiles of 512^2 in batches of 12, with 32 features at the top.
GPU_CASES = {
  '2d_512_b12_f32': dict(
    ndim=2, features=32, depth=5, batch=12, size=512, upsample='transpose'
  ),
  '3d_128_b2_f32': dict(
    ndim=3, features=32, depth=4, batch=2, size=128, upsample='transpose'
  ),
}
QUICK_CASES = {
  '2d_quick': dict(ndim=2, features=4, depth=2, batch=2, size=32, upsample='transpose'),
  '3d_quick': dict(ndim=3, features=2, depth=2, batch=1, size=16, upsample='bilinear'),
}


# name: (arm A, arm B). An arm is JAX with UNet keyword overrides ('kwargs'), extra
# XLA_FLAGS ('xla_flags'), environment variables ('env') and/or no buffer donation
# ('donate': False). B vs A. The kernel levers are variants of the 'auto' policy
# (unet_jax/ops/policy.py): in 'kwargs', 'kernels' is a policy's name or a dict of
# fields changed from 'auto'.
def _auto_with(**changes):
  return {'kwargs': {'kernels': changes}}


LEVERS = {
  'transpose_as_matmul': (_auto_with(transpose_as_matmul=False), {}),
  'conv3d_as_2d': (_auto_with(conv3d_as_2d=False), {}),
  'pointwise_as_matmul': (_auto_with(pointwise_as_matmul=False), {}),
  # The native C++ kernel gradient (and Winograd's) alone, against XLA's.
  'native_weight_grad': (
    _auto_with(native_weight_grad=False, native_forward=False, native_winograd=False),
    _auto_with(native_forward=False),
  ),
  # The native forward pass and input gradient, on top of the native kernel grad.
  'native_forward': (_auto_with(native_forward=False), {}),
  'native_pool': (_auto_with(native_pool=False), {}),
  'native_winograd': (_auto_with(native_winograd=False), {}),
  'all_switches': ({'kwargs': {'kernels': 'xla'}}, {}),
  'xnnpack': ({}, {'xla_flags': '--xla_cpu_use_xnnpack=true'}),
  'onednn_custom_call': (
    {},
    {'xla_flags': '--xla_cpu_experimental_onednn_custom_call=true'},
  ),
  'onednn': ({}, {'xla_flags': '--xla_cpu_use_onednn=true'}),
  'ynn_off': ({}, {'xla_flags': '--xla_cpu_experimental_ynn_fusion_type='}),
  'ynn_conv': (
    {},
    {'xla_flags': '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'},
  ),
  'donation': ({'donate': False}, {}),
  'narrow_as_matmul': (_auto_with(narrow_as_matmul=False), {}),
  # The native kernels' vector width: 16 floats (AVX-512's tiles) against the CPU's
  # own choice (8 on an AVX2 CPU; the same build on an AVX-512 one).
  'native_lanes': ({'env': {'UNET_JAX_NATIVE_LANES': '16'}}, {}),
  # 'auto' (the native kernels) against oneDNN's convolutions.
  'native_vs_onednn': ({'kwargs': {'kernels': 'onednn'}}, {}),
  # oneDNN's 2D decoder kernel gradients on blocked activations (onednn.BLOCKED_WGRAD).
  'onednn_blocked_wgrad': (
    {'kwargs': {'kernels': 'onednn'}, 'env': {'UNET_JAX_ONEDNN_BLOCKED_WGRAD': '0'}},
    {'kwargs': {'kernels': 'onednn'}},
  ),
  # oneDNN's activations in channel blocks of 8 (onednn.ACT_BLOCK) against
  # channels-last.
  'onednn_act_block': (
    {'kwargs': {'kernels': 'onednn'}, 'env': {'UNET_JAX_ONEDNN_ACT_BLOCK': '0'}},
    {'kwargs': {'kernels': 'onednn'}},
  ),
  'bf16': ({}, {'dtype': 'bfloat16'}),
  # The 3D convolutions by oneDNN (native pooling kept) against the native kernels.
  'onednn_3d': ({}, _auto_with(onednn_conv=(3,))),
  # glibc's defaults against unet_jax/ops/host_memory.py's settings (the workers' own).
  'host_malloc': ({'env': {'UNET_JAX_HOST_MALLOC': 'system'}}, {}),
}


# ---------------------------------------------------------------------------------
# Workers: each runs in a fresh process and prints one JSON line.


def unet_kwargs(kwargs):
  """UNet keyword overrides from JSON: a 'kernels' dict becomes 'auto' with those
  fields changed (`KernelPolicy.replace`); a name is passed as it is."""
  from unet_jax.ops import policy  # pylint: disable=g-import-not-at-top

  kwargs = dict(kwargs or {})
  if isinstance(kwargs.get('kernels'), dict):
    kwargs['kernels'] = policy.auto().replace(**kwargs['kernels'])
  return kwargs


def build_step(case, *, dtype='float32', kwargs=None, donate=True):
  """The case's compiled train step and its state: `(compiled, state, variables)`.

  `compiled(*state)` returns `(*state, loss)`. Also used by profile_step.py.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from unet_jax import models  # pylint: disable=g-import-not-at-top

  shape = (case['batch'],) + (case['size'],) * case['ndim'] + (1,)
  model = models.UNet(
    num_classes=2,
    features=case['features'],
    depth=case['depth'],
    upsample=case['upsample'],
    norm='batch',
    dtype=jnp.dtype(dtype),
    **unet_kwargs(kwargs),
  )
  x = jax.random.normal(jax.random.key(0), shape)
  y = jax.random.randint(jax.random.key(1), shape[:-1], 0, 2)
  # XLA's optimiser spends ~20 s on the truncated-normal initialisers; the values
  # do not matter here, so initialise without it.
  variables = (
    jax.jit(model.init)
    .lower(jax.random.key(2), x)
    .compile(compiler_options={'xla_backend_optimization_level': 0})(jax.random.key(2), x)
  )
  tx = optax.adam(1e-3)

  def loss_fn(params, batch_stats):
    logits, new = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new['batch_stats']

  def train_step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1, 2) if donate else ())
  state = (
    variables['params'],
    variables['batch_stats'],
    jax.jit(tx.init)(variables['params']),
  )
  return step.lower(*state).compile(), state, variables


def _jax_worker(case, *, dtype, steps, warmup, kwargs, donate):
  import jax  # pylint: disable=g-import-not-at-top

  from unet_jax import models  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  compiled, state, variables = build_step(case, dtype=dtype, kwargs=kwargs, donate=donate)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    *state, loss = compiled(*state)
    loss.block_until_ready()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    *state, loss = compiled(*state)
    loss.block_until_ready()
    times.append((time.perf_counter() - start) * 1e3)
  # compile_s: the model's initialisation and the step's compilation.
  return {
    'ms_per_step': times,
    'compile_s': compile_s,
    'params': models.count_params(variables['params']),
    'loss': float(loss),
    'jax': jax.__version__,
    'backend': jax.default_backend(),
  }


def _flops_worker(case):
  """XLA's FLOP count of the plain-formulation fp32 train step."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from unet_jax import models  # pylint: disable=g-import-not-at-top

  shape = (case['batch'],) + (case['size'],) * case['ndim'] + (1,)
  model = models.UNet(
    num_classes=2,
    features=case['features'],
    depth=case['depth'],
    upsample=case['upsample'],
    norm='batch',
    kernels='xla',
  )
  x = jax.numpy.zeros(shape)
  y = jax.numpy.zeros(shape[:-1], jax.numpy.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  tx = optax.adam(1e-3)

  def train_step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, new = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = jax.eval_shape(tx.init, variables['params'])
  lowered = jax.jit(train_step).lower(
    variables['params'], variables['batch_stats'], opt_state
  )
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  fwd = jax.jit(lambda v: model.apply(v, x, train=False)).lower(variables)
  fwd_cost = fwd.cost_analysis()
  if isinstance(fwd_cost, (list, tuple)):
    fwd_cost = fwd_cost[0]
  return {
    'train_step_flops': float(cost['flops']),
    'forward_flops': float(fwd_cost['flops']),
  }


def _gemm_worker(n=2048, repeats=10):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  out = {}
  for dtype in ('float32', 'bfloat16'):
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n)).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    out[f'gemm_gflops_{dtype}'] = 2 * n**3 / statistics.median(times) / 1e9
  return out


# ---------------------------------------------------------------------------------
# The driver.


def _run(cmd, env=None, timeout=None):
  proc = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, **(env or {})),
    check=False,
    timeout=timeout,
  )
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _jax_env(xla_flags='', platform='cpu', env=None):
  """The JAX worker's variables; with glibc's allocator settings where `launch.py`
  would run under them (unet_jax/ops/host_memory.py; UNET_JAX_HOST_MALLOC=system:
  glibc's defaults)."""
  env = {'JAX_PLATFORMS': platform, **(env or {})}
  flags = ' '.join(f for f in (os.environ.get('XLA_FLAGS', ''), xla_flags) if f)
  if flags:
    env['XLA_FLAGS'] = flags
  tunables = host_memory.environment({**os.environ, **env}).get('GLIBC_TUNABLES')
  if tunables:
    env['GLIBC_TUNABLES'] = tunables
  return env


def run_jax(
  case,
  *,
  dtype='float32',
  steps,
  warmup,
  kwargs=None,
  donate=True,
  xla_flags='',
  platform='cpu',
  timeout=None,
  env=None,
):
  cmd = [
    sys.executable,
    __file__,
    '--worker=jax',
    f'--case={json.dumps(case)}',
    f'--dtype={dtype}',
    f'--steps={steps}',
    f'--warmup={warmup}',
    f'--kwargs={json.dumps(kwargs or {})}',
    f'--donate={int(donate)}',
  ]
  return _run(cmd, _jax_env(xla_flags, platform, env), timeout)


def run_torch(
  torch_python,
  case,
  *,
  dtype='float32',
  steps,
  warmup,
  device='cpu',
  options=(),
  timeout=None,
):
  """One PyTorch worker; `options` from TORCH_OPTIONS (e.g. 'compile')."""
  cmd = [
    torch_python,
    str(HERE / 'torch_reference.py'),
    f'--ndim={case["ndim"]}',
    f'--features={case["features"]}',
    f'--depth={case["depth"]}',
    f'--batch={case["batch"]}',
    f'--size={case["size"]}',
    f'--upsample={case["upsample"]}',
    f'--dtype={dtype}',
    f'--steps={steps}',
    f'--warmup={warmup}',
    '--threads=2',
    f'--device={device}',
    *(TORCH_OPTIONS[o] for o in options if o in TORCH_OPTIONS),
  ]
  env = {}
  for o in options:
    env.update(TORCH_ENV_OPTIONS.get(o, {}))
  return _run(cmd, env=env, timeout=timeout)


# --torch-options: torch_reference.py's flags,
TORCH_OPTIONS = {
  'channels_last': '--channels-last',
  'cudnn_benchmark': '--cudnn-benchmark',
  'compile': '--compile',
}
# and its environment: 'host_malloc_keep' gives PyTorch glibc's settings of
# unet_jax/ops/host_memory.py (which the JAX workers, like launch.py, apply).
TORCH_ENV_OPTIONS = {
  'host_malloc_keep': {'GLIBC_TUNABLES': host_memory.TUNABLES},
}


def torch_available(torch_python):
  if not torch_python or not os.path.exists(torch_python):
    return False
  proc = subprocess.run(
    [torch_python, '-c', 'import torch'], capture_output=True, check=False
  )
  return proc.returncode == 0


def _uptime():
  try:
    return subprocess.run(
      ['uptime'], capture_output=True, text=True, check=False
    ).stdout.strip()
  except OSError:
    return 'unknown'


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the two sides run: JAX_PLATFORMS, the PyTorch device and its options."""

  platform: str = 'cpu'  # JAX_PLATFORMS of the JAX workers; '': JAX's default.
  torch_device: str = 'cpu'  # 'cuda': PyTorch on the GPU.
  torch_options: tuple[str, ...] = ()  # Names in TORCH_OPTIONS.
  timeout: float | None = None  # Seconds per worker process.


def _gemm_and_flops(cases, *, torch_python, have_torch, gemm_n, target):
  """One JAX process measures the GEMM rate and counts every case's FLOPs."""
  info = _run(
    [
      sys.executable,
      __file__,
      '--worker=info',
      f'--gemm-n={gemm_n}',
      f'--case={json.dumps(list(cases.values()))}',
    ],
    _jax_env(platform=target.platform),
    target.timeout,
  )
  gemm = info['gemm']
  if have_torch:
    gemm['torch_gemm_gflops_float32'] = _run(
      [
        torch_python,
        str(HERE / 'torch_reference.py'),
        '--gemm',
        f'--device={target.torch_device}',
      ],
      timeout=target.timeout,
    )['gemm_gflops']
  print(f'GEMM {gemm_n}^2 GFLOP/s: {json.dumps(gemm)}', flush=True)
  gemm['n'] = gemm_n
  return gemm, info['flops']


def _row(name, runs, *, flops, gemm):
  """The table row of one case and dtype from its processes' results."""
  row = {}
  for side, outs in runs.items():
    per_process = [statistics.median(o['ms_per_step']) for o in outs]
    ms = statistics.median(per_process)
    row[side] = {
      'ms_per_step_median': ms,
      'ms_per_process': per_process,
      'params': outs[0]['params'],
      'gflops': flops['train_step_flops'] / ms / 1e6,
    }
  row['jax']['share_of_gemm'] = row['jax']['gflops'] / gemm['gemm_gflops_float32']
  row['jax']['backend'] = runs['jax'][0].get('backend')
  if 'torch' in runs:
    torch_run = runs['torch'][0]
    row['torch']['device'] = torch_run.get('device', 'cpu')
    row['torch']['options'] = torch_run.get('options', {})
    row['torch']['share_of_gemm'] = (
      row['torch']['gflops'] / gemm['torch_gemm_gflops_float32']
    )
    row['ratio_jax_speed_over_torch'] = (
      row['torch']['ms_per_step_median'] / row['jax']['ms_per_step_median']
    )
    if row['jax']['params'] != row['torch']['params']:
      raise RuntimeError(
        f'{name}: parameter counts differ: JAX '
        f'{row["jax"]["params"]} vs PyTorch '
        f'{row["torch"]["params"]}'
      )
  return row


def compare(
  cases, *, torch_python, dtypes, steps, warmup, repeats, gemm_n=2048, target=Target()
):
  """The JAX-vs-PyTorch table: {case: {dtype: row}}."""
  have_torch = torch_available(torch_python)
  gemm, all_flops = _gemm_and_flops(
    cases, torch_python=torch_python, have_torch=have_torch, gemm_n=gemm_n, target=target
  )
  results = {}
  for (name, case), flops in zip(cases.items(), all_flops):
    results[name] = {'case': case, **flops}
    for dtype in dtypes:
      sides = ['jax', 'torch'] if have_torch else ['jax']
      runs = {side: [] for side in sides}
      for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
          if side == 'jax':
            out = run_jax(
              case,
              dtype=dtype,
              steps=steps,
              warmup=warmup,
              platform=target.platform,
              timeout=target.timeout,
            )
          else:
            out = run_torch(
              torch_python,
              case,
              dtype=dtype,
              steps=steps,
              warmup=warmup,
              device=target.torch_device,
              options=target.torch_options,
              timeout=target.timeout,
            )
          runs[side].append(out)
          print(
            f'[{name} {dtype}] round {r + 1}/{repeats} {side}: '
            f'{statistics.median(out["ms_per_step"]):.0f} ms/step',
            flush=True,
          )
      results[name][dtype] = _row(name, runs, flops=flops, gemm=gemm)
  backend = {'jax_platform': target.platform, 'torch_device': target.torch_device}
  return {
    'gemm': gemm,
    'torch_available': have_torch,
    'target': dict(backend, torch_options=list(target.torch_options)),
    'results': results,
  }


def lever(name, cases, *, steps, warmup, repeats):
  """A/B of one lever on the JAX side: {case: {'A': ms, 'B': ms, 'speedup': A/B}}."""
  arms = LEVERS[name]
  out = {}
  for cname, case in cases.items():
    runs = ([], [])
    for r in range(repeats):
      for i in (0, 1) if r % 2 == 0 else (1, 0):
        arm = arms[i]
        res = run_jax(
          case,
          dtype=arm.get('dtype', 'float32'),
          steps=steps,
          warmup=warmup,
          kwargs=arm.get('kwargs'),
          donate=arm.get('donate', True),
          xla_flags=arm.get('xla_flags', ''),
          env=arm.get('env'),
        )
        runs[i].append(statistics.median(res['ms_per_step']))
        print(
          f'[{name} {cname}] round {r + 1}/{repeats} arm {"AB"[i]}: '
          f'{runs[i][-1]:.0f} ms/step',
          flush=True,
        )
    a, b = statistics.median(runs[0]), statistics.median(runs[1])
    out[cname] = {
      'A': arms[0],
      'B': arms[1],
      'A_ms': a,
      'B_ms': b,
      'A_runs': runs[0],
      'B_runs': runs[1],
      'speedup_B_over_A': a / b,
    }
  return out


def _print_table(report):
  print()
  print(
    f'{"case":14s} {"dtype":9s} {"JAX ms":>8s} {"torch ms":>9s} {"ratio":>6s} '
    f'{"JAX GF/s":>9s} {"JAX %GEMM":>9s} {"torch GF/s":>10s} {"torch %GEMM":>11s}'
  )
  for name, res in report['results'].items():
    for dtype in ('float32', 'bfloat16'):
      if dtype not in res:
        continue
      row = res[dtype]
      j = row['jax']
      t = row.get('torch')
      tcols = (
        f'{t["ms_per_step_median"]:9.0f} {row["ratio_jax_speed_over_torch"]:5.2f}x'
        if t
        else f'{"unavail.":>9s} {"-":>6s}'
      )
      tflops = (
        f'{t["gflops"]:10.0f} {100 * t["share_of_gemm"]:10.0f}%'
        if t
        else f'{"-":>10s} {"-":>11s}'
      )
      print(
        f'{name:14s} {dtype:9s} {j["ms_per_step_median"]:8.0f} {tcols} '
        f'{j["gflops"]:9.0f} {100 * j["share_of_gemm"]:8.0f}% {tflops}'
      )


def markdown_table(report):
  """The table of RESULTS.md, as markdown."""
  lines = [
    '| case | dtype | JAX ms/step | PyTorch ms/step | JAX speed / PyTorch |'
    ' JAX GFLOP/s | JAX % of GEMM | PyTorch GFLOP/s | PyTorch % of GEMM |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for name, res in report['results'].items():
    for dtype in ('float32', 'bfloat16'):
      if dtype not in res:
        continue
      row = res[dtype]
      j, t = row['jax'], row.get('torch')
      ratio = f'**{row["ratio_jax_speed_over_torch"]:.2f}×**' if t else '-'
      lines.append(
        f'| {name} | {dtype} | {j["ms_per_step_median"]:.0f} | '
        + (f'{t["ms_per_step_median"]:.0f}' if t else 'unavailable')
        + f' | {ratio} | {j["gflops"]:.0f} | {100 * j["share_of_gemm"]:.0f}% | '
        + (f'{t["gflops"]:.0f} | {100 * t["share_of_gemm"]:.0f}% |' if t else '- | - |')
      )
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--quick', action='store_true', help='Tiny shapes, JAX only, a smoke run.'
  )
  parser.add_argument(
    '--torch-python',
    default=None,
    help='Interpreter with torch installed (else unavailable).',
  )
  parser.add_argument(
    '--preset',
    choices=('cpu', 'gpu'),
    default='cpu',
    help="'cpu': the RESULTS.md cases; 'gpu': 512^2 and 128^3 at batch 12 and 2.",
  )
  parser.add_argument(
    '--cases', default=None, help='Comma-separated case names (default: all).'
  )
  parser.add_argument(
    '--platform', default='cpu', help="JAX_PLATFORMS of the JAX side; '': JAX's default."
  )
  parser.add_argument('--torch-device', choices=('cpu', 'cuda'), default='cpu')
  parser.add_argument(
    '--torch-options',
    default='',
    help=f'Comma-separated, of {sorted({*TORCH_OPTIONS, *TORCH_ENV_OPTIONS})}.',
  )
  parser.add_argument(
    '--timeout', type=float, default=None, help='Seconds per worker process.'
  )
  parser.add_argument(
    '--dtypes',
    default=None,
    help='Comma-separated; default float32,bfloat16 (quick: float32).',
  )
  parser.add_argument(
    '--lever',
    default=None,
    choices=sorted(LEVERS),
    help='A/B one lever on the JAX side instead.',
  )
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--warmup', type=int, default=None)
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--out', default=str(HERE / 'out'))
  # Worker mode (internal).
  parser.add_argument('--worker', choices=('jax', 'info'), default=None)
  parser.add_argument('--case', default=None)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--kwargs', default='{}')
  parser.add_argument('--donate', type=int, default=1)
  parser.add_argument('--gemm-n', type=int, default=2048)
  args = parser.parse_args(argv)

  if args.worker == 'jax':
    print(
      json.dumps(
        _jax_worker(
          json.loads(args.case),
          dtype=args.dtype,
          steps=args.steps or 5,
          warmup=args.warmup if args.warmup is not None else 2,
          kwargs=json.loads(args.kwargs),
          donate=bool(args.donate),
        )
      )
    )
    return None
  if args.worker == 'info':
    print(
      json.dumps(
        {
          'gemm': _gemm_worker(args.gemm_n),
          'flops': [_flops_worker(c) for c in json.loads(args.case)],
        }
      )
    )
    return None

  all_cases = QUICK_CASES if args.quick else {'cpu': CASES, 'gpu': GPU_CASES}[args.preset]
  torch_options = tuple(o for o in args.torch_options.split(',') if o)
  known = sorted({*TORCH_OPTIONS, *TORCH_ENV_OPTIONS})
  unknown = sorted(set(torch_options) - set(known))
  if unknown:
    parser.error(f'unknown --torch-options {unknown}; choose from {known}')
  names = args.cases.split(',') if args.cases else list(all_cases)
  unknown = [n for n in names if n not in all_cases]
  if unknown:
    parser.error(f'unknown case(s) {unknown}; choose from {sorted(all_cases)}')
  cases = {n: all_cases[n] for n in names}
  steps = args.steps or (2 if args.quick else 5)
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
  repeats = args.repeats or (1 if args.quick else 3)
  meta = {
    'date': datetime.date.today().isoformat(),
    'uptime_before': _uptime(),
    'cpu_count': os.cpu_count(),
    'steps': steps,
    'warmup': warmup,
    'repeats': repeats,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  os.makedirs(args.out, exist_ok=True)
  if args.lever:
    report = {
      'lever': args.lever,
      'results': lever(args.lever, cases, steps=steps, warmup=warmup, repeats=repeats),
    }
    for cname, r in report['results'].items():
      print(
        f'{args.lever} {cname}: A {r["A_ms"]:.0f} ms, B {r["B_ms"]:.0f} ms, '
        f'B speed / A speed {r["speedup_B_over_A"]:.2f}x'
      )
    path = os.path.join(args.out, f'speed_{args.lever}.json')
  else:
    report = compare(
      cases,
      torch_python=None if args.quick else args.torch_python,
      dtypes=(args.dtypes or ('float32' if args.quick else 'float32,bfloat16')).split(','),
      gemm_n=512 if args.quick else 2048,
      steps=steps,
      warmup=warmup,
      repeats=repeats,
      target=Target(
        platform=args.platform,
        torch_device=args.torch_device,
        torch_options=torch_options,
        timeout=args.timeout,
      ),
    )
    _print_table(report)
    print()
    print(markdown_table(report))
    path = os.path.join(args.out, 'speed.json')
  meta['uptime_after'] = _uptime()
  print(f'load: before [{meta["uptime_before"]}] after [{meta["uptime_after"]}]')
  with open(path, 'w') as f:
    json.dump({'meta': meta, **report}, f, indent=2)
  print(f'wrote {path}')
  return report


if __name__ == '__main__':
  main()
