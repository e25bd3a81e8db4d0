"""The inputs of the predict command: found, grouped into cases, checked, read.

    cases = list_inputs('scans/', ndim=3, num_channels=2)
    check_inputs(cases, ndim=3, num_channels=2, target_spacing=(3, 1.5, 1.5),
                 num_classes=3)            # one error naming every bad file
    image, spacing = read_image(cases[0], ndim=3)   # canonical [D, H, W, C]

A folder of files in nnU-Net's naming (`<case>_0000.nii.gz`, `<case>_0001.nii.gz`,
...: one file per channel, a 4-digit channel index) is grouped into one case per
`<case>`, whose output is named `<case>.nii.gz`, as nnU-Net names it. It is
recognised when a `dataset.json` sits in the folder above (an nnU-Net data set's
`imagesTs/`), or when every file carries such a suffix and each case holds
exactly the channels 0 .. C-1 the model takes. Any other file is a case of its
own. The channel files of a case must agree in shape, spacing, direction and
origin (`check_inputs`).

`check_output` (file names only, before anything else) refuses an output
folder that is a file, or that holds an input (the input folder itself, or an
input file's folder; real paths are compared): the masks and overlays would
overwrite the inputs. `list_inputs` refuses two inputs whose outputs would
share a name (`a.png` and `a.jpg`, or `a.jpg` and `a.jpeg`, all give `a.png`),
naming them: outputs are named after the input's name without its extension,
as nnU-Net names its `<case>.nii.gz`, rather than keep the extension.

`check_inputs` reads headers, and the values of the files stored as floating
point (float NIfTI, 'F' mode TIFF; no other file can hold NaN or +-Inf): with
`nonfinite='error'` (the run's `config.data.nonfinite`) it names each file
holding NaN or +-Inf values with their count, before any case is predicted;
with 'zero' `read_image` replaces them by 0 (before normalisation). Such
files are thus read twice: once here, once to be predicted. It also plans
the host memory of each volume: the image resampled to the run's target
spacing, and the class probabilities at that spacing and at the input's own
(`geometry.resampled_bytes`; for an ensemble, the largest run's, as runs are
predicted one at a time), plus an ensemble's running average of the
probabilities (float32 [*spatial, K] on the input's grid) and the float16 copy
`--save_probabilities` writes. It names every case that does not fit in the
memory available now, with the size of each part and what lowers it. With
prefetching (`check_inputs(prefetch=True)`, as `predict.run` predicts), each
case's peak also counts its neighbours in flight: the next case, read and
resampled ahead, and the case before, being written; the error names them with
their sizes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from absl import logging
import numpy as np

from unet_jax.data import folder as folder_lib
from unet_jax.data import geometry
from unet_jax.data import nnunet

EXTENSIONS = {2: ('.png', '.tif', '.tiff', '.jpg', '.jpeg'), 3: ('.nii', '.nii.gz')}
_CHANNEL_SUFFIX = re.compile(r'^(?P<case>.+)_(?P<channel>\d{4})$')
_MODE_CHANNELS = {
  '1': 1,
  'L': 1,
  'LA': 1,
  'I': 1,
  'F': 1,
  'I;16': 1,
  'I;16B': 1,
  'I;16L': 1,
  'RGB': 3,
  'P': 3,
  'RGBA': 3,
  'CMYK': 3,
  'YCbCr': 3,
  'LAB': 3,
  'HSV': 3,
}  # What folder.read_image gives.


@dataclasses.dataclass(frozen=True)
class Case:
  """One case to predict: its input file(s), in channel order, and its name.

  Attributes:
    paths: one file, or one per channel (nnU-Net's naming).
    stem: what the outputs are named after.
    ext: the inputs' extension ('.nii.gz', '.png', ...).
  """

  paths: tuple[str, ...]
  stem: str
  ext: str

  @property
  def path(self) -> str:
    """The first (or only) file: the reference grid of the written mask."""
    return self.paths[0]


def split_extension(name: str) -> tuple[str, str]:
  if name.lower().endswith('.nii.gz'):
    return name[:-7], '.nii.gz'
  stem, ext = os.path.splitext(name)
  return stem, ext.lower()


def _files(path: str, ndim: int) -> tuple[str, list[tuple[str, str, str]]]:
  """(folder, [(full path, stem, ext)] of the inputs); ValueError for wrong kinds."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'--input {path!r} does not exist.')
  is_file = os.path.isfile(path)
  names = (
    [os.path.basename(path)]
    if is_file
    else sorted(n for n in os.listdir(path) if not n.startswith('.'))
  )
  folder = os.path.dirname(path) if is_file else path
  found, wrong = [], []
  for name in names:
    stem, ext = split_extension(name)
    full = os.path.join(folder, name)
    if folder_lib.dangling_link(full):
      wrong.append(folder_lib.dangling_link(full))
    elif ext in EXTENSIONS[ndim] and os.path.isfile(full):
      found.append((full, stem, ext))
    elif ext in EXTENSIONS[5 - ndim] or is_file:
      wrong.append(
        f'{full}: a {5 - ndim}D input ({ext or "no extension"}), but this run'
        f' is {ndim}D and takes {list(EXTENSIONS[ndim])}.'
      )
    else:
      logging.warning('Skipping %s: not an image or volume.', full)
  if wrong:
    raise ValueError('\n'.join(wrong))
  if not found:
    raise ValueError(f'{path}: no {list(EXTENSIONS[ndim])} files to predict.')
  return folder, found


def _channel_groups(found, num_channels: int, *, strict: bool):
  """{case: [paths by channel]} in nnU-Net's naming, or None when the files do
  not follow it. `strict` (a dataset.json above): a missing channel is an error."""
  groups: dict[str, dict[int, str]] = {}
  for full, stem, _ in found:
    match = _CHANNEL_SUFFIX.match(stem)
    if match is None:
      if strict:
        raise ValueError(
          f'{full}: not named <case>_<XXXX> (a 4-digit channel index), as the'
          ' images of an nnU-Net data set are.'
        )
      return None
    groups.setdefault(match['case'], {})[int(match['channel'])] = full
  expected = set(range(num_channels))
  bad = {case: sorted(ch) for case, ch in groups.items() if set(ch) != expected}
  if bad and not strict:
    return None
  if bad:
    raise ValueError(
      f'{len(bad)} case(s) lack the channel files the model takes'
      f' (_0000 .. _{num_channels - 1:04d}):\n  '
      + '\n  '.join(f'{case}: has channels {ch}' for case, ch in sorted(bad.items()))
    )
  return {case: [ch[c] for c in range(num_channels)] for case, ch in groups.items()}


def list_inputs(path: str, *, ndim: int, num_channels: int = 1) -> list[Case]:
  """The cases to predict: `path` itself, or the files of the folder `path`,
  grouped by case where they follow nnU-Net's naming (module docstring)."""
  folder, found = _files(path, ndim)
  above = os.path.dirname(os.path.abspath(folder))
  strict = os.path.isdir(path) and nnunet.is_dataset(above)
  groups = _channel_groups(found, num_channels, strict=strict)
  ext = found[0][2]
  if groups is not None:
    exts = {e for _, _, e in found}
    if len(exts) > 1:
      raise ValueError(f'{folder}: channel files with different extensions {sorted(exts)}.')
    return [Case(tuple(paths), case, ext) for case, paths in sorted(groups.items())]
  cases = [Case((full,), stem, e) for full, stem, e in found]
  _check_output_names(cases)
  return cases


def _check_output_names(cases: list[Case]) -> None:
  """Refuses inputs whose outputs would share a name (`a.png` and `a.jpg` both
  give `a.png`, `a.npz` and `overlays/a.png`), naming them. Names that differ
  only in case count as one: they are one file on macOS and Windows."""
  by_name: dict[str, list[Case]] = {}
  for case in cases:
    by_name.setdefault(case.stem.casefold(), []).append(case)
  shared = {k: v for k, v in by_name.items() if len(v) > 1}
  if shared:
    raise ValueError(
      f'{len(shared)} output name(s) would be written by several inputs (predictions'
      ' would be lost; rename the inputs):\n  '
      + '\n  '.join(
        f'{group[0].stem}: {", ".join(c.path for c in group)}' for group in shared.values()
      )
    )


def check_output(input_path: str, output: str) -> None:
  """Raises ValueError, naming both, when `output` cannot take the predictions of
  `input_path`: it is a file (or holds a file `overlays`), or it is the folder of
  an input (the input folder, an input file's folder, or the folder a linked
  input lives in; real paths are compared), whose files the masks and overlays
  would overwrite. Reads file names only: call it before anything else."""
  overlays = os.path.join(output, 'overlays')
  for path in (output, overlays):
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(
        f'--output {path!r} is a file; give a folder (it is created if missing).'
      )
  if not os.path.exists(input_path):
    return  # `list_inputs` names it.
  targets = {os.path.realpath(output), os.path.realpath(overlays)}
  for path in _input_files(input_path):
    folders = {
      os.path.realpath(os.path.dirname(os.path.abspath(path))),
      os.path.dirname(os.path.realpath(path)),
    }
    if folders & targets:
      raise ValueError(
        f'--output {output!r} holds the inputs of --input {input_path!r} ({path}):'
        ' predictions would overwrite them; give another output folder.'
      )


def _input_files(input_path: str) -> list[str]:
  """`input_path` itself, or the visible images and volumes of the folder."""
  if not os.path.isdir(input_path):
    return [input_path]
  known = EXTENSIONS[2] + EXTENSIONS[3]
  return [
    os.path.join(input_path, name)
    for name in sorted(os.listdir(input_path))
    if not name.startswith('.') and split_extension(name)[1] in known
  ]


def probe(path: str, ndim: int) -> tuple[tuple[int, ...], int, tuple[float, ...] | None]:
  """(canonical spatial shape, channels, spacing) from a file's header."""
  if ndim == 2:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(path) as im:
      if getattr(im, 'n_frames', 1) > 1:
        raise ValueError('a multi-page image (a volume), but this run is 2D')
      if im.mode not in _MODE_CHANNELS:
        raise ValueError(f'image mode {im.mode} is not supported')
      return (im.size[1], im.size[0]), _MODE_CHANNELS[im.mode], None
  import nibabel  # pylint: disable=g-import-not-at-top

  image = nibabel.load(path)
  shape = image.shape
  if len(shape) not in (3, 4):
    raise ValueError(f'a {len(shape)}D array {shape}, but this run takes 3D volumes')
  grid, spacing = geometry.canonical_grid(shape, image.header.get_zooms()[:3], image.affine)
  return grid, shape[3] if len(shape) == 4 else 1, spacing


def available_bytes() -> int | None:
  """Host memory available now (Linux: MemAvailable), or None if unknown."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _memory_plan(shape, spacing, *, target_spacings, channels, classes, save) -> dict:
  """Peak host bytes of one case, by part (`check_inputs`).

  'run': the largest of one run's resampled image and probabilities, at its
  target spacing and on the input's grid (`geometry.resampled_bytes`);
  'average': the ensemble's running average, float32 [*shape, K], with
  several runs; 'saved': the float16 copy `--save_probabilities` writes;
  'probabilities': float32 [*shape, K]; 'finer': whether a run's target
  spacing makes the volume larger; 'needed': the peak, the larger of the two
  phases: predicting (one run, beside the running average) and writing (the
  mean probabilities, their float16 copy and the int32 label map).

  With prefetching (`predict.run(prefetch=True)`), a case is also held while
  it is read ahead and while it is written behind another case's prediction:
  'ahead': the image (float32 [*shape, C]) and the image resampled to the
  first run's target spacing (the read stage's output); 'behind': the image
  (for the overlay), the mean probabilities and the ensemble's running
  average, beside the larger of the last run's probabilities at its target
  spacing (while they are resampled back) and the float16 copy with the label
  map (while they are written).
  """
  ones = (1.0,) * len(shape)
  runs, finer, at_target = [], False, []
  for given in target_spacings:
    target = given if (given and spacing) else spacing or ones
    runs.append(
      geometry.resampled_bytes(
        shape, spacing or target, target, channels=channels, classes=classes
      )
    )
    resampled = geometry.resampled_shape(shape, spacing or target, target)
    finer = finer or math.prod(resampled) > math.prod(shape)
    at_target.append(math.prod(resampled) if (given and spacing) else 0)
  voxels = math.prod(shape)
  plan = {
    'run': max(runs),
    'average': 4 * voxels * classes if len(target_spacings) > 1 else 0,
    'saved': 2 * voxels * classes if save else 0,
    'probabilities': 4 * voxels * classes,
    'finer': finer,
  }
  writing = plan['probabilities'] + plan['saved'] + 4 * voxels if save else 0
  plan['needed'] = max(plan['run'] + plan['average'], writing)
  plan['writing_larger'] = writing > plan['run'] + plan['average']
  image = 4 * voxels * channels
  plan['ahead'] = image + 4 * at_target[0] * channels
  plan['behind'] = (
    image
    + plan['probabilities']
    + plan['average']
    + max(4 * at_target[-1] * classes, plan['saved'] + 4 * voxels)
  )
  return plan


def _may_hold_nonfinite(path: str, ndim: int) -> bool:
  """Whether a file stores floating-point values (a 'F' mode image, a float NIfTI):
  only those can hold NaN or +-Inf. Reads the header."""
  if ndim == 2:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(path) as im:
      return im.mode == 'F'
  import nibabel  # pylint: disable=g-import-not-at-top

  return nibabel.load(path).get_data_dtype().kind in 'fc'


def _nonfinite_problem(path: str, count: int, size: int) -> str:
  return (
    f'{path}: {count} non-finite value(s) (NaN or Inf) of {size}; set'
    " config.data.nonfinite='zero' (or --nonfinite=zero) to predict them as 0."
  )


def _nonfinite_errors(case: Case, *, ndim: int) -> list[str]:
  """The files of a case holding NaN or +-Inf values; reads those stored as floats."""
  errors = []
  for path in case.paths:
    if _may_hold_nonfinite(path, ndim):
      image, _ = folder_lib.read_image(path, ndim=ndim)
      count = folder_lib.count_nonfinite(image)
      if count:
        errors.append(_nonfinite_problem(path, count, image.size))
      del image
  return errors


def _channel_grid_errors(case: Case) -> list[str]:
  """Each channel file of a 3D case whose voxel grid (spacing, direction, origin)
  differs from the first's (`geometry.grid_differences`, on the header affines)."""
  import nibabel  # pylint: disable=g-import-not-at-top

  first = nibabel.load(case.path).affine
  errors = []
  for path in case.paths[1:]:
    differences = geometry.grid_differences(first, nibabel.load(path).affine)
    if differences:
      errors.append(
        f'{path}: grid differs from that of {case.path}: {"; ".join(differences)}.'
      )
  return errors


