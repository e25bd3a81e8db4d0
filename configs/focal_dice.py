r"""Binary segmentation with the seed's "Focal Dice" loss (see unet_jax.losses).

    python launch.py --config=configs/focal_dice.py --workdir=runs/focal_dice
"""

from configs import default


def get_config():
  config = default.get_config()
  config.loss.name = 'focal_dice'
  config.model.num_classes = 2
  return config
