"""Tests for unet_jax.datasets: the TFDS builders, the folder reader and Pet's trimaps."""

import gzip
import pathlib

import numpy as np
from PIL import Image
from scipy import ndimage
import pytest
import tensorflow_datasets as tfds

from unet_jax import datasets
from unet_jax.datasets import pets
from unet_jax.datasets import segmentation_folder as sf
from unet_jax.datasets import synthetic


def _build(name, config, data_dir):
  builder = tfds.builder(name, config=config, data_dir=str(data_dir))
  builder.download_and_prepare(file_format='array_record')
  return builder


def _all(source):
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def shapes_tiny(tmp_path_factory):
  return _build('synthetic_shapes', 'tiny', tmp_path_factory.mktemp('shapes'))


@pytest.fixture(scope='module')
def volumes_tiny(tmp_path_factory):
  return _build('synthetic_volumes', 'tiny', tmp_path_factory.mktemp('volumes'))


# ----------------------------------------------------------------- synthetic


def test_builders_are_registered():
  assert isinstance(tfds.builder('synthetic_shapes'), datasets.SyntheticShapes)
  assert isinstance(
      tfds.builder('synthetic_volumes/anisotropic'), datasets.SyntheticVolumes
  )
  assert isinstance(tfds.builder('segmentation_folder/3d'), datasets.SegmentationFolder)
  assert tfds.builder('synthetic_shapes').builder_config.name == 'binary'
  assert tfds.builder('synthetic_shapes').builder_config.foreground_fraction == 0.05


def test_tfds_load_finds_synthetic_shapes(tmp_path):
  ds = tfds.load('synthetic_shapes/tiny', split='validation', data_dir=str(tmp_path))
  examples = list(tfds.as_numpy(ds))
  assert len(examples) == 8
  assert examples[0]['image'].shape == (32, 32, 1)
  assert examples[0]['label'].shape == (32, 32)


def test_synthetic_shapes_examples(shapes_tiny):
  info = shapes_tiny.info
  assert dict(info.metadata)['num_classes'] == 2
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      'train': 16,
      'validation': 8,
      'test': 8,
  }
  examples = _all(shapes_tiny.as_data_source('train'))
  for ex in examples:
    assert ex['image'].shape == (32, 32, 1) and ex['image'].dtype == np.uint8
    assert ex['label'].shape == (32, 32) and ex['label'].dtype == np.uint8
    assert set(np.unique(ex['label'])) <= {0, 1}
  fraction = np.mean([(ex['label'] > 0).mean() for ex in examples])
  assert 0.03 < fraction < 0.08
  # Learnable: the foreground is clearly brighter than the background.
  for ex in examples:
    image, fg = ex['image'][..., 0].astype(float), ex['label'] > 0
    if fg.any():
      assert image[fg].mean() - image[~fg].mean() > 2 * image[~fg].std()


def test_synthetic_is_deterministic(shapes_tiny, tmp_path):
  again = _build('synthetic_shapes', 'tiny', tmp_path)
  for split in ('train', 'test'):
    for a, b in zip(
        _all(shapes_tiny.as_data_source(split)), _all(again.as_data_source(split))
    ):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  # Another seed gives other data.
  other = np.random.default_rng([1, 0, 0])
  image, _ = synthetic.render_example(
      other, shape=(32, 32), num_classes=2, foreground_fraction=0.05
  )
  first = synthetic.render_example(
      np.random.default_rng([0, 0, 0]),
      shape=(32, 32),
      num_classes=2,
      foreground_fraction=0.05,
  )[0]
  assert not np.array_equal(image, first)


@pytest.mark.parametrize('target', [0.05, 0.25])
def test_foreground_fraction_is_configurable(target):
  fractions = [
      (
          synthetic.render_example(
              np.random.default_rng(i),
              shape=(64, 64),
              num_classes=2,
              foreground_fraction=target,
          )[1]
          > 0
      ).mean()
      for i in range(40)
  ]
  assert abs(np.mean(fractions) - target) < 0.3 * target


