"""Data sets in nnU-Net v2's raw layout and in the Medical Segmentation Decathlon's.

Both are read as they are, recognised by the `dataset.json` at their root
(`is_dataset`). `read_layout` parses it and lists the files by name;
`check` reads every file once and returns the metadata a builder needs.

nnU-Net v2 (`dataset.json` has `channel_names` or `file_ending`)::

    Dataset001_BrainTumour/
    ├── dataset.json      # channel_names, labels, numTraining, file_ending
    ├── imagesTr/
    │   ├── BRATS_001_0000.nii.gz   # <case>_<XXXX><file_ending>, one per channel
    │   ├── BRATS_001_0001.nii.gz
    │   └── ...
    ├── imagesTs/          # optional: unlabelled test cases, same naming
    └── labelsTr/
        ├── BRATS_001.nii.gz        # <case><file_ending>
        └── ...

with, e.g., ``{"channel_names": {"0": "T2", "1": "ADC"}, "labels":
{"background": 0, "PZ": 1, "TZ": 2}, "numTraining": 32, "file_ending":
".nii.gz"}``. `channel_names` maps the 4-digit channel index to a name
(nnU-Net v2 also takes the older key `modality`); `labels` maps a name to its
value. A file ending of '.nii.gz' or '.nii' makes a 3D data set, '.png',
'.bmp', '.tif' or '.tiff' a 2D one. A 2D data set whose cases all have one
file (`_0000`) while `channel_names` names several (nnU-Net's RGB natural
images: "R", "G", "B") keeps the channels packed in that file; `check` counts
them. Region-based training (a label whose value is a list, or
`regions_class_order`) is refused.

Medical Segmentation Decathlon (`dataset.json` has `training` and
`modality`, no `file_ending`)::

    Task01_BrainTumour/
    ├── dataset.json      # modality, labels, numTraining, training, test
    ├── imagesTr/BRATS_001.nii.gz   # 4D: channels on the 4th axis (3D if one)
    ├── imagesTs/BRATS_485.nii.gz
    └── labelsTr/BRATS_001.nii.gz

with ``{"modality": {"0": "FLAIR", ...}, "labels": {"0": "background", "1":
"edema", ...}, "training": [{"image": "./imagesTr/BRATS_001.nii.gz",
"label": "./labelsTr/BRATS_001.nii.gz"}, ...], "test":
["./imagesTs/BRATS_485.nii.gz", ...]}``: `labels` maps value to name, the
other way round from nnU-Net. `Layout.labels` is name -> value for both.

Hidden files (names starting with '.', as macOS's '._' files) are ignored;
any other file is used or reported. Label values must be 0, 1, 2, ... with
none skipped (0 is the background).

Checks. Each raises one `folder.BadDataError` that lists every problem (see
`folder.raise_all`). `read_layout` (names only): a missing or malformed key of
`dataset.json` (named), an unsupported `file_ending`, region labels, a missing
channel file (its expected path named), a label without any image, an image
without a label, a channel index beyond `channel_names`, `numTraining`
disagreeing with the cases found (both numbers named), an MSD `training` or
`test` entry naming a missing file, a file in `imagesTr/`, `imagesTs/`
or `labelsTr/` that fits no case, and a symbolic link whose target does not
exist (both named). `check` (reads the NIfTI headers for the geometry, the
arrays of floating-point images for their NaN and +-Inf values and the label
arrays for their values; 2D files are read whole): unreadable files, a
channel count that differs from `dataset.json`'s, channels of a case or an
image and its label whose shape differs or whose spacing, direction or origin
differs (`geometry.grid_differences`: max |a - b| <= tolerance * max(1, max
|a|, max |b|) for each part; the one comparison of both layouts), images
holding NaN or +-Inf values (each named with their count; with
`nonfinite='zero'` logged instead, and replaced by 0 when the data set is
built), and label values absent from `dataset.json`'s labels.

Geometry is reported in (D, H, W) order of the closest canonical (RAS)
orientation, as `nibabel.as_closest_canonical` gives: the voxel axes are
permuted to (x=R, y=A, z=S) by `nibabel.io_orientation`, then reversed.

Normalisation by channel name (`normalization_of`, case-insensitive, after
nnU-Net's `channel_name_to_normalization_mapping`): 'CT' -> 'ct' (clip to the
foreground percentiles, one global z-score); 'noNorm' -> 'none';
'rescale_to_0_1' -> 'minmax'; 'rgb_to_0_1' -> 'rescale'; anything else
('zscore', 'T2', 'MRI', ...) -> 'zscore' (per image and channel).

Cross-validation folds (`splits`, `read_or_write_splits`): those of nnU-Net
v2's `splits_final.json`. The case ids are sorted, shuffled by
`np.random.RandomState(seed).shuffle` (seed 12345) and cut in order into
`num_folds` (5) folds, the first n % k one case larger: exactly
`sklearn.model_selection.KFold(num_folds, shuffle=True, random_state=seed)`.
"""

import collections
from collections.abc import Iterable
import dataclasses
import json
import math
import os
import re
import tempfile

from absl import logging
import numpy as np