def _case_errors(case: Case, *, ndim, num_channels, target_spacings, num_classes, save):
  """The problems of one case (header reads only), its shape and its memory plan."""
  shapes, channels, spacing = set(), 0, None
  for path in case.paths:
    try:
      shape, count, spacing_i = probe(path, ndim)
    except Exception as e:  # pylint: disable=broad-except
      return [f'{path}: unreadable or not a {ndim}D input ({e}).'], None, {}
    shapes.add(shape)
    channels += count
    spacing = spacing or spacing_i
  errors = []
  if len(shapes) > 1:
    errors.append(
      f'{case.path}: the channel files of {case.stem} differ in shape {shapes}.'
    )
  elif ndim == 3 and len(case.paths) > 1:
    errors += _channel_grid_errors(case)
  if channels != num_channels:
    errors.append(
      f'{case.path}: {channels} channel(s), but the model takes {num_channels}.'
    )
  shape = next(iter(shapes))
  plan = _memory_plan(
    shape,
    spacing,
    target_spacings=target_spacings,
    channels=num_channels,
    classes=num_classes,
    save=save,
  )
  return errors, shape, plan


def _gib(size: int) -> str:
  return f'{size / 2**30:.3g} GiB'


def _memory_error(case: Case, shape, plan: dict, *, target_spacings, memory, classes):
  """Why a case does not fit in `memory` bytes, by part, and what lowers it.

  With prefetching, `plan['in_flight']` lists (what, path, bytes) of the
  neighbouring cases held beside it (`_with_neighbours`)."""
  in_flight = plan.get('in_flight', [])
  needed = plan['needed'] + sum(size for _, _, size in in_flight)
  resampled = plan['run'] - plan['probabilities']
  targets = ' / '.join(map(str, sorted({tuple(t) for t in target_spacings if t})))
  kind = 'volume' if len(shape) == 3 else 'image'
  parts = [
    f'its {classes} class probabilities on its own grid {tuple(shape)} take'
    f' {_gib(plan["probabilities"])} at float32',
    f'the {kind} and its probabilities at the target spacing {targets or "(its own)"}'
    f' take {_gib(resampled)}',
  ]
  lower = [
    'predict on a machine with more memory',
    f'crop the {kind} to the region to segment',
  ]
  if plan['average']:
    parts.append(
      f'the ensemble holds the running average of its runs ({_gib(plan["average"])},'
      ' whatever their number: one run is predicted at a time)'
    )
  if plan['saved']:
    parts.append(f'--save_probabilities adds a float16 copy ({_gib(plan["saved"])})')
  for what, path, size in in_flight:
    parts.append(f'the {what} ({path}) holds {_gib(size)} beside it')
  if in_flight:
    lower.append('predict without prefetching (--noprefetch)')
  if plan['writing_larger']:
    lower.append('leave out --save_probabilities')
  if plan['finer']:
    lower.append(
      'use runs trained at a coarser target spacing (a run predicts at the spacing it'
      " was trained at, finer than this volume's own)"
    )
  return (
    f'{case.path}: predicting it needs {_gib(needed)} of host memory, but'
    f' {_gib(memory)} are available: {"; ".join(parts)}. To lower it: '
    + ', or '.join(lower)
    + '.'
  )


