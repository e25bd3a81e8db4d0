"""The progress line and the metric files, with a fake clock (no real timing)."""

import json
import os
import subprocess
import sys

import pytest

from unet_jax import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class Recorder:
  def __init__(self):
    self.rows = []

  def write(self, step, values):
    self.rows.append((step, values))


def test_rates_leave_out_pauses_and_count_the_input_wait():
  clock, writer = FakeClock(), Recorder()
  progress = reporting.Progress(
    total_steps=10, start_step=0, every_steps=2, batch_size=8, writer=writer, clock=clock
  )
  for step in (1, 2):
    with progress.timed('data'):
      clock.now += 0.5  # Waiting for input.
    clock.now += 1.5  # The step itself.
    row = progress.step_done(step, loss=float(step))
    assert (row is None) == (step == 1)
    if step == 1:
      with progress.paused():
        clock.now += 100.0  # An evaluation: not training time.
  assert row['steps_per_sec'] == pytest.approx(2 / 4.0)
  assert row['examples_per_sec'] == pytest.approx(8 * 2 / 4.0)
  assert row['input_wait_fraction'] == pytest.approx(1.0 / 4.0)
  assert row['train_loss'] == pytest.approx(1.5)
  assert writer.rows == [(2, row)]
  # The next window starts afresh.
  clock.now += 1.0
  progress.step_done(3, loss=5.0)
  row = progress.step_done(4, loss=7.0, extra={'learning_rate': 0.1})
  assert row['steps_per_sec'] == pytest.approx(2 / 1.0)
  assert row['input_wait_fraction'] == 0.0
  assert row['train_loss'] == pytest.approx(6.0) and row['learning_rate'] == 0.1
  assert progress.elapsed() == pytest.approx(clock.now - 100.0)


class DeviceScalar:
  """A loss still being computed: reading it waits `seconds` on the clock."""

  def __init__(self, clock, value, seconds):
    self.clock, self.value, self.seconds = clock, value, seconds

  def __float__(self):
    self.clock.now += self.seconds
    self.seconds = 0.0  # Ready once read.
    return self.value


def test_rates_count_the_device_time_the_loop_ran_ahead_of():
  # Asynchronous dispatch: the loop queues 4 steps in 0.1 s each; the device needs
  # 3 s each, so reading the losses at the reporting step waits 4 * 3 - 0.4 s.
  clock = FakeClock()
  progress = reporting.Progress(
    total_steps=4, start_step=0, every_steps=4, batch_size=2, clock=clock
  )
  for step in range(1, 5):
    clock.now += 0.1
    wait = 4 * 3.0 - 0.4 if step == 1 else 0.0
    row = progress.step_done(
      step,
      loss=DeviceScalar(clock, 1.0, wait),
      extra={'grad_norm': DeviceScalar(clock, 2.0, 0.0)},
    )
  assert row['steps_per_sec'] == pytest.approx(4 / 12.0)
  assert row['grad_norm'] == 2.0


def test_the_last_step_always_reports():
  progress = reporting.Progress(
    total_steps=5, start_step=3, every_steps=50, batch_size=1, clock=FakeClock()
  )
  assert progress.step_done(4, loss=1.0) is None
  assert progress.step_done(5, loss=1.0) is not None


@pytest.mark.parametrize('seconds, text', [(0, '0:00'), (75, '1:15'), (3725, '1:02:05')])
def test_format_time(seconds, text):
  assert reporting.format_time(seconds) == text


def test_resuming_drops_the_rows_past_the_restored_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(
    ''.join(json.dumps({'step': s, 'train_loss': s}) + '\n' for s in (1, 2, 3, 4, 5))
  )
  writer = reporting.MetricWriter(str(tmp_path), start_step=3)
  writer.write(4, {'train_loss': 40.0, 'dice_per_class': [0.5, float('nan')]})
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert rows[-1]['train_loss'] == 40.0
  assert list((tmp_path / 'tensorboard').iterdir())


def _tensorboard_scalars(folder):
  """{tag: [(step, value)]} as TensorBoard itself reads `folder` (its event loader,
  which checks every record's CRC through TensorFlow's reader)."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(folder))
  acc.Reload()
  return {
    tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']
  }


def test_tensorboard_reads_the_scalars_of_every_run_in_the_folder(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write(1, {'train_loss': 0.5, 'lr': 1e-3, 'note': 'text'})
  writer.write(2, {'train_loss': 0.25, 'dice_per_class': [0.75, float('nan')]})
  writer.close()
  # A resumed run in the same process and second: a second file, the first intact.
  writer = reporting.MetricWriter(str(tmp_path), start_step=2)
  writer.write(3, {'train_loss': 0.125})
  writer.close()
  assert len(list((tmp_path / 'tensorboard').iterdir())) == 2
  assert _tensorboard_scalars(tmp_path / 'tensorboard') == {
    'train_loss': [(1, 0.5), (2, 0.25), (3, 0.125)],
    'lr': [(1, pytest.approx(1e-3))],
    'dice_per_class/0': [(2, 0.75)],  # NaN is left out of TensorBoard, kept in jsonl.
  }


def test_the_metric_writer_does_not_import_tensorflow(tmp_path):
  script = (
    'import sys\n'
    'from unet_jax import reporting\n'
    f'w = reporting.MetricWriter({str(tmp_path)!r})\n'
    "w.write(1, {'loss': 1.0})\n"
    'w.close()\n'
    "print('tensorflow' in sys.modules)\n"
  )
  proc = subprocess.run(
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    timeout=120,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['False']