def test_custom_config_builds(tmp_path):
  config = datasets.SyntheticConfig(
      name='fg25',
      shape=(24, 24),
      foreground_fraction=0.25,
      num_train=6,
      num_validation=2,
      num_test=0,
  )
  builder = _build('synthetic_shapes', config, tmp_path)
  assert set(builder.info.splits) == {'train', 'validation'}
  labels = [ex['label'] for ex in _all(builder.as_data_source('train'))]
  assert labels[0].shape == (24, 24)
  assert 0.15 < np.mean([(l > 0).mean() for l in labels]) < 0.35


def test_multiclass_has_every_class():
  assert tfds.builder('synthetic_shapes/multiclass').info.metadata['num_classes'] == 4
  for i in range(5):
    _, label = synthetic.render_example(
        np.random.default_rng(i), shape=(64, 64), num_classes=4, foreground_fraction=0.12
    )
    assert set(np.unique(label)) == {0, 1, 2, 3}


def test_synthetic_volumes(volumes_tiny):
  examples = _all(volumes_tiny.as_data_source('train'))
  assert len(examples) == 8
  assert examples[0]['image'].shape == (16, 32, 32, 1)
  assert examples[0]['label'].shape == (16, 32, 32)
  np.testing.assert_array_equal(examples[0]['spacing'], [1, 1, 1])
  assert 0.02 < np.mean([(ex['label'] > 0).mean() for ex in examples]) < 0.09


def test_anisotropic_volumes_squash_shapes_along_depth():
  assert tfds.builder('synthetic_volumes/anisotropic').info.metadata['spacing'] == [
      3.0,
      1.0,
      1.0,
  ]
  extents = {}
  for spacing in ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)):
    depth, width = [], []
    for i in range(6):
      _, label = synthetic.render_example(
          np.random.default_rng(i),
          shape=(32, 32, 32),
          num_classes=2,
          foreground_fraction=0.05,
          spacing=spacing,
      )
      components, count = ndimage.label(label > 0)
      for index in range(1, count + 1):
        fg = np.argwhere(components == index)
        depth.append(np.ptp(fg[:, 0]) + 1)
        width.append(np.ptp(fg[:, 2]) + 1)
    extents[spacing[0]] = np.mean(depth) / np.mean(width)
  assert extents[4.0] < 0.5 * extents[1.0]


# ----------------------------------------------------------------- segmentation_folder


def _make_folder_2d(
    root, *, rgb=False, sizes=((20, 24), (20, 24), (28, 16)), splits=('train', 'val')
):
  rng = np.random.default_rng(0)
  written = {}
  for split in splits:
    for i, (h, w) in enumerate(sizes):
      label = np.zeros((h, w), np.uint8)
      label[4:10, 5:12] = 1
      label[12:15, 2:6] = 2
      shape = (h, w, 3) if rgb else (h, w)
      image = rng.integers(0, 100, shape).astype(np.uint8)
      image[label > 0] += 120
      sf.write_pair(root, split, f'case{i}', image, label)
      written[(split, f'case{i}')] = (image, label)
  return written


def _make_folder_3d(root, *, spacing=(3.0, 0.5, 0.75)):
  rng = np.random.default_rng(1)
  written = {}
  for split in ('train', 'val'):
    for i in range(2):
      label = np.zeros((5, 12, 10), np.uint8)
      label[1:3, 2:6, 3:8] = 1
      image = rng.normal(size=(5, 12, 10)).astype(np.float32) + 3 * label
      sf.write_pair(root, split, f'vol{i}', image, label, spacing=spacing)
      written[(split, f'vol{i}')] = (image, label)
  return written


