"""Tests for unet_jax.models.unet: shapes, parameter count, precision, anisotropy."""

import functools
import importlib
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unet_jax import models
from unet_jax.models import factory
from unet_jax.ops import policy


def _init(model, x, **kwargs):
  return model.init(
    {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, **kwargs
  )


def _apply_train(model, variables, x):
  mutable = ['batch_stats'] if 'batch_stats' in variables else False
  out = model.apply(
    variables, x, train=True, mutable=mutable, rngs={'dropout': jax.random.key(2)}
  )
  return out[0] if mutable else out


@pytest.mark.parametrize('upsample', models.UPSAMPLE_MODES)
@pytest.mark.parametrize('norm', models.NORMS)
@pytest.mark.parametrize('shape', [(2, 16, 16, 1), (2, 8, 16, 8, 2)], ids=['2d', '3d'])
def test_output_shape(upsample, norm, shape):
  model = models.UNet(num_classes=3, features=8, depth=2, upsample=upsample, norm=norm)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = _init(model, x)
  for logits in (model.apply(variables, x), _apply_train(model, variables, x)):
    assert logits.shape == shape[:-1] + (3,)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
  # Values: in inference mode every example is predicted on its own (no norm mixes
  # examples), and the prediction depends on the input.
  together = model.apply(variables, x)
  alone = jnp.concatenate([model.apply(variables, x[i : i + 1]) for i in range(2)])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(together[0] - together[1]).max()) > 1e-6


def test_conv_dimensionality_follows_input_rank():
  model = models.UNet(num_classes=2, features=4, depth=1, norm='none')
  p2 = _init(model, jnp.zeros((1, 8, 8, 1)))['params']
  p3 = _init(model, jnp.zeros((1, 8, 8, 8, 1)))['params']
  assert p2['encoder0']['conv0']['kernel'].shape == (3, 3, 1, 4)
  assert p3['encoder0']['conv0']['kernel'].shape == (3, 3, 3, 1, 4)
  assert p3['upsample0']['conv']['kernel'].shape == (2, 2, 2, 8, 4)


def _num_params(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return models.count_params(variables['params'])


def test_canonical_parameter_count():
  # The paper's network with 'same' padding: 1 input channel, 2 classes.
  model = models.UNet(
    num_classes=2, features=64, depth=4, norm='none', upsample='transpose'
  )
  assert _num_params(model, (1, 64, 64, 1)) == 31_030_658


def test_bilinear_parameter_count_by_hand():
  # Each 2x2 transposed conv (4*cin*cout weights) becomes a 1x1 conv (cin*cout):
  # 3 * (1024*512 + 512*256 + 256*128 + 128*64) = 2,088,960 fewer weights.
  model = models.UNet(num_classes=2, features=64, depth=4, norm='none', upsample='bilinear')
  assert _num_params(model, (1, 64, 64, 1)) == 31_030_658 - 2_088_960


@pytest.mark.parametrize('upsample', models.UPSAMPLE_MODES)
def test_decoder_widths_identical_across_upsampling(upsample):
  model = models.UNet(num_classes=2, features=8, depth=3, upsample=upsample, norm='none')
  x = jnp.zeros((1, 16, 16, 1))
  _, state = model.apply(
    _init(model, x), x, capture_intermediates=True, mutable=['intermediates']
  )
  widths = {
    name: state['intermediates'][name]['__call__'][0].shape[-1]
    for name in ('upsample2', 'upsample1', 'upsample0')
  }
  assert widths == {'upsample2': 32, 'upsample1': 16, 'upsample0': 8}


def test_bilinear_1x1_conv_before_resize_equals_after():
  up = models.Upsample(6, (2, 2), mode='bilinear', conv_kernel=1)
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 4))
  variables = up.init(jax.random.key(1), x)
  kernel = variables['params']['conv']['kernel'][0, 0]
  bias = variables['params']['conv']['bias']
  resized = jax.image.resize(x, (2, 10, 14, 4), method='linear')
  expected = resized @ kernel + bias
  np.testing.assert_allclose(up.apply(variables, x), expected, atol=1e-5)


@pytest.mark.parametrize('norm', ['batch', 'group'])
def test_jit_equals_eager(norm):
  model = models.UNet(num_classes=2, features=8, depth=2, norm=norm)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _init(model, x)
  eager = model.apply(variables, x)
  jitted = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_is_finite_and_close_to_float32():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  fp32 = models.UNet(num_classes=2, features=16, depth=3, norm='batch')
  bf16 = models.UNet(num_classes=2, features=16, depth=3, norm='batch', dtype=jnp.bfloat16)
  variables = _init(fp32, x)
  # Parameters stay float32 in the mixed-precision model.
  assert all(
    p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(_init(bf16, x)['params'])
  )
  ref = fp32.apply(variables, x)
  out = bf16.apply(variables, x)
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel


