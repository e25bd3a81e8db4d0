"""Using a trained run: the predictor (`predictor.py`), sliding-window stitching
(`sliding_window.py`), prediction of files (`predict.py`, `launch.py --mode=predict`)
and export (`export.py`, `launch.py --mode=export`).

    from unet_jax import inference
    predictor = inference.load('runs/demo', step='best')
"""

__all__ = ['Predictor', 'load']


def __getattr__(name):
  # On first use: `inference.export.load_exported` must not import Flax.
  if name in __all__:
    from unet_jax.inference import predictor  # pylint: disable=g-import-not-at-top

    return getattr(predictor, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
