"""Cross-validation folds: config.data.fold and num_folds, the splits file, fold 'all'.

Real builders on generated files: a tiny nnU-Net data set (6 phantoms) and the
project's own layout (2D pairs).
"""

import json
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from unet_jax import config as config_lib
from unet_jax.data import folder
from unet_jax.data import nnunet
from unet_jax.data import phantoms
from unet_jax.data import pipeline
from unet_jax.data import sources
from unet_jax.train import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = tuple(f'phantom_tr{i:03d}' for i in range(6))


@pytest.fixture(scope='module')
def nnunet_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('folds') / 'Dataset001_Phantom'
  phantoms.write_nnunet_dataset(str(root), num_training=6, num_test=0, size=16.0)
  return root


def _options(root, data_dir, **options):
  return config_lib.DataOptions(
    name='segmentation_folder',
    root=str(root),
    data_dir=str(data_dir),
    eval_split='val',
    **options,
  )


def _ids(data, split):
  """The case ids of a built split, sorted."""
  records = data.split(split)
  return tuple(sorted(data.source.read(records, i).case_id for i in range(len(records))))


def _write_own_layout(root, splits):
  """The project's layout: 2D pairs, `splits` maps a split to its case ids."""
  rng = np.random.default_rng(0)
  for split, ids in splits.items():
    for case_id in ids:
      image = rng.integers(0, 255, (16, 16), dtype=np.uint8)
      mask = (rng.random((16, 16)) > 0.5).astype(np.uint8)
      folder.write_pair(root, split, case_id, image, mask)


# ---------------------------------------------------------------------------
# nnU-Net data: the splits file.


def test_each_case_validates_in_exactly_one_fold(nnunet_root, tmp_path):
  folds = [sources.fold_ids(_options(nnunet_root, tmp_path, fold=k)) for k in range(5)]
  for train, val in folds:
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(IDS)
  vals = [case for _, val in folds for case in val]
  assert sorted(vals) == list(IDS)  # Each case once: the folds partition the cases.
  assert sources.fold_ids(_options(nnunet_root, tmp_path, fold='all')) == (IDS, ())


@pytest.mark.parametrize('fold', [0, 1])
def test_the_built_splits_are_the_fold(nnunet_root, tmp_path, fold):
  options = _options(nnunet_root, tmp_path, fold=fold)
  train, val = sources.fold_ids(options)
  data = pipeline.open(options, divisor=1)
  assert (_ids(data, 'train'), _ids(data, 'val')) == (train, val)
  assert data.source.labelled_splits == ('train', 'val')
  assert data.info.num_eval == len(val)


def test_another_fold_is_another_built_copy(nnunet_root, tmp_path):
  names = {
    pipeline.open(
      _options(nnunet_root, tmp_path, fold=k), divisor=1
    ).source.builder.builder_config.name
    for k in (0, 1, 'all')
  }
  assert len(names) == 3


def test_the_split_is_made_once_in_nnunet_format(nnunet_root, tmp_path):
  sources.fold_ids(_options(nnunet_root, tmp_path))
  path = sources.splits_path(str(nnunet_root), str(tmp_path))
  assert path.startswith(str(tmp_path))  # Beside the built copies, not in the data.
  with open(path) as f:
    written = json.load(f)
  # nnU-Net v2's splits_final.json: a list of {'train': [ids], 'val': [ids]}.
  assert isinstance(written, list) and len(written) == 5
  assert all(sorted(fold) == ['train', 'val'] for fold in written)
  assert written == nnunet.splits(IDS, num_folds=5)
  assert nnunet.read_or_write_splits(path, IDS) == written  # Round trip.
  before = os.stat(path).st_mtime_ns
  sources.fold_ids(_options(nnunet_root, tmp_path, fold=3))
  pipeline.open(_options(nnunet_root, tmp_path, fold=0), divisor=1)
  assert os.stat(path).st_mtime_ns == before  # Read, not rewritten.