def test_anisotropic_3d():
  model = models.UNet(
    num_classes=2,
    features=4,
    depth=3,
    norm='instance',
    kernel_sizes=[(1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)],
    pool_sizes=[(1, 2, 2), (1, 2, 2), (2, 2, 2)],
  )
  assert models.input_divisor(ndim=3, depth=3, pool_sizes=model.pool_sizes) == (2, 8, 8)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16, 24, 1))  # D=6: not a multiple of 8.
  variables = _init(model, x)
  params = variables['params']
  assert params['encoder0']['conv0']['kernel'].shape[:3] == (1, 3, 3)
  assert params['encoder2']['conv0']['kernel'].shape[:3] == (3, 3, 3)
  assert params['decoder0']['conv1']['kernel'].shape[:3] == (1, 3, 3)
  assert params['upsample0']['conv']['kernel'].shape[:3] == (1, 2, 2)
  assert params['upsample2']['conv']['kernel'].shape[:3] == (2, 2, 2)
  assert model.apply(variables, x).shape == (1, 6, 16, 24, 2)


def test_single_anisotropic_kernel_applies_to_every_level():
  kernels, pools = models.level_shapes(
    ndim=3, depth=2, kernel_sizes=(1, 3, 3), pool_sizes=(1, 2, 2)
  )
  assert kernels == ((1, 3, 3),) * 3
  assert pools == ((1, 2, 2),) * 2


@pytest.mark.parametrize('size,nearest', [(100, '96 or 104'), (5, '8')])
def test_indivisible_size_names_size_and_nearest_valid_sizes(size, nearest):
  model = models.UNet(num_classes=2, features=4, depth=3)
  with pytest.raises(ValueError, match=rf'{size}.*axis H.*{nearest}'):
    _init(model, jnp.zeros((1, size, 64, 1)))


def test_indivisible_size_raises_under_jit_at_trace_time():
  model = models.UNet(num_classes=2, features=4, depth=2, norm='none')
  variables = _init(model, jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match=r'Spatial size 18 along axis W'):
    jax.jit(model.apply)(variables, jnp.zeros((1, 16, 18, 1)))


@pytest.mark.parametrize(
  'kwargs,match',
  [
    ({'upsample': 'nearest'}, 'upsample'),
    ({'norm': 'layer'}, 'norm'),
    ({'deep_supervision': 3}, 'deep_supervision'),
    ({'kernel_sizes': [(3, 3), (3, 3)]}, 'kernel_sizes'),
    ({'kernel_sizes': (3, 3, 3)}, 'kernel_sizes'),
    ({'pool_sizes': (2, 2, 2)}, 'pool_sizes'),
    ({'num_classes': 0}, 'num_classes'),
  ],
)
def test_bad_options_raise(kwargs, match):
  model = models.UNet(**{'num_classes': 2, 'features': 4, 'depth': 3, **kwargs})
  with pytest.raises(ValueError, match=match):
    _init(model, jnp.zeros((1, 16, 16, 1)))


def test_bad_rank_raises():
  with pytest.raises(ValueError, match='channels-last'):
    _init(models.UNet(num_classes=2, features=4, depth=1), jnp.zeros((16, 16, 1)))


def test_group_norm_width_must_divide():
  model = models.UNet(num_classes=2, features=4, depth=1, norm='group', norm_groups=8)
  with pytest.raises(ValueError, match='norm_groups=8'):
    _init(model, jnp.zeros((1, 8, 8, 1)))


def test_dropout_only_in_training():
  model = models.UNet(num_classes=2, features=4, depth=2, norm='none', dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))
  variables = _init(model, x)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, b)


def test_remat_gives_same_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (1, 4, 8, 8, 1))
  plain = models.UNet(num_classes=2, features=4, depth=2, norm='group', norm_groups=2)
  remat = models.UNet(
    num_classes=2, features=4, depth=2, norm='group', norm_groups=2, remat=True
  )
  params = _init(plain, x)['params']
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
    _init(remat, x)['params']
  )

  def loss(model, p):
    return jnp.mean(model.apply({'params': p}, x, train=True) ** 2)

  v1, g1 = jax.value_and_grad(functools.partial(loss, plain))(params)
  v2, g2 = jax.value_and_grad(functools.partial(loss, remat))(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g1))


