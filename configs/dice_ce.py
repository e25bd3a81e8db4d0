r"""Multi-class segmentation with Dice + cross-entropy (MONAI DiceCELoss semantics).

A softmax U-Net on the multi-class variant of `synthetic_shapes`.

    python launch.py --config=configs/dice_ce.py --workdir=runs/dice_ce
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.config = 'multiclass'
  config.loss.name = 'dice_ce'
  config.model.num_classes = 4
  return config
