"""The U-Net, plain or with nnU-Net's residual encoder (`unet.py`), the one function
that builds it from a config (`factory.py`), and its memory planner (`memory.py`,
`python -m unet_jax.models.memory`).

    from unet_jax.models import UNet
"""

from unet_jax.models.factory import create_model
from unet_jax.models.unet import BLOCKS
from unet_jax.models.unet import check_spatial_shape
from unet_jax.models.unet import count_params
from unet_jax.models.unet import input_divisor
from unet_jax.models.unet import IntOrTuple
from unet_jax.models.unet import level_shapes
from unet_jax.models.unet import level_widths
from unet_jax.models.unet import NORMS
from unet_jax.models.unet import ResidualBlock
from unet_jax.models.unet import stage_blocks
from unet_jax.models.unet import UNet
from unet_jax.models.unet import Upsample
from unet_jax.models.unet import UPSAMPLE_MODES

__all__ = [
  'BLOCKS',
  'ResidualBlock',
  'level_widths',
  'stage_blocks',
  'IntOrTuple',
  'NORMS',
  'UNet',
  'UPSAMPLE_MODES',
  'Upsample',
  'check_spatial_shape',
  'count_params',
  'create_model',
  'input_divisor',
  'level_shapes',
]
