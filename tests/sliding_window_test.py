"""Tests for unet_jax.inference.sliding_window: positions, weights, stitching, TTA."""

import functools
import itertools
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax.inference import sliding_window as sw


def random_variables(model, x, seed=0):
  """He-normal kernels, small biases, unit BatchNorm statistics.

  `model.init` would do, but compiling its random initialisers takes XLA:CPU far
  longer than the whole test; the shapes come from tracing it instead.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', '')
    if name in ('var', 'scale'):
      return np.ones(leaf.shape, leaf.dtype)
    if name == 'mean':
      return np.zeros(leaf.shape, leaf.dtype)
    if name == 'bias':
      return 0.1 * rng.normal(size=leaf.shape).astype(leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _unet(ndim, norm='instance', classes=3):
  model = models.UNet(num_classes=classes, features=4, depth=2, norm=norm)
  variables = random_variables(model, jnp.zeros((1,) + (16,) * ndim + (1,)))
  return model, variables, jax.jit(lambda x: model.apply(variables, x, train=False))


def _image(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _per_pixel(x):
  """A 1x1 'network': logits are affine in the channels, pixel by pixel."""
  w = jnp.array([[1.0, -2.0, 0.5]])
  return x @ w + jnp.array([0.1, 0.2, -0.3])


# --- patch positions -------------------------------------------------------------


@pytest.mark.parametrize(
  'size,patch,overlap,expected',
  [
    (100, 64, 0.5, (0, 32, 36)),  # the last patch flush with the border
    (64, 64, 0.5, (0,)),
    (65, 64, 0.5, (0, 1)),
    (128, 64, 0.5, (0, 32, 64)),
    (128, 64, 0.0, (0, 64)),
    (100, 64, 0.0, (0, 36)),
    (100, 64, 0.75, (0, 16, 32, 36)),
    (10, 4, 0.9, (0, 1, 2, 3, 4, 5, 6)),  # the step never drops below 1
  ],
)
def test_axis_starts_by_hand(size, patch, overlap, expected):
  assert sw.axis_starts(size, patch, overlap) == expected


def test_patch_positions_are_the_product_of_axis_starts():
  assert sw.patch_positions((100, 64), 64, 0.5) == [(0, 0), (32, 0), (36, 0)]
  assert sw.patch_positions((80, 96, 64), (64, 64, 32), 0.5) == list(
    itertools.product((0, 16), (0, 32), (0, 16, 32))
  )


@pytest.mark.parametrize('overlap', [0.0, 0.25, 0.5, 0.6])
def test_positions_cover_every_pixel_and_stay_inside(overlap):
  for size in range(16, 90, 7):
    patch = 16
    starts = sw.axis_starts(size, patch, overlap)
    covered = np.zeros(size, int)
    for s in starts:
      covered[s : s + patch] += 1
    assert covered.min() >= 1 and starts[-1] == size - patch
    assert all(0 < b - a <= patch * (1 - overlap) for a, b in zip(starts, starts[1:]))


# --- the Gaussian importance map -------------------------------------------------


def test_gaussian_map_by_hand():
  g = sw.gaussian_importance_map((8,))  # sigma 1, centre 3.5
  assert g.dtype == np.float32 and g.shape == (8,)
  assert g[3] == g[4] == 1.0
  np.testing.assert_allclose(g[0] / g[3], np.exp(-(3.5**2 - 0.5**2) / 2), rtol=1e-6)
  np.testing.assert_allclose(g, g[::-1])


def test_gaussian_map_3d_is_separable_symmetric_and_positive():
  g = sw.gaussian_importance_map((8, 16, 12))
  assert g.shape == (8, 16, 12) and g.max() == 1.0 and g.min() > 0
  for axis in range(3):
    np.testing.assert_allclose(g, np.flip(g, axis))
  outer = np.multiply.outer(
    np.multiply.outer(sw.gaussian_importance_map((8,)), sw.gaussian_importance_map((16,))),
    sw.gaussian_importance_map((12,)),
  )
  np.testing.assert_allclose(g, outer, rtol=1e-6)
  # The corner against the peak: for even p the peak pixels are 1/2 off the centre
  # (p - 1) / 2, the corner (p - 1) / 2 off it; sigma = p / 8.
  np.testing.assert_allclose(
    g[0, 0, 0],
    np.prod(
      [np.exp(-(((p - 1) / 2) ** 2 - 0.25) / (2 * (p / 8) ** 2)) for p in (8, 16, 12)]
    ),
    rtol=1e-5,
  )


# --- stitching -------------------------------------------------------------------


@pytest.mark.parametrize(
  'ndim,shape', [(2, (32, 32, 1)), (3, (16, 16, 16, 1))], ids=['2d', '3d']
)
@pytest.mark.parametrize('mode', sw.MODES)
def test_one_patch_covering_the_image_equals_direct_prediction(ndim, shape, mode):
  _, _, apply_fn = _unet(ndim)
  image = _image(shape)
  out = sw.sliding_window_predict(
    apply_fn, image, patch_size=shape[:-1], mode=mode, divisor=4
  )
  direct = np.asarray(apply_fn(image[None]))[0]
  assert out.shape == direct.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-5)


def test_constant_model_gives_a_seamless_result_with_gaussian_weights():
  constant = lambda x: jnp.full(x.shape[:-1] + (2,), 3.25, jnp.float32)
  out = sw.sliding_window_predict(
    constant, _image((70, 90, 1)), patch_size=32, overlap=0.5, mode='gaussian'
  )
  np.testing.assert_allclose(out, 3.25, rtol=1e-6)


@pytest.mark.parametrize('mode', sw.MODES)
@pytest.mark.parametrize(
  'shape,patch', [((70, 90, 1), 32), ((20, 40, 33, 1), 16)], ids=['2d', '3d']
)
def test_per_pixel_model_is_stitched_exactly(mode, shape, patch):
  """Every pixel's blend of identical predictions is that prediction."""
  image = _image(shape)
  out = sw.sliding_window_predict(
    _per_pixel, image, patch_size=patch, overlap=0.5, mode=mode, batch_size=3
  )
  np.testing.assert_allclose(out, np.asarray(_per_pixel(image)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(45, 37, 1), (20, 10, 1), (7, 64, 1)])
