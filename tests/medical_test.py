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
