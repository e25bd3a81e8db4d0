r"""Whole-image prediction on the CPU: unet_jax against MONAI, stage by stage.

The same network on both sides: `unet_jax.models.UNet` (BatchNorm, transposed
upsampling) and `benchmarks/torch_reference.py`'s PyTorch copy of it, with the
JAX weights copied in (random weights and random BatchNorm statistics from one
seed; the JAX worker writes them in PyTorch's layout). Each case checks that the
two networks agree on one patch, and compares the whole-image outputs.

Cases (overlap 0.5, Gaussian blending with sigma = patch / 8, 4 patches a batch,
float32, 2 threads on both sides):

* `2d`: a 768 x 768 image, 256 x 256 patches: this project's
  `sliding_window_predict` against MONAI's `sliding_window_inference`, logits.
* `3d`: a 144 x 160 x 144 volume, 64^3 patches, the same.
* `3d_resample`: end to end from a NIfTI file in LIA voxel order (axes permuted
  and two flipped: not RAS) of 180 x 72 x 200 voxels at 0.8 x 2.0 x 0.8 mm,
  predicted at 1 mm (144 x 160 x 144 voxels) and written back as a mask on the
  file's grid.
  unet_jax: the functions `predict.py` runs for a case (`inputs.read_image`:
  reading and canonical orientation; `geometry.resample_image`, cubic spline,
  nnU-Net's order 3; the z-score; `sliding_window_predict` to probabilities;
  `geometry.resample_probabilities`, linear; argmax; `geometry.write_like`),
  without the overlay PNG. MONAI: `LoadImaged`, `EnsureChannelFirstd`,
  `Orientationd('RAS')`, `Spacingd` (bilinear, its default), `NormalizeIntensityd`,
  `sliding_window_inference`, softmax, `Invertd` (bilinear), argmax, nibabel save.
  The `linear` variant of the JAX side resamples the image linearly too
  (order 1): like for like with MONAI's interpolation.

Stages: read (and orientation), resample, normalise, network, blending, resample
back, argmax + write. "network" is the patches alone through the compiled
network (timed apart, once per process); "blending" is the rest of the sliding
window's time (cutting patches, weighting, adding, dividing, softmax).

Method: each side runs in fresh processes: one warm-up prediction (it compiles),
the network-only pass, then `--runs` timed predictions (the process reports
their median). The JAX variants (`--variants`) share one process and take turns
run by run (A/B side by side): `folded` (the `Predictor` path: BatchNorm folded
into the convolutions, `inference/folding.py`), `plain` (BatchNorm applied as
trained) and, for `3d_resample` only, `linear` (folded, image resampled
linearly). The JAX and MONAI processes alternate (JAX first in even rounds,
MONAI first in odd ones) for `--repeats` rounds; tables show the median over
rounds. `uptime` is printed after every process and recorded in the JSON.
`--kernels` sets the JAX network's kernel policy: 'auto' (the default, what
`Predictor` uses) or 'xla' (XLA's convolutions).

    # The table in RESULTS.md (about 20 minutes on 2 quiet cores):
    .venv/bin/python benchmarks/predict_speed.py \
        --torch-python=/work/torch_venv/bin/python --cases=2d,3d \
        --variants=folded,plain --repeats=2 --runs=2
    .venv/bin/python benchmarks/predict_speed.py \
        --torch-python=/work/torch_venv/bin/python --cases=3d_resample \
        --variants=folded,linear --repeats=2 --runs=2
    # Smoke run (tests use it): tiny sizes; JAX only without torch.
    .venv/bin/python benchmarks/predict_speed.py --smoke --out=/tmp/ps

The PyTorch side needs torch and monai in their own interpreter (`--torch-python`);
unet_jax's venv never imports torch. Without them the MONAI columns say
'skipped: torch not installed'. Writes `<out>/predict_speed.json` and prints a
markdown table.
"""

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
# This tree's unet_jax, not an installed one.
sys.path.insert(0, str(ROOT))

