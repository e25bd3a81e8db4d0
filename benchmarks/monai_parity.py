"""Parity of unet_jax.losses with MONAI's DiceLoss, DiceCELoss, TverskyLoss and
GeneralizedDiceLoss: a development check, not a test (the suite never installs torch).

    python3 -m venv /tmp/monai_venv
    /tmp/monai_venv/bin/pip install torch==2.13.0 monai numpy
    /tmp/monai_venv/bin/python benchmarks/monai_parity.py

Runs under the MONAI venv (torch + monai); for the JAX side it calls this same
file with `--jax` under the repository's .venv (`make venv`), exchanging arrays
through .npz files. Measured 2026-11-23 (MONAI 1.6.1, torch 2.13.0+cpu): largest
absolute difference 1.6e-6 over 184 option combinations (benchmarks/RESULTS.md).
Layouts: MONAI is channels-first [N, C, *spatial], unet_jax channels-last.
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_PYTHON = os.path.join(ROOT, '.venv', 'bin', 'python')


def cases():
  """(name, kind, activation, options, spatial, C, label kind) combinations."""
  out = []
  for spatial, act, inc, sq, jac, batch in itertools.product(
    [(7, 6), (4, 5, 3)],
    ['softmax', 'sigmoid'],
    [True, False],
    [False, True],
    [False, True],
    [False, True],
  ):
    out.append(
      dict(
        kind='dice',
        activation=act,
        spatial=spatial,
        C=3,
        opts=dict(include_background=inc, squared_pred=sq, jaccard=jac, batch=batch),
      )
    )
  # Binary sigmoid with one logit, integer labels {0,1}.
  for batch, jac in itertools.product([False, True], [False, True]):
    out.append(
      dict(
        kind='dice',
        activation='sigmoid',
        spatial=(8, 8),
        C=1,
        opts=dict(batch=batch, jaccard=jac),
      )
    )
  # Class weights (MONAI's `weight`), soft targets, smoothing, ignore_index.
  out.append(
    dict(
      kind='dice',
      activation='softmax',
      spatial=(6, 6),
      C=4,
      opts=dict(class_weights=[0.1, 1.0, 2.0, 0.5]),
    )
  )
  out.append(
    dict(
      kind='dice',
      activation='softmax',
      spatial=(6, 6),
      C=4,
      opts=dict(include_background=False, class_weights=[1.0, 2.0, 0.5]),
    )
  )
  out.append(
    dict(
      kind='dice',
      activation='softmax',
      spatial=(6, 6),
      C=3,
      opts=dict(smooth_nr=0.0, smooth_dr=1e-6),
    )
  )
  out.append(
    dict(
      kind='dice',
      activation='softmax',
      spatial=(6, 6),
      C=3,
      opts=dict(smooth_nr=1.0, smooth_dr=1.0, squared_pred=True),
    )
  )
  out.append(
    dict(kind='dice', activation='softmax', spatial=(6, 6), C=3, soft=True, opts=dict())
  )
  out.append(
    dict(
      kind='dice',
      activation='sigmoid',
      spatial=(6, 6),
      C=3,
      soft=True,
      opts=dict(squared_pred=True),
    )
  )
  out.append(
    dict(
      kind='dice',
      activation='softmax',
      spatial=(6, 6),
      C=3,
      ignore=255,
      opts=dict(ignore_index=255),
    )
  )
  out.append(
    dict(
      kind='dice',
      activation='softmax',
      spatial=(6, 6),
      C=3,
      ignore=255,
      opts=dict(ignore_index=255, include_background=False),
    )
  )
  for spatial, inc, batch, sq, jac, ls in itertools.product(
    [(7, 6), (4, 5, 3)],
    [True, False],
    [False, True],
    [False, True],
    [False, True],
    [0.0, 0.1],
  ):
    out.append(
      dict(
        kind='dice_ce',
        activation='softmax',
        spatial=spatial,
        C=3,
        opts=dict(
          include_background=inc,
          batch=batch,
          squared_pred=sq,
          jaccard=jac,
          label_smoothing=ls,
        ),
      )
    )
  out.append(
    dict(
      kind='dice_ce',
      activation='softmax',
      spatial=(6, 6),
      C=3,
      opts=dict(
        class_weights=[0.2, 1.0, 3.0],
        include_background=False,
        lambda_dice=0.7,
        lambda_ce=1.3,
      ),
    )
  )
  out.append(
    dict(kind='dice_ce', activation='softmax', spatial=(6, 6), C=3, soft=True, opts=dict())
  )
  for batch in (False, True):
    out.append(
      dict(
        kind='dice_bce', activation='sigmoid', spatial=(8, 8), C=1, opts=dict(batch=batch)
      )
    )
  for a, b, inc, batch in itertools.product(
    [0.3, 0.5], [0.7, 0.5], [True, False], [False, True]
  ):
    out.append(
      dict(
        kind='tversky',
        activation='softmax',
        spatial=(6, 5),
        C=3,
        opts=dict(alpha=a, beta=b, include_background=inc, batch=batch),
      )
    )
  for w, inc, batch, act in itertools.product(
    ['square', 'simple', 'uniform'], [True, False], [False, True], ['softmax', 'sigmoid']
  ):
    out.append(
      dict(
        kind='generalized_dice',
        activation=act,
        spatial=(6, 5),
        C=4,
        absent=True,
        opts=dict(w_type=w, include_background=inc, batch=batch),
      )
    )
  return out


def make_data(case, seed):
  rng = np.random.default_rng(seed)
  n, c = 3, case['C']
  logits = (3 * rng.normal(size=(n, *case['spatial'], c))).astype(np.float32)
  high = 2 if c == 1 else c
  if case.get('absent'):
    high = c - 1  # the last class never appears in the target
  labels = rng.integers(0, high, size=(n, *case['spatial'])).astype(np.int32)
  if case.get('ignore') is not None:
    labels[rng.random(labels.shape) < 0.3] = case['ignore']
  target = None
  if case.get('soft'):
    target = rng.random((n, *case['spatial'], c)).astype(np.float32)
    if case['activation'] == 'softmax':
      target /= target.sum(-1, keepdims=True)
  return logits, labels, target


def run_jax(path_in, path_out):
  import jax

  jax.config.update('jax_platforms', 'cpu')
  from unet_jax import losses

  data = np.load(path_in, allow_pickle=True)
  all_cases = json.loads(str(data['cases']))
  results = []
  for i, case in enumerate(all_cases):
    logits, labels, target = data[f'l{i}'], data[f'y{i}'], data[f't{i}']
    y = target if target.ndim == logits.ndim else labels
    opts = dict(case['opts'])
    if case['kind'] in ('dice', 'tversky', 'generalized_dice'):
      opts['activation'] = case['activation']
    fn = losses.get_loss(case['kind'])
    results.append(float(jax.jit(lambda x, t: fn(x, t, **opts))(logits, y)))
  np.save(path_out, np.asarray(results, np.float64))


def run_monai(case, logits, labels, target):
  from monai import losses as ml
  import torch

  x = torch.from_numpy(np.moveaxis(logits, -1, 1)).double()
  if target is not None:
    y = torch.from_numpy(np.moveaxis(target, -1, 1)).double()
    onehot = False
  else:
    y = torch.from_numpy(labels[:, None]).long()
    onehot = case['C'] > 1
  o = dict(case['opts'])
  act = dict(
    sigmoid=case['activation'] == 'sigmoid', softmax=case['activation'] == 'softmax'
  )
  kind = case['kind']
  if kind == 'dice':
    weight = o.pop('class_weights', None)
    loss = ml.DiceLoss(to_onehot_y=onehot, weight=weight, **act, **o)
    if target is None and case['C'] == 1:
      y = y.double()
  elif kind in ('dice_ce', 'dice_bce'):
    weight = o.pop('class_weights', None)
    if weight is not None:
      weight = torch.tensor(weight, dtype=torch.float64)
    if kind == 'dice_bce':
      o['lambda_ce'] = o.pop('lambda_bce', 1.0)
      y = y.double()
    loss = ml.DiceCELoss(to_onehot_y=onehot, weight=weight, **act, **o)
  elif kind == 'tversky':
    loss = ml.TverskyLoss(to_onehot_y=onehot, **act, **o)
  elif kind == 'generalized_dice':
    loss = ml.GeneralizedDiceLoss(to_onehot_y=onehot, **act, **o)
  return float(loss(x, y))


def main():
  if sys.argv[1:2] == ['--jax']:
    run_jax(sys.argv[2], sys.argv[3])
    return
  all_cases = cases()
  arrays, reference = {}, []
  for i, case in enumerate(all_cases):
    logits, labels, target = make_data(case, seed=i)
    arrays[f'l{i}'], arrays[f'y{i}'] = logits, labels
    arrays[f't{i}'] = target if target is not None else np.zeros(())
    reference.append(run_monai(case, logits, labels, target))
  with tempfile.TemporaryDirectory() as tmp:
    path_in = os.path.join(tmp, 'in.npz')
    path_out = os.path.join(tmp, 'out.npy')
    np.savez(path_in, cases=json.dumps(all_cases), **arrays)
    subprocess.run([JAX_PYTHON, __file__, '--jax', path_in, path_out], check=True, cwd=ROOT)
    ours = np.load(path_out)
  reference = np.asarray(reference)
  diff = np.abs(ours - reference)
  by_kind = {}
  for case, d in zip(all_cases, diff):
    by_kind.setdefault(case['kind'], []).append(d)
  for kind, ds in by_kind.items():
    print(f'{kind:18s} cases={len(ds):3d} max|diff|={max(ds):.2e}')
  worst = int(np.argmax(diff))
  print(
    f'overall: {len(all_cases)} cases, max|diff|={diff.max():.2e} '
    f'(case {worst}: {all_cases[worst]}, ours={ours[worst]:.7f}, '
    f'monai={reference[worst]:.7f})'
  )


if __name__ == '__main__':
  main()
