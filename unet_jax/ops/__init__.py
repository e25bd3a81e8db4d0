"""How the U-Net's convolutions and pooling are computed, apart from what they compute.

`policy.py` chooses (`KernelPolicy`, `UNet(kernels=...)`), `conv.py` holds the
formulations and the native kernels' size rules, `native.py` and `native/conv.cc` the
C++ kernels for the CPU, `onednn.py` and `native/onednn.cc` oneDNN's convolutions.
"""

from unet_jax.ops.policy import KernelPolicy

__all__ = ['KernelPolicy']
