"""Tests for unet_jax.planning and unet_jax.train.setup: the fingerprint by hand, the
plan's rules, overrides, plan.json, the plan step of training, and one planned run
through launch.py."""

import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from unet_jax import config as config_lib
from unet_jax import planning
from unet_jax.data import folder as sf
from unet_jax.data import pipeline as input_pipeline
from unet_jax.data import sources
from unet_jax.inference import predictor as inference
from unet_jax.models import memory
from unet_jax.planning import rules as planning_rules
from unet_jax.planning.fingerprint import _cache_path  # The cache file, to edit it.
from unet_jax.planning.plan import _node_and_leaf
from unet_jax.train import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(image, label, spacing=(1.0, 1.0)):
  image = np.asarray(image, np.float32)
  return sources.Example(
    image=image[..., None] if image.ndim == len(spacing) else image,
    label=np.asarray(label, np.int32),
    spacing=spacing,
    case_id='',
  )


# ----------------------------------------------------------------- the fingerprint


def test_fingerprint_by_hand_2d():
  a_label = np.zeros((4, 6), np.int32)
  a_label[0, 0:2] = 1  # Two foreground pixels, top left.
  a_image = np.full((4, 6), 7.0)
  a_image[0, 0:2] = (10, 20)
  b_label = np.zeros((6, 8), np.int32)
  b_label[2:4, 3:5] = 1  # A 2x2 block in the middle; and a 1x1 class 2.
  b_label[5, 7] = 2
  b_image = np.full((6, 8), 200.0)
  b_image[2:4, 3:5] = ((30, 40), (50, 60))
  b_image[5, 7] = 0
  fp = planning.fingerprint_examples(
    [_example(a_image, a_label), _example(b_image, b_label)],
    ndim=2,
    num_channels=1,
    num_classes=3,
    key='hand',
  )
  assert fp.num_cases == 2 and fp.key == 'hand'
  assert fp.shape_median == (5.0, 7.0)
  assert fp.shape_min == (4, 6) and fp.shape_max == (6, 8)
  assert fp.spacing_median == (1.0, 1.0) and fp.anisotropy == 1.0
  assert fp.value_min == (0.0,) and fp.value_max == (200.0,)
  assert fp.value_type == 'uint8'
  # Foreground intensities 10, 20, 30, 40, 50, 60 and 0 (class 2).
  values = np.array([10, 20, 30, 40, 50, 60, 0.0])
  assert fp.foreground_mean == pytest.approx((values.mean(),))
  assert fp.foreground_std == pytest.approx((values.std(),))
  # numpy's linear percentiles of the 7 sorted values: index 0.005 * 6 = 0.03 gives
  # 0 + 0.03 * 10; index 5.97 gives 50 + 0.97 * 10.
  assert fp.foreground_p00_5 == pytest.approx((0.3,))
  assert fp.foreground_p99_5 == pytest.approx((59.7,))
  assert fp.class_voxels == (24 - 2 + 48 - 5, 2 + 4, 1)
  assert fp.class_frequency == pytest.approx((65 / 72, 6 / 72, 1 / 72))
  assert fp.class_image_share == (1.0, 1.0, 0.5)
  # Every class-1 pixel is on its boundary: 2 x 6 / 6; class 2: 2 x 1 / 1.
  assert fp.class_thickness == (0.0, 2.0, 2.0)
  # Class 1 centroids, (mean index + 0.5) / size: (0.5 / 4, 1 / 6) and (3 / 6, 4 / 8).
  assert fp.centroid_mean[1] == pytest.approx(((0.125 + 0.5) / 2, (1 / 6 + 0.5) / 2))
  assert fp.centroid_sem[1] == pytest.approx(
    (np.std([0.125, 0.5], ddof=1) / math.sqrt(2), np.std([1 / 6, 0.5], ddof=1) / 2**0.5)
  )
  # Class 2 occurs once: its standard error is 0.
  assert fp.centroid_mean[2] == pytest.approx((5.5 / 6, 7.5 / 8))
  assert fp.centroid_sem[2] == (0.0, 0.0)


