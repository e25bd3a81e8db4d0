"""Tests for unet_jax.data.geometry: orientation, NIfTI round trips and resampling."""

import os

import nibabel
import numpy as np
import pytest
from scipy import ndimage

from unet_jax.data import geometry

# A stored (x, y, z) = (4, 5, 6) volume at voxel size (2, 3, 4) mm, origin (10, 20, 30).
_DATA = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
_AFFINE = np.array(
  [[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]], dtype=np.float64
)
# The same world content stored as (y, x, z) with x flipped: stored voxel (j, i', k)
# holds voxel (i, j, k) = (3 - i', j, k), whose world x is 2 * (3 - i') + 10.
_PERMUTED = np.ascontiguousarray(_DATA.transpose(1, 0, 2)[:, ::-1, :])
_PERMUTED_AFFINE = np.array(
  [[0, -2.0, 0, 16], [3.0, 0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]], dtype=np.float64
)


def _save(path, data, affine):
  nibabel.save(nibabel.Nifti1Image(data, affine), str(path))
  return str(path)


@pytest.fixture
def pair(tmp_path):
  return (
    _save(tmp_path / 'ras.nii.gz', _DATA, _AFFINE),
    _save(tmp_path / 'permuted.nii.gz', _PERMUTED, _PERMUTED_AFFINE),
  )


def _balls(shape, spheres):
  """Label map: (centre, radii per axis, class) ellipsoids, later ones on top."""
  grid = np.indices(shape, dtype=np.float64)
  label = np.zeros(shape, dtype=np.int64)
  for centre, radii, k in spheres:
    inside = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1
    label[inside] = k
  return label


def _dice(a, b, k):
  a, b = a == k, b == k
  return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


# Reading, orientation, writing.


def test_read_volume_diagonal_affine(pair):
  volume = geometry.read_volume(pair[0])
  np.testing.assert_array_equal(volume.array, _DATA.transpose(2, 1, 0))
  assert volume.array.dtype == np.int16
  assert volume.spacing == (4.0, 3.0, 2.0)
  np.testing.assert_array_equal(volume.affine, _AFFINE)
  assert volume.shape == (4, 5, 6)


def test_orientation_does_not_change_the_canonical_array(pair):
  ras, permuted = (geometry.read_volume(p) for p in pair)
  np.testing.assert_array_equal(permuted.array, ras.array)
  assert permuted.spacing == ras.spacing == (4.0, 3.0, 2.0)
  assert permuted.shape == (5, 4, 6)
  np.testing.assert_array_equal(permuted.affine, _PERMUTED_AFFINE)
  # As nibabel's closest canonical image, transposed to (D, H, W).
  canonical = nibabel.as_closest_canonical(nibabel.load(pair[1]))
  np.testing.assert_array_equal(np.asarray(canonical.dataobj).T, permuted.array)
  assert tuple(reversed(canonical.header.get_zooms())) == permuted.spacing


def test_to_original_inverts_the_reorientation(pair):
  for path, stored in zip(pair, (_DATA, _PERMUTED)):
    volume = geometry.read_volume(path)
    np.testing.assert_array_equal(geometry.to_original(volume.array, volume), stored)
  # Trailing axes (class probabilities) are kept.
  volume = geometry.read_volume(pair[1])
  probs = np.stack([volume.array, -volume.array, 2 * volume.array], axis=-1)
  back = geometry.to_original(probs, volume)
  assert back.shape == (5, 4, 6, 3)
  np.testing.assert_array_equal(back[..., 2], 2 * _PERMUTED)
  with pytest.raises(ValueError, match='does not match'):
    geometry.to_original(volume.array[:-1], volume)


