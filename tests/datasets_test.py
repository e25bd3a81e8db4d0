"""Tests for unet_jax.data: the TFDS builders, the folder reader and Pet's trimaps."""

import gzip
import logging
import pathlib
import re
import tempfile

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from unet_jax import data as datasets
from unet_jax.data import folder as sf
from unet_jax.data import pets
from unet_jax.data import synthetic


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
  assert 0.15 < np.mean([(lab > 0).mean() for lab in labels]) < 0.35


@pytest.mark.parametrize('shape', [(64, 64), (16, 32, 32)])
def test_multiclass_has_every_class_in_every_example(shape):
  # The generator guarantees it (a shape painted over is drawn again), so it holds
  # for every seed, including small images where shapes often overlap.
  assert tfds.builder('synthetic_shapes/multiclass').info.metadata['num_classes'] == 4
  for i in range(60):
    _, label = synthetic.render_example(
      np.random.default_rng(i), shape=shape, num_classes=4, foreground_fraction=0.3
    )
    assert set(np.unique(label)) == {0, 1, 2, 3}, i


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
  nibabel.save(nibabel.Nifti1Image(np.full((10, 12, 5), 0.5, np.float32), np.eye(4)), path)
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


def test_folder_names_every_content_problem_in_one_error(tmp_path):
  root = tmp_path / 'root'
  _make_folder_2d(root)
  train, val = root / 'train', root / 'val'
  # A mask value at num_classes=3.
  Image.fromarray(np.full((20, 24), 3, np.uint8)).save(train / 'masks' / 'case1.png')
  # An unreadable image whose mask is also bad: both are named.
  (train / 'images' / 'case0.png').write_bytes(b'not a png at all')
  Image.fromarray(np.full((20, 24), 5, np.uint8)).save(train / 'masks' / 'case0.png')
  # A colour mask without mask_colors.
  colour = np.zeros((28, 16, 3), np.uint8)
  colour[:5] = (200, 0, 0)
  Image.fromarray(colour).save(train / 'masks' / 'case2.png')
  # Image and mask shapes differ.
  Image.fromarray(np.zeros((21, 24), np.uint8)).save(val / 'masks' / 'case0.png')
  # Two RGB images among three grey ones: both RGB files are named.
  for name, shape in (('case1', (20, 24, 3)), ('case2', (28, 16, 3))):
    Image.fromarray(np.zeros(shape, np.uint8)).save(val / 'images' / f'{name}.png')
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(sf.list_pairs(root, ndim=2), ndim=2, num_classes=3)
  message = str(error.value)
  assert message.startswith('7 problem(s)')
  expected = [
    f'{train}/images/case0.png: unreadable or truncated image',
    f'{train}/masks/case0.png: mask value(s) [5] at or above num_classes=3',
    f'{train}/masks/case1.png: mask value(s) [3] at or above num_classes=3',
    f'{train}/masks/case2.png: a colour mask (2 colours, e.g. (0, 0, 0), (200, 0, 0));'
    ' set config.data.mask_colors',
    f'{val}/images/case0.png: image shape (20, 24) differs from mask shape (21, 24)',
    f'{val}/images/case1.png: 3 channel(s), while 3 of 5 images have 1',
    f'{val}/images/case2.png: 3 channel(s), while 3 of 5 images have 1',
  ]
  for line in expected:
    assert line in message, line


