"""The network from a config's `model` section: the one function training, planning,
prediction and export all build it with (nnU-Net's `get_network_from_plans`).

    model = factory.create_model(config.model)
    divisor = factory.input_divisor_of(config.model, ndim=3)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from unet_jax.models import unet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def as_tuples(value: Any) -> Any:
  """Config lists (which ml-collections may hand over as lists) as nested tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(as_tuples(v) for v in value)
  return value


def model_options() -> tuple[str, ...]:
  """The UNet fields a config's `model` section may set."""
  fields = unet.UNet.__dataclass_fields__
  return tuple(sorted(f for f in fields if f not in ('parent', 'name', 'bn_axis_name')))


def check_options(model_config) -> None:
  """A ValueError naming each field of `config.model` that the UNet does not take."""
  unknown = sorted(set(model_config.keys()) - set(model_options()))
  if unknown:
    raise ValueError(
      f'config.model has unknown field(s) {unknown}; the UNet takes'
      f' {list(model_options())}.'
    )


def create_model(model_config, *, bn_axis_name: str | None = None) -> unet.UNet:
  """The UNet that `config.model` describes: every field is passed through.

  Unset (None) fields keep the UNet's defaults; an unknown field is a ValueError
  listing the valid ones.
  """
  check_options(model_config)
  options = {k: v for k, v in dict(model_config).items() if v is not None}
  for key in ('dtype', 'param_dtype'):
    if key in options:
      options[key] = DTYPES[options[key]]
  options = {k: as_tuples(v) for k, v in options.items()}
  return unet.UNet(**options, bn_axis_name=bn_axis_name)


def model_pools(model_config) -> Any:
  """The model's pooling windows as the UNet takes them (2 when unset)."""
  pools = model_config.get('pool_sizes')
  return 2 if pools is None else as_tuples(pools)


def input_divisor_of(model_config, *, ndim: int) -> tuple[int, ...]:
  """What input sizes must be a multiple of, per spatial axis."""
  return unet.input_divisor(
    ndim=ndim, depth=model_config.depth, pool_sizes=model_pools(model_config)
  )
