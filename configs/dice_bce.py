r"""Binary segmentation with the standard combined loss, L = L_Dice + L_BCE.

The README's main example, and what `make run` trains: a 2D U-Net with one sigmoid
logit on the embedded `synthetic_shapes` data set (about 5% foreground), no download.

    python launch.py --config=configs/dice_bce.py --workdir=runs/dice_bce

Expected result: validation foreground Dice >= 0.9. Reached with `make run` in a
fresh clone (600 steps): foreground Dice 0.9966, mIoU 0.9964, pixel accuracy 0.9997.
How long it took, and on which machine: benchmarks/RESULTS.md, "The configs' runs".

bfloat16 against float32 (`model.dtype='auto'` is bfloat16 on GPU and TPU), on the
CPU (`lscpu`: AMD EPYC, 2 cores), seed 0, on 2026-12-03, one run after the other:

    python launch.py --config=configs/dice_bce.py --workdir=runs/bf16 \
        --config.model.dtype=bfloat16
    python launch.py --config=configs/dice_bce.py --workdir=runs/f32 \
        --config.model.dtype=float32

bfloat16 reached foreground Dice 0.9964 (mIoU 0.9963) at step 600, float32 0.9966
(mIoU 0.9964), 0.0002 apart; at steps 200 and 400, 0.9887 and 0.9960 (bfloat16),
0.9889 and 0.9961 (float32). Times: benchmarks/RESULTS.md, "bfloat16 against
float32".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.loss.name = 'dice_bce'
  config.model.num_classes = 1
  return config
