"""Tests for unet_jax.inference.export: round trips, a JAX-only loader, symbolic batch."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax.inference import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_variables(model, x, seed=0):
  """Random kernels and BatchNorm statistics far from (0, 1), so eval mode shows.

  `model.init` would do, but compiling its random initialisers takes XLA:CPU far
  longer than the whole test; the shapes come from tracing it instead.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', '')
    if name == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
    if name in ('mean', 'bias'):
      return rng.normal(0, 0.3, leaf.shape).astype(leaf.dtype)
    if name == 'scale':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _exported(ndim):
  """A small BatchNorm U-Net, its variables, and its export."""
  spatial = (16, 16) if ndim == 2 else (8, 16, 16)
  model = models.UNet(num_classes=3, features=4, depth=2, norm='batch')
  variables = random_variables(model, jnp.zeros((1, *spatial, 2)))
  data = export.export_predict_fn(model, variables, spatial_shape=spatial, num_channels=2)
  return model, variables, spatial, data


def _images(batch, spatial, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, *spatial, 2)).astype(np.float32)


@pytest.mark.parametrize('ndim', [2, 3])
def test_round_trip_through_a_file_for_two_batch_sizes(ndim, tmp_path):
  model, variables, spatial, data = _exported(ndim)
  path = tmp_path / 'model.jax'
  path.write_bytes(data)
  predict = export.load_exported(path)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  for batch in (1, 3):
    images = _images(batch, spatial, seed=batch)
    logits = predict(images)
    assert logits.shape == (batch, *spatial, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, apply(images), rtol=1e-5, atol=1e-5)
  # Eval mode: the running statistics are used, not the batch's own.
  images = _images(3, spatial)
  train_mode, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
  assert not np.allclose(predict(images), train_mode, atol=1e-3)


def test_the_batch_dimension_is_symbolic_and_the_rest_fixed():
  _, _, spatial, data = _exported(2)
  exported = jax.export.deserialize(bytearray(data))
  (spec,) = exported.in_avals
  assert jax.export.is_symbolic_dim(spec.shape[0])
  assert tuple(spec.shape[1:]) == (*spatial, 2) and spec.dtype == jnp.float32
  assert tuple(exported.out_avals[0].shape[1:]) == (*spatial, 3)
  assert set(exported.platforms) == {'cpu', 'cuda', 'tpu'}


def test_load_from_bytes_equals_load_from_file(tmp_path):
  _, _, spatial, data = _exported(2)
  (tmp_path / 'm.jax').write_bytes(data)
  images = _images(2, spatial)
  np.testing.assert_array_equal(
    export.load_exported(data)(images), export.load_exported(tmp_path / 'm.jax')(images)
  )


def _run(code, tmp_path):
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=tmp_path,
    env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=''),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plain_jax_loads_it_without_this_package_or_flax(tmp_path):
  model, variables, spatial, data = _exported(3)
  (tmp_path / 'model.jax').write_bytes(data)
  images = _images(2, spatial)
  np.save(tmp_path / 'images.npy', images)
  # The three lines of the module docstring, in a fresh interpreter.
  code = textwrap.dedent("""
      import json, sys
      import numpy as np
      images = np.load('images.npy')
      import jax
      exported = jax.export.deserialize(open('model.jax', 'rb').read())
      logits = exported.call(images)
      np.save('logits.npy', np.asarray(logits))
      print(json.dumps([m for m in ('unet_jax', 'flax') if m in sys.modules]))
  """)
  assert _run(code, tmp_path) == []
  logits = np.load(tmp_path / 'logits.npy')
  np.testing.assert_allclose(
    logits, model.apply(variables, images, train=False), rtol=1e-5, atol=1e-5
  )


def test_load_exported_does_not_import_flax(tmp_path):
  _, _, spatial, data = _exported(2)
  (tmp_path / 'model.jax').write_bytes(data)
  code = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {ROOT!r})
      import numpy as np
      from unet_jax.inference.export import load_exported
      logits = load_exported('model.jax')(np.zeros((1, *{spatial!r}, 2), np.float32))
      print(json.dumps([list(logits.shape), 'flax' in sys.modules]))
  """)
  assert _run(code, tmp_path) == [[1, *spatial, 3], False]


@pytest.mark.parametrize(
  'shape,match',
  [
    ((16, 16, 2), r'rank 3, not 4\)\. Add a batch axis'),
    ((1, 1, 16, 16, 2), r'rank 5, not 4'),
    ((1, 16, 16, 3), r'with 2 channel\(s\); got 3'),
    ((1, 32, 16, 2), r'spatial shape \(32, 16\)'),
    ((0, 16, 16, 2), r'empty'),
  ],
)
def test_bad_images_give_a_clear_error(shape, match):
  _, _, _, data = _exported(2)
  predict = export.load_exported(data)
  with pytest.raises(ValueError, match=r'\[b, 16, 16, 2\]|empty') as e:
    predict(np.zeros(shape, np.float32))
  assert e.match(match)


def test_bad_files_give_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='No exported model at'):
    export.load_exported(tmp_path / 'missing.jax')
  (tmp_path / 'junk.jax').write_bytes(b'not a model at all')
  with pytest.raises(ValueError, match='junk.jax is not a jax.export'):
    export.load_exported(tmp_path / 'junk.jax')


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(spatial_shape=(18, 16)), r'not divisible by 4'),
    (dict(spatial_shape=(16,)), r'must be 2 \(H, W\) or 3'),
    (dict(num_channels=0), r'num_channels=0'),
    (dict(variables={'weights': {}}), r"'params'"),
  ],
)
def test_bad_export_arguments(kwargs, match):
  model, variables, _, _ = _exported(2)
  args = dict(variables=variables, spatial_shape=(16, 16), num_channels=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    export.export_predict_fn(model, args.pop('variables'), **args)


def test_the_export_is_the_plain_formulation_without_native_kernels():
  # Wide enough for the native kernels, which `kernels='auto'` uses on this CPU.
  model = models.UNet(num_classes=2, features=16, depth=1, norm='batch')
  x = jnp.zeros((1, 32, 32, 1))
  variables = random_variables(model, x)
  local = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).as_text()
  if jax.default_backend() == 'cpu':
    assert 'unet_jax_' in local
  data = export.export_predict_fn(model, variables, spatial_shape=(32, 32), num_channels=1)
  text = jax.export.deserialize(bytearray(data)).mlir_module()
  assert 'unet_jax_' not in text
  plain = model.clone(kernels='xla').apply(variables, _images(2, (32, 32))[..., :1])
  np.testing.assert_allclose(
    export.load_exported(data)(_images(2, (32, 32))[..., :1]), plain, rtol=1e-5, atol=1e-5
  )
