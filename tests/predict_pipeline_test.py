"""Prediction with prefetching (`predict.run(prefetch=True)`, `pipelined.py`): the
outputs, their order, the progress lines and the errors of the plain loop, no
thread left behind, and the memory plan counting the cases in flight."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import nibabel
import numpy as np
import pytest

from tests import ensemble_test
from tests import inference_test
from unet_jax.data import folder as sf
from unet_jax.inference import inputs
from unet_jax.inference import pipelined
from unet_jax.inference import predict
from unet_jax.inference import predictor as inference

run2d = inference_test.run2d  # The tiny trained 2D run (module-scoped fixture).
run3d = inference_test.run3d  # The tiny trained 3D run (module-scoped fixture).
TARGET = (2.0, 1.5, 1.5)


def _threads():
  return {t for t in threading.enumerate() if t.name.startswith('unet_jax-')}


def _progress(stderr: str) -> list[tuple[int, int, str]]:
  """(done, total, name) of each progress line (`reporting.progress`) in order."""
  return [
    (int(m[1]), int(m[2]), m[3])
    for m in re.finditer(r'\] (\d+)/(\d+)  ETA \S+  (\S+)', stderr)
  ]


def _files(folder) -> dict[str, bytes]:
  return {
    os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), 'rb').read()
    for d, _, names in os.walk(folder)
    for n in names
  }


@pytest.fixture(scope='module')
def images2d(run2d, tmp_path_factory):
  """Five PNG cases of three sizes, with reference masks beside them."""
  root = tmp_path_factory.mktemp('pipeline2d') / 'data'
  rng = np.random.default_rng(5)
  for i, (h, w) in enumerate([(24, 24), (21, 30), (40, 36), (24, 24), (17, 23)]):
    label = np.zeros((h, w), np.uint8)
    label[3:10, 4:12] = 1
    image = (rng.normal(60, 10, (h, w)) + 120 * label).clip(0, 255).astype(np.uint8)
    sf.write_pair(root, 'val', f'img{i}', image, label)
  return root / 'val' / 'images'


def test_2d_outputs_progress_and_rows_equal_the_plain_loop(
  run2d, images2d, tmp_path, capsys
):
  workdir, _ = run2d
  before = _threads()
  outs, rows, lines = {}, {}, {}
  for prefetch in (False, True):
    outs[prefetch] = tmp_path / f'out_{prefetch}'
    rows[prefetch] = predict.run(
      workdir, str(images2d), str(outs[prefetch]), step='best', prefetch=prefetch
    )
    lines[prefetch] = _progress(capsys.readouterr().err)
  names = [f'img{i}' for i in range(5)]
  assert lines[True] == lines[False] == [(i + 1, 5, n) for i, n in enumerate(names)]
  assert rows[True] == rows[False] and [r[0] for r in rows[True]] == names
  plain, pipelined_ = _files(outs[False]), _files(outs[True])
  assert sorted(plain) == sorted(pipelined_)
  assert sorted(plain) == sorted(
    [f'{n}.png' for n in names] + [f'overlays/{n}.png' for n in names] + ['per_case.csv']
  )
  for name in plain:  # PNG masks, overlays and the table, byte for byte.
    assert plain[name] == pipelined_[name], name
  assert _threads() == before


@pytest.fixture(scope='module')
def spaced(run3d, tmp_path_factory):
  """The 3D run's weights recorded with a target spacing and patch (no training)."""
  workdir, _ = run3d
  edit = lambda r: ensemble_test._set(
    r, data__target_spacing=list(TARGET), data__patch_size=[4, 8, 8]
  )
  return ensemble_test._derive(workdir, tmp_path_factory.mktemp('spaced') / 'run', edit)


@pytest.fixture(scope='module')
def volumes(tmp_path_factory):
  """Four NIfTI cases at spacings other than TARGET, with reference masks."""
  root = tmp_path_factory.mktemp('pipeline3d') / 'data'
  rng = np.random.default_rng(9)
  for i, (shape, spacing) in enumerate(
    [
      ((6, 16, 12), (3.0, 1.0, 1.0)),
      ((8, 12, 14), (2.5, 1.2, 0.9)),
      ((5, 20, 10), (3.0, 1.0, 1.5)),
      ((6, 16, 12), (2.0, 1.5, 1.5)),  # At the target spacing.
    ]
  ):
    label = np.zeros(shape, np.uint8)
    label[1:4, 4:9, 3:8] = 1
    image = rng.normal(0, 1, shape).astype(np.float32) + 2 * label
    sf.write_pair(root, 'val', f'vol{i}', image, label, spacing=spacing)
  return root / 'val' / 'images'


