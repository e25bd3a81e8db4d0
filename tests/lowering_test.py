"""The programs GPUs and TPUs run, lowered from this CPU: no known slow path, bfloat16.

The model is built as it would be built on the accelerator: `jax.default_backend()`
returns 'gpu' or 'tpu' while the configs' models are built and traced, by the
project's own code (the factory, `train.setup.create_runner`, the predictor, the
sliding window and the export), and the programs are lowered (not compiled) for
'cuda' and 'tpu'. Each StableHLO text must hold convolutions, none of them with lhs
dilation (the transposed-convolution path JAX users measured 5 to 32 times slower
than PyTorch on CUDA: jax-ml/jax#8537, #31662, #23783), all of them on bfloat16
operands (`config.model.dtype='auto'`), and no call to the CPU's native kernels.
"""

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import config as config_lib
from unet_jax.inference import export
from unet_jax.inference import predictor as predictor_lib
from unet_jax.inference import sliding_window
from unet_jax.models import factory
from unet_jax.models import memory
from unet_jax.ops import native as native_kernels
from unet_jax.ops import policy
from unet_jax.train import config_checks
from unet_jax.train import setup
from unet_jax.train import steps

# The platforms to lower for, as `jax.export` and `lowering_platforms` name them.
PLATFORMS = ('cuda', 'tpu')
# Small inputs the configs' networks take (multiples of their divisors).
SHAPES = {'dice_bce': (16, 16), 'unet3d': (4, 8, 8)}

# `stablehlo.convolution(%a, %b) dim_numbers = ..., window = {..., lhs_dilate = [2, 2],
# ...} ... : (tensor<..xbf16>, tensor<..xbf16>) -> tensor<..xbf16>`, one per line.
_CONV_LINE = re.compile(r'^.*stablehlo\.convolution.*$', re.MULTILINE)
_LHS_DILATION = re.compile(r'lhs_dilat(?:e|ion)\s*=\s*(?:\[|array<i64:)\s*([\d,\s]*)')
_OPERANDS = re.compile(r':\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->')


def check_program(text: str, *, dtype: str = 'bf16') -> int:
  """Asserts the StableHLO `text` is free of the slow paths; returns its convolutions."""
  convs = _CONV_LINE.findall(text)
  assert convs, 'no stablehlo.convolution: the program is not the U-Net'
  for line in convs:
    for dilation in _LHS_DILATION.findall(line):
      assert set(re.findall(r'\d+', dilation)) <= {'1'}, f'lhs-dilated: {line.strip()}'
    operands = _OPERANDS.search(line)
    assert operands, f'no operand types in: {line.strip()}'
    for operand in operands.groups():
      assert operand.endswith(f'x{dtype}>'), f'not {dtype}: {line.strip()}'
  for target in native_kernels.TARGETS:
    assert target not in text, f'a call to the native CPU kernel {target}'
  return len(convs)


