"""Tests for unet_jax.data.pipeline on tiny generated data."""

import itertools
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from unet_jax import data as datasets
from unet_jax.data import folder as sf
from unet_jax.data import pipeline as input_pipeline


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      'name': 'synthetic_shapes',
      'config': 'tiny',
      'root': '',
      'data_dir': '',
      'train_split': 'train',
      'eval_split': 'validation',
      'size_policy': 'pad',
      'patch_size': (),
      'foreground_fraction': 1 / 3,
    }
  )
  if not overrides.get('name', 'synthetic').startswith('synthetic'):
    config.config = ''
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def shapes(data_dir):
  return _data_config(data_dir=data_dir)


@pytest.fixture(scope='module')
def volumes(data_dir):
  return _data_config(name='synthetic_volumes', data_dir=data_dir, patch_size=(8, 16, 16))


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _identify(images, references):
  """Index in `references` of each image (images are unique per example)."""
  return [int(np.argmin([np.abs(image - r).max() for r in references])) for image in images]


# ----------------------------------------------------------------- info


def test_get_info_2d(shapes):
  info = input_pipeline.open(shapes, divisor=(8, 8)).info
  assert info == input_pipeline.DatasetInfo(
    num_classes=2,
    num_channels=1,
    spatial_shape=(32, 32),
    num_train=16,
    num_eval=8,
    spacing=None,
    eval_spatial_shape=(32, 32),
  )


def test_get_info_3d_patches(volumes):
  info = input_pipeline.open(volumes, divisor=(2, 8, 8)).info
  assert info.spatial_shape == (8, 16, 16)
  assert info.eval_spatial_shape == (16, 32, 32)
  assert info.spacing == (1.0, 1.0, 1.0)
  assert (info.num_train, info.num_eval) == (8, 4)


# ----------------------------------------------------------------- train order


def test_train_batches_are_normalised(shapes):
  batch = next(input_pipeline.open(shapes, divisor=8).train_iterator(batch_size=4, seed=0))
  assert batch['image'].shape == (4, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 32, 32) and batch['label'].dtype == np.int32
  np.testing.assert_allclose(batch['image'].mean(axis=(1, 2, 3)), 0, atol=1e-5)
  np.testing.assert_allclose(batch['image'].std(axis=(1, 2, 3)), 1, atol=1e-4)
  assert set(np.unique(batch['label'])) <= {0, 1}