from unet_jax import config as config_lib
from unet_jax.data import folder
from unet_jax.data import geometry as geometry_lib

FILE_ENDINGS = {'.nii.gz': 3, '.nii': 3, '.png': 2, '.bmp': 2, '.tif': 2, '.tiff': 2}
_CHANNEL_SUFFIX = re.compile(r'^(.+)_(\d{4})$')


@dataclasses.dataclass(frozen=True)
class Case:
  """One case: its id, image file(s) and label file (None for a test case).

  nnU-Net: one image path per channel, in channel order (one packed file for
  2D RGB). MSD: one path, a 4D NIfTI with the channels on its 4th axis.
  """

  id: str
  images: tuple[str, ...]
  label: str | None


@dataclasses.dataclass(frozen=True)
class Layout:
  """A data set as `dataset.json` and its file names describe it.

  Attributes:
    format: 'nnunet' or 'msd'.
    root: The absolute path of the folder holding `dataset.json`.
    ndim: 2 or 3.
    file_ending: '.nii.gz', '.png', ...
    channel_names: The name of each channel, in order ('CT', 'T2', ...).
    labels: Name -> value, background included.
    training: The labelled cases, sorted by id.
    test: The cases of `imagesTs/` (or MSD's `test`), sorted by id.
  """

  format: str
  root: str
  ndim: int
  file_ending: str
  channel_names: tuple[str, ...]
  labels: dict[str, int]
  training: tuple[Case, ...]
  test: tuple[Case, ...]


def is_dataset(root: str | os.PathLike) -> bool:
  """Whether `root` holds a `dataset.json` (nnU-Net v2 or MSD)."""
  return os.path.isfile(os.path.join(os.fspath(root), 'dataset.json'))


def _parse_channel(name: str, file_ending: str) -> tuple[str, int] | None:
  """('BRATS_001', 0) for 'BRATS_001_0000.nii.gz'; None if it does not fit."""
  if name.startswith('.') or not name.endswith(file_ending):
    return None
  match = _CHANNEL_SUFFIX.match(name[: -len(file_ending)])
  return (match.group(1), int(match.group(2))) if match else None


def case_id_of(path: str, *, file_ending: str, channel: bool) -> str | None:
  """The case id in a file name, or None if the name does not fit the pattern.

  Args:
    path: A file path; only its base name is looked at.
    file_ending: The data set's file ending, e.g. '.nii.gz'.
    channel: True for an nnU-Net image file, `<case>_<XXXX><file_ending>`
      (XXXX: a 4-digit channel index); False for a label (or MSD) file,
      `<case><file_ending>`.

  Returns:
    'BRATS_001' for 'BRATS_001_0000.nii.gz' (channel=True) or
    'BRATS_001.nii.gz' (channel=False); None for a hidden file, another
    ending, an empty id or (channel=True) a name without the channel index.
  """
  name = os.path.basename(path)
  if channel:
    parsed = _parse_channel(name, file_ending)
    return parsed[0] if parsed else None
  if name.startswith('.') or not name.endswith(file_ending):
    return None
  return name[: -len(file_ending)] or None


def normalization_of(channel_name: str) -> str:
  """nnU-Net's normalisation for a channel, by its name (case-insensitive).

  'CT' -> 'ct'; 'noNorm' -> 'none'; 'rescale_to_0_1' -> 'minmax';
  'rgb_to_0_1' -> 'rescale'; anything else -> 'zscore'
  (`config.CHANNEL_NORMALIZATIONS`, the one table the plan uses too).
  """
  return config_lib.CHANNEL_NORMALIZATIONS.get(channel_name.casefold(), 'zscore')


# ------------------------------------------------------------------ dataset.json


def _load_json(path: str):
  if not os.path.isfile(path):
    raise folder.BadDataError(f'{path}: missing; a data set needs its dataset.json.')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise folder.BadDataError(f'{path}: unreadable JSON ({type(e).__name__}: {e}).') from e


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _channel_names(spec: dict, key: str, where: str, errors: list) -> tuple | None:
  """`spec[key]` ({"0": "CT", ...}) as a tuple of names in channel order."""
  value = spec.get(key)
  if value is None:
    errors.append(f'{where}: missing key {key!r} ({{"0": "CT", ...}}).')
    return None
  expected = [str(i) for i in range(len(value))] if isinstance(value, dict) else []
  if not expected or sorted(value) != sorted(expected):
    errors.append(
      f'{where}: {key!r} must map the channel indices "0", "1", ... (none'
      f' skipped) to names, got {value!r}.'
    )
    return None
  names = tuple(value[k] for k in expected)
  if not all(isinstance(n, str) for n in names):
    errors.append(f'{where}: {key!r} must map to names (strings), got {value!r}.')
    return None
  return names