NET = dict(num_classes=2, in_channels=1, upsample='transpose')
CASES = {
  '2d': dict(
    kind='window', ndim=2, shape=(768, 768), patch=(256, 256), features=32, depth=4
  ),
  '3d': dict(
    kind='window', ndim=3, shape=(144, 160, 144), patch=(64, 64, 64), features=16, depth=3
  ),
  '3d_resample': dict(
    kind='resample',
    ndim=3,
    # Canonical (S, A, R) shape and spacing of the file; 1 mm target: 144 x 160 x 144.
    shape=(72, 200, 180),
    spacing=(2.0, 0.8, 0.8),
    target=(1.0, 1.0, 1.0),
    patch=(64, 64, 64),
    features=16,
    depth=3,
  ),
}
SMOKE_CASES = {
  '2d': dict(kind='window', ndim=2, shape=(48, 40), patch=(32, 32), features=4, depth=2),
  '3d': dict(
    kind='window', ndim=3, shape=(20, 24, 16), patch=(16, 16, 16), features=2, depth=2
  ),
  '3d_resample': dict(
    kind='resample',
    ndim=3,
    shape=(10, 24, 20),
    spacing=(2.0, 0.8, 0.8),
    target=(1.0, 1.0, 1.0),
    patch=(16, 16, 16),
    features=2,
    depth=2,
  ),
}
OVERLAP, BATCH, SIGMA = 0.5, 4, 0.125
SKIPPED = 'skipped: torch not installed'


def _median(values):
  return float(statistics.median(values))


def test_image(shape, seed=0):
  """A smooth random image with bright blobs: float32 [*shape]."""
  rng = np.random.default_rng(seed)
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  x = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3)
  return (100 + 400 * x + 5 * rng.standard_normal(shape)).astype(np.float32)


def nifti_affine(spacing):
  """The affine of an LIA file: voxel axes (i, j, k) run to Left, Inferior, Anterior.

  `spacing` is the canonical (S, A, R) one; i is R reversed, j is S reversed, k is
  A: a permuted and flipped voxel order, not RAS.
  """
  s, a, r = spacing
  affine = np.zeros((4, 4))
  affine[0, 0] = -r  # i -> -x (Left)
  affine[2, 1] = -s  # j -> -z (Inferior)
  affine[1, 2] = a  # k -> +y (Anterior)
  affine[:3, 3] = (40.0, -30.0, 25.0)
  affine[3, 3] = 1
  return affine


def write_nifti(path, case):
  """The case's volume as a NIfTI file in the affine's voxel order."""
  import nibabel  # pylint: disable=g-import-not-at-top

  canonical = test_image(case['shape'])  # (S, A, R)
  # File voxel (i, j, k) = (L, I, A): R reversed, S reversed, A.
  stored = np.flip(np.transpose(canonical, (2, 0, 1)), axis=(0, 1))
  image = nibabel.Nifti1Image(np.ascontiguousarray(stored), nifti_affine(case['spacing']))
  nibabel.save(image, path)


# ---------------------------------------------------------------------------------
# The JAX side.


def jax_variables(model, case, seed=0):
  """Random parameters and BatchNorm statistics from `seed` (numpy, no XLA init)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jnp.zeros((1, *case['patch'], NET['in_channels']), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
    if name.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


def torch_state(variables, depth):
  """The JAX variables as `torch_reference.UNet`'s state dict (numpy arrays)."""
  params, stats = variables['params'], variables['batch_stats']
  out = {}

  def conv(kernel):  # [*k, I, O] -> [O, I, *k]
    k = np.asarray(kernel)
    return np.ascontiguousarray(np.moveaxis(k, (-1, -2), (0, 1)))

  def block(prefix, name):
    for i, index in ((0, 0), (1, 3)):
      out[f'{prefix}.{index}.weight'] = conv(params[name][f'conv{i}']['kernel'])
      norm, bn = params[name][f'norm{i}'], stats[name][f'norm{i}']
      out[f'{prefix}.{index + 1}.weight'] = np.asarray(norm['scale'])
      out[f'{prefix}.{index + 1}.bias'] = np.asarray(norm['bias'])
      out[f'{prefix}.{index + 1}.running_mean'] = np.asarray(bn['mean'])
      out[f'{prefix}.{index + 1}.running_var'] = np.asarray(bn['var'])

  for level in range(depth):
    block(f'encoders.{level}', f'encoder{level}')
  block('bottleneck', 'bottleneck')
  for k, level in enumerate(reversed(range(depth))):
    up = params[f'upsample{level}']['conv']
    kernel = np.asarray(up['kernel'])  # [*s, I, O]; PyTorch's is [I, O, *s], flipped.
    ndim = kernel.ndim - 2
    kernel = np.flip(kernel, axis=tuple(range(ndim)))
    out[f'ups.{k}.conv.weight'] = np.ascontiguousarray(
      np.moveaxis(kernel, (-2, -1), (0, 1))
    )
    out[f'ups.{k}.conv.bias'] = np.asarray(up['bias'])
    block(f'decoders.{k}', f'decoder{level}')
  out['head.weight'] = conv(params['head']['kernel'])
  out['head.bias'] = np.asarray(params['head']['bias'])
  return out


