"""Tests for unet_jax.inference.export: round trips, a JAX-only loader, symbolic batch."""

import functools
import importlib
import json
import os
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import inference_test
from unet_jax import checkpointing
from unet_jax import config as config_lib
from unet_jax import models
from unet_jax import train
from unet_jax.data import geometry
from unet_jax.data import pipeline as input_pipeline
from unet_jax.inference import export
from unet_jax.inference import predict
from unet_jax.inference import predictor as predictor_lib
from unet_jax.inference import sliding_window
from unet_jax.models import factory

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
  # Wide enough for the native kernels, asked for on the CPU (the export is 'xla').
  kernels = 'native' if jax.default_backend() == 'cpu' else 'auto'
  model = models.UNet(num_classes=2, features=16, depth=1, norm='batch', kernels=kernels)
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


# The whole inference function: normalisation and sliding window inside the file.

NORMS = {
  'zscore': {'mode': 'zscore'},
  'ct': {'mode': 'ct', 'low': 150.0, 'high': 800.0, 'mean': 400.0, 'std': 200.0},
  'rescale': {'mode': 'rescale', 'low': 100.0, 'high': 1000.0},
  'minmax': {'mode': 'minmax'},
  'none': {'mode': 'none'},
}


def _raw(batch, spatial, channels=2, seed=0):
  """Raw intensities in [100, 1000]: a missing normalisation cannot hide."""
  rng = np.random.default_rng(seed)
  return rng.uniform(100, 1000, (batch, *spatial, channels)).astype(np.float32)


def _host_normalise(image, norms):
  """data.pipeline.normalise with the per-channel modes and values of `norms`."""
  values = {k: [n.get(k, 1.0) for n in norms] for k in ('low', 'high', 'mean', 'std')}
  return input_pipeline.normalise(image, mode=[n['mode'] for n in norms], **values)


@pytest.mark.parametrize('mode', sorted(NORMS))
def test_normalise_jax_equals_the_pipelines_normalise(mode):
  images = _raw(2, (6, 5), channels=2)
  images[1, ..., 1] = 7.0  # A constant channel: std 0, max == min.
  norms = [NORMS[mode], NORMS['ct']]
  got = export.normalise_jax(jnp.asarray(images), norms)
  for i in range(2):
    want = _host_normalise(images[i], norms)
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
  if mode == 'zscore':  # By hand: mean 0, std 1 over each image's own pixels.
    np.testing.assert_allclose(np.mean(got[0, ..., 0]), 0, atol=1e-5)
    np.testing.assert_allclose(np.std(got[0, ..., 0]), 1, atol=1e-4)


@pytest.mark.parametrize(
  'spatial,patch,tta',
  [
    ((20, 28), (16, 16), True),
    ((12, 16), (16, 16), False),
    ((6, 20, 12), (4, 16, 8), False),
  ],
)
def test_raw_images_give_the_sliding_window_logits_of_the_normalised_image(
  spatial, patch, tta
):
  # Several windows (blended), an image smaller than the patch (mirrored), 3D.
  model = models.UNet(num_classes=3, features=4, depth=2, norm='batch', pool_sizes=2)
  if len(spatial) == 3:
    model = models.UNet(
      num_classes=3, features=4, depth=2, norm='batch', pool_sizes=(1, 2, 2)
    )
  variables = random_variables(model, jnp.zeros((1, *patch, 2)))
  norms = [NORMS['zscore'], NORMS['ct']]
  data = export.export_predict_fn(
    model,
    variables,
    spatial_shape=spatial,
    num_channels=2,
    normalization=norms,
    patch_size=patch,
    tta=tta,
    platforms=None,
  )
  images = _raw(2, spatial)
  logits = np.asarray(export.load_exported(data)(images))
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  for i in range(2):
    want = sliding_window.sliding_window_predict(
      apply,
      _host_normalise(images[i], norms),
      patch_size=patch,
      divisor=(1, 4, 4)[-len(spatial) :] if len(spatial) == 3 else 4,
      flip_tta=tta,
    )
    np.testing.assert_allclose(logits[i], want, rtol=1e-4, atol=1e-4)
    assert np.mean(logits[i].argmax(-1) == want.argmax(-1)) == 1.0


