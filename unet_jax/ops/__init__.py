"""How the U-Net's convolutions and pooling are computed, apart from what they compute.

`policy.py` chooses (`KernelPolicy`, `UNet(kernels=...)`), `conv.py` holds the
formulations and the native kernels' size rules, `native.py` and `native/conv.cc` the
C++ kernels for the CPU, `onednn.py` and `native/onednn.cc` oneDNN's convolutions.
`host_memory.py` holds
glibc's allocator settings for XLA:CPU's step buffers and imports neither JAX nor
NumPy, so that a benchmark's driver can use it without them: hence `KernelPolicy` is
imported lazily here.
"""

__all__ = ['KernelPolicy']


def __getattr__(name):
  if name == 'KernelPolicy':
    from unet_jax.ops.policy import KernelPolicy  # pylint: disable=g-import-not-at-top

    return KernelPolicy
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