def _nifti(path):
  image = nibabel.load(path)
  return np.asarray(image.dataobj), image.affine, image.header.binaryblock


@pytest.mark.parametrize('ensemble', [False, True])
def test_3d_resampled_outputs_equal_the_plain_loop(
  run3d, spaced, volumes, tmp_path, ensemble
):
  workdirs = [spaced, run3d[0]] if ensemble else [spaced]
  outs = {p: tmp_path / f'out_{p}' for p in (False, True)}
  for prefetch, out in outs.items():
    predict.run(
      workdirs, str(volumes), str(out), save_probabilities=True, prefetch=prefetch
    )
  predictors = [inference.load(w) for w in workdirs]
  assert predictors[0].data.target_spacing == TARGET
  for i in range(4):
    a, b = _nifti(outs[False] / f'vol{i}.nii.gz'), _nifti(outs[True] / f'vol{i}.nii.gz')
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
    assert a[2] == b[2]  # The header, byte for byte.
    with (
      np.load(outs[False] / f'vol{i}.npz') as p,
      np.load(outs[True] / f'vol{i}.npz') as q,
    ):
      assert sorted(p.files) == sorted(q.files)
      for key in p.files:
        np.testing.assert_array_equal(p[key], q[key])
    assert (outs[False] / 'overlays' / f'vol{i}.png').read_bytes() == (
      outs[True] / 'overlays' / f'vol{i}.png'
    ).read_bytes()
    if i % 2 == 0:
      continue
    # And the labels of the functions the plain loop was built on, bit for bit.
    case = inputs.list_inputs(str(volumes / f'vol{i}.nii.gz'), ndim=3)[0]
    image, spacing = inputs.read_image(case, ndim=3)
    want = predict.labels_of(predict.average_probabilities(predictors, image, spacing))
    mask, _ = sf.read_mask(str(outs[True] / f'vol{i}.nii.gz'), ndim=3)
    np.testing.assert_array_equal(mask, want)


