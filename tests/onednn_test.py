"""oneDNN's convolutions (unet_jax/ops/onednn.py) compute XLA's, and the project runs
on XLA's own where oneDNN is missing.

The test extra installs the `onednn` wheels on x86-64 Linux, so the comparisons run
against the real library there; the fallback tests hide it (`UNET_JAX_ONEDNN=0`, a
missing compiler, a missing wheel) and run anywhere.
"""

import logging
import os
import re
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax.ops import conv
from unet_jax.ops import native
from unet_jax.ops import onednn
from unet_jax.ops import policy


def _plain(x, kernel):
  """XLA's stride-1 'SAME' convolution, channels-last, at full float32 precision."""
  ndim = x.ndim - 2
  spec = ('NHWC', 'HWIO', 'NHWC') if ndim == 2 else ('NDHWC', 'DHWIO', 'NDHWC')
  return lax.conv_general_dilated(
    x,
    kernel,
    (1,) * ndim,
    'SAME',
    dimension_numbers=spec,
    precision=lax.Precision.HIGHEST,
  )


def _close(actual, expected):
  """Equal within float32 rounding: 1e-5 of the reference's largest magnitude."""
  scale = float(jnp.max(jnp.abs(expected)))
  assert scale > 0
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)


def _random(seed, *shapes):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


SHAPES = [
  # (input, kernel): odd sizes, 1 and 3 channels, batch 1 and 3, even kernels.
  ((3, 7, 9, 3), (3, 3, 3, 5)),
  ((1, 5, 6, 1), (3, 3, 1, 1)),
  ((1, 6, 10, 4), (2, 2, 4, 3)),
  ((3, 5, 11, 2), (1, 1, 2, 3)),
  ((1, 3, 5, 7, 3), (3, 3, 3, 3, 1)),
  ((3, 4, 5, 6, 1), (3, 3, 3, 1, 4)),
  ((1, 3, 6, 5, 2), (1, 3, 3, 2, 2)),
  ((1, 4, 4, 6, 3), (2, 2, 2, 3, 2)),
]


@pytest.mark.parametrize('blocked_weights', [True, False])
@pytest.mark.parametrize('x_shape, k_shape', SHAPES)
def test_each_part_equals_xla(x_shape, k_shape, blocked_weights):
  x, kernel = _random(0, x_shape, k_shape)
  y = _plain(x, kernel)
  (g,) = _random(1, y.shape)
  _, vjp = jax.vjp(_plain, x, kernel)
  dx, dk = vjp(g)
  kw = dict(blocked_weights=blocked_weights)
  _close(onednn.conv_same(x, kernel, **kw), y)
  _close(onednn.conv_same_input_grad(g, kernel, **kw), dx)
  _close(onednn.conv_weight_grad(x, g, k_shape[:-2], **kw), dk)


@pytest.mark.parametrize('blocked_activations', [True, False])
@pytest.mark.parametrize(
  'x_shape, k_shape',
  # Channels both ways across the blocking of 8, and the decoder's c >= 2 o.
  [((2, 9, 7, 19), (3, 3, 19, 5)), ((1, 6, 5, 16), (3, 3, 16, 8)), SHAPES[0], SHAPES[5]],
)
def test_kernel_grad_in_either_activation_layout_equals_xla(
  x_shape, k_shape, blocked_activations
):
  x, kernel = _random(4, x_shape, k_shape)
  y, vjp = jax.vjp(_plain, x, kernel)
  (g,) = _random(5, y.shape)
  dk = onednn.conv_weight_grad(
    x, g, k_shape[:-2], blocked_activations=blocked_activations, block=0
  )
  _close(dk, vjp(g)[1])


