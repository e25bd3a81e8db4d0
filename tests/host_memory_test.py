"""glibc's allocator settings (unet_jax/ops/host_memory.py), in fresh processes.

The settings are read by glibc when a process starts, so every outcome is observed
in a subprocess started with (or re-executed into) them.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from unet_jax.ops import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'

# A program whose temporary buffer (80 MB, kept apart by a barrier) is larger than
# glibc's 64 MB per-thread heaps; prints the minor page faults per call over 10 calls
# after 25 (under the settings the heap takes a few calls to settle, growing to a
# layout it then reuses: benchmarks/RESULTS.md).
_FAULTS = """
import json, resource
import jax, jax.numpy as jnp
@jax.jit
def f(x):
  a = jax.lax.optimization_barrier(x * 2.0)
  return (a * a[::-1]).sum()
x = jnp.ones((20_000_000,), jnp.float32)
for _ in range(25):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10))
"""


def _run(args, env):
  proc = subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=240,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip().splitlines()


def _faults(env):
  return json.loads(_run(['-c', _FAULTS], env)[-1])


@pytest.mark.skipif(not GLIBC, reason='the settings are glibc-only; elsewhere a no-op')
def test_the_settings_keep_xla_temporary_buffers_mapped_between_calls():
  base = {
    k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', host_memory.ENV)
  }
  base['JAX_PLATFORMS'] = 'cpu'
  system = _faults({**base, host_memory.ENV: 'system'})
  kept_env = host_memory.environment(base)
  assert host_memory.in_force(kept_env)
  kept = _faults(kept_env)
  # 80 MB is 19,531 pages: glibc's defaults fault the buffer in again at every call.
  assert system > 19_000, system
  assert kept < system / 4, (kept, system)


@pytest.mark.skipif(not GLIBC, reason='the settings are glibc-only; elsewhere a no-op')
def test_reexec_replaces_the_process_once_with_the_settings(tmp_path):
  script = tmp_path / 'script.py'
  script.write_text(
    'import json, os, sys\n'
    f'sys.path.insert(0, {ROOT!r})\n'
    'print("started", os.getpid(), flush=True)\n'
    'from unet_jax.ops import host_memory\n'
    'host_memory.reexec_if_wanted()\n'
    'print(json.dumps([os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:],'
    ' sys.flags.dont_write_bytecode]))\n'
  )
  env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
  env.update(JAX_PLATFORMS='cpu', GLIBC_TUNABLES='glibc.malloc.arena_max=4')
  lines = _run(['-B', str(script), '--flag=1'], env)
  starts = [line for line in lines if line.startswith('started')]
  assert len(starts) == 2 and starts[0] == starts[1], lines  # Once, same PID.
  pid, tunables, argv, no_bytecode = json.loads(lines[-1])
  assert str(pid) == starts[0].split()[1]
  assert argv == ['--flag=1']
  assert no_bytecode == 1  # The interpreter's own option (-B) survives.
  # The user's own value is kept; the other two are added.
  assert host_memory._tunables(tunables) == {  # pylint: disable=protected-access
    'glibc.malloc.arena_max': '4',
    'glibc.malloc.mmap_max': '0',
    'glibc.malloc.trim_threshold': str(2**31 - 1),
  }
  # Under 'system' it returns without re-executing.
  lines = _run([str(script)], {**env, host_memory.ENV: 'system'})
  assert len([line for line in lines if line.startswith('started')]) == 1
  assert json.loads(lines[-1])[1] == 'glibc.malloc.arena_max=4'


def test_a_bad_setting_is_refused_naming_the_variable_and_value():
  with pytest.raises(ValueError, match="UNET_JAX_HOST_MALLOC='sometimes'.*auto, keep"):
    host_memory.wanted({host_memory.ENV: 'sometimes'})


def test_who_gets_the_settings():
  wanted = host_memory.wanted
  assert not wanted({host_memory.ENV: 'System ', 'JAX_PLATFORMS': 'cpu'})
  assert not wanted({'JAX_PLATFORMS': 'cuda'})  # 'auto' leaves accelerator hosts alone.
  assert wanted({'JAX_PLATFORMS': 'cuda', host_memory.ENV: 'keep'}) == GLIBC
  assert wanted({'JAX_PLATFORMS': 'cpu'}) == GLIBC
  assert host_memory.environment({host_memory.ENV: 'system'}) == {host_memory.ENV: 'system'}


def test_launch_refuses_a_bad_setting_before_any_work(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--config=configs/dice_bce.py',
      f'--workdir={tmp_path / "run"}',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', UNET_JAX_HOST_MALLOC='yes'),
    timeout=240,
    check=False,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Error: UNET_JAX_HOST_MALLOC='yes'" in proc.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.skipif(not GLIBC, reason='the settings are glibc-only; elsewhere a no-op')
def test_launch_reexecutes_before_it_imports_jax():
  # -X importtime (an interpreter option, kept by the re-execution) lists every module
  # each image imports: host_memory in both, JAX and NumPy only in the second.
  env = {
    k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', host_memory.ENV)
  }
  proc = subprocess.run(
    [sys.executable, '-X', 'importtime', os.path.join(ROOT, 'launch.py'), '--helpshort'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(env, JAX_PLATFORMS='cpu'),
    timeout=240,
    check=False,
  )
  imported = [line.rsplit('|', 1)[-1].strip() for line in proc.stderr.splitlines()]
  assert '--workdir' in proc.stdout + proc.stderr  # The help of the second image.
  assert imported.count('unet_jax.ops.host_memory') == 2, proc.stderr[-2000:]
  assert imported.count('jax') == 1 and imported.count('numpy') == 1
