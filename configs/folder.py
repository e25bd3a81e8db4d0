r"""Your own data: a folder of images and masks (see the README, "Your own data").

    python launch.py --config=configs/folder.py --workdir=runs/mine \
        --config.data.root=/path/to/my_data

The number of classes is read from the masks (`model.num_classes = 0`); set
`--config.data.num_classes=N` to check the masks against N instead. For NIfTI volumes
add `--config.data.config=3d` (and a `--config.data.patch_size`, e.g. '(32,64,64)').
The result depends on your data; the tests train on a generated folder.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'segmentation_folder'
  config.data.config = '2d'  # '3d' for .nii / .nii.gz volumes.
  config.data.root = ''  # Required: the folder with train/ and val/.
  config.data.eval_split = 'val'
  config.loss.name = 'dice_ce'
  config.model.num_classes = 0  # 0: as many as the masks hold.
  return config