@pytest.mark.parametrize('padding_mode', sw.PADDING_MODES)
def test_odd_sizes_are_padded_and_cropped_back(shape, padding_mode):
  _, _, apply_fn = _unet(2)
  image = _image(shape)
  out = sw.sliding_window_predict(
    apply_fn, image, patch_size=32, divisor=4, padding_mode=padding_mode
  )
  assert out.shape == shape[:-1] + (3,) and np.isfinite(out).all()
  if shape[0] <= 32 and shape[1] <= 32:
    # One patch: the direct prediction of the padded image, cropped. The padding is
    # split evenly, the odd pixel after.
    pads = [((32 - s) // 2, 32 - s - (32 - s) // 2) for s in shape[:-1]]
    padded = np.pad(image, pads + [(0, 0)], mode=padding_mode)
    direct = np.asarray(apply_fn(padded[None]))[0]
    crop = direct[pads[0][0] : pads[0][0] + shape[0], pads[1][0] : pads[1][0] + shape[1]]
    np.testing.assert_allclose(out, crop, rtol=1e-5, atol=1e-5)


def test_patch_size_none_pads_the_whole_image_to_the_divisor():
  _, _, apply_fn = _unet(3)
  image = _image((10, 13, 16, 1))
  out = sw.sliding_window_predict(apply_fn, image, patch_size=None, divisor=4)
  padded = np.pad(image, [(1, 1), (1, 2), (0, 0), (0, 0)], mode='reflect')
  direct = np.asarray(apply_fn(padded[None]))[0][1:11, 1:14]
  np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-5)


def test_a_unet_over_many_patches_keeps_shape_and_agrees_inside():
  _, _, apply_fn = _unet(2, norm='batch')
  image = _image((80, 48, 1))
  out = sw.sliding_window_predict(apply_fn, image, patch_size=32, overlap=0.5, batch_size=2)
  assert out.shape == (80, 48, 3) and np.isfinite(out).all()
  # Translation equivariance is broken only near patch borders: far from them, the
  # blend is close to the whole-image prediction.
  direct = np.asarray(apply_fn(image[None]))[0]
  assert np.abs(out - direct).mean() < 0.25 * np.abs(direct).mean()


def test_batch_size_does_not_change_the_result():
  _, _, apply_fn = _unet(3)
  image = _image((24, 20, 28, 1))
  one = sw.sliding_window_predict(apply_fn, image, patch_size=16, batch_size=1)
  five = sw.sliding_window_predict(apply_fn, image, patch_size=16, batch_size=5)
  np.testing.assert_allclose(one, five, rtol=1e-5, atol=1e-5)


def test_one_compilation_for_all_batches_and_images():
  traces = []

  def counting(x):
    traces.append(x.shape)
    return _per_pixel(x)

  for shape in [(70, 90, 1), (50, 33, 1)]:  # 12 and 4 patches, batches of 5
    image = _image(shape)
    out = sw.sliding_window_predict(counting, image, patch_size=32, batch_size=5)
    np.testing.assert_allclose(out, np.asarray(_per_pixel(image)), rtol=1e-5, atol=1e-5)
  assert traces == [(5, 32, 32, 1)]


def test_accepts_a_jax_array():
  image = _image((40, 40, 1))
  out = sw.sliding_window_predict(_per_pixel, jnp.asarray(image), patch_size=32)
  np.testing.assert_allclose(out, np.asarray(_per_pixel(image)), rtol=1e-5, atol=1e-5)


# --- test-time augmentation ------------------------------------------------------


@pytest.mark.parametrize('shape', [(40, 52, 1), (20, 24, 28, 1)], ids=['2d', '3d'])
def test_flip_tta_on_a_flip_equivariant_model_changes_nothing(shape):
  image = _image(shape)
  kwargs = dict(patch_size=16, overlap=0.5)
  plain = sw.sliding_window_predict(_per_pixel, image, **kwargs)
  tta = sw.sliding_window_predict(_per_pixel, image, flip_tta=True, **kwargs)
  np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-5)


