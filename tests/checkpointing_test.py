"""Real orbax checkpoints in a temporary folder: retention, atomicity, restore."""

import os

import jax
import numpy as np
import pytest

from unet_jax import checkpointing


def _state(value):
  return {'step': np.int32(value), 'w': np.full((3, 2), value, np.float32)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def test_keeps_last_k_plus_best_by_dice(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=2, best_metric='dice')
  dice = {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7}
  for step in (10, 20, 30, 35, 40, 45):
    metrics = {'dice': dice[step]} if step in dice else None
    checkpointing.save(manager, step, _state(step), metrics=metrics)
  # Last two (40, 45) plus the best Dice (20).
  assert sorted(manager.all_steps()) == [20, 40, 45]
  restored = checkpointing.restore(manager, _abstract())
  assert int(restored['step']) == 45
  np.testing.assert_array_equal(restored['w'], np.full((3, 2), 45, np.float32))
  manager.close()


def test_nothing_to_restore_gives_none(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=1)
  assert checkpointing.restore(manager, _abstract()) is None


def test_half_written_step_is_never_read(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  checkpointing.save(manager, 5, _state(5))
  manager.close()
  # What a save killed mid-way leaves behind: orbax's temporary folder for step 9,
  # with a truncated file in it.
  tmp = tmp_path / '9.orbax-checkpoint-tmp-1234567890'
  tmp.mkdir()
  (tmp / '_CHECKPOINT_METADATA').write_text('{"trunc')
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  assert manager.all_steps() == [5]
  restored = checkpointing.restore(manager, _abstract())
  assert int(restored['step']) == 5
  assert not tmp.exists(), 'the temporary folder is cleaned up on open'


def test_saving_an_existing_step_is_a_no_op(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=2)
  checkpointing.save(manager, 3, _state(3))
  checkpointing.save(manager, 3, _state(99))
  assert int(checkpointing.restore(manager, _abstract())['step']) == 3


def test_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match='keep_checkpoints'):
    checkpointing.create_manager(os.fspath(tmp_path), keep=0)


def test_min_mode_keeps_the_lowest_and_best_step_reads_it_back(tmp_path):
  manager = checkpointing.create_manager(
    str(tmp_path), keep=1, best_metric='eval_hd95', best_mode='min'
  )
  for step, hd in ((1, 5.0), (2, 3.0), (3, 4.0), (4, None)):
    checkpointing.save(
      manager, step, _state(step), metrics=None if hd is None else {'eval_hd95': hd}
    )
  assert sorted(manager.all_steps()) == [2, 4]  # The latest, and the lowest distance.
  assert checkpointing.best_step(manager, best_metric='eval_hd95', best_mode='min') == 2
  assert checkpointing.best_step(manager, best_metric='eval_dice') is None
  manager.close()


def test_each_checkpoint_records_its_config(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  checkpointing.save(manager, 1, _state(1), record={'model': {'features': 4}})
  checkpointing.save(manager, 2, _state(2))
  manager.close()
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  assert checkpointing.read_record(manager, 1) == {'model': {'features': 4}}
  assert checkpointing.read_record(manager, 2) is None


def test_bad_best_mode(tmp_path):
  with pytest.raises(ValueError, match='best_mode'):
    checkpointing.create_manager(os.fspath(tmp_path), keep=1, best_mode='lowest')
