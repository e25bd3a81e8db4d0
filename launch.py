r"""Trains and evaluates a U-Net. Flags only; the work is in unet_jax.train.

    python launch.py --config=configs/dice_bce.py --workdir=runs/demo
    python launch.py --config=configs/dice_bce.py --workdir=runs/demo \
        --config.optimizer.learning_rate=3e-4

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from unet_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and samples.')
flags.DEFINE_bool(
    'distributed', None,
    'Call jax.distributed.initialize() (multi-process jobs). Default: when the '
    'environment names a coordinator (JAX_COORDINATOR_ADDRESS) or a multi-task '
    'SLURM / Open MPI job.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

_MULTI_PROCESS_ENV = ('JAX_COORDINATOR_ADDRESS',)


def _launched_as_several_processes() -> bool:
  if any(os.environ.get(v) for v in _MULTI_PROCESS_ENV):
    return True
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(os.environ.get(var, '1')) > 1:
      return True
  return False


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed = FLAGS.distributed
  if distributed is None:
    distributed = _launched_as_several_processes()
  if distributed:
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, local devices %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0 and result:
    print(f"Final validation: dice {result['dice']:.4f}  "
          f"mIoU {result['mean_iou']:.4f}  "
          f"pixel accuracy {result['pixel_accuracy']:.4f}  "
          f"(per-class dice {[round(d, 4) for d in result['dice_per_class']]})",
          flush=True)


if __name__ == '__main__':
  app.run(main)