def _jax_model(case, variant):
  """(apply, variables, model): the compiled batch function of a variant."""
  import jax  # pylint: disable=g-import-not-at-top

  from unet_jax import models  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import folding  # pylint: disable=g-import-not-at-top

  model = models.UNet(
    num_classes=NET['num_classes'],
    features=case['features'],
    depth=case['depth'],
    upsample=NET['upsample'],
    norm='batch',
    kernels=case.get('kernels', 'auto'),
  )
  variables = jax_variables(model, case)
  run_model, run_vars = model, variables
  if variant != 'plain':
    run_model, run_vars = folding.fold_batchnorm(model, variables)
  run_vars = jax.device_put(run_vars)
  apply = jax.jit(lambda x: run_model.apply(run_vars, x, train=False))
  return apply, variables, model


def _network_only(apply, image, patch):
  """Seconds to run every patch of the image through `apply`, 4 at a time."""
  from unet_jax.inference import sliding_window  # pylint: disable=g-import-not-at-top

  positions = sliding_window.patch_positions(image.shape[:-1], patch, OVERLAP)
  batches = -(-len(positions) // BATCH)
  batch = np.zeros((BATCH, *patch, image.shape[-1]), np.float32)
  apply(batch).block_until_ready()
  start = time.perf_counter()
  out = None
  for _ in range(batches):
    out = apply(batch)
  out.block_until_ready()
  return time.perf_counter() - start


def _window_case(case, apply, image):
  from unet_jax.inference import sliding_window  # pylint: disable=g-import-not-at-top

  stages = {}
  start = time.perf_counter()
  out = sliding_window.sliding_window_predict(
    apply, image, patch_size=case['patch'], overlap=OVERLAP, batch_size=BATCH
  )
  stages['window'] = time.perf_counter() - start
  return out, stages, image.shape[:-1]


def _resample_case(case, apply, path, out_dir, variant):
  """The predict command's stages for one NIfTI case; (mask, seconds per stage)."""
  from unet_jax.data import geometry  # pylint: disable=g-import-not-at-top
  from unet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import inputs  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import predict  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import sliding_window  # pylint: disable=g-import-not-at-top

  stages, clock = {}, [time.perf_counter()]

  def lap(name):
    now = time.perf_counter()
    stages[name] = now - clock[0]
    clock[0] = now

  case_ = inputs.Case(paths=(path,), stem='case', ext='.nii.gz')
  image, spacing = inputs.read_image(case_, ndim=3)
  lap('read')
  shape = image.shape[:-1]
  order = 1 if variant == 'linear' else 3
  resampled = geometry.resample_image(image, spacing, case['target'], order=order)
  lap('resample')
  resampled = pipeline.normalise(resampled)
  lap('normalise')
  probs = sliding_window.sliding_window_predict(
    apply,
    resampled,
    patch_size=case['patch'],
    overlap=OVERLAP,
    batch_size=BATCH,
    output='probabilities',
  )
  lap('window')
  probs = geometry.resample_probabilities(probs, case['target'], spacing, shape=shape)
  lap('resample_back')
  mask = predict.labels_of(probs)
  predict.write_mask(case_, mask, out_dir)
  lap('write')
  return mask, stages, resampled.shape[:-1]


def jax_worker(case, variants, runs, workdir):
  """Times the variants in this process, alternating; writes the torch weights.

  Each variant: one warm-up prediction (it compiles), the network-only pass, then
  `runs` timed predictions, the variants taking turns (order reversed every run).
  """
  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  patch_in = rng.standard_normal((1, *case['patch'], 1)).astype(np.float32)
  np.save(os.path.join(workdir, 'patch_in.npy'), patch_in)
  if case['kind'] == 'window':
    image = test_image(case['shape'])[..., None]
    np.save(os.path.join(workdir, 'image.npy'), image)
  else:
    path = os.path.join(workdir, 'case.nii.gz')
    if not os.path.exists(path):
      write_nifti(path, case)
  runners, out, models = {}, {}, {}
  for variant in variants:
    kind = 'plain' if variant == 'plain' else 'folded'
    if kind not in models:
      models[kind] = _jax_model(case, kind)
    apply, variables, _ = models[kind]
    if variant == variants[0]:
      state = torch_state(variables, case['depth'])
      np.savez(os.path.join(workdir, 'weights.npz'), **state)
      np.save(os.path.join(workdir, 'patch_out.npy'), np.asarray(apply(patch_in)))
    if case['kind'] == 'window':
      run = functools.partial(_window_case, case, apply, image)
    else:
      out_dir = os.path.join(workdir, f'out_jax_{variant}')
      os.makedirs(out_dir, exist_ok=True)
      run = functools.partial(_resample_case, case, apply, path, out_dir, variant)
    start = time.perf_counter()
    result, _, grid = run()  # Warm-up: compiles.
    first = time.perf_counter() - start
    network = _network_only(apply, np.zeros((*grid, 1), np.float32), case['patch'])
    np.save(os.path.join(workdir, f'out_jax_{variant}.npy'), np.asarray(result))
    runners[variant] = run
    out[variant] = {'first_s': first, 'network_s': network, 'runs': []}
  for r in range(runs):
    for variant in variants if r % 2 == 0 else variants[::-1]:
      start = time.perf_counter()
      _, stages, _ = runners[variant]()
      out[variant]['runs'].append(dict(stages, total=time.perf_counter() - start))
  return {'variants': out, 'jax': jax.__version__}


# ---------------------------------------------------------------------------------
# The MONAI side (runs under --torch-python; never imports unet_jax).


def _torch_model(case, workdir):
  import torch  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(HERE))
  import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(2)
  model = torch_reference.UNet(
    ndim=case['ndim'],
    in_channels=NET['in_channels'],
    num_classes=NET['num_classes'],
    features=case['features'],
    depth=case['depth'],
    upsample=NET['upsample'],
  )
  state = {
    k: torch.from_numpy(v) for k, v in np.load(os.path.join(workdir, 'weights.npz')).items()
  }
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise RuntimeError(f'weights do not fit: missing {missing}, unexpected {unexpected}')
  return model.eval()


