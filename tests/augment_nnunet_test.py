"""Tests for nnU-Net's transforms in unet_jax.data.augment: rotation, scale with a
probability, noise, blur, brightness, contrast, low resolution and gamma."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unet_jax import config as config_lib
from unet_jax import losses
from unet_jax import models
from unet_jax.data import augment as augment_lib
from unet_jax.train import steps

OFF = dict(flip=False, rot90=False)
# Each new transform alone, at probability 1 (blur and low resolution: every channel).
ALONE = {
  'rotation': dict(rotation_p=1.0, rotation=(-180.0, 180.0)),
  'noise': dict(noise_p=1.0),
  'blur': dict(blur_p=1.0, blur_channel_p=1.0),
  'brightness': dict(brightness_p=1.0),
  'contrast': dict(contrast_p=1.0),
  'lowres': dict(lowres_p=1.0, lowres_channel_p=1.0),
  'gamma': dict(gamma_p=1.0),
  'gamma_inverted': dict(gamma_inverted_p=1.0),
  'scale': dict(scale=(0.7, 1.4), scale_p=1.0),
}
INTENSITY = ('noise', 'blur', 'brightness', 'contrast', 'lowres', 'gamma', 'gamma_inverted')
FULL = dict(
  rotation_p=0.2,
  rotation=(-180.0, 180.0),
  scale=(0.7, 1.4),
  scale_p=0.2,
  noise_p=0.1,
  blur_p=0.2,
  brightness_p=0.15,
  contrast_p=0.15,
  lowres_p=0.25,
  gamma_p=0.3,
  gamma_inverted_p=0.1,
)


@functools.lru_cache(maxsize=None)
def _jitted(opts: config_lib.AugmentOptions):
  return jax.jit(functools.partial(augment_lib.augment, config=opts))


def _run(options, image, label, seed=0):
  opts = config_lib.AugmentOptions(**{**OFF, **options})
  out_image, out_label = _jitted(opts)(
    jax.random.key(seed), jnp.asarray(image), jnp.asarray(label)
  )
  return np.asarray(out_image), np.asarray(out_label)


def _data(spatial, n=4, channels=2, seed=0):
  """A smooth positive image and a label with three classes and an ignore value."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in spatial], indexing='ij'))
  image = np.stack(
    [
      np.stack(
        [1 + np.sin(3 * grid.sum(0) + rng.uniform(0, 6)) for _ in range(channels)], -1
      )
      + 0.1 * rng.normal(size=spatial + (channels,))
      for _ in range(n)
    ]
  ).astype(np.float32)
  label = rng.integers(0, 3, size=(n,) + spatial).astype(np.int32)
  label[:, : spatial[0] // 4] = 255  # An ignore value.
  return image, label


@pytest.mark.parametrize(
  'name, spatial',
  [(name, (16, 16)) for name in sorted(ALONE)]
  + [(name, (4, 12, 12)) for name in ('rotation', 'blur', 'lowres', 'scale')],
)
def test_each_transform_at_p1_changes_the_image_and_is_deterministic(name, spatial):
  image, label = _data(spatial)
  out_image, out_label = _run(ALONE[name], image, label)
  again_image, again_label = _run(ALONE[name], image, label)
  np.testing.assert_array_equal(out_image, again_image)  # The same key, the same output.
  np.testing.assert_array_equal(out_label, again_label)
  assert out_image.shape == image.shape and out_image.dtype == np.float32
  assert np.all(np.isfinite(out_image))
  assert not np.allclose(out_image, image)  # Probability 1 changes the image.
  other, _ = _run(ALONE[name], image, label, seed=1)
  assert not np.array_equal(other, out_image)  # Another key, another draw.
  if name in INTENSITY:
    np.testing.assert_array_equal(out_label, label)  # Intensity: labels untouched.
  else:
    assert set(np.unique(out_label)) <= {0, 1, 2, 255}  # Nearest: no new values.
    assert 255 in out_label  # The ignore value survives.


@pytest.mark.parametrize('name', sorted(ALONE))
def test_probability_zero_is_the_identity(name):
  image, label = _data((16, 16))
  options = {k: (0.0 if k.endswith('_p') else v) for k, v in ALONE[name].items()}
  out_image, out_label = _run(options, image, label)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)