def test_exact_resume(shapes):
  from_start = _take(
    input_pipeline.open(shapes, divisor=8).train_iterator(batch_size=4, seed=3), 7
  )
  resumed = _take(
    input_pipeline.open(shapes, divisor=8).train_iterator(
      batch_size=4, seed=3, start_step=5
    ),
    2,
  )
  for a, b in zip(from_start[5:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_seed_decides_the_order(shapes):
  a = _take(input_pipeline.open(shapes, divisor=8).train_iterator(batch_size=4, seed=0), 2)
  b = _take(input_pipeline.open(shapes, divisor=8).train_iterator(batch_size=4, seed=0), 2)
  c = _take(input_pipeline.open(shapes, divisor=8).train_iterator(batch_size=4, seed=1), 2)
  np.testing.assert_array_equal(a[1]['image'], b[1]['image'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_epochs_are_permutations_reshuffled(shapes):
  references = [
    b['image'][0]
    for b in input_pipeline.open(
      _data_config(data_dir=shapes.data_dir, eval_split='train'), divisor=8
    ).eval_iterator(batch_size=1)
  ]
  batches = _take(
    input_pipeline.open(shapes, divisor=8).train_iterator(batch_size=4, seed=0), 8
  )
  order = _identify(np.concatenate([b['image'] for b in batches]), references)
  first, second = order[:16], order[16:]
  assert sorted(first) == list(range(16)) and sorted(second) == list(range(16))
  assert first != second


def test_processes_split_the_global_batch(shapes):
  whole = _take(
    input_pipeline.open(shapes, divisor=8).train_iterator(
      batch_size=4, seed=0, start_step=2
    ),
    2,
  )
  parts = [
    _take(
      input_pipeline.open(shapes, divisor=8).train_iterator(
        batch_size=4, seed=0, start_step=2, process_index=p, process_count=2
      ),
      2,
    )
    for p in range(2)
  ]
  for step in range(2):
    assert parts[0][step]['image'].shape[0] == 2
    joined = np.concatenate([parts[0][step]['image'], parts[1][step]['image']])
    np.testing.assert_array_equal(joined, whole[step]['image'])


# ----------------------------------------------------------------- eval


def test_eval_is_one_padded_pass(shapes):
  batches = list(input_pipeline.open(shapes, divisor=8).eval_iterator(batch_size=3))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b['mask'] for b in batches]), [1] * 8 + [0])
  assert all(b['image'].shape == (3, 32, 32, 1) for b in batches)
  assert not batches[-1]['image'][2].any()
  assert (batches[-1]['label'][2] == input_pipeline.IGNORE_LABEL).all()
  assert batches[-1]['index'].tolist() == [6, 7, -1]
  assert batches[0]['id'].tolist() == ['0', '1', '2']  # Synthetic cases are named by index.
  again = list(input_pipeline.open(shapes, divisor=8).eval_iterator(batch_size=3))
  np.testing.assert_array_equal(batches[1]['image'], again[1]['image'])


def test_eval_processes_see_each_example_once(shapes):
  whole = list(input_pipeline.open(shapes, divisor=8).eval_iterator(batch_size=8))
  references = np.concatenate([b['image'] for b in whole])
  seen = []
  for p in range(2):
    batches = list(
      input_pipeline.open(shapes, divisor=8).eval_iterator(
        batch_size=6, process_index=p, process_count=2
      )
    )
    assert len(batches) == 2  # ceil(8 / 6) global batches, each of 3 per process.
    for b in batches:
      assert b['image'].shape[0] == 3
      seen += _identify(b['image'][b['mask'] > 0], references)
  assert sorted(seen) == list(range(8))


# ----------------------------------------------------------------- 3D patches


def test_patches_oversample_foreground(volumes):
  shares = {}
  for fraction in (0.0, 1.0):
    overrides = {'foreground_fraction': fraction, 'patch_size': (4, 8, 8)}
    config = _data_config(**{**volumes.to_dict(), **overrides})
    batches = _take(
      input_pipeline.open(config, divisor=4).train_iterator(batch_size=4, seed=0), 6
    )
    labels = np.concatenate([b['label'] for b in batches])
    assert labels.shape == (24, 4, 8, 8) and batches[0]['image'].shape == (4, 4, 8, 8, 1)
    if fraction == 1.0:
      assert (labels > 0).any(axis=(1, 2, 3)).all()  # Every patch holds foreground.
    shares[fraction] = (labels > 0).mean()
  assert shares[1.0] > 2 * shares[0.0]


def test_foreground_share_is_exact():
  on_foreground = input_pipeline._on_foreground  # pylint: disable=protected-access
  flags = [on_foreground(i, 1 / 3) for i in range(30)]
  assert sum(flags) == 10 and sum(flags[:3]) == 1 and sum(flags[12:15]) == 1


def test_patches_are_deterministic(volumes):
  a = _take(
    input_pipeline.open(volumes, divisor=8).train_iterator(
      batch_size=2, seed=5, start_step=3
    ),
    1,
  )[0]
  b = _take(
    input_pipeline.open(volumes, divisor=8).train_iterator(batch_size=2, seed=5), 4
  )[3]
  np.testing.assert_array_equal(a['label'], b['label'])
  np.testing.assert_array_equal(a['image'], b['image'])


def test_3d_eval_yields_whole_volumes(volumes):
  batches = list(input_pipeline.open(volumes, divisor=8).eval_iterator(batch_size=2))
  assert len(batches) == 2 and batches[0]['image'].shape == (2, 16, 32, 32, 1)


# ----------------------------------------------------------------- folders, size policies


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for split, sizes in (
    ('train', ((20, 30), (27, 18), (24, 24))),
    ('val', ((22, 26), (30, 17))),
  ):
    for i, (h, w) in enumerate(sizes):
      label = np.zeros((h, w), np.uint8)
      label[5:11, 4:12] = 1
      image = (rng.integers(0, 80, (h, w, 3)) + 100 * label[..., None]).astype(np.uint8)
      sf.write_pair(root, split, f'img{i}', image, label)
  return str(root)


@pytest.mark.parametrize(
  'policy, train_shape', [('pad', (32, 32)), ('crop', (24, 24)), ('resize', (32, 32))]
)
def test_size_policies(folder, data_dir, policy, train_shape):
  # Train sizes (20, 30), (27, 18), (24, 24): the largest is (27, 30), the median
  # (24, 24); multiples of 8.
  config = _data_config(
    name='segmentation_folder',
    config='2d',
    root=folder,
    data_dir=data_dir,
    size_policy=policy,
  )
  data = input_pipeline.open(config, divisor=8)
  info = data.info
  assert info.spatial_shape == train_shape
  assert info.num_channels == 3 and info.num_classes == 2
  assert info.eval_spatial_shape == (32, 32)
  assert (info.num_train, info.num_eval) == (3, 2)  # eval_split 'validation' reads 'val'.
  batches = list(data.eval_iterator(batch_size=2))
  assert batches[0]['image'].shape == (2, 32, 32, 3)
  label = batches[0]['label']
  if policy != 'resize':
    # Evaluation covers whole images: every labelled pixel is there, and the
    # padding is ignored (IGNORE_LABEL), never counted as background.
    assert (label == 1).sum() == 2 * 48
    assert (label >= 0).sum() == 22 * 26 + 30 * 17
    assert (label[0, :, :2] == input_pipeline.IGNORE_LABEL).all()
  train = next(data.train_iterator(batch_size=2, seed=0))
  assert train['image'].shape == (2,) + train_shape + (3,)


def test_crop_policy_takes_random_crops_of_each_image(folder, data_dir):
  config = _data_config(
    name='segmentation_folder',
    config='2d',
    root=folder,
    data_dir=data_dir,
    size_policy='crop',
    image_size=(8, 8),
  )
  data = input_pipeline.open(config, divisor=8)
  crops = [
    next(data.train_iterator(s, batch_size=3, seed=0))['image'][0] for s in range(12)
  ]
  # Without a crop at random, every crop of an image would be the same centre crop.
  assert len({c.tobytes() for c in crops}) > 3
  assert all(c.shape == (8, 8, 3) for c in crops)


def test_a_tiny_image_is_named_and_does_not_shrink_the_others(tmp_path, data_dir, caplog):
  root = tmp_path / 'tiny_one'
  for i in range(4):
    label = np.zeros((16, 16), np.uint8)
    label[4:9, 4:9] = 1
    sf.write_pair(root, 'train', f'big{i}', (label * 200).astype(np.uint8), label)
    sf.write_pair(root, 'val', f'big{i}', (label * 200).astype(np.uint8), label)
  sf.write_pair(
    root, 'train', 'tiny', np.zeros((1, 1), np.uint8), np.ones((1, 1), np.uint8)
  )
  config = _data_config(
    name='segmentation_folder',
    config='2d',
    root=str(root),
    data_dir=data_dir,
    size_policy='crop',
  )
  with caplog.at_level('WARNING'):
    data = input_pipeline.open(config, divisor=4)
  assert data.info.spatial_shape == (16, 16)
  assert data.info.eval_spatial_shape == (16, 16)
  assert any('tiny.png' in r.getMessage() for r in caplog.records)


def test_image_size_overrides_the_data(folder, data_dir):
  config = _data_config(
    name='segmentation_folder',
    config='2d',
    root=folder,
    data_dir=data_dir,
    size_policy='resize',
    image_size=(21, 43),
  )
  assert input_pipeline.open(config, divisor=8).info.spatial_shape == (24, 40)


def test_folder_3d_pipeline(tmp_path, data_dir):
  for i in range(3):
    label = np.zeros((4, 12, 10), np.uint8)
    label[1:3, 3:7, 2:6] = i % 2 + 1
    image = np.random.default_rng(i).normal(size=(4, 12, 10)).astype(np.float32)
    sf.write_pair(
      tmp_path, 'train' if i else 'val', f'v{i}', image, label, spacing=(2.0, 0.5, 0.5)
    )
  config = _data_config(
    name='segmentation_folder',
    config='3d',
    root=str(tmp_path),
    data_dir=data_dir,
    num_classes=3,
  )
  info = input_pipeline.open(config, divisor=(2, 4, 4)).info
  assert (
    info.spatial_shape == (4, 12, 12)
    and info.spacing == (2.0, 0.5, 0.5)
    and info.num_classes == 3
  )
  batch = next(input_pipeline.open(config, divisor=(2, 4, 4)).eval_iterator(batch_size=1))
  assert batch['image'].shape == (1, 4, 12, 12, 1)


def test_folder_edit_is_picked_up(tmp_path, data_dir):
  root = tmp_path / 'root'
  label = np.zeros((16, 16), np.uint8)
  label[2:5, 2:5] = 1
  for i in range(2):
    sf.write_pair(root, 'train', f'a{i}', np.full((16, 16), 50 * i, np.uint8), label)
    sf.write_pair(root, 'val', f'a{i}', np.full((16, 16), 50 * i, np.uint8), label)
  config = _data_config(name='segmentation_folder', root=str(root), data_dir=data_dir)
  assert input_pipeline.open(config, divisor=8).info.num_classes == 2
  label[10:12, 10:12] = 2
  sf.write_pair(root, 'train', 'a0', np.zeros((16, 16), np.uint8), label)
  assert input_pipeline.open(config, divisor=8).info.num_classes == 3


def test_bad_folder_fails_get_info_up_front(tmp_path, data_dir):
  root = tmp_path / 'root'
  label = np.zeros((16, 16), np.uint8)
  for split in ('train', 'val'):
    sf.write_pair(root, split, 'ok', np.zeros((16, 16), np.uint8), label + 1)
  Image.fromarray(np.full((16, 16), 4, np.uint8)).save(root / 'val' / 'masks' / 'ok.png')
  config = _data_config(
    name='segmentation_folder',
    root=str(root),
    data_dir=str(tmp_path / 'tfds'),
    num_classes=2,
  )
  with pytest.raises(
    datasets.BadDataError, match=r'val/masks/ok.png: mask value\(s\) \[4\]'
  ):
    input_pipeline.open(config, divisor=8).info
  assert not list((tmp_path / 'tfds').glob('**/*.array_record*'))
  (root / 'val' / 'masks' / 'ok.png').unlink()
  with pytest.raises(datasets.BadDataError, match='image without a mask'):
    next(input_pipeline.open(config, divisor=8).train_iterator(batch_size=1, seed=0))


# ----------------------------------------------------------------- TFDS interplay


def test_tfrecord_data_set_gains_array_record(tmp_path):
  tfds.load(
    'synthetic_shapes/tiny', split='train', data_dir=str(tmp_path)
  )  # Builds TFRecord.
  assert not list(tmp_path.glob('**/*.array_record*'))
  config = _data_config(data_dir=str(tmp_path))
  assert input_pipeline.open(config, divisor=8).info.num_train == 16
  assert list(tmp_path.glob('**/*train.array_record*'))
  batch = next(input_pipeline.open(config, divisor=8).train_iterator(batch_size=2, seed=0))
  assert batch['image'].shape == (2, 32, 32, 1)


def _fake_pets(self, split, **kwargs):
  del self, kwargs
  examples = []
  for i in range({'train': 6, 'test': 3}[split]):
    rng = np.random.default_rng(i)
    h, w = 40 + 7 * i, 50 - 3 * i
    trimap = np.full((h, w, 1), 2, np.uint8)
    trimap[3:20, 3:27] = 3
    trimap[6:20, 5:25] = 1
    examples.append(
      {
        'image': rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        'segmentation_mask': trimap,
        'file_name': f'pet_{i}.jpg',
      }
    )
  return examples


def test_oxford_iiit_pet_with_mock_data(tmp_path):
  config = _data_config(
    name='oxford_iiit_pet',
    config='',
    data_dir=str(tmp_path),
    size_policy='resize',
    image_size=(32, 32),
    eval_split='validation',
  )
  with tfds.testing.mock_data(as_data_source_fn=_fake_pets):
    info = input_pipeline.open(config, divisor=8).info
    assert info == input_pipeline.DatasetInfo(
      num_classes=3,
      num_channels=3,
      spatial_shape=(32, 32),
      num_train=6,
      num_eval=3,
      spacing=None,
      eval_spatial_shape=(32, 32),
    )
    batch = next(
      input_pipeline.open(config, divisor=8).train_iterator(batch_size=2, seed=0)
    )
    evals = list(input_pipeline.open(config, divisor=8).eval_iterator(batch_size=2))
  assert batch['image'].shape == (2, 32, 32, 3)
  assert set(np.unique(batch['label'])) == {0, 1, 2}
  assert len(evals) == 2 and evals[1]['mask'].tolist() == [1, 0]
  # The pet (trimap 1, class 1) stays where it was after resizing; background
  # (trimap 2) is class 0.
  label = evals[0]['label'][0]
  assert label[8, 8] == 1 and label[30, 30] == 0


# ----------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
  'overrides, divisor, message',
  [
    ({'name': 'imagenet'}, 8, 'Unknown data set'),
    ({'name': 'segmentation_folder'}, 8, 'needs config.data.root'),
    ({'name': 'segmentation_folder', 'root': '/no/such/folder'}, 8, 'not a folder'),
    ({'name': 'segmentation_folder', 'root': '/', 'config': '4d'}, 8, "'2d', '3d' or ''"),
    ({'size_policy': 'stretch'}, 8, 'size_policy'),
    ({}, (8, 8, 8), 'the data set is 2D'),
    (
      {'name': 'synthetic_volumes', 'patch_size': (8, 12, 16)},
      8,
      'multiple of the model divisor',
    ),
    ({'name': 'synthetic_volumes', 'patch_size': (8, 16)}, 8, 'patch_size'),
    ({'name': 'oxford_iiit_pet'}, 8, 'image_size'),
    ({'foreground_fraction': 1.5}, 8, 'foreground_fraction'),
  ],
)
def test_bad_config_raises_before_building(tmp_path, overrides, divisor, message):
  config = _data_config(data_dir=str(tmp_path), **overrides)
  with pytest.raises(ValueError, match=message):
    input_pipeline.open(config, divisor=divisor).info
  assert not list(tmp_path.iterdir())