def check_inputs(
  cases: list[Case],
  *,
  ndim: int,
  num_channels: int,
  target_spacing=None,
  num_classes: int = 2,
  memory: int | None = None,
  target_spacings=None,
  save_probabilities: bool = False,
  nonfinite: str = 'error',
  prefetch: bool = False,
) -> None:
  """Raises one ValueError naming every case the run(s) cannot predict.

  A case cannot be predicted when it is unreadable, of the wrong kind or
  channel count, holds NaN or +-Inf values (with `nonfinite='error'`: each
  file named with their count; only files stored as floating point can, and
  only those are read whole here), or too large for the host memory
  (`_memory_plan`): one run's
  volume and probabilities at its target spacing and on the input's grid beside
  the running average of an ensemble's probabilities (float32 [*spatial, K]);
  or, with `save_probabilities`, the mean probabilities, their float16 copy and
  the label map, whichever is larger.

  Args:
    cases: from `list_inputs`.
    ndim: 2 or 3.
    num_channels: the channels the model(s) take.
    target_spacing: the run's target spacing (3D), or None.
    num_classes: K, the class probabilities per voxel (at least 2).
    memory: bytes available (default: the host memory available now).
    target_spacings: instead of `target_spacing`, one per run of an ensemble
      (each None or () for a run without one).
    save_probabilities: the probabilities are written too.
    nonfinite: 'error' or 'zero' (`read_image` replaces them by 0).
    prefetch: the cases are predicted with prefetching (`predict.run`): each
      case's memory also counts the next case, read ahead, and the case before,
      written meanwhile (`_memory_plan`'s 'ahead' and 'behind'); the error names
      them and their sizes.
  """
  if target_spacing is not None and target_spacings is not None:
    raise ValueError('Give target_spacing (one run) or target_spacings, not both.')
  if target_spacings is None:
    target_spacings = [target_spacing]
  target_spacings = [tuple(t) if t else None for t in target_spacings] or [None]
  memory = available_bytes() if memory is None else memory
  folder_lib.check_nonfinite_option(nonfinite)
  options = dict(ndim=ndim, num_channels=num_channels, num_classes=num_classes)
  options.update(target_spacings=target_spacings, save=save_probabilities)
  checked = [_case_errors(case, **options) for case in cases]
  if prefetch:
    _with_neighbours(cases, [plan for _, _, plan in checked])
  errors = []
  for case, (problems, shape, plan) in zip(cases, checked):
    errors += problems
    if not problems and nonfinite == 'error':
      problems = _nonfinite_errors(case, ndim=ndim)
      errors += problems
    in_flight = sum(size for _, _, size in plan.get('in_flight', []))
    if not problems and memory and plan['needed'] + in_flight > memory:
      errors.append(
        _memory_error(
          case,
          shape,
          plan,
          target_spacings=target_spacings,
          memory=memory,
          classes=num_classes,
        )
      )
  if errors:
    raise ValueError(
      f'{len(errors)} input(s) cannot be predicted:\n  ' + '\n  '.join(errors)
    )