def test_old_files_without_a_contract_still_load(tmp_path):
  _, _, spatial, data = _exported(2)
  assert not data.startswith(export.MAGIC)
  (tmp_path / 'old.jax').write_bytes(data)
  predict = export.load_exported(tmp_path / 'old.jax')
  assert predict.contract is None
  assert predict(_images(1, spatial)).shape == (1, *spatial, 3)
  assert 'before contracts' in export.describe(None)


def test_the_container_round_trips_and_bad_headers_are_named(tmp_path):
  _, _, spatial, data = _exported(2)
  contract = {'input': {'shape': ['b', *spatial, 2]}, 'note': 'é'}
  packed = export.pack(data, contract)
  assert packed[:16] == b'unet_jax.export\n'
  assert export.unpack(packed) == (data, contract)
  predict = export.load_exported(packed)
  assert predict.contract == contract
  np.testing.assert_array_equal(
    predict(_images(1, spatial)), export.load_exported(data)(_images(1, spatial))
  )
  (tmp_path / 'short.jax').write_bytes(export.MAGIC + b'\x01')
  with pytest.raises(ValueError, match='short.jax is a truncated'):
    export.load_exported(tmp_path / 'short.jax')
  (tmp_path / 'bad.jax').write_bytes(export.MAGIC + struct.pack('<Q', 3) + b'{{{' + data)
  with pytest.raises(ValueError, match='bad.jax: its contract header is not JSON'):
    export.load_exported(tmp_path / 'bad.jax')


@pytest.mark.parametrize(
  'norms,match',
  [
    ([{'mode': 'zscore'}], r'1 entries for 2 channel'),
    ([{'mode': 'zscore'}, {'mode': 'window'}], r'normalization\[1\].*mode must be'),
    ([{'mode': 'zscore'}, {'mode': 'ct', 'low': 0.0}], r"needs \['high', 'mean', 'std'\]"),
  ],
)
def test_bad_normalizations_are_named(norms, match):
  model, variables, spatial, _ = _exported(2)
  with pytest.raises(ValueError, match=match):
    export.export_predict_fn(
      model, variables, spatial_shape=spatial, num_channels=2, normalization=norms
    )


# A tiny trained run, CT-normalised, exported by the command.


