"""The faster formulations of conv.py compute the same function as plain XLA, and
policy.py chooses them."""

import functools
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax.ops import conv
from unet_jax.ops import native as native_kernels
from unet_jax.ops import onednn as onednn_kernels
from unet_jax.ops import policy


@pytest.fixture(autouse=True)
def native_at_every_size(monkeypatch):
  # The tests' images are small; `UNet` uses the native kernels only from a width
  # and channel count where they win. Here they run at every size, so that the
  # formulation tests exercise them (the rules themselves:
  # test_native_kernels_follow_the_size_rules).
  monkeypatch.setattr(
    conv,
    'NATIVE_MIN_WIDTH',
    {
      2: {'forward': 1, 'kernel_grad': 1, 'winograd': 1},
      3: {'forward': 1, 'kernel_grad': 1, 'winograd': 1},
    },
  )
  monkeypatch.setattr(conv, 'NATIVE_MIN_TILED_CHANNELS', 1)


def _natively(fn, x, kernel):
  """Which parts of `fn(x, kernel)` call the native kernels: {'forward',
  'input_grad', 'kernel_grad'}, each read from its own lowered program."""
  loss = lambda x, k: jnp.sum(fn(x, k))
  programs = {
    'forward': (fn, 'unet_jax_conv'),
    'input_grad': (jax.grad(loss, argnums=0), 'unet_jax_conv'),
    'kernel_grad': (jax.grad(loss, argnums=1), 'unet_jax_conv_wgrad'),
  }
  found = set()
  for part, (f, target) in programs.items():
    text = jax.jit(f).lower(x, kernel).as_text()
    if re.search(rf'@{target}\b', text):
      found.add(part)
    wino = 'unet_jax_conv_winograd' + ('_wgrad' if part == 'kernel_grad' else '')
    if re.search(rf'@{wino}\b', text):
      found.add(f'{part} (winograd)')
  return found


def test_native_kernels_follow_the_size_rules(monkeypatch):
  monkeypatch.setattr(
    conv,
    'NATIVE_MIN_WIDTH',
    {2: {'forward': 32, 'kernel_grad': 16}, 3: {'forward': 8, 'kernel_grad': 8}},
  )
  monkeypatch.setattr(conv, 'NATIVE_MIN_TILED_CHANNELS', 16)
  every = {'forward', 'input_grad', 'kernel_grad'}
  native = functools.partial(conv.conv2d_same, weight_grad='native', native_forward=True)
  k = jnp.ones((3, 3, 16, 16))
  assert _natively(native, jnp.ones((1, 4, 32, 16)), k) == every
  assert _natively(native, jnp.ones((1, 4, 16, 16)), k) == {'kernel_grad'}
  assert _natively(native, jnp.ones((1, 4, 8, 16)), k) == set()
  # The forward pass needs 16 output channels, the input gradient 16 input ones.
  assert _natively(native, jnp.ones((1, 4, 32, 16)), jnp.ones((3, 3, 16, 8))) == {
    'input_grad',
    'kernel_grad',
  }
  assert _natively(native, jnp.ones((1, 4, 32, 1)), jnp.ones((3, 3, 1, 16))) == {
    'forward',
    'kernel_grad',
  }
  # 3D: native down to 8 wide; narrower, the folded XLA convolution.
  native_3d = functools.partial(conv.conv3d_same, weight_grad='native', native_forward=True)
  k3 = jnp.ones((3, 3, 3, 16, 16))
  assert _natively(native_3d, jnp.ones((1, 2, 4, 8, 16)), k3) == every
  assert _natively(native_3d, jnp.ones((1, 2, 4, 4, 16)), k3) == set()


def test_winograd_follows_the_size_rules(monkeypatch):
  monkeypatch.setattr(
    conv,
    'NATIVE_MIN_WIDTH',
    {
      2: {'forward': 32, 'kernel_grad': 16, 'winograd': 16},
      3: {'forward': 8, 'kernel_grad': 8, 'winograd': 16},
    },
  )
  monkeypatch.setattr(conv, 'NATIVE_MIN_TILED_CHANNELS', 16)
  wino = {'forward (winograd)', 'input_grad (winograd)', 'kernel_grad (winograd)'}
  fast = functools.partial(
    conv.conv2d_same, weight_grad='native', native_forward=True, winograd=True
  )
  k = jnp.ones((3, 3, 16, 16))
  # From 16 wide, before the direct kernel's 32; both channel counts 16 or more.
  assert _natively(fast, jnp.ones((1, 4, 32, 16)), k) == wino
  assert _natively(fast, jnp.ones((1, 4, 16, 16)), k) == wino
  assert _natively(fast, jnp.ones((1, 4, 8, 16)), k) == set()
  assert _natively(fast, jnp.ones((1, 4, 32, 16)), jnp.ones((3, 3, 16, 8))) == {
    'input_grad',
    'kernel_grad',
  }
  assert _natively(fast, jnp.ones((1, 4, 32, 1)), jnp.ones((3, 3, 1, 16))) == {
    'forward',
    'kernel_grad',
  }
  # Not a 3 x 3 kernel: the direct kernel.
  assert _natively(fast, jnp.ones((1, 4, 32, 16)), jnp.ones((1, 3, 16, 16))) == {
    'forward',
    'input_grad',
    'kernel_grad',
  }
  # 3D: 3 x 3 in H and W with any depth size, from 16 wide; the direct kernel below.
  fast_3d = functools.partial(
    conv.conv3d_same, weight_grad='native', native_forward=True, winograd=True
  )
  assert (
    _natively(fast_3d, jnp.ones((1, 2, 4, 16, 16)), jnp.ones((1, 3, 3, 16, 16))) == wino
  )
  assert _natively(fast_3d, jnp.ones((1, 2, 4, 8, 16)), jnp.ones((3, 3, 3, 16, 16))) == {
    'forward',
    'input_grad',
    'kernel_grad',
  }


def _plain(x, kernel):
  """The reference: XLA's 'same' convolution, channels-last."""
  ndim = x.ndim - 2
  spec = ('NHWC', 'HWIO', 'NHWC') if ndim == 2 else ('NDHWC', 'DHWIO', 'NDHWC')
  return lax.conv_general_dilated(x, kernel, (1,) * ndim, 'SAME', dimension_numbers=spec)


def _value_and_grads(fn, x, kernel, probe):
  """fn(x, k), and the gradients of <fn(x, k), probe> w.r.t. x and k (jitted)."""

  def all_of_it(x, kernel, probe):
    loss = lambda x, k: jnp.sum(fn(x, k).astype(jnp.float32) * probe)
    return fn(x, kernel), *jax.grad(loss, argnums=(0, 1))(x, kernel)

  return jax.jit(all_of_it)(x, kernel, probe)