def test_the_default_options_augment_as_before():
  # With the defaults (flips and rot90 on, every new transform off) and key 0, these
  # 8 examples get the dihedral maps (np.rot90(x, k) for index k, of x.T for 4 + k)
  # that the augmentation before the new transforms gave them (main at 7058da8).
  n = 20
  label = np.arange(n * n, dtype=np.int32).reshape(1, n, n).repeat(8, 0)
  image = label[..., None].astype(np.float32)
  opts = config_lib.AugmentOptions()
  out_image, out_label = jax.jit(lambda k, x, y: augment_lib.augment(k, x, y, config=opts))(
    jax.random.key(0), image, label
  )
  for i, index in enumerate([3, 7, 6, 1, 3, 2, 3, 2]):
    x = label[0] if index < 4 else label[0].T
    np.testing.assert_array_equal(out_label[i], np.rot90(x, index % 4))
    np.testing.assert_array_equal(out_image[i, ..., 0], np.rot90(x, index % 4))
  # The new options' ranges do nothing while their probabilities are 0.
  moved = dict(
    rotation=(10.0, 20.0), noise_std=(1.0, 2.0), gamma=(2.0, 3.0), lowres=(0.3, 0.4)
  )
  same = config_lib.AugmentOptions(**moved, scale=(0.8, 1.2), intensity=0.2, elastic=2.0)
  base = config_lib.AugmentOptions(scale=(0.8, 1.2), intensity=0.2, elastic=2.0)
  a = _jitted(same)(jax.random.key(5), image, label)
  b = _jitted(base)(jax.random.key(5), image, label)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_a_90_degree_rotation_is_rot90_for_image_and_label():
  image, label = _data((12, 12))
  out_image, out_label = _run(dict(rotation_p=1.0, rotation=(90.0, 90.0)), image, label)
  for i in range(len(label)):
    np.testing.assert_array_equal(out_label[i], np.rot90(label[i]))
    # cos(pi / 2) is not exactly 0 in float32: the image is rot90's to 1e-5.
    np.testing.assert_allclose(out_image[i], np.rot90(image[i]), atol=1e-5)


def test_a_rotation_of_a_constant_is_the_constant():
  image = np.full((4, 9, 15, 1), 3.5, np.float32)
  label = np.ones((4, 9, 15), np.int32)
  out_image, out_label = _run(ALONE['rotation'], image, label)
  np.testing.assert_allclose(out_image, 3.5, rtol=1e-6)
  np.testing.assert_array_equal(out_label, label)


def test_rotation_keeps_image_and_label_aligned():
  # The image is the one-hot of the label: after a rotation, where the linearly
  # sampled image is pure (a flat region), the nearest-sampled label agrees.
  rng = np.random.default_rng(0)
  label = np.zeros((6, 24, 24), np.int32)
  label[:, 4:14, 6:20] = 1
  label[:, 15:21, 3:12] = 2
  label = np.stack([np.roll(x, rng.integers(-3, 4), axis=1) for x in label])
  image = np.eye(3, dtype=np.float32)[label]
  out_image, out_label = _run(ALONE['rotation'], image, label)
  pure = out_image.max(-1) > 1 - 1e-5
  assert pure.mean() > 0.7 and not np.array_equal(out_label, label)
  np.testing.assert_array_equal(out_image.argmax(-1)[pure], out_label[pure])


def test_in_plane_rotation_of_3d_keeps_every_slice_in_its_place():
  # rotation_axes=(0,): about D only, so each D slice is rotated within itself:
  # the label's profile along D (the voxels of each class per slice) is unchanged.
  image, label = _data((5, 12, 12))
  label[:, :2] = 255
  label[:, 2:] = np.arange(3)[:, None, None]  # Slices 2, 3, 4 hold class 0, 1, 2.
  options = dict(rotation_p=1.0, rotation=(-180.0, 180.0), rotation_axes=(0,))
  _, out_label = _run(options, image, label)
  np.testing.assert_array_equal(out_label, label)
  # About every axis, the same volume's slices mix.
  _, mixed = _run(dict(options, rotation_axes=()), image, label)
  assert not np.array_equal(mixed, label)


