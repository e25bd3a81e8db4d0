r"""Binary segmentation with the "Focal Dice" loss (see unet_jax.losses).

    python launch.py --config=configs/focal_dice.py --workdir=runs/focal_dice

Two softmax logits; Focal Dice is Dice + focal loss (AnatomyNet). Expected result:
foreground Dice >= 0.9. Reached (600 steps): foreground Dice 0.9964, mIoU 0.9962.
Run time: benchmarks/RESULTS.md, "The configs' runs".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.loss.name = 'focal_dice'
  config.model.num_classes = 2
  return config