def test_fingerprint_spacing_value_types_and_ignored_pixels():
  volumes = []
  for spacing, value in (
    ((3.0, 1.0, 1.0), -1000.0),
    ((5.0, 1.0, 1.0), 0.0),
    ((4.0, 0.5, 0.5), 40.0),
  ):
    label = np.zeros((4, 8, 8), np.int32)
    label[1:3, 2:6, 2:6] = 1
    label[0] = 9  # A "don't care" value: left out of everything but the shapes.
    volumes.append(_example(np.full((4, 8, 8), value), label, spacing))
  fp = planning.fingerprint_examples(
    volumes, ndim=3, num_channels=1, num_classes=2, ignore_index=9
  )
  assert fp.spacing_median == (4.0, 1.0, 1.0) and fp.anisotropy == 4.0
  # Per case, as read: the spacings and shapes the target spacing is chosen from.
  assert fp.spacings == ((3.0, 1.0, 1.0), (5.0, 1.0, 1.0), (4.0, 0.5, 0.5))
  assert fp.shapes == ((4, 8, 8),) * 3 and fp.channel_names == ()
  assert fp.value_type == 'int16' and fp.value_min == (-1000.0,)
  assert fp.class_voxels == (3 * (3 * 64 - 32), 3 * 32)
  assert fp.foreground_mean == pytest.approx(((-1000 + 0 + 40) / 3,))
  float_fp = planning.fingerprint_examples(
    [_example(np.full((4, 4), 0.5), np.eye(4))], ndim=2, num_channels=1, num_classes=2
  )
  assert float_fp.value_type == 'float'
  named = planning.fingerprint_examples(
    [_example(np.full((4, 4), 0.5), np.eye(4))],
    ndim=2,
    num_channels=1,
    num_classes=2,
    channel_names=('CT',),
  )
  assert named.channel_names == ('CT',) and named.shapes == ((4, 4),)
  # Stored as JSON and read back; a fingerprint without the new fields still reads.
  again = planning.Fingerprint.from_dict(json.loads(json.dumps(named.to_dict())))
  assert again == named
  old = {k: v for k, v in named.to_dict().items() if k not in ('spacings', 'shapes')}
  assert planning.Fingerprint.from_dict(old).spacings == ()


# ----------------------------------------------------------------- the plan's rules


def _fp(**overrides) -> planning.Fingerprint:
  """A 2D, 8-bit, binary data set of 40 cases of 64x64 with a centred class."""
  ndim = len(overrides.get('shape_median', (64, 64)))
  base = dict(
    key='test',
    ndim=ndim,
    num_channels=1,
    num_classes=2,
    num_cases=40,
    shape_median=(64.0,) * ndim,
    shape_min=(64,) * ndim,
    shape_max=(64,) * ndim,
    spacing_median=(1.0,) * ndim,
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
    centroid_mean=((0.5,) * ndim, (0.5,) * ndim),
    centroid_sem=((0.0,) * ndim, (0.05,) * ndim),
    elongation_mean=(0.0, 0.0),
    elongation_sem=(0.0, 0.1),
  )
  base.update(overrides)
  return planning.Fingerprint(**base)


def _fp3(spacings, shapes, **overrides) -> planning.Fingerprint:
  """`_fp` of 3D cases with these spacings and shapes (and their summaries)."""
  shapes = np.asarray(shapes)
  return _fp(
    num_cases=len(shapes),
    shape_median=tuple(np.median(shapes, axis=0).astype(float)),
    shape_min=tuple(int(n) for n in shapes.min(axis=0)),
    shape_max=tuple(int(n) for n in shapes.max(axis=0)),
    spacing_median=tuple(np.median(np.asarray(spacings, float), axis=0)),
    spacings=tuple(tuple(float(v) for v in s) for s in spacings),
    shapes=tuple(tuple(int(n) for n in s) for s in shapes),
    **overrides,
  )


def test_resampled_shape_rounds_as_numpy_and_is_at_least_one():
  assert planning.resampled_shape((10, 64, 64), (3.0, 1.0, 1.0), (3.9, 1.0, 1.0)) == (
    8,  # 7.69
    64,
    64,
  )
  # 2.5 and 3.5 round to even; a thin axis keeps one voxel.
  assert planning.resampled_shape((5, 7, 1), (1.0, 1.0, 1.0), (2.0, 2.0, 4.0)) == (2, 4, 1)


def test_target_spacing_is_the_median_when_not_anisotropic():
  # Three cases at 2 mm and three at (4, 1.5, 1.5): medians 3 and 1.75; 3 is not
  # over 3 x 1.75.
  fp = _fp3(
    [(2.0, 2.0, 2.0)] * 3 + [(4.0, 1.5, 1.5)] * 3,
    [(20, 40, 40)] * 3 + [(10, 48, 48)] * 3,
  )
  p = planning.plan(fp)
  assert p['data.target_spacing'] == (3.0, 1.75, 1.75)
  # Resampled: 20 x 2 / 3 = 13.3 -> 13, 40 x 2 / 1.75 = 45.7 -> 46; 10 x 4 / 3 =
  # 13.3 -> 13, 48 x 1.5 / 1.75 = 41.1 -> 41: median 13 x 43.5 x 43.5.
  reason = {c.field: c.reason for c in p.choices}['data.target_spacing']
  assert 'median spacing of 6 cases' in reason
  assert 'resampled median shape 13x43.5x43.5 (native 15x44x44)' in reason
  _, data = planning_rules.spacing_choices(fp, {})
  assert data.shape_min == (13, 41, 41) and data.shape_max == (13, 46, 46)
  assert data.spacing_median == (3.0, 1.75, 1.75)
  assert data.anisotropy == pytest.approx(3 / 1.75)