def _nchw(x, ndim):
  """[b, *spatial, c] -> [b, c, *spatial]."""
  return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def _monai_window(case, model, image):
  from monai.inferers import sliding_window_inference  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  x = torch.from_numpy(_nchw(image[None], case['ndim']))
  start = time.perf_counter()
  with torch.inference_mode():
    y = sliding_window_inference(
      x, case['patch'], BATCH, model, overlap=OVERLAP, mode='gaussian', sigma_scale=SIGMA
    )
  stages = {'window': time.perf_counter() - start}
  return np.moveaxis(y[0].numpy(), 0, -1), stages, image.shape[:-1]


def _monai_pipeline(case):
  from monai import transforms as mt  # pylint: disable=g-import-not-at-top

  # Canonical (S, A, R) target spacing -> MONAI's RAS order (R, A, S).
  pixdim = tuple(reversed(case['target']))
  return [
    ('read', mt.LoadImaged(keys='image', image_only=False)),
    ('read', mt.EnsureChannelFirstd(keys='image')),
    ('orient', mt.Orientationd(keys='image', axcodes='RAS')),
    ('resample', mt.Spacingd(keys='image', pixdim=pixdim, mode='bilinear')),
    ('normalise', mt.NormalizeIntensityd(keys='image', channel_wise=True)),
  ]


def _monai_resample(case, model, path, out_dir):
  from monai import transforms as mt  # pylint: disable=g-import-not-at-top
  from monai.inferers import sliding_window_inference  # pylint: disable=g-import-not-at-top
  import nibabel  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  steps = _monai_pipeline(case)
  pre = mt.Compose([t for _, t in steps])
  stages, clock = {}, [time.perf_counter()]

  def lap(name):
    now = time.perf_counter()
    stages[name] = stages.get(name, 0) + now - clock[0]
    clock[0] = now

  data = {'image': path}
  for name, transform in steps:
    data = transform(data)
    lap(name)
  with torch.inference_mode():
    logits = sliding_window_inference(
      data['image'][None],
      case['patch'],
      BATCH,
      model,
      overlap=OVERLAP,
      mode='gaussian',
      sigma_scale=SIGMA,
    )
    data['pred'] = torch.softmax(logits[0], dim=0)
  lap('window')
  inverted = mt.Invertd(
    keys='pred', transform=pre, orig_keys='image', nearest_interp=False
  )(data)
  lap('resample_back')
  mask = torch.argmax(inverted['pred'], dim=0).numpy().astype(np.uint8)
  affine = np.asarray(inverted['pred'].affine)
  nibabel.save(nibabel.Nifti1Image(mask, affine), os.path.join(out_dir, 'case.nii.gz'))
  lap('write')
  return mask, stages, tuple(data['image'].shape[1:])