def test_brightness_multiplies_by_a_factor_in_range():
  image, label = _data((10, 10), n=16)
  out, _ = _run(dict(brightness_p=1.0, brightness=(0.75, 1.25)), image, label)
  factor = (out / image).reshape(16, -1, 2)
  np.testing.assert_allclose(factor - factor[:, :1], 0, atol=1e-5)  # One per channel.
  factor = factor[:, 0]
  assert np.all((0.75 <= factor) & (factor <= 1.25))
  assert (factor < 1).any() and (factor > 1).any()  # Both sides of 1 are drawn.


def test_contrast_scales_around_the_mean_and_clips_to_the_range():
  image, label = _data((10, 10), n=16)
  out, _ = _run(dict(contrast_p=1.0, contrast=(0.75, 1.25)), image, label)
  for i in range(16):
    for c in range(2):
      x, y = image[i, ..., c], out[i, ..., c]
      mean = x.mean()
      ratio = ((y - mean) / (x - mean))[np.abs(x - mean) > 0.1]
      inside = (y > x.min() + 1e-6) & (y < x.max() - 1e-6)
      ratio_inside = ((y - mean) / (x - mean))[inside & (np.abs(x - mean) > 0.1)]
      factor = np.median(ratio)
      assert 0.75 - 1e-5 <= factor <= 1.25 + 1e-5
      np.testing.assert_allclose(ratio_inside, factor, rtol=1e-3)
      assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6
      if factor <= 1:  # No clipping: the mean is preserved.
        assert y.mean() == pytest.approx(mean, abs=1e-5)


def test_gamma_one_is_the_identity_and_others_keep_mean_and_std():
  image, label = _data((10, 10))
  for p in ('gamma_p', 'gamma_inverted_p'):
    out, _ = _run({p: 1.0, 'gamma': (1.0, 1.0)}, image, label)
    np.testing.assert_allclose(out, image, atol=1e-5)
    out, _ = _run({p: 1.0}, image, label)
    np.testing.assert_allclose(out.mean((1, 2)), image.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(out.std((1, 2)), image.std((1, 2)), rtol=1e-4)
    assert not np.allclose(out, image, atol=1e-3)


def test_gamma_by_hand():
  # One channel [0, 1, 2, 3] with gamma 2, keeping mean and std: the rescaled
  # powers [0, 1/9, 4/9, 1] are moved back to mean 1.5 and std sqrt(1.25).
  image = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)
  label = np.zeros((1, 2, 2), np.int32)
  y = np.array([0, 1 / 9, 4 / 9, 1.0])
  expected = (y - y.mean()) / y.std() * np.sqrt(1.25) + 1.5
  out, _ = _run(dict(gamma_p=1.0, gamma=(2.0, 2.0)), image, label)
  np.testing.assert_allclose(out.ravel(), expected, rtol=1e-5)
  # Inverted: -x = [0, -1, -2, -3] rescales to [1, 2/3, 1/3, 0]; squared, moved
  # back to the mean -1.5 and std sqrt(1.25) of -x, then negated.
  y_inv = np.array([1.0, 4 / 9, 1 / 9, 0.0])
  expected_inv = -((y_inv - y_inv.mean()) / y_inv.std() * np.sqrt(1.25) - 1.5)
  out, _ = _run(dict(gamma_inverted_p=1.0, gamma=(2.0, 2.0)), image, label)
  np.testing.assert_allclose(out.ravel(), expected_inv, rtol=1e-5)


def test_noise_has_the_requested_standard_deviation():
  image = np.zeros((2, 64, 64, 2), np.float32)
  label = np.zeros((2, 64, 64), np.int32)
  out, _ = _run(dict(noise_p=1.0, noise_std=(0.3, 0.3)), image, label)
  assert out.std() == pytest.approx(0.3, rel=0.05)
  assert abs(out.mean()) < 0.02
  np.testing.assert_array_equal(out[..., 0], out[..., 1])  # One field for all channels.