def test_a_hand_made_split_file_is_honoured_as_it_is(tmp_path):
  root = tmp_path / 'Dataset002_Phantom'
  phantoms.write_nnunet_dataset(str(root), num_training=6, num_test=0, size=16.0)
  custom = [
    {'train': list(IDS[2:]), 'val': list(IDS[:2])},
    {'train': list(IDS[:2] + IDS[3:]), 'val': [IDS[2]]},
  ]  # 2 folds, the second leaving cases 3..5 out of every val: nnU-Net allows it.
  path = root / 'splits_final.json'
  path.write_text(json.dumps(custom))
  before = (path.read_text(), os.stat(path).st_mtime_ns)
  assert sources.splits_path(str(root), str(tmp_path)) == str(path)
  options = _options(root, tmp_path / 'tfds', fold=1)
  assert sources.fold_ids(options) == (IDS[:2] + IDS[3:], (IDS[2],))
  data = pipeline.open(options, divisor=1)
  assert (_ids(data, 'train'), _ids(data, 'val')) == (IDS[:2] + IDS[3:], (IDS[2],))
  assert (path.read_text(), os.stat(path).st_mtime_ns) == before
  with pytest.raises(ValueError, match=r'fold=2 is beyond the 2 folds of .*splits_final'):
    sources.fold_ids(_options(root, tmp_path / 'tfds', fold=2))
  with pytest.raises(ValueError, match='num_folds=5, but .* holds 2 folds'):
    sources.fold_ids(_options(root, tmp_path / 'tfds', num_folds=5))


# ---------------------------------------------------------------------------
# Bad values, before any build.


@pytest.mark.parametrize(
  'fold, num_folds, match',
  [
    ('5', 5, 'fold=5 is beyond config.data.num_folds=5'),
    ('x', 0, "fold='x' must be"),
    (-1, 0, 'fold=-1 must be'),
    ('-1', 5, "fold='-1' must be"),
    (1.5, 0, 'fold=1.5 must be'),
    (0, 1, 'num_folds=1 must be'),
  ],
)
def test_bad_fold_values_are_refused_naming_them(fold, num_folds, match):
  with pytest.raises(ValueError, match=match):
    config_lib.DataOptions(fold=fold, num_folds=num_folds)


def test_a_fold_beyond_the_default_folds_fails_before_any_build(nnunet_root, tmp_path):
  with pytest.raises(ValueError, match='fold=5 is beyond the 5 folds'):
    pipeline.open(_options(nnunet_root, tmp_path, fold='5'), divisor=1)
  built = os.path.join(tmp_path, 'segmentation_folder')
  assert os.listdir(built) == ['splits']  # Nothing built ...
  assert not os.listdir(os.path.join(built, 'splits', os.listdir(built + '/splits')[0]))


def test_folds_are_refused_on_data_sets_with_fixed_splits():
  with pytest.raises(ValueError, match="fold=1 .*'synthetic_shapes' has fixed splits"):
    pipeline.open(config_lib.DataOptions(fold=1), divisor=1)


# ---------------------------------------------------------------------------
# The project's own layout.

OWN = {'train': ['a0', 'a1', 'a2', 'a3'], 'val': ['b0', 'b1'], 'test': ['c0']}


def test_the_own_layout_keeps_its_val_split_by_default(tmp_path):
  _write_own_layout(tmp_path / 'data', OWN)
  options = _options(tmp_path / 'data', tmp_path / 'tfds')
  assert sources.fold_ids(options) == (tuple(OWN['train']), tuple(OWN['val']))
  data = pipeline.open(options, divisor=1)
  for split in ('train', 'val', 'test'):
    assert _ids(data, split) == tuple(OWN[split])
  assert data.source.labelled_splits == ()
  assert sorted(sources.case_files(options)) == OWN['train'] + OWN['val']
  assert not os.path.exists(os.path.join(tmp_path, 'tfds', 'segmentation_folder', 'splits'))
  with pytest.raises(ValueError, match='fold=1: .* keeps its own train/ and val/'):
    sources.fold_ids(_options(tmp_path / 'data', tmp_path / 'tfds', fold=1))


