"""Tests for unet_jax.data.nnunet: nnU-Net v2 and Decathlon layouts, checks, folds."""

import gzip
import json
import os
import re

import nibabel
import numpy as np
from PIL import Image
import pytest

from unet_jax.data import folder
from unet_jax.data import nnunet

# Per case of the 3D data sets: (id, z size, z spacing). x and y are 12 and 10
# voxels of 1.0 and 1.5. Case 'case_002' is stored with its voxel axes in
# (z, y, x) order (see `_affine`), so only a canonical reading gives it the
# same (D, H, W) order as the others.
_CASES = (
  ('case_000', 8, 2.5),
  ('case_001', 8, 2.0),
  ('case_002', 10, 3.0),
  ('case_003', 8, 2.5),
  ('case_004', 12, 2.5),
)
_PERMUTED = 'case_002'
_LABELS = {'background': 0, 'liver': 1, 'tumour': 2}


def _affine(case_id, z_spacing):
  if case_id == _PERMUTED:  # Voxel axis 0 runs along world z, axis 2 along x.
    return np.array([[0, 0, 1.0, 0], [0, 1.5, 0, 0], [z_spacing, 0, 0, 0], [0, 0, 0, 1]])
  return np.diag([1.0, 1.5, z_spacing, 1.0])


def _voxels(case_id, nz, channels=None):
  """A (x, y, z[, c]) array in the voxel order `_affine` gives `case_id`."""
  shape = (nz, 10, 12) if case_id == _PERMUTED else (12, 10, nz)
  shape += (channels,) if channels else ()
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 7


def _label(case_id, nz, value=2):
  label = np.zeros((nz, 10, 12) if case_id == _PERMUTED else (12, 10, nz), np.uint8)
  label[:4, :4, :4], label[-2:, -2:, -2:] = 1, value
  return label


def _save(path, array, affine):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nibabel.save(nibabel.Nifti1Image(array, affine), path)


def _json(root, spec):
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump(spec, f)


def _nnunet_3d(root):
  """A 2-channel nnU-Net v2 data set of `_CASES`, one test case, macOS junk."""
  root = str(root)
  _json(
    root,
    {
      'channel_names': {'0': 'T2', '1': 'CT'},
      'labels': _LABELS,
      'numTraining': len(_CASES),
      'file_ending': '.nii.gz',
    },
  )
  for case_id, nz, zs in _CASES:
    for c in range(2):
      path = f'{root}/imagesTr/{case_id}_{c:04d}.nii.gz'
      _save(path, _voxels(case_id, nz), _affine(case_id, zs))
    _save(f'{root}/labelsTr/{case_id}.nii.gz', _label(case_id, nz), _affine(case_id, zs))
  for c in range(2):
    _save(f'{root}/imagesTs/test_000_{c:04d}.nii.gz', _voxels('t', 8), _affine('t', 2.0))
  for junk in ('imagesTr/._case_000_0000.nii.gz', 'labelsTr/.DS_Store'):
    with open(f'{root}/{junk}', 'wb') as f:
      f.write(b'\0junk')
  return root


def _msd(root, channels=2):
  """A Decathlon data set of `_CASES`: 4D images with `channels` channels."""
  root = str(root)
  training = []
  for case_id, nz, zs in _CASES:
    image = _voxels(case_id, nz, channels)
    _save(f'{root}/imagesTr/{case_id}.nii.gz', image, _affine(case_id, zs))
    _save(f'{root}/labelsTr/{case_id}.nii.gz', _label(case_id, nz), _affine(case_id, zs))
    training.append(
      {'image': f'./imagesTr/{case_id}.nii.gz', 'label': f'./labelsTr/{case_id}.nii.gz'}
    )
  _save(f'{root}/imagesTs/test_000.nii.gz', _voxels('t', 8, channels), _affine('t', 2.0))
  _json(
    root,
    {
      'name': 'BrainTumour',
      'tensorImageSize': '4D',
      'modality': {'0': 'FLAIR', '1': 'T1w'},
      'labels': {'0': 'background', '1': 'liver', '2': 'tumour'},
      'numTraining': len(training),
      'numTest': 1,
      'training': training,
      'test': ['./imagesTs/test_000.nii.gz'],
    },
  )
  with open(f'{root}/imagesTr/._case_000.nii.gz', 'wb') as f:
    f.write(b'\0junk')
  return root