@pytest.mark.parametrize('spatial', [(15, 17), (9, 11, 13)])
def test_blur_keeps_a_constant_and_the_mass_of_a_delta(spatial):
  constant = np.full((3,) + spatial + (2,), 2.0, np.float32)
  label = np.zeros((3,) + spatial, np.int32)
  out, _ = _run(ALONE['blur'], constant, label)
  np.testing.assert_allclose(out, 2.0, rtol=1e-5)
  delta = np.zeros_like(constant)
  delta[(slice(None),) + tuple(s // 2 for s in spatial)] = 1.0
  out, _ = _run(ALONE['blur'], delta, label)
  np.testing.assert_allclose(out.sum(tuple(range(1, len(spatial) + 1))), 1.0, rtol=1e-5)
  centre = out[(slice(None),) + tuple(s // 2 for s in spatial)]
  assert np.all(centre < 0.7) and np.all(out >= 0)  # Spread out, to every side.


def test_blur_by_hand_with_sigma_fixed():
  # A delta blurred with sigma 1: the 1D profile along each axis is
  # exp(-k^2 / 2) / sum, k = -3..3.
  image = np.zeros((1, 15, 15, 1), np.float32)
  image[0, 7, 7, 0] = 1.0
  label = np.zeros((1, 15, 15), np.int32)
  out, _ = _run(dict(blur_p=1.0, blur_channel_p=1.0, blur_sigma=(1.0, 1.0)), image, label)
  k = np.arange(-3, 4)
  w = np.exp(-0.5 * k**2)
  w /= w.sum()
  np.testing.assert_allclose(out[0, 4:11, 4:11, 0], np.outer(w, w), rtol=1e-5, atol=1e-7)


def test_lowres_keeps_a_constant_and_makes_blocks():
  constant = np.full((3, 16, 16, 2), -1.5, np.float32)
  label = np.zeros((3, 16, 16), np.int32)
  out, _ = _run(ALONE['lowres'], constant, label)
  np.testing.assert_allclose(out, -1.5, rtol=1e-6)
  # Factor 0.5 exactly: 16 -> 8 pixels (every other one, nearest), then linear back.
  ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[:, None, None], (16, 16, 1))
  image = np.broadcast_to(ramp, (1, 16, 16, 1)).copy()
  out, _ = _run(
    dict(lowres_p=1.0, lowres_channel_p=1.0, lowres=(0.5, 0.5)), image, label[:1]
  )
  low = np.arange(8) * 2 + 1.0  # 'nearest-exact': low-res pixel j is input 2 j + 1.
  u = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, None)
  lower = np.floor(u).astype(int)
  upper = np.minimum(lower + 1, 7)
  expected = (1 - (u - lower)) * low[lower] + (u - lower) * low[upper]
  np.testing.assert_allclose(out[0, :, 3, 0], expected, rtol=1e-6)


def test_lowres_axes_leaves_the_other_axes_alone():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 6, 12, 12, 1)).astype(np.float32)
  label = np.zeros((2, 6, 12, 12), np.int32)
  options = dict(lowres_p=1.0, lowres_channel_p=1.0, lowres=(0.5, 0.5), lowres_axes=(0,))
  out, _ = _run(options, image, label)
  # Along D only, 6 -> 3 pixels (inputs 1, 3, 5): output 0 is input 1 and output 5
  # is input 5, each (H, W) position on its own; output 1 is 0.75 x1 + 0.25 x3.
  np.testing.assert_allclose(out[:, 0], image[:, 1], rtol=1e-6)
  np.testing.assert_allclose(out[:, 5], image[:, 5], rtol=1e-6)
  np.testing.assert_allclose(out[:, 1], 0.75 * image[:, 1] + 0.25 * image[:, 3], atol=1e-6)


