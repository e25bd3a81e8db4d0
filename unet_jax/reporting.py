"""Where a run reports: metric files and the progress line.

* `MetricWriter` appends one JSON object per step to `metrics.jsonl` and the
  same scalars to TensorBoard event files, from process 0 only. On resume it
  first drops the rows written after the restored step, so a step's row never
  appears twice. The event files are written with TensorBoard's own protocol
  buffers and record framing (`EventFile`), not with TensorFlow, whose import
  would take seconds of every run's start.
* `Progress` times the loop and logs `step, loss, steps/s, input wait, ETA`
  every `every_steps` steps. Time spent in `timed('data')` is the input wait;
  time inside `paused()` (evaluation, checkpointing) is left out of the rates.
  The pattern follows clu's `periodic_actions.ReportProgress` and big_vision's
  `Chrono`.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import socket
import sys
import time
from typing import Any, Iterator, Sequence

from absl import logging
import jax
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import record_writer


def _drop_rows_after(path: str, step: int) -> int:
  """Rewrites a metrics.jsonl without the rows past `step`; returns how many went."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if line.strip() and json.loads(line)['step'] <= step]
  if len(keep) == len(lines):
    return 0
  partial = path + '.tmp'
  with open(partial, 'w') as f:
    f.writelines(keep)
  os.replace(partial, path)
  return len(lines) - len(keep)


_EVENT_FILES = itertools.count()  # Tells apart the files of one process and second.


class EventFile:
  """A TensorBoard event file of scalars in `folder` (created), as TensorFlow's
  summary writer names and frames it: `events.out.tfevents.<time>.<host>.<pid>.<n>.v2`,
  a version record, then one record of `Event` per step."""

  def __init__(self, folder: str):
    os.makedirs(folder, exist_ok=True)
    name = (
      f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
      f'.{next(_EVENT_FILES)}.v2'
    )
    self.path = os.path.join(folder, name)
    self._records = record_writer.RecordWriter(open(self.path, 'xb'))
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One event at `step` holding every (tag, value) of `values` (none if empty)."""
    if not values:
      return
    summary = summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
    )
    self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    self._records.close()


class MetricWriter:
  """metrics.jsonl and TensorBoard event files in `workdir`, written by process 0.

  Args:
    workdir: the run's folder.
    start_step: the step the run starts (or resumes) from; rows of later steps,
      left by a run that died after its last checkpoint, are dropped.
  """

  def __init__(self, workdir: str, *, start_step: int = 0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    dropped = _drop_rows_after(path, start_step)
    if dropped:
      logging.info(
        'Dropped %d rows past step %d from %s (they are recomputed).',
        dropped,
        start_step,
        path,
      )
    self._tb = EventFile(os.path.join(workdir, 'tensorboard'))
    self._jsonl = open(path, 'a')

  def write(self, step: int, values: dict[str, Any]) -> None:
    """One row: scalars, and lists of scalars (written as name/i to TensorBoard)."""
    if not self.active:
      return
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()
    scalars = {}
    for name, value in values.items():
      items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
      for i, v in items:
        if isinstance(v, (int, float)) and math.isfinite(v):
          scalars[name if i is None else f'{name}/{i}'] = v
    self._tb.scalars(step, scalars)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def format_time(seconds: float) -> str:
  """h:mm:ss, or m:ss under an hour."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
  """Training speed, ETA and input-wait share, reported every `every_steps` steps.

      progress = Progress(total_steps=600, start_step=0, every_steps=50,
                          batch_size=16, writer=writer)
      for step in ...:
        with progress.timed('data'):
          batch = next(it)
        ...
        progress.step_done(step, loss=loss)   # logs and writes every 50 steps
        with progress.paused():
          evaluate()                          # not counted as training time

  Args:
    total_steps: the last step of the run (for the ETA).
    start_step: the step the run starts from.
    every_steps: how often to report.
    batch_size: global batch, for examples/s.
    writer: a MetricWriter, or None to log only.
  """

  def __init__(
    self,
    *,
    total_steps: int,
    start_step: int,
    every_steps: int,
    batch_size: int,
    writer: MetricWriter | None = None,
    clock=time.perf_counter,
  ):
    self.total_steps = total_steps
    self.every_steps = every_steps
    self.batch_size = batch_size
    self.writer = writer
    self._clock = clock
    self._started = clock()
    self._window_start = clock()
    self._window_step = start_step
    self._paused_at: float | None = None
    self._timers: dict[str, float] = {}
    self._losses: list[Any] = []

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Adds the time spent inside to the named share ('data' is the input wait)."""
    start = self._clock()
    try:
      yield
    finally:
      self._timers[name] = self._timers.get(name, 0.0) + self._clock() - start

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time spent inside counts neither as training time nor towards the rates."""
    start = self._clock()
    try:
      yield
    finally:
      self._window_start += self._clock() - start

  def step_done(
    self, step: int, *, loss: Any, extra: dict[str, Any] | None = None
  ) -> dict[str, float] | None:
    """Records a step's loss; on reporting steps logs and writes, and returns the row.

    `loss` may be a device scalar: it is only read on reporting steps, so the
    loop never waits for the device in between.
    """
    self._losses.append(loss)
    if step % self.every_steps and step != self.total_steps:
      return None
    # Read the device values first: with asynchronous dispatch the loop runs ahead
    # of the device, and only this wait tells how long the window's steps took.
    loss_mean = float(sum(float(x) for x in self._losses) / len(self._losses))
    extra = {k: float(v) for k, v in (extra or {}).items()}
    now = self._clock()
    elapsed = max(now - self._window_start, 1e-9)
    steps_per_sec = (step - self._window_step) / elapsed
    row = {
      'train_loss': loss_mean,
      'steps_per_sec': steps_per_sec,
      'examples_per_sec': steps_per_sec * self.batch_size,
      # Near 0: the input pipeline keeps up with the train step.
      'input_wait_fraction': self._timers.get('data', 0.0) / elapsed,
      **extra,
    }
    eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    logging.info(
      'step %d/%d  loss %.4f  %.2f steps/s  input wait %.0f%%  ETA %s',
      step,
      self.total_steps,
      row['train_loss'],
      steps_per_sec,
      100 * row['input_wait_fraction'],
      format_time(eta),
    )
    if self.writer is not None:
      self.writer.write(step, row)
    self._window_start, self._window_step = now, step
    self._timers.clear()
    self._losses.clear()
    return row

  def elapsed(self) -> float:
    """Seconds since the start, pauses included."""
    return self._clock() - self._started


def progress(done: int, total: int, started: float, name: str) -> None:
  """One line on stderr, rewritten in place: items done of `total`, the ETA from
  `started` (a `time.perf_counter()`), and the current item's name."""
  elapsed = time.perf_counter() - started
  eta = elapsed / max(done, 1) * (total - done)
  bar = '#' * (20 * done // max(total, 1))
  print(
    f'\r[{bar:<20}] {done}/{total}  ETA {format_time(eta)}  {name[:40]:<40}',
    end='' if done < total else '\n',
    file=sys.stderr,
    flush=True,
  )


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """Writes a CSV atomically (a temporary name, then a rename); returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + '.tmp'
  with open(partial, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for row in rows:
      writer.writerow([f'{v:.6g}' if isinstance(v, float) else v for v in row])
  os.replace(partial, path)
  return path