def _with_neighbours(cases: list[Case], plans: list[dict]) -> None:
  """Adds to each plan the neighbours prefetching holds beside its prediction:
  the next case, read ahead ('ahead'), and the case before, written behind
  ('behind'); as `plan['in_flight']`, [(what, path, bytes)]."""
  for i, plan in enumerate(plans):
    if not plan:
      continue
    plan['in_flight'] = []
    if i + 1 < len(plans) and plans[i + 1]:
      plan['in_flight'].append(
        ('next case, read ahead', cases[i + 1].path, plans[i + 1]['ahead'])
      )
    if i > 0 and plans[i - 1]:
      plan['in_flight'].append(
        ('case before, written meanwhile', cases[i - 1].path, plans[i - 1]['behind'])
      )


def read_image(
  case: Case, *, ndim: int, nonfinite: str = 'error'
) -> tuple[np.ndarray, tuple[float, ...] | None]:
  """A case's image, float32 [*spatial, C] (NIfTI: canonical), and its spacing.

  NaN and +-Inf values: 'error' raises a ValueError naming the file and their
  count; 'zero' replaces them by 0 (logged), before any normalisation.
  """
  folder_lib.check_nonfinite_option(nonfinite)
  parts, spacing = [], None
  for path in case.paths:
    image, spacing_i = folder_lib.read_image(path, ndim=ndim)
    if nonfinite == 'zero':
      image = folder_lib.zero_nonfinite(image, path=path)
    elif count := folder_lib.count_nonfinite(image):
      raise ValueError(_nonfinite_problem(path, count, image.size))
    parts.append(image)
    spacing = spacing or spacing_i
  return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)), spacing