def _inputs(x_shape, k_shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], x_shape).astype(dtype)
  k = (jax.random.normal(keys[1], k_shape) / np.sqrt(np.prod(k_shape[:-1]))).astype(dtype)
  probe = jax.random.normal(keys[2], x_shape[:-1] + k_shape[-1:])
  return x, k, probe


def _assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  scale = max(1.0, float(np.abs(want).max()))
  # float32: rounding of a different summation order. bf16: products in bf16 and
  # outputs rounded to 8 bits of mantissa (relative 2^-8 = 0.4%) on either side.
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)


DTYPES = [jnp.float32, jnp.bfloat16]


# (kernel gradient, native forward pass and input gradient, Winograd)
OWN_2D = [
  ('native', False, False),
  ('native', True, False),
  ('xla', True, False),
  ('native', True, True),
  ('xla', False, True),
]


@pytest.mark.parametrize('weight_grad, native_forward, winograd', OWN_2D)
@pytest.mark.parametrize(
  'x_shape, k_shape, dtype',
  [
    ((2, 7, 9, 3), (3, 3, 3, 4), jnp.float32),  # odd sizes
    ((2, 7, 9, 3), (3, 3, 3, 4), jnp.bfloat16),
    ((1, 5, 6, 1), (3, 3, 1, 8), jnp.float32),  # one input channel (first layer)
    ((3, 4, 5, 8), (1, 3, 8, 2), jnp.float32),  # a 1 x 3 kernel
    ((3, 4, 5, 8), (1, 3, 8, 2), jnp.bfloat16),
    ((1, 6, 3, 5), (5, 3, 5, 3), jnp.float32),  # a kernel larger than the width
    # The native kernel's register tiles: 8 x 32 and 16 x 16 channel blocks and
    # every kind of remainder on either side.
    ((2, 6, 5, 13), (3, 3, 13, 48), jnp.float32),
    ((1, 5, 7, 40), (3, 3, 40, 17), jnp.float32),
    ((3, 3, 4, 7), (3, 3, 7, 35), jnp.float32),
    ((1, 4, 4, 2), (2, 2, 2, 16), jnp.float32),  # an even kernel
    ((2, 9, 11, 5), (3, 3, 5, 20), jnp.float32),  # pixel tiles of 8, 2 and 1
    ((1, 5, 6, 70), (3, 3, 70, 33), jnp.float32),  # two input-channel blocks
    # A kernel too large to stay in L2 (over 2^18 floats): both kernels take the
    # rows in groups (3 rows of 40 pixels), here 14 rows.
    ((2, 7, 40, 180), (3, 3, 180, 170), jnp.float32),
  ],
)
def test_own_formulations_match_xla_2d(
  x_shape, k_shape, dtype, weight_grad, native_forward, winograd
):
  x, k, probe = _inputs(x_shape, k_shape, dtype)
  fast = functools.partial(
    conv.conv2d_same,
    weight_grad=weight_grad,
    native_forward=native_forward,
    winograd=winograd,
  )
  got = _value_and_grads(fast, x, k, probe)
  want = _value_and_grads(_plain, x, k, probe)
  assert got[2].dtype == k.dtype and got[1].dtype == x.dtype
  for g, w in zip(got, want):
    _assert_close(g, w, dtype)


# (fold_depth, kernel gradient, native forward pass and input gradient): every
# formulation of a 3D convolution other than the reference (no fold, all XLA).
# Winograd last (on or off).
OWN_3D = [(True, w, False, False) for w in conv.WEIGHT_GRADS] + [
  (True, 'native', True, False),
  (False, 'native', False, False),
  (False, 'native', True, False),
  (False, 'xla', True, False),
  (False, 'native', True, True),
  (True, 'xla', False, True),
]


@pytest.mark.parametrize('fold_depth, weight_grad, native_forward, winograd', OWN_3D)
@pytest.mark.parametrize(
  'x_shape, k_shape, dtype',
  [
    ((2, 5, 7, 9, 3), (3, 3, 3, 3, 4), jnp.float32),  # odd sizes
    ((1, 4, 6, 5, 16), (3, 3, 3, 16, 16), jnp.float32),  # the 3D benchmark's width
    ((2, 5, 7, 9, 3), (3, 3, 3, 3, 4), jnp.bfloat16),
    ((1, 4, 6, 5, 1), (3, 3, 3, 1, 6), jnp.float32),  # one input channel
    ((1, 3, 5, 4, 2), (1, 3, 3, 2, 5), jnp.float32),  # an in-plane level in 3D
    ((1, 3, 5, 4, 2), (1, 3, 3, 2, 5), jnp.bfloat16),
    ((2, 6, 5, 3, 3), (5, 3, 1, 3, 2), jnp.float32),  # a 5 x 3 x 1 kernel
    # The 3D native kernel's tiles and edges: channel remainders, an even kernel,
    # pixel tiles of 8, 4, 2 and 1 between the edge pixels.
    ((1, 3, 4, 17, 17), (3, 3, 3, 17, 48), jnp.float32),
    ((2, 4, 3, 6, 5), (2, 2, 2, 5, 16), jnp.float32),
    ((1, 2, 5, 9, 40), (3, 3, 3, 40, 20), jnp.float32),
    # A kernel too large for L2 (over 2^18 floats): rows in groups of 12.
    ((1, 3, 4, 10, 100), (3, 3, 3, 100, 100), jnp.float32),
  ],
)
def test_3d_formulations_match_xla(
  x_shape, k_shape, fold_depth, weight_grad, native_forward, winograd, dtype
):
  x, k, probe = _inputs(x_shape, k_shape, dtype)
  fast = functools.partial(
    conv.conv3d_same,
    fold_depth=fold_depth,
    weight_grad=weight_grad,
    native_forward=native_forward,
    winograd=winograd,
  )
  got = _value_and_grads(fast, x, k, probe)
  want = _value_and_grads(_plain, x, k, probe)
  for g, w in zip(got, want):
    _assert_close(g, w, dtype)


