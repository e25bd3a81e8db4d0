r"""Your own data: a folder of images and masks, or an nnU-Net v2 or MSD data set
(see the README, "Your own data").

    python launch.py --config=configs/folder.py --workdir=runs/mine \
        --config.data.root=/path/to/my_data            # or .../Dataset001_Name
    python launch.py --mode=predict --workdir=runs/mine \
        --input=/path/to/Dataset001_Name/imagesTs --output=predictions/

The number of classes is read from the masks (`model.num_classes = 0`); set
`--config.data.num_classes=N` to check the masks against N instead. Whether the data
is 2D or 3D is read from the files (an nnU-Net `dataset.json`'s file ending, or the
images' extensions); `--config.data.config=2d` or `3d` says it outright. 3D cases are
resampled to the plan's target spacing when the data set is converted
(`--config.data.target_spacing='()'`: each at its own spacing).

The plan (`config.plan = True`, after nnU-Net): before training, a fingerprint of the
train split (shapes, spacing, intensities, classes) is read once, and the rules in
`unet_jax/planning/rules.py` (described there) choose the input size, the network's
layout, the batch, the normalisation, the augmentation and the loss from it. The
choices and their reasons are printed at the start and written to
`<workdir>/plan.json`; `python -m unet_jax.planning --root=/path/to/my_data` prints
them without training. Any field set on the command line wins over the plan, and the
table says so. `--config.plan_time_budget=300` trains for about 300 s of steps (the
step time is measured first); `--config.plan=False` restores the fixed settings below
(features 16, depth 3, batch 16, flips and rot90, z-score per image, 600 steps; 3D
needs a `--config.data.patch_size`, e.g. '(32,64,64)'). `--config.plan_from=runs/pre`
applies another run's plan instead, and `--config.init_from=runs/pre` starts from its
parameters (README, "Fine-tuning").

Measured (benchmarks/RESULTS.md, "Planning"; 2 shared CPU cores, the same wall-clock
budget for both): see the table there for each data set.
"""

from configs import default
from unet_jax import config as config_lib


def get_config():
  config = default.get_config()
  config.data.name = 'segmentation_folder'
  config.data.config = ''  # '': from the files; '2d', or '3d' for NIfTI volumes.
  config.data.root = ''  # Required: the folder with train/ and val/, or a dataset.json.
  config.data.eval_split = 'val'
  config.loss.name = 'dice_ce'
  config.model.num_classes = 0  # 0: as many as the masks hold.
  # Plan from the data (unet_jax/planning/); the plan_* fields, with their defaults and
  # comments, are unet_jax/config.py's PlanOptions. --config.plan=False: fixed settings.
  config.update(config_lib.PlanOptions(plan=True).to_config())
  return config
