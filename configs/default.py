"""Default config: a 2D binary U-Net on the embedded synthetic data set.

Every other config imports this one and overrides only what differs.

    python launch.py --config=configs/default.py --workdir=runs/default
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order and augmentation.

  config.data = ml_collections.ConfigDict()
  config.data.name = 'synthetic_shapes'  # A TFDS name, or 'segmentation_folder'.
  config.data.config = ''  # TFDS builder config, e.g. 'binary_64'; '' for the default.
  config.data.root = ''  # Folder of images and masks, for 'segmentation_folder'.
  config.data.data_dir = ''  # TFDS data_dir; '': TFDS's default (~/tensorflow_datasets).
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.size_policy = 'pad'  # Sizes the model cannot take: 'pad', 'crop' or 'resize'.
  config.data.image_size = ()  # Target size for the size policy; () = from the data.
  config.data.num_classes = 0  # segmentation_folder: classes in the masks; 0 = infer.
  config.data.patch_size = ()  # 3D only: random training patches of this size; (): none.
  config.data.foreground_fraction = 1 / 3  # 3D only: share of patches on foreground.
  config.data.ignore_index = -1  # A mask value to leave out (255: VOC's borders); -1: none.
  config.data.mask_colors = ()  # Folders of colour masks: the RGB colour of each class.
  # 'zscore' per image; 'ct': clip to [low, high], then (x - mean) / std; 'rescale':
  # (x - low) / (high - low). The intensity_* fields hold one value, or one per channel.
  config.data.normalization = 'zscore'
  config.data.intensity_low = ()  # 'ct', 'rescale': the low end of the window.
  config.data.intensity_high = ()  # 'ct', 'rescale': the high end.
  config.data.intensity_mean = ()  # 'ct': the global mean, after clipping.
  config.data.intensity_std = ()  # 'ct': the global standard deviation.

  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True
  config.augment.flip_axes = ()  # The spatial axes flip acts on; (): every axis.
  config.augment.rot90 = True
  config.augment.scale = (1.0, 1.0)  # Random scale-and-crop range; (1, 1) turns it off.
  config.augment.intensity = 0.0  # Intensity jitter amplitude; 0 turns it off.
  config.augment.elastic = 0.0  # Elastic displacement in pixels; 0 turns it off.
  config.augment.elastic_grid = 3  # Points per axis of the coarse displacement grid.

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
  config.model.dtype = 'float32'  # Compute dtype; 'bfloat16' for mixed precision.
  config.model.param_dtype = 'float32'
  config.model.remat = False  # Recompute each block in the backward pass (less memory).
  config.model.deep_supervision = 0  # Auxiliary heads below the top (nnU-Net); 0: none.

  config.kernels = 'auto'  # Or 'xla', 'native': how convs run; not state (ops/policy.py).

  config.loss = ml_collections.ConfigDict()
  config.loss.name = 'dice_bce'
  config.loss.kwargs = ml_collections.ConfigDict()  # Keyword options of the loss.

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 0.0
  config.optimizer.momentum = 0.99
  config.optimizer.grad_clip_norm = 1.0

  config.batch_size = 16  # Global batch, split across devices.
  config.eval_batch_size = 16  # Global; the last batch is padded and the padding masked.
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.eval_every_steps = 200  # The default period of the evaluators below.
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2  # The last K checkpoints are kept, plus the best.

  # Evaluators by name (unet_jax/evaluators): each runs every `every_steps` and
  # after the last step; its metrics are written as <name>_<metric>.
  config.evals = ml_collections.ConfigDict()
  config.evals.eval = ml_collections.ConfigDict()
  config.evals.eval.type = 'confusion'  # Exact data-set Dice, IoU, pixel accuracy.
  config.evals.eval.split = ''  # '': config.data.eval_split.
  config.evals.eval.every_steps = config.get_ref('eval_every_steps')
  config.evals.eval.batch_size = 0  # 0: config.eval_batch_size.
  config.evals.eval.patch_size = ()  # Larger examples in sliding windows; (): whole.
  config.evals.eval.overlap = 0.5  # Overlap of the sliding windows.
  config.evals.eval.samples = 4  # Examples drawn to samples/eval_step_<N>.png.
  config.best_metric = 'eval_dice'  # Picks the best checkpoint: <evaluator>_<metric>.
  config.best_mode = 'max'  # 'max' for Dice, 'min' for a distance such as hd95.
  config.parallelism = 'jit'  # 'jit' (Mesh + NamedSharding) or 'pmap'.
  return config