def test_the_blocked_layout_is_chosen_for_2d_decoder_kernel_grads_only(monkeypatch):
  assert onednn.blocked_wgrad_activations(2, 64, 32)
  assert onednn.blocked_wgrad_activations(2, 512, 256)
  assert not onednn.blocked_wgrad_activations(2, 32, 32)
  assert not onednn.blocked_wgrad_activations(2, 63, 32)
  assert not onednn.blocked_wgrad_activations(3, 64, 32)
  monkeypatch.setattr(onednn, 'BLOCKED_WGRAD', False)
  assert not onednn.blocked_wgrad_activations(2, 64, 32)
  monkeypatch.undo()
  # `implementation` creates the primitive the rule asks for, either way.
  assert onednn.implementation('kernel_grad', (1, 16, 16, 8), (3, 3, 8, 8))
  assert onednn.implementation('kernel_grad', (1, 16, 16, 16), (3, 3, 16, 8))


BLOCKED_SHAPES = [
  # (input, kernel), both channel counts multiples of 16: 2D and 3D, odd sizes, an
  # even kernel, more input than output channels and the reverse.
  ((2, 7, 9, 16), (3, 3, 16, 32)),
  ((1, 6, 10, 32), (2, 2, 32, 16)),
  # 3D, where the rule keeps channels-last but the blocked calls are right too.
  ((1, 3, 5, 6, 16), (3, 3, 3, 16, 16)),
  ((2, 4, 3, 5, 32), (1, 3, 3, 32, 16)),
]


@pytest.mark.parametrize('block', [8, 16])
@pytest.mark.parametrize('x_shape, k_shape', BLOCKED_SHAPES)
def test_each_part_on_blocked_activations_equals_xla(x_shape, k_shape, block):
  x, kernel = _random(6, x_shape, k_shape)
  y, vjp = jax.vjp(_plain, x, kernel)
  (g,) = _random(7, y.shape)
  dx, dk = vjp(g)
  _close(onednn.conv_same(x, kernel, block=block), y)
  _close(onednn.conv_same_input_grad(g, kernel, block=block), dx)
  _close(onednn.conv_weight_grad(x, g, k_shape[:-2], block=block), dk)


@pytest.mark.parametrize('shape', [(2, 3, 5, 16), (1, 2, 3, 4, 24)])
def test_the_blocked_layout_is_onednns(shape):
  # [N, *spatial, C] -> [N, C / 8, *spatial, 8]: element (n, c // 8, ..., c % 8) is
  # channel c; and back.
  (x,) = _random(8, shape)
  b = onednn.to_blocked(x, 8)
  assert b.shape == (shape[0], shape[-1] // 8, *shape[1:-1], 8)
  xn, bn = np.asarray(x), np.asarray(b)
  for c in (0, 7, 8, shape[-1] - 1):
    np.testing.assert_array_equal(bn[:, c // 8, ..., c % 8], xn[..., c])
  np.testing.assert_array_equal(onednn.from_blocked(b), x)


def test_the_block_is_chosen_by_the_channel_counts(monkeypatch):
  assert onednn.ACT_BLOCK == 8
  assert onednn.act_block(2, 16, 32) == 8
  assert onednn.act_block(2, 1, 32) == 0  # a network's first convolution
  assert onednn.act_block(2, 12, 16) == 0
  assert onednn.act_block(3, 16, 32) == 0  # 3D stays channels-last
  monkeypatch.setattr(onednn, 'ACT_BLOCK', 0)
  assert onednn.act_block(2, 16, 32) == 0
  x, kernel = _random(9, (1, 4, 4, 12), (3, 3, 12, 8))
  with pytest.raises(ValueError, match=r'block=8 must be one of .* \(12 in, 8 out\)'):
    onednn.conv_same(x, kernel, block=8)
  with pytest.raises(ValueError, match='block=4'):
    onednn.conv_same_input_grad(jnp.zeros((1, 4, 4, 8)), kernel, block=4)


@pytest.mark.parametrize('x_shape, k_shape', [SHAPES[0], SHAPES[5]])
def test_under_jit_and_grad_the_convolution_is_xlas(x_shape, k_shape):
  x, kernel = _random(2, x_shape, k_shape)
  same = conv.conv2d_same if len(x_shape) == 4 else conv.conv3d_same
  fn = lambda x, k: same(x, k, onednn=True)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  text = jax.jit(jax.grad(loss(fn), argnums=(0, 1))).lower(x, kernel).as_text()
  targets = set(re.findall(r'@(unet_jax_onednn_\w+)', text))
  assert targets == {
    'unet_jax_onednn_conv',
    'unet_jax_onednn_input_grad',
    'unet_jax_onednn_wgrad',
  }
  _close(jax.jit(fn)(x, kernel), _plain(x, kernel))
  grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, kernel)
  expected = jax.grad(loss(_plain), argnums=(0, 1))(x, kernel)
  for actual, want in zip(grads, expected):
    _close(actual, want)


def test_other_dtypes_keep_xlas_convolution():
  x, kernel = (a.astype(jnp.bfloat16) for a in _random(3, (1, 6, 6, 2), (3, 3, 2, 2)))
  fn = lambda x, k: conv.conv2d_same(x, k, onednn=True)
  assert 'unet_jax_onednn' not in jax.jit(fn).lower(x, kernel).as_text()
  with pytest.raises(ValueError, match='float32'):
    onednn.conv_same(x, kernel)


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r'rank-4 kernel'):
    onednn.conv_same(jnp.ones((1, 2, 3, 3, 1)), jnp.ones((3, 3, 1, 1)))
  with pytest.raises(ValueError, match=r'must agree'):
    onednn.conv_weight_grad(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 4, 5, 1)), (3, 3))


