r"""Oxford-IIIT Pet (TFDS `oxford_iiit_pet`), the standard public segmentation benchmark.

Three classes from the trimap: 0 background, 1 pet, 2 border
(unet_jax/data/pets.py). Needs TFDS to download the data set once (about 800 MB);
machines without internet cannot run it.

    python launch.py --config=configs/pets.py --workdir=runs/pets

Expected result: not measured yet. The data set cannot be downloaded on the machines
this project has been run on so far; the loading path is tested with TFDS mock data.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'oxford_iiit_pet'
  config.data.eval_split = 'test'
  config.data.size_policy = 'resize'
  config.data.image_size = (128, 128)
  config.loss.name = 'dice_ce'
  config.model.num_classes = 3
  config.model.features = 32
  config.model.depth = 4
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_train_steps = 20000
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 100
  return config