def _weight_grad_by_loops(x, g, kh, kw):
  """dL/dK of a 'same' convolution, term by term from its definition."""
  n, h, w, c = x.shape
  dk = np.zeros((kh, kw, c, g.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      for y in range(h):
        for xx in range(w):
          yy, xi = y + i - (kh - 1) // 2, xx + j - (kw - 1) // 2
          if 0 <= yy < h and 0 <= xi < w:
            dk[i, j] += np.einsum('nc,no->co', x[:, yy, xi], g[:, y, xx])
  return dk


def test_native_weight_grad_by_definition():
  # Small integers, so every product and sum is exact in float32.
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, (2, 5, 6, 3)).astype(np.float32)
  g = rng.integers(-3, 4, (2, 5, 6, 18)).astype(np.float32)
  for kh, kw in ((3, 3), (1, 3), (2, 2)):
    np.testing.assert_array_equal(
      native_kernels.conv_weight_grad(x, g, (kh, kw)), _weight_grad_by_loops(x, g, kh, kw)
    )
  # Winograd's F(3x3, 2x2): its transforms scale by 1/2, exact on small integers.
  # 5 x 6 leaves a half tile on the last row.
  np.testing.assert_array_equal(
    native_kernels.conv_weight_grad(x, g, (3, 3), winograd=True),
    _weight_grad_by_loops(x, g, 3, 3),
  )


def test_native_weight_grad_is_deterministic():
  # Rows are shared out over threads, but each chunk of rows has its own partial
  # sum and they are added in a fixed order: runs are bit-identical, which resumed
  # training relies on.
  keys = jax.random.split(jax.random.key(3))
  x = jax.random.normal(keys[0], (4, 32, 16, 8))
  g = jax.random.normal(keys[1], (4, 32, 16, 16))
  for winograd in (False, True):
    first = np.asarray(native_kernels.conv_weight_grad(x, g, (3, 3), winograd=winograd))
    for _ in range(20):
      np.testing.assert_array_equal(
        native_kernels.conv_weight_grad(x, g, (3, 3), winograd=winograd), first
      )


def test_native_kernel_builds_on_this_machine():
  # CI runs where a C++ compiler exists; a silent fallback to XLA would hide a
  # broken build, so the build itself is asserted.
  native_kernels.ensure_available()
  # 'auto' takes them where their tiles are sized and measured: AVX-512F, AVX2 + FMA.
  expected = (2, 3) if native_kernels.cpu_is_measured() else ()
  assert policy.auto().native_weight_grad == expected


def test_native_forward_by_definition():
  # y[n, y, x, o] = sum over taps inside the image of x * k; small integers, exact.
  rng = np.random.default_rng(1)
  x = rng.integers(-3, 4, (2, 5, 9, 3)).astype(np.float32)
  k = rng.integers(-3, 4, (3, 3, 3, 35)).astype(np.float32)
  want = np.zeros((2, 5, 9, 35))
  for i in range(3):
    for j in range(3):
      for y in range(5):
        for xx in range(9):
          yy, xi = y + i - 1, xx + j - 1
          if 0 <= yy < 5 and 0 <= xi < 9:
            want[:, y, xx] += x[:, yy, xi] @ k[i, j]
  np.testing.assert_array_equal(native_kernels.conv_same(x, k), want)
  # Winograd's F(2x2, 3x3) too: its transforms scale by 1/2 and 1/4, which stay
  # exact on small integers. 5 x 9 leaves half tiles on the last row and column.
  np.testing.assert_array_equal(
    native_kernels.conv_same(x, k, winograd=True, winograd_tile=2), want
  )
  # F(4x4, 3x3) (the choice for this shape) scales by 1/6 and 1/24, which are not
  # exact in binary: every output within rounding of the exact integer.
  _assert_rounds_to(native_kernels.conv_same(x, k, winograd=True), want)


@pytest.mark.parametrize(
  'x_shape, k_shape',
  [
    ((2, 1, 1, 5), (3, 3, 5, 17)),  # one pixel: a tile that overhangs both ways
    ((1, 1, 6, 3), (3, 3, 3, 20)),  # one row
    ((2, 5, 1, 18), (3, 3, 18, 3)),  # one column; fewer than 16 outputs
    ((1, 1, 3, 1, 4), (3, 3, 3, 4, 18)),  # 3D, depth 1 under a 3-deep kernel
    ((1, 4, 3, 5, 16), (2, 3, 3, 16, 16)),  # 3D, an even depth
  ],
)
def test_winograd_on_degenerate_shapes(x_shape, k_shape):
  x, k, probe = _inputs(x_shape, k_shape, jnp.float32)
  fn = conv.conv2d_same if len(x_shape) == 4 else conv.conv3d_same
  fast = functools.partial(fn, weight_grad='native', winograd=True)
  got = _value_and_grads(fast, x, k, probe)
  want = _value_and_grads(_plain, x, k, probe)
  for g, w in zip(got, want):
    _assert_close(g, w, jnp.float32)


def _wgrad_float64(x, g, spatial):
  """The kernel gradient of `_conv_float64` given its output gradient `g`, in float64."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  pads = [((s - 1) // 2, s - 1 - (s - 1) // 2) for s in spatial]
  xp = np.pad(x, [(0, 0), *pads, (0, 0)])
  dk = np.zeros(tuple(spatial) + (x.shape[-1], g.shape[-1]))
  for tap in np.ndindex(*spatial):
    window = tuple(slice(t, t + n) for t, n in zip(tap, x.shape[1:-1]))
    patch = xp[(slice(None), *window)].reshape(-1, x.shape[-1])
    dk[tap] = patch.T @ g.reshape(-1, g.shape[-1])
  return dk


def _conv_float64(x, k):
  """Stride-1 'same' convolution in float64, tap by tap (2D or 3D, channels last)."""
  x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
  spatial = k.shape[:-2]
  pads = [((s - 1) // 2, s - 1 - (s - 1) // 2) for s in spatial]
  xp = np.pad(x, [(0, 0), *pads, (0, 0)])
  y = np.zeros(x.shape[:-1] + k.shape[-1:])
  for tap in np.ndindex(*spatial):
    window = tuple(slice(t, t + n) for t, n in zip(tap, x.shape[1:-1]))
    y += xp[(slice(None), *window)] @ k[tap]
  return y


@pytest.mark.parametrize(
  'x_shape, k_shape, auto_tile, auto_wgrad_tile',
  [
    # A plane of 64 4 x 4 tiles: 4 x 4 whatever the channels.
    ((2, 32, 32, 64), (3, 3, 64, 96), 4, 4),
    # A small plane whose 36 C O transformed kernel exceeds 1 MiB: 2 x 2.
    ((2, 16, 16, 96), (3, 3, 96, 96), 2, 2),
    # 3D, a small plane of few channels (U within 1 MiB): 4 x 4 forward, 2 x 2 for
    # the kernel gradient (a small plane, `wgrad_tile`).
    ((1, 4, 12, 12, 32), (3, 3, 3, 32, 48), 4, 2),
  ],
)
def test_winograd_error_against_float64(x_shape, k_shape, auto_tile, auto_wgrad_tile):
  # Both tiles against float64: F(2x2, 3x3) and F(3x3, 2x2) as accurate as the
  # direct kernels' summation; F(4x4, 3x3) within 3e-5 of the largest output (its
  # transforms weigh by up to 5 and 8 and by 1/6, 1/24; measured 0.5e-5 to 1.4e-5
  # with 32 to 512 input channels), F(3x3, 4x4) within 1e-5 of the largest kernel
  # gradient entry (measured 0.4e-5 to 0.5e-5). The rules' choices are one of the
  # two, bit for bit.
  x, k, g = _inputs(x_shape, k_shape, jnp.float32, seed=3)
  spatial = k_shape[:-2]
  want_dk = _wgrad_float64(x, g, spatial)
  dk_scale = np.abs(want_dk).max()
  dk_by_tile = {
    t: np.asarray(
      native_kernels.conv_weight_grad(x, g, spatial, winograd=True, winograd_tile=t)
    )
    for t in (2, 4)
  }
  direct_dk = np.asarray(native_kernels.conv_weight_grad(x, g, spatial), np.float64)
  np.testing.assert_allclose(direct_dk, want_dk, rtol=0, atol=1e-6 * dk_scale)
  np.testing.assert_allclose(dk_by_tile[2], want_dk, rtol=0, atol=1e-6 * dk_scale)
  np.testing.assert_allclose(dk_by_tile[4], want_dk, rtol=0, atol=1e-5 * dk_scale)
  np.testing.assert_array_equal(
    native_kernels.conv_weight_grad(x, g, spatial, winograd=True),
    dk_by_tile[auto_wgrad_tile],
  )
  want = _conv_float64(x, k)
  scale = np.abs(want).max()
  by_tile = {
    t: np.asarray(native_kernels.conv_same(x, k, winograd=True, winograd_tile=t))
    for t in (2, 4)
  }
  direct = np.asarray(native_kernels.conv_same(x, k), np.float64)
  np.testing.assert_allclose(direct, want, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(by_tile[2], want, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(by_tile[4], want, rtol=0, atol=3e-5 * scale)
  np.testing.assert_array_equal(
    native_kernels.conv_same(x, k, winograd=True), by_tile[auto_tile]
  )


@pytest.mark.parametrize('tile', [2, 4])
@pytest.mark.parametrize(
  'x_shape, k_shape',
  [
    ((2, 7, 9, 19), (3, 3, 19, 35)),  # partial tiles; channel remainders both sides
    ((1, 1, 1, 5), (3, 3, 5, 17)),  # one pixel: a tile that overhangs both ways
    ((1, 13, 6, 40), (3, 3, 40, 33)),
    ((2, 3, 5, 6, 7), (3, 3, 3, 7, 16)),  # 3D, depth taps at both faces
    ((1, 2, 4, 9, 8), (2, 3, 3, 8, 20)),  # 3D, an even depth
  ],
)
def test_winograd_tiles_match_xla(x_shape, k_shape, tile):
  # Each tile whatever the rules would pick: value, input and kernel gradients.
  x, k, probe = _inputs(x_shape, k_shape, jnp.float32)
  want_y, pullback = jax.vjp(_plain, x, k)
  want_dx, want_dk = pullback(probe)
  got_y = native_kernels.conv_same(x, k, winograd=True, winograd_tile=tile)
  got_dx = native_kernels.conv_same_input_grad(probe, k, winograd=True, winograd_tile=tile)
  got_dk = native_kernels.conv_weight_grad(
    x, probe, k_shape[:-2], winograd=True, winograd_tile=tile
  )
  for got, want in ((got_y, want_y), (got_dx, want_dx), (got_dk, want_dk)):
    _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize(
  'winograd, tile, match',
  [(True, 3, r'winograd_tile=3'), (False, 4, r'winograd=False'), (True, 0, r'tile=0')],
)
def test_winograd_tile_is_checked(winograd, tile, match):
  x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match=match):
    native_kernels.conv_same(x, k, winograd=winograd, winograd_tile=tile)
  with pytest.raises(ValueError, match=match):
    native_kernels.conv_weight_grad(x, x, (3, 3), winograd=winograd, winograd_tile=tile)


@pytest.mark.parametrize(
  'x_shape',
  [(0, 4, 5, 16), (1, 4, 0, 16), (1, 0, 5, 16), (1, 0, 3, 4, 16), (0, 2, 3, 4, 16)],
)
@pytest.mark.parametrize('winograd', [False, True])
def test_native_kernels_take_empty_operands(x_shape, winograd):
  # No pixels: empty outputs and a zero kernel gradient, not a crash (the row
  # scheduler once divided by a zero row count).
  ndim = len(x_shape) - 2
  x, g = jnp.ones(x_shape), jnp.ones(x_shape[:-1] + (17,))
  k = jnp.ones((3,) * ndim + (16, 17))
  assert native_kernels.conv_same(x, k, winograd=winograd).shape == g.shape
  assert native_kernels.conv_same_input_grad(g, k, winograd=winograd).shape == x.shape
  np.testing.assert_array_equal(
    native_kernels.conv_weight_grad(x, g, (3,) * ndim, winograd=winograd), np.zeros(k.shape)
  )
  if winograd:  # pooling has no Winograd variant: once per shape
    y, index = native_kernels.max_pool(jnp.ones(x_shape[:-1] + (2,)), (1,) * ndim)
    assert y.shape == x_shape[:-1] + (2,) and index.shape == y.shape


def test_winograd_takes_3x3_kernels_only():
  with pytest.raises(ValueError, match=r'3 x 3 in H and W; got spatial sizes \(1, 3\)'):
    native_kernels.conv_same(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 3, 2, 16)), winograd=True)


def _conv3d_by_loops(x, k):
  """y of a 'same' 3D convolution and its taps, term by term from the definition.

  Returns y and a list of (output index, input index, tap) for every tap that
  lands inside the input, from which the gradients follow.
  """
  n, d, h, w, _ = x.shape
  kd, kh, kw = k.shape[:3]
  pads = [(s - 1) // 2 for s in (kd, kh, kw)]
  y = np.zeros((n, d, h, w, k.shape[-1]))
  terms = []
  for out in np.ndindex(d, h, w):
    for tap in np.ndindex(kd, kh, kw):
      src = tuple(o + t - p for o, t, p in zip(out, tap, pads))
      if all(0 <= s_ < size for s_, size in zip(src, (d, h, w))):
        y[(slice(None),) + out] += x[(slice(None),) + src] @ k[tap]
        terms.append((out, src, tap))
  return y, terms


def _assert_rounds_to(got, exact):
  """`got` is float32 rounding away from the integers `exact`: within 1e-5 of the
  largest magnitude (F(4x4, 3x3)'s error, `test_winograd_error_against_float64`)."""
  got = np.asarray(got, np.float64)
  np.testing.assert_array_equal(np.round(got), exact)
  np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_native_3d_by_definition():
  # The three 3D kernels on small integers (every product and sum exact in float32),
  # against loops over the definition: y = sum x * k, dx[src] += g[out] k^T,
  # dK[tap] += x[src]^T g[out]. Odd and even kernels, channel counts that leave
  # register-tile remainders; rows narrower than the two 16-pixel edge regions the
  # forward kernel pads for itself (17 wide) and wider, with an interior between
  # them (37 wide: tiles of 4 and 1).
  rng = np.random.default_rng(2)
  for k_spatial, width in (((3, 3, 3), 17), ((2, 3, 2), 17), ((3, 1, 3), 37)):
    x = rng.integers(-3, 4, (2, 3, 4, width, 5)).astype(np.float32)
    k = rng.integers(-3, 4, k_spatial + (5, 36)).astype(np.float32)
    g = rng.integers(-3, 4, (2, 3, 4, width, 36)).astype(np.float32)
    y, terms = _conv3d_by_loops(x, k)
    dx, dk = np.zeros(x.shape), np.zeros(k.shape)
    for out, src, tap in terms:
      dx[(slice(None),) + src] += g[(slice(None),) + out] @ k[tap].T
      dk[tap] += x[(slice(None),) + src].T @ g[(slice(None),) + out]
    np.testing.assert_array_equal(native_kernels.conv_same(x, k), y)
    np.testing.assert_array_equal(native_kernels.conv_same_input_grad(g, k), dx)
    np.testing.assert_array_equal(native_kernels.conv_weight_grad(x, g, k_spatial), dk)
    if native_kernels.winograd_suits(k_spatial):
      # F(2x2, 3x3) exact; F(4x4, 3x3) (the choice here) to rounding (1/6, 1/24).
      f23 = functools.partial(native_kernels.conv_same, winograd=True, winograd_tile=2)
      f23_grad = functools.partial(
        native_kernels.conv_same_input_grad, winograd=True, winograd_tile=2
      )
      np.testing.assert_array_equal(f23(x, k), y)
      np.testing.assert_array_equal(f23_grad(g, k), dx)
      _assert_rounds_to(native_kernels.conv_same(x, k, winograd=True), y)
      _assert_rounds_to(native_kernels.conv_same_input_grad(g, k, winograd=True), dx)
      # The kernel gradient: F(3x3, 2x2) (the choice on these small planes) exact,
      # F(3x3, 4x4) to rounding.
      np.testing.assert_array_equal(
        native_kernels.conv_weight_grad(x, g, k_spatial, winograd=True), dk
      )
      _assert_rounds_to(
        native_kernels.conv_weight_grad(x, g, k_spatial, winograd=True, winograd_tile=4),
        dk,
      )


def test_native_kernel_rejects_bad_ranks():
  with pytest.raises(ValueError, match=r'rank-4 kernel'):
    native_kernels.conv_same(jnp.ones((1, 2, 3, 3, 1)), jnp.ones((3, 3, 1, 1)))


def test_native_kernel_rejects_other_dtypes():
  with pytest.raises(ValueError, match='float32'):
    native_kernels.conv_weight_grad(
      jnp.ones((1, 3, 3, 1), jnp.bfloat16), jnp.ones((1, 3, 3, 1), jnp.bfloat16), (3, 3)
    )


def test_failed_build_names_the_compiler_and_its_message(tmp_path, monkeypatch):
  monkeypatch.setenv('UNET_JAX_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler-xyz')
  with pytest.raises(native_kernels.NativeKernelError, match='no-such-compiler-xyz'):
    native_kernels.build()
  monkeypatch.delenv('CXX')
  bad = tmp_path / 'broken.cc'
  bad.write_text('this is not C++;\n')
  monkeypatch.setattr(native_kernels, 'SOURCE', bad)
  with pytest.raises(
    native_kernels.NativeKernelError, match=r'(?s)broken\.cc failed.*error'
  ):
    native_kernels.build()
  assert not list(tmp_path.glob('*.so'))  # nothing half-written is left


def test_auto_falls_back_to_xla_when_the_kernel_is_unavailable(monkeypatch):
  monkeypatch.setattr(native_kernels, 'available', lambda: False)
  monkeypatch.setattr(onednn_kernels, 'available', lambda: False)
  auto = policy.auto()
  assert not auto.uses_native and not auto.uses_onednn
  # The other formulations stay: only the native kernels are dropped.
  assert auto == policy.AUTO.get(jax.default_backend(), policy.XLA).without_native()


def test_auto_uses_the_native_kernels_on_avx512_and_avx2_cpus(monkeypatch):
  monkeypatch.setattr(native_kernels, 'available', lambda: True)
  monkeypatch.setattr(onednn_kernels, 'available', lambda: True)
  # AVX2 with FMA: the 8-float tiles (benchmarks/RESULTS.md, "The native kernels on
  # 256-bit vectors"); oneDNN, though installed, is not 'auto''s choice.
  monkeypatch.setattr(native_kernels, '_cpu_flags', lambda: 'flags : fpu sse2 avx avx2 fma')
  assert not native_kernels.cpu_has_avx512() and native_kernels.cpu_is_measured()
  assert policy.auto() == policy.CPU
  monkeypatch.setattr(native_kernels, '_cpu_flags', lambda: 'flags : avx2 avx512f avx512bw')
  assert native_kernels.cpu_has_avx512() and native_kernels.cpu_is_measured()
  assert policy.auto() == policy.CPU
  # AVX2 without FMA, or no AVX2: not measured, so the formulations on XLA.
  for flags in ('flags : fpu sse2 avx avx2', 'flags : fpu sse2 sse4_2 avx'):
    monkeypatch.setattr(native_kernels, '_cpu_flags', lambda flags=flags: flags)
    assert not native_kernels.cpu_is_measured()
    assert policy.auto() == policy.CPU.without_native()
    assert policy.resolve('native') == policy.CPU  # Asked for, they are used anyway.
    assert policy.resolve('onednn') == policy.ONEDNN


def test_auto_is_without_native_kernels_with_several_devices():
  # A fresh process with 2 CPU devices: jit over a mesh cannot split an FFI call.
  code = (
    'import jax; from unet_jax.ops import policy; '
    'print(jax.device_count(), policy.auto().uses_native or policy.auto().uses_onednn)'
  )
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]),
  )
  out = subprocess.run(
    [sys.executable, '-c', code],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout.split()
  assert out == ['2', 'False']


def test_folded_3d_kernel_deeper_than_volume():
  # kd = 5 over 3 slices: taps beyond the volume see zero padding only.
  x, k, probe = _inputs((1, 3, 4, 4, 2), (5, 3, 3, 2, 3), jnp.float32)
  fast = functools.partial(conv.conv3d_same, fold_depth=True)
  for g, w in zip(
    _value_and_grads(fast, x, k, probe), _value_and_grads(_plain, x, k, probe)
  ):
    _assert_close(g, w, jnp.float32)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize(
  'x_shape, strides, features',
  [
    ((2, 3, 5, 4), (2, 2), 6),
    ((1, 3, 2, 5, 4), (2, 2, 2), 1),
    ((1, 3, 2, 5, 4), (1, 2, 2), 6),  # anisotropic, as with pool_sizes (1, 2, 2)
    ((2, 3, 5, 1), (3, 2), 2),
  ],
)
def test_conv_transpose_as_matmul_matches_flax(x_shape, strides, features, dtype):
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
  ref = nn.ConvTranspose(features, strides, strides=strides, padding='VALID', dtype=dtype)
  fast = conv.ConvTranspose(features, strides, dtype=dtype)
  variables = ref.init(jax.random.key(1), x)
  # Same parameter tree and the same initial values from the same key.
  fast_variables = fast.init(jax.random.key(1), x)
  assert jax.tree.structure(fast_variables) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, fast_variables, variables)
  # A non-zero bias, so that its gradient and broadcast are checked too.
  variables = jax.tree.map(lambda a: a + 0.25, variables)
  out_shape = (
    (x_shape[0],) + tuple(s * r for s, r in zip(x_shape[1:-1], strides)) + (features,)
  )
  probe = jax.random.normal(jax.random.key(2), out_shape)

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grads(module, variables, x):
    loss = lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) * probe)
    return module.apply(variables, x), *jax.grad(loss, argnums=(0, 1))(variables, x)

  got = value_and_grads(fast, variables, x)
  want = value_and_grads(ref, variables, x)
  assert got[0].shape == out_shape
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(g, w, dtype)