def test_flip_tta_on_a_symmetric_conv_changes_nothing():
  kernel = jnp.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])[..., None, None]
  conv = lambda x: jax.lax.conv_general_dilated(
    x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  image = _image((48, 40, 1))
  plain = sw.sliding_window_predict(conv, image, patch_size=16)
  tta = sw.sliding_window_predict(conv, image, patch_size=16, flip_tta=True)
  np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('ndim', [2, 3])
def test_flip_tta_averages_all_flips_flipped_back(ndim):
  """A model that is not flip-equivariant: a running sum along the first axis."""
  cumsum = lambda x: jnp.cumsum(x, axis=1)
  image = _image((8,) * ndim + (1,))
  out = sw.sliding_window_predict(cumsum, image, patch_size=8, flip_tta=True)
  expected = np.zeros_like(image)
  subsets = [
    axes for r in range(ndim + 1) for axes in itertools.combinations(range(ndim), r)
  ]
  assert len(subsets) == 2**ndim
  for axes in subsets:
    expected += np.flip(np.cumsum(np.flip(image, axes), axis=0), axes)
  np.testing.assert_allclose(out, expected / 2**ndim, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, np.cumsum(image, axis=0), atol=1e-3)


@pytest.mark.parametrize('shape', [(512, 384, 1), (500, 20, 2)], ids=['unpadded', 'padded'])
def test_host_memory_is_the_documented_buffers(shape):
  """Peak numpy allocations: 4 (C + K + 1) bytes a padded pixel while blending, or
  4 (C + K) a padded pixel + 4 K a pixel while cropping a padded image (the weight
  map is freed by then), whichever is larger (the docstring's bound)."""
  three = lambda x: x[..., :1] @ jnp.array([[1.0, 2.0, 3.0]])
  image = _image(shape)
  sw.sliding_window_predict(three, image[:40, :20], patch_size=32)  # compile
  padded = shape[0] * max(shape[1], 32)
  c, k = (0 if shape[1] >= 32 else shape[2]), 3  # no padded copy of the image
  blending = 4 * (c + k + 1) * padded
  cropping = 4 * (c + k) * padded + 4 * k * shape[0] * shape[1] * (shape[1] < 32)
  bound = max(blending, cropping)
  tracemalloc.start()
  try:
    out = sw.sliding_window_predict(
      three, image, patch_size=32, batch_size=4, output='probabilities'
    )
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert out.shape == shape[:-1] + (3,)
  assert bound <= peak <= 1.1 * bound + 2**18, (peak, bound)


# --- outputs ---------------------------------------------------------------------


def test_probabilities_are_the_softmax_of_the_logits():
  image = _image((40, 40, 1))
  logits = sw.sliding_window_predict(_per_pixel, image, patch_size=32)
  probs = sw.sliding_window_predict(
    _per_pixel, image, patch_size=32, output='probabilities'
  )
  e = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_one_logit_gives_a_sigmoid():
  one = lambda x: 2 * x
  image = _image((40, 40, 1))
  probs = sw.sliding_window_predict(one, image, patch_size=32, output='probabilities')
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-2 * image)), rtol=1e-5)