def test_bad_split_and_batch(shapes):
  with pytest.raises(ValueError, match="no split 'val'"):
    input_pipeline.open(
      _data_config(data_dir=shapes.data_dir, eval_split='val'), divisor=8
    ).info
  with pytest.raises(ValueError, match='multiple of process_count'):
    input_pipeline.open(shapes, divisor=8).train_iterator(
      batch_size=3, seed=0, process_index=0, process_count=2
    )
  with pytest.raises(ValueError, match='process_index'):
    input_pipeline.open(shapes, divisor=8).eval_iterator(
      batch_size=4, process_index=2, process_count=2
    )


def test_reading_a_built_data_set_needs_no_tensorflow(shapes):
  input_pipeline.open(shapes, divisor=8).info  # Builds it, if no test did yet.
  script = f"""
import sys
import ml_collections
from unet_jax.data import pipeline as input_pipeline
config = ml_collections.ConfigDict({shapes.to_dict()!r})
next(input_pipeline.open(config, divisor=8).train_iterator(batch_size=2, seed=0))
next(input_pipeline.open(config, divisor=8).eval_iterator(batch_size=2))
print('tensorflow' in sys.modules)
"""
  result = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, check=True
  )
  assert result.stdout.strip().splitlines()[-1] == 'False'


def _voc_like(root):
  """Palette PNG masks with VOC's 255 "don't care" border, and colour masks."""
  palette = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192]
  for split in ('train', 'val'):
    for i in range(2):
      label = np.zeros((16, 16), np.uint8)
      label[4:10, 4:10] = 1
      label[3, 3:11] = 255  # The border of the object: ignored.
      image = (60 + 100 * (label == 1)).astype(np.uint8)
      sf.write_pair(root / 'voc', split, f'im{i}', image, np.zeros_like(label))
      mask = Image.fromarray(label, mode='P')
      mask.putpalette(palette)
      mask.save(root / 'voc' / split / 'masks' / f'im{i}.png')
      colours = np.zeros((16, 16, 3), np.uint8)
      colours[label == 1] = (200, 30, 30)
      sf.write_pair(root / 'colour', split, f'im{i}', image, np.zeros_like(label))
      Image.fromarray(colours).save(root / 'colour' / split / 'masks' / f'im{i}.png')


