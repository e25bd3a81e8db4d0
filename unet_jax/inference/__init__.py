"""Using a trained run: the predictor (`predictor.py`), sliding-window stitching
(`sliding_window.py`), prediction of files (`predict.py`, `launch.py --mode=predict`)
by one run or an ensemble of several (`ensemble.py`), and export (`export.py`,
`launch.py --mode=export`).

    from unet_jax import inference
    predictor = inference.load('runs/demo', step='best')

`load` and `Predictor` are loaded on first use, so that `inference.export.load_exported`
(an exported file needs JAX alone) imports neither Flax nor the data pipeline.
"""

import importlib

__all__ = ['Predictor', 'load']


def __getattr__(name: str):
  if name in __all__:
    return getattr(importlib.import_module('unet_jax.inference.predictor'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
