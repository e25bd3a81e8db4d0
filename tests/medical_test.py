"""End to end on an nnU-Net v2 data set with mixed spacing: a tiny planned 3D run
through launch.py, then the predict command, then masks on each input's grid."""

import csv
import json
import os
import subprocess
import sys

import nibabel
import numpy as np
import pytest

from unet_jax import planning
from unet_jax.data import geometry
from unet_jax.data import phantoms
from unet_jax.inference import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=900):
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'launch.py'), *args],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope='module')
def planned_run(tmp_path_factory):
  """Trains configs/folder.py on a generated nnU-Net folder, as a user would."""
  base = tmp_path_factory.mktemp('medical')
  root = base / 'Dataset001_Phantom'
  phantoms.write_nnunet_dataset(str(root), num_training=6, num_test=2, size=32.0, seed=0)
  workdir = base / 'run'
  proc = _launch(
    '--config=' + os.path.join(ROOT, 'configs/folder.py'),
    f'--workdir={workdir}',
    f'--config.data.root={root}',
    f'--config.data.data_dir={base / "tfds"}',
    '--config.model.features=4',
    '--config.batch_size=2',
    '--config.eval_batch_size=2',
    '--config.num_train_steps=2',
    '--config.eval_every_steps=2',
    '--config.checkpoint_every_steps=2',
  )
  return root, workdir, base, proc


def test_the_plan_resamples_to_the_median_spacing(planned_run):
  root, workdir, base, proc = planned_run
  assert 'Final validation: dice' in proc.stdout
  p = planning.read_plan(str(workdir / 'plan.json'))
  # Cases at (2, 2, 2) and (4, 1.5, 1.5) mm: the per-axis median, 3 <= 3 x 1.75.
  np.testing.assert_allclose(p['data.target_spacing'], (3.0, 1.75, 1.75))
  with open(workdir / 'config.json') as f:
    recorded = json.load(f)
  np.testing.assert_allclose(recorded['data']['target_spacing'], (3.0, 1.75, 1.75))
  assert recorded['data']['normalization'] == 'zscore'  # 'T1', 'T2': z-score.
  # The 5-fold split is written beside the converted data, nnU-Net's format.
  written = [
    os.path.join(d, n)
    for d, _, names in os.walk(base / 'tfds')
    for n in names
    if n == 'splits_final.json'
  ]
  assert len(written) == 1
  with open(written[0]) as f:
    folds = json.load(f)
  assert len(folds) == 5
  ids = sorted(folds[0]['train'] + folds[0]['val'])
  assert ids == [f'phantom_tr{i:03d}' for i in range(6)]