def test_folder_2d_builds_with_contents(tmp_path):
  written = _make_folder_2d(tmp_path / 'root')
  config = datasets.SegmentationFolderConfig(
      name='mine', ndim=2, root=str(tmp_path / 'root')
  )
  builder = _build('segmentation_folder', config, tmp_path / 'data')
  meta = builder.info.metadata
  assert meta['num_classes'] == 3 and meta['num_channels'] == 1
  assert meta['min_shape'] == [20, 16] and meta['max_shape'] == [28, 24]
  for split in ('train', 'val'):
    for ex in _all(builder.as_data_source(split)):
      image, label = written[(split, ex['id'].decode())]
      np.testing.assert_array_equal(ex['image'][..., 0], image)
      np.testing.assert_array_equal(ex['label'], label)


def test_folder_2d_rgb_and_tiff_via_manual_dir(tmp_path):
  root = tmp_path / 'root'
  written = _make_folder_2d(root, rgb=True, splits=('train',))
  image16 = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 100
  label = np.zeros((20, 24), np.uint8)
  label[:5] = 1
  Image.fromarray(image16).save(root / 'train' / 'images' / 'grey16.tif')
  Image.fromarray(label).save(root / 'train' / 'masks' / 'grey16.png')
  # Mixed channel counts are reported.
  with pytest.raises(datasets.BadDataError, match='grey16.tif'):
    sf.validate(sf.list_pairs(root, ndim=2), ndim=2)
  (root / 'train' / 'images' / 'grey16.tif').unlink()
  (root / 'train' / 'masks' / 'grey16.png').unlink()
  builder = tfds.builder('segmentation_folder/2d', data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=str(root)),
  )
  ex = builder.as_data_source('train')[0]
  np.testing.assert_array_equal(ex['image'], written[('train', ex['id'].decode())][0])
  assert ex['image'].shape[-1] == 3


def test_folder_reads_16_bit_tiff(tmp_path):
  root = tmp_path / 'root'
  image = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500
  label = np.zeros((12, 10), np.uint8)
  label[3:6] = 1
  sf.write_pair(root, 'train', 'a', image, label, image_format='tif')
  read, spacing = sf.read_image(str(root / 'train' / 'images' / 'a.tif'), ndim=2)
  assert spacing is None
  np.testing.assert_array_equal(read[..., 0], image.astype(np.float32))


def test_folder_3d_keeps_spacing_and_axis_order(tmp_path):
  written = _make_folder_3d(tmp_path / 'root')
  config = datasets.SegmentationFolderConfig(
      name='vols', ndim=3, root=str(tmp_path / 'root')
  )
  builder = _build('segmentation_folder', config, tmp_path / 'data')
  meta = builder.info.metadata
  assert meta['spacing'] == [3.0, 0.5, 0.75] and meta['num_classes'] == 2
  for ex in _all(builder.as_data_source('val')):
    image, label = written[('val', ex['id'].decode())]
    np.testing.assert_allclose(ex['image'][..., 0], image)
    np.testing.assert_array_equal(ex['label'], label)
    np.testing.assert_allclose(ex['spacing'], [3.0, 0.5, 0.75])


# Each bad input: (ndim, how to break a valid folder, file named in the error).
def _value_too_large(root):
  mask = root / 'train' / 'masks' / 'case1.png'
  Image.fromarray(np.full((20, 24), 3, np.uint8)).save(mask)
  return mask


def _shape_mismatch(root):
  mask = root / 'val' / 'masks' / 'case0.png'
  Image.fromarray(np.zeros((21, 24), np.uint8)).save(mask)
  return 'case0'


def _image_without_mask(root):
  (root / 'train' / 'masks' / 'case2.png').unlink()
  return root / 'train' / 'images' / 'case2.png'


def _mask_without_image(root):
  (root / 'val' / 'images' / 'case1.png').unlink()
  return root / 'val' / 'masks' / 'case1.png'


def _unreadable(root):
  path = root / 'train' / 'images' / 'case0.png'
  path.write_bytes(b'not a png at all')
  return path


