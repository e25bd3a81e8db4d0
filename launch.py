r"""Trains a U-Net, predicts with a trained one, or exports it. Flags and process setup.

    python launch.py --config=configs/dice_bce.py --workdir=runs/demo
    python launch.py --config=configs/dice_bce.py --workdir=runs/demo \
        --config.optimizer.learning_rate=3e-4
    python launch.py --mode=predict --workdir=runs/demo --input=scans/ --output=out/
    python launch.py --mode=predict --workdir=runs/f0,runs/f1 --input=scans/ \
        --output=out/ --save_probabilities --postprocessing=postprocessing.json
    python launch.py --mode=export --workdir=runs/demo --output=model.jax

Training: running the same command again resumes from the latest checkpoint in
--workdir. SIGINT (Ctrl-C) or SIGTERM (what SLURM and TPU preemption send first)
stops the run after the current step with a checkpoint; a second signal exits at
once. One training run owns a workdir: it holds <workdir>/train.lock, and a second
run on it stops at once with status 75, naming the owner (unet_jax/train/lock.py).
Prediction and export take no lock: see unet_jax/inference/predict.py and
unet_jax/inference/export.py.

Several processes (one per host, or per GPU), each running the same command:

    python launch.py --config=configs/dice_bce.py --workdir=/shared/run \
        --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0   # and =1

Under SLURM, Open MPI or on a Cloud TPU VM the three values are detected (README,
"Running on a cluster"). A signal to any one process stops all of them after the
same step, with a checkpoint.
"""

import errno
import logging as py_logging
import os
import signal
import sys
import threading

from unet_jax.ops import host_memory  # Neither JAX nor NumPy: see below.

if __name__ == '__main__':
  # glibc's allocator settings for XLA:CPU's step buffers: this script again, under
  # GLIBC_TUNABLES, where they are wanted and not yet set (unet_jax/ops/host_memory.py).
  # Before the imports below, which take seconds that a re-executed image repeats.
  try:
    host_memory.reexec_if_wanted()
  except ValueError as e:  # A bad UNET_JAX_HOST_MALLOC.
    print(f'Error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)

from absl import app  # noqa: E402 (after the re-execution above)
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unet_jax import train  # noqa: E402
from unet_jax.train import lock  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum('mode', 'train', ['train', 'predict', 'export'], 'What to do.')
flags.DEFINE_string(
  'workdir',
  None,
  'Folder for checkpoints, logs and samples. predict: several runs, separated by'
  ' commas, are averaged (an ensemble).',
)
flags.DEFINE_string('input', None, 'predict: an image or volume, or a folder of them.')
flags.DEFINE_string(
  'output',
  None,
  'predict: the output folder (not a folder holding the inputs: refused); each mask'
  ' is named after its input without the extension, so inputs that differ only in'
  ' extension (a.png, a.jpg) are refused. export: the file.',
)
flags.DEFINE_string('step', 'best', "predict, export: 'best', 'latest' or a step.")
flags.DEFINE_float('overlap', 0.5, 'predict, export: overlap of the sliding windows.')
flags.DEFINE_bool('tta', False, 'predict, export: average over all axis flips.')
flags.DEFINE_bool(
  'save_probabilities',
  False,
  "predict: also write each case's class probabilities as <name>.npz (float16,"
  " channels last, on the input's grid; NIfTI: canonical orientation, with the"
  ' affine).',
)
flags.DEFINE_string(
  'postprocessing', None, 'predict: a postprocessing.json to apply to every mask.'
)
flags.DEFINE_enum(
  'nonfinite',
  None,
  ['error', 'zero'],
  "predict: NaN/Inf input values: 'error' names the files, 'zero' predicts them as"
  " 0 (default: the run's config.data.nonfinite).",
)
flags.DEFINE_bool(
  'prefetch',
  True,
  'predict: read the next case and write the previous one in background threads'
  ' while a case is predicted (same outputs and errors); --noprefetch: one case at'
  ' a time.',
)
flags.DEFINE_list('spatial_shape', None, 'export: input size (default: as trained).')
flags.DEFINE_list(
  'input_spacing',
  None,
  'export, 3D runs at a target spacing: the D,H,W spacing of the input volumes; the'
  ' file resamples them inside and returns probabilities on their grid.',
)
flags.DEFINE_bool(
  'distributed',
  None,
  'Call jax.distributed.initialize() (multi-process jobs). Default: when a flag '
  'below is given, the environment names a coordinator (JAX_COORDINATOR_ADDRESS) '
  'or the job is a multi-task SLURM / Open MPI job (their variables then give the '
  'three values below).',
)
flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0 (default: JAX_COORDINATOR_ADDRESS, or '
  'detected from SLURM / Open MPI / Cloud TPU).',
)
flags.DEFINE_integer('num_processes', None, 'Processes in the job (default: detected).')
flags.DEFINE_integer(
  'process_id', None, 'This process, 0 to num_processes - 1 (default: detected).'
)
config_flags.DEFINE_config_file(
  'config', None, 'train: a configs/*.py file.', lock_config=True
)
flags.mark_flags_as_required(['workdir'])
flags.register_multi_flags_validator(
  ['mode', 'config', 'input', 'output'],
  lambda f: (
    (f['mode'] != 'train' or f['config'] is not None)
    and (f['mode'] != 'predict' or (f['input'] and f['output']))
    and (f['mode'] != 'export' or f['output'])
  ),
  message='--mode=train needs --config; predict needs --input and --output; export'
  ' needs --output.',
)


class _LibraryInfoFilter:
  """Drops INFO records from orbax and TFDS internals (every save logs ~20 lines);
  their warnings and errors still show."""

  _NOISY = (os.sep + 'orbax' + os.sep, os.sep + 'tensorflow_datasets' + os.sep)

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
      part in record.pathname for part in self._NOISY
    )