def test_the_data_sets_ignore_value_reaches_the_loss_and_metrics_as_ignored(tmp_path):
  _voc_like(tmp_path)
  config = _data_config(
    name='segmentation_folder',
    config='2d',
    root=str(tmp_path / 'voc'),
    data_dir=str(tmp_path / 'tfds'),
    ignore_index=255,
  )
  data = input_pipeline.open(config, divisor=8)
  assert data.info.num_classes == 2  # 255 is not a class.
  train = next(data.train_iterator(batch_size=2, seed=0))
  evals = next(data.eval_iterator(batch_size=2))
  for batch in (train, evals):
    labels = batch['label']
    assert 255 not in labels
    assert (labels == input_pipeline.IGNORE_LABEL).sum() == 2 * 8
    assert (labels == 1).sum() == 2 * 36
  # Without ignore_index, 255 would be read as a class (and refused as a gap).
  with pytest.raises(ValueError, match='never occur'):
    input_pipeline.open(_data_config(**dict(config, ignore_index=-1)), divisor=8)


def test_colour_masks_with_mask_colors(tmp_path):
  _voc_like(tmp_path)
  config = _data_config(
    name='segmentation_folder',
    config='2d',
    root=str(tmp_path / 'colour'),
    data_dir=str(tmp_path / 'tfds'),
    mask_colors=((0, 0, 0), (200, 30, 30)),
  )
  data = input_pipeline.open(config, divisor=8)
  assert data.info.num_classes == 2
  labels = next(data.eval_iterator(batch_size=2))['label']
  assert (labels == 1).sum() == 2 * 36
  with pytest.raises(ValueError, match=r'colour\(s\) not in mask_colors: \(200, 30, 30\)'):
    input_pipeline.open(
      _data_config(**dict(config, mask_colors=((0, 0, 0), (0, 0, 255)))), divisor=8
    )