def _truncated_png(root):
  path = root / 'train' / 'images' / 'case1.png'
  path.write_bytes(path.read_bytes()[:60])
  return path


def _empty_split(root):
  for path in (root / 'val' / 'images').iterdir():
    path.unlink()
  for path in (root / 'val' / 'masks').iterdir():
    path.unlink()
  return root / 'val'


def _volume_in_2d(root):
  path = root / 'train' / 'images' / 'case0.nii.gz'
  path.write_bytes(b'')
  (root / 'train' / 'images' / 'case0.png').unlink()
  return path


def _multipage_tiff_in_2d(root):
  path = root / 'train' / 'images' / 'case0.tif'
  frames = [Image.fromarray(np.zeros((20, 24), np.uint8)) for _ in range(3)]
  frames[0].save(path, save_all=True, append_images=frames[1:])
  (root / 'train' / 'images' / 'case0.png').unlink()
  return path


def _mask_0_255(root):
  for split in ('train', 'val'):
    for path in (root / split / 'masks').iterdir():
      mask = np.asarray(Image.open(path))
      Image.fromarray(((mask > 0) * 255).astype(np.uint8)).save(path)
  return 'mask value 255'


_BAD_2D = {
    'value_at_num_classes': (_value_too_large, 3),
    'shape_mismatch': (_shape_mismatch, None),
    'image_without_mask': (_image_without_mask, None),
    'mask_without_image': (_mask_without_image, None),
    'unreadable': (_unreadable, None),
    'truncated': (_truncated_png, None),
    'empty_split': (_empty_split, None),
    'volume_in_2d_config': (_volume_in_2d, None),
    'multipage_tiff_in_2d_config': (_multipage_tiff_in_2d, None),
    'mask_0_255_inferred': (_mask_0_255, None),
}


@pytest.mark.parametrize('case', sorted(_BAD_2D))
def test_bad_2d_folder_names_the_file(tmp_path, case):
  root = tmp_path / 'root'
  _make_folder_2d(root)
  breaker, num_classes = _BAD_2D[case]
  culprit = breaker(root)
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(sf.list_pairs(root, ndim=2), ndim=2, num_classes=num_classes)
  assert str(culprit.name if isinstance(culprit, pathlib.Path) else culprit) in str(
      error.value
  )
  assert isinstance(error.value, ValueError)


def test_bad_2d_folder_fails_the_builder_before_writing(tmp_path):
  root = tmp_path / 'root'
  _make_folder_2d(root)
  _value_too_large(root)
  config = datasets.SegmentationFolderConfig(
      name='bad', ndim=2, root=str(root), num_classes=3
  )
  with pytest.raises(datasets.BadDataError, match='case1.png'):
    _build('segmentation_folder', config, tmp_path / 'data')
  assert not list((tmp_path / 'data').glob('**/*.array_record*'))


def _truncated_nifti(root):
  path = root / 'train' / 'images' / 'vol1.nii.gz'
  path.write_bytes(path.read_bytes()[:100])
  return path


def _corrupt_gzip_mask(root):
  path = root / 'val' / 'masks' / 'vol0.nii.gz'
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw[:200]))
  return path


def _image_in_3d(root):
  path = root / 'train' / 'images' / 'vol0.png'
  Image.fromarray(np.zeros((12, 10), np.uint8)).save(path)
  (root / 'train' / 'images' / 'vol0.nii.gz').unlink()
  return path


def _volume_shape_mismatch(root):
  sf.write_pair(
      root,
      'train',
      'vol1',
      np.zeros((5, 12, 11), np.float32),
      np.zeros((5, 12, 10), np.uint8),
  )
  return 'vol1'


def _spacing_mismatch(root):
  import nibabel  # pylint: disable=g-import-not-at-top

  path = root / 'val' / 'masks' / 'vol1.nii.gz'
  data = np.asarray(nibabel.load(path).dataobj)
  nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), path)
  return 'vol1'


