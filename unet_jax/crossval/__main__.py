"""The cross-validation from the shell (see `unet_jax.crossval`).

    python -m unet_jax.crossval --workdirs=runs/f0,runs/f1 --output=runs/crossval \
        [--step=best] [--overlap=0.5] [--tta] [--tolerance=1.0] [--min_sizes=10,100]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from unet_jax import crossval
from unet_jax.data import folder as folder_lib


def _min_sizes(text: str | None) -> tuple[int, ...] | None:
  if text is None:
    return None
  return tuple(int(s) for s in text.split(',') if s.strip())


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog='python -m unet_jax.crossval',
    description="Predicts each fold's validation cases with its run, writes the"
    ' per-case table and chooses the post-processing.',
  )
  parser.add_argument(
    '--workdirs', required=True, help='comma-separated runs, one per fold; globs expand'
  )
  parser.add_argument('--output', required=True, help='the folder for the outputs')
  parser.add_argument('--step', default='best', help="'best', 'latest' or a number")
  parser.add_argument('--overlap', type=float, default=0.5)
  parser.add_argument('--tta', action='store_true', help='flip test-time augmentation')
  parser.add_argument(
    '--tolerance', type=float, default=1.0, help='surface Dice tolerance (mm)'
  )
  parser.add_argument(
    '--min_sizes',
    default=None,
    help="minimum component sizes to try, e.g. '10,100' ('': none; unset: from the data)",
  )
  args = parser.parse_args(argv)
  try:
    crossval.run(
      args.workdirs,
      args.output,
      step=int(args.step) if args.step.isdigit() else args.step,
      overlap=args.overlap,
      tta=args.tta,
      tolerance=args.tolerance,
      min_sizes=_min_sizes(args.min_sizes),
    )
  except (ValueError, FileNotFoundError, folder_lib.BadDataError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