def test_conv_transpose_as_matmul_hand_computed():
  # One input pixel, 1 -> 1 channel, stride 2: the output is the flipped kernel.
  kernel = jnp.arange(4.0).reshape(2, 2, 1, 1)
  y = conv.conv_transpose_as_matmul(jnp.ones((1, 1, 1, 1)), kernel, jnp.ones(1))
  np.testing.assert_array_equal(y[0, :, :, 0], [[4.0, 3.0], [2.0, 1.0]])


def test_conv_transpose_rejects_wrong_rank():
  with pytest.raises(ValueError, match='strides'):
    conv.ConvTranspose(2, (2, 2, 2)).init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))


@pytest.mark.parametrize(
  'x_shape, k_shape', [((2, 5, 7, 3), (1, 1, 3, 4)), ((1, 3, 5, 4, 2), (1, 1, 1, 2, 3))]
)
def test_pointwise_as_matmul(x_shape, k_shape):
  fn = conv.conv_general_dilated_fn(pointwise_as_matmul=True)
  ndim = len(x_shape) - 2
  spec = lax.conv_dimension_numbers(
    x_shape, k_shape, ('NHWC', 'HWIO', 'NHWC') if ndim == 2 else ('NDHWC', 'DHWIO', 'NDHWC')
  )
  fast = lambda x, k: fn(x, k, (1,) * ndim, 'SAME', dimension_numbers=spec)
  x, k, probe = _inputs(x_shape, k_shape, jnp.float32)
  for g, w in zip(
    _value_and_grads(fast, x, k, probe), _value_and_grads(_plain, x, k, probe)
  ):
    _assert_close(g, w, jnp.float32)