def _float_mask(root):
  import nibabel  # pylint: disable=g-import-not-at-top

  path = root / 'train' / 'masks' / 'vol0.nii.gz'
  nibabel.save(
      nibabel.Nifti1Image(np.full((10, 12, 5), 0.5, np.float32), np.eye(4)), path
  )
  return path


_BAD_3D = {
    'truncated_volume': _truncated_nifti,
    'corrupt_mask': _corrupt_gzip_mask,
    'image_in_3d_config': _image_in_3d,
    'shape_mismatch': _volume_shape_mismatch,
    'spacing_mismatch': _spacing_mismatch,
    'non_integer_mask': _float_mask,
}


@pytest.mark.parametrize('case', sorted(_BAD_3D))
def test_bad_3d_folder_names_the_file(tmp_path, case):
  root = tmp_path / 'root'
  _make_folder_3d(root)
  culprit = _BAD_3D[case](root)
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(sf.list_pairs(root, ndim=3), ndim=3)
  assert str(culprit.name if isinstance(culprit, pathlib.Path) else culprit) in str(
      error.value
  )


def test_every_problem_is_listed(tmp_path):
  root = tmp_path / 'root'
  _make_folder_2d(root)
  _image_without_mask(root)
  _mask_without_image(root)
  with pytest.raises(datasets.BadDataError) as error:
    sf.list_pairs(root, ndim=2)
  assert 'case2.png' in str(error.value) and 'case1.png' in str(error.value)
  assert '2 problem(s)' in str(error.value)


def test_missing_root_and_split_folders(tmp_path):
  with pytest.raises(datasets.BadDataError, match='does not exist'):
    sf.list_pairs(tmp_path / 'nowhere', ndim=2)
  (tmp_path / 'root' / 'other').mkdir(parents=True)
  with pytest.raises(datasets.BadDataError, match='no split folder'):
    sf.list_pairs(tmp_path / 'root', ndim=2)
  (tmp_path / 'root' / 'train' / 'images').mkdir(parents=True)
  with pytest.raises(datasets.BadDataError, match='masks.*missing folder'):
    sf.list_pairs(tmp_path / 'root', ndim=2)


# ----------------------------------------------------------------- oxford_iiit_pet


def test_pet_trimap_becomes_classes():
  trimap = np.array([[1, 2], [3, 2]], np.uint8)[..., None]
  image = np.zeros((2, 2, 3), np.uint8)
  _, label = pets.to_image_label(
      {'image': image, 'segmentation_mask': trimap, 'file_name': 'a.jpg'}
  )
  # Background (trimap 2) is class 0, the pet (1) class 1, the border (3) class 2.
  np.testing.assert_array_equal(label, [[1, 0], [2, 0]])
  assert pets.CLASS_NAMES == ('background', 'pet', 'border')


def test_pet_bad_trimap_names_the_file():
  image = np.zeros((2, 2, 3), np.uint8)
  with pytest.raises(ValueError, match='Bengal_7.jpg'):
    pets.to_image_label(
        {
            'image': image,
            'segmentation_mask': np.zeros((2, 2, 1), np.uint8),
            'file_name': b'Bengal_7.jpg',
        }
    )
  with pytest.raises(ValueError, match='pug_2.jpg.*shape'):
    pets.to_image_label(
        {
            'image': image,
            'segmentation_mask': np.ones((3, 2, 1), np.uint8),
            'file_name': 'pug_2.jpg',
        }
    )


def test_pet_builder_reads_mock_data():
  with tfds.testing.mock_data(num_examples=3):
    source = tfds.data_source('oxford_iiit_pet', split='train')
    example = source[0]
  assert len(source) == 3
  assert example['image'].shape[-1] == 3
  assert example['segmentation_mask'].shape[-1] == 1