def _launched_as_several_processes() -> bool:
  if any(
    f is not None
    for f in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  ):
    return True
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(os.environ.get(var, '1')) > 1:
      return True
  return False


def _stop_on_signals(before_exit) -> threading.Event:
  """SIGINT/SIGTERM set the returned event; a second one calls `before_exit`
  (which releases the workdir's lock) and exits at once."""
  stop = threading.Event()

  def handler(signum, frame):
    del frame
    if stop.is_set():
      print(
        f'Second {signal.Signals(signum).name}: exiting now, without saving.',
        file=sys.stderr,
        flush=True,
      )
      before_exit()
      os._exit(128 + signum)  # pylint: disable=protected-access
    stop.set()
    print(
      f'{signal.Signals(signum).name}: stopping after this step with a checkpoint'
      ' (send it again to exit at once).',
      file=sys.stderr,
      flush=True,
    )

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, handler)
  return stop


def _predict_or_export() -> None:
  if FLAGS.mode == 'predict':
    from unet_jax.inference import predict  # pylint: disable=g-import-not-at-top

    predict.run(
      FLAGS.workdir.split(','),
      FLAGS.input,
      FLAGS.output,
      step=FLAGS.step,
      overlap=FLAGS.overlap,
      tta=FLAGS.tta,
      save_probabilities=FLAGS.save_probabilities,
      postprocessing_file=FLAGS.postprocessing,
      nonfinite=FLAGS.nonfinite,
      prefetch=FLAGS.prefetch,
    )
  else:
    from unet_jax.inference import export  # pylint: disable=g-import-not-at-top

    shape = [int(s) for s in FLAGS.spatial_shape] if FLAGS.spatial_shape else None
    spacing = [float(s) for s in FLAGS.input_spacing] if FLAGS.input_spacing else None
    path = export.export_run(
      FLAGS.workdir,
      FLAGS.output,
      step=FLAGS.step,
      spatial_shape=shape,
      input_spacing=spacing,
      overlap=FLAGS.overlap,
      tta=FLAGS.tta,
    )
    print(f'Wrote {path}.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  if FLAGS.mode != 'train':
    try:
      _predict_or_export()
    except (ValueError, FileNotFoundError) as e:
      print(f'Error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)
    return
  distributed = FLAGS.distributed
  if distributed is None:
    distributed = _launched_as_several_processes()
  if distributed:  # On CPU, cross-process collectives use gloo (JAX's default).
    jax.distributed.initialize(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
  logging.info(
    'JAX process %d/%d, local devices %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  if 'plan_keep' in FLAGS.config:  # The plan (unet_jax/planning/) keeps these.
    FLAGS.config.plan_keep = tuple(
      sorted({*FLAGS.config.plan_keep, *config_flags.get_override_values(FLAGS['config'])})
    )
  # Collective: before process 0 takes the lock (and creates the workdir).
  train.config_checks.check_same_on_all_processes(FLAGS.config, FLAGS.workdir)
  try:
    with lock.hold(FLAGS.workdir) as release:  # One run per workdir.
      stop = _stop_on_signals(before_exit=release)
      results = train.train_and_evaluate(
        FLAGS.config, FLAGS.workdir, stop_requested=stop.is_set
      )
  except lock.WorkdirBusy as e:
    print(f'Error: {e}', file=sys.stderr, flush=True)
    sys.exit(75)  # EX_TEMPFAIL: try again later.
  except train.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(130)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    print(f'Error: {e.strerror}', file=sys.stderr, flush=True)  # One line: disk full.
    sys.exit(1)
  if jax.process_index() == 0:
    for name, metrics in results.items():
      print(_summary(name, metrics), flush=True)
    if not results and FLAGS.config.data.get('fold') == 'all':
      print("No validation: config.data.fold='all' trains on every case.", flush=True)


def _summary(name: str, metrics: dict) -> str:
  """One line per evaluator: 'Final validation: dice 0.9966  mIoU 0.9964 ...'."""
  head = 'Final validation' + ('' if name == 'eval' else f' ({name})')
  if 'mean_iou' in metrics:
    return (
      f'{head}: dice {metrics["dice"]:.4f}  mIoU {metrics["mean_iou"]:.4f}  '
      f'pixel accuracy {metrics["pixel_accuracy"]:.4f}  (per-class dice '
      f'{[round(d, 4) for d in metrics["dice_per_class"]]})'
    )
  return f'{head}: ' + '  '.join(
    f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float)
  )


if __name__ == '__main__':
  app.run(main)