def _check_label_values(labels: dict, where: str, errors: list) -> dict | None:
  """`labels` (name -> value) if its values are 0, 1, 2, ... none skipped."""
  if not labels:
    errors.append(f"{where}: 'labels' is empty; it needs at least the background 0.")
    return None
  by_value = collections.defaultdict(list)
  for name, value in labels.items():
    by_value[value].append(name)
  problems = [
    f'value {v} is named {names}' for v, names in by_value.items() if len(names) > 1
  ]
  missing = sorted(set(range(max(by_value) + 1)) - set(by_value))
  if missing:
    problems.append(f'values {missing} are skipped (0 is the background)')
  if problems:
    errors.append(
      f"{where}: 'labels' must hold the values 0, 1, 2, ... once each: "
      + '; '.join(problems)
      + '.'
    )
    return None
  return labels


def _nnunet_labels(spec: dict, where: str, errors: list) -> dict | None:
  """nnU-Net's `labels` (name -> int); refuses region-based training."""
  value = spec.get('labels')
  refused = len(errors)
  if 'regions_class_order' in spec:
    errors.append(
      f"{where}: 'regions_class_order' means region-based training, which is"
      ' not supported; give each label one value.'
    )
  if not isinstance(value, dict):
    errors.append(
      f"{where}: {'missing key' if value is None else 'malformed key'} 'labels'"
      f' (an object of name -> value, e.g. {{"background": 0, "liver": 1}}).'
    )
    return None
  for name, v in value.items():
    if isinstance(v, (list, tuple)):
      errors.append(
        f'{where}: label {name!r} is the region {v}; region-based training is'
        ' not supported; give each label one value.'
      )
    elif not _is_int(v) or v < 0:
      errors.append(f"{where}: 'labels'[{name!r}] must be a non-negative int, got {v!r}.")
  if len(errors) > refused:
    return None
  return _check_label_values(dict(value), where, errors)


def _msd_labels(spec: dict, where: str, errors: list) -> dict | None:
  """MSD's `labels` ({"0": "background", ...}), turned to name -> value."""
  value = spec.get('labels')
  if not isinstance(value, dict):
    errors.append(
      f"{where}: {'missing key' if value is None else 'malformed key'} 'labels'"
      ' (an object of value -> name, e.g. {"0": "background", "1": "edema"}).'
    )
    return None
  labels = {}
  for key, name in value.items():
    if not (isinstance(key, str) and key.isdigit()) or not isinstance(name, str):
      errors.append(f"{where}: 'labels' entry {key!r}: {name!r} is not value: name.")
    elif name in labels:
      errors.append(f"{where}: 'labels' names {name!r} twice ({labels[name]}, {key}).")
    else:
      labels[name] = int(key)
  if len(labels) < len(value):
    return None
  return _check_label_values(labels, where, errors)


def _num_training(spec: dict, where: str, errors: list, *, required: bool) -> int | None:
  value = spec.get('numTraining')
  if value is None and not required:
    return None
  if not _is_int(value) or value < 0:
    got = '' if value is None else f'; got {value!r}'
    what = 'missing' if value is None else 'malformed'
    errors.append(
      f"{where}: {what} key 'numTraining' (the number of training cases, an int{got})."
    )
    return None
  return value


def _file_ending(spec: dict, where: str, errors: list) -> str | None:
  value = spec.get('file_ending')
  if value is None:
    errors.append(f'{where}: missing key \'file_ending\' (e.g. ".nii.gz" or ".png").')
  elif value not in FILE_ENDINGS:
    errors.append(
      f'{where}: unsupported file_ending {value!r}; supported:'
      f' {list(FILE_ENDINGS)} (3D NIfTI, 2D images).'
    )
  else:
    return value
  return None


# ------------------------------------------------------------------ read_layout


