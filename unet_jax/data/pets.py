"""Oxford-IIIT Pet, read through TFDS's own `oxford_iiit_pet` builder.

The standard public segmentation benchmark: 7,349 RGB photos of cats and dogs
of varying size, split into 'train' (3,680) and 'test' (3,669), each with a
trimap. `to_image_label` turns the trimap into three classes:

    trimap 2 (background)       -> class 0
    trimap 1 (pet)              -> class 1
    trimap 3 (border, unsure)   -> class 2

Background is class 0, as everywhere in this project, so the foreground Dice that
training reports (the mean over classes 1..C-1) covers the pet and its border. (The
TensorFlow segmentation tutorial uses `trimap - 1`, which makes the pet class 0.)

Its data must be downloaded (about 800 MB); machines without internet access
test this path with `tfds.testing.mock_data`.
"""

import numpy as np

NAME = 'oxford_iiit_pet'
NUM_CLASSES = 3
CLASS_NAMES = ('background', 'pet', 'border')
# Trimap value -> class index; index 0 is unused (trimaps hold 1-3).
_TRIMAP_TO_CLASS = np.array([0, 1, 0, 2], np.int32)
SPLITS = ('train', 'test')


def _file_name(example) -> str:
  name = example.get('file_name', '?')
  if isinstance(name, np.ndarray):
    name = name.item()
  if isinstance(name, bytes):
    name = name.decode('utf-8', 'replace')
  return str(name)


def to_image_label(example: dict) -> tuple[np.ndarray, np.ndarray]:
  """Maps a decoded `oxford_iiit_pet` example to an image and class indices.

  Args:
    example: With 'image' uint8 [H, W, 3], 'segmentation_mask' uint8
      [H, W, 1] (the trimap, values 1-3) and 'file_name'.

  Returns:
    image: float32 [H, W, 3] in [0, 255].
    label: int32 [H, W] in {0: background, 1: pet, 2: border}.

  Raises:
    ValueError: naming the file, if the trimap holds a value outside 1-3 or its
      shape differs from the image's.
  """
  image = np.asarray(example['image'])
  trimap = np.asarray(example['segmentation_mask'])
  if trimap.ndim == 3:
    trimap = trimap[..., 0]
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[:2] != trimap.shape:
    raise ValueError(
      f'{_file_name(example)}: image shape {image.shape[:2]} differs from trimap'
      f' shape {trimap.shape}.'
    )
  values = np.unique(trimap)
  if values.size and (values[0] < 1 or values[-1] > 3):
    raise ValueError(f'{_file_name(example)}: trimap values {values.tolist()} outside 1-3.')
  return image.astype(np.float32), _TRIMAP_TO_CLASS[trimap]