def monai_worker(case, runs, workdir):
  import monai  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  model = _torch_model(case, workdir)
  patch_in = np.load(os.path.join(workdir, 'patch_in.npy'))
  with torch.inference_mode():
    patch_out = model(torch.from_numpy(_nchw(patch_in, case['ndim']))).numpy()
  reference = np.load(os.path.join(workdir, 'patch_out.npy'))
  patch_diff = float(np.abs(np.moveaxis(patch_out, 1, -1) - reference).max())
  if case['kind'] == 'window':
    image = np.load(os.path.join(workdir, 'image.npy'))
    run = lambda: _monai_window(case, model, image)
  else:
    out_dir = os.path.join(workdir, 'out_monai')
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(workdir, 'case.nii.gz')
    run = lambda: _monai_resample(case, model, path, out_dir)
  start = time.perf_counter()
  out, _, grid = run()
  first = time.perf_counter() - start
  network = _torch_network_only(case, model, grid)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    out, stages, _ = run()
    times.append(dict(stages, total=time.perf_counter() - start))
  np.save(os.path.join(workdir, 'out_monai.npy'), out)
  return {
    'first_s': first,
    'network_s': network,
    'runs': times,
    'patch_max_abs_diff': patch_diff,
    'patch_max_abs': float(np.abs(reference).max()),
    'torch': torch.__version__,
    'monai': monai.__version__,
    'threads': torch.get_num_threads(),
  }