def read_layout(root: str | os.PathLike) -> Layout:
  """Parses `<root>/dataset.json` and lists the cases by file name only.

  No image is read (see `check`). nnU-Net v2 is recognised by `channel_names`
  or `file_ending` in `dataset.json`, the MSD by `training` or `modality`.

  Args:
    root: The folder holding `dataset.json`.

  Returns:
    The `Layout`, its cases sorted by id.

  Raises:
    BadDataError: listing every problem found (see the module docstring).
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  where = os.path.join(root, 'dataset.json')
  spec = _load_json(where)
  if not isinstance(spec, dict):
    raise folder.BadDataError(
      f'{where}: must hold a JSON object, got {type(spec).__name__}.'
    )
  if 'channel_names' in spec or 'file_ending' in spec:
    return _read_nnunet(root, spec)
  if 'training' in spec or 'modality' in spec:
    return _read_msd(root, spec)
  raise folder.BadDataError(
    f'{where}: neither nnU-Net v2 (keys channel_names, labels, numTraining,'
    ' file_ending) nor Medical Segmentation Decathlon (keys modality, labels,'
    ' training).'
  )


def _visible_files(directory: str, errors: list) -> list[str]:
  """The non-hidden files of `directory`, sorted; sub-folders are reported."""
  paths = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.startswith('.'):
      continue
    if folder.dangling_link(path):
      errors.append(folder.dangling_link(path))
    elif os.path.isdir(path):
      errors.append(f'{path}: unexpected folder.')
    else:
      paths.append(path)
  return paths


def _list_channel_files(
  directory: str, *, file_ending: str, num_channels: int, errors: list
) -> dict[str, dict[int, str]]:
  """{case id: {channel: path}} of an `imagesTr/` or `imagesTs/` folder."""
  found = collections.defaultdict(dict)
  for path in _visible_files(directory, errors):
    name = os.path.basename(path)
    parsed = _parse_channel(name, file_ending)
    if parsed is None and name.endswith(file_ending):
      errors.append(
        f'{path}: image name must end in _XXXX{file_ending} (a 4-digit channel index).'
      )
    elif parsed is None:
      errors.append(f'{path}: not a {file_ending} file (dataset.json file_ending).')
    elif parsed[1] >= num_channels:
      errors.append(
        f'{path}: channel index {parsed[1]} beyond channel_names, which names'
        f' {num_channels} channel(s) (0..{num_channels - 1}).'
      )
    else:
      found[parsed[0]][parsed[1]] = path
  return dict(found)


def _list_labels(directory: str, *, file_ending: str, errors: list) -> dict[str, str]:
  """{case id: path} of a `labelsTr/` folder."""
  found = {}
  for path in _visible_files(directory, errors):
    case_id = case_id_of(path, file_ending=file_ending, channel=False)
    if case_id is None:
      errors.append(f'{path}: not a {file_ending} file (dataset.json file_ending).')
    else:
      found[case_id] = path
  return found


def _read_nnunet(root: str, spec: dict) -> Layout:
  """`read_layout` for nnU-Net v2's raw layout."""
  where, errors = os.path.join(root, 'dataset.json'), []
  key = 'channel_names' if 'channel_names' in spec else 'modality'
  channel_names = _channel_names(spec, key, where, errors)
  labels = _nnunet_labels(spec, where, errors)
  file_ending = _file_ending(spec, where, errors)
  num_training = _num_training(spec, where, errors, required=True)
  for sub in ('imagesTr', 'labelsTr'):
    if not os.path.isdir(os.path.join(root, sub)):
      errors.append(f'{os.path.join(root, sub)}: missing folder.')
  if errors:
    folder.raise_all(errors, subject=f'the nnU-Net data set {root}')
  found = {}
  for sub in ('imagesTr', 'imagesTs'):
    directory = os.path.join(root, sub)
    found[sub] = {}
    if os.path.isdir(directory):
      found[sub] = _list_channel_files(
        directory,
        file_ending=file_ending,
        num_channels=len(channel_names),
        errors=errors,
      )
  label_files = _list_labels(
    os.path.join(root, 'labelsTr'), file_ending=file_ending, errors=errors
  )
  num_files = len(channel_names)
  everything = list(found['imagesTr'].values()) + list(found['imagesTs'].values())
  if (
    FILE_ENDINGS[file_ending] == 2 and everything and all(set(c) == {0} for c in everything)
  ):
    num_files = 1  # 2D natural images: the channels are packed in _0000.
  naming = (file_ending, num_files, channel_names)
  training = _nnunet_cases(root, 'imagesTr', found['imagesTr'], label_files, naming, errors)
  test = _nnunet_cases(root, 'imagesTs', found['imagesTs'], None, naming, errors)
  if num_training is not None and num_training != len(found['imagesTr']):
    errors.append(
      f"{where}: 'numTraining' is {num_training} but imagesTr/ holds"
      f' {len(found["imagesTr"])} case(s).'
    )
  folder.raise_all(errors, subject=f'the nnU-Net data set {root}')
  return Layout(
    format='nnunet',
    root=root,
    ndim=FILE_ENDINGS[file_ending],
    file_ending=file_ending,
    channel_names=channel_names,
    labels=labels,
    training=training,
    test=test,
  )


def _nnunet_cases(root, sub, channels_by_id, label_files, naming, errors) -> tuple:
  """The cases of one images folder; reports missing channels and labels."""
  file_ending, num_files, channel_names = naming
  cases = []
  for case_id in sorted(channels_by_id):
    by_channel = channels_by_id[case_id]
    for c in range(num_files):
      if c not in by_channel:
        expected = os.path.join(root, sub, f'{case_id}_{c:04d}{file_ending}')
        errors.append(
          f'{expected}: missing; channel {c} ({channel_names[c]}) of case {case_id!r}.'
        )
    label = None
    if label_files is not None:
      label = label_files.get(case_id)
      if label is None:
        expected = os.path.join(root, 'labelsTr', f'{case_id}{file_ending}')
        first = by_channel[min(by_channel)]
        errors.append(f'{first}: image without a label (expected {expected}).')
    images = tuple(by_channel.get(c, '') for c in range(num_files))
    cases.append(Case(case_id, images, label))
  for case_id in sorted((label_files or {}).keys() - channels_by_id.keys()):
    expected = os.path.join(root, sub, f'{case_id}_0000{file_ending}')
    errors.append(f'{label_files[case_id]}: label without any image (expected {expected}).')
  return tuple(cases)


