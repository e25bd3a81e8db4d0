"""The plan from the shell, without training.

    python -m unet_jax.planning --root=/path/to/my_data [--config=2d|3d]
    python -m unet_jax.planning --root=... --block=residual --features=32 \
        --max_features=320 --memory_budget=9GiB     # as configs/resenc_m.py plans

prints the fingerprint of a folder of images and masks, or of an nnU-Net or MSD
data set (configs/folder.py), and the plan training would make from it (the
rules: `unet_jax/planning/rules.py`).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from unet_jax import config as config_lib
from unet_jax.data import pipeline as input_pipeline
from unet_jax.planning.fingerprint import fingerprint
from unet_jax.planning.plan import format_fingerprint
from unet_jax.planning.plan import format_table
from unet_jax.planning.plan import plan


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog='python -m unet_jax.planning',
    description='Prints the fingerprint of a folder of images and masks and the plan'
    ' training would use (see configs/folder.py), without training.',
  )
  parser.add_argument('--root', required=True, help='the folder (train/, val/, ...)')
  parser.add_argument(
    '--config', default='', choices=('', '2d', '3d'), help="'': from the files"
  )
  parser.add_argument('--data_dir', default='', help="TFDS data_dir ('': TFDS's)")
  parser.add_argument('--num_classes', type=int, default=0, help='0: from the masks')
  parser.add_argument('--ignore_index', type=int, default=-1)
  parser.add_argument('--memory_budget', default='2GiB')
  parser.add_argument('--features', type=int, default=16)
  parser.add_argument('--block', default='plain', choices=('plain', 'residual'))
  parser.add_argument(
    '--blocks_per_stage',
    default='1,3,4,6,6,6',
    help='with --block=residual: cut to the planned depth (configs/resenc_m.py)',
  )
  parser.add_argument('--max_features', type=int, default=None, help='widest level')
  parser.add_argument('--time_budget', type=float, default=0.0, help='seconds')
  parser.add_argument(
    '--step_time', type=float, default=0.0, help='seconds per step (training measures it)'
  )
  args = parser.parse_args(argv)
  try:
    data_options = config_lib.DataOptions.from_config(
      dict(
        name='segmentation_folder',
        config=args.config,
        root=args.root,
        data_dir=args.data_dir,
        train_split='train',
        eval_split='train',
        num_classes=args.num_classes,
        ignore_index=args.ignore_index,  # -1: none, as in the config.
      )
    )
    data = input_pipeline.open(data_options, divisor=1)
    fp = fingerprint(
      data,
      split=data.source.labelled_splits or 'train',
      ignore_index=data_options.ignore_index,
    )
    p = plan(
      fp,
      memory_budget=args.memory_budget,
      features=args.features,
      network=dict(
        block=args.block,
        blocks_per_stage=tuple(int(b) for b in args.blocks_per_stage.split(',')),
        max_features=args.max_features,
      ),
      time_budget=args.time_budget or None,
      step_time=args.step_time or None,
    )
  except ValueError as e:
    raise SystemExit(f'Error: {e}') from None
  print(
    f'Fingerprint of {args.root} ({"+".join(data.source.labelled_splits) or "train"}):\n'
  )
  print(format_fingerprint(fp))
  print('\nPlan:\n')
  print(format_table(p))


if __name__ == '__main__':
  main()