POOLS = {'native': conv.max_pool_native, 'policy': policy.CPU.max_pool}


@pytest.mark.parametrize('pool', sorted(POOLS))
@pytest.mark.parametrize(
  'shape, window, dtype',
  [
    ((2, 6, 10, 3), (2, 2), jnp.float32),
    ((1, 4, 6, 8, 2), (2, 2, 2), jnp.float32),
    ((1, 3, 4, 6, 2), (1, 2, 2), jnp.float32),  # in-plane pooling in 3D
    ((2, 6, 10, 3), (2, 2), jnp.bfloat16),
    ((1, 6, 4, 37), (3, 2), jnp.float32),  # 6 positions, 37 channels
  ],
)
def test_max_pool_formulations_equal_max_pool(shape, window, dtype, pool):
  if pool == 'native' and dtype != jnp.float32:
    with pytest.raises(ValueError, match='float32'):
      conv.max_pool_native(jnp.ones(shape, dtype), window)
    return
  # Integers from a small range: many ties within windows, incl. all-zero windows
  # (as after a ReLU). The gradients must agree exactly, ties included.
  x = jax.random.randint(jax.random.key(0), shape, -1, 3).astype(dtype)
  x = jnp.maximum(x, 0)
  probe = jax.random.normal(
    jax.random.key(1),
    (shape[0],) + tuple(s // w for s, w in zip(shape[1:-1], window)) + shape[-1:],
  )

  def run(pool):
    loss = lambda x: jnp.sum(pool(x).astype(jnp.float32) * probe)
    return jax.jit(lambda x: (pool(x), jax.grad(loss)(x)))(x)

  got = run(lambda x: POOLS[pool](x, window))
  want = run(lambda x: nn.max_pool(x, window, strides=window, padding='VALID'))
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)