def _torch_network_only(case, model, grid):
  import math  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top

  count = math.prod(
    math.ceil(max(g - p, 0) / int(p * (1 - OVERLAP))) + 1
    for g, p in zip(grid, case['patch'])
  )
  batch = torch.zeros((BATCH, 1, *case['patch']))
  with torch.inference_mode():
    model(batch)
    start = time.perf_counter()
    for _ in range(-(-count // BATCH)):
      model(batch)
  return time.perf_counter() - start


# ---------------------------------------------------------------------------------
# The driver.


def _run(cmd, timeout=3600):
  proc = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', OMP_NUM_THREADS='2'),
    timeout=timeout,
    check=False,
  )
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_available(torch_python):
  if not torch_python or not os.path.exists(torch_python):
    return False
  proc = subprocess.run(
    [torch_python, '-c', 'import torch, monai'], capture_output=True, check=False
  )
  return proc.returncode == 0


def _uptime():
  return subprocess.run(
    ['uptime'], capture_output=True, text=True, check=False
  ).stdout.strip()


def _cpu():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown'


def summarise(runs):
  """Median total and the median of each stage over a side's processes."""
  per_process = [
    {k: _median([r[k] for r in p['runs']]) for k in p['runs'][0]} for p in runs
  ]
  keys = per_process[0].keys()
  out = {k: _median([p[k] for p in per_process]) for k in keys}
  out['network'] = _median([p['network_s'] for p in runs])
  out['blending'] = max(out['window'] - out['network'], 0.0)
  out['totals'] = [p['total'] for p in per_process]
  out['first_s'] = _median([p['first_s'] for p in runs])
  return out


STAGES = (
  'read',
  'orient',
  'resample',
  'normalise',
  'network',
  'blending',
  'resample_back',
  'write',
)


def shares(summary):
  """Each stage's share of the total (read includes orientation on the JAX side)."""
  total = summary['total']
  return {s: summary[s] / total for s in STAGES if s in summary}


def _compare(workdir, case, variant):
  ours = np.load(os.path.join(workdir, f'out_jax_{variant}.npy'))
  theirs = np.load(os.path.join(workdir, 'out_monai.npy'))
  if case['kind'] == 'window':
    return {
      'max_abs_diff': float(np.abs(ours - theirs).max()),
      'max_abs': float(np.abs(ours).max()),
      'argmax_agreement': float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
    }
  return {}


def run_case(name, case, *, variants, have_torch, torch_python, runs, repeats):
  """Alternates fresh JAX and MONAI processes for `repeats` rounds; the summary."""
  result = {'case': case, 'uptime_before': _uptime(), 'sides': {}}
  sides = ['jax'] + (['monai'] if have_torch else [])
  raw = {s: [] for s in sides}
  with tempfile.TemporaryDirectory() as workdir:
    for r in range(repeats):
      # JAX first in even rounds (round 0 writes the weights the MONAI side loads).
      for side in sides if r % 2 == 0 else sides[::-1]:
        if side == 'monai':
          cmd = [torch_python, __file__, '--worker=monai']
        else:
          cmd = [
            sys.executable,
            __file__,
            '--worker=jax',
            f'--variants={",".join(variants)}',
          ]
        cmd += [f'--case={json.dumps(case)}', f'--runs={runs}', f'--workdir={workdir}']
        raw[side].append(_run(cmd))
        print(f'{name} round {r} {side}: {_uptime()}', flush=True)
      if have_torch and r == 0:
        result['agreement'] = _compare(workdir, case, variants[0])
    per_side = {v: [p['variants'][v] for p in raw['jax']] for v in variants}
    if have_torch:
      per_side['monai'] = raw['monai']
    for side, processes in per_side.items():
      result['sides'][side] = summarise(processes)
      result['sides'][side]['shares'] = shares(result['sides'][side])
    if have_torch:
      monai = raw['monai'][0]
      result['patch_max_abs_diff'] = monai['patch_max_abs_diff']
      result['patch_max_abs'] = monai['patch_max_abs']
      result['versions'] = {k: monai[k] for k in ('torch', 'monai', 'threads')}
      total = result['sides']['monai']['total']
      result['speedup_over_monai'] = {
        v: total / result['sides'][v]['total'] for v in variants
      }
  result['uptime_after'] = _uptime()
  return result


def markdown(report):
  lines = [
    '| case | side | total s | ' + ' | '.join(STAGES) + ' | speed vs MONAI |',
    '|---|---|---:|' + '---:|' * len(STAGES) + '---:|',
  ]
  for name, res in report['results'].items():
    for side, s in res['sides'].items():
      cells = [f'{100 * s["shares"][k]:.0f}%' if k in s['shares'] else '-' for k in STAGES]
      ratio = res.get('speedup_over_monai', {}).get(side)
      ratio = f'**{ratio:.2f}×**' if ratio else ('1' if side == 'monai' else SKIPPED)
      lines.append(
        f'| {name} | {side} | {s["total"]:.2f} | ' + ' | '.join(cells) + f' | {ratio} |'
      )
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--torch-python', default=None)
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--variants', default='folded,plain,linear')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument(
    '--kernels',
    default='auto',
    help="UNet(kernels=...) of the JAX side: 'auto' (the Predictor's default) or 'xla'.",
  )
  parser.add_argument('--out', default=str(HERE / 'out'))
  parser.add_argument('--worker', choices=('jax', 'monai'))

  parser.add_argument('--case')
  parser.add_argument('--workdir')
  args = parser.parse_args(argv)
  if args.worker:
    case = json.loads(args.case)
    for key in ('shape', 'patch', 'spacing', 'target'):
      if key in case:
        case[key] = tuple(case[key])
    if args.worker == 'jax':
      variants = args.variants.split(',')
      print(json.dumps(jax_worker(case, variants, args.runs, args.workdir)))
    else:
      print(json.dumps(monai_worker(case, args.runs, args.workdir)))
    return
  table = SMOKE_CASES if args.smoke else CASES
  names = args.cases.split(',')
  unknown = [n for n in names if n not in table]
  if unknown:
    parser.error(f'unknown --cases {unknown}; choose from {list(table)}')
  have_torch = torch_available(args.torch_python)
  report = {
    'cpu': _cpu(),
    'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    'torch': 'available' if have_torch else SKIPPED,
    'results': {},
  }
  if not have_torch:
    print(SKIPPED)
  for name in names:
    variants = [
      v
      for v in args.variants.split(',')
      if v != 'linear' or table[name]['kind'] == 'resample'
    ]
    report['results'][name] = run_case(
      name,
      dict(table[name], kernels=args.kernels),
      variants=variants,
      have_torch=have_torch,
      torch_python=args.torch_python,
      runs=1 if args.smoke else args.runs,
      repeats=1 if args.smoke else args.repeats,
    )
    print(f'{name}: done, {report["results"][name]["uptime_after"]}', flush=True)
    _write(report, args.out)  # After every case: a later case's timeout keeps these.
  print(markdown(report))


def _write(report: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'predict_speed.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(path + '.tmp', path)


if __name__ == '__main__':
  main()
