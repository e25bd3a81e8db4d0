"""TensorFlow for building data sets, kept off accelerators.

TFDS needs TensorFlow to build a data set (and this package to convert
TFRecord files), not to read one: the input pipeline reads array_record files
with numpy only. TensorFlow is therefore imported on first need, not with
`unet_jax`, and is never given a GPU, which belongs to JAX.
"""


def import_tensorflow():
  """Imports TensorFlow with every GPU hidden from it, and returns the module."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow had initialised its devices already.
    pass
  return tf
