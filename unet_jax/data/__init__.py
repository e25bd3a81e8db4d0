"""Segmentation data sets as TFDS builders.

Importing this package registers, for `tfds.builder`, `tfds.load` and
`tfds.data_source`:

* `synthetic_shapes` (2D) and `synthetic_volumes` (3D): generated locally from
  a seed, no download (`synthetic.py`).
* `segmentation_folder`: a user's data set on disk (`builder.py`): the
  project's own folder layout (`folder.py`), or nnU-Net v2's or the Medical
  Segmentation Decathlon's (`nnunet.py`); NIfTI volumes in canonical
  orientation, resampled to one spacing when asked (`geometry.py`).

`sources.py` registers these and `oxford_iiit_pet` by name for
`config.data.name`, and opens each as a random-access source.

Oxford-IIIT Pet is TFDS's own `oxford_iiit_pet`; `pets.py` maps its trimaps to
classes.

TensorFlow is imported only to build a data set, with GPUs hidden from it
(`cpu_tensorflow.py`); reading one needs numpy alone.
"""

from unet_jax.data import builder
from unet_jax.data import cpu_tensorflow
from unet_jax.data import folder as segmentation_folder
from unet_jax.data import pets
from unet_jax.data import sources
from unet_jax.data import synthetic
from unet_jax.data.builder import SegmentationFolder
from unet_jax.data.builder import SegmentationFolderConfig
from unet_jax.data.folder import BadDataError
from unet_jax.data.synthetic import SyntheticConfig
from unet_jax.data.synthetic import SyntheticShapes
from unet_jax.data.synthetic import SyntheticVolumes

__all__ = [
  'BadDataError',
  'SegmentationFolder',
  'SegmentationFolderConfig',
  'SyntheticConfig',
  'SyntheticShapes',
  'SyntheticVolumes',
  'builder',
  'cpu_tensorflow',
  'pets',
  'segmentation_folder',
  'sources',
  'synthetic',
]
