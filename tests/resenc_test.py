"""The residual-encoder U-Net (`UNet(block='residual')`) and the ResEnc presets.

Parameter counts by hand, projections, strided anisotropic downsampling, deep
supervision, bf16, remat, BatchNorm folding, the memory planner against XLA, the
plan's blocks per stage, and a short run of configs/resenc_m.py on generated data.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import checkpointing
from unet_jax import inference
from unet_jax import models
from unet_jax import planning
from unet_jax import train
from unet_jax.data import folder as sf
from unet_jax.inference import folding
from unet_jax.models import memory
from unet_jax.train import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_2D = dict(
  num_classes=2, features=4, depth=2, block='residual', blocks_per_stage=(1, 2, 1)
)
SMALL_3D = dict(
  num_classes=3,
  features=4,
  depth=1,
  norm='none',
  block='residual',
  blocks_per_stage=2,
  kernel_sizes=[(1, 3, 3), (3, 3, 3)],
  pool_sizes=[(1, 2, 2)],
)


def _init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def test_parameter_count_2d_by_hand():
  # 1 channel in, widths 4, 8, 16, 3x3 kernels, BatchNorm (convs without bias: the
  # norm's scale and shift, 2 a channel, follow each).
  stem = 9 * 1 * 4 + 2 * 4  # conv 1 -> 4, norm
  enc0 = (9 * 4 * 4 + 8) * 2  # one block 4 -> 4: conv0, conv1; no projection
  enc1 = (
    (9 * 4 * 8 + 16)
    + (9 * 8 * 8 + 16)
    + (4 * 8 + 16)  # block0: stride 2, projection
    + 2 * (9 * 8 * 8 + 16)  # block1: identity shortcut
  )
  bottleneck = (9 * 8 * 16 + 32) + (9 * 16 * 16 + 32) + (8 * 16 + 32)
  dec1 = (2 * 2 * 16 * 8 + 8) + (9 * 16 * 8 + 16) + (9 * 8 * 8 + 16)  # up, conv, conv
  dec0 = (2 * 2 * 8 * 4 + 4) + (9 * 8 * 4 + 8) + (9 * 4 * 4 + 8)
  head = 4 * 2 + 2
  total = stem + enc0 + enc1 + bottleneck + dec1 + dec0 + head
  assert total == 9026
  variables = _init(models.UNet(**SMALL_2D), (1, 16, 16, 1))
  assert models.count_params(variables['params']) == total
  assert memory.estimate(spatial_shape=(16, 16), **SMALL_2D).param_count == total


def test_parameter_count_3d_by_hand():
  # 2 channels in, widths 4, 8, norm 'none' (every conv has a bias), kernels (1, 3, 3)
  # then (3, 3, 3), anisotropic stride (1, 2, 2), 2 blocks a stage, 3 classes.
  stem = 9 * 2 * 4 + 4
  enc0 = 2 * 2 * (9 * 4 * 4 + 4)  # 2 blocks of 2 convs, 4 -> 4
  bottleneck = (
    (27 * 4 * 8 + 8)
    + (27 * 8 * 8 + 8)
    + (4 * 8 + 8)  # block0: strided, projection
    + 2 * (27 * 8 * 8 + 8)
  )
  dec0 = (1 * 2 * 2 * 8 * 4 + 4) + (9 * 8 * 4 + 4) + (9 * 4 * 4 + 4)
  head = 4 * 3 + 3
  total = stem + enc0 + bottleneck + dec0 + head
  assert total == 7375
  variables = _init(models.UNet(**SMALL_3D), (1, 4, 16, 16, 2))
  assert models.count_params(variables['params']) == total
  est = memory.estimate(spatial_shape=(4, 16, 16), in_channels=2, **SMALL_3D)
  assert est.param_count == total


def _nnunet_resenc_params(cin, classes, widths, taps, stride_taps, blocks):
  """nnU-Net's ResidualEncoderUNet as its ResEnc planner builds it (conv_bias True,
  one decoder conv a stage, a 1x1 head on every decoder stage), counted from its
  building blocks: stem, BasicBlockD (projection: 1x1 conv without bias + norm),
  UNetDecoder (transposed conv with bias, conv, norm, head)."""
  n = taps * cin * widths[0] + widths[0] + 2 * widths[0]
  c = widths[0]
  for w, count in zip(widths, blocks):
    for i in range(count):
      ci = c if i == 0 else w
      n += 2 * (w + 2 * w) + taps * ci * w + taps * w * w
      n += ci * w + 2 * w if ci != w else 0
    c = w
  for w in reversed(widths[:-1]):
    n += stride_taps * c * w + w + taps * 2 * w * w + w + 2 * w + w * classes + classes
    c = w
  return n


def test_parameter_count_against_nnunet_as_the_docstring_says():
  plan = dict(features=32, depth=5, max_features=320, block='residual')
  blocks = (1, 3, 4, 6, 6, 6)
  widths = models.level_widths(features=32, depth=5, max_features=320)
  assert widths == (32, 64, 128, 256, 320, 320)
  ours = memory.estimate(
    spatial_shape=(64, 64, 64),
    num_classes=3,
    norm='instance',
    blocks_per_stage=blocks,
    **plan,
  ).param_count
  theirs = _nnunet_resenc_params(1, 3, widths, 27, 8, blocks)
  assert (ours, theirs) == (107_451_683, 102_350_575)  # unet.py's docstring
  biases = 32 + sum(w * 2 * c for w, c in zip(widths, blocks)) + sum(widths[:-1])
  second_conv = sum(27 * w * w + 2 * w for w in widths[:-1])
  heads = sum(w * 3 + 3 for w in widths[1:-1])
  assert (biases, second_conv, heads) == (13_056, 5_116_480, 2_316)
  assert ours == theirs - biases + second_conv - heads


def test_projection_only_where_width_or_stride_changes():
  params = _init(models.UNet(**SMALL_2D), (1, 16, 16, 1))['params']
  assert set(params['stem']) == {'conv0', 'norm0'}
  assert 'proj_conv' not in params['encoder0']['block0']  # 4 -> 4, stride 1
  assert _shapes(params['encoder1']['block0']['proj_conv']) == {'kernel': (1, 1, 4, 8)}
  assert 'proj_norm' in params['encoder1']['block0']
  assert 'proj_conv' not in params['encoder1']['block1']  # 8 -> 8, stride 1
  assert _shapes(params['bottleneck']['block0']['proj_conv']) == {'kernel': (1, 1, 8, 16)}
  # Capped widths: the stride changes, the width does not, so the shortcut is
  # average pooling alone, with no parameters.
  capped = dict(SMALL_2D, max_features=8)
  params = _init(models.UNet(**capped), (1, 16, 16, 1))['params']
  assert 'proj_conv' not in params['bottleneck']['block0']
  assert _shapes(params['bottleneck']['block0']['conv0'])['kernel'] == (3, 3, 8, 8)


def test_residual_block_by_hand():
  # Identity kernels: conv0 and conv1 are 1x1 copies, so with norm 'none' and zero
  # biases the block is relu(relu(x) + x) = 2x for x >= 0 and 0 for x < 0.
  block = models.ResidualBlock(2, (1, 1), (1, 1), norm='none')
  x = jnp.array([[[[1.0, -2.0], [3.0, 0.5]]]])  # (1, 1, 2, 2)
  variables = block.init(jax.random.key(0), x)
  eye = jnp.eye(2)[None, None]
  params = {
    'conv0': {'kernel': eye, 'bias': jnp.zeros(2)},
    'conv1': {'kernel': eye, 'bias': jnp.zeros(2)},
  }
  assert set(variables['params']) == set(params)
  y = block.apply({'params': params}, x)
  np.testing.assert_allclose(y, [[[[2.0, 0.0], [6.0, 1.0]]]])


@pytest.mark.parametrize('upsample', ['transpose', 'bilinear'])
def test_anisotropic_strides_give_each_level_its_shape(upsample):
  model = models.UNet(
    num_classes=2,
    features=4,
    depth=3,
    norm='instance',
    block='residual',
    blocks_per_stage=(1, 2, 1, 1),
    kernel_sizes=[(1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)],
    pool_sizes=[(1, 2, 2), (2, 2, 2), (2, 2, 2)],
    upsample=upsample,
    deep_supervision=2,
  )
  x = jnp.ones((1, 8, 32, 24, 1))
  variables = model.init(jax.random.key(0), x)
  (logits, aux), state = model.apply(
    variables, x, capture_intermediates=True, mutable=['intermediates']
  )
  inter = state['intermediates']
  levels = {
    'stem': (8, 32, 24, 4),
    'encoder0': (8, 32, 24, 4),
    'encoder1': (8, 16, 12, 8),  # stride (1, 2, 2)
    'encoder2': (4, 8, 6, 16),  # stride (2, 2, 2)
    'bottleneck': (2, 4, 3, 32),
  }
  for name, shape in levels.items():
    assert inter[name]['__call__'][0].shape == (1, *shape), name
  assert logits.shape == (1, 8, 32, 24, 2)
  # Deep supervision: heads at 1/2 and 1/4 of the resolution, highest first.
  assert [a.shape for a in aux] == [(1, 8, 16, 12, 2), (1, 4, 8, 6, 2)]


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (
      dict(blocks_per_stage=(1, 2)),
      r'blocks_per_stage=\(1, 2\) has 2 entries; depth=2 needs 3',
    ),
    (
      dict(blocks_per_stage=(1, 0, 1)),
      r'blocks_per_stage=\(1, 0, 1\): every count must be >= 1',
    ),
    (dict(blocks_per_stage=0), r'blocks_per_stage=0'),
    (dict(block='plain', blocks_per_stage=2), r"blocks_per_stage=2 needs block='residual'"),
    (dict(block='dense'), r"block='dense' is not one of \('plain', 'residual'\)"),
    (dict(max_features=0), r'max_features must be positive'),
  ],
)
def test_bad_block_fields_are_named(kwargs, match):
  model = models.UNet(**dict(SMALL_2D, **kwargs))
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match=match):
    memory.estimate(spatial_shape=(16, 16), **dict(SMALL_2D, **kwargs))


def test_plain_is_the_old_network():
  plain = _init(models.UNet(num_classes=2, features=4, depth=2), (1, 16, 16, 1))
  same = _init(
    models.UNet(num_classes=2, features=4, depth=2, block='plain', blocks_per_stage=1),
    (1, 16, 16, 1),
  )
  assert _shapes(plain) == _shapes(same)
  assert 'stem' not in plain['params']


def _trained_variables(model, x, steps=2):
  """Variables after a couple of train-mode passes, so BatchNorm statistics are not
  their initial zeros and ones."""
  variables = model.init(jax.random.key(1), x)
  for _ in range(steps):
    _, new = model.apply(variables, x, train=True, mutable=['batch_stats'])
    variables = {**variables, **new}
  return variables


@pytest.mark.parametrize('ndim', [2, 3])
def test_remat_equals_no_remat(ndim):
  kwargs = SMALL_2D if ndim == 2 else dict(SMALL_3D, norm='group', norm_groups=2)
  shape = (2, 16, 16, 1) if ndim == 2 else (1, 4, 16, 16, 2)
  x = jax.random.normal(jax.random.key(2), shape)
  plain = models.UNet(**kwargs)
  remat = models.UNet(**kwargs, remat=True)
  variables = plain.init(jax.random.key(0), x)

  def loss(model, params):
    rest = {k: v for k, v in variables.items() if k != 'params'}
    out = model.apply({'params': params, **rest}, x, train=True, mutable=['batch_stats'])
    return jnp.mean(out[0] ** 2)

  g0 = jax.grad(lambda p: loss(plain, p))(variables['params'])
  g1 = jax.grad(lambda p: loss(remat, p))(variables['params'])
  flat0, flat1 = jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)
  assert len(flat0) == len(flat1)
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(float(jnp.abs(a).max()) > 0 for a in flat0)


def test_bfloat16_residual_computes_in_bfloat16_with_float32_logits():
  model = models.UNet(**SMALL_2D, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  logits, state = model.apply(
    variables, x, capture_intermediates=True, mutable=['intermediates']
  )
  assert logits.dtype == jnp.float32
  block = state['intermediates']['encoder1']['block0']['__call__'][0]
  assert block.dtype == jnp.bfloat16
  full = models.UNet(**SMALL_2D).apply(variables, x)
  assert float(jnp.abs(logits - full).max()) < 0.1 * float(jnp.abs(full).max()) + 0.05


@pytest.mark.parametrize('ndim', [2, 3])
def test_folded_residual_network_equals_the_unfolded_one(ndim):
  kwargs = SMALL_2D if ndim == 2 else dict(SMALL_3D, norm='batch')
  shape = (2, 16, 16, 1) if ndim == 2 else (2, 4, 16, 16, 2)
  x = jax.random.normal(jax.random.key(4), shape)
  model = models.UNet(**kwargs, kernels='xla')
  variables = _trained_variables(model, x)
  want = model.apply(variables, x, train=False)
  folded_model, folded = folding.fold_batchnorm(model, variables)
  block = folded['params']['bottleneck']['block0']
  assert set(block) == {'conv0', 'conv1', 'proj_conv'}  # every norm folded
  assert set(block['proj_conv']) == {'kernel', 'bias'}
  got = folded_model.apply(folded, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # A missing statistic is named, with the block it belongs to.
  stats = jax.tree_util.tree_map(lambda a: a, variables['batch_stats'])
  del stats['bottleneck']['block0']['proj_norm']
  with pytest.raises(ValueError, match=r'bottleneck/block0.*proj_norm'):
    folding.fold_batchnorm(model, {'params': variables['params'], 'batch_stats': stats})


def test_predictor_output_equals_the_unfolded_residual_network():
  model = models.UNet(**SMALL_2D, kernels='xla')
  x = jax.random.normal(jax.random.key(5), (2, 16, 16, 1))
  variables = _trained_variables(model, x)
  predictor = inference.Predictor(
    model=model,
    variables=variables,
    config=None,
    data=None,
    step=0,
    num_channels=1,
    ndim=2,
    divisor=(4, 4),
    patch_size=None,
  )
  want = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(np.asarray(predictor.apply(x)), want, rtol=1e-4, atol=1e-4)


# Small float32 residual cases: the planner and XLA's memory analysis agree within
# the 25% of tests/memory_test.py.
@pytest.mark.parametrize(
  'config',
  [
    dict(
      spatial_shape=(32, 32),
      batch=2,
      features=8,
      depth=2,
      block='residual',
      blocks_per_stage=(1, 2, 2),
    ),
    dict(
      spatial_shape=(16, 32, 32),
      in_channels=2,
      features=4,
      depth=2,
      norm='instance',
      block='residual',
      blocks_per_stage=(1, 2, 2),
    ),
  ],
  ids=['2d_batch', '3d_instance'],
)
@pytest.mark.parametrize('training', [False, True], ids=['inference', 'training'])
def test_residual_planner_agrees_with_xla(config, training):
  est = memory.estimate(**config, training=training)
  xla = memory.compiled_memory(**config, training=training)
  plan_temp = est.activation_bytes + (est.gradient_bytes if training else 0)
  assert 0.75 <= plan_temp / xla['temp'] <= 1.25, (est, xla)
  assert 0.75 <= est.total_bytes / xla['total'] <= 1.25, (est, xla)


def test_residual_blocks_cost_more_memory_and_the_cli_says_so(capsys):
  base = dict(spatial_shape=(64, 64, 64), features=16, depth=3, training=True)
  plain = memory.estimate(**base)
  one = memory.estimate(**base, block='residual')
  more = memory.estimate(**base, block='residual', blocks_per_stage=(1, 2, 3, 3))
  assert plain.total_bytes < one.total_bytes < more.total_bytes
  memory.main(
    ['--spatial=64,64,64', '--features=16', '--depth=3', '--training']
    + ['--block=residual', '--blocks_per_stage=1,2,3,3']
  )
  out = capsys.readouterr().out
  assert 'residual encoder, blocks per stage (1, 2, 3, 3)' in out
  assert f'{more.param_count:,} parameters' in out


def _fp3():
  return planning.Fingerprint(
    key='resenc',
    ndim=3,
    num_channels=1,
    num_classes=2,
    num_cases=200,
    shape_median=(160.0, 160.0, 160.0),
    shape_min=(120, 120, 120),
    shape_max=(200, 200, 200),
    spacing_median=(1.0, 1.0, 1.0),
    anisotropy=1.0,
    value_min=(0.0,),
    value_max=(255.0,),
    value_type='uint8',
    foreground_p00_5=(20.0,),
    foreground_p99_5=(230.0,),
    foreground_mean=(120.0,),
    foreground_std=(30.0,),
    class_voxels=(9000, 1000),
    class_frequency=(0.9, 0.1),
    class_image_share=(1.0, 1.0),
    class_thickness=(0.0, 12.0),
    centroid_mean=((0.5,) * 3, (0.5,) * 3),
    centroid_sem=((0.0,) * 3, (0.05,) * 3),
    elongation_mean=(0.0, 0.0),
    elongation_sem=(0.0, 0.1),
  )


def _planned(budget, network):
  p = planning.plan(_fp3(), memory_budget=budget, features=32, network=network)
  return {c.field: c.value for c in p.choices}


def test_plan_sizes_a_residual_network_by_its_own_memory():
  resenc = dict(block='residual', blocks_per_stage=(1, 3, 4, 6, 6, 6), max_features=320)
  plain = dict(max_features=320)
  small, big = _planned('2GiB', resenc), _planned('24GiB', resenc)
  voxels = lambda c: math.prod(c['data.patch_size']) * c['batch_size']
  assert voxels(big) > voxels(small)
  # The plan's blocks per stage follow its depth (nnU-Net's ResEnc rule).
  for c in (small, big):
    assert c['model.blocks_per_stage'] == (1, 3, 4, 6, 6, 6)[: c['model.depth'] + 1]
  # At one budget the residual network, which needs more memory a voxel, gets no
  # more voxels a step than the plain one, and each plan's step fits the budget.
  assert voxels(_planned('2GiB', plain)) >= voxels(small)
  for c, network in ((small, resenc), (_planned('2GiB', plain), plain)):
    est = memory.estimate(
      spatial_shape=c['data.patch_size'],
      num_classes=2,
      features=32,
      depth=c['model.depth'],
      kernel_sizes=c['model.kernel_sizes'],
      pool_sizes=c['model.pool_sizes'],
      batch=c['batch_size'],
      training=True,
      block=network.get('block', 'plain'),
      blocks_per_stage=c.get('model.blocks_per_stage', 1),
      max_features=320,
    )
    assert est.total_bytes <= memory.parse_bytes('2GiB')
  assert 'model.blocks_per_stage' not in _planned('2GiB', plain)


def test_stage_blocks_for_cuts_or_extends():
  from unet_jax.planning import rules  # pylint: disable=g-import-not-at-top

  assert rules.stage_blocks_for((1, 3, 4, 6, 6, 6), 2) == (1, 3, 4)
  assert rules.stage_blocks_for((1, 3), 3) == (1, 3, 3, 3)
  assert rules.stage_blocks_for(2, 4) == 2
  assert rules.stage_blocks_for(None, 4) == 1


def test_old_records_without_block_fields_resume_as_plain():
  saved = {'model': {'features': 4, 'depth': 2}}
  current = {
    'model': {'features': 4, 'depth': 2, 'block': 'plain', 'blocks_per_stage': None}
  }
  assert config_checks.check_resume(saved, current, where='ckpt') == []
  residual = {'model': {'features': 4, 'depth': 2, 'block': 'residual'}}
  with pytest.raises(
    ValueError, match=r"model.block: 'plain' in the checkpoint, 'residual'"
  ):
    config_checks.check_resume(saved, residual, where='ckpt')


def _write_2d(root):
  """6 + 2 grey 8x8 images of a bright rectangle: the plan pools once (depth 1)."""
  rng = np.random.default_rng(0)
  for split, count in (('train', 6), ('val', 2)):
    for i in range(count):
      label = np.zeros((8, 8), np.uint8)
      label[2:5, 2:7] = 1
      image = (rng.normal(60, 10, (8, 8)) + 60 * label).clip(0, 255)
      sf.write_pair(root, split, f'case{i}', image.astype(np.uint8), label)
  return root


def test_resenc_m_trains_a_residual_network(tmp_path):
  config = importlib.import_module('configs.resenc_m').get_config()
  assert config.model.block == 'residual' and config.plan_memory_budget == '9GiB'
  overrides = {
    'data.root': str(_write_2d(tmp_path / 'data')),
    'data.data_dir': str(tmp_path / 'tfds'),
    'model.features': 4,
    'model.max_features': 8,
    'plan_memory_budget': '64MiB',
    'num_train_steps': 2,
    'log_every_steps': 1,
    'eval_every_steps': 2,
    'checkpoint_every_steps': 2,
  }
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    record = json.load(f)
  assert record['model']['block'] == 'residual'
  assert record['model']['depth'] == 1  # planned for 8x8 images
  assert tuple(record['model']['blocks_per_stage']) == (1, 3)  # the preset's, cut
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  state = manager.restore(manager.latest_step())
  manager.close()
  params = state['params']
  assert 'stem' in params and 'proj_conv' in params['bottleneck']['block0']
  assert sorted(params['bottleneck']) == ['block0', 'block1', 'block2']
  assert sorted(params['encoder0']) == ['block0']


def test_benchmark_smoke_run(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'resenc.py'),
      '--smoke',
      f'--out={tmp_path}',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  runs = results['smoke2d']
  assert set(runs) == {'plain/steps', 'residual/steps'}
  assert runs['plain/steps']['0']['block'] == 'plain'
  assert runs['residual/steps']['0']['block'] == 'residual'
  for arm in runs.values():
    assert arm['0']['steps'] == 2 and 0.0 <= arm['0']['dice'] <= 1.0
  table = (tmp_path / 'results.md').read_text()
  assert '| smoke2d | same steps | residual | 1 |' in table


@pytest.mark.parametrize('ndim', [2, 3])
def test_kernel_policies_compute_the_same_residual_network(ndim):
  # The CPU's formulations (folded 3D, pointwise products) take the stride-1
  # convolutions, the projections among them; the strided ones fall back to XLA's
  # (the native kernels' own tests are tests/conv_test.py's). Forward and parameter
  # gradients equal the plain XLA network's.
  from unet_jax.ops import policy  # pylint: disable=g-import-not-at-top

  cpu = policy.CPU.without_native()
  kwargs = SMALL_2D if ndim == 2 else dict(SMALL_3D, norm='instance')
  shape = (2, 16, 16, 1) if ndim == 2 else (1, 4, 16, 16, 2)
  x = jax.random.normal(jax.random.key(6), shape)
  fast, plain = models.UNet(**kwargs, kernels=cpu), models.UNet(**kwargs, kernels='xla')
  variables = plain.init(jax.random.key(0), x)

  def value_and_grad(model):
    def loss(params):
      out = model.apply({**variables, 'params': params}, x, train=True, mutable=True)[0]
      return jnp.mean(out**2)

    return jax.value_and_grad(loss)(variables['params'])

  (v0, g0), (v1, g1) = value_and_grad(plain), value_and_grad(fast)
  np.testing.assert_allclose(v1, v0, rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()) + 1e-7)


def test_the_planning_command_plans_a_residual_network(tmp_path, capsys):
  from unet_jax.planning import __main__ as planning_cli  # pylint: disable=g-import-not-at-top

  root = _write_2d(tmp_path / 'data')
  planning_cli.main(
    [f'--root={root}', f'--data_dir={tmp_path / "tfds"}', '--block=residual']
    + ['--features=4', '--max_features=8', '--memory_budget=64MiB']
  )
  out = capsys.readouterr().out
  line = next(x for x in out.splitlines() if x.startswith('model.blocks_per_stage'))
  assert '(1, 3)' in line and 'ResEnc' in line  # depth 1 for 8x8 images