def get_config(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model.dtype == 'auto'  # The default, inherited from configs/default.py.
  return config


def build_as_on_accelerators(monkeypatch, build):
  """`build()` as on a TPU, then as on a GPU; returns the GPU's and leaves
  `jax.default_backend()` at 'gpu' for the trace.

  What depends on the backend, the compute dtype (when the model is built) and the
  kernel policy (when it is traced), must be the same on both, so one trace lowered
  for both platforms is the program each of them would trace.
  """
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  on_tpu = build(), policy.resolve('auto')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  on_gpu = build(), policy.resolve('auto')
  assert on_gpu == on_tpu
  assert on_gpu[1] == policy.XLA and on_gpu[1].transpose_as_matmul
  return on_gpu[0]


def _abstract_state(model, tx, input_shape):
  return jax.eval_shape(
    functools.partial(
      steps.create_train_state, model=model, tx=tx, input_shape=input_shape
    ),
    jax.random.key(0),
  )


@pytest.mark.parametrize('name', sorted(SHAPES))
def test_train_step_on_accelerators(name, monkeypatch):
  config = get_config(name)
  run = config_lib.RunOptions.from_config(config)
  tx = steps.create_optimizer(run)
  model = build_as_on_accelerators(monkeypatch, lambda: _model(config))
  assert model.dtype == jnp.bfloat16
  runner = setup.create_runner(config.model, run, tx)  # The model above, and its step.
  spatial = SHAPES[name]
  batch = {
    'image': jax.ShapeDtypeStruct((2, *spatial, 1), jnp.float32),
    'label': jax.ShapeDtypeStruct((2, *spatial), jnp.int32),
  }
  state = _abstract_state(model, tx, (2, *spatial, 1))
  # The parameters, BatchNorm statistics and the optimizer's moments stay float32.
  assert {x.dtype for x in jax.tree.leaves(state)} == {
    jnp.dtype(jnp.float32),
    jnp.dtype(jnp.int32),  # The step counts.
  }
  traced = runner._train.trace(state, batch)  # pylint: disable=protected-access
  new_state, metrics = traced.out_info
  assert metrics['loss'].dtype == jnp.float32 and metrics['grad_norm'].dtype == jnp.float32
  dtypes = lambda tree: jax.tree.map(lambda x: x.dtype, tree)
  assert dtypes(new_state) == dtypes(state)
  text = traced.lower(lowering_platforms=PLATFORMS).as_text()
  # Forward, input gradient and kernel gradient of each 3x3 convolution at least.
  assert check_program(text) >= 3 * 2 * (2 * 3 + 1)


def _model(config):
  """The model as `predictor.load` and `setup.create_runner` build it."""
  return factory.create_model(config.model, kernels=config.kernels)


def _predictor(config, spatial, model):
  """A `Predictor` of `model` as `predictor.load` makes it, with zero variables."""
  run = config_lib.RunOptions.from_config(config)
  x = jax.ShapeDtypeStruct((1, *spatial, 1), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return predictor_lib.Predictor(
    model=model,
    variables=variables,
    config=config,
    data=run.data,
    step=0,
    num_channels=1,
    ndim=len(spatial),
    divisor=factory.input_divisor_of(config.model, ndim=len(spatial)),
    patch_size=spatial,
  )


@pytest.mark.parametrize('name', sorted(SHAPES))
def test_predict_and_export_on_accelerators(name, monkeypatch):
  config = get_config(name)
  spatial = SHAPES[name]
  model = build_as_on_accelerators(monkeypatch, lambda: _model(config))
  assert model.dtype == jnp.bfloat16
  predictor = _predictor(config, spatial, model)
  patches = jax.ShapeDtypeStruct((2, *spatial, 1), jnp.float32)
  traced = predictor.apply.trace(patches)
  assert traced.out_info.dtype == jnp.float32  # Logits in float32.
  check_program(traced.lower(lowering_platforms=PLATFORMS).as_text())
  # The sliding window's jitted step, with flip test-time augmentation.
  window = jax.ShapeDtypeStruct(spatial, jnp.float32)
  traced = sliding_window._weighted_logits.trace(  # pylint: disable=protected-access
    patches, window, apply_fn=predictor.apply, flip_tta=True
  )
  check_program(traced.lower(lowering_platforms=PLATFORMS).as_text())
  data = export.export_predict_fn(
    predictor.model,
    predictor.variables,
    spatial_shape=spatial,
    num_channels=1,
    platforms=PLATFORMS,
  )
  exported = jax.export.deserialize(bytearray(data))
  assert exported.platforms == PLATFORMS
  check_program(exported.mlir_module())


def test_the_cpu_defaults_are_unchanged():
  assert jax.default_backend() == 'cpu'
  config = get_config('dice_bce')
  assert factory.create_model(config.model).dtype == jnp.float32
  assert policy.AUTO['cpu'] == policy.CPU
  assert policy.resolve('auto') in (policy.CPU, policy.CPU.without_native())


def test_the_export_for_every_platform_from_the_cpu():
  # Exported here, the model computes in float32 (the CPU's 'auto'), for every
  # platform; the transposed convolutions are products there too.
  config = get_config('dice_bce')
  predictor = _predictor(config, SHAPES['dice_bce'], _model(config))
  data = export.export_predict_fn(
    predictor.model, predictor.variables, spatial_shape=SHAPES['dice_bce'], num_channels=1
  )
  check_program(jax.export.deserialize(bytearray(data)).mlir_module(), dtype='f32')


# A convolution as StableHLO prints it, and the same with each problem.
GOOD = (
  '%1 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->'
  '[b, 0, 1, f], window = {stride = [1, 1], pad = [[1, 1], [1, 1]], lhs_dilate ='
  ' [1, 1], rhs_dilate = [1, 1]} {batch_group_count = 1 : i64, feature_group_count ='
  ' 1 : i64} : (tensor<1x4x4x8xbf16>, tensor<3x3x8x4xbf16>) -> tensor<1x4x4x4xbf16>'
)


def test_the_check_catches_each_slow_path():
  assert check_program(GOOD) == 1
  with pytest.raises(AssertionError, match='lhs-dilated'):
    check_program(GOOD.replace('lhs_dilate = [1, 1]', 'lhs_dilate = [2, 2]'))
  with pytest.raises(AssertionError, match='not bf16'):
    check_program(GOOD.replace('xbf16>', 'xf32>'))
  with pytest.raises(AssertionError, match='native CPU kernel unet_jax_conv'):
    check_program(GOOD + '\n%2 = stablehlo.custom_call @unet_jax_conv(%a, %b)')
  with pytest.raises(AssertionError, match='no stablehlo.convolution'):
    check_program('%0 = stablehlo.add %a, %b : tensor<2xf32>')


@pytest.mark.parametrize(
  'backend, want', [('cpu', 'float32'), ('gpu', 'bfloat16'), ('tpu', 'bfloat16')]
)
def test_dtype_auto_follows_the_backend(monkeypatch, backend, want):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert factory.compute_dtype('auto') == want
  for forced in ('float32', 'bfloat16'):
    assert factory.compute_dtype(forced) == forced
  config = get_config('dice_bce')
  assert factory.create_model(config.model).dtype == jnp.dtype(want)
  config.model.dtype = 'float32'  # --config.model.dtype=float32 forces it anywhere.
  assert factory.create_model(config.model).dtype == jnp.float32
  # The memory planner's 'auto' is this backend's dtype too.
  est = memory.estimate(spatial_shape=(16, 16), features=4, depth=2, dtype='auto')
  assert est.config['dtype'] == want
  assert est.total_bytes == (
    memory.estimate(spatial_shape=(16, 16), features=4, depth=2, dtype=want).total_bytes
  )


def test_bad_dtypes_are_value_errors():
  config = get_config('dice_bce')
  config_checks.validate_config(config, num_devices=1, process_count=1)  # 'auto' is fine.
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match=r"model.dtype='float16'"):
    factory.create_model(config.model)
  with pytest.raises(ValueError, match=r"model.dtype='float16'.*'auto'"):
    config_checks.validate_config(config, num_devices=1, process_count=1)
  config.model.dtype = 'auto'
  config.model.param_dtype = 'auto'  # Parameters are float32 or bfloat16, never 'auto'.
  with pytest.raises(ValueError, match=r"model.param_dtype='auto'"):
    config_checks.validate_config(config, num_devices=1, process_count=1)
  with pytest.raises(ValueError, match=r"dtype='half'.*'auto'"):
    memory.estimate(spatial_shape=(16, 16), dtype='half')
