"""Tests for unet_jax.data.augment: image and mask stay aligned under every transform."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unet_jax.data import augment as augment_lib


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      'flip': False,
      'rot90': False,
      'scale': (1.0, 1.0),
      'intensity': 0.0,
      'elastic': 0.0,
    }
  )
  config.update(overrides)
  return config


def _blobs(shape, n, seed=0):
  """Labels with a few solid blobs in 0..2, [n, *shape] int32."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1)
  labels = np.zeros((n,) + shape, np.int32)
  for i in range(n):
    for cls in (1, 2, 1):
      centre = rng.uniform(0, 1, len(shape)) * np.asarray(shape)
      radius = rng.uniform(0.1, 0.25) * min(shape)
      labels[i][np.linalg.norm(grid - centre, axis=-1) < radius] = cls
  return labels


def _augment(config, image, label, seed=0):
  fn = jax.jit(lambda k, x, y: augment_lib.augment(k, x, y, config=config))
  out_image, out_label = fn(jax.random.key(seed), jnp.asarray(image), jnp.asarray(label))
  return np.asarray(out_image), np.asarray(out_label)


def _painted(label):
  """An image painted from its mask: one channel per class (one-hot)."""
  return np.eye(3, dtype=np.float32)[label]


ALL = dict(flip=True, rot90=True, scale=(0.7, 1.4), intensity=0.2, elastic=3.0)


@pytest.mark.parametrize('spatial', [(24, 24), (6, 16, 16)])
@pytest.mark.parametrize('overrides', [{}, ALL])
def test_shapes_and_dtypes(spatial, overrides):
  label = _blobs(spatial, 3)
  image = _painted(label)
  out_image, out_label = _augment(_config(**overrides), image, label)
  assert out_image.shape == image.shape and out_image.dtype == np.float32
  assert out_label.shape == label.shape and out_label.dtype == np.int32
  assert np.all(np.isfinite(out_image))
  assert set(np.unique(out_label)) <= {0, 1, 2}


def _dihedral_2d(x):
  """All 8 flips and rotations of the last two axes."""
  return [
    np.rot90(t, k, axes=(-2, -1)) for t in (x, np.swapaxes(x, -1, -2)) for k in range(4)
  ]


def test_flips_and_rotations_are_exact_dihedral_maps():
  label = _blobs((20, 20), 16)
  image = _painted(label)
  out_image, out_label = _augment(_config(flip=True, rot90=True), image, label)
  np.testing.assert_array_equal(
    out_image, _painted(out_label)
  )  # Painted mask == moved image.
  used = set()
  for i in range(16):
    matches = [
      j for j, t in enumerate(_dihedral_2d(label[i])) if np.array_equal(t, out_label[i])
    ]
    assert matches
    used.add(matches[0])
  assert len(used) >= 4  # Transforms differ between examples.


def test_rot90_alone_only_rotates():
  label = _blobs((16, 16), 12, seed=1)
  _, out_label = _augment(_config(rot90=True), _painted(label), label)
  for i in range(12):
    assert any(np.array_equal(np.rot90(label[i], k), out_label[i]) for k in range(4))


def test_rot90_skipped_for_non_square_plane():
  label = _blobs((12, 20), 6)
  _, out_label = _augment(_config(rot90=True), _painted(label), label)
  np.testing.assert_array_equal(out_label, label)


def test_flip_axes_limits_the_flips():
  label = _blobs((5, 12, 12), 16)
  _, every = _augment(_config(flip=True), _painted(label), label)
  _, in_plane = _augment(_config(flip=True, flip_axes=(1, 2)), _painted(label), label)
  depth_flips = 0
  for i in range(16):
    # The same random draw: the flips along H and W agree; none along D is left.
    if not np.array_equal(in_plane[i], every[i]):
      np.testing.assert_array_equal(in_plane[i], every[i][::-1])
      depth_flips += 1
  assert depth_flips >= 3  # About half of the examples drew a flip along D.