def test_write_like_keeps_the_reference_geometry(pair, tmp_path):
  labels = (geometry.read_volume(pair[0]).array % 3).astype(np.int64)
  out = str(tmp_path / 'labels.nii.gz')
  geometry.write_like(out, labels, pair[1])
  written = nibabel.load(out)
  np.testing.assert_array_equal(written.affine, _PERMUTED_AFFINE)
  assert written.shape == _PERMUTED.shape
  assert written.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(np.asarray(written.dataobj), _PERMUTED % 3)
  np.testing.assert_array_equal(geometry.read_volume(out).array, labels)
  assert sorted(os.listdir(tmp_path)) == ['labels.nii.gz', 'permuted.nii.gz', 'ras.nii.gz']


def test_write_like_dtype_and_bad_labels(pair, tmp_path):
  labels = np.zeros((6, 5, 4), dtype=np.int32)
  labels[0, 0, 0] = 300
  out = str(tmp_path / 'big.nii')
  geometry.write_like(out, labels, pair[0])
  assert nibabel.load(out).get_data_dtype() == np.uint16
  assert geometry.read_volume(out).array[0, 0, 0] == 300
  with pytest.raises(ValueError, match='does not match'):
    geometry.write_like(out, labels[:, :, :3], pair[0])
  with pytest.raises(ValueError, match='integer'):
    geometry.write_like(out, labels.astype(np.float32), pair[0])


def test_read_volume_4d_channels(tmp_path):
  data = np.arange(4 * 5 * 6 * 2, dtype=np.float32).reshape(4, 5, 6, 2)
  path = _save(tmp_path / 'multi.nii.gz', data, np.diag([1.0, 2.0, 3.0, 1.0]))
  volume = geometry.read_volume(path)
  assert volume.array.shape == (6, 5, 4, 2)
  assert volume.array[3, 2, 1, 1] == data[1, 2, 3, 1]
  assert volume.spacing == (3.0, 2.0, 1.0)
  # Labels written like a multi-channel image are 3D.
  out = str(tmp_path / 'labels.nii.gz')
  geometry.write_like(out, np.ones((6, 5, 4), np.int64), path)
  assert nibabel.load(out).shape == (4, 5, 6)
  first = geometry.read_volume(path, channels_last_4d=False)
  assert first.array.shape == (2, 6, 5, 4)
  np.testing.assert_array_equal(first.array[1], volume.array[..., 1])


def test_read_volume_bad_files(tmp_path):
  flat = _save(tmp_path / 'flat.nii.gz', np.zeros((4, 5), np.uint8), np.eye(4))
  with pytest.raises(ValueError, match='flat.nii.gz.*2D'):
    geometry.read_volume(flat)
  broken = tmp_path / 'broken.nii.gz'
  broken.write_bytes(b'not a nifti')
  with pytest.raises(ValueError, match='broken.nii.gz.*unreadable'):
    geometry.read_volume(str(broken))


# Shapes, thick axes and the separate-z rule.


def test_resampled_shape_hand_values():
  assert geometry.resampled_shape((10, 20, 20), (4, 1.5, 1.5), (2, 1, 1)) == (20, 30, 30)
  assert geometry.resampled_shape((48, 48, 48), (1, 1, 1), (1.5, 0.8, 1.2)) == (32, 60, 40)
  assert geometry.resampled_shape((5, 7), (1, 1), (3, 100)) == (2, 1)  # 1.67, at least 1.


def test_is_thick_and_separate_axis():
  np.testing.assert_array_equal(geometry.is_thick((5, 1, 1)), [True, False, False])
  np.testing.assert_array_equal(geometry.is_thick((3, 1, 1)), [False, False, False])
  assert geometry.separate_axis((5, 1, 1), (1, 1, 1)) == 0
  assert geometry.separate_axis((1, 1, 1), (1, 1, 4)) == 2
  assert geometry.separate_axis((2, 1, 1), (2.5, 1, 1)) is None
  assert geometry.separate_axis((5, 5, 1), (1, 1, 1)) is None
  assert geometry.separate_axis((5, 5, 1), (1, 1, 4)) is None  # The input decides.


