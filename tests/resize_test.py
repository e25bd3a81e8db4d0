"""The 2x stencil (unet_jax/ops/resize.py) is jax.image.resize's linear upsampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax.ops import policy
from unet_jax.ops import resize


def _resize(x, factors):
  shape = (x.shape[0],) + tuple(s * f for s, f in zip(x.shape[1:-1], factors))
  return jax.image.resize(x, shape + x.shape[-1:], method='linear')


@pytest.mark.parametrize(
  'shape, factors',
  [
    ((2, 5, 7, 3), (2, 2)),
    ((1, 1, 4, 2), (2, 2)),  # a 1-wide axis: both outputs are the one input
    ((1, 3, 4, 5, 2), (2, 2, 2)),
    ((2, 3, 4, 6, 1), (1, 2, 2)),  # anisotropic: depth kept
    ((1, 4, 6, 2), (2, 1)),
  ],
)
def test_forward_and_gradient_equal_jax_image_resize(shape, factors):
  x = jax.random.normal(jax.random.key(0), shape)
  want, want_vjp = jax.vjp(lambda x: _resize(x, factors), x)
  got, got_vjp = jax.vjp(lambda x: resize.upsample_2x(x, factors), x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  g = jax.random.normal(jax.random.key(1), want.shape)
  np.testing.assert_allclose(got_vjp(g)[0], want_vjp(g)[0], rtol=0, atol=1e-5)


def test_hand_computed_row():
  # x = [0, 4, 8]: outputs at source positions -0.25, 0.25, 0.75, ..., clamped.
  x = jnp.array([0.0, 4.0, 8.0]).reshape(1, 1, 3, 1)
  y = resize.upsample_2x(x, (1, 2))
  np.testing.assert_allclose(y.ravel(), [0.0, 1.0, 3.0, 5.0, 7.0, 8.0])


def test_other_factors_are_refused_and_left_to_jax():
  assert resize.suits((1, 2, 2)) and not resize.suits((2, 3))
  with pytest.raises(ValueError, match=r'factor of 1 or 2 .* got \(2, 3\)'):
    resize.upsample_2x(jnp.zeros((1, 4, 4, 1)), (2, 3))
  with pytest.raises(ValueError, match='each of the 2 spatial axes'):
    resize.upsample_2x(jnp.zeros((1, 4, 4, 1)), (2, 2, 2))


@pytest.mark.parametrize('shape', [(2, 16, 24, 1), (1, 8, 8, 8, 1)])
def test_the_bilinear_unet_is_the_same_function_with_the_stencil(shape):
  x = jax.random.normal(jax.random.key(2), shape)
  nets = {
    s: models.UNet(
      num_classes=2,
      features=4,
      depth=2,
      upsample='bilinear',
      kernels=policy.XLA.replace(upsample_as_stencil=(2, 3) if s else ()),
    )
    for s in (False, True)
  }
  variables = nets[False].init(jax.random.key(0), x, train=False)

  def value_and_grad(net):
    def loss(params):
      y = net.apply({**variables, 'params': params}, x, train=False)
      return jnp.mean(jnp.sin(y))

    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  (want, want_grads), (got, got_grads) = (value_and_grad(nets[s]) for s in (False, True))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  # jax.image.resize contracts with weight matrices; the stencil has no product.
  for s, products in ((False, True), (True, False)):
    fn = jax.jit(lambda p, s=s: nets[s].apply({**variables, 'params': p}, x))
    assert ('dot_general' in fn.lower(variables['params']).as_text()) == products
  # On the CPU in 2D (it lost in 3D); GPU and TPU: jax.image.resize, as before.
  assert policy.CPU.upsample_as_stencil == policy.ONEDNN.upsample_as_stencil == (2,)
  assert policy.XLA.upsample_as_stencil == ()
  with pytest.raises(ValueError, match='upsample_as_stencil'):
    policy.KernelPolicy(upsample_as_stencil=[4])
