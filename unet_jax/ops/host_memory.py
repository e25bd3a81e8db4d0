"""glibc's allocator settings for XLA:CPU's step-sized temporary buffers.

XLA:CPU allocates an executable's temporary buffers (hundreds of megabytes for a
U-Net train step) with `malloc` on its own threads at every call, and frees them
after. glibc serves a request over 64 MB from a non-main thread's arena with a fresh
`mmap` and returns it with `munmap`, so every step faults in, and the kernel zeroes,
all of that memory again (tens of thousands of page faults a step). `TUNABLES` makes
glibc serve every thread from the main heap (`arena_max=1`), grow it with `brk`
instead of `mmap` (`mmap_max=0`) and keep what is freed (`trim_threshold`), so the
pages stay mapped from step to step. The process then holds its peak heap until it
exits, as a training run does anyway. What it saves, and what the same settings do
for PyTorch, is in benchmarks/RESULTS.md ("glibc's allocator and XLA's temporary
buffers").

glibc reads them from `GLIBC_TUNABLES` when the process starts; set later (with
`mallopt`) they race with the threads NumPy and JAX start at import. So `launch.py`,
run as a script, re-executes itself at once with them set (`reexec_if_wanted`: same
PID, same arguments) unless they are in force already. Code that uses the package
without `launch.py` starts Python with `environment()`'s variables.

`UNET_JAX_HOST_MALLOC` chooses:

- `auto` (the default): on Linux with glibc, where JAX will run on the CPU
  (`JAX_PLATFORMS` starting with `cpu`, or no GPU or TPU plugin installed);
- `keep`: on Linux with glibc, whatever the backend;
- `system`: never; glibc's defaults stay.
"""

from __future__ import annotations

from collections.abc import Mapping
import importlib.util
import os
import platform
import sys

ENV = 'UNET_JAX_HOST_MALLOC'
CHOICES = ('auto', 'keep', 'system')
SETTINGS = {
  'glibc.malloc.arena_max': '1',
  'glibc.malloc.mmap_max': '0',
  'glibc.malloc.trim_threshold': str(2**31 - 1),
}
TUNABLES = ':'.join(f'{k}={v}' for k, v in SETTINGS.items())
# Set by reexec_if_wanted in the new image, so that it never loops.
_REEXECUTED = 'UNET_JAX_HOST_MALLOC_REEXECUTED'
# JAX's accelerator plugins: where one is installed, 'auto' leaves the host alone.
_ACCELERATOR_MODULES = (
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
  'libtpu',
)


def choice(env: Mapping[str, str] | None = None) -> str:
  """`UNET_JAX_HOST_MALLOC` in `env` (default `os.environ`), checked."""
  env = os.environ if env is None else env
  value = env.get(ENV, 'auto').strip().lower() or 'auto'
  if value not in CHOICES:
    raise ValueError(f'{ENV}={env[ENV]!r}: give one of {", ".join(CHOICES)}.')
  return value


def _cpu_only(env: Mapping[str, str]) -> bool:
  platforms = env.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def wanted(env: Mapping[str, str] | None = None) -> bool:
  """Whether a process started with `env` should run under `TUNABLES`."""
  env = os.environ if env is None else env
  mode = choice(env)
  if mode == 'system':
    return False
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return False
  return mode == 'keep' or _cpu_only(env)


def _tunables(value: str) -> dict[str, str]:
  pairs = (item.partition('=') for item in value.split(':') if item)
  return {k: v for k, _, v in pairs}


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """`env` (default `os.environ`) with `TUNABLES` added to `GLIBC_TUNABLES`, where
  `wanted(env)`; settings already in `GLIBC_TUNABLES` keep their values."""
  env = dict(os.environ if env is None else env)
  if wanted(env):
    have = _tunables(env.get('GLIBC_TUNABLES', ''))
    env['GLIBC_TUNABLES'] = ':'.join(f'{k}={v}' for k, v in {**SETTINGS, **have}.items())
  return env


def in_force(env: Mapping[str, str] | None = None) -> bool:
  """Whether every setting of `TUNABLES` is in `GLIBC_TUNABLES` (any value)."""
  env = os.environ if env is None else env
  return set(SETTINGS) <= set(_tunables(env.get('GLIBC_TUNABLES', '')))


def reexec_if_wanted() -> None:
  """Replaces this process (`os.execve`: same PID, interpreter options and arguments)
  with one started under `TUNABLES`, where `wanted()` and they are not in force;
  else returns.

  Call it first thing in a script's `__main__` block; it does not return when it
  re-executes.

  Raises:
    ValueError: `UNET_JAX_HOST_MALLOC` is not one of `CHOICES`.
  """
  if not wanted() or in_force() or os.environ.get(_REEXECUTED):
    return
  if not sys.executable or not sys.orig_argv:  # An embedded interpreter: leave it.
    return
  env = environment()
  env[_REEXECUTED] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv keeps the interpreter's own options (-u, -X, -W) as well as the script's.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