def test_deep_supervision_heads():
  model = models.UNet(num_classes=3, features=4, depth=3, norm='none', deep_supervision=2)
  x = jnp.zeros((2, 32, 32, 1))
  logits, aux = model.apply(_init(model, x), x)
  assert logits.shape == (2, 32, 32, 3)
  assert [a.shape for a in aux] == [(2, 16, 16, 3), (2, 8, 8, 3)]


def test_batch_norm_averages_statistics_across_an_axis():
  # Two shards under a named axis give the statistics of the whole batch.
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) * 3 + 1
  whole = models.UNet(num_classes=2, features=4, depth=1)
  sharded = models.UNet(num_classes=2, features=4, depth=1, bn_axis_name='data')
  variables = _init(whole, x)

  def stats(model, xs):
    _, state = model.apply(variables, xs, train=True, mutable=['batch_stats'])
    return state['batch_stats']

  ref = stats(whole, x)
  per_shard = jax.vmap(functools.partial(stats, sharded), axis_name='data')(
    x.reshape(2, 2, 8, 8, 1)
  )
  local = jax.vmap(functools.partial(stats, whole))(x.reshape(2, 2, 8, 8, 1))
  for r, s, leaf in zip(
    jax.tree_util.tree_leaves(ref),
    jax.tree_util.tree_leaves(per_shard),
    jax.tree_util.tree_leaves(local),
  ):
    np.testing.assert_allclose(s[0], r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s[1], r, rtol=1e-4, atol=1e-5)
  # Without the axis name, the shards disagree: the test can fail.
  assert not all(np.allclose(x[0], x[1]) for x in jax.tree_util.tree_leaves(local))


def test_training_updates_batch_stats():
  model = models.UNet(num_classes=2, features=4, depth=1)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)) + 5
  variables = _init(model, x)
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  before = variables['batch_stats']['encoder0']['norm0']['mean']
  after = state['batch_stats']['encoder0']['norm0']['mean']
  assert not np.allclose(before, after)
  assert isinstance(model, nn.Module)


# The fields that chose CPU kernels before `config.kernels`, as older runs recorded
# them under `model`.
OLD_KERNEL_FIELDS = dict(
  transpose_as_matmul=True,
  conv3d_as_2d=None,
  pointwise_as_matmul=False,
  conv_weight_grad='native',
  native_conv_forward=None,
  native_winograd=True,
  pool_as_reshape=False,
  native_pool=None,
)


def test_a_model_record_with_the_old_kernel_fields_still_builds(caplog):
  config = importlib.import_module('configs.default').get_config()
  record = json.loads(config.to_json_best_effort())
  record['model'].update(OLD_KERNEL_FIELDS)
  del record['kernels']
  old = ml_collections.ConfigDict(record)
  assert set(OLD_KERNEL_FIELDS) == set(factory.OLD_KERNEL_FIELDS)
  with caplog.at_level(logging.INFO):
    model = factory.create_model(old.model, kernels=old.get('kernels', 'auto'))
  assert any('Ignoring the recorded config.model fields' in m for m in caplog.messages)
  assert model == factory.create_model(config.model, kernels=config.kernels)
  x = jnp.zeros((1, 16, 16, 1))
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.key(0), x))
  assert shapes(model) == shapes(factory.create_model(config.model, kernels='xla'))
  # Set on purpose in a new config, such a field is an error that points to kernels.
  config.model.unlock()
  config.model.native_pool = True
  with pytest.raises(ValueError, match=r"\['native_pool'\] are now config.kernels"):
    factory.check_options(config.model)
  with pytest.raises(ValueError, match='kernels='):
    factory.create_model(old.model, kernels='fast')


@pytest.mark.parametrize('kernels', ['auto', 'xla', 'native'])
def test_kernels_change_neither_the_parameters_nor_the_function(kernels):
  x = jax.random.normal(jax.random.key(3), (1, 8, 16, 16, 1))
  # Every lever off: nn.ConvTranspose, lax convolutions, nn.max_pool.
  plain = models.UNet(num_classes=2, features=4, depth=2, kernels=policy.KernelPolicy())
  other = models.UNet(num_classes=2, features=4, depth=2, kernels=kernels)
  variables = _init(plain, x)
  jax.tree.map(np.testing.assert_array_equal, _init(other, x), variables)
  np.testing.assert_allclose(
    other.apply(variables, x), plain.apply(variables, x), rtol=1e-4, atol=1e-4
  )
