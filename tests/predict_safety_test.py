"""The predict command never overwrites its inputs, never loses a prediction to a
name collision, and names non-finite input values and channel files on other grids
before predicting."""

import os
import shutil
import subprocess
import sys

import nibabel
import numpy as np
from PIL import Image
import pytest

from tests import inference_test
from unet_jax.inference import inputs
from unet_jax.inference import predict

ROOT = inference_test.ROOT
run2d = inference_test.run2d  # The tiny trained 2D run (module-scoped fixture).


def _inputs(data, folder):
  """A copy of the val/ images of a data folder in `folder`; {name: bytes} of each."""
  shutil.copytree(data / 'val' / 'images', folder)
  return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def _unchanged(folder, before):
  return {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_an_output_folder_holding_the_inputs_is_refused_before_the_model_loads(
  tmp_path,
):
  images = tmp_path / 'images'
  inference_test._write_2d(tmp_path / 'data', np.random.default_rng(0))
  before = _inputs(tmp_path / 'data', images)
  missing = str(tmp_path / 'no_run')  # Refused before the run is even looked at.
  with pytest.raises(ValueError) as e:
    predict.run(missing, str(images), str(images))
  assert str(e.value) == (
    f'--output {str(images)!r} holds the inputs of --input {str(images)!r}'
    f' ({images / "case0.png"}): predictions would overwrite them; give another'
    ' output folder.'
  )
  one = images / 'case1.png'
  with pytest.raises(ValueError, match=r'holds the inputs of --input .*case1.png'):
    predict.run(missing, str(one), str(images))
  alias = tmp_path / 'alias'
  os.symlink(images, alias)  # The same folder by another path.
  with pytest.raises(ValueError, match=r"--output '.*alias' holds the inputs"):
    predict.run(missing, str(images), str(alias))
  with pytest.raises(ValueError, match=r"--output '.*' holds the inputs"):
    predict.run(missing, str(images), str(images.parent / 'images' / 'overlays' / '..'))
  assert _unchanged(images, before)


def test_predicting_beside_the_inputs_keeps_them(run2d, tmp_path):
  workdir, data = run2d
  images = tmp_path / 'images'
  before = _inputs(data, images)
  with pytest.raises(ValueError, match='predictions would overwrite them'):
    predict.run(workdir, str(images), str(images))
  assert _unchanged(images, before)
  rows = predict.run(workdir, str(images), str(tmp_path / 'out'))
  assert sorted(os.listdir(tmp_path / 'out')) == [
    'case0.png',
    'case1.png',
    'case2.png',
    'overlays',
  ]
  assert rows == []  # No masks/ beside the copied images.


def test_an_output_that_is_a_file_is_one_line_from_launch(tmp_path):
  taken = tmp_path / 'taken.png'
  taken.write_bytes(b'not a folder')
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--mode=predict',
      f'--workdir={tmp_path / "run"}',
      f'--input={tmp_path}',
      f'--output={taken}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    f'Error: --output {str(taken)!r} is a file; give a folder (it is created if missing).'
  )
  assert taken.read_bytes() == b'not a folder'


@pytest.mark.parametrize('names', [('a.jpg', 'a.jpeg'), ('a.png', 'a.jpg')])
def test_inputs_with_one_output_name_are_refused(run2d, tmp_path, names):
  workdir, _ = run2d
  folder = tmp_path / 'in'
  folder.mkdir()
  for name in names + ('b.png',):
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(folder / name)
  with pytest.raises(ValueError) as e:
    predict.run(workdir, str(folder), str(tmp_path / 'out'))
  first, second = sorted(str(folder / n) for n in names)
  assert str(e.value) == (
    '1 output name(s) would be written by several inputs (predictions would be'
    f' lost; rename the inputs):\n  a: {first}, {second}'
  )
  assert not (tmp_path / 'out').exists()


def _float_tiff(path, image):
  Image.fromarray(image.astype(np.float32), mode='F').save(path)


def test_nonfinite_input_values_are_named_before_anything_is_predicted(run2d, tmp_path):
  workdir, data = run2d
  folder = tmp_path / 'in'
  folder.mkdir()
  image = np.asarray(Image.open(data / 'val' / 'images' / 'case0.png'), np.float32)
  _float_tiff(folder / 'a.tif', image)  # Predicted first, if anything is.
  broken = image.copy()
  broken[5, 6] = np.nan
  broken[0, :2] = np.inf
  _float_tiff(folder / 'b.tif', broken)
  with pytest.raises(ValueError) as e:
    predict.run(workdir, str(folder), str(tmp_path / 'out'))
  assert (
    f'{folder / "b.tif"}: 3 non-finite value(s) (NaN or Inf) of 576; set'
    " config.data.nonfinite='zero' (or --nonfinite=zero) to predict them as 0."
  ) in str(e.value)
  assert 'a.tif' not in str(e.value)
  assert not (tmp_path / 'out').exists()
  # As zeros: the mask of the same image with 0 in their place.
  predict.run(workdir, str(folder), str(tmp_path / 'out'), nonfinite='zero')
  zeroed = tmp_path / 'zeroed'
  zeroed.mkdir()
  _float_tiff(zeroed / 'b.tif', np.nan_to_num(broken, nan=0, posinf=0))
  predict.run(workdir, str(zeroed), str(tmp_path / 'out_zeroed'))
  mask = np.asarray(Image.open(tmp_path / 'out' / 'b.tif'))
  assert mask.sum() > 0  # Not all background, as with NaN.
  np.testing.assert_array_equal(
    mask, np.asarray(Image.open(tmp_path / 'out_zeroed' / 'b.tif'))
  )


def test_channel_files_of_one_case_on_other_grids_are_named(tmp_path):
  folder = tmp_path / 'imagesTs'
  folder.mkdir()
  volume = np.zeros((6, 5, 4), np.float32)
  shifted = np.diag([1.0, 1.0, 2.0, 1.0])
  shifted[:3, 3] = (0, 0, 10.0)
  for name, affine in (
    ('case_0000', np.diag([1.0, 1.0, 2.0, 1.0])),
    ('case_0001', shifted),
  ):
    nibabel.save(nibabel.Nifti1Image(volume, affine), folder / f'{name}.nii.gz')
  cases = inputs.list_inputs(str(folder), ndim=3, num_channels=2)
  assert [c.stem for c in cases] == ['case']
  with pytest.raises(ValueError) as e:
    inputs.check_inputs(cases, ndim=3, num_channels=2, memory=2**40)
  assert str(e.value) == (
    '1 input(s) cannot be predicted:\n'
    f'  {folder / "case_0001.nii.gz"}: grid differs from that of'
    f' {folder / "case_0000.nii.gz"}: origin differs ([0.0, 0.0, 0.0] vs'
    ' [0.0, 0.0, 10.0]).'
  )


def test_a_dangling_symlink_among_the_inputs_is_named(tmp_path):
  folder = tmp_path / 'in'
  folder.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / 'a.png')
  os.symlink(tmp_path / 'gone.png', folder / 'b.png')
  with pytest.raises(ValueError) as e:
    inputs.list_inputs(str(folder), ndim=2)
  assert str(e.value) == (
    f'{folder / "b.png"}: a symbolic link to {tmp_path / "gone.png"}, which does not exist.'
  )