def test_3d_rotates_in_plane_only():
  label = _blobs((5, 12, 12), 8)
  out_image, out_label = _augment(_config(flip=True, rot90=True), _painted(label), label)
  np.testing.assert_array_equal(out_image, _painted(out_label))
  for i in range(8):
    candidates = [t for d in (label[i], label[i][::-1]) for t in _dihedral_2d(d)]
    assert any(np.array_equal(t, out_label[i]) for t in candidates)


@pytest.mark.parametrize('spatial', [(32, 32), (8, 24, 24)])
@pytest.mark.parametrize(
  'overrides', [dict(scale=(0.6, 1.6)), dict(elastic=4.0), dict(ALL, intensity=0.0)]
)
def test_interpolating_transforms_keep_mask_and_image_aligned(spatial, overrides):
  label = _blobs(spatial, 4)
  image = _painted(label)
  out_image, out_label = _augment(_config(**overrides), image, label)
  assert not np.array_equal(out_label, label)  # Something moved.
  # Where the linearly interpolated image is pure (one class channel is 1),
  # every source pixel it blends is of that class: the nearest-neighbour mask
  # must agree.
  pure = out_image.max(axis=-1) > 1 - 1e-5
  assert pure.mean() > 0.8
  np.testing.assert_array_equal(out_image.argmax(axis=-1)[pure], out_label[pure])
  # Anywhere, the mask's class is the nearest source pixel's, whose linear
  # weight is at least 2^-ndim.
  weight_of_label = np.take_along_axis(out_image, out_label[..., None], axis=-1)[..., 0]
  assert np.all(weight_of_label >= 0.5 ** len(spatial) - 1e-5)


def test_intensity_jitter_is_affine_per_channel_and_spares_the_mask():
  label = _blobs((16, 16), 4)
  image = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  out_image, out_label = _augment(_config(intensity=0.3), image, label)
  np.testing.assert_array_equal(out_label, label)
  for i, c in itertools.product(range(4), range(3)):
    slope, offset = np.polyfit(image[i, ..., c].ravel(), out_image[i, ..., c].ravel(), 1)
    np.testing.assert_allclose(
      out_image[i, ..., c], slope * image[i, ..., c] + offset, atol=1e-4
    )
    assert 0.7 - 1e-6 <= slope <= 1.3 + 1e-6 and abs(offset) <= 0.3 + 1e-6
  assert not np.allclose(out_image, image)


def test_each_example_gets_its_own_transform():
  label = np.repeat(_blobs((24, 24), 1), 6, axis=0)
  _, out_label = _augment(_config(**ALL), _painted(label), label)
  assert len({out_label[i].tobytes() for i in range(6)}) == 6


def test_deterministic_and_jit_matches_eager():
  label = _blobs((16, 16), 3)
  image, label = jnp.asarray(_painted(label)), jnp.asarray(label)
  config = _config(**ALL)
  fn = jax.jit(lambda k, x, y: augment_lib.augment(k, x, y, config=config))
  a, b, c = (fn(jax.random.key(seed), image, label) for seed in (7, 7, 8))
  eager = augment_lib.augment(jax.random.key(7), image, label, config=config)
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(a[1], eager[1])
  np.testing.assert_allclose(a[0], eager[0], atol=1e-5)
  assert not np.array_equal(a[1], c[1])


def test_off_is_identity():
  label = _blobs((16, 16), 2)
  image = _painted(label)
  out_image, out_label = _augment(_config(), image, label)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)


@pytest.mark.parametrize(
  'image_shape, label_shape, overrides, message',
  [
    ((2, 8, 8, 1), (2, 8, 9), {}, 'augment expects'),
    ((2, 8, 1), (2, 8), {}, 'augment expects'),
    ((2, 8, 8, 1), (2, 8, 8), {'scale': (1.2, 0.8)}, 'scale'),
    ((2, 8, 8, 1), (2, 8, 8), {'elastic': -1.0}, 'elastic'),
  ],
)
def test_bad_inputs_raise(image_shape, label_shape, overrides, message):
  with pytest.raises(ValueError, match=message):
    augment_lib.augment(
      jax.random.key(0),
      jnp.zeros(image_shape),
      jnp.zeros(label_shape, jnp.int32),
      config=_config(**overrides),
    )