def test_full_set_in_2d_and_3d_under_vmap():
  for spatial in ((16, 16), (4, 12, 12)):
    image, label = _data(spatial, n=8)
    out_image, out_label = _run(FULL, image, label)
    assert np.all(np.isfinite(out_image)) and set(np.unique(out_label)) <= {0, 1, 2, 255}
    changed = [not np.array_equal(out_image[i], image[i]) for i in range(8)]
    assert 0 < sum(changed)  # Some examples drew a transform.


@pytest.mark.parametrize(
  'overrides, field',
  [
    (dict(noise_p=1.5), 'noise_p'),
    (dict(rotation_p=-0.1), 'rotation_p'),
    (dict(blur_channel_p=float('nan')), 'blur_channel_p'),
    (dict(gamma=(1.5, 0.7)), 'gamma'),
    (dict(gamma=(0.0, 1.5)), 'gamma'),
    (dict(lowres=(0.5, 1.2)), 'lowres'),
    (dict(blur_sigma=(0.0, 1.0)), 'blur_sigma'),
    (dict(noise_std=(-0.1, 0.1)), 'noise_std'),
    (dict(brightness=(0.0, 1.0)), 'brightness'),
    (dict(contrast=(1.2,)), 'contrast'),
    (dict(rotation=(-200.0, 0.0)), 'rotation'),
    (dict(rotation_axes=(3,)), 'rotation_axes'),
    (dict(lowres_axes=(-1,)), 'lowres_axes'),
    (dict(scale_p=2.0), 'scale_p'),
  ],
)
def test_bad_options_name_the_field_and_value(overrides, field):
  with pytest.raises(ValueError, match=rf'config\.augment\.{field} must .* got'):
    config_lib.AugmentOptions(**overrides)


@pytest.mark.parametrize('spatial', [(16, 16), (8, 16, 16)])
def test_the_train_step_runs_with_the_full_set(spatial):
  image, label = _data(spatial, n=2, channels=1)
  label = np.where(label == 255, 0, label)
  batch = {'image': jnp.asarray(image), 'label': jnp.asarray(label)}
  model = models.UNet(num_classes=3, features=4, depth=1, norm='instance')
  tx = optax.adam(1e-3)
  state = steps.create_train_state(jax.random.key(0), model, tx, image.shape)
  full = config_lib.AugmentOptions(**FULL, rotation_axes=(0,) if len(spatial) == 3 else ())
  run = {}
  for name, opts in (('full', full), ('off', config_lib.AugmentOptions(**OFF))):
    step = jax.jit(
      functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        loss_fn=losses.get_loss('dice_ce'),
        learning_rate_fn=lambda s: 1e-3,
        aug_config=opts,
        seed=0,
      )
    )
    losses_seen = []
    s = state
    for _ in range(3):
      s, metrics = step(s, batch)
      losses_seen.append(float(metrics['loss']))
    run[name] = losses_seen
    assert np.all(np.isfinite(losses_seen)) and int(s.step) == 3
  assert run['full'] != run['off']  # Some of the 6 examples were augmented.


def test_the_benchmark_smoke_run(tmp_path):
  """benchmarks/augment_full.py --smoke: both arms train through the plan and the
  step times are measured (none asserted)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(root, 'benchmarks', 'augment_full.py'),
      '--smoke',
      f'--out={tmp_path}',
    ],
    cwd=root,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  runs = results['dice']['thin2d']
  full, today = runs['full']['runs'][0], runs['today']['runs'][0]
  assert full['augment']['augment.gamma_p'] == 0.3  # The plan's full set ...
  assert today['augment']['augment.gamma_p'] == 0.0  # ... and today's, set back.
  assert tuple(today['augment']['augment.scale']) in ((1.0, 1.25), (0.85, 1.25))
  assert today['augment']['augment.scale_p'] == 1.0
  assert 0 <= full['dice'] <= 1 and 0 <= today['dice'] <= 1
  assert results['step_time']['2d']['full']['median_s'] > 0
  assert '| thin2d | full | 2 | 1 |' in (tmp_path / 'results.md').read_text()