def _nnunet_2d(root, *, rgb=False):
  """An nnU-Net v2 PNG data set of 3 cases: grey (1 channel) or packed RGB."""
  root = str(root)
  names = {'0': 'R', '1': 'G', '2': 'B'} if rgb else {'0': 'rescale_to_0_1'}
  _json(
    root,
    {
      'channel_names': names,
      'labels': {'background': 0, 'road': 1},
      'numTraining': 3,
      'file_ending': '.png',
    },
  )
  os.makedirs(f'{root}/imagesTr')
  os.makedirs(f'{root}/labelsTr')
  for i, (h, w) in enumerate(((16, 12), (16, 14), (12, 12))):
    pixels = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    Image.fromarray(pixels if rgb else pixels[..., 0]).save(
      f'{root}/imagesTr/img_{i}_0000.png'
    )
    label = np.zeros((h, w), np.uint8)
    label[: h // 2] = 1
    Image.fromarray(label).save(f'{root}/labelsTr/img_{i}.png')
  return root


def _edit_json(root, **changes):
  with open(os.path.join(root, 'dataset.json')) as f:
    spec = json.load(f)
  spec.update(changes)
  _json(root, spec)


def _raises(root, *expected, problems, reader=None):
  """The one BadDataError's message; checks it names each `expected` string."""
  reader = reader or (lambda r: nnunet.check(nnunet.read_layout(r)))
  with pytest.raises(folder.BadDataError) as info:
    reader(root)
  message = str(info.value)
  for text in expected:
    assert text in message, f'{text!r} not in:\n{message}'
  assert message.startswith(f'{problems} problem(s) in'), message
  return message


# ------------------------------------------------------------------ good data


def test_nnunet_3d_layout_and_metadata(tmp_path):
  root = _nnunet_3d(tmp_path)
  assert nnunet.is_dataset(root) and not nnunet.is_dataset(tmp_path / 'imagesTr')
  layout = nnunet.read_layout(root)
  assert (layout.format, layout.ndim, layout.file_ending) == ('nnunet', 3, '.nii.gz')
  assert layout.root == os.path.abspath(root)
  assert layout.channel_names == ('T2', 'CT')
  assert layout.labels == _LABELS
  assert [c.id for c in layout.training] == [c[0] for c in _CASES]
  first = layout.training[0]
  assert first.images == (
    f'{root}/imagesTr/case_000_0000.nii.gz',
    f'{root}/imagesTr/case_000_0001.nii.gz',
  )
  assert first.label == f'{root}/labelsTr/case_000.nii.gz'
  assert [(c.id, c.label, len(c.images)) for c in layout.test] == [('test_000', None, 2)]

  metadata = nnunet.check(layout)
  assert metadata['format'] == 'nnunet'
  assert metadata['channel_names'] == ['T2', 'CT']
  assert (metadata['num_channels'], metadata['ndim'], metadata['num_classes']) == (2, 3, 3)
  # (D, H, W) = (z, y, x) of the canonical axes, the permuted case included.
  assert metadata['shapes'] == [
    [8, 10, 12],
    [8, 10, 12],
    [10, 10, 12],
    [8, 10, 12],
    [12, 10, 12],
  ]
  assert metadata['spacings'] == [[zs, 1.5, 1.0] for _, _, zs in _CASES]
  assert metadata['spacing'] == [2.5, 1.5, 1.0]
  assert metadata['min_shape'] == [8, 10, 12] and metadata['max_shape'] == [12, 10, 12]
  assert metadata['median_shape'] == [8.0, 10.0, 12.0]
  assert metadata['small_examples'] == []
  assert metadata['num_examples'] == {'train': 5, 'test': 1}
  # Each label: 4^3 voxels of 1, 2^3 of 2, the rest 0.
  voxels = sum(12 * 10 * nz for _, nz, _ in _CASES)
  assert metadata['class_pixels'] == {'0': voxels - 5 * 72, '1': 5 * 64, '2': 5 * 8}
  folder_keys = {
    'num_classes', 'num_channels', 'ndim', 'min_shape', 'max_shape', 'median_shape',
    'small_examples', 'spacing', 'num_examples', 'class_pixels',
  }  # fmt: skip
  assert set(metadata) == folder_keys | {'spacings', 'shapes', 'channel_names', 'format'}


def test_canonical_order_agrees_with_nibabel(tmp_path):
  root = _nnunet_3d(tmp_path)
  path = f'{root}/imagesTr/{_PERMUTED}_0000.nii.gz'
  canonical = nibabel.as_closest_canonical(nibabel.load(path))
  metadata = nnunet.check(nnunet.read_layout(root))
  index = [c[0] for c in _CASES].index(_PERMUTED)
  assert metadata['shapes'][index] == list(reversed(canonical.shape))
  zooms = [float(z) for z in reversed(canonical.header.get_zooms())]
  assert metadata['spacings'][index] == zooms


def test_nnunet_2d_png(tmp_path):
  layout = nnunet.read_layout(_nnunet_2d(tmp_path))
  assert (layout.ndim, layout.file_ending, layout.channel_names) == (
    2,
    '.png',
    ('rescale_to_0_1',),
  )
  assert [c.id for c in layout.training] == ['img_0', 'img_1', 'img_2']
  assert layout.test == ()
  metadata = nnunet.check(layout)
  assert metadata['shapes'] == [[16, 12], [16, 14], [12, 12]]
  assert metadata['spacing'] is None and metadata['spacings'] == [None] * 3
  assert (metadata['num_channels'], metadata['ndim'], metadata['num_classes']) == (1, 2, 2)
  assert metadata['min_shape'] == [12, 12] and metadata['max_shape'] == [16, 14]
  assert metadata['num_examples'] == {'train': 3}
  assert metadata['class_pixels'] == {
    '0': 8 * 12 + 8 * 14 + 6 * 12,
    '1': 8 * 12 + 8 * 14 + 6 * 12,
  }


def test_nnunet_2d_rgb_packed_in_one_file(tmp_path):
  layout = nnunet.read_layout(_nnunet_2d(tmp_path, rgb=True))
  assert [len(c.images) for c in layout.training] == [1, 1, 1]
  assert nnunet.check(layout)['num_channels'] == 3


def test_msd_4d_layout_and_metadata(tmp_path):
  root = _msd(tmp_path)
  layout = nnunet.read_layout(root)
  assert (layout.format, layout.ndim, layout.file_ending) == ('msd', 3, '.nii.gz')
  assert layout.channel_names == ('FLAIR', 'T1w')
  assert layout.labels == _LABELS
  assert [c.id for c in layout.training] == [c[0] for c in _CASES]
  assert layout.training[1].images == (f'{root}/imagesTr/case_001.nii.gz',)
  assert layout.training[1].label == f'{root}/labelsTr/case_001.nii.gz'
  assert [(c.id, c.label) for c in layout.test] == [('test_000', None)]
  metadata = nnunet.check(layout)
  assert (metadata['format'], metadata['num_channels'], metadata['num_classes']) == (
    'msd',
    2,
    3,
  )
  assert metadata['shapes'] == [
    [8, 10, 12],
    [8, 10, 12],
    [10, 10, 12],
    [8, 10, 12],
    [12, 10, 12],
  ]
  assert metadata['spacings'] == [[zs, 1.5, 1.0] for _, _, zs in _CASES]
  assert metadata['spacing'] == [2.5, 1.5, 1.0]
  assert metadata['num_examples'] == {'train': 5, 'test': 1}


# ------------------------------------------------------------------ bad data: names


def _missing_channel(root):
  os.remove(f'{root}/imagesTr/case_001_0001.nii.gz')
  return [f'{root}/imagesTr/case_001_0001.nii.gz: missing']


def _label_without_image(root):
  _save(f'{root}/labelsTr/case_009.nii.gz', _label('x', 8), _affine('x', 2.0))
  return [f'{root}/labelsTr/case_009.nii.gz: label without any image']


def _image_without_label(root):
  os.remove(f'{root}/labelsTr/case_003.nii.gz')
  return [
    f'{root}/imagesTr/case_003_0000.nii.gz: image without a label',
    f'{root}/labelsTr/case_003.nii.gz',
  ]


def _channel_beyond(root):
  _save(f'{root}/imagesTr/case_000_0002.nii.gz', _voxels('x', 8), _affine('x', 2.5))
  return [f'{root}/imagesTr/case_000_0002.nii.gz: channel index 2 beyond channel_names']


def _num_training(root):
  _edit_json(root, numTraining=7)
  return ["'numTraining' is 7 but imagesTr/ holds 5 case(s)"]


_NAME_PROBLEMS = (
  _missing_channel,
  _label_without_image,
  _image_without_label,
  _channel_beyond,
)


@pytest.mark.parametrize('problem', _NAME_PROBLEMS + (_num_training,))
def test_read_layout_names_each_problem_alone(tmp_path, problem):
  root = _nnunet_3d(tmp_path)
  expected = problem(root)
  _raises(root, *expected, problems=1, reader=nnunet.read_layout)


def test_read_layout_names_every_problem_at_once(tmp_path):
  root = _nnunet_3d(tmp_path)
  expected = [text for problem in _NAME_PROBLEMS for text in problem(root)]
  _raises(root, *expected, problems=4, reader=nnunet.read_layout)


@pytest.mark.parametrize(
  'changes, expected',
  [
    ({'labels': {'background': 0, 'whole': [1, 2]}}, "label 'whole' is the region [1, 2]"),
    ({'regions_class_order': [1, 2]}, "'regions_class_order' means region-based training"),
    ({'file_ending': '.nrrd'}, "unsupported file_ending '.nrrd'"),
    ({'channel_names': None}, "missing key 'channel_names'"),
    ({'labels': {'background': 0, 'tumour': 2}}, 'values [1] are skipped'),
  ],
)
def test_read_layout_refuses_dataset_json(tmp_path, changes, expected):
  root = _nnunet_3d(tmp_path)
  _edit_json(root, **changes)
  message = _raises(root, expected, problems=1, reader=nnunet.read_layout)
  assert f'{root}/dataset.json' in message


def test_read_layout_refuses_msd_missing_training_file(tmp_path):
  root = _msd(tmp_path)
  os.remove(f'{root}/labelsTr/case_004.nii.gz')
  _raises(
    root,
    f'{root}/labelsTr/case_004.nii.gz: missing; listed in {root}/dataset.json training[4]',
    problems=1,
    reader=nnunet.read_layout,
  )


# ------------------------------------------------------------------ bad data: contents


def _label_value(root):
  _save(f'{root}/labelsTr/case_001.nii.gz', _label('x', 8, value=5), _affine('x', 2.0))
  return [
    f"{root}/labelsTr/case_001.nii.gz: label value(s) [5] not in dataset.json's labels"
  ]


def _channel_shape(root):
  _save(f'{root}/imagesTr/case_003_0001.nii.gz', _voxels('x', 9), _affine('x', 2.5))
  return [
    f'{root}/imagesTr/case_003_0001.nii.gz: shape (12, 10, 9) differs from'
    f' {root}/imagesTr/case_003_0000.nii.gz'
  ]


def _label_affine(root):
  shifted = _affine('x', 2.5)
  shifted[0, 3] = 0.5
  _save(f'{root}/labelsTr/case_000.nii.gz', _label('x', 8), shifted)
  return [
    f'{root}/labelsTr/case_000.nii.gz: affine differs from that of'
    f' {root}/imagesTr/case_000_0000.nii.gz by up to 0.5'
  ]


def _unreadable(root):
  path = f'{root}/imagesTr/case_004_0000.nii.gz'
  with gzip.open(path, 'wb') as f:
    f.write(b'not a nifti header')
  return [f'{path}: unreadable or truncated image']


_CONTENT_PROBLEMS = (_label_value, _channel_shape, _label_affine, _unreadable)


@pytest.mark.parametrize('problem', _CONTENT_PROBLEMS)
def test_check_names_each_problem_alone(tmp_path, problem):
  root = _nnunet_3d(tmp_path)
  expected = problem(root)
  _raises(root, *expected, problems=1)


def test_check_names_every_problem_at_once(tmp_path):
  root = _nnunet_3d(tmp_path)
  expected = [text for problem in _CONTENT_PROBLEMS for text in problem(root)]
  _raises(root, *expected, problems=4)


def test_check_tolerates_affine_rounding(tmp_path):
  root = _nnunet_3d(tmp_path)
  nudged = _affine('case_000', 2.5)
  nudged[0, 3] = 1e-5
  _save(f'{root}/labelsTr/case_000.nii.gz', _label('case_000', 8), nudged)
  nnunet.check(nnunet.read_layout(root))
  with pytest.raises(folder.BadDataError, match='affine differs'):
    nnunet.check(nnunet.read_layout(root), tolerance=1e-6)


def test_check_names_msd_images_whose_channel_count_differs(tmp_path):
  root = _msd(tmp_path)
  _save(f'{root}/imagesTr/case_001.nii.gz', _voxels('x', 8, 3), _affine('x', 2.0))
  _save(f'{root}/imagesTr/case_003.nii.gz', _voxels('x', 8, 3), _affine('x', 2.5))
  message = _raises(root, problems=2)
  for case_id in ('case_001', 'case_003'):
    assert re.search(
      rf'{root}/imagesTr/{case_id}.nii.gz: 3 channel\(s\), but dataset.json names 2',
      message,
    )
  assert 'case_000' not in message


def test_check_names_msd_problems_at_once(tmp_path):
  root = _msd(tmp_path)
  _save(f'{root}/imagesTr/case_001.nii.gz', _voxels('x', 8, 3), _affine('x', 2.0))
  _save(f'{root}/labelsTr/case_004.nii.gz', _label('x', 12, value=7), _affine('x', 2.5))
  _save(f'{root}/labelsTr/case_000.nii.gz', _label('x', 9), _affine('x', 2.5))
  _raises(
    root,
    f'{root}/imagesTr/case_001.nii.gz: 3 channel(s)',
    f'{root}/labelsTr/case_004.nii.gz: label value(s) [7]',
    f'{root}/labelsTr/case_000.nii.gz: shape (12, 10, 9) differs',
    problems=3,
  )


# ------------------------------------------------------------------ names


def test_case_id_of():
  ending = '.nii.gz'
  assert nnunet.case_id_of('BRATS_001_0000.nii.gz', file_ending=ending, channel=True) == (
    'BRATS_001'
  )
  assert nnunet.case_id_of(
    '/d/imagesTr/la_003_0012.nii.gz', file_ending=ending, channel=True
  ) == ('la_003')
  assert (
    nnunet.case_id_of('BRATS_001.nii.gz', file_ending=ending, channel=False) == 'BRATS_001'
  )
  assert nnunet.case_id_of('BRATS_001.nii.gz', file_ending=ending, channel=True) is None
  assert nnunet.case_id_of('BRATS_001_000.nii.gz', file_ending=ending, channel=True) is None
  assert nnunet.case_id_of('BRATS_001_0000.nii', file_ending=ending, channel=True) is None
  assert (
    nnunet.case_id_of('._BRATS_001_0000.nii.gz', file_ending=ending, channel=True) is None
  )
  assert nnunet.case_id_of('_0000.nii.gz', file_ending=ending, channel=True) is None
  assert nnunet.case_id_of('.nii.gz', file_ending=ending, channel=False) is None
  assert nnunet.case_id_of('road_7_0000.png', file_ending='.png', channel=True) == 'road_7'


def test_normalization_of():
  assert [
    nnunet.normalization_of(name)
    for name in (
      'CT',
      'ct',
      'noNorm',
      'NONORM',
      'rescale_to_0_1',
      'RGB_to_0_1',
      'zscore',
      'T2',
      'MRI',
      '',
    )
  ] == [
    'ct',
    'ct',
    'none',
    'none',
    'minmax',
    'rescale',
    'zscore',
    'zscore',
    'zscore',
    'zscore',
  ]


# ------------------------------------------------------------------ splits

# Hand values, derived from sklearn's KFold rule: arange(n) is permuted by
# np.random.RandomState(12345).shuffle, giving [0, 7, 3, 9, 6, 4, 1, 8, 5, 2]
# for n = 10 and [6, 3, 4, 0, 1, 5, 2] for n = 7; the folds take 2, 2, 2, 2, 2
# (n = 10) and 2, 2, 1, 1, 1 (n = 7) of them in turn, sorted. Confirmed once,
# outside this repository, against
# sklearn.model_selection.KFold(5, shuffle=True, random_state=12345) (1.9.1).
_VAL_10 = [[0, 7], [3, 9], [4, 6], [1, 8], [2, 5]]
_VAL_7 = [[3, 6], [0, 4], [1], [5], [2]]


@pytest.mark.parametrize('n, expected', [(10, _VAL_10), (7, _VAL_7)])
def test_splits_match_nnunet(n, expected):
  ids = [f'case_{i:02d}' for i in range(n)]
  folds = nnunet.splits(list(reversed(ids)))  # Sorted first, whatever the order.
  assert [fold['val'] for fold in folds] == [[ids[i] for i in val] for val in expected]
  vals = [i for fold in folds for i in fold['val']]
  assert sorted(vals) == ids  # Every case in exactly one val fold.
  for fold in folds:
    assert not set(fold['train']) & set(fold['val'])
    assert sorted(fold['train'] + fold['val']) == ids
    assert fold['train'] == sorted(fold['train'])


def test_splits_refuse_bad_input():
  with pytest.raises(ValueError, match='3 case'):
    nnunet.splits(['a', 'b', 'c'])
  with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
    nnunet.splits(['a', 'a', 'b', 'c', 'd', 'e'])
  with pytest.raises(ValueError, match='num_folds'):
    nnunet.splits(['a', 'b'], num_folds=1)
  assert len(nnunet.splits(['a', 'b', 'c'], num_folds=3)) == 3


def test_read_or_write_splits(tmp_path):
  ids = [f'case_{i:02d}' for i in range(7)]
  path = tmp_path / 'preprocessed' / 'splits_final.json'
  written = nnunet.read_or_write_splits(path, ids)
  assert written == nnunet.splits(ids)
  assert json.loads(path.read_text()) == written
  assert os.listdir(path.parent) == ['splits_final.json']  # No temporary left.
  assert nnunet.read_or_write_splits(path, reversed(ids), num_folds=3) == written

  written[1]['val'][0] = 'stranger'
  path.write_text(json.dumps(written))
  with pytest.raises(folder.BadDataError) as info:
    nnunet.read_or_write_splits(path, ids)
  message = str(info.value)
  assert str(path) in message and "unknown case id(s) ['stranger']" in message
  assert f"fold 1 leaves out case id(s) ['{nnunet.splits(ids)[1]['val'][0]}']" in message