def _msd_path(root: str, entry, where: str, errors: list) -> str | None:
  """The absolute path of an MSD `dataset.json` entry, if it names a file."""
  if not isinstance(entry, str) or not entry:
    errors.append(f'{where} must be a path such as "./imagesTr/x.nii.gz", got {entry!r}.')
    return None
  path = os.path.normpath(os.path.join(root, entry))
  if os.path.isfile(path):
    return path
  stem = case_id_of(path, file_ending='.nii.gz', channel=False)
  v1 = stem and os.path.isfile(os.path.join(os.path.dirname(path), f'{stem}_0000.nii.gz'))
  hint = ' (an nnU-Net v1 layout? its _0000 channel file exists)' if v1 else ''
  errors.append(f'{path}: missing; listed in {where}{hint}.')
  return None


def _msd_cases(root: str, spec: dict, key: str, errors: list) -> tuple[Case, ...]:
  """The cases of MSD's `training` ({image, label} entries) or `test` (paths)."""
  entries = spec.get(key, [] if key == 'test' else None)
  where = os.path.join(root, 'dataset.json')
  if not isinstance(entries, list):
    what = 'missing key' if entries is None else 'malformed key'
    errors.append(f'{where}: {what} {key!r} (a list of cases).')
    return ()
  cases, seen = [], {}
  for i, entry in enumerate(entries):
    at = f'{where} {key}[{i}]'
    if key == 'training' and not (
      isinstance(entry, dict) and {'image', 'label'} <= entry.keys()
    ):
      errors.append(f'{at}: must be {{"image": ..., "label": ...}}, got {entry!r}.')
      continue
    image = _msd_path(root, entry['image'] if key == 'training' else entry, at, errors)
    label = _msd_path(root, entry['label'], at, errors) if key == 'training' else None
    if image is None or (key == 'training' and label is None):
      continue
    case_id = _msd_case_id(image)
    if case_id in seen:
      errors.append(f'{image}: case {case_id!r} listed twice in {key} ({seen[case_id]}).')
      continue
    seen[case_id] = at
    cases.append(Case(case_id, (image,), label))
  return tuple(sorted(cases, key=lambda c: c.id))


def _msd_case_id(path: str) -> str:
  name = os.path.basename(path)
  for ending in FILE_ENDINGS:
    if name.endswith(ending):
      return name[: -len(ending)]
  return name


def _ending_of(path: str) -> str:
  return next((e for e in FILE_ENDINGS if path.endswith(e)), os.path.splitext(path)[1])


def _listed_paths(root: str, spec: dict) -> set[str]:
  """Every path MSD's `training` and `test` name, whether it exists or not."""
  entries = []
  for entry in spec.get('training') if isinstance(spec.get('training'), list) else ():
    entries += entry.values() if isinstance(entry, dict) else ()
  entries += spec.get('test') if isinstance(spec.get('test'), list) else ()
  return {os.path.normpath(os.path.join(root, e)) for e in entries if isinstance(e, str)}


def _read_msd(root: str, spec: dict) -> Layout:
  """`read_layout` for the Medical Segmentation Decathlon's layout."""
  where, errors = os.path.join(root, 'dataset.json'), []
  channel_names = _channel_names(spec, 'modality', where, errors)
  labels = _msd_labels(spec, where, errors)
  num_training = _num_training(spec, where, errors, required=False)
  training = _msd_cases(root, spec, 'training', errors)
  test = _msd_cases(root, spec, 'test', errors)
  paths = [p for c in training + test for p in c.images + ((c.label,) if c.label else ())]
  endings = sorted({_ending_of(p) for p in paths})
  if len(endings) > 1 or any(FILE_ENDINGS.get(e) != 3 for e in endings):
    errors.append(
      f'{where}: the listed files end in {endings}; an MSD data set takes one'
      " of '.nii.gz' and '.nii'."
    )
  if num_training is not None and num_training != len(spec.get('training') or ()):
    errors.append(
      f"{where}: 'numTraining' is {num_training} but 'training' lists"
      f' {len(spec.get("training") or ())} case(s).'
    )
  listed = _listed_paths(root, spec)
  for sub in ('imagesTr', 'labelsTr', 'imagesTs'):
    if os.path.isdir(os.path.join(root, sub)):
      for path in _visible_files(os.path.join(root, sub), errors):
        if path not in listed:
          errors.append(f"{path}: not listed in {where}'s training or test.")
  folder.raise_all(errors, subject=f'the Decathlon data set {root}')
  return Layout(
    format='msd',
    root=root,
    ndim=3,
    file_ending=endings[0] if endings else '.nii.gz',
    channel_names=channel_names,
    labels=labels,
    training=training,
    test=test,
  )


# ------------------------------------------------------------------ check


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """What `check` learns from one file: its spatial shape, channels, placement."""

  path: str
  shape: tuple[int, ...]  # Spatial, in file order: (x, y, z) for NIfTI, (H, W) for 2D.
  channels: int
  zooms: tuple[float, ...] | None  # NIfTI only, per spatial axis in file order.
  affine: np.ndarray | None  # NIfTI only.
  nonfinite: int = 0  # Images: the NaN and +-Inf values (floating-point files).
  size: int = 0  # Images: the number of values.


