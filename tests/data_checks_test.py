"""The folder checks of training data: non-finite voxels, mismatched grids, dangling
symlinks (both layouts), and `config.data.nonfinite`."""

import os

import nibabel
import numpy as np
from PIL import Image
import pytest

from tests import medical_test
from tests import nnunet_test
from unet_jax import config as config_lib
from unet_jax.data import builder
from unet_jax.data import folder
from unet_jax.data import geometry
from unet_jax.data import nnunet


def _volume_pair(root, split, name, *, image=None):
  """A (6, 8, 10) NIfTI image and mask at spacing (2, 1, 1); returns their paths."""
  label = np.zeros((6, 8, 10), np.uint8)
  label[1:4, 2:6, 3:7] = 1
  if image is None:
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape) % 5
  return folder.write_pair(root, split, name, image, label, spacing=(2.0, 1.0, 1.0))


def _with_nonfinite(values):
  image = np.ones((6, 8, 10), np.float32)
  image.flat[: len(values)] = values
  return image


def _check_folder(root, **kwargs):
  return folder.validate(folder.list_pairs(root, ndim=3), ndim=3, **kwargs)


def test_the_nonfinite_option_takes_error_or_zero():
  assert config_lib.DataOptions().nonfinite == 'error'
  assert config_lib.DataOptions.from_config({'nonfinite': 'zero'}).nonfinite == 'zero'
  assert config_lib.DataOptions().to_config().nonfinite == 'error'
  with pytest.raises(ValueError, match=r"config.data.nonfinite='drop' is not one of"):
    config_lib.DataOptions(nonfinite='drop')


def test_the_folder_check_names_every_image_with_nonfinite_voxels(tmp_path):
  _volume_pair(tmp_path, 'train', 'good')
  bad, _ = _volume_pair(
    tmp_path, 'train', 'bad', image=_with_nonfinite([np.nan, np.inf, -np.inf])
  )
  worse, _ = _volume_pair(tmp_path, 'val', 'worse', image=_with_nonfinite([np.nan]))
  with pytest.raises(folder.BadDataError) as e:
    _check_folder(tmp_path)
  message = str(e.value)
  assert message.startswith('2 problem(s) in the segmentation folder')
  assert f'{bad}: 3 non-finite voxel(s) (NaN or Inf) of 480' in message
  assert f'{worse}: 1 non-finite voxel(s) (NaN or Inf) of 480' in message
  assert "config.data.nonfinite='zero'" in message
  assert 'good' not in message


def test_nonfinite_zero_accepts_them_and_the_build_reads_zeros(tmp_path, caplog):
  bad, mask = _volume_pair(
    tmp_path, 'train', 'bad', image=_with_nonfinite([np.nan, np.inf, 7.0])
  )
  _volume_pair(tmp_path, 'val', 'good')
  with caplog.at_level('WARNING'):
    metadata = _check_folder(tmp_path, nonfinite='zero')
  assert metadata['num_examples'] == {'train': 1, 'val': 1}
  assert f'{bad}: 2 non-finite voxel(s)' in caplog.text
  image, _, _ = builder.read_case(
    builder.Case('bad', (bad,), mask), ndim=3, nonfinite='zero'
  )
  assert np.isfinite(image).all()
  # Stored (x, y, z) voxels 0, 1, 2 are canonical (d, h, w) = (0, 0, 0..2).
  assert image[0, 0, :3, 0].tolist() == [0.0, 0.0, 7.0]
  assert float(image.sum()) == 480 - 3 + 7
  with pytest.raises(ValueError, match=r"nonfinite must be 'error' or 'zero'"):
    folder.validate(folder.list_pairs(tmp_path, ndim=3), ndim=3, nonfinite='nan')


def test_the_nnunet_check_names_every_image_with_nonfinite_voxels(tmp_path):
  root = nnunet_test._nnunet_3d(tmp_path)
  path = f'{root}/imagesTr/case_001_0001.nii.gz'
  array = nnunet_test._voxels('case_001', 8)
  array[0, 0, :4] = [np.nan, np.nan, np.inf, 1.0]
  nnunet_test._save(path, array, nnunet_test._affine('case_001', 2.0))
  layout = nnunet.read_layout(root)
  with pytest.raises(folder.BadDataError) as e:
    nnunet.check(layout)
  assert str(e.value).startswith('1 problem(s) in the nnU-Net data set')
  assert f'{path}: 3 non-finite voxel(s) (NaN or Inf) of 960' in str(e.value)
  assert nnunet.check(layout, nonfinite='zero')['num_examples']['train'] == 5


def _mirror_mask(mask_path):
  """Rewrites a mask with its x axis reversed and its affine mirrored along x (origin
  kept): same shape and spacing, another orientation."""
  stored = nibabel.load(mask_path)
  affine = stored.affine.copy()
  affine[0, 0] = -affine[0, 0]
  array = np.ascontiguousarray(np.asarray(stored.dataobj)[::-1])
  nibabel.save(nibabel.Nifti1Image(array, affine), mask_path)
  return affine