# --- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(image=np.zeros((32, 32))), r'rank 2'),
    (dict(image=np.zeros((1, 8, 32, 32, 1))), r'rank 5'),
    (dict(patch_size=(32, 32, 32)), r'3 entries, but the image has 2'),
    (dict(patch_size=(30, 32), divisor=4), r'not a multiple of divisor'),
    (dict(patch_size=0), r'positive integers'),
    (dict(divisor=(4, 4, 4)), r'divisor'),
    (dict(overlap=1.0), r'overlap=1.0 must be in \[0, 1\)'),
    (dict(overlap=-0.1), r'overlap'),
    (dict(mode='median'), r"mode='median' is not one of"),
    (dict(padding_mode='wrap'), r'padding_mode'),
    (dict(output='labels'), r'output'),
    (dict(batch_size=0), r'batch_size'),
    (dict(apply_fn=lambda x: x[:, ::2]), r'apply_fn must map patches'),
    (dict(apply_fn=None), r'not callable'),
  ],
)
def test_bad_input(kwargs, match):
  args = dict(apply_fn=_per_pixel, image=np.zeros((40, 40, 1), np.float32), patch_size=32)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sw.sliding_window_predict(args.pop('apply_fn'), args.pop('image'), **args)


def test_helpers_reject_bad_input():
  with pytest.raises(ValueError, match='pad the image first'):
    sw.axis_starts(10, 16, 0.5)
  with pytest.raises(ValueError, match='overlap'):
    sw.patch_positions((64, 64), 32, 1.5)
  with pytest.raises(ValueError, match='patch_size'):
    sw.gaussian_importance_map((0, 8))


@pytest.mark.parametrize('flip_tta', [False, True])
def test_an_already_compiled_apply_fn_gives_the_same_result(flip_tta):
  """jit_apply=False: apply_fn takes and returns host arrays (the trainer's runner)."""
  cumsum = lambda x: jnp.cumsum(x, axis=1) * 0.5 + x[..., :1]
  compiled = jax.jit(cumsum)
  calls = []

  def on_host(batch):
    assert isinstance(batch, np.ndarray)
    calls.append(batch.shape)
    return np.asarray(compiled(batch))

  image = _image((30, 21, 2))
  traced = sw.sliding_window_predict(
    cumsum, image, patch_size=16, flip_tta=flip_tta, batch_size=3
  )
  host = sw.sliding_window_predict(
    on_host, image, patch_size=16, flip_tta=flip_tta, batch_size=3, jit_apply=False
  )
  np.testing.assert_allclose(host, traced, rtol=1e-5, atol=1e-5)
  positions = len(sw.patch_positions((30, 21), 16, 0.5))
  assert len(calls) == -(-positions // 3) * (4 if flip_tta else 1)
  assert set(calls) == {(3, 16, 16, 2)}
