"""Using a trained run: the predictor (`predictor.py`), sliding-window stitching
(`sliding_window.py`), prediction of files (`predict.py`, `launch.py --mode=predict`)
and export (`export.py`, `launch.py --mode=export`).

    from unet_jax import inference
    predictor = inference.load('runs/demo', step='best')
"""

from unet_jax.inference.predictor import load
from unet_jax.inference.predictor import Predictor

__all__ = ['Predictor', 'load']
