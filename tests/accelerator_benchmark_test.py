"""benchmarks/accelerator.py: its --smoke run on the CPU, and how it records a part.

No timing is asserted: only that each part ran, was recorded with sane fields, and
that failures and timeouts are recorded without stopping the rest.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jaxlib
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'accelerator.py')


def _load():
  spec = importlib.util.spec_from_file_location('accelerator', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


accelerator = _load()


def _run(tmp_path, *args, timeout):
  return subprocess.run(
    [sys.executable, SCRIPT, f'--out={tmp_path}', *args],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_smoke_run_writes_one_row_per_part(tmp_path):
  proc = _run(tmp_path, '--smoke', timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / 'accelerator.json').read_text())
  meta = report['meta']
  assert meta['smoke'] is True
  assert meta['device']['backend'] == 'cpu'
  assert meta['device']['jax'] == jax.__version__
  assert meta['device']['jaxlib'] == jaxlib.__version__
  assert meta['torch'] == {'skipped': 'skipped: torch not installed'}
  rows = {row['part']: row for row in report['parts']}
  assert list(rows) == list(accelerator.PARTS)
  for part, row in rows.items():
    assert row['status'] == 'ok', (part, row.get('error'))
    assert 0 < row['seconds'] <= row['budget_s'] == accelerator.SMOKE_BUDGET
    assert row['summary'], part
  assert meta['total_s'] >= sum(row['seconds'] for row in rows.values())
  assert rows['train_step_vs_torch']['torch'] == 'skipped: torch not installed'

  # Each part's own JSON, inside: the smoke sizes it was asked for.
  speed = rows['train_step_vs_torch']['result']
  assert speed['torch_available'] is False
  assert list(speed['results']) == ['2d_quick']
  assert 'torch' not in speed['results']['2d_quick']['float32']
  pipeline = rows['input_pipeline']['result']['cases']
  # 3D: batches of 2 patches of 16^3 (one channel); 2D: batches of 4 whole 64^2 images.
  assert pipeline['3d_128_patches_fg']['by_workers']['0']['batch_shape'] == [
    2,
    16,
    16,
    16,
    1,
  ]
  assert pipeline['2d_512_images']['by_workers']['0']['batch_shape'] == [4, 64, 64, 1]
  for case in pipeline.values():
    assert case['by_workers']['0']['patches_per_s_median'] > 0
  for memory_row in rows['memory_check']['result']['rows']:
    assert 0.75 <= memory_row['plan_total'] / memory_row['xla_total'] <= 1.25
  assert set(rows['upsampling']['result']['results']) == {'2d_32x32_b2_f4'}

  table = (tmp_path / 'accelerator.md').read_text()
  assert f'jax {jax.__version__}, jaxlib {jaxlib.__version__}' in table
  body = [line for line in table.splitlines() if line.startswith('| ')][2:]
  assert [line.split(' | ')[0][2:] for line in body] == list(accelerator.PARTS)
  assert '| train_step_vs_torch | ok; PyTorch skipped: torch not installed |' in table


def test_cpu_only_without_smoke_says_so_and_stops(tmp_path):
  proc = _run(tmp_path / 'out', timeout=300)
  assert proc.returncode == 1
  assert 'meant for a machine with a GPU or TPU' in proc.stderr
  assert '--smoke' in proc.stderr and '--allow-cpu' in proc.stderr
  assert not (tmp_path / 'out').exists()


def test_unknown_part_is_named(tmp_path):
  proc = _run(tmp_path, '--smoke', '--parts=upsampling,speed', timeout=300)
  assert proc.returncode == 2
  assert "unknown --parts ['speed']" in proc.stderr


@pytest.mark.parametrize(
  'code, budget, status, error',
  [
    ('import sys; sys.exit(3)', 60, 'failed', 'exit code 3'),
    ('import time; time.sleep(60)', 1, 'failed', 'timed out after 1 s'),
    ('pass', 60, 'failed', 'wrote no '),
    ('open("part.json", "w").write("{\\"x\\": 1}")', 60, 'ok', None),
  ],
)
def test_run_part_records_the_outcome(tmp_path, code, budget, status, error):
  json_path = tmp_path / 'part.json'
  json_path.write_text('{"stale": true}')  # An earlier run's: never read.
  row = accelerator.run_part(
    [sys.executable, '-c', f'import os; os.chdir({str(tmp_path)!r}); {code}'],
    json_path,
    budget=budget,
    log=tmp_path / 'part.log',
  )
  assert row['status'] == status
  assert row['budget_s'] == budget
  if error is None:
    assert row['result'] == {'x': 1}
  else:
    assert error in row['error']
    assert 'result' not in row


def test_markdown_shows_a_failed_part_and_the_rest():
  device = dict(
    backend='gpu', device_kind='NVIDIA A100', device_count=1, jax='j', jaxlib='l'
  )
  report = {
    'meta': dict(
      date='2026-12-03', device=device, torch={'torch': '2.13.0'}, smoke=False, total_s=12.0
    ),
    'parts': [
      dict(
        part='memory_check',
        status='failed',
        error='timed out after 60 s\n...',
        seconds=60.2,
        budget_s=60,
      ),
      dict(part='upsampling', status='ok', summary='a | b', seconds=3.4, budget_s=120),
    ],
  }
  table = accelerator.markdown(report)
  assert 'NVIDIA A100 (gpu, 1 device(s)); jax j, jaxlib l; torch 2.13.0' in table
  assert '| memory_check | failed: timed out after 60 s | 60 | 60 |  |' in table
  assert '| upsampling | ok | 3 | 120 | a / b |' in table
