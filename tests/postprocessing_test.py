"""Post-processing by connected components: the rules, and how they are chosen."""

import json

import numpy as np
import pytest

from unet_jax.inference import postprocessing

HAND = np.array(
  [
    [1, 1, 0, 0, 2],
    [1, 1, 0, 0, 0],
    [0, 0, 0, 2, 2],
    [0, 1, 0, 2, 2],
  ],
  np.uint8,
)


@pytest.mark.parametrize(
  'rules, expected',
  [
    (
      # Two components tie for the largest (4 voxels): both kept.
      postprocessing.Rules(largest_foreground=True),
      [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 2, 2], [0, 0, 0, 2, 2]],
    ),
    (
      postprocessing.Rules(largest_per_class=(2,)),
      [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 2, 2], [0, 1, 0, 2, 2]],
    ),
    (
      postprocessing.Rules(min_size=2),
      [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 2, 2], [0, 0, 0, 2, 2]],
    ),
    (postprocessing.Rules(min_size=5), np.zeros((4, 5))),
    (postprocessing.Rules(), HAND),
  ],
)
def test_apply_on_a_hand_made_map(rules, expected):
  out = postprocessing.apply(HAND, rules)
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == HAND.dtype and out is not HAND


@pytest.mark.parametrize('ndim', [2, 3])
def test_corners_connect(ndim):
  # Full connectivity (8 in 2D, 26 in 3D), as nnU-Net: a diagonal chain is one component.
  labels = np.zeros((3,) * ndim, np.int32)
  for i in range(3):
    labels[(i,) * ndim] = 1
  out = postprocessing.apply(labels, postprocessing.Rules(largest_per_class=(1,)))
  np.testing.assert_array_equal(out, labels)


def _cube(volume, corner, size, value):
  volume[tuple(slice(c, c + size) for c in corner)] = value


def test_the_foreground_rule_is_kept_where_it_helps():
  # A spurious blob far from the one true structure.
  reference = np.zeros((20, 20, 20), np.int32)
  _cube(reference, (2, 2, 2), 6, 1)
  prediction = reference.copy()
  _cube(prediction, (15, 15, 15), 2, 1)
  rules, report = postprocessing.choose(
    [prediction, reference], [reference, reference], num_classes=2, min_sizes=()
  )
  assert rules == postprocessing.Rules(largest_foreground=True)
  assert report['dice_after'][0] > report['dice_before'][0]
  assert report['rules'][0]['kept'] and report['rules'][0]['rule'] == 'largest_foreground'
  np.testing.assert_allclose(report['dice_after'], [1.0])


def test_the_foreground_rule_is_not_kept_where_it_hurts():
  # A true second component: removing it lowers Dice.
  reference = np.zeros((20, 20, 20), np.int32)
  _cube(reference, (2, 2, 2), 6, 1)
  _cube(reference, (14, 14, 14), 4, 1)
  rules, report = postprocessing.choose(
    [reference.copy()], [reference], num_classes=2, min_sizes=()
  )
  assert rules == postprocessing.Rules()
  entry = report['rules'][0]
  assert not entry['kept'] and entry['dice_with'][0] < entry['dice_without'][0]
  assert report['dice_after'] == report['dice_before'] == [1.0]


def test_the_per_class_rule_is_kept_per_class():
  # Class 1 has a spurious blob; class 2 a true second component. The foreground
  # rule would remove class 2's second component: not kept. Class 1's rule: kept.
  reference = np.zeros((20, 20, 20), np.int32)
  _cube(reference, (2, 2, 2), 6, 1)
  reference[2:8, 2:8, 8:12] = 2
  _cube(reference, (14, 14, 14), 4, 2)
  prediction = reference.copy()
  prediction[14:16, 2:4, 14:16] = 1
  rules, report = postprocessing.choose([prediction], [reference], num_classes=3)
  assert rules == postprocessing.Rules(largest_per_class=(1,))
  kept = {(e['rule'], tuple(e['classes'])): e['kept'] for e in report['rules']}
  assert kept == {
    ('largest_foreground', (1, 2)): False,
    ('largest_per_class', (1,)): True,
    ('largest_per_class', (2,)): False,
  }  # No spurious component left after class 1's rule: no min size tried.
  assert report['dice_after'][0] > report['dice_before'][0]
  assert report['dice_after'][1] == report['dice_before'][1] == 1.0


def test_the_min_size_rule():
  # Two true components of different sizes (the largest-component rule hurts) and
  # spurious blobs of 1 and 2 voxels: candidates 2 and 3; 3 removes both blobs.
  reference = np.zeros((20, 20, 20), np.int32)
  _cube(reference, (2, 2, 2), 4, 1)
  _cube(reference, (12, 12, 12), 3, 1)
  prediction = reference.copy()
  prediction[18, 2, 18] = 1
  prediction[2, 18, 17:19] = 1
  rules, report = postprocessing.choose([prediction], [reference], num_classes=2)
  assert rules == postprocessing.Rules(min_size=3)
  tried = {e['min_size']: e['kept'] for e in report['rules'] if e['rule'] == 'min_size'}
  assert tried == {2: False, 3: True}
  assert report['dice_after'] == [1.0]
  # A size that removes true structures too is not kept.
  rules, _ = postprocessing.choose(
    [prediction], [reference], num_classes=2, min_sizes=(100,)
  )
  assert rules == postprocessing.Rules()


def test_both_empty_is_left_out_of_the_mean():
  empty = np.zeros((4, 4), np.int32)
  one = empty.copy()
  one[1, 1] = 1
  rules, report = postprocessing.choose([empty, one], [empty, one], num_classes=2)
  assert rules == postprocessing.Rules()
  assert report['dice_before'] == [1.0]  # Case 0 (NaN) is left out.


def test_write_and_read_round_trip(tmp_path):
  rules = postprocessing.Rules(
    largest_foreground=True, largest_per_class=(2, 3), min_size=7
  )
  path = str(tmp_path / 'postprocessing.json')
  postprocessing.write(path, rules, {'dice_before': [float('nan'), 0.5]})
  assert postprocessing.read(path) == rules
  with open(path) as f:
    content = json.load(f)
  assert content['report']['dice_before'] == [None, 0.5]
  assert [p.name for p in tmp_path.iterdir()] == ['postprocessing.json']


@pytest.mark.parametrize(
  'text, message',
  [
    ('{"rules": {"largest_foreground": true', 'unreadable JSON'),
    ('[1, 2]', 'a "rules" object'),
    ('{"rules": {"largest_component": true}}', "unknown key(s) ['largest_component']"),
    ('{"rules": {}, "extra": 1}', "unknown key(s) ['extra']"),
    ('{"rules": {"min_size": -1}}', 'min_size must be an int >= 0'),
    ('{"rules": {"largest_per_class": [0]}}', 'largest_per_class'),
    ('{"rules": {"largest_foreground": "yes"}}', 'largest_foreground must be a bool'),
  ],
)
def test_a_malformed_file_is_named(tmp_path, text, message):
  path = tmp_path / 'postprocessing.json'
  path.write_text(text)
  with pytest.raises(ValueError, match='postprocessing.json') as e:
    postprocessing.read(str(path))
  assert message in str(e.value)


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing.json'):
    postprocessing.read(str(tmp_path / 'nothing.json'))