def _truncated_png(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _run_both(workdir, inputs_dir, tmp_path, capsys):
  """{prefetch: (the error's message, the output folder, the progress lines)}."""
  before, results = _threads(), {}
  for prefetch in (False, True):
    out = tmp_path / f'out_{prefetch}'
    with pytest.raises(Exception) as e:
      predict.run(workdir, str(inputs_dir), str(out), prefetch=prefetch)
    message = f'{type(e.value).__name__}: {e.value}'.replace(str(out), '<out>')
    results[prefetch] = (message, out)
    results[prefetch] += (_progress(capsys.readouterr().err),)
    assert _threads() == before  # No thread left running.
  return results


def test_an_unreadable_case_in_the_middle_raises_as_the_plain_loop(
  run2d, images2d, tmp_path, capsys
):
  workdir, _ = run2d
  folder = tmp_path / 'images'
  shutil.copytree(images2d, folder)
  _truncated_png(folder / 'img2.png')  # Its header reads: only reading it fails.
  inputs.check_inputs(inputs.list_inputs(str(folder), ndim=2), ndim=2, num_channels=1)
  results = _run_both(workdir, folder, tmp_path, capsys)
  message, out, lines = results[True]
  assert message == results[False][0]
  assert message.startswith(f'BadDataError: {folder / "img2.png"}: unreadable or truncated')
  assert lines == results[False][2] == [(1, 5, 'img0'), (2, 5, 'img1')]
  for prefetch in (False, True):
    out = results[prefetch][1]
    assert sorted(os.listdir(out)) == ['img0.png', 'img1.png', 'overlays']
    assert sorted(os.listdir(out / 'overlays')) == ['img0.png', 'img1.png']
  assert (results[True][1] / 'img1.png').read_bytes() == (
    results[False][1] / 'img1.png'
  ).read_bytes()


def test_a_write_error_in_the_middle_raises_as_the_plain_loop(
  run2d, images2d, tmp_path, capsys
):
  workdir, _ = run2d
  for prefetch in (False, True):  # img1's mask cannot be written: a folder holds its name.
    (tmp_path / f'out_{prefetch}' / 'img1.png').mkdir(parents=True)
  results = _run_both(workdir, images2d, tmp_path, capsys)
  message = results[True][0]
  assert message == results[False][0]
  assert message.startswith('IsADirectoryError:') and "'<out>/img1.png'" in message
  assert results[True][2] == results[False][2] == [(1, 5, 'img0')]
  for prefetch in (False, True):
    out = results[prefetch][1]
    assert sorted(os.listdir(out)) == ['img0.png', 'img1.png', 'overlays']
    assert (out / 'img1.png').is_dir() and not os.listdir(out / 'img1.png')
    assert sorted(os.listdir(out / 'overlays')) == ['img0.png']


def test_the_earliest_error_wins_and_no_thread_is_left():
  done = []

  def read(i):
    if i == 2:
      raise ValueError('read 2')
    return i

  def write(i, value):
    if i == 1:
      raise OSError('write 1')
    done.append(i)
    return value

  before = _threads()
  for prefetch in (False, True):
    done.clear()
    with pytest.raises(OSError, match='write 1'):  # Before read 2's error.
      pipelined.run_in_order(
        [0, 1, 2, 3], read=read, compute=lambda v: v * 10, write=write, prefetch=prefetch
      )
    assert done == [0]
    assert _threads() == before
  for prefetch in (False, True):
    got = pipelined.run_in_order(
      list(range(6)),
      read=lambda i: i,
      compute=lambda v: -v,
      write=lambda i, v: (i, v),
      prefetch=prefetch,
    )
    assert got == [(i, -i) for i in range(6)]
  assert _threads() == before


def test_the_memory_plan_counts_the_cases_in_flight(volumes):
  cases = inputs.list_inputs(str(volumes), ndim=3)[:3]
  options = dict(ndim=3, num_channels=1, num_classes=2, target_spacing=TARGET)
  plans = []
  for case in cases:
    shape, _, spacing = inputs.probe(case.path, 3)
    s = int(np.prod(shape))
    r = int(np.prod([max(1, round(n * a / t)) for n, a, t in zip(shape, spacing, TARGET)]))
    needed = 4 * (r * (1 + 2) + s * 2)  # Image and probabilities at TARGET, and back.
    ahead = 4 * s + 4 * r  # The image and the image at TARGET, 1 channel.
    behind = (
      4 * s + 4 * s * 2 + max(4 * r * 2, 4 * s)
    )  # Image, probs, max(at TARGET, labels).
    plans.append((needed, ahead, behind))
  middle = plans[1][0] + plans[2][1] + plans[0][2]
  # Plain: one case at a time.
  inputs.check_inputs(cases, memory=max(p[0] for p in plans), **options)
  inputs.check_inputs(cases, memory=middle, prefetch=True, **options)
  with pytest.raises(ValueError) as e:
    inputs.check_inputs(cases, memory=middle - 1, prefetch=True, **options)
  message = str(e.value)
  gib = lambda n: f'{n / 2**30:.3g} GiB'
  assert message.startswith('1 input(s) cannot be predicted')  # The middle case's peak.
  assert f'{cases[1].path}: predicting it needs {gib(middle)} of host memory' in message
  assert f'the next case, read ahead ({cases[2].path}) holds {gib(plans[2][1])}' in message
  assert (
    f'the case before, written meanwhile ({cases[0].path}) holds {gib(plans[0][2])}'
    in message
  )
  assert 'predict without prefetching (--noprefetch)' in message


def test_the_benchmark_smoke_run(spaced, tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(inference_test.ROOT, 'benchmarks', 'predict_pipeline.py'),
      '--smoke',
      f'--workdir={spaced}',
      f'--out={tmp_path}',
    ],
    cwd=inference_test.ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'predict_pipeline.json') as f:
    result = json.load(f)['result']
  assert result['same_masks'] is True  # Both modes wrote the same masks.
  for mode in ('plain', 'prefetch'):
    (call,) = result['calls'][mode]
    assert call['wall_s'] > 0 and call['cpu_s'] > 0
  assert set(result['stages_plain_s']) == {'read_resample', 'predict', 'write'}
  assert '| prefetch |' in proc.stdout
