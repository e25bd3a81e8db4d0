"""Using a trained run: load, predict files (PNG and NIfTI), export, and every bad input."""

import csv
import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel
import numpy as np
from PIL import Image
import pytest

from unet_jax import checkpointing
from unet_jax import train
from unet_jax.data import folder as sf
from unet_jax.data import pipeline as input_pipeline
from unet_jax.inference import export
from unet_jax.inference import predict
from unet_jax.inference import predictor as inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_config(root, data_dir, ndim, **extra):
  config = importlib.import_module('configs.folder').get_config()
  overrides = {
    'data.root': str(root),
    'data.data_dir': str(data_dir),
    'data.config': f'{ndim}d',
    'model.features': 4,
    'model.depth': 2,
    'batch_size': 2,
    'eval_batch_size': 2,
    'num_train_steps': 3,
    'log_every_steps': 1,
    'eval_every_steps': 3,
    'checkpoint_every_steps': 3,
    'plan': False,
    **extra,
  }
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def _write_2d(root, rng):
  for split, count in (('train', 4), ('val', 3)):
    for i in range(count):
      h, w = (24, 24) if i % 2 == 0 else (21, 30)  # Sizes the model cannot take too.
      label = np.zeros((h, w), np.uint8)
      label[3:10, 4:12] = 1
      image = (rng.normal(60, 10, (h, w)) + 120 * label).clip(0, 255).astype(np.uint8)
      sf.write_pair(root, split, f'case{i}', image, label)


@pytest.fixture(scope='module')
def run2d(tmp_path_factory):
  """A tiny trained 2D run (grey images, 2 classes) and its data folder."""
  base = tmp_path_factory.mktemp('run2d')
  _write_2d(base / 'data', np.random.default_rng(0))
  workdir = str(base / 'run')
  train.train_and_evaluate(_folder_config(base / 'data', base / 'tfds', 2), workdir)
  return workdir, base / 'data'


@pytest.fixture(scope='module')
def run3d(tmp_path_factory):
  """A tiny trained 3D run on NIfTI volumes with an oblique affine."""
  base = tmp_path_factory.mktemp('run3d')
  rng = np.random.default_rng(1)
  for split, count in (('train', 2), ('val', 2)):
    for i in range(count):
      label = np.zeros((6, 16, 12), np.uint8)
      label[1:4, 4:9, 3:8] = 1
      image = rng.normal(0, 1, label.shape).astype(np.float32) + 2 * label
      sf.write_pair(base / 'data', split, f'vol{i}', image, label, spacing=(3.0, 1, 1))
  workdir = str(base / 'run')
  train.train_and_evaluate(
    _folder_config(base / 'data', base / 'tfds', 3, **{'model.pool_sizes': (1, 2, 2)}),
    workdir,
  )
  return workdir, base / 'data'


def test_load_restores_the_trained_variables(run2d):
  workdir, _ = run2d
  predictor = inference.load(workdir, step='latest')
  assert predictor.step == 3 and predictor.ndim == 2 and predictor.num_channels == 1
  assert predictor.divisor == (4, 4)
  assert predictor.train_shape == (24, 32)  # The largest image (24, 30), padded.
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  saved = manager.restore(3)
  manager.close()
  for name in ('params', 'batch_stats'):
    flat_saved = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(saved[name])])
    flat_loaded = jnp.concatenate(
      [jnp.ravel(x) for x in jax.tree.leaves(predictor.variables[name])]
    )
    np.testing.assert_array_equal(flat_loaded, flat_saved)
  assert inference.load(workdir).step == 3  # 'best': the only evaluated step.
  relative = os.path.relpath(workdir)  # Orbax wants absolute paths; load does not.
  assert inference.load(relative, step=3).step == 3


def test_predict_equals_the_model_on_the_normalised_image(run2d):
  workdir, data = run2d
  predictor = inference.load(workdir)
  image, _ = sf.read_image(str(data / 'val' / 'images' / 'case0.png'), ndim=2)
  logits = predictor.predict(image)
  direct = predictor.apply(input_pipeline.normalise(image)[None])[0]
  np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
  odd, _ = sf.read_image(str(data / 'val' / 'images' / 'case1.png'), ndim=2)
  assert predictor.predict(odd).shape == (21, 30, 2)  # Padded, then cropped back.