def test_anisotropic_target_spacing_takes_the_10th_percentile():
  z = [3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0]
  fp = _fp3([(s, 1.0, 1.0) for s in z], [(10, 64, 64)] * 10)
  p = planning.plan(fp)
  # Median 5 > 3 x 1, and 10 slices x 3 < 64: anisotropic. numpy's 10th percentile
  # of the 10 sorted values: index 0.1 x 9 = 0.9, 3 + 0.9 x (4 - 3) = 3.9.
  assert p['data.target_spacing'] == pytest.approx((3.9, 1.0, 1.0))
  reason = {c.field: c.reason for c in p.choices}['data.target_spacing']
  assert 'D: the 10th percentile 3.9' in reason and 'median 5 > 3 x 1' in reason
  # Slices 10 x s / 3.9: 7.7, 10.3, 12.8 (x5), 15.4 (x3) -> median 13.
  assert 'resampled median shape 13x64x64 (native 10x64x64)' in reason
  # The patch is planned on the resampled 13 slices: pooled along D twice (spacing
  # 3.9 is within 2x of 2, then of 4), 13 -> 12. At the native spacing 5 D would be
  # pooled once, from the median 10: a patch of 10.
  assert p['data.patch_size'] == (12, 64, 64)
  native = planning.plan(dataclasses.replace(fp, spacings=(), shapes=()))
  assert native['data.target_spacing'] == (5.0, 1.0, 1.0)
  assert native['data.patch_size'] == (10, 64, 64)
  # Thick slices, but as many of them as the others: nnU-Net keeps the median.
  many = planning.plan(_fp3([(s, 1.0, 1.0) for s in z], [(40, 64, 64)] * 10))
  assert many['data.target_spacing'] == (5.0, 1.0, 1.0)


def test_the_coarse_axis_stays_the_coarsest():
  # Median 4 > 3 x 1, but the 10th percentile is 0.5 (index 0.9 between two 0.5s):
  # raised to the in-plane 1 (+ 1e-5, as nnU-Net does).
  fp = _fp3([(0.5, 1.0, 1.0)] * 2 + [(4.0, 1.0, 1.0)] * 8, [(10, 64, 64)] * 10)
  p = planning.plan(fp)
  assert p['data.target_spacing'] == (1.0 + 1e-5, 1.0, 1.0)
  assert 'raised to' in {c.field: c.reason for c in p.choices}['data.target_spacing']


def test_a_target_spacing_set_on_the_command_line_wins():
  z = [3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0]
  fp = _fp3([(s, 1.0, 1.0) for s in z], [(10, 64, 64)] * 10)
  p = planning.plan(fp, fixed={'data.target_spacing': (5.0, 1.0, 1.0)})
  choice = {c.field: c for c in p.choices}['data.target_spacing']
  assert choice.overridden and choice.value == (5.0, 1.0, 1.0)
  assert choice.planned == pytest.approx((3.9, 1.0, 1.0))
  # Planned at 5 mm: slices 6, 8, 10 (x5), 12 (x3), median 10.
  assert p['data.patch_size'] == (10, 64, 64)
  line = next(
    x for x in planning.format_table(p).splitlines() if x.startswith('data.target')
  )
  assert 'command line' in line and "overrides the plan's (3.9, 1, 1)" in line
  with pytest.raises(ValueError, match='target_spacing=.* has 2 entries'):
    planning.plan(fp, fixed={'data.target_spacing': (5.0, 1.0)})
  # 2D images are not resampled: no such field.
  assert 'data.target_spacing' not in planning.plan(_fp()).values()