def _nifti(path: str, *, is_label: bool, per_file: bool):
  """(`_Geometry`, label values and counts or None) of a NIfTI file.

  Only the header is read for an image stored as integers; a floating-point
  image's array is read once, to count its NaN and +-Inf values; a label's
  array is read once. `per_file`: each image file holds one channel (nnU-Net).
  """
  import nibabel  # pylint: disable=g-import-not-at-top

  what = 'label' if is_label else 'image'
  try:
    volume = nibabel.load(path)
    shape = tuple(int(s) for s in volume.shape)
    zooms = tuple(round(float(z), 6) for z in volume.header.get_zooms()[:3])
    affine = np.asarray(volume.affine, np.float64)
    floats = volume.get_data_dtype().kind in 'fc'
    array = np.asanyarray(volume.dataobj) if is_label or floats else None
  except Exception as e:  # pylint: disable=broad-except
    raise folder.BadDataError(
      f'{path}: unreadable or truncated {what} ({type(e).__name__}: {e}).'
    ) from e
  channels = shape[3] if len(shape) == 4 else 1
  if len(shape) not in (3, 4) or ((is_label or per_file) and channels != 1):
    one = 'a 3D volume' if is_label or per_file else 'a 3D or 4D volume'
    raise folder.BadDataError(f'{path}: shape {shape}; a {what} must be {one}.')
  if is_label:
    geometry = _Geometry(path, shape[:3], channels, zooms, affine)
    return geometry, _label_values(path, array.reshape(shape[:3]))
  nonfinite = folder.count_nonfinite(array) if array is not None else 0
  size = int(np.prod(shape))
  return _Geometry(path, shape[:3], channels, zooms, affine, nonfinite, size), None