def test_predict_command_writes_masks_overlays_and_the_per_case_table(run2d, tmp_path):
  workdir, data = run2d
  out = tmp_path / 'out'
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--mode=predict',
      f'--workdir={workdir}',
      f'--input={data / "val" / "images"}',
      f'--output={out}',
      '--tta',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ETA' in proc.stderr and '3/3' in proc.stderr  # The progress bar.
  with open(out / 'per_case.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['case'] for r in rows] == ['case0', 'case1', 'case2', 'mean']
  for row in rows[:-1]:
    pred = np.asarray(Image.open(out / f'{row["case"]}.png'))
    label = np.asarray(Image.open(data / 'val' / 'masks' / f'{row["case"]}.png'))
    assert pred.shape == label.shape and pred.dtype == np.uint8
    tp = np.sum((pred == 1) & (label == 1))
    dice = 2 * tp / (np.sum(pred == 1) + np.sum(label == 1))
    assert float(row['dice_1']) == pytest.approx(dice, abs=1e-5)
    assert (out / 'overlays' / f'{row["case"]}.png').stat().st_size > 1000
  assert float(rows[-1]['dice_1']) == pytest.approx(
    np.mean([float(r['dice_1']) for r in rows[:-1]]), abs=1e-5
  )
  assert 'mean' in proc.stdout  # The table is printed.
  assert not [n for n in os.listdir(out) if 'partial' in n]


def test_predict_nifti_keeps_the_affine_and_header(run3d, tmp_path):
  workdir, data = run3d
  source = data / 'val' / 'images' / 'vol0.nii.gz'
  rows = predict.run(workdir, str(data / 'val' / 'images'), str(tmp_path), step='best')
  assert [r[0] for r in rows] == ['vol0', 'vol1']
  written = nibabel.load(tmp_path / 'vol0.nii.gz')
  original = nibabel.load(source)
  np.testing.assert_array_equal(written.affine, original.affine)
  np.testing.assert_allclose(
    written.header.get_zooms()[:3], original.header.get_zooms()[:3]
  )
  assert written.shape == original.shape[:3]
  mask = np.asarray(written.dataobj)
  assert set(np.unique(mask)) <= {0, 1}
  label = np.asarray(nibabel.load(data / 'val' / 'masks' / 'vol0.nii.gz').dataobj)
  tp = np.sum((mask == 1) & (label == 1))
  total = np.sum(mask == 1) + np.sum(label == 1)
  assert rows[0][2] == pytest.approx(2 * tp / total if total else np.nan, nan_ok=True)
  overlay = Image.open(tmp_path / 'overlays' / 'vol0.png')
  assert overlay.size[0] > 2 * overlay.size[1]  # Three slices side by side.


def test_export_round_trip_gives_the_logits_of_predict_on_raw_images(run2d, tmp_path):
  workdir, _ = run2d
  path = export.export_run(workdir, str(tmp_path / 'model.jax'))
  predictor = inference.load(workdir)
  # Raw intensities: the run's z-score is inside the file, per image.
  images = np.random.default_rng(0).uniform(100, 1000, (3, 24, 32, 1)).astype(np.float32)
  exported = export.load_exported(path)
  logits = np.asarray(exported(images))
  for i in range(3):
    want = predictor.predict(images[i])
    np.testing.assert_allclose(logits[i], want, rtol=1e-4, atol=1e-4)
    assert np.mean(logits[i].argmax(-1) == want.argmax(-1)) == 1.0
  np.testing.assert_allclose(exported(images[:1]), logits[:1], rtol=1e-5, atol=1e-5)
  assert exported.contract['input']['normalization'] == [{'mode': 'zscore'}]


def test_load_errors_name_the_path(run2d, tmp_path):
  workdir, _ = run2d
  with pytest.raises(FileNotFoundError, match='no_such_run.*does not exist'):
    inference.load(str(tmp_path / 'no_such_run'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='empty.*no checkpoints/ folder'):
    inference.load(str(tmp_path / 'empty'))
  (tmp_path / 'empty' / 'checkpoints').mkdir()
  with pytest.raises(FileNotFoundError, match='checkpoints holds no finished checkpoint'):
    inference.load(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match=r'no checkpoint of step 7; it has \[3\]'):
    inference.load(workdir, step=7)
  with pytest.raises(ValueError, match="step='first'"):
    inference.load(workdir, step='first')


def test_a_checkpoint_that_does_not_fit_its_config_is_named(run2d, tmp_path):
  workdir, _ = run2d
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5)
  record = checkpointing.read_record(manager, 3)
  manager.close()
  record['model']['features'] = 8  # A record that lies about the model.
  bad = tmp_path / 'bad'
  manager = checkpointing.create_manager(str(bad / 'checkpoints'), keep=5)
  saved = checkpointing.restore(
    checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=5), None, step=3
  )
  checkpointing.save(manager, 3, saved, record=record)
  manager.close()
  with pytest.raises(ValueError, match=r'bad/checkpoints/3 does not fit the model'):
    inference.load(str(bad))


def test_bad_inputs_are_named_before_anything_is_predicted(run2d, tmp_path):
  workdir, _ = run2d
  folder = tmp_path / 'inputs'
  folder.mkdir()
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / 'good.png')
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / 'rgb.png')
  (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  with pytest.raises(ValueError) as e:
    predict.run(workdir, str(folder), str(tmp_path / 'out'))
  message = str(e.value)
  assert 'rgb.png: 3 channel(s), but the model takes 1' in message
  assert 'broken.png: unreadable' in message
  assert 'good.png' not in message
  assert not (tmp_path / 'out').exists()  # Nothing was written.
  volume = folder / 'scan.nii.gz'
  nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), volume)
  with pytest.raises(ValueError, match=r'scan.nii.gz: a 3D input .* this run is 2D'):
    predict.run(workdir, str(volume), str(tmp_path / 'out'))
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    predict.run(workdir, str(tmp_path / 'nothing_here'), str(tmp_path / 'out'))


def test_the_predict_command_prints_one_line_errors(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--mode=predict',
      f'--workdir={tmp_path / "missing"}',
      f'--input={tmp_path}',
      f'--output={tmp_path / "out"}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 2
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith(f"Error: --workdir '{tmp_path / 'missing'}' does not exist")
  )
