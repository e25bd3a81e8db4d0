"""Default config: a 2D binary U-Net on the embedded synthetic data set.

Every other config imports this one and overrides only what differs.

    python launch.py --config=configs/default.py --workdir=runs/default
"""

import ml_collections
from ml_collections import config_dict

from unet_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  # The run-level fields and the data, augment, loss and optimizer sections, with
  # their defaults and one comment per field, are unet_jax/config.py's options
  # (RunOptions, DataOptions, AugmentOptions, LossOptions, OptimizerOptions).
  config = config_lib.RunOptions().to_config()

  # Every field is passed to unet_jax.models.UNet (see its docstring).
  config.model = ml_collections.ConfigDict()
  config.model.num_classes = 1  # 1 logit with a sigmoid for binary tasks.
  config.model.features = 16  # Width of the top level; doubles at each level down.
  config.model.depth = 3  # Pooling steps.
  config.model.upsample = 'transpose'  # Or 'bilinear' (bilinear/trilinear + a conv).
  config.model.upsample_conv_kernel = 1  # Kernel of the conv after bilinear upsampling.
  config.model.norm = 'batch'  # 'batch', 'group', 'instance' or 'none'.
  config.model.norm_groups = 8  # Groups, for norm='group'.
  # Per-level kernels and pooling windows, e.g. ((1, 3, 3), (3, 3, 3), ...); None: 3 and 2.
  config.model.kernel_sizes = config_dict.placeholder(tuple)
  config.model.pool_sizes = config_dict.placeholder(tuple)
  config.model.dropout = 0.0  # At the bottleneck, as in the U-Net paper.
  # Compute dtype: 'auto' is bfloat16 on GPU and TPU, float32 on the CPU (chosen when
  # the model is built); 'float32' or 'bfloat16' forces one. Parameters, norm
  # statistics, logits, loss and optimizer stay float32 (unet_jax/models/factory.py).
  config.model.dtype = 'auto'
  config.model.param_dtype = 'float32'
  config.model.remat = False  # Recompute each block in the backward pass (less memory).
  config.model.deep_supervision = 0  # Auxiliary heads below the top (nnU-Net); 0: none.
  # 'plain' (the paper's double convolution a level) or 'residual' (nnU-Net's residual
  # encoder: strided residual blocks, configs/resenc_m.py); the decoder is plain in both.
  config.model.block = 'plain'
  # Residual blocks of each encoder stage, e.g. (1, 3, 4, 6, 6, 6) for depth 5 (the
  # bottleneck last); None: 1 each. The plan cuts it to its depth (planning/rules.py).
  config.model.blocks_per_stage = config_dict.placeholder(tuple)
  # The widest level: widths double down to it, then stay (nnU-Net: 320 in 3D, 512
  # in 2D); None: no cap.
  config.model.max_features = config_dict.placeholder(int)

  # Evaluators by name (unet_jax/evaluation, config_lib.EvalOptions): each runs every
  # `every_steps` and after the last step; its metrics are written as <name>_<metric>.
  config.evals = ml_collections.ConfigDict()
  config.evals.eval = config_lib.EvalOptions(
    type='confusion',  # Exact data-set Dice, IoU, pixel accuracy.
    every_steps=config.eval_every_steps,
  ).to_config()
  config.evals.eval.every_steps = config.get_ref('eval_every_steps')
  return config