# ----------------------------------------------------------------- normalisation


def test_normalisation_modes_by_hand():
  image = np.array([[[-1000.0], [0.0]], [[50.0], [3000.0]]], np.float32)  # [2, 2, 1]
  ct = input_pipeline.normaliser(
    _data_config(
      normalization='ct',
      intensity_low=(-100.0,),
      intensity_high=(200.0,),
      intensity_mean=(50.0,),
      intensity_std=(25.0,),
    ),
    1,
  )
  # Clipped to [-100, 200]: -100, 0, 50, 200; then (x - 50) / 25.
  np.testing.assert_allclose(ct(image)[..., 0], [[-6, -2], [0, 6]])
  rescale = input_pipeline.normaliser(
    _data_config(normalization='rescale', intensity_low=0, intensity_high=255), 1
  )
  np.testing.assert_allclose(
    rescale(np.array([[[0.0], [255.0], [51.0]]]))[..., 0], [[0, 1, 0.2]], rtol=1e-6
  )
  # The default is today's per-image z-score, unchanged.
  default = input_pipeline.normaliser(_data_config(), 1)
  np.testing.assert_array_equal(default(image), input_pipeline.normalise(image))
  np.testing.assert_allclose(default(image).mean(), 0, atol=1e-6)


def test_none_minmax_and_one_mode_per_channel_by_hand():
  image = np.array([[[2.0, -1000.0, 1.0]], [[4.0, 50.0, 3.0]], [[10.0, 3000.0, 5.0]]])
  # 'none' keeps the values (as float32); 'minmax' maps each image, per channel, to
  # [0, 1]: (2, 4, 10) -> (0, 0.25, 1).
  none = input_pipeline.normaliser(_data_config(normalization='none'), 3)(image)
  assert none.dtype == np.float32
  np.testing.assert_array_equal(none, image.astype(np.float32))
  minmax = input_pipeline.normaliser(_data_config(normalization='minmax'), 3)(image)
  np.testing.assert_allclose(minmax[:, 0, 0], [0, 0.25, 1])
  np.testing.assert_allclose(minmax[:, 0, 1], [0, 1050 / 4000, 1])
  # A constant image is all 0, not NaN (the range is at least 1e-8).
  flat = input_pipeline.normalise(np.full((2, 2, 1), 7.0), mode='minmax')
  np.testing.assert_array_equal(flat, 0)
  # One mode per channel: CT, a z-score, none; the CT values per channel or one.
  mixed = input_pipeline.normaliser(
    _data_config(
      normalization='zscore, ct,none',
      intensity_low=(0.0, -100.0, 0.0),
      intensity_high=(1.0, 200.0, 1.0),
      intensity_mean=50.0,
      intensity_std=25.0,
    ),
    3,
  )(image)
  # Channel 0: mean 16 / 3, std sqrt(((2 - m)^2 + (4 - m)^2 + (10 - m)^2) / 3).
  x = np.array([2.0, 4.0, 10.0])
  np.testing.assert_allclose(mixed[:, 0, 0], (x - x.mean()) / x.std(), rtol=1e-6)
  # Channel 1: clipped to -100, 50, 200, then (x - 50) / 25.
  np.testing.assert_allclose(mixed[:, 0, 1], [-6, 0, 6])
  np.testing.assert_array_equal(mixed[:, 0, 2], [1, 3, 5])
  with pytest.raises(ValueError, match="the entry 'ctt' is not one of"):
    input_pipeline.normaliser(_data_config(normalization='ct,ctt'), 2)
  with pytest.raises(ValueError, match='gives 2 modes; the data has 3 channel'):
    input_pipeline.normaliser(_data_config(normalization='zscore,none'), 3)