def _label_values(path: str, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The sorted values of a label array and their pixel counts."""
  if not np.issubdtype(array.dtype, np.integer):
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
      raise folder.BadDataError(
        f'{path}: label holds non-integer values; labels must hold class values.'
      )
  return np.unique(array.astype(np.int64), return_counts=True)


def _flat(path: str, *, is_label: bool):
  """(`_Geometry`, label values and counts or None) of a 2D image or label."""
  if is_label:
    mask, _ = folder.read_mask(path, ndim=2)
    return _Geometry(path, mask.shape, 1, None, None), _label_values(path, mask)
  image, _ = folder.read_image(path, ndim=2)
  shape, channels = image.shape[:2], image.shape[2]
  nonfinite = folder.count_nonfinite(image)
  return _Geometry(path, shape, channels, None, None, nonfinite, image.size), None


def _differs(reference: _Geometry, other: _Geometry, *, tolerance: float) -> str | None:
  """How `other`'s geometry differs from `reference`'s, or None if it agrees."""
  if other.shape != reference.shape:
    return f'shape {other.shape} differs from {reference.path} (shape {reference.shape})'
  if reference.affine is None:
    return None
  a, b = reference.affine, other.affine
  differences = geometry_lib.grid_differences(a, b, tolerance=tolerance)
  if differences:
    return (
      f'affine differs from that of {reference.path} by up to'
      f' {float(np.max(np.abs(a - b))):.3g}: {"; ".join(differences)}'
      f' (tolerance {tolerance:g} relative to the largest entry, at least 1)'
    )
  return None


def _canonical(geometry: _Geometry) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
  """(shape, spacing) in (D, H, W) order of the closest canonical (RAS) axes."""
  if geometry.affine is None:
    return geometry.shape, None
  try:
    return geometry_lib.canonical_grid(geometry.shape, geometry.zooms, geometry.affine)
  except ValueError as e:
    raise folder.BadDataError(f'{geometry.path}: {e}; cannot tell its orientation.') from e


def _check_values(images: list[_Geometry], *, nonfinite: str, errors: list) -> None:
  """Names each image holding NaN or +-Inf values ('error'), or logs it ('zero')."""
  for image in images:
    if image.nonfinite and nonfinite == 'error':
      errors.append(folder.nonfinite_problem(image.path, image.nonfinite, image.size))
    elif image.nonfinite:
      logging.warning(
        '%s: %d non-finite voxel(s) (NaN or Inf) of %d; replaced by 0 when the data'
        " set is built (config.data.nonfinite='zero').",
        image.path,
        image.nonfinite,
        image.size,
      )


def _check_case(
  case: Case, *, layout: Layout, tolerance: float, nonfinite: str, errors: list
):
  """Reads one case's files; returns (shape, spacing, label values) or None.

  Every problem goes to `errors`; None if there was one.
  """
  reader = _flat if layout.ndim == 2 else _nifti
  per_file = layout.format == 'nnunet' and layout.ndim == 3
  found, failed = [], len(errors)
  for path in case.images + ((case.label,) if case.label else ()):
    is_label = path == case.label
    kwargs = {} if layout.ndim == 2 else {'per_file': per_file}
    try:
      found.append(reader(path, is_label=is_label, **kwargs))
    except folder.BadDataError as e:
      errors.append(str(e))
  if len(errors) > failed:
    return None
  images = [g for g, _ in found[: len(case.images)]]
  _check_values(images, nonfinite=nonfinite, errors=errors)
  channels = sum(g.channels for g in images)
  if channels != len(layout.channel_names):
    errors.append(
      f'{", ".join(case.images)}: {channels} channel(s), but dataset.json names'
      f' {len(layout.channel_names)} ({", ".join(layout.channel_names)}).'
    )
  for geometry, _ in found[1:]:
    problem = _differs(images[0], geometry, tolerance=tolerance)
    if problem:
      errors.append(f'{geometry.path}: {problem}.')
  values = found[-1][1] if case.label else None
  if values is not None:
    unknown = sorted(set(values[0].tolist()) - set(layout.labels.values()))
    if unknown:
      known = sorted(layout.labels.values())
      errors.append(
        f"{case.label}: label value(s) {unknown} not in dataset.json's labels"
        f' (values {known}).'
      )
  if len(errors) > failed:
    return None
  try:
    shape, spacing = _canonical(images[0])
  except folder.BadDataError as e:
    errors.append(str(e))
    return None
  return shape, spacing, values


def check(
  layout: Layout,
  *,
  tolerance: float = geometry_lib.GRID_TOLERANCE,
  nonfinite: str = 'error',
) -> dict[str, object]:
  """Reads every file of `layout` once and checks the whole data set.

  NIfTI images stored as integers are read by header only (shape, zooms,
  affine), floating-point ones whole, once, for their NaN and +-Inf values;
  labels are read whole, once; 2D files are read whole. Test cases are checked for their
  channels and geometry; the metadata describes the training cases.

  Args:
    layout: From `read_layout`.
    tolerance: How far the spacing, direction and origin of two affines may
      differ (`geometry.grid_differences`): max |a - b| <= tolerance * max(1,
      max |a|, max |b|) for each part.
    nonfinite: 'error': every image holding NaN or +-Inf values is named, with
      their count; 'zero': they are logged instead (the builder replaces them
      by 0).

  Returns:
    The keys of `folder.validate`'s metadata: num_classes (the largest label
    value in dataset.json plus one), num_channels, ndim, min_shape, max_shape,
    median_shape, small_examples ([first image path, shape] of the training
    cases smaller than half the median shape along some axis), spacing
    (per-axis median; None for 2D), num_examples ({'train': n, 'test': m},
    'test' only if there are test cases) and class_pixels (pixel count of
    each label value over the training labels); and 'spacings' and 'shapes'
    (per training case, in `layout.training` order; each spacing None for
    2D), 'channel_names' and 'format'. Shapes and spacings are in (D, H, W)
    order of the closest canonical (RAS) orientation, (H, W) for 2D.

  Raises:
    BadDataError: naming every offending file (see the module docstring).
    ValueError: if `tolerance` is negative or not finite, or `nonfinite` is not
      'error' or 'zero'.
  """
  if (
    not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)) or tolerance < 0
  ):
    raise ValueError(f'tolerance must be a finite number >= 0, got {tolerance!r}.')
  folder.check_nonfinite_option(nonfinite)
  errors, results = [], []
  for case in layout.training + layout.test:
    result = _check_case(
      case, layout=layout, tolerance=tolerance, nonfinite=nonfinite, errors=errors
    )
    if case.label is not None:
      results.append((case, result))
  subject = f'the {"nnU-Net" if layout.format == "nnunet" else "Decathlon"} data set'
  folder.raise_all(errors, subject=f'{subject} {layout.root}')
  if not results:
    raise folder.BadDataError(f'{layout.root}: the data set holds no training cases.')
  metadata = _metadata(layout, results)
  logging.info('Checked %s data set %s: %s', layout.format, layout.root, metadata)
  return metadata


def _metadata(layout: Layout, results: list) -> dict[str, object]:
  """`check`'s metadata from the (case, (shape, spacing, values)) of each case."""
  shapes = np.array([shape for _, (shape, _, _) in results])
  median = np.median(shapes, axis=0)
  small = [
    [case.images[0], list(shape)]
    for case, (shape, _, _) in results
    if np.any(np.array(shape) < median / 2)
  ]
  for path, shape in small:
    logging.warning(
      'Data set %s: %s has shape %s, smaller than half the median shape %s'
      ' along some axis.',
      layout.root,
      path,
      shape,
      median.tolist(),
    )
  spacings = [spacing for _, (_, spacing, _) in results]
  class_pixels = collections.Counter()
  for _, (_, _, (values, counts)) in results:
    class_pixels.update(dict(zip(values.tolist(), counts.tolist())))
  num_examples = {'train': len(layout.training)}
  if layout.test:
    num_examples['test'] = len(layout.test)
  return {
    'num_classes': max(layout.labels.values()) + 1,
    'num_channels': len(layout.channel_names),
    'ndim': layout.ndim,
    'min_shape': [int(s) for s in shapes.min(axis=0)],
    'max_shape': [int(s) for s in shapes.max(axis=0)],
    'median_shape': [float(s) for s in median],
    'small_examples': small,
    'spacing': (
      [float(s) for s in np.median(spacings, axis=0)] if layout.ndim == 3 else None
    ),
    'num_examples': num_examples,
    'class_pixels': {str(k): int(v) for k, v in sorted(class_pixels.items())},
    'spacings': [list(s) if s is not None else None for s in spacings],
    'shapes': [[int(s) for s in shape] for shape in shapes],
    'channel_names': list(layout.channel_names),
    'format': layout.format,
  }