def test_native_max_pool_by_hand():
  # One 2 x 2 window per channel: the max, where it is (first in row-major order on a
  # tie), and a NaN anywhere in a window is its max, as with lax.max.
  x = np.array([[1, 3], [3, 2]], np.float32)[None, :, :, None]
  x = np.concatenate([x, np.zeros_like(x), x], axis=-1)
  x[0, 1, 0, 2] = np.nan
  y, index = native_kernels.max_pool(x, (2, 2))
  np.testing.assert_array_equal(y[0, 0, 0], [3, 0, np.nan])
  np.testing.assert_array_equal(index[0, 0, 0], [1, 0, 2])
  dx = native_kernels.max_pool_grad(jnp.full((1, 1, 1, 3), 5.0), index, (2, 2))
  want = np.zeros((1, 2, 2, 3), np.float32)
  want[0, 0, 1, 0] = want[0, 0, 0, 1] = want[0, 1, 0, 2] = 5.0
  np.testing.assert_array_equal(dx, want)


@pytest.mark.parametrize('pool', sorted(POOLS))
def test_max_pool_formulations_reject_a_partial_window(pool):
  with pytest.raises(ValueError, match='multiple of the window'):
    POOLS[pool](jnp.ones((1, 5, 4, 1)), (2, 2))


