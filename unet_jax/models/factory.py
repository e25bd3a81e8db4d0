"""The network from a config's `model` section: the one function training, planning,
prediction and export all build it with (nnU-Net's `get_network_from_plans`).

    model = factory.create_model(config.model, kernels=config.kernels)
    divisor = factory.input_divisor_of(config.model, ndim=3)

How the network is computed (`config.kernels`, `unet_jax/ops/policy.py`) is not part
of `config.model`, whose fields all fix the parameters or the function.

`config.model.dtype`, the compute dtype, is 'auto' by default: bfloat16 on GPU and
TPU, float32 on the CPU, by `jax.default_backend()` when the model is built
(`compute_dtype`); 'float32' or 'bfloat16' forces one. The parameters
(`param_dtype`), the norms' statistics, the logits, the loss, the optimizer and the
metrics are float32 under either.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from unet_jax.models import unet
from unet_jax.ops import policy as policy_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# `model.dtype` takes these; `model.param_dtype` takes `DTYPES` only.
COMPUTE_DTYPES = ('auto', *DTYPES)
# The backends (`jax.default_backend()`) where 'auto' computes in bfloat16, as
# nnU-Net and MONAI train with automatic mixed precision on GPU, and big_vision and
# scenic compute in bfloat16 on TPU. XLA's bfloat16 convolutions on the CPU are slow.
BFLOAT16_BACKENDS = ('gpu', 'tpu')
# The UNet fields that chose CPU kernels before `config.kernels` replaced them. Runs
# recorded them under `model`; they are dropped when such a record is read
# (`drop_kernel_fields`), as they never changed the parameters.
OLD_KERNEL_FIELDS = (
  'transpose_as_matmul',
  'conv3d_as_2d',
  'pointwise_as_matmul',
  'conv_weight_grad',
  'native_conv_forward',
  'native_winograd',
  'pool_as_reshape',
  'native_pool',
)


def compute_dtype(name: str, *, backend: str | None = None) -> str:
  """The dtype name `model.dtype=name` computes in: `name` itself, or for 'auto'
  'bfloat16' on `BFLOAT16_BACKENDS` and 'float32' elsewhere.

  Args:
    name: one of `COMPUTE_DTYPES`.
    backend: the backend to choose for; default `jax.default_backend()`.
  """
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.model.dtype={name!r} is not one of {COMPUTE_DTYPES}.')
  if name != 'auto':
    return name
  backend = jax.default_backend() if backend is None else backend
  return 'bfloat16' if backend in BFLOAT16_BACKENDS else 'float32'


def as_tuples(value: Any) -> Any:
  """Config lists (which ml-collections may hand over as lists) as nested tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(as_tuples(v) for v in value)
  return value


def model_options() -> tuple[str, ...]:
  """The UNet fields a config's `model` section may set."""
  fields = unet.UNet.__dataclass_fields__
  exclude = ('parent', 'name', 'bn_axis_name', 'kernels')
  return tuple(sorted(f for f in fields if f not in exclude))


def check_options(model_config) -> None:
  """A ValueError naming each field of `config.model` that the UNet does not take."""
  unknown = sorted(set(model_config.keys()) - set(model_options()))
  if unknown:
    old = sorted(set(unknown) & set(OLD_KERNEL_FIELDS))
    hint = f'; {old} are now config.kernels (unet_jax/ops/policy.py)' if old else ''
    raise ValueError(
      f'config.model has unknown field(s) {unknown}; the UNet takes'
      f' {list(model_options())}{hint}.'
    )


def drop_kernel_fields(model_config: Any) -> dict[str, Any]:
  """`model_config` as a dict without `OLD_KERNEL_FIELDS`, logging what it drops.

  For the `model` section a run recorded before `config.kernels` existed: those
  fields chose kernels, not parameters, so the record still describes the network.
  """
  options = dict(model_config)
  old = {k: options.pop(k) for k in OLD_KERNEL_FIELDS if k in options}
  if old:
    logging.info(
      'Ignoring the recorded config.model fields %s: kernels are chosen by'
      ' config.kernels now (unet_jax/ops/policy.py).',
      old,
    )
  return options


def create_model(
  model_config,
  *,
  kernels: policy_lib.KernelPolicy | str = 'auto',
  bn_axis_name: str | None = None,
) -> unet.UNet:
  """The UNet that `config.model` describes: every field is passed through.

  Unset (None) fields keep the UNet's defaults; an unknown field is a ValueError
  listing the valid ones. `dtype='auto'` is resolved here, for the backend this
  process runs on (`compute_dtype`). The fields that chose kernels before `config.kernels`
  (`OLD_KERNEL_FIELDS`, in the records of older runs) are dropped with a log.

  Args:
    model_config: `config.model`.
    kernels: `config.kernels`: 'auto', 'xla', 'native', 'onednn' or a `KernelPolicy`
      (`UNet.kernels`).
    bn_axis_name: `UNet.bn_axis_name`, for pmap.
  """
  options = drop_kernel_fields(model_config)
  check_options(options)
  options = {k: v for k, v in options.items() if v is not None}
  if 'dtype' in options:
    options['dtype'] = DTYPES[compute_dtype(options['dtype'])]
  if 'param_dtype' in options:
    if options['param_dtype'] not in DTYPES:
      raise ValueError(
        f'config.model.param_dtype={options["param_dtype"]!r} is not one of'
        f' {tuple(DTYPES)}.'
      )
    options['param_dtype'] = DTYPES[options['param_dtype']]
  options = {k: as_tuples(v) for k, v in options.items()}
  policy_lib.check(kernels)  # A bad name fails here, not at the first trace.
  return unet.UNet(**options, kernels=kernels, bn_axis_name=bn_axis_name)


def input_divisor_of(model_config, *, ndim: int) -> tuple[int, ...]:
  """What input sizes must be a multiple of, per spatial axis, for the UNet that
  `model_config` describes (its unset fields at the UNet's defaults)."""
  model = create_model(model_config, kernels='xla')  # A dataclass: nothing is built.
  return unet.input_divisor(ndim=ndim, depth=model.depth, pool_sizes=model.pool_sizes)
