r"""Multi-class segmentation with Dice + cross-entropy (MONAI DiceCELoss semantics).

A softmax U-Net on the multi-class variant of `synthetic_shapes`.

    python launch.py --config=configs/dice_ce.py --workdir=runs/dice_ce

Expected result: foreground Dice (mean over the 3 shape classes) >= 0.9. Reached
(data set version 1.1.0, 600 steps): foreground Dice 0.9485, mIoU 0.9258, per-class
Dice [0.9976, 0.9405, 0.9303, 0.9746]. Run times: benchmarks/RESULTS.md, "The configs'
runs".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.config = 'multiclass'
  config.loss.name = 'dice_ce'
  config.model.num_classes = 4
  return config