def test_one_mode_per_channel_equals_the_single_mode_bit_for_bit():
  rng = np.random.default_rng(0)
  image = rng.normal(100, 30, (5, 6, 2)).astype(np.float32)
  one = input_pipeline.normaliser(
    _data_config(
      normalization='ct',
      intensity_low=(50.0, 60.0),
      intensity_high=(150.0, 140.0),
      intensity_mean=(100.0, 90.0),
      intensity_std=(20.0, 25.0),
    ),
    2,
  )
  each = input_pipeline.normaliser(
    _data_config(
      normalization='ct,ct',
      intensity_low=(50.0, 60.0),
      intensity_high=(150.0, 140.0),
      intensity_mean=(100.0, 90.0),
      intensity_std=(20.0, 25.0),
    ),
    2,
  )
  np.testing.assert_array_equal(one(image), each(image))


def test_normalisation_reaches_the_batches(shapes):
  config = _data_config(
    data_dir=shapes.data_dir,
    normalization='rescale',
    intensity_low=(0.0,),
    intensity_high=(255.0,),
  )
  batch = next(input_pipeline.open(config, divisor=8).train_iterator(batch_size=4, seed=0))
  raw = next(input_pipeline.open(shapes, divisor=8).train_iterator(batch_size=4, seed=0))
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1
  # The same examples: rescaling and the per-image z-score agree up to an affine map.
  for scaled, zscored in zip(batch['image'], raw['image']):
    np.testing.assert_allclose((scaled - scaled.mean()) / scaled.std(), zscored, atol=1e-3)


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'normalization': 'bogus'}, r"normalization='bogus' is not one of"),
    ({'normalization': 'zscore,zscore'}, 'gives 2 modes; the data has 1 channel'),
    ({'normalization': 'ct', 'intensity_low': (0.0,)}, 'needs config.data.intensity_high'),
    (
      {'normalization': 'rescale', 'intensity_low': (5.0,), 'intensity_high': (1.0,)},
      'must be above',
    ),
    (
      {
        'normalization': 'ct',
        'intensity_low': (0.0,),
        'intensity_high': (1.0,),
        'intensity_mean': (0.0,),
        'intensity_std': (0.0,),
      },
      'intensity_std .* positive',
    ),
    (
      {
        'normalization': 'rescale',
        'intensity_low': (0.0, 0.0, 0.0),
        'intensity_high': (1.0, 1.0, 1.0),
      },
      'has 3 values; the data has 1 channel',
    ),
  ],
)
def test_bad_normalisation_is_named(shapes, overrides, message):
  with pytest.raises(ValueError, match=message):
    input_pipeline.open(_data_config(data_dir=shapes.data_dir, **overrides), divisor=8)