def test_resampled_bytes_hand_value():
  # (20, 30, 30) = 18000 resampled voxels, 10 * 20 * 20 = 4000 input voxels.
  got = geometry.resampled_bytes(
    (10, 20, 20), (4, 1.5, 1.5), (2, 1, 1), channels=2, classes=3
  )
  assert got == 4 * (18000 * 2 + 18000 * 3 + 4000 * 3)
  with pytest.raises(ValueError, match='classes must be an integer >= 1'):
    geometry.resampled_bytes((4, 4, 4), (1, 1, 1), (1, 1, 1), channels=1, classes=0)


# Images.


@pytest.mark.parametrize(
  'shape, spacing, target',
  [
    ((6, 9, 10), (1, 1, 1), (1.5, 0.8, 1.2)),
    ((9, 10), (1, 1), (0.7, 2)),
    ((4, 10, 10), (5, 1, 1), (2.5, 0.6, 0.6)),
  ],
)
def test_resample_image_shape_is_the_target(shape, spacing, target):
  image = np.random.default_rng(0).normal(size=shape + (2,)).astype(np.float64)
  out = geometry.resample_image(image, spacing, target)
  assert out.shape == geometry.resampled_shape(shape, spacing, target) + (2,)
  assert out.dtype == np.float32
  forced = geometry.resample_image(image, spacing, target, shape=(3,) * len(shape))
  assert forced.shape == (3,) * len(shape) + (2,)


def test_resample_image_same_shape_is_a_copy():
  image = np.random.default_rng(0).normal(size=(4, 5, 6, 1)).astype(np.float32)
  out = geometry.resample_image(image, (1, 1, 1), (1.1, 1.05, 0.95))  # Rounds to (4, 5, 6).
  np.testing.assert_array_equal(out, image)
  assert out is not image and not np.shares_memory(out, image)


def test_resample_image_keeps_a_linear_ramp():
  # Value = world position of the voxel centre: 2 * d_mm + w_mm, with voxel i
  # of spacing s centred at (i + 0.5) * s. Area alignment keeps the field of
  # view, so the output voxel o at spacing t holds the ramp at (o + 0.5) * t.
  d, h, w = np.indices((9, 4, 12), dtype=np.float64)
  image = (2 * (d + 0.5) + (w + 0.5))[..., None]
  out = geometry.resample_image(image, (1, 1, 1), (1.5, 1, 0.75))
  assert out.shape == (6, 4, 16, 1)
  od, _, ow = np.indices((6, 4, 16), dtype=np.float64)
  want = 2 * (od + 0.5) * 1.5 + (ow + 0.5) * 0.75
  # The interior: at least 3 input voxels from the edges, where the spline's
  # edge condition (repeated edge values) no longer shows.
  np.testing.assert_allclose(out[2:4, :, 5:11, 0], want[2:4, :, 5:11], atol=5e-3)
  # Hand value: output (2, ., 5) is centred at d = 3.75 mm, w = 4.125 mm.
  np.testing.assert_allclose(out[2, 1, 5, 0], 2 * 3.75 + 4.125, atol=5e-3)
  # Near the edge the ramp is not kept (a corner-aligned zoom would be exact there).
  assert abs(out[0, 0, 0, 0] - want[0, 0, 0]) > 0.05


