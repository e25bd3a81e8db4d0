r"""nnU-Net ResEnc L, the configuration nnU-Net now recommends trying first: GPUs with 24
GB (about 35 h on an A100 in nnU-Net).

The folder config (configs/folder.py: your images and masks, or an nnU-Net v2 or
MSD data set, planned from the data) with nnU-Net's residual encoder
(`model.block='residual'`, unet_jax/models/unet.py) and the planner's memory budget
per device at 24 GiB, so the plan chooses the patch and the batch that fit it, as
nnU-Net's nnUNetPlannerResEncL does:

    python launch.py --config=configs/resenc_l.py --workdir=runs/resenc_l \
        --config.data.root=/path/to/Dataset001_Name
    python -m unet_jax.models.memory --ndim=3 --features=32 --depth=5 --training \
        --block=residual --blocks_per_stage=1,3,4,6,6,6 --max_features=320 \
        --budget=24GiB            # the largest cubic patch that budget takes

What is nnU-Net's: 32 features doubling to at most 320 (nnU-Net's 3D cap; its 2D
cap is 512), blocks per stage (1, 3, 4, 6, 6, 6), cut to the planned depth, and the
memory target. What differs: the decoder has two convolutions a stage (nnU-Net's
ResEnc: one), ReLU (nnU-Net: leaky ReLU), a norm chosen by the batch (instance below
8, as nnU-Net's always), no bias before a norm, and the plan keeps its 5% cap on
the batch (nnU-Net's ResEnc planners lift it). The budget is estimated in float32
(`unet_jax.models.memory`), so with bfloat16 on a GPU (`model.dtype='auto'`) a
step uses less than the budget. The ResEnc presets share the network and differ
only in the budget: configs/resenc_m.py, resenc_l.py, resenc_xl.py.

Not measured here on a GPU; benchmarks/resenc.py compares plain and residual on
generated data (benchmarks/RESULTS.md, "Residual encoder").
"""

from configs import resenc_m


def get_config():
  config = resenc_m.get_config()  # The same network; only the budget differs.
  config.plan_memory_budget = '24GiB'  # Per device, for a training step.
  return config