def test_folder_lists_more_than_20_problems_in_a_file(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  (tmp_path / 'tmp').mkdir()
  root = tmp_path / 'root'
  for i in range(25):
    sf.write_pair(
      root, 'train', f'ex{i:02d}', np.zeros((4, 4), np.uint8), np.full((4, 4), 7, np.uint8)
    )
  before = sorted(root.rglob('*'))
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(sf.list_pairs(root, ndim=2), ndim=2, num_classes=2)
  message = str(error.value)
  assert message.startswith('25 problem(s)')
  assert sum(f'ex{i:02d}.png' in message for i in range(25)) == 20
  match = re.search(r'\.\.\. and 5 more; all 25 are listed in (\S+)\.$', message)
  assert match, message
  listing = pathlib.Path(match.group(1))
  assert listing.parent == tmp_path / 'tmp'
  lines = listing.read_text().splitlines()
  assert lines[0] == '25 problem(s) in the segmentation folder:'
  for i in range(25):
    assert any(f'ex{i:02d}.png: mask value(s) [7]' in line for line in lines), i
  assert sorted(root.rglob('*')) == before  # Nothing written in the data folder.
  # A second failure writes a second file; the first is kept.
  with pytest.raises(datasets.BadDataError) as again:
    sf.validate(sf.list_pairs(root, ndim=2), ndim=2, num_classes=2)
  assert str(listing) not in str(again.value) and listing.exists()


def test_inferred_classes_error_names_every_file_involved(tmp_path):
  root = tmp_path / 'root'
  _make_folder_2d(root)
  _mask_0_255(root)
  background = root / 'val' / 'masks' / 'case2.png'
  Image.fromarray(np.zeros((28, 16), np.uint8)).save(background)
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(sf.list_pairs(root, ndim=2), ndim=2)
  message = str(error.value)
  assert message.startswith('5 problem(s)')
  for split, name in [
    ('train', 'case0'),
    ('train', 'case1'),
    ('train', 'case2'),
    ('val', 'case0'),
    ('val', 'case1'),
  ]:
    assert (
      f'{root}/{split}/masks/{name}.png: mask value 255 implies at least 256'
      ' classes, but classes 1..254 never occur' in message
    )
  assert str(background) not in message
  assert 'config.data.ignore_index=255' in message


def test_inferred_classes_error_names_only_values_past_a_missing_class(tmp_path):
  root = tmp_path / 'root'
  labels = {'a': [0, 1], 'b': [0, 1, 3, 4], 'c': [0, 4]}
  for name, values in labels.items():
    mask = np.array(values * 4, np.uint8)[: len(values) * 2].reshape(2, -1)
    sf.write_pair(root, 'train', name, np.zeros(mask.shape, np.uint8), mask)
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(sf.list_pairs(root, ndim=2), ndim=2)
  message = str(error.value)
  assert 'b.png: mask values 3, 4 imply at least 5 classes, but classes 2' in message
  assert 'c.png: mask value 4 implies at least 5 classes' in message
  assert 'a.png' not in message and message.startswith('2 problem(s)')


def _voc_palette():
  """Pascal VOC's colour map: the bits of the class index spread over R, G, B."""
  palette = []
  for index in range(256):
    rgb = [0, 0, 0]
    for bit in range(8):
      for channel in range(3):
        rgb[channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    palette.append(tuple(rgb))
  return palette


def test_palette_masks_read_as_class_indices_with_an_ignore_border(tmp_path):
  palette = _voc_palette()
  assert palette[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
  assert palette[255] == (224, 224, 192)
  root = tmp_path / 'root'
  label = np.zeros((10, 12), np.uint8)
  label[2:6, 2:6] = 1
  label[6:9, 7:11] = 2
  label[1, :] = 255  # VOC's "void" border.
  for i in range(2):
    sf.write_pair(root, 'train', f'voc{i}', np.zeros((10, 12, 3), np.uint8), label)
    mask = Image.fromarray(label)
    mask.putpalette([v for rgb in palette for v in rgb])
    mask.save(root / 'train' / 'masks' / f'voc{i}.png')
  path = root / 'train' / 'masks' / 'voc0.png'
  with Image.open(path) as im:
    assert im.mode == 'P'
  read, _ = sf.read_mask(str(path), ndim=2)
  np.testing.assert_array_equal(read, label)
  # With mask_colors, a palette mask is read by colour instead.
  colors = [(0, 0, 0), (0, 128, 0), (128, 0, 0), (224, 224, 192)]
  by_colour, _ = sf.read_mask(str(path), ndim=2, mask_colors=colors)
  np.testing.assert_array_equal(by_colour, np.array([0, 2, 1, 3])[np.minimum(label, 3)])
  pairs = sf.list_pairs(root, ndim=2)
  with pytest.raises(datasets.BadDataError, match=r'voc0.png: mask value\(s\) \[255\]'):
    sf.validate(pairs, ndim=2, num_classes=3)
  meta = sf.validate(pairs, ndim=2, ignore_index=255)
  assert meta['num_classes'] == 3
  assert meta['class_pixels'] == {'0': 2 * (120 - 12 - 16 - 12), '1': 32, '2': 24}
  config = datasets.SegmentationFolderConfig(
    name='voc', ndim=2, root=str(root), ignore_index=255
  )
  builder = _build('segmentation_folder', config, tmp_path / 'data')
  for ex in _all(builder.as_data_source('train')):
    np.testing.assert_array_equal(ex['label'], label)  # 255 stored unchanged.


def test_ignore_index_is_checked(tmp_path):
  root = tmp_path / 'root'
  _make_folder_2d(root, splits=('train',))
  pairs = sf.list_pairs(root, ndim=2)
  for ignore_index, num_classes, match in [
    (-1, None, 'non-negative int'),
    (True, None, 'non-negative int'),
    (2, 3, 'below num_classes=3'),
  ]:
    with pytest.raises(ValueError, match=match):
      sf.validate(pairs, ndim=2, num_classes=num_classes, ignore_index=ignore_index)
  # Ignoring a value that never occurs changes nothing.
  assert sf.validate(pairs, ndim=2, ignore_index=255) == sf.validate(pairs, ndim=2)


def test_grey_rgb_and_constant_alpha_masks_are_their_grey_value(tmp_path):
  label = np.zeros((6, 8), np.uint8)
  label[1:3] = 1
  label[4:] = 2
  grey = np.repeat(label[..., None], 3, axis=-1)
  alpha = np.full((6, 8, 1), 255, np.uint8)
  cases = {
    'rgb.png': Image.fromarray(grey),
    'rgba.png': Image.fromarray(np.concatenate([grey, alpha], -1)),
    'la.png': Image.fromarray(np.concatenate([label[..., None], alpha], -1), 'LA'),
  }
  for name, im in cases.items():
    im.save(tmp_path / name)
    read, _ = sf.read_mask(str(tmp_path / name), ndim=2)
    np.testing.assert_array_equal(read, label)
    assert read.dtype == np.int64
  alpha[0, 0] = 0
  Image.fromarray(np.concatenate([grey, alpha], -1)).save(tmp_path / 'holes.png')
  with pytest.raises(
    datasets.BadDataError, match=r'holes.png: .*alpha channel that varies \(2 values'
  ):
    sf.read_mask(str(tmp_path / 'holes.png'), ndim=2)


_COLOURS = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]


def _write_colour_folder(root):
  label = np.zeros((8, 10), np.uint8)
  label[1:4, 2:8] = 1
  label[5:7] = 2
  colour = np.array(_COLOURS, np.uint8)[label]
  for split in ('train', 'val'):
    sf.write_pair(root, split, 'a', np.zeros((8, 10), np.uint8), label)
    Image.fromarray(colour).save(root / split / 'masks' / 'a.png')
  return label, colour


def test_colour_masks_map_through_mask_colors(tmp_path):
  root = tmp_path / 'root'
  label, colour = _write_colour_folder(root)
  pairs = sf.list_pairs(root, ndim=2)
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(pairs, ndim=2)
  assert 'train/masks/a.png: a colour mask (3 colours' in str(error.value)
  assert 'val/masks/a.png: a colour mask' in str(error.value)
  assert 'set config.data.mask_colors' in str(error.value)
  meta = sf.validate(pairs, ndim=2, mask_colors=_COLOURS)
  assert meta['num_classes'] == 3
  assert meta['class_pixels'] == {'0': 2 * 42, '1': 2 * 18, '2': 2 * 20}
  # One more class colour than the masks hold: 4 classes, one never seen.
  more = sf.validate(pairs, ndim=2, mask_colors=_COLOURS + [(9, 9, 9)])
  assert more['num_classes'] == 4 and '3' not in more['class_pixels']
  config = datasets.SegmentationFolderConfig(
    name='colours', ndim=2, root=str(root), mask_colors=_COLOURS
  )
  builder = _build('segmentation_folder', config, tmp_path / 'data')
  np.testing.assert_array_equal(builder.as_data_source('val')[0]['label'], label)
  # A colour outside the map is named with its pixel count.
  colour[0, :3] = (255, 0, 1)
  colour[7, 9] = (7, 7, 7)
  Image.fromarray(colour).save(root / 'train' / 'masks' / 'a.png')
  with pytest.raises(datasets.BadDataError) as error:
    sf.validate(pairs, ndim=2, mask_colors=_COLOURS)
  assert (
    'train/masks/a.png: colour(s) not in mask_colors: (255, 0, 1) in 3 pixel(s),'
    ' (7, 7, 7) in 1 pixel(s).' in str(error.value)
  )
  assert str(error.value).startswith('1 problem(s)')


@pytest.mark.parametrize(
  'mask_colors, num_classes, match',
  [
    ([(0, 0, 0), (0, 0)], None, r'mask_colors\[1\] = \(0, 0\)'),
    ([(0, 0, 0), (0, 256, 0)], None, r'mask_colors\[1\].*\[0, 255\]'),
    ([(0, 0, 0), (0.5, 0, 0)], None, r'mask_colors\[1\]'),
    ([(1, 2, 3), (1, 2, 3)], None, r'mask_colors\[1\] = \(1, 2, 3\) repeats'),
    ([], None, 'non-empty'),
    ('red', None, 'non-empty'),
    (_COLOURS, 4, 'num_classes=4 but mask_colors holds 3'),
  ],
)
def test_bad_mask_colors(tmp_path, mask_colors, num_classes, match):
  root = tmp_path / 'root'
  _write_colour_folder(root)
  with pytest.raises(ValueError, match=match):
    sf.validate(
      sf.list_pairs(root, ndim=2),
      ndim=2,
      num_classes=num_classes,
      mask_colors=mask_colors,
    )


def test_size_outliers_are_reported(tmp_path, caplog):
  root = tmp_path / 'root'
  sizes = ((20, 24), (20, 24), (22, 24), (6, 30), (21, 11))
  _make_folder_2d(root, sizes=sizes, splits=('train',))
  with caplog.at_level(logging.WARNING):
    meta = sf.validate(sf.list_pairs(root, ndim=2), ndim=2)
  assert meta['median_shape'] == [20.0, 24.0]
  images = root / 'train' / 'images'
  assert meta['small_examples'] == [
    [str(images / 'case3.png'), [6, 30]],
    [str(images / 'case4.png'), [21, 11]],
  ]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2
  assert 'case3.png' in warnings[0] and 'case4.png' in warnings[1]


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
