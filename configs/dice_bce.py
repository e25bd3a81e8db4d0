r"""Binary segmentation with the standard combined loss, L = L_Dice + L_BCE.

The README's main example, and what `make run` trains: a 2D U-Net with one sigmoid
logit on the embedded `synthetic_shapes` data set (about 5% foreground), no download.

    python launch.py --config=configs/dice_bce.py --workdir=runs/dice_bce

Expected result: validation foreground Dice >= 0.9. Reached with `make run` in a
fresh clone (600 steps): foreground Dice 0.9966, mIoU 0.9964, pixel accuracy 0.9997.
How long it took, and on which machine: benchmarks/RESULTS.md, "The configs' runs".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.loss.name = 'dice_bce'
  config.model.num_classes = 1
  return config
