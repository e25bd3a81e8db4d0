r"""BatchNorm folded into the convolution before it, for prediction.

At inference BatchNorm uses its running statistics, so it is an affine map per
channel, and the convolution before it has no bias (`ConvBlock`, and each
convolution of a `ResidualBlock`, its projection too): the two are one
convolution with a scaled kernel and a bias,

.. math::
  \gamma \frac{W * x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta
  = (s W) * x + (\beta - s \mu),\quad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}

per output channel. The folded network is the same `UNet` with `norm='none'`
(whose convolutions have biases) and the folded parameters: one pass over each
activation fewer, the same function to float rounding (tests/predict_speed_test.py
checks 2D and 3D, with the native CPU kernels and with XLA's). Rematerialisation
only matters for gradients, so the folded model has `remat=False`.

    model, variables = folding.fold_batchnorm(model, variables)
    logits = model.apply(variables, images, train=False)

Reference: S. Ioffe, C. Szegedy, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", ICML 2015 (inference as a linear
transform).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from unet_jax import models

# `models.unet._norm`'s BatchNorm epsilon.
EPSILON = 1e-5


def _conv_of(norm: str) -> str:
  """The convolution a norm follows: norm0 -> conv0, proj_norm -> proj_conv."""
  return norm.replace('norm', 'conv')


def _fold_conv(conv: dict, norm: dict, stats: dict) -> dict:
  kernel = jnp.asarray(conv['kernel'], jnp.float32)
  scale = jnp.asarray(norm['scale'], jnp.float32) * jax.lax.rsqrt(
    jnp.asarray(stats['var'], jnp.float32) + EPSILON
  )
  bias = jnp.asarray(norm['bias'], jnp.float32) - scale * jnp.asarray(
    stats['mean'], jnp.float32
  )
  dtype = conv['kernel'].dtype
  return {'kernel': (kernel * scale).astype(dtype), 'bias': bias.astype(dtype)}


def _fold_block(params: dict, stats: dict, where: str) -> dict:
  """A module's params with each BatchNorm (a `stats` entry with mean and var)
  folded into its convolution (`_conv_of`): a ConvBlock's {'conv0', 'norm0',
  'conv1', 'norm1'} -> {'conv0', 'conv1'}; a residual stage's blocks, and their
  projections (proj_conv, proj_norm), by recursion."""
  out = dict(params)
  for name, sub in stats.items():
    if name not in params:
      raise ValueError(
        f'{where}: batch_stats {name} has no parameters; the params are {sorted(params)}.'
      )
    if 'mean' not in sub or 'var' not in sub:  # A submodule: a stage's block.
      out[name] = _fold_block(params[name], sub, f'{where}/{name}')
      continue
    conv = _conv_of(name)
    if conv not in params:
      raise ValueError(
        f'{where}: BatchNorm {name} follows no convolution {conv}; it has params'
        f' {sorted(params)}.'
      )
    out[conv] = _fold_conv(params[conv], params[name], sub)
    del out[name]
  unfolded = [k for k, v in out.items() if 'norm' in k and 'scale' in v]
  if unfolded:
    raise ValueError(
      f'{where}: a BatchNorm block needs the batch_stats of each norm; {unfolded} have'
      f' none (it has params {sorted(params)} and batch_stats {sorted(stats)}).'
    )
  return out


def fold_batchnorm(
  model: models.UNet, variables: dict[str, Any]
) -> tuple[models.UNet, dict[str, Any]]:
  """The same network with every BatchNorm folded into its convolution.

  Args:
    model: a `UNet` with `norm='batch'`.
    variables: its {'params': ..., 'batch_stats': ...}.

  Returns:
    `(model.clone(norm='none', remat=False), {'params': folded})`: convolutions of
    the conv blocks and residual blocks (and their projections) get the folded
    kernel and a bias; every other parameter is passed through as it is. Apply it
    with `train=False` only.

  Raises:
    ValueError: if the model's norm is not 'batch', or a block lacks its statistics.
  """
  if model.norm != 'batch':
    raise ValueError(
      f"fold_batchnorm needs a UNet with norm='batch'; it has {model.norm!r}."
    )
  if 'batch_stats' not in variables:
    raise ValueError(
      f'fold_batchnorm needs batch_stats beside the params; got {sorted(variables)}.'
    )
  params = _fold_params(variables['params'], variables['batch_stats'])
  return model.clone(norm='none', remat=False), {'params': params}


@jax.jit
def _fold_params(params: dict, stats: dict) -> dict:
  """Every block's folding as one compiled program: eagerly, each of its few
  operations per convolution would be compiled apart, at every prediction's start
  (benchmarks/RESULTS.md, "Start-up")."""
  return {
    name: _fold_block(sub, stats[name], name) if name in stats else sub
    for name, sub in params.items()
  }


def for_inference(
  model: models.UNet, variables: dict[str, Any]
) -> tuple[models.UNet, dict[str, Any]]:
  """`fold_batchnorm` for a BatchNorm UNet; any other model as it is."""
  if getattr(model, 'norm', None) == 'batch' and 'batch_stats' in variables:
    return fold_batchnorm(model, variables)
  return model, variables
