"""Tests for unet_jax.models.memory: exact parameter counts, XLA agreement, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from unet_jax import models
from unet_jax.models import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANISO = dict(
  kernel_sizes=[(1, 3, 3), (3, 3, 3), (3, 3, 3)], pool_sizes=[(1, 2, 2), (2, 2, 2)]
)


@pytest.mark.parametrize(
  'config',
  [
    dict(spatial_shape=(32, 32), features=8, depth=2),
    dict(
      spatial_shape=(32, 32),
      in_channels=3,
      num_classes=1,
      features=4,
      depth=3,
      norm='none',
      upsample='bilinear',
    ),
    dict(
      spatial_shape=(32, 32),
      features=8,
      depth=2,
      norm='group',
      upsample='bilinear',
      upsample_conv_kernel=3,
    ),
    dict(
      spatial_shape=(8, 16, 16),
      in_channels=2,
      num_classes=4,
      features=4,
      depth=2,
      norm='instance',
      **ANISO,
    ),
  ],
  ids=['2d_batch', '2d_none_bilinear', '2d_group_bilinear3', '3d_aniso'],
)
def test_parameter_count_is_exact(config):
  est = memory.estimate(**config)
  model_kwargs = {
    k: v for k, v in config.items() if k not in ('spatial_shape', 'in_channels')
  }
  model_kwargs.setdefault('num_classes', 2)
  model = models.UNet(**model_kwargs)
  x = jnp.zeros((1, *config['spatial_shape'], config.get('in_channels', 1)))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert est.param_count == models.count_params(variables['params'])
  stats = models.count_params(variables.get('batch_stats', {}))
  assert est.param_bytes == 4 * (est.param_count + stats)


def test_one_64_channel_map_of_a_512_cube_is_32_gib():
  est = memory.estimate(spatial_shape=(512, 512, 512), features=64, depth=4)
  (top,) = [m for m in est.feature_maps if m.name == 'encoder0/conv0']
  assert top.shape == (1, 512, 512, 512, 64)
  assert top.bytes == 512**3 * 64 * 4 == 2**35  # 34.36 GB, not 8 GB
  # The largest map is the 128-channel concatenation at the top of the decoder.
  assert est.largest_feature_map.name == 'decoder0/concat'
  assert est.largest_feature_map.bytes == 2**36
  assert memory.format_bytes(2**35) == '34.36 GB (32.00 GiB)'
  # Inference peak: skip (64) + upsampled (64) + concatenation (128) channels.
  assert est.activation_bytes == 4 * 2**35


def test_cli_states_the_512_cube_in_gb_and_gib(capsys):
  memory.main(['--spatial=512,512,512', '--features=64', '--depth=4'])
  out = capsys.readouterr().out
  assert 'encoder0/conv0 [1, 512, 512, 512, 64] float32 = 34.36 GB (32.00 GiB)' in out
  assert 'decoder0/concat [1, 512, 512, 512, 128] float32 = 68.72 GB (64.00 GiB)' in out


def test_cli_budget_prints_the_largest_patch(capsys):
  memory.main(['--ndim=3', '--features=32', '--depth=4', '--training', '--budget=16GiB'])
  out = capsys.readouterr().out
  side = memory.largest_patch(2**34, ndim=3, features=32, depth=4, training=True)
  assert f'{side}x{side}x{side}' in out and '16.00 GiB' in out


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(ndim=3, features=32, depth=4, training=True),
    dict(ndim=2, features=64, depth=4, batch=8, training=True, remat=True),
    dict(ndim=3, features=16, depth=2, dtype='bfloat16', **ANISO),
  ],
)
def test_largest_patch_fits_and_the_next_does_not(kwargs):
  budget = memory.parse_bytes('4GiB')
  side = memory.largest_patch(budget, **kwargs)
  ndim = kwargs.pop('ndim')
  divisor = models.input_divisor(
    ndim=ndim, depth=kwargs['depth'], pool_sizes=kwargs.get('pool_sizes', 2)
  )
  assert all(side % d == 0 for d in divisor)
  step = max(divisor)
  assert memory.estimate(spatial_shape=(side,) * ndim, **kwargs).total_bytes <= budget
  assert memory.estimate(spatial_shape=(side + step,) * ndim, **kwargs).total_bytes > budget


def test_largest_patch_none_when_nothing_fits():
  assert memory.largest_patch(10**6, ndim=3, features=64, depth=4) is None


def test_memory_grows_with_batch_and_halves_with_bfloat16():
  base = dict(spatial_shape=(64, 64, 64), features=16, depth=3)
  one = memory.estimate(**base, batch=1)
  two = memory.estimate(**base, batch=2)
  half = memory.estimate(**base, batch=1, dtype='bfloat16')
  assert two.activation_bytes == 2 * one.activation_bytes
  assert half.activation_bytes == one.activation_bytes // 2
  assert two.param_bytes == one.param_bytes
  train = memory.estimate(**base, training=True)
  remat = memory.estimate(**base, training=True, remat=True)
  assert train.optimizer_bytes == 2 * train.gradient_bytes + 4
  assert remat.activation_bytes < 0.6 * train.activation_bytes


@pytest.mark.parametrize(
  'text,expected',
  [
    ('16GiB', 16 * 2**30),
    ('8GB', 8 * 10**9),
    ('1.5 MiB', 3 * 2**19),
    ('512', 512),
    ('2tib', 2 * 2**40),
    ('1e9', 10**9),
    (1024, 1024),
  ],
)
def test_parse_bytes(text, expected):
  assert memory.parse_bytes(text) == expected


@pytest.mark.parametrize('text', ['16 gibibytes', 'GiB', '-3GB', '', 'twelve'])
def test_parse_bytes_rejects_nonsense(text):
  with pytest.raises(ValueError, match='Cannot read'):
    memory.parse_bytes(text)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(spatial_shape=(100, 100)), 'not divisible by 16'),
    (dict(spatial_shape=(64,)), '2 \\(H, W\\) or 3'),
    (dict(spatial_shape=(64, 64), dtype='float16'), 'dtype'),
    (dict(spatial_shape=(64, 64), norm='layer'), 'norm'),
    (dict(spatial_shape=(64, 64), upsample='nearest'), 'upsample'),
    (dict(spatial_shape=(64, 64), features=0), 'features must be a positive'),
    (dict(spatial_shape=(64, 64), batch=1.5), 'batch must be a positive'),
    (dict(spatial_shape=(64, 64), remat=True), 'remat'),
    (dict(spatial_shape=(16, 64, 64), pool_sizes=[(1, 2, 2)] * 3), 'pool_sizes has 3'),
  ],
)
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    memory.estimate(**kwargs)


def _agree(est, xla, training):
  plan_temp = est.activation_bytes + (est.gradient_bytes if training else 0)
  return plan_temp / xla['temp'], est.total_bytes / xla['total']


# Small float32 cases, 2D and 3D, inference and training: the planner and XLA's own
# memory analysis of the compiled computation agree within 25%.
@pytest.mark.parametrize(
  'config',
  [
    dict(spatial_shape=(32, 32), batch=2, features=8, depth=2),
    dict(spatial_shape=(16, 32, 32), in_channels=2, features=4, depth=2, norm='none'),
    dict(
      spatial_shape=(8, 32, 32),
      features=4,
      depth=2,
      norm='instance',
      upsample='bilinear',
      **ANISO,
    ),
  ],
  ids=['2d_batch', '3d_none', '3d_aniso_instance_bilinear'],
)
@pytest.mark.parametrize('training', [False, True], ids=['inference', 'training'])
def test_planner_agrees_with_xla(config, training):
  est = memory.estimate(**config, training=training)
  xla = memory.compiled_memory(**config, training=training)
  temp_ratio, total_ratio = _agree(est, xla, training)
  assert 0.75 <= temp_ratio <= 1.25, (temp_ratio, est, xla)
  assert 0.75 <= total_ratio <= 1.25, (total_ratio, est, xla)


def test_remat_planner_agrees_with_xla_when_barriers_are_kept():
  """XLA:CPU merges the recomputation away unless the barrier pass is off."""
  config = dict(
    spatial_shape=(32, 32), batch=2, features=8, depth=2, training=True, remat=True
  )
  code = (
    'import json; from unet_jax.models import memory; '
    f'print(json.dumps(memory.compiled_memory(**{config!r})))'
  )
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_disable_hlo_passes=cse_barrier_expander',
  )
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  xla = json.loads(proc.stdout.strip().splitlines()[-1])
  est = memory.estimate(**config)
  temp_ratio, total_ratio = _agree(est, xla, True)
  assert 0.75 <= temp_ratio <= 1.25 and 0.75 <= total_ratio <= 1.25, (est, xla)
  # And remat does save memory: well below the plain train step.
  plain = memory.estimate(**dict(config, remat=False))
  assert xla['temp'] < 0.7 * (plain.activation_bytes + plain.gradient_bytes)
