"""The benchmark scripts run and write what RESULTS.md reads (no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(script, tmp_path, *args, timeout=300):
  """Runs `benchmarks/<script> --quick --out=tmp_path ...` on the CPU; fails on error."""
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', script),
      '--quick',
      f'--out={tmp_path}',
      *args,
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_upsampling_benchmark_smoke_run(tmp_path):
  run_quick('upsampling.py', tmp_path, '--repeats=2', '--steps=1')
  with open(tmp_path / 'upsampling.json') as f:
    results = json.load(f)['results']
  (row,) = results.values()
  for mode in ('transpose', 'bilinear'):
    assert len(row[mode]['train_examples_per_s_all']) == 2
    assert row[mode]['train_examples_per_s_median'] > 0
  # features 4, depth 2, 1 input channel, 2 classes, BatchNorm (convs without bias):
  # the 2x2 transposed convs (16*8 + 8*4 weights, 4 taps each, plus biases) become
  # 1x1 convs: 3 * (16*8 + 8*4) = 480 fewer parameters.
  assert row['transpose']['params'] - row['bilinear']['params'] == 480
  assert (tmp_path / 'upsampling.png').stat().st_size > 1000


def test_memory_check_smoke_run(tmp_path):
  proc = run_quick('memory_check.py', tmp_path)
  with open(tmp_path / 'memory_check.json') as f:
    rows = json.load(f)['rows']
  assert rows
  for row in rows:
    # The planner against XLA's own figures: the agreement the test suite asserts
    # (tests/memory_test.py), here on the benchmark's quick cases.
    assert 0.75 <= row['plan_total'] / row['xla_total'] <= 1.25, row
  assert '| case | mode |' in proc.stdout


def test_speed_benchmark_quick_run(tmp_path):
  run_quick('speed.py', tmp_path)
  with open(tmp_path / 'speed.json') as f:
    report = json.load(f)
  assert report['torch_available'] is False
  assert report['gemm']['gemm_gflops_float32'] > 0
  assert set(report['results']) == {'2d_quick', '3d_quick'}
  for res in report['results'].values():
    row = res['float32']
    assert 'torch' not in row
    assert len(row['jax']['ms_per_process']) == 1
    assert row['jax']['ms_per_step_median'] > 0
    # The train step is forward + two backward products: 2 to 4 times the forward.
    assert 2 < res['train_step_flops'] / res['forward_flops'] < 4
  # features 4, depth 2, 1 channel in, 2 classes, BatchNorm, transposed upsampling:
  # encoder 9*1*4 + 9*4*4, 9*4*8 + 9*8*8, bottleneck 9*8*16 + 9*16*16, upsampling
  # 4*16*8 + 8 and 4*8*4 + 4, decoder 9*16*8 + 9*8*8 and 9*8*4 + 9*4*4, head 4*2 + 2,
  # and 2 BatchNorm parameters per channel of each of the 10 convolutions.
  convs = (
    9 * (4 + 16 + 32 + 64 + 128 + 256 + 128 + 64 + 32 + 16)
    + 4 * 16 * 8
    + 8
    + 4 * 8 * 4
    + 4
    + 4 * 2
    + 2
  )
  norms = 2 * 2 * (4 + 8 + 16 + 8 + 4)
  assert report['results']['2d_quick']['float32']['jax']['params'] == convs + norms


def test_scaling_benchmark_smoke_run(tmp_path):
  """One process on 2 devices and 2 processes x 2 devices; the volume table."""
  run_quick('scaling.py', tmp_path, '--devices=2', '--timeout=500', timeout=600)
  with open(tmp_path / 'scaling.json') as f:
    results = json.load(f)
  rows = {(r['processes'], r['devices']): r for r in results['layouts']}
  assert set(rows) == {(1, 2), (2, 4)}
  for (_, devices), row in rows.items():
    assert row['global_batch'] == 2 * devices  # --quick: 2 examples per device.
    assert row['steps_per_s'] > 0 and row['local_step_ms'] > 0
    assert 0.0 <= row['collective_share'] < 1.0
  assert 'stop_vote_ms' in rows[(2, 4)] and 'stop_vote_ms' not in rows[(1, 2)]
  volumes = results['volumes']
  for v in volumes.values():
    assert v['param_bytes'] == 4 * v['params']  # float32 parameters.
    for n, sent in v['allreduce_bytes_per_device'].items():
      assert sent == pytest.approx(v['param_bytes'] * 2 * (int(n) - 1) / int(n))
  # dice_ce differs from dice_bce only in its output 1x1 conv: 4 classes instead of
  # 1 logit, on the top level's 16 features, with a bias: 3 * (16 + 1) more.
  assert volumes['dice_ce']['params'] - volumes['dice_bce']['params'] == 3 * 17
  assert volumes['pets']['params'] > volumes['default']['params']


def test_conv_kernels_benchmark_quick_run(tmp_path):
  # The script checks every native result against XLA's before timing it.
  proc = run_quick('conv_kernels.py', tmp_path)
  with open(tmp_path / 'conv_kernels.json') as f:
    rows = json.load(f)['rows']
  assert [row['ndim'] for row in rows] == [2, 3]
  for row in rows:
    for part in ('forward', 'input_grad', 'kernel_grad'):
      assert row[part]['xla'] > 0 and row[part]['native'] > 0
      assert row[part]['winograd'] > 0
  assert '| layer | N | size |' in proc.stdout
  assert '| quick 3d | 1 | 6×6×6 |' in proc.stdout


@pytest.mark.parametrize(
  'kernels, kind',
  [
    # 'auto' leaves the native kernels out on AVX2-only CPUs, so they are asked for.
    ('native', 'native kernel grad'),
    ('onednn', 'oneDNN conv kernel grad'),
  ],
)
def test_profile_step_finds_the_kernels_in_the_cpu_step(tmp_path, kernels, kind):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'profile_step.py'),
      '--case=3d_quick',
      f'--out={tmp_path}',
      '--top=4',
      f'--kwargs={{"kernels": "{kernels}"}}',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'profile_3d_quick.json') as f:
    profile = json.load(f)
  by_kind = profile['ms_by_kind']
  # The step uses the asked-for kernel gradient (the quick case's levels at least
  # conv.NATIVE_MIN_WIDTH wide for the native one); with the native kernels the
  # forward passes, with fewer than conv.NATIVE_MIN_TILED_CHANNELS channels, keep
  # XLA's convolutions.
  assert by_kind[kind] > 0, by_kind
  if kernels == 'native':
    assert by_kind['conv forward (XLA)'] > 0, by_kind
  # --top: the operations by time, each with its kind and HLO line, longest first.
  ops = profile['operations']
  assert [op['ms'] for op in ops] == sorted((op['ms'] for op in ops), reverse=True)
  assert any(op['kind'] == kind and 'custom-call' in op['hlo'] for op in ops), ops[:8]
  assert proc.stdout.count(' ms  ') >= len(by_kind) + 4


def test_native_ab_sources_quick_run(tmp_path):
  # The same source against itself: both builds load side by side under their own
  # target names, agree, and every shape gets a rate for each part.
  source = os.path.join(ROOT, 'unet_jax', 'ops', 'native', 'conv.cc')
  out = tmp_path / 'ab.json'
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'native_ab.py'),
      '--sources',
      source,
      source,
      '--quick',
      '--repeats=1',
      f'--out={out}',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert [row['name'] for row in rows] == ['quick 2d', 'quick 3d']
  for row in rows:
    for part in ('forward', 'kernel_grad'):
      assert row[part]['a'] > 0 and row[part]['b'] > 0


def test_native_ab_trees_quick_run(tmp_path):
  out = tmp_path / 'trees.json'
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'native_ab.py'),
      '--trees',
      ROOT,
      ROOT,
      '--cases=2d_quick',
      '--rounds=1',
      '--steps=1',
      '--warmup=0',
      f'--out={out}',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())['2d_quick']
  assert result['a_ms'] > 0 and result['b_ms'] > 0


def test_native_ab_names_a_missing_source(tmp_path):
  missing = tmp_path / 'nope.cc'
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'native_ab.py'),
      '--sources',
      str(missing),
      str(missing),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert str(missing) in proc.stderr


def test_every_speed_lever_names_valid_policies_and_settings():
  # speed.py --lever=NAME builds both arms in fresh processes; a misspelt policy field
  # or variable would only fail (or silently do nothing) there.
  import importlib.util  # pylint: disable=g-import-not-at-top

  from unet_jax.ops import host_memory  # pylint: disable=g-import-not-at-top
  from unet_jax.ops import policy  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
    'speed_benchmark', os.path.join(root, 'benchmarks', 'speed.py')
  )
  speed = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(speed)
  known_env = {
    'UNET_JAX_NATIVE_LANES',
    'UNET_JAX_ONEDNN_BLOCKED_WGRAD',
    'UNET_JAX_ONEDNN_ACT_BLOCK',
    'UNET_JAX_HOST_MALLOC',
  }
  for name, arms in speed.LEVERS.items():
    assert len(arms) == 2, name
    for arm in arms:
      assert set(arm) <= {'kwargs', 'xla_flags', 'env', 'donate', 'dtype'}, name
      kernels = arm.get('kwargs', {}).get('kernels')
      if isinstance(kernels, dict):
        assert isinstance(policy.auto().replace(**kernels), policy.KernelPolicy)
      elif kernels is not None:
        policy.check(kernels)
      assert set(arm.get('env', {})) <= known_env, name
      if 'UNET_JAX_HOST_MALLOC' in arm.get('env', {}):
        assert arm['env']['UNET_JAX_HOST_MALLOC'] in host_memory.CHOICES, name
  # The arms of a kernel lever differ: the A arm changes what 'auto' does.
  assert speed.LEVERS['narrow_as_matmul'][0]['kwargs']['kernels'] == {
    'narrow_as_matmul': False
  }