def test_predict_writes_every_mask_on_its_input_grid(planned_run, tmp_path):
  root, workdir, _, _ = planned_run
  out = tmp_path / 'out'
  _launch(
    '--mode=predict',
    f'--workdir={workdir}',
    f'--input={root / "imagesTs"}',
    f'--output={out}',
  )
  written = sorted(n for n in os.listdir(out) if n.endswith('.nii.gz'))
  assert written == ['phantom_ts000.nii.gz', 'phantom_ts001.nii.gz']  # nnU-Net names.
  for name in written:
    reference = nibabel.load(root / 'imagesTs' / name.replace('.nii.gz', '_0000.nii.gz'))
    mask = nibabel.load(out / name)
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-6)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
  # labelsTs beside imagesTs: scored per case.
  with open(out / 'per_case.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['case'] for r in rows] == ['phantom_ts000', 'phantom_ts001', 'mean']


def test_a_permuted_copy_gives_the_same_prediction_in_world_space(planned_run, tmp_path):
  root, workdir, _, _ = planned_run
  rng = np.random.default_rng(5)
  image, label = phantoms.phantom(rng, spacing=(4.0, 1.5, 1.5), size=32.0)
  for name, permute in (('plain', False), ('permuted', True)):
    folder = tmp_path / name
    folder.mkdir()
    phantoms.write_case(
      str(folder), None, 'case', image, label, (4.0, 1.5, 1.5), permute=permute
    )
  predictions = {}
  for name in ('plain', 'permuted'):
    out = tmp_path / f'out_{name}'
    predict.run(str(workdir), str(tmp_path / name), str(out))
    written = out / 'case.nii.gz'
    reference = nibabel.load(tmp_path / name / 'case_0000.nii.gz')
    np.testing.assert_allclose(nibabel.load(written).affine, reference.affine, atol=1e-6)
    predictions[name] = geometry.read_volume(str(written)).array
  assert nibabel.aff2axcodes(
    nibabel.load(tmp_path / 'permuted' / 'case_0000.nii.gz').affine
  ) != ('R', 'A', 'S')
  np.testing.assert_array_equal(predictions['plain'], predictions['permuted'])


# ---------------------------------------------------------------------------
# The built copies, in process.


def _open(root, data_dir, **options):
  from unet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from unet_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data = config_lib.DataOptions(
    name='segmentation_folder',
    root=str(root),
    data_dir=str(data_dir),
    eval_split='val',
    **options,
  )
  return pipeline.open(data, divisor=1)


def _write_msd(root, spacings):
  """A Decathlon data set of phantoms: 4D images, the channels on the 4th axis."""
  rng = np.random.default_rng(3)
  training = []
  for i, spacing in enumerate(spacings):
    image, label = phantoms.phantom(rng, spacing=spacing, size=24.0)
    affine = np.diag(list(reversed(spacing)) + [1.0])
    for folder, array in (('imagesTr', image), ('labelsTr', label)):
      os.makedirs(root / folder, exist_ok=True)
      data = np.swapaxes(array, 0, 2)  # (D, H, W, ...) -> (x, y, z, ...).
      nibabel.save(nibabel.Nifti1Image(data, affine), root / folder / f'brain_{i}.nii.gz')
    training.append(
      {'image': f'./imagesTr/brain_{i}.nii.gz', 'label': f'./labelsTr/brain_{i}.nii.gz'}
    )
  spec = {
    'name': 'Phantom',
    'modality': {'0': 'T1', '1': 'T2'},
    'labels': {'0': 'background', '1': 'grey', '2': 'white'},
    'numTraining': len(training),
    'training': training,
    'test': [],
  }
  with open(root / 'dataset.json', 'w') as f:
    json.dump(spec, f)


def test_msd_is_built_on_fold_0_at_the_target_spacing(tmp_path):
  spacings = [(2.0, 2.0, 2.0), (4.0, 1.5, 1.5)] * 3
  _write_msd(tmp_path / 'Task01_Phantom', spacings)
  target = (3.0, 2.0, 1.5)
  data = _open(tmp_path / 'Task01_Phantom', tmp_path / 'tfds', target_spacing=target)
  source = data.source
  assert source.num_channels == 2 and source.num_classes == 3
  assert source.channel_names == ('T1', 'T2')
  assert source.labelled_splits == ('train', 'val')
  # 6 cases in 5 folds: fold 0 validates on 2 (sizes 2, 1, 1, 1, 1).
  train, val = data.split('train'), data.split('val')
  assert (len(train), len(val)) == (4, 2)
  native = {f'brain_{i}': (12, 12, 12) if i % 2 == 0 else (6, 16, 16) for i in range(6)}
  for records in (train, val):
    for index in range(len(records)):
      example = source.read(records, index)
      assert example.spacing == target
      expected = geometry.resampled_shape(
        native[example.case_id], spacings[int(example.case_id[-1])], target
      )
      assert example.image.shape == (*expected, 2) and example.label.shape == expected
  # (2, 2, 2) mm: 12 -> 8, 12 -> 12, 12 -> 16; (4, 1.5, 1.5) mm: 6 -> 8, 16 -> 12, 16.
  assert geometry.resampled_shape((12, 12, 12), (2, 2, 2), target) == (8, 12, 16)
  assert geometry.resampled_shape((6, 16, 16), (4, 1.5, 1.5), target) == (8, 12, 16)
  # Another target spacing is another built copy, not the cached one.
  other = _open(tmp_path / 'Task01_Phantom', tmp_path / 'tfds', target_spacing=(2, 2, 2))
  assert other.source.builder.builder_config.name != source.builder.builder_config.name
  assert other.source.read(other.split('train'), 0).spacing == (2.0, 2.0, 2.0)


def test_the_projects_own_layout_is_resampled_too(tmp_path):
  from unet_jax.data import folder  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(4)
  for split, spacing in (('train', (4.0, 1.5, 1.5)), ('val', (2.0, 2.0, 2.0))):
    image, label = phantoms.phantom(rng, spacing=spacing, size=24.0)
    folder.write_pair(tmp_path / 'data', split, 'case', image, label, spacing=spacing)
  data = _open(tmp_path / 'data', tmp_path / 'tfds', target_spacing=(2.0, 2.0, 2.0))
  example = data.source.read(data.split('train'), 0)
  assert example.spacing == (2.0, 2.0, 2.0)
  assert example.label.shape == (12, 12, 12)  # (6, 16, 16) at (4, 1.5, 1.5) mm.
  assert data.source.ndim == 3  # config.data.config '' reads 3D from the .nii.gz files.


def test_predict_names_a_volume_too_large_for_the_memory(tmp_path):
  from unet_jax.inference import inputs  # pylint: disable=g-import-not-at-top

  image, label = phantoms.phantom(np.random.default_rng(0), spacing=(2, 2, 2), size=24.0)
  phantoms.write_case(
    str(tmp_path), None, 'big', image[..., :1], label, (2, 2, 2), permute=False
  )
  cases = inputs.list_inputs(str(tmp_path), ndim=3, num_channels=1)
  assert [c.stem for c in cases] == ['big']
  # At 0.5 mm the 12^3 volume is 48^3 voxels: (1 channel + 3 classes) x 4 bytes
  # each there, and 3 classes x 4 bytes at 12^3: 442368 + 1327104 + 20736 bytes.
  needed = 48**3 * 4 * (1 + 3) + 12**3 * 4 * 3
  assert needed == 1790208
  with pytest.raises(ValueError, match=r'big_0000.nii.gz: predicting it needs .* GiB'):
    inputs.check_inputs(
      cases,
      ndim=3,
      num_channels=1,
      target_spacing=(0.5, 0.5, 0.5),
      num_classes=3,
      memory=needed - 1,
    )
  inputs.check_inputs(
    cases,
    ndim=3,
    num_channels=1,
    target_spacing=(0.5, 0.5, 0.5),
    num_classes=3,
    memory=needed,
  )


def test_nnunet_inputs_are_grouped_by_case(tmp_path):
  from unet_jax.inference import inputs  # pylint: disable=g-import-not-at-top

  image, label = phantoms.phantom(np.random.default_rng(0), spacing=(2, 2, 2), size=16.0)
  test = tmp_path / 'Dataset003_X' / 'imagesTs'
  test.mkdir(parents=True)
  for case in ('a', 'b'):
    phantoms.write_case(str(test), None, case, image, label, (2, 2, 2), permute=False)
  (tmp_path / 'Dataset003_X' / 'dataset.json').write_text('{}')
  cases = inputs.list_inputs(str(test), ndim=3, num_channels=2)
  assert [(c.stem, [os.path.basename(p) for p in c.paths]) for c in cases] == [
    ('a', ['a_0000.nii.gz', 'a_0001.nii.gz']),
    ('b', ['b_0000.nii.gz', 'b_0001.nii.gz']),
  ]
  os.remove(test / 'b_0001.nii.gz')
  with pytest.raises(ValueError, match=r'b: has channels \[0\]'):
    inputs.list_inputs(str(test), ndim=3, num_channels=2)
