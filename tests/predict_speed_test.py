"""BatchNorm folded into the convolutions computes the same network; the CPU
prediction benchmark runs and writes its rows (no timing is asserted)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax.inference import folding
from unet_jax.inference import predictor as inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_and_variables(ndim, *, kernels='auto', remat=False, seed=0):
  """A tiny BatchNorm UNet with random parameters and BatchNorm statistics."""
  model = models.UNet(num_classes=3, features=4, depth=2, kernels=kernels, remat=remat)
  x = jnp.zeros((1,) + (8,) * ndim + (2,), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      scale = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      return rng.normal(0, scale, leaf.shape).astype(np.float32)
    if name.endswith("['var']"):
      return rng.uniform(0.3, 3.0, leaf.shape).astype(np.float32)
    if name.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.5, leaf.shape).astype(np.float32)  # bias, mean

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize(
  'ndim, kernels, remat',
  [(2, 'auto', False), (3, 'auto', True), (2, 'xla', False), (3, 'xla', False)],
)
def test_folded_network_equals_the_plain_one(ndim, kernels, remat):
  model, variables = _model_and_variables(ndim, kernels=kernels, remat=remat)
  folded_model, folded = folding.fold_batchnorm(model, variables)
  assert folded_model.norm == 'none' and not folded_model.remat
  assert 'batch_stats' not in folded
  size = (16, 12) if ndim == 2 else (8, 12, 8)
  x = jax.random.normal(jax.random.key(1), (2, *size, 2))
  want = np.asarray(model.apply(variables, x, train=False))
  got = np.asarray(folded_model.apply(folded, x, train=False))
  assert np.abs(want).max() > 0.1  # Not a trivially small output.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The statistics matter: dropping them changes the function.
  stripped = {
    'params': variables['params'],
    'batch_stats': jax.tree.map(lambda a: np.zeros_like(a), variables['batch_stats']),
  }
  assert np.abs(np.asarray(model.apply(stripped, x, train=False)) - want).max() > 1e-2


def test_fold_by_hand():
  # gamma 3, beta 1, mean 2, var 4 - eps: s = 3 / 2 = 1.5, bias = 1 - 1.5 * 2 = -2.
  model, variables = _model_and_variables(2)
  block = variables['params']['encoder0']
  stats = variables['batch_stats']['encoder0']
  channels = block['norm0']['scale'].shape
  block['norm0']['scale'] = np.full(channels, 3.0, np.float32)
  block['norm0']['bias'] = np.full(channels, 1.0, np.float32)
  stats['norm0']['mean'] = np.full(channels, 2.0, np.float32)
  stats['norm0']['var'] = np.full(channels, 4.0 - folding.EPSILON, np.float32)
  _, folded = folding.fold_batchnorm(model, variables)
  conv = folded['params']['encoder0']['conv0']
  np.testing.assert_allclose(conv['kernel'], 1.5 * block['conv0']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(conv['bias'], np.full(channels, -2.0), rtol=1e-6)
  # Everything outside the conv blocks passes through unchanged.
  np.testing.assert_array_equal(
    folded['params']['head']['kernel'], variables['params']['head']['kernel']
  )


def test_fold_errors_name_the_problem():
  model, variables = _model_and_variables(2)
  with pytest.raises(ValueError, match="norm='batch'"):
    folding.fold_batchnorm(model.clone(norm='group'), variables)
  with pytest.raises(ValueError, match='batch_stats'):
    folding.fold_batchnorm(model, {'params': variables['params']})
  stats = dict(variables['batch_stats'])
  stats['encoder0'] = {'norm0': stats['encoder0']['norm0']}
  with pytest.raises(ValueError, match='encoder0.*norm1'):
    folding.fold_batchnorm(model, {'params': variables['params'], 'batch_stats': stats})
  # Any other model is predicted as it is.
  group = model.clone(norm='group')
  assert folding.for_inference(group, variables) == (group, variables)


def test_predictor_predicts_with_the_folded_network():
  model, variables = _model_and_variables(2)
  predictor = inference.Predictor(
    model=model,
    variables=variables,
    config=None,
    data=None,
    step=0,
    num_channels=2,
    ndim=2,
    divisor=(4, 4),
    patch_size=None,
  )
  x = jax.random.normal(jax.random.key(2), (1, 12, 16, 2))
  want = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(
    np.asarray(predictor.apply(x)), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
  )


def test_benchmark_smoke_run_without_torch(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'predict_speed.py'),
      '--smoke',
      '--cases=3d_resample',
      '--variants=folded',
      f'--out={tmp_path}',
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'skipped: torch not installed' in proc.stdout
  with open(tmp_path / 'predict_speed.json') as f:
    report = json.load(f)
  assert report['torch'] == 'skipped: torch not installed'
  assert set(report['results']) == {'3d_resample'}
  sides = report['results']['3d_resample']['sides']
  assert set(sides) == {'folded'}  # No MONAI side without torch.
  e2e = sides['folded']
  assert e2e['total'] > 0 and e2e['network'] > 0
  # The predict path's stages, each timed, sharing the total.
  for stage in ('read', 'resample', 'normalise', 'window', 'resample_back', 'write'):
    assert e2e[stage] >= 0, stage
  stages = ('read', 'resample', 'normalise', 'window', 'resample_back', 'write')
  assert sum(e2e[s] for s in stages) == pytest.approx(e2e['total'], rel=0.05, abs=1e-3)
  assert '| 3d_resample | folded |' in proc.stdout