def test_onednn_picks_its_own_kernels():
  impl = onednn.implementation('forward', (2, 16, 16, 8), (3, 3, 8, 8))
  assert impl  # e.g. 'brg_conv_fwd:avx2'; which one depends on the CPU
  with pytest.raises(ValueError, match="op='fwd'"):
    onednn.implementation('fwd', (2, 16, 16, 8), (3, 3, 8, 8))


@pytest.mark.parametrize(
  'shape, kwargs',
  [
    ((3, 12, 20, 1), dict(upsample='transpose')),
    ((1, 4, 8, 12, 2), dict(upsample='bilinear', kernel_sizes=[(1, 3, 3), (3, 3, 3)])),
    # Widths 8, 16, 32: every convolution but the first on blocked activations.
    ((2, 8, 12, 1), dict(upsample='transpose', features=8, depth=2)),
    ((1, 4, 8, 8, 1), dict(upsample='bilinear', features=8, depth=2)),
  ],
)
def test_unet_under_onednn_equals_xla(shape, kwargs):
  x = jax.random.normal(jax.random.key(4), shape)
  kwargs = {'features': 4, 'depth': 1, **kwargs}
  nets = {k: models.UNet(num_classes=2, kernels=k, **kwargs) for k in ('xla', 'onednn')}
  variables = nets['xla'].init(jax.random.key(0), x, train=False)

  def value_and_grad(net):
    def loss(params):
      y, _ = net.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.mean(jnp.sin(y))

    lowered = jax.jit(jax.value_and_grad(loss)).lower(variables['params'])
    fast_compile = {'xla_backend_optimization_level': 0}
    return lowered, lowered.compile(compiler_options=fast_compile)(variables['params'])

  (_, (want, want_grads)), (lowered, (got, got_grads)) = (
    value_and_grad(nets[k]) for k in ('xla', 'onednn')
  )
  text = lowered.as_text()
  assert 'unet_jax_onednn_wgrad' in text
  # In 2D the convolutions with 8k channels both sides (the 8-wide bottleneck of
  # features=4) go on blocked activations; in 3D none does.
  blocked = re.findall(r'act_block = 8 : i64', text)
  assert bool(blocked) == (x.ndim == 4)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for actual, expected in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    _close(actual, expected)