@pytest.fixture(scope='module')
def ct_run(tmp_path_factory):
  """A tiny 2D run trained with normalization='ct' (window 40..200, mean 90, std 50)."""
  base = tmp_path_factory.mktemp('ct_run')
  inference_test._write_2d(base / 'data', np.random.default_rng(0))
  config = inference_test._folder_config(
    base / 'data',
    base / 'tfds',
    2,
    **{
      'data.normalization': 'ct',
      'data.intensity_low': (40.0,),
      'data.intensity_high': (200.0,),
      'data.intensity_mean': (90.0,),
      'data.intensity_std': (50.0,),
    },
  )
  workdir = str(base / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def test_the_export_of_a_run_agrees_with_predict_on_raw_images(ct_run, tmp_path, capsys):
  path = export.export_run(ct_run, str(tmp_path / 'model.jax'), spatial_shape=(20, 28))
  printed = capsys.readouterr().out
  predictor = predictor_lib.load(ct_run)
  # Raw intensities, partly outside the CT window, not a multiple of the divisor.
  images = np.random.default_rng(3).uniform(0, 400, (2, 20, 28, 1)).astype(np.float32)
  exported = export.load_exported(path)
  logits = np.asarray(exported(images))
  for i in range(2):
    want = predictor.predict(images[i])  # What --mode=predict computes.
    np.testing.assert_allclose(logits[i], want, rtol=1e-4, atol=1e-4)
    assert np.mean(logits[i].argmax(-1) == want.argmax(-1)) == 1.0
  contract = exported.contract
  assert contract['input']['shape'] == ['b', 20, 28, 1]
  assert contract['input']['normalization'] == [
    {'mode': 'ct', 'low': 40.0, 'high': 200.0, 'mean': 90.0, 'std': 50.0}
  ]
  assert contract['output']['shape'] == ['b', 20, 28, 2]
  assert contract['output']['num_classes'] == 2
  assert contract['inference']['patch_size'] == [20, 28]  # Padded up to the divisor, 4.
  assert contract['run']['step'] == predictor.step
  assert printed == f'{path}:\n{export.describe(contract)}\n'
  assert '0: ct low=40 high=200 mean=90 std=50' in printed
  assert 'float32 [b, 20, 28, 1] (bHWC), raw intensities' in printed


def test_plain_jax_reads_the_contract_and_runs_the_file(ct_run, tmp_path):
  export.export_run(ct_run, str(tmp_path / 'model.jax'), spatial_shape=(20, 28))
  images = np.random.default_rng(4).uniform(0, 400, (1, 20, 28, 1)).astype(np.float32)
  np.save(tmp_path / 'images.npy', images)
  # The recipe of the module docstring, in a fresh interpreter.
  code = textwrap.dedent("""
      import json, struct, sys
      import numpy as np
      images = np.load('images.npy')
      import jax
      data = open('model.jax', 'rb').read()
      (n,) = struct.unpack('<Q', data[16:24])
      contract = json.loads(data[24 : 24 + n])
      exported = jax.export.deserialize(bytearray(data[24 + n :]))
      logits = exported.call(images)
      np.save('logits.npy', np.asarray(logits))
      print(json.dumps([contract['input']['shape'],
                        [m for m in ('unet_jax', 'flax') if m in sys.modules]]))
  """)
  assert _run(code, tmp_path) == [['b', 20, 28, 1], []]
  want = predictor_lib.load(ct_run).predict(images[0])
  np.testing.assert_allclose(
    np.load(tmp_path / 'logits.npy')[0], want, rtol=1e-4, atol=1e-4
  )


def test_export_run_refuses_a_shape_of_the_wrong_rank(ct_run, tmp_path):
  with pytest.raises(ValueError, match=r'spatial_shape=\(4, 20, 28\): the run is 2D'):
    export.export_run(ct_run, str(tmp_path / 'm.jax'), spatial_shape=(4, 20, 28))
  assert not os.listdir(tmp_path)


# A 3D run planned at a target spacing: the file resamples as predict does.


@pytest.fixture(scope='module')
def spaced_run(tmp_path_factory):
  """A 3D run folder at target spacing (2, 1, 1), patch (4, 8, 8), 3 classes, z-score.

  Written without training: the config record and random variables (BatchNorm
  statistics far from (0, 1)) in a real orbax checkpoint, as training writes them.
  """
  config = importlib.import_module('configs.folder').get_config()
  fields = {
    'data': {'config': '3d', 'target_spacing': (2.0, 1.0, 1.0), 'patch_size': (4, 8, 8)},
    'model': {'features': 4, 'depth': 2, 'pool_sizes': (1, 2, 2), 'num_classes': 3},
  }
  for section, values in fields.items():
    for name, value in values.items():
      config[section][name] = value
  config.plan = False
  record = config.to_dict()
  record['data_shape'] = {'ndim': 3, 'num_channels': 1, 'spatial_shape': [4, 8, 8]}
  model = factory.create_model(config.model, kernels='xla')
  variables = random_variables(model, jnp.zeros((1, 4, 8, 8, 1)))
  workdir = tmp_path_factory.mktemp('spaced_run')
  manager = checkpointing.create_manager(str(workdir / 'checkpoints'), keep=5)
  checkpointing.save(manager, 1, variables, record=record)
  manager.close()
  return str(workdir)


def test_a_spaced_run_resamples_inside_as_predict_does(spaced_run, tmp_path, capsys):
  spacing = (3.0, 1.5, 0.8)  # Coarser along D and H, finer along W: 3 different zooms.
  path = export.export_run(
    spaced_run, str(tmp_path / 'm.jax'), spatial_shape=(5, 12, 10), input_spacing=spacing
  )
  exported = export.load_exported(path)
  predictor = predictor_lib.load(spaced_run)
  images = np.random.default_rng(5).uniform(100, 1000, (2, 5, 12, 10, 1))
  probs = np.asarray(exported(images))
  for i in range(2):  # --mode=predict: resample, normalise, windows, softmax, back.
    want = predict.case_probabilities(predictor, images[i].astype(np.float32), spacing)
    np.testing.assert_allclose(probs[i], want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(predict.labels_of(probs[i]), predict.labels_of(want))
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  contract = exported.contract['input']
  assert contract['spacing'] == list(spacing) and contract['resampled_inside']
  assert contract['target_spacing'] == [2.0, 1.0, 1.0]
  assert contract['axes'] == 'bDHWC' and 'canonical RAS+' in contract['orientation']
  assert exported.contract['output']['shape'] == ['b', 5, 12, 10, 3]
  assert exported.contract['inference']['patch_size'] == [4, 8, 8]
  assert "resampled inside to the run's (2.0, 1.0, 1.0)" in capsys.readouterr().out


def test_a_spaced_run_without_input_spacing_takes_volumes_at_its_spacing(
  spaced_run, tmp_path
):
  path = export.export_run(spaced_run, str(tmp_path / 'm.jax'), spatial_shape=(6, 12, 10))
  exported = export.load_exported(path)
  assert exported.contract['input']['spacing'] == [2.0, 1.0, 1.0]
  assert not exported.contract['input']['resampled_inside']
  assert 'resample to it first' in export.describe(exported.contract)
  predictor = predictor_lib.load(spaced_run)
  images = np.random.default_rng(6).uniform(100, 1000, (1, 6, 12, 10, 1))
  np.testing.assert_allclose(
    exported(images)[0],
    predictor.predict(images[0].astype(np.float32)),  # Sliding windows of (4, 8, 8).
    rtol=1e-4,
    atol=1e-4,
  )


def test_resampling_matrices_equal_the_geometry_resamplers():
  shape, spacing, target = (5, 12, 10), (3.0, 1.5, 0.8), (2.0, 1.0, 1.0)
  to_target, back = export.resampling_matrices(shape, spacing, target)
  assert [m.shape for m in to_target] == [(8, 5), (18, 12), (8, 10)]
  assert [m.shape for m in back] == [(5, 8), (12, 18), (10, 8)]
  x = np.random.default_rng(7).uniform(100, 1000, (1, *shape, 2)).astype(np.float32)
  np.testing.assert_allclose(
    export.resample_jax(jnp.asarray(x), to_target)[0],
    geometry.resample_image(x[0], spacing, target),
    rtol=1e-5,
  )
  p = np.random.default_rng(8).uniform(0, 1, (1, 8, 18, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(
    export.resample_jax(jnp.asarray(p), back)[0],
    geometry.resample_probabilities(p[0], target, spacing, shape=shape),
    atol=1e-6,
  )


def test_input_spacing_is_refused_where_predict_does_not_resample(
  ct_run, spaced_run, tmp_path
):
  with pytest.raises(ValueError, match=r'has no config.data.target_spacing'):
    export.export_run(ct_run, str(tmp_path / 'a.jax'), input_spacing=(1.0, 1.0))
  with pytest.raises(ValueError, match=r'input_spacing needs spatial_shape'):
    export.export_run(spaced_run, str(tmp_path / 'b.jax'), input_spacing=(1.0, 1.0, 1.0))
  model, variables, spatial, _ = _exported(2)
  with pytest.raises(ValueError, match=r"needs output='probabilities'"):
    export.export_predict_fn(
      model,
      variables,
      spatial_shape=spatial,
      num_channels=2,
      resampling=([np.eye(16)] * 2, [np.eye(16)] * 2),
    )
  assert not os.listdir(tmp_path)


def test_the_export_command_prints_the_contract_it_stores(spaced_run, tmp_path):
  output = tmp_path / 'model.jax'
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--mode=export',
      f'--workdir={spaced_run}',
      f'--output={output}',
      '--spatial_shape=5,12,10',
      '--input_spacing=3,1.5,0.8',
      '--tta',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, contract = export.unpack(output.read_bytes())
  assert contract['inference']['tta'] is True
  assert contract['input']['spacing'] == [3.0, 1.5, 0.8]
  assert f'{output}:\n{export.describe(contract)}\n' in proc.stdout
  assert proc.stdout.rstrip().endswith(f'Wrote {output}.')


def test_the_export_knows_every_normalisation_of_the_config():
  assert export.MODES == config_lib.NORMALIZATIONS
  assert {m: export._FIELDS.get(m, ()) for m in export.MODES} == {
    m: config_lib.INTENSITY_FIELDS.get(m, ()) for m in config_lib.NORMALIZATIONS
  }