def test_anisotropic_spacing_pools_in_plane_first():
  fp = _fp(
    shape_median=(20.0, 128.0, 128.0),
    shape_min=(20, 128, 128),
    shape_max=(20, 128, 128),
    spacing_median=(5.0, 1.0, 1.0),
    anisotropy=5.0,
    value_type='float',
    value_max=(3.7,),
  )
  p = planning.plan(fp, memory_budget='64GiB')
  pools, kernels = p['model.pool_sizes'], p['model.kernel_sizes']
  # Spacing 5 vs 1, then 5 vs 2: pooled in-plane only, with (1, 3, 3) kernels; then
  # 5 vs 4 is within 2x: pooled along D too.
  assert pools[:3] == ((1, 2, 2), (1, 2, 2), (2, 2, 2))
  assert kernels[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
  assert p['model.depth'] == len(pools) == len(kernels) - 1
  bottleneck = [
    s / math.prod(p[a] for p in pools) for a, s in enumerate(p['data.patch_size'])
  ]
  assert all(b < 8 for b in bottleneck[1:])  # In-plane: pooled down to under 8.


def test_isotropic_topology_and_depth_by_image_size():
  # 64 -> 32 -> 16 -> 8 -> 4: an axis at least 8 long is pooled.
  assert planning.topology((64, 64), (1, 1)) == (((2, 2),) * 4, ((3, 3),) * 5)
  small = planning.plan(
    _fp(shape_median=(12.0, 12.0), shape_min=(12, 12), shape_max=(12, 12))
  )
  large = planning.plan(
    _fp(shape_median=(256.0, 256.0), shape_min=(256, 256), shape_max=(256, 256)),
    memory_budget='64GiB',
  )
  assert small['model.depth'] == 1  # 12 -> 6: one pooling level.
  assert large['model.depth'] == planning.MAX_DEPTH
  assert planning.plan(_fp())['model.depth'] == 4


def test_the_memory_budget_bounds_the_patch():
  fp = _fp(
    shape_median=(128.0,) * 3,
    shape_min=(128,) * 3,
    shape_max=(128,) * 3,
    spacing_median=(1.0,) * 3,
  )
  roomy = planning.plan(fp, memory_budget='64GiB')
  tight = planning.plan(fp, memory_budget='256MiB')
  assert roomy['data.patch_size'] == (128, 128, 128)
  patch = tight['data.patch_size']
  assert math.prod(patch) < 128**3 / 2
  estimate = memory.estimate(
    spatial_shape=patch,
    in_channels=1,
    num_classes=2,
    features=16,
    depth=tight['model.depth'],
    kernel_sizes=tight['model.kernel_sizes'],
    pool_sizes=tight['model.pool_sizes'],
    batch=tight['batch_size'],
    training=True,
  )
  assert estimate.total_bytes <= 256 * 2**20
  assert (
    'shrunk from 128x128x128'
    in dict((c.field, c.reason) for c in tight.choices)['data.patch_size']
  )
  # Volumes larger than the patch are evaluated by sliding windows of it.
  assert tight['evals.eval.patch_size'] == patch
  assert 'evals.eval.patch_size' not in roomy.values()


def test_normalisation_by_value_range():
  ct = planning.plan(_fp(value_min=(-1024.0,), value_max=(2000.0,), value_type='int16'))
  assert ct['data.normalization'] == 'ct'
  assert (ct['data.intensity_low'], ct['data.intensity_high']) == ((20.0,), (230.0,))
  assert (ct['data.intensity_mean'], ct['data.intensity_std']) == ((120.0,), (30.0,))
  natural = planning.plan(_fp())
  assert natural['data.normalization'] == 'rescale'
  assert (natural['data.intensity_low'], natural['data.intensity_high']) == (
    (0.0,),
    (255.0,),
  )
  mri = planning.plan(_fp(value_max=(1800.0,), value_type='uint16'))
  assert mri['data.normalization'] == 'zscore'
  assert 'data.intensity_low' not in mri.values()


def _two_channels(**overrides):
  return _fp(
    num_channels=2,
    value_min=(-1024.0, 0.0),
    value_max=(2000.0, 900.0),
    value_type='int16',
    foreground_p00_5=(-100.0, 5.0),
    foreground_p99_5=(300.0, 800.0),
    foreground_mean=(40.0, 300.0),
    foreground_std=(80.0, 100.0),
    **overrides,
  )


def test_normalisation_by_channel_name():
  # 'CT' wins over the 8-bit value range, with the foreground intensities.
  ct = planning.plan(_fp(channel_names=('CT',)))
  assert ct['data.normalization'] == 'ct'
  assert (ct['data.intensity_low'], ct['data.intensity_high']) == ((20.0,), (230.0,))
  assert (ct['data.intensity_mean'], ct['data.intensity_std']) == ((120.0,), (30.0,))
  reason = {c.field: c.reason for c in ct.choices}['data.normalization']
  assert reason.startswith('channel_names in dataset.json: CT -> ct')
  # Other names: a z-score per image, one mode for both channels.
  mri = planning.plan(_two_channels(channel_names=('T2', 'ADC')))
  assert mri['data.normalization'] == 'zscore'
  assert 'data.intensity_low' not in mri.values()
  # One mode per channel; the intensities hold one value per channel, neutral where
  # the channel's mode does not use them.
  mixed = planning.plan(_two_channels(channel_names=('CT', 'noNorm')))
  assert mixed['data.normalization'] == 'ct,none'
  assert mixed['data.intensity_low'] == (-100.0, 0.0)
  assert mixed['data.intensity_high'] == (300.0, 1.0)
  assert mixed['data.intensity_mean'] == (40.0, 0.0)
  assert mixed['data.intensity_std'] == (80.0, 1.0)
  config = importlib.import_module('configs.folder').get_config()
  data = config_lib.DataOptions.from_config(planning.apply(config, mixed).data)
  image = np.stack([np.full((2, 2), 340.0), np.full((2, 2), 7.0)], axis=-1)
  out = input_pipeline.normaliser(data, 2)(image)
  np.testing.assert_allclose(out[..., 0], 3.25)  # (clip(340, -100, 300) - 40) / 80.
  np.testing.assert_allclose(out[..., 1], 7.0)
  # nnU-Net matches names case-insensitively; rescale_to_0_1 is a per-image 0-1.
  named = planning.plan(_two_channels(channel_names=('ct', 'rescale_to_0_1')))
  assert named['data.normalization'] == 'ct,minmax'
  # Without channel names, the value range decides, as before.
  assert planning.plan(_two_channels())['data.normalization'] == 'ct'


def test_a_rare_class_gets_class_weights():
  common = planning.plan(_fp())
  assert common['loss.name'] == 'dice_ce'
  assert 'loss.kwargs.class_weights' not in common.values()
  rare = planning.plan(
    _fp(
      num_classes=3,
      class_voxels=(9974, 25, 1),
      class_frequency=(0.9974, 0.0025, 0.0001),
      class_image_share=(1.0, 0.5, 0.1),
      class_thickness=(0.0, 5.0, 4.0),
      centroid_mean=((0.5, 0.5),) * 3,
      centroid_sem=((0.0, 0.0),) * 3,
      elongation_mean=(0.0,) * 3,
      elongation_sem=(0.0,) * 3,
    )
  )
  # sqrt(1% / 0.25%) = 2; sqrt(1% / 0.01%) = 10.
  assert rare['loss.kwargs.class_weights'] == (1.0, 2.0, 10.0)


def test_augmentation_follows_position_orientation_and_thickness():
  free = planning.plan(_fp())
  assert free['augment.flip'] and free['augment.flip_axes'] == (0, 1)
  assert free['augment.rot90'] and free['augment.scale'] == (0.7, 1.4)
  # A class always on the left (W), far beyond its standard error: no flips along W,
  # no rotations.
  left = planning.plan(
    _fp(centroid_mean=((0.5, 0.5), (0.5, 0.2)), centroid_sem=((0.0, 0.0), (0.02, 0.02)))
  )
  assert left['augment.flip_axes'] == (0,) and not left['augment.rot90']
  # Scattered positions (a large standard error) are no evidence of a side.
  noisy = planning.plan(
    _fp(centroid_mean=((0.5, 0.5), (0.5, 0.3)), centroid_sem=((0.0, 0.0), (0.1, 0.1)))
  )
  assert noisy['augment.flip_axes'] == (0, 1) and noisy['augment.rot90']
  upright = planning.plan(_fp(elongation_mean=(0.0, 1.2), elongation_sem=(0.0, 0.1)))
  assert upright['augment.flip'] and not upright['augment.rot90']
  thin = planning.plan(_fp(class_thickness=(0.0, 1.5)))
  assert thin['augment.scale'] == (1.0, 1.4)
  anisotropic = planning.plan(_fp(spacing_median=(1.0, 0.5)))
  assert not anisotropic['augment.rot90']


def test_nnunet_augmentation_at_its_probabilities():
  free = planning.plan(_fp())
  nnunet = {
    'augment.rotation_p': 0.2,
    'augment.scale_p': 0.2,
    'augment.noise_p': 0.1,
    'augment.blur_p': 0.2,
    'augment.brightness_p': 0.15,
    'augment.contrast_p': 0.15,
    'augment.lowres_p': 0.25,
    'augment.gamma_inverted_p': 0.1,
    'augment.gamma_p': 0.3,
    'augment.intensity': 0.0,  # Replaced by brightness, contrast and gamma.
  }
  assert {k: free[k] for k in nnunet} == nnunet
  # 2D: any angle, unless the plane has a preferred orientation or the input is long.
  assert free['augment.rotation'] == (-180.0, 180.0)
  assert 'augment.rotation_axes' not in free.values()
  upright = planning.plan(_fp(elongation_mean=(0.0, 1.2), elongation_sem=(0.0, 0.1)))
  assert upright['augment.rotation'] == (-15.0, 15.0)
  assert upright['augment.rotation_p'] == 0.2
  long = planning.plan(
    _fp(shape_median=(64.0, 128.0), shape_min=(64, 128), shape_max=(64, 128))
  )
  assert long['augment.rotation'] == (-15.0, 15.0)
  # Isotropic 3D: +-30 degrees about every axis, low resolution along every axis.
  iso = planning.plan(_fp3([(1.0, 1.0, 1.0)] * 8, [(48, 48, 48)] * 8))
  assert iso['augment.rotation'] == (-30.0, 30.0)
  assert iso['augment.rotation_axes'] == () and iso['augment.lowres_axes'] == ()
  # Thick slices: in the (H, W) plane only, for both.
  aniso = planning.plan(_fp3([(5.0, 1.0, 1.0)] * 8, [(12, 64, 64)] * 8))
  assert aniso['augment.rotation_axes'] == (0,)
  assert aniso['augment.lowres_axes'] == (1, 2)
  assert aniso['augment.rotation'] == (-180.0, 180.0)
  # The table shows each, with its reason.
  table = planning.format_table(aniso)
  line = next(x for x in table.splitlines() if x.startswith('augment.rotation_axes '))
  assert '(0,)' in line and 'about D only' in line
  line = next(x for x in table.splitlines() if x.startswith('augment.gamma_p '))
  assert '0.3' in line and "nnU-Net's probability" in line
  # A planned config augments with them.
  config = planning.apply(importlib.import_module('configs.folder').get_config(), aniso)
  options = config_lib.AugmentOptions.from_config(config.augment)
  assert options.rotation_axes == (0,) and options.gamma_p == 0.3


def test_fixed_fields_win_and_the_table_says_so():
  fixed = {'model.depth': 2, 'batch_size': 4, 'data.normalization': 'zscore'}
  p = planning.plan(_fp(), fixed=fixed)
  assert p['model.depth'] == 2 and len(p['model.pool_sizes']) == 2
  assert len(p['model.kernel_sizes']) == 3
  assert p['batch_size'] == 4 and p['data.normalization'] == 'zscore'
  assert 'data.intensity_low' not in p.values()  # No 'rescale' parameters.
  by_field = {c.field: c for c in p.choices}
  assert by_field['model.depth'].overridden and by_field['model.depth'].planned == 4
  assert by_field['batch_size'].planned == 2
  assert not by_field['augment.flip'].overridden
  table = planning.format_table(p)
  depth_line = next(line for line in table.splitlines() if line.startswith('model.depth'))
  assert 'command line' in depth_line and "overrides the plan's 4" in depth_line
  flip_line = next(line for line in table.splitlines() if line.startswith('augment.flip '))
  assert 'command line' not in flip_line
  config = planning.apply(importlib.import_module('configs.folder').get_config(), p)
  assert config.model.depth == 2 and config.batch_size == 4
  assert config.model.pool_sizes == ((2, 2), (2, 2))


def test_steps_from_the_time_budget():
  p = planning.plan(_fp(), time_budget=300, step_time=0.4)
  assert p['num_train_steps'] == 750 and p['optimizer.warmup_steps'] == 50
  assert 'num_train_steps' not in planning.plan(_fp(), time_budget=300).values()


def test_a_slow_step_shrinks_the_patch_then_the_width():
  fp = _fp(
    shape_median=(16.0, 64.0, 64.0),
    shape_min=(16, 64, 64),
    shape_max=(16, 64, 64),
    spacing_median=(4.0, 0.8, 0.8),
    anisotropy=5.0,
  )
  base = planning.plan(fp)
  assert base['data.patch_size'] == (16, 64, 64) and base['batch_size'] == 2
  ref = 16 * 64 * 64
  # 150 s at 1.5 s a step is 100 steps; 250 need a step 0.4x as costly: the in-plane
  # axes shrink together (D, at its median of 16, stays) to 40x40.
  slow = planning.plan(fp, time_budget=150, step_time=1.5)
  assert slow['data.patch_size'] == (16, 40, 40) and slow['batch_size'] == 2
  assert 'model.features' not in slow.values()
  assert slow['num_train_steps'] == math.floor(150 / (1.5 * 16 * 40 * 40 / ref))
  # 12.5 s: even 16x32x32 (the floor) is too costly, so the width halves, 16 -> 8.
  slower = planning.plan(fp, time_budget=150, step_time=12.5)
  assert slower['data.patch_size'] == (16, 32, 32) and slower['model.features'] == 8
  assert slower['num_train_steps'] == 150 // (12.5 * (16 * 32 * 32 * 8**2) / (ref * 16**2))
  # A width set on the command line stays: fewer steps instead.
  kept = planning.plan(fp, time_budget=150, step_time=12.5, fixed={'model.features': 16})
  assert kept['data.patch_size'] == (16, 32, 32) and 'model.features' not in kept.values()
  assert kept['num_train_steps'] == 48


def test_plan_json_round_trips(tmp_path):
  p = planning.plan(
    _fp(
      num_classes=3,
      class_voxels=(9974, 25, 1),
      class_frequency=(0.9974, 0.0025, 0.0001),
      class_image_share=(1.0, 0.5, 0.1),
      class_thickness=(0, 5.0, 4.0),
      centroid_mean=((0.5, 0.5),) * 3,
      centroid_sem=((0.0, 0.0),) * 3,
      elongation_mean=(0.0,) * 3,
      elongation_sem=(0.0,) * 3,
    ),
    time_budget=60,
    step_time=0.123,
    fixed={'model.depth': 2},
  )
  path = str(tmp_path / 'plan.json')
  planning.write_plan(path, p, _fp())
  assert planning.read_plan(path) == p
  with open(path) as f:
    assert json.load(f)['fingerprint']['key'] == 'test'


def test_plan_false_keeps_the_config_and_writes_nothing(tmp_path):
  config = importlib.import_module('configs.folder').get_config()
  config.plan = False
  same, data = setup.plan_run(config, 'data', str(tmp_path))
  assert same is config and data == 'data'
  assert not os.listdir(tmp_path)
  # The fixed settings are those of configs/default.py.
  default = importlib.import_module('configs.default').get_config()
  for field in (
    'model.features',
    'model.depth',
    'batch_size',
    'augment.rot90',
    'data.normalization',
    'num_train_steps',
  ):
    node, leaf = _node_and_leaf(config, field)
    base, _ = _node_and_leaf(default, field)
    assert node[leaf] == base[leaf]


def test_plan_run_with_a_time_budget_measures_then_reuses_the_step_time(
  tmp_path, monkeypatch
):
  for split in ('train', 'val'):
    for i in range(2):
      label = np.zeros((16, 16), np.uint8)
      label[4:10, 5:12] = 1
      image = (40 * label + 10).astype(np.uint8)
      sf.write_pair(tmp_path / 'data', split, f'c{i}', image, label)
  config = importlib.import_module('configs.folder').get_config()
  config.data.root, config.data.data_dir = str(tmp_path / 'data'), str(tmp_path / 'tfds')
  config.model.features = 4
  config.plan_time_budget = 30.0
  data = input_pipeline.open(config.data, divisor=1)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  first, _ = setup.plan_run(config, data, workdir)
  p = planning.read_plan(os.path.join(workdir, planning.PLAN_FILE))
  step_time = p.inputs['step_time']
  assert step_time > 0 and math.isfinite(step_time)
  assert first.num_train_steps == p['num_train_steps'] >= 1
  assert p.inputs['time_budget'] == 30.0
  # A resumed run plans with the step time its plan.json recorded: no new measurement.

  def measure(*args, **kwargs):
    raise AssertionError('measured again')

  monkeypatch.setattr(setup, 'measure_step_time', measure)
  again, _ = setup.plan_run(config, data, workdir)
  assert again.to_dict() == first.to_dict()
  assert planning.read_plan(os.path.join(workdir, planning.PLAN_FILE)) == p


def test_planning_does_not_import_train():
  """Planning sits below training: importing it loads no module of unet_jax.train."""
  code = (
    'import sys, unet_jax.planning;'
    " assert not any(m.startswith('unet_jax.train') for m in sys.modules),"
    " sorted(m for m in sys.modules if m.startswith('unet_jax.train'))"
  )
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------- end to end


def test_a_planned_run_through_launch(tmp_path):
  """configs/folder.py with the plan: plan.json, the table with the command-line
  field marked, the planned normalisation used in training and in prediction."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'data'
  for split, count in (('train', 4), ('val', 2)):
    for i in range(count):
      label = np.zeros((16, 16), np.uint8)
      label[4:10, 5:12] = 1
      image = (rng.normal(60, 10, label.shape) + 100 * label).clip(0, 255)
      sf.write_pair(root, split, f'case{i}', image.astype(np.uint8), label)
  workdir = tmp_path / 'run'
  cmd = [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config=' + os.path.join(ROOT, 'configs/folder.py'),
    f'--workdir={workdir}',
    f'--config.data.root={root}',
    f'--config.data.data_dir={tmp_path / "tfds"}',
    '--config.model.features=4',
    '--config.batch_size=2',
    '--config.eval_batch_size=2',
    '--config.num_train_steps=2',
    '--config.eval_every_steps=2',
    '--config.checkpoint_every_steps=2',
  ]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Final validation: dice' in proc.stdout
  p = planning.read_plan(str(workdir / 'plan.json'))
  by_field = {c.field: c for c in p.choices}
  assert by_field['batch_size'].overridden and by_field['batch_size'].value == 2
  assert not by_field['data.normalization'].overridden
  assert p['data.normalization'] == 'rescale'  # 8-bit PNGs.
  table_lines = [
    line
    for line in proc.stderr.splitlines()
    if line.startswith(('batch_size ', 'data.normalization '))
  ]
  assert len(table_lines) == 2 and 'command line' in table_lines[0]
  with open(workdir / 'config.json') as f:
    recorded = json.load(f)
  assert recorded['data']['normalization'] == 'rescale'
  assert recorded['model']['depth'] == p['model.depth'] == 2  # 16 -> 8 -> 4.
  assert 'batch_size' in recorded['plan_keep']
  # The fingerprint is cached beside the built data set.
  cached = [
    n
    for _, _, names in os.walk(tmp_path / 'tfds')
    for n in names
    if n.startswith('unet_jax_fingerprint')
  ]
  assert cached == ['unet_jax_fingerprint_train.json']
  # Prediction normalises as the run was trained: 0-1 from the 8-bit range ...
  predictor = inference.load(str(workdir))
  image, _ = sf.read_image(str(root / 'val' / 'images' / 'case0.png'), ndim=2)
  normalise = input_pipeline.normaliser(predictor.data, predictor.num_channels)
  np.testing.assert_allclose(normalise(image), image / 255.0, rtol=1e-6)
  # ... and predicts on that: one window of the whole image, in a batch of one like
  # the direct call (padded to a batch of 4, XLA's convolutions round differently).
  np.testing.assert_allclose(
    predictor.predict(image, batch_size=1),
    predictor.apply((image / 255.0)[None])[0],
    atol=1e-5,
  )


def test_the_planning_command_prints_fingerprint_and_plan(tmp_path):
  root = tmp_path / 'data'
  for i in range(3):
    label = np.zeros((4, 12, 12), np.uint8)
    label[1:3, 3:8, 3:8] = 1
    image = np.where(label == 1, 40, -1000).astype(np.int16)
    sf.write_pair(root, 'train', f'vol{i}', image, label, spacing=(4.0, 1.0, 1.0))
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'unet_jax.planning',
      f'--root={root}',
      '--config=3d',
      f'--data_dir={tmp_path / "tfds"}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert re.search(r'spacing_median +\(4, 1, 1\)', out)
  assert re.search(r"value_type +'int16'", out)
  # 4 slices x 3 is not under 12: not anisotropic, the median spacing.
  assert re.search(r'data.target_spacing +\(4, 1, 1\) +plan +the per-axis median', out)
  normalization = next(
    line for line in out.splitlines() if line.startswith('data.normalization')
  )
  assert "'ct'" in normalization and 'Hounsfield' in normalization
  assert not list(tmp_path.glob('**/plan.json'))  # Nothing trained, nothing written.


def test_fingerprint_of_a_data_set_is_cached_per_build(tmp_path):
  root = tmp_path / 'data'
  for split in ('train', 'val'):
    for i in range(2):
      label = np.zeros((8, 8), np.uint8)
      label[2:5, 2:5] = 1
      sf.write_pair(root, split, f'c{i}', (40 * label + 10).astype(np.uint8), label)
  config = importlib.import_module('configs.folder').get_config()
  config.data.root, config.data.data_dir = str(root), str(tmp_path / 'tfds')
  data = input_pipeline.open(config.data, divisor=1)
  first = planning.fingerprint(data)
  assert first.class_voxels == (2 * 55, 2 * 9) and first.value_max == (50.0,)
  path = _cache_path(data, 'train', None)
  with open(path) as f:
    stored = json.load(f)
  stored['num_cases'] = 99  # Read back from the cache, not recomputed:
  with open(path, 'w') as f:
    json.dump(stored, f)
  assert planning.fingerprint(data).num_cases == 99
  assert planning.fingerprint(data, cache=False) == first
  # A fingerprint cached by an older version is recomputed, not misread.
  stored['version'] = planning.FORMAT_VERSION - 1
  del stored['spacings'], stored['shapes']
  with open(path, 'w') as f:
    json.dump(stored, f)
  assert planning.fingerprint(data) == first
  assert first.shapes == ((8, 8), (8, 8)) and first.spacings == ((1.0, 1.0),) * 2
  # A changed folder is a new built copy, with a fingerprint of its own.
  sf.write_pair(
    root, 'train', 'c9', np.full((8, 8), 200, np.uint8), np.ones((8, 8), np.uint8)
  )
  changed = planning.fingerprint(input_pipeline.open(config.data, divisor=1))
  assert changed.num_cases == 3 and changed.key != first.key
  assert dataclasses.replace(changed, key=first.key) != first