def test_the_onednn_policy_and_name():
  assert 'onednn' in policy.NAMES
  assert policy.resolve('onednn') == policy.ONEDNN
  assert policy.ONEDNN.onednn_conv == (2, 3)
  # Independent of the hand-written convolutions; 2D max pooling by the native kernel.
  assert not policy.ONEDNN.uses_native_conv
  assert policy.ONEDNN.native_pool == (2,)
  assert policy.KernelPolicy(onednn_conv=[3]).onednn_conv == (3,)
  with pytest.raises(ValueError, match='onednn_conv'):
    policy.KernelPolicy(onednn_conv=[4])


@pytest.fixture
def fresh(monkeypatch):
  """A process where oneDNN has not been tried yet (its state restored afterwards)."""
  monkeypatch.setattr(onednn, '_state', {})
  return monkeypatch


def test_hidden_wheel_falls_back_to_xla_with_one_warning(fresh, caplog):
  fresh.setenv('UNET_JAX_ONEDNN', '0')
  with caplog.at_level(logging.WARNING):
    assert not onednn.available()
    assert not onednn.available()
  warned = [m for m in caplog.messages if 'oneDNN not available' in m]
  assert len(warned) == 1 and 'UNET_JAX_ONEDNN=0' in warned[0]
  with pytest.raises(native.NativeKernelError, match='UNET_JAX_ONEDNN=0'):
    policy.resolve('onednn')
  assert not policy.resolve('auto').uses_onednn
  assert policy.resolve('xla') == policy.XLA
  # A model asked for oneDNN raises when it is built, naming the reason.
  net = models.UNet(num_classes=2, features=2, depth=1, kernels='onednn')
  with pytest.raises(native.NativeKernelError, match='UNET_JAX_ONEDNN=0'):
    net.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), train=False)


def test_missing_compiler_is_an_error_naming_it(fresh, tmp_path):
  fresh.setenv('UNET_JAX_CACHE_DIR', str(tmp_path))
  fresh.setenv('CXX', 'no-such-compiler-xyz')
  assert not onednn.available()
  with pytest.raises(native.NativeKernelError, match='no-such-compiler-xyz'):
    onednn.ensure_available()
  assert not list(tmp_path.glob('*.so'))


def test_missing_wheel_is_named():
  with pytest.raises(native.NativeKernelError, match="'no-such-wheel-xyz'.*onednn"):
    onednn._files('no-such-wheel-xyz')


def test_the_wheels_are_found_and_their_runtime_read():
  include, lib = onednn.locate()
  assert (include / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists()
  assert any(lib.glob('libdnnl.so*'))
  assert onednn.runtime(include) in ('SYCL', 'OMP', 'TBB', 'SEQ', 'THREADPOOL')


def test_auto_never_takes_onednn():
  # The native kernels beat it on both CPUs measured (AVX-512 and AVX2); this
  # project's CI machines have at least AVX2 and FMA.
  assert native.cpu_is_measured()
  assert policy.resolve('auto') == policy.CPU
  assert not policy.resolve('auto').uses_onednn


def _onednn_setting(name, variable, value):
  code = f'from unet_jax.ops import onednn; print(onednn.{name})'
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{variable: value})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, '-c', code],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_the_blocked_kernel_grad_can_be_turned_off_for_a_process():
  out = _onednn_setting('BLOCKED_WGRAD', 'UNET_JAX_ONEDNN_BLOCKED_WGRAD', '0')
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == 'False'


def test_the_activation_block_is_set_per_process_and_checked():
  out = _onednn_setting('ACT_BLOCK', 'UNET_JAX_ONEDNN_ACT_BLOCK', '0')
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '0'
  out = _onednn_setting('ACT_BLOCK', 'UNET_JAX_ONEDNN_ACT_BLOCK', '7')
  assert out.returncode != 0
  assert "UNET_JAX_ONEDNN_ACT_BLOCK='7' must be one of 0, 8, 16" in out.stderr