def test_an_image_and_mask_of_other_orientations_are_named(tmp_path):
  image, mask = _volume_pair(tmp_path, 'train', 'case0')
  _volume_pair(tmp_path, 'val', 'case1')
  _mirror_mask(mask)
  with pytest.raises(folder.BadDataError) as e:
    _check_folder(tmp_path)
  message = str(e.value)
  assert message.startswith('1 problem(s)')
  assert f'{image}: grid differs from that of its mask {mask}' in message
  assert (
    'direction differs ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]'
    ' vs [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])'
  ) in message
  assert 'spacing differs' not in message and 'origin differs' not in message


def test_grid_differences_names_each_part_within_the_tolerance():
  a = np.diag([2.0, 1.0, 1.0, 1.0])
  a[:3, 3] = (100.0, -50.0, 20.0)
  assert geometry.grid_differences(a, a) == []
  nudged = a.copy()
  nudged[0, 3] += 0.05  # 5e-4 of the largest entry, 100.
  assert geometry.grid_differences(a, nudged) == []
  assert geometry.grid_differences(a, nudged, tolerance=1e-4) == [
    'origin differs ([100.0, -50.0, 20.0] vs [100.05, -50.0, 20.0])'
  ]
  finer = a.copy()
  finer[0, 0] = 1.9
  assert geometry.grid_differences(a, finer) == [
    'spacing differs ([2.0, 1.0, 1.0] vs [1.9, 1.0, 1.0])'
  ]


def test_the_nnunet_check_names_what_differs(tmp_path):
  root = nnunet_test._nnunet_3d(tmp_path)
  path = f'{root}/labelsTr/case_003.nii.gz'
  affine = nnunet_test._affine('case_003', 2.5)
  affine[1, 1] = -affine[1, 1]
  nnunet_test._save(path, nnunet_test._label('case_003', 8), affine)
  with pytest.raises(folder.BadDataError) as e:
    nnunet.check(nnunet.read_layout(root))
  assert f'{path}: affine differs from that of {root}/imagesTr/case_003_0000' in str(
    e.value
  )
  assert 'direction differs' in str(e.value)


def test_a_dangling_symlink_is_named_with_its_target(tmp_path):
  _volume_pair(tmp_path, 'train', 'case0')
  _volume_pair(tmp_path, 'val', 'case1')
  link = tmp_path / 'train' / 'images' / 'case2.nii.gz'
  os.symlink(tmp_path / 'elsewhere' / 'case2.nii.gz', link)
  other = tmp_path / 'val' / 'images' / 'notes.txt'
  other.write_text('x')
  with pytest.raises(folder.BadDataError) as e:
    folder.list_pairs(tmp_path, ndim=3)
  message = str(e.value)
  assert message.startswith('2 problem(s)')
  assert (
    f'{link}: a symbolic link to {tmp_path / "elsewhere" / "case2.nii.gz"},'
    ' which does not exist'
  ) in message
  assert f'{other}: unknown extension' in message


def test_a_dangling_symlink_in_an_nnunet_data_set_is_named(tmp_path):
  root = nnunet_test._nnunet_3d(tmp_path)
  link = f'{root}/labelsTr/case_000.nii.gz'
  os.remove(link)
  os.symlink(f'{tmp_path}/gone.nii.gz', link)
  with pytest.raises(folder.BadDataError) as e:
    nnunet.read_layout(root)
  assert f'{link}: a symbolic link to {tmp_path}/gone.nii.gz, which does not exist' in (
    str(e.value)
  )


def test_a_2d_float_tiff_with_nan_is_named(tmp_path):
  image = np.ones((8, 8), np.float32)
  image[2, 3] = np.nan
  root = tmp_path
  for split in ('train', 'val'):
    folder.write_pair(root, split, 'a', np.ones((8, 8), np.uint8), np.zeros((8, 8)))
  path = root / 'train' / 'images' / 'b.tif'
  Image.fromarray(image).save(path)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'train' / 'masks' / 'b.png')
  with pytest.raises(folder.BadDataError, match=r'b.tif: 1 non-finite voxel'):
    folder.validate(folder.list_pairs(root, ndim=2), ndim=2, num_classes=2)


def test_a_folder_with_nonfinite_voxels_builds_with_zeros_only_when_asked(tmp_path):
  bad, _ = _volume_pair(
    tmp_path / 'data', 'train', 'bad', image=_with_nonfinite([np.nan, -np.inf])
  )
  _volume_pair(tmp_path / 'data', 'val', 'good')
  with pytest.raises(folder.BadDataError, match=f'{bad}: 2 non-finite voxel'):
    medical_test._open(tmp_path / 'data', tmp_path / 'tfds')
  data = medical_test._open(tmp_path / 'data', tmp_path / 'tfds', nonfinite='zero')
  image = data.source.read(data.split('train'), 0).image
  assert np.isfinite(image).all()
  assert float(image.sum()) == 480 - 2  # Ones, with 0 for the NaN and the -Inf.
