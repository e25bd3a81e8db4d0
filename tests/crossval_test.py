"""Cross-validation: the runs' checks in process, and 2 folds end to end through launch.py.

The data set root holds a hand-made 2-fold `splits_final.json` (nnU-Net's format),
and each fold trains with `--config.data.fold=K`, as a user would.
"""

import csv
import json
import os
import subprocess
import sys
import types

from absl import logging
import numpy as np
import pytest

from unet_jax.crossval import runs as runs_lib
from unet_jax.data import phantoms
from unet_jax.inference import postprocessing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = [f'phantom_tr{i:03d}' for i in range(4)]
FOLDS = [{'train': IDS[2:], 'val': IDS[:2]}, {'train': IDS[:2], 'val': IDS[2:]}]


def _train(base, root, fold):
  """Starts fold `fold`'s run in a subprocess; returns (workdir, process)."""
  data_dir = base / f'tfds_f{fold}'
  workdir = base / f'run_f{fold}'
  args = [
    '--config=' + os.path.join(ROOT, 'configs/folder.py'),
    f'--workdir={workdir}',
    f'--config.data.root={root}',
    f'--config.data.data_dir={data_dir}',
    f'--config.data.fold={fold}',
    '--config.model.features=4',
    '--config.batch_size=2',
    '--config.eval_batch_size=2',
    '--config.num_train_steps=2',
    '--config.eval_every_steps=2',
    '--config.checkpoint_every_steps=2',
  ]
  proc = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'launch.py'), *args],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  return workdir, proc


def _wait(proc, timeout=300):
  try:
    _, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, stderr[-4000:]


@pytest.fixture(scope='module')
def crossval_output(tmp_path_factory):
  base = tmp_path_factory.mktemp('crossval')
  root = base / 'Dataset002_Phantom'
  phantoms.write_nnunet_dataset(str(root), num_training=4, num_test=0, size=16.0)
  with open(root / 'splits_final.json', 'w') as f:
    json.dump(FOLDS, f)
  started = [_train(base, root, fold) for fold in (0, 1)]  # Both folds at once.
  try:
    for _, proc in started:
      _wait(proc)
  finally:
    for _, proc in started:
      if proc.poll() is None:
        proc.kill()
  output = base / 'cv'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'unet_jax.crossval',
      f'--workdirs={base / "run_f*"}',
      f'--output={output}',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return base, output, proc


def test_every_case_once_by_the_fold_that_did_not_train_on_it(crossval_output):
  base, output, proc = crossval_output
  with open(output / 'crossval.csv') as f:
    rows = list(csv.DictReader(f))
  assert sorted({r['case'] for r in rows}) == IDS
  assert len(rows) == len(IDS) * 2  # Two foreground classes.
  for r in rows:
    fold = 0 if r['case'] in FOLDS[0]['val'] else 1
    assert r['workdir'] == str(base / f'run_f{fold}')
    for column in ('dice', 'dice_postprocessed', 'iou', 'nsd'):
      assert 0.0 <= float(r[column]) <= 1.0, (column, r)
    assert float(r['hd95']) >= 0.0
  assert '4/4' in proc.stderr  # The progress line.
  assert 'foreground' in proc.stdout


def test_the_summary_and_the_postprocessing_file(crossval_output):
  _, output, _ = crossval_output
  with open(output / 'summary.csv') as f:
    summary = list(csv.DictReader(f))
  assert [r['class'] for r in summary] == ['1', '2', 'foreground']
  rules = postprocessing.read(str(output / 'postprocessing.json'))
  assert isinstance(rules, postprocessing.Rules)
  with open(output / 'postprocessing.json') as f:
    report = json.load(f)['report']
  assert report['num_cases'] == 4 and report['classes'] == [1, 2]
  assert report['rules'][0]['rule'] == 'largest_foreground'


# ---------------------------------------------------------------------------
# The checks, on stand-ins for loaded runs.


def _predictor(root='/data/Dataset002', num_classes=3, channels=2):
  return types.SimpleNamespace(
    data=types.SimpleNamespace(name='segmentation_folder', root=root),
    model=types.SimpleNamespace(num_classes=num_classes),
    num_channels=channels,
    ndim=3,
  )


@pytest.mark.parametrize(
  'other, field',
  [
    (_predictor(root='/data/Dataset003'), 'data.root differs'),
    (_predictor(num_classes=4), 'model.num_classes differs'),
    (_predictor(channels=1), 'input channels differs'),
  ],
)
def test_runs_of_different_data_sets_are_refused(other, field):
  with pytest.raises(ValueError, match=field) as e:
    runs_lib.check_alike(['a', 'b'], [_predictor(), other])
  assert 'a: ' in str(e.value) and 'b: ' in str(e.value)


def _run(workdir, val_ids):
  return runs_lib.Run(workdir, None, tuple(val_ids))


def test_a_case_validated_twice_is_an_error():
  runs = [_run('f0', ['a', 'b']), _run('f1', ['b', 'c'])]
  with pytest.raises(ValueError, match='b is validated by both f0 and f1'):
    runs_lib.assign(runs, ['a', 'b', 'c'])


def test_cases_no_run_validates_are_a_warning(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  owners = runs_lib.assign([_run('f0', ['b', 'a'])], ['a', 'b', 'c'])
  assert owners == {'a': 0, 'b': 0}
  assert len(warnings) == 1 and "['c']" in warnings[0]


def test_workdirs_expand_globs(tmp_path):
  for name in ('run_f1', 'run_f0', 'other'):
    (tmp_path / name).mkdir()
  found = runs_lib.expand(f'{tmp_path}/run_f*,{tmp_path}/other')
  assert found == [str(tmp_path / n) for n in ('run_f0', 'run_f1', 'other')]
  with pytest.raises(FileNotFoundError, match='nothing'):
    runs_lib.expand([str(tmp_path / 'nothing')])


def test_the_scores_of_one_case():
  from unet_jax.crossval import scores  # pylint: disable=g-import-not-at-top

  reference = np.zeros((8, 8), np.int16)
  reference[2:6, 2:6] = 1
  values = scores.case_metrics(
    reference.astype(np.uint8), reference, num_classes=3, spacing=(1.0, 1.0), tolerance=1
  )
  np.testing.assert_array_equal(values['dice'], [1.0, np.nan])
  np.testing.assert_array_equal(values['hd95'], [0.0, np.nan])
  np.testing.assert_array_equal(values['nsd'], [1.0, np.nan])