def test_other_convolutions_fall_back_to_xla():
  # Stride 2, dilation and feature groups are not rewritten: identical results.
  fn = conv.conv_general_dilated_fn(
    fold_depth=True, weight_grad='native', native_forward=True, pointwise_as_matmul=True
  )
  x = jax.random.normal(jax.random.key(0), (1, 4, 6, 6, 4))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 4))
  spec = lax.conv_dimension_numbers(x.shape, k.shape, ('NDHWC', 'DHWIO', 'NDHWC'))
  for kwargs in (
    dict(window_strides=(2, 2, 2), padding='SAME'),
    dict(window_strides=(1, 1, 1), padding='SAME', rhs_dilation=(2, 2, 2)),
    dict(window_strides=(1, 1, 1), padding='VALID'),
  ):
    np.testing.assert_array_equal(
      fn(x, k, dimension_numbers=spec, feature_group_count=2, **kwargs),
      lax.conv_general_dilated(
        x, k, dimension_numbers=spec, feature_group_count=2, **kwargs
      ),
    )


def test_bad_choices_are_value_errors():
  with pytest.raises(ValueError, match='weight_grad'):
    conv.conv2d_same(jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1)), weight_grad='gemm')
  with pytest.raises(ValueError, match="kernels='fft'"):
    models.UNet(num_classes=2, features=2, depth=1, kernels='fft').init(
      jax.random.key(0), jnp.ones((1, 4, 4, 1))
    )
  with pytest.raises(ValueError, match='native_forward'):
    policy.KernelPolicy(native_forward=(1, 2))
  with pytest.raises(ValueError, match='transpose_as_matmul'):
    policy.KernelPolicy(transpose_as_matmul='yes')


def test_policies_by_name_follow_the_backend():
  # 'xla': XLA's kernels, the transposed convolutions as products on every backend.
  assert policy.resolve('xla') == policy.XLA
  assert policy.XLA == policy.KernelPolicy(transpose_as_matmul=True)
  assert policy.resolve('native') == policy.CPU
  auto = policy.resolve('auto')
  on_cpu = jax.default_backend() == 'cpu'
  assert auto.transpose_as_matmul and auto.conv3d_as_2d is on_cpu
  native = on_cpu and native_kernels.cpu_is_measured()  # AVX-512F, or AVX2 and FMA
  assert auto.native_weight_grad == ((2, 3) if native else ())
  # True and False stand for both dimensionalities and neither.
  assert policy.CPU.replace(native_pool=False).native_pool == ()
  assert policy.XLA.replace(native_pool=True).native_pool == (2, 3)
  assert policy.XLA.conv_general_dilated() is None


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
def test_accelerators_get_xla_with_transposes_as_products(monkeypatch, backend):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert policy.resolve('auto') == policy.XLA
  assert not policy.resolve('auto').uses_native


def test_the_cpu_policy_is_unchanged():
  assert (
    policy.AUTO['cpu']
    == policy.CPU
    == policy.KernelPolicy(
      transpose_as_matmul=True,
      conv3d_as_2d=True,
      pointwise_as_matmul=True,
      native_weight_grad=(2, 3),
      native_forward=(2, 3),
      native_winograd=(2, 3),
      native_pool=(2, 3),
      upsample_as_stencil=(2,),  # 2D bilinear upsampling as a stencil (resize.py)
      narrow_as_matmul=(2,),  # the 8-wide 2D bottleneck as one product (patches)
    )
  )


def test_explicit_native_kernels_raise_where_they_cannot_build(monkeypatch):
  monkeypatch.setenv('UNET_JAX_NATIVE', '0')
  monkeypatch.setattr(native_kernels, '_state', {})
  with pytest.raises(native_kernels.NativeKernelError, match='UNET_JAX_NATIVE=0'):
    policy.resolve('native')
  assert not policy.resolve('auto').uses_native  # 'auto' falls back instead


ALL_ON = dict(transpose_as_matmul=True, conv3d_as_2d=True, pointwise_as_matmul=True)


@pytest.mark.parametrize(
  'weight_grad, native_forward, pooling',
  [
    ('xla', False, 'xla'),
    ('xla', True, 'native'),
    ('native', False, 'xla'),
    ('native', True, 'native'),
  ],
)
@pytest.mark.parametrize(
  'shape, kwargs',
  [
    ((2, 12, 20, 1), dict(upsample='transpose')),
    (
      (1, 4, 8, 12, 2),
      dict(
        upsample='bilinear', kernel_sizes=[(1, 3, 3), (3, 3, 3)], pool_sizes=[(1, 2, 2)]
      ),
    ),
    ((1, 4, 4, 8, 1), dict(upsample='transpose')),
  ],
)
def test_unet_with_switches_on_equals_off(
  shape, kwargs, weight_grad, native_forward, pooling
):
  plain = policy.KernelPolicy()  # nn.ConvTranspose, lax convolutions, nn.max_pool
  off = models.UNet(num_classes=3, features=4, depth=1, **kwargs, kernels=plain)
  kernels = policy.KernelPolicy(
    **ALL_ON,
    native_weight_grad=weight_grad == 'native',
    native_forward=native_forward,
    native_winograd=weight_grad == 'native',
    native_pool=pooling == 'native',
  )
  on = models.UNet(num_classes=3, features=4, depth=1, **kwargs, kernels=kernels)
  x = jax.random.normal(jax.random.key(0), shape)
  init = lambda m: (
    jax.jit(m.init)
    .lower(jax.random.key(1), x)
    .compile(compiler_options={'xla_backend_optimization_level': 0})(jax.random.key(1), x)
  )
  variables = init(off)
  on_variables = init(on)
  # Identical trees: names, shapes, dtypes and the initial values themselves.
  assert jax.tree.structure(on_variables) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, on_variables, variables)
  labels = jax.random.randint(jax.random.key(2), shape[:-1], 0, 3)

  def loss_and_grads(model):
    def loss(params):
      logits, _ = model.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      onehot = jax.nn.one_hot(labels, 3)
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables['params']
    )
    return value, logits, grads

  want, got = loss_and_grads(off), loss_and_grads(on)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=1e-4)
  flat_want = jax.tree_util.tree_leaves_with_path(want[2])
  flat_got = jax.tree_util.tree_leaves(got[2])
  for (path, w), g in zip(flat_want, flat_got):
    scale = float(jnp.abs(w).max()) + 1e-6
    np.testing.assert_allclose(
      g, w, atol=2e-4 * scale, rtol=2e-3, err_msg=jax.tree_util.keystr(path)
    )