# ------------------------------------------------------------------ splits


def splits(
  case_ids: Iterable[str], *, num_folds: int = 5, seed: int = 12345
) -> list[dict[str, list[str]]]:
  """nnU-Net v2's cross-validation folds (its `splits_final.json`).

  The ids are sorted; `np.random.RandomState(seed).shuffle` permutes
  `arange(n)`; fold k takes the next n // num_folds cases of the permutation
  (one more for the first n % num_folds folds) as 'val' and the rest as
  'train', both in sorted order. This is exactly what nnU-Net v2's
  `generate_crossval_split` gets from
  `sklearn.model_selection.KFold(num_folds, shuffle=True, random_state=seed)`.

  Args:
    case_ids: The training case ids, in any order, each once.
    num_folds: The number of folds, at least 2.
    seed: The seed of the shuffle (nnU-Net's is 12345).

  Returns:
    [{'train': [...], 'val': [...]}, ...], one dict per fold; every id is in
    exactly one 'val'.

  Raises:
    ValueError: if `num_folds` < 2, an id repeats, or there are fewer cases
      than folds. nnU-Net fails there too: sklearn's KFold raises a
      ValueError ("Cannot have number of splits n_splits=5 greater than the
      number of samples"), and nnU-Net does not catch it.
  """
  ids = sorted(case_ids)
  if not _is_int(num_folds) or num_folds < 2:
    raise ValueError(f'num_folds must be an int >= 2, got {num_folds!r}.')
  repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
  if repeated:
    raise ValueError(f'case ids must be unique; repeated: {repeated}.')
  if len(ids) < num_folds:
    raise ValueError(
      f'{len(ids)} case(s) cannot make {num_folds} folds; each fold needs at'
      ' least one validation case (nnU-Net fails here too).'
    )
  order = np.arange(len(ids))
  np.random.RandomState(seed).shuffle(order)
  sizes = [len(ids) // num_folds + (k < len(ids) % num_folds) for k in range(num_folds)]
  folds, start = [], 0
  for size in sizes:
    val = set(order[start : start + size].tolist())
    start += size
    folds.append(
      {
        'train': [ids[i] for i in range(len(ids)) if i not in val],
        'val': [ids[i] for i in sorted(val)],
      }
    )
  return folds


def _check_splits(folds, path: str, case_ids: list[str]) -> None:
  """Raises a BadDataError naming `path` if `folds` does not fit `case_ids`."""
  if not isinstance(folds, list) or not folds:
    raise folder.BadDataError(
      f'{path}: must hold a non-empty JSON list of {{"train": [...], "val": [...]}}.'
    )
  known, errors = set(case_ids), []
  for k, fold in enumerate(folds):
    if not (
      isinstance(fold, dict)
      and all(isinstance(fold.get(s), list) for s in ('train', 'val'))
      and all(isinstance(i, str) for i in fold['train'] + fold['val'])
    ):
      errors.append(f'{path}: fold {k} must be {{"train": [ids], "val": [ids]}}.')
      continue
    unknown = sorted(set(fold['train'] + fold['val']) - known)
    if unknown:
      errors.append(f'{path}: fold {k} names unknown case id(s) {unknown}.')
    left_out = sorted(known - set(fold['train'] + fold['val']))
    if left_out:
      errors.append(f'{path}: fold {k} leaves out case id(s) {left_out}.')
    both = sorted(set(fold['train']) & set(fold['val']))
    if both:
      logging.warning('%s: fold %d trains and validates on %s.', path, k, both)
  folder.raise_all(errors, subject=f'the splits file {path}')


def read_or_write_splits(
  path: str | os.PathLike, case_ids: Iterable[str], *, num_folds: int = 5, seed: int = 12345
) -> list[dict[str, list[str]]]:
  """The folds of `path` (a `splits_final.json`), written first if missing.

  An existing file is used as it is, whatever its number of folds (as nnU-Net
  does), once checked against `case_ids`: every id it names must be a case,
  and each fold's train and val together must hold every case. A missing
  file is written (temporary name, then `os.replace`) with `splits`, as
  nnU-Net writes it: a JSON list of {'train': [...], 'val': [...]}.

  Raises:
    BadDataError: naming `path` and the unknown or left-out ids, if the file
      does not fit `case_ids` or is not such a list.
    ValueError: see `splits`.
  """
  path, case_ids = os.fspath(path), sorted(case_ids)
  if os.path.exists(path):
    try:
      with open(path) as f:
        folds = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise folder.BadDataError(f'{path}: unreadable ({type(e).__name__}: {e}).') from e
    _check_splits(folds, path, case_ids)
    return folds
  folds = splits(case_ids, num_folds=num_folds, seed=seed)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, temporary = tempfile.mkstemp(prefix='.splits_', suffix='.json', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(folds, f, indent=4)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return folds