def test_separate_z_uses_nearest_along_the_thick_axis():
  image = np.random.default_rng(1).normal(size=(6, 8, 8, 1)).astype(np.float32)
  out = geometry.resample_image(image, (5, 1, 1), (2.5, 1, 1))
  assert out.shape == (12, 8, 8, 1)
  # Output slice o is centred on input coordinate (o + 0.5) / 2 - 0.5: 0, 0, 1, 1, ...
  for o in range(12):
    np.testing.assert_array_equal(out[o], image[o // 2])
  linear = geometry.resample_image(image, (5, 1, 1), (2.5, 1, 1), order_thick=1)
  np.testing.assert_allclose(linear[1], 0.75 * image[0] + 0.25 * image[1], atol=1e-6)
  # In-plane change as well: slices are resampled apart, then repeated along z.
  both = geometry.resample_image(image, (5, 1, 1), (2.5, 0.5, 0.5))
  assert both.shape == (12, 16, 16, 1)
  np.testing.assert_array_equal(both[4], both[5])
  assert not np.allclose(both[5], both[6])


# Labels and probabilities.


def test_label_round_trip_through_a_finer_grid_is_exact():
  spheres = [
    ((12, 12, 12), (3, 3, 3), 1),
    ((30, 30, 14), (4, 4, 4), 2),
    ((14, 32, 32), (3.5, 3.5, 3.5), 1),
    ((34, 12, 30), (3, 3, 3), 2),
  ]
  label = _balls((48, 48, 48), spheres)
  target = (0.5, 0.4, 0.6)  # Finer on every axis: nothing is lost.
  there = geometry.resample_label(label, (1, 1, 1), target, num_classes=3)
  assert there.shape == (96, 120, 80) and there.dtype == np.int32
  back = geometry.resample_label(there, target, (1, 1, 1), num_classes=3, shape=label.shape)
  for k in (1, 2):
    assert _dice(label, back, k) >= 0.99


_ISSUE_BALLS = [
  ((12, 12, 12), (3, 3, 3), 1),
  ((12, 34, 30), (3.5, 3.5, 3.5), 1),
  ((34, 14, 32), (4, 4, 4), 1),
  ((34, 34, 12), (3, 3, 3), 2),
  ((24, 24, 24), (4, 4, 4), 2),
  ((36, 36, 36), (3.5, 3.5, 3.5), 2),
]


def test_label_round_trip_through_a_coarser_grid_keeps_every_blob():
  # Through (1.5, 0.8, 1.2) mm: every ball comes back, in place (no half-voxel
  # shift, as corner-aligned zooming gives), with its boundary off by at most
  # about a voxel.
  label = _balls((48, 48, 48), _ISSUE_BALLS)
  target = (1.5, 0.8, 1.2)
  there = geometry.resample_label(label, (1, 1, 1), target, num_classes=3)
  assert there.shape == (32, 60, 40)
  back = geometry.resample_label(there, target, (1, 1, 1), num_classes=3, shape=label.shape)
  for k in (1, 2):
    assert _dice(label, back, k) >= 0.85
  components, count = ndimage.label(label > 0)
  got, got_count = ndimage.label(back > 0)
  assert got_count == count == 6
  index = range(1, count + 1)
  want = np.array(ndimage.center_of_mass(label > 0, components, index))
  have = np.array(ndimage.center_of_mass(back > 0, components, index))
  assert np.max(np.abs(want - have)) < 0.4


def test_anisotropic_label_round_trip():
  # Stored at 4 mm slices; blobs elongated along z (3 slices, 12 mm, vs 7 voxels
  # in-plane). 4 -> 2 mm repeats each slice (nearest along the thick z), and
  # 2 -> 4 mm picks one of each pair back: the round trip is exact.
  spheres = [
    ((5, 12, 12), (1.5, 3.5, 3.5), 1),
    ((8, 30, 28), (1.5, 4, 3), 2),
    ((3, 34, 10), (1.2, 3, 3), 1),
  ]
  label = _balls((12, 40, 40), spheres)
  there = geometry.resample_label(label, (4, 1, 1), (2, 1, 1), num_classes=3)
  assert there.shape == (24, 40, 40)
  np.testing.assert_array_equal(there[::2], label)
  np.testing.assert_array_equal(there[1::2], label)
  back = geometry.resample_label(
    there, (2, 1, 1), (4, 1, 1), num_classes=3, shape=label.shape
  )
  for k in (1, 2):
    assert _dice(label, back, k) >= 0.99


def test_resample_label_keeps_an_ignore_value():
  label = np.zeros((8, 8, 8), dtype=np.uint8)
  label[2:6, 2:6, 2:6] = 1
  label[:, :, 7] = 255
  out = geometry.resample_label(label, (1, 1, 1), (0.5, 0.5, 0.5), num_classes=2)
  assert out.shape == (16, 16, 16)
  assert set(np.unique(out)) == {0, 1, 255}
  np.testing.assert_array_equal(out[:, :, 14:], 255)
  np.testing.assert_array_equal(out[:, :, :14] == 255, False)
  # The box [2, 6)^3 becomes [4, 12)^3 but for its 8 corners: there class 1's
  # indicator interpolates to 0.75^3 = 0.42 < 0.58 for background.
  box = np.zeros((16, 16, 16), dtype=bool)
  box[4:12, 4:12, 4:12] = True
  for corner in np.ndindex(2, 2, 2):
    box[tuple(4 + 7 * np.array(corner))] = False
  np.testing.assert_array_equal(out == 1, box)


def test_resample_label_2d():
  label = np.zeros((6, 6), dtype=np.int64)
  label[2:4, 2:4] = 2
  out = geometry.resample_label(label, (1, 1), (0.5, 0.5), num_classes=3)
  expected = np.zeros((12, 12), dtype=np.int32)
  expected[4:8, 4:8] = 2
  np.testing.assert_array_equal(out, expected)


def test_resample_probabilities_shape_and_constant_field():
  probs = np.full((10, 12, 14, 3), 0.25, dtype=np.float32)
  probs[..., 1] = 0.5
  out = geometry.resample_probabilities(
    probs, (1.5, 0.8, 1.2), (1, 1, 1), shape=(15, 9, 17)
  )
  assert out.shape == (15, 9, 17, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], 0.25, atol=1e-6)
  np.testing.assert_allclose(out[..., 1], 0.5, atol=1e-6)
  thick = geometry.resample_probabilities(probs, (5, 1, 1), (2, 1, 1), shape=(25, 12, 14))
  np.testing.assert_allclose(thick[..., 1], 0.5, atol=1e-6)


# Bad arguments.


@pytest.mark.parametrize(
  'spacing, target, match',
  [
    ((1, 1), (1, 1, 1), 'spacing must have one value per spatial axis'),
    ((1, 1, 1), (1, 1), 'target must have one value per spatial axis'),
    ((0, 1, 1), (1, 1, 1), 'spacing must be positive and finite'),
    ((1, 1, 1), (1, np.inf, 1), 'target must be positive and finite'),
    ((1, -1, 1), (1, 1, 1), 'spacing must be positive and finite'),
  ],
)
def test_bad_spacing(spacing, target, match):
  image = np.zeros((4, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match=match):
    geometry.resample_image(image, spacing, target)
  with pytest.raises(ValueError, match=match):
    geometry.resample_label(image[..., 0].astype(int), spacing, target, num_classes=2)
  with pytest.raises(ValueError, match=match):
    geometry.resample_probabilities(image, spacing, target, shape=(2, 2, 2))


def test_bad_arguments():
  label = np.zeros((4, 4, 4), np.int64)
  with pytest.raises(ValueError, match='num_classes'):
    geometry.resample_label(label, (1, 1, 1), (2, 2, 2), num_classes=0)
  with pytest.raises(ValueError, match='integers'):
    geometry.resample_label(label.astype(np.float32), (1, 1, 1), (2, 2, 2), num_classes=2)
  with pytest.raises(ValueError, match='shape must be 3 positive integers'):
    geometry.resample_image(label[..., None], (1, 1, 1), (2, 2, 2), shape=(2, 0, 2))
  with pytest.raises(ValueError, match='image must be'):
    geometry.resample_image(np.zeros((4, 4)), (1,), (2,))
  with pytest.raises(ValueError, match='order'):
    geometry.resample_image(label[..., None], (1, 1, 1), (2, 2, 2), order=7)