@pytest.mark.parametrize('fold', [0, 2, 'all'])
def test_the_own_layout_is_split_into_folds_with_num_folds(tmp_path, fold):
  _write_own_layout(tmp_path / 'data', OWN)
  options = _options(tmp_path / 'data', tmp_path / 'tfds', num_folds=3, fold=fold)
  train, val = sources.fold_ids(options)
  pooled = OWN['train'] + OWN['val']
  if fold == 'all':
    assert (train, val) == (tuple(pooled), ())
  else:
    assert val == tuple(nnunet.splits(pooled, num_folds=3)[fold]['val'])
  data = pipeline.open(options, divisor=1)
  assert _ids(data, 'train') == train and _ids(data, 'test') == ('c0',)
  assert data.source.has_split('val') == bool(val)
  if val:
    assert _ids(data, 'val') == val
    assert data.source.labelled_splits == ('train', 'val')
  default = pipeline.open(_options(tmp_path / 'data', tmp_path / 'tfds'), divisor=1)
  assert (
    default.source.builder.builder_config.name != data.source.builder.builder_config.name
  )


def test_pooling_refuses_an_id_in_both_train_and_val(tmp_path):
  _write_own_layout(tmp_path / 'data', {'train': ['a0', 'x'], 'val': ['x', 'b0']})
  options = _options(tmp_path / 'data', tmp_path / 'tfds')
  assert sources.fold_ids(options) == (('a0', 'x'), ('b0', 'x'))  # Own split: fine.
  for pooled in (dict(num_folds=2), dict(fold='all')):
    with pytest.raises(ValueError, match=r"case id\(s\) \['x'\] are in both"):
      pipeline.open(_options(tmp_path / 'data', tmp_path / 'tfds', **pooled), divisor=1)


# ---------------------------------------------------------------------------
# The command line, and fold 'all' end to end.


@pytest.mark.parametrize('value, expected', [('1', 1), ('all', 'all'), ('4', 4)])
def test_both_command_line_forms_parse(value, expected):
  argv = ['prog', f'--config={ROOT}/configs/folder.py', f'--config.data.fold={value}']
  values = flags.FlagValues()  # As launch.py defines --config, with this argv.
  config_flags.DEFINE_config_file(
    'config', None, 'c', flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  assert values.config.data.fold == expected
  assert config_lib.DataOptions.from_config(values.config.data).fold == expected


def test_fold_all_trains_on_every_case_without_evaluation(nnunet_root, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--config=' + os.path.join(ROOT, 'configs/folder.py'),
      f'--workdir={workdir}',
      f'--config.data.root={nnunet_root}',
      f'--config.data.data_dir={tmp_path / "tfds"}',
      '--config.data.fold=all',
      '--config.model.features=4',
      '--config.batch_size=2',
      '--config.num_train_steps=2',
      '--config.eval_every_steps=1',
      '--config.checkpoint_every_steps=2',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "No validation: config.data.fold='all'" in proc.stdout
  assert 'Final validation' not in proc.stdout
  assert "evaluator(s) ['eval'] will not run" in proc.stderr
  assert os.listdir(workdir / 'checkpoints') == ['2']
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert rows and not any(k.startswith('eval_') for row in rows for k in row)


def test_a_workdir_does_not_resume_under_another_fold():
  saved = {'data': {'fold': 0, 'num_folds': 0}, 'model': {'features': 4}}
  with pytest.raises(ValueError, match="data.fold: 0 in the checkpoint, 'all' now"):
    config_checks.check_resume(
      saved, {'data': {'fold': 'all', 'num_folds': 0}, 'model': {'features': 4}}, where='c'
    )
  older = {'data': {}, 'model': {'features': 4}}  # Written before folds existed.
  assert config_checks.check_resume(older, saved, where='c') == [
    'data.fold: None -> 0',
    'data.num_folds: None -> 0',
  ]
