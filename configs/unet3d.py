r"""Patch-based 3D U-Net on the embedded `synthetic_volumes` data set.

Random training patches with nnU-Net's one-third foreground oversampling and deep
supervision (auxiliary losses at 1/2 and 1/4 resolution, nnU-Net's weights);
evaluation on whole volumes. Anisotropic: the first level pools in-plane only, as for
thick-slice CT, with (1, 3, 3) kernels there (a mixed 2D/3D design: that level is 2D).

    python launch.py --config=configs/unet3d.py --workdir=runs/unet3d

Expected result: foreground Dice >= 0.9 on whole validation volumes. Reached (400
steps): foreground Dice 0.9628, mIoU 0.9623 (without deep supervision: 0.9642). Run
times: benchmarks/RESULTS.md, "The configs' runs".

Sliding-window evaluation of the same checkpoint (`--config.evals.eval.patch_size=...`,
Gaussian weights, overlap 0.5): windows of the training patch (16, 32, 32) give 0.907,
(16, 40, 40) 0.957, (16, 48, 48) 0.968. Windows no larger than the training patch
lose context at their borders here; the volumes fit whole, so this config evaluates
them whole.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'synthetic_volumes'
  config.data.config = 'anisotropic'  # 16x64x64 voxels, spacing (3, 1, 1).
  config.data.patch_size = (16, 32, 32)
  config.data.foreground_fraction = 1 / 3
  config.augment.rot90 = True
  config.loss.name = 'dice_ce'
  config.model.num_classes = 2
  config.model.features = 8
  config.model.depth = 3
  config.model.norm = 'instance'
  config.model.kernel_sizes = ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
  config.model.pool_sizes = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
  config.model.deep_supervision = 2  # Losses at 1/2 and 1/4 resolution too (nnU-Net).
  config.batch_size = 2
  config.eval_batch_size = 2
  config.num_train_steps = 400
  return config