def test_both_vector_widths_match_xla():
  # The kernels compute on 16-float vectors where the compiler targets AVX-512F and on
  # 8-float ones elsewhere, with register tiles sized for each. Either builds on any
  # x86-64 CPU (UNET_JAX_NATIVE_LANES), so both are checked here, whichever this CPU
  # is: the forward pass, the input gradient and the kernel gradient, direct and by
  # Winograd, with channel counts that leave every kind of remainder at either width.
  code = textwrap.dedent(
    """
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from unet_jax.ops import conv
    def plain(x, k):
      return conv.conv2d_same(x, k, weight_grad='xla')
    def check(x_shape, k_shape, **how):
      rng = np.random.RandomState(0)
      x = jnp.asarray(rng.randn(*x_shape), jnp.float32)
      k = jnp.asarray(rng.randn(*k_shape) / np.sqrt(np.prod(k_shape[:-1])), jnp.float32)
      p = jnp.asarray(rng.randn(*x_shape[:-1], k_shape[-1]), jnp.float32)
      def run(f):
        y, vjp = jax.vjp(f, x, k)
        return (y, *vjp(p))
      fast = functools.partial(conv.conv2d_same, weight_grad='native', **how)
      program = jax.jit(lambda x, k: run(fast)).lower(x, k).as_text()
      target = 'unet_jax_conv_winograd' if how['winograd'] else 'unet_jax_conv'
      assert program.count(target) >= 2, (x_shape, k_shape, how)  # not all XLA's
      got = run(fast)
      want = run(plain)
      for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(jnp.abs(w).max()))
    for shape in [((2, 9, 35, 20), (3, 3, 20, 40)), ((1, 6, 33, 40), (3, 3, 40, 21)),
                  ((1, 5, 40, 24), (3, 3, 24, 17))]:
      check(*shape, native_forward=True, winograd=False)
      check(*shape, native_forward=True, winograd=True)
    print('OK')
    """
  )
  for lanes in ('8', '16'):
    env = dict(os.environ, JAX_PLATFORMS='cpu', UNET_JAX_NATIVE_LANES=lanes)
    result = subprocess.run(
      [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith('OK'), (
      lanes,
      result.stderr[-3000:],
    )


def test_a_bad_vector_width_is_refused():
  env = dict(os.environ, JAX_PLATFORMS='cpu', UNET_JAX_NATIVE_LANES='4')
  result = subprocess.run(
    [sys.executable, '-c', 'import unet_jax.ops.native'],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert "UNET_JAX_NATIVE_LANES must be 8 or 16 (or unset); got '4'" in result.stderr


@pytest.mark.parametrize(
  'x_shape, k_shape, dtype',
  [
    ((2, 8, 8, 5), (3, 3, 5, 7), jnp.float32),  # the 2D bottleneck's shape
    ((2, 8, 8, 5), (3, 3, 5, 7), jnp.bfloat16),
    ((1, 3, 1, 4), (3, 3, 4, 2), jnp.float32),  # one column: taps fall outside
    ((2, 4, 6, 3), (2, 2, 3, 4), jnp.float32),  # an even kernel: pads (0, 1)
    ((1, 3, 5, 2), (1, 3, 2, 3), jnp.float32),  # 1 x 3
    ((2, 3, 4, 5, 3), (3, 3, 3, 3, 4), jnp.float32),  # 3D, 27 taps
    ((1, 1, 2, 3, 2), (3, 3, 3, 2, 2), jnp.float32),  # 3D, depth 1
  ],
)
def test_patches_match_xla(x_shape, k_shape, dtype):
  x, k, probe = _inputs(x_shape, k_shape, dtype)
  got = _value_and_grads(conv.conv_same_patches, x, k, probe)
  want = _value_and_grads(_plain, x, k, probe)
  assert got[0].dtype == dtype
  for g, w in zip(got, want):
    _assert_close(g, w, dtype)


def test_patches_by_hand():
  # A 1 x 3 image, one channel in and out, a 3 x 3 kernel of 1..9: each output
  # pixel sums the kernel's middle row against its zero-padded neighbours.
  x = jnp.array([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
  k = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)
  y = conv.conv_same_patches(x, k).reshape(3)
  # middle row (4, 5, 6): y0 = 5*1 + 6*2, y1 = 4*1 + 5*2 + 6*3, y2 = 4*2 + 5*3.
  np.testing.assert_array_equal(y, [17.0, 32.0, 23.0])


def test_narrow_convolutions_take_the_patches_under_the_cpu_policy():
  # Under the CPU policy an 8-wide 2D convolution is one product (no convolution in
  # its program); a 16-wide one is not (the Winograd kernels take it), nor is an
  # 8-wide 3D one.
  fn = policy.CPU.without_native().conv_general_dilated()
  spec = ('NHWC', 'HWIO', 'NHWC')

  def program(x_shape, k_shape, spec):
    x, k = jnp.zeros(x_shape), jnp.zeros(k_shape)
    f = lambda x, k: fn(x, k, (1,) * (x.ndim - 2), 'SAME', dimension_numbers=spec)
    return jax.jit(f).lower(x, k).as_text()

  assert 'convolution' not in program((2, 8, 8, 16), (3, 3, 16, 32), spec)
  assert 'dot_general' in program((2, 8, 8, 16), (3, 3, 16, 32), spec)
  assert 'convolution' in program((2, 16, 16, 16), (3, 3, 16, 32), spec)
  spec3 = ('NDHWC', 'DHWIO', 'NDHWC')
  assert 'convolution' in program((1, 8, 8, 8, 4), (3, 3, 3, 4, 4), spec3)
  # bfloat16 (measured in float32 only) keeps XLA's convolution.
  x, k = jnp.zeros((2, 8, 8, 16), jnp.bfloat16), jnp.zeros((3, 3, 16, 32), jnp.bfloat16)
  f = lambda x, k: fn(x, k, (1, 1), 'SAME', dimension_numbers=spec)
  assert 'convolution' in jax.jit(f).lower(x, k).as_text()
  assert policy.CPU.narrow_as_matmul == (2,) and policy.XLA.narrow_as_matmul == ()
