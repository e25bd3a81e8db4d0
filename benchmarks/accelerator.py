r"""The accelerator benchmarks in one command, bounded to 10 minutes: one JSON, one table.

On a machine with a GPU or TPU it runs, one after the other, each in its own process
with its own time budget (a part that fails or runs out of time is recorded as such,
with its error, and the rest still run):

1. `train_step_vs_torch`: the train step of `unet_jax.models.UNet` against the same
   network in PyTorch on CUDA (`speed.py --preset=gpu`, bfloat16: JAX
   `UNet(dtype=bfloat16)` against AMP bf16 with `channels_last`, `cudnn.benchmark`
   and `torch.compile` where it works), one process per side and case;
2. `upsampling`: transposed against bilinear upsampling (`upsampling.py --preset=gpu`);
3. `memory_check`: the memory planner against XLA's `memory_analysis` of the programs
   compiled for the device (`memory_check.py --preset=gpu`);
4. `input_pipeline`: the input pipeline at the GPU's scale, 128³ patches with
   foreground oversampling and 512² images, with 1, 2 and 4 grain worker processes
   (`input_pipeline.py --accelerator_scale`).

It records the device kind, the jax and jaxlib versions, the torch version (if any)
and how long each part took, and writes `<out>/accelerator.json` (each part's own
JSON inside) and `<out>/accelerator.md` (one row per part).

    # On the GPU machine (PyTorch with CUDA in its own venv, see torch_reference.py):
    .venv/bin/python benchmarks/accelerator.py --torch-python=/path/to/torch_venv/bin/python
    # On a CPU: a smoke run of every part at tiny sizes (tests use it).
    .venv/bin/python benchmarks/accelerator.py --smoke

Without `--smoke` on a machine where JAX sees only the CPU it stops and says so,
unless `--allow-cpu` (the accelerator sizes on a CPU take far longer than 10 minutes;
the budgets then cut the parts short). Without `--torch-python` the PyTorch side is
skipped ("torch not installed") and the JAX side still runs.
"""

import argparse
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

PARTS = ('train_step_vs_torch', 'upsampling', 'memory_check', 'input_pipeline')
# Seconds per part on an accelerator: 570 in all, within the 10 minutes. Guesses:
# the script has not run on an accelerator yet.
BUDGETS = {
  'train_step_vs_torch': 260,  # torch.compile alone may take a minute per case.
  'upsampling': 100,
  'memory_check': 45,
  'input_pipeline': 165,  # Generates and builds its data sets first.
}
SMOKE_BUDGET = 300  # Seconds per part in --smoke, on a loaded CPU.
TORCH_OPTIONS = 'channels_last,cudnn_benchmark,compile'
NOT_INSTALLED = 'skipped: torch not installed'

_DEVICE_SCRIPT = """
import json, jax, jaxlib
d = jax.devices()[0]
print(json.dumps(dict(backend=jax.default_backend(), device_kind=d.device_kind,
  device_count=jax.device_count(), jax=jax.__version__, jaxlib=jaxlib.__version__)))
"""
_TORCH_SCRIPT = """
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps(dict(torch=torch.__version__, cuda=cuda,
  device=torch.cuda.get_device_name() if cuda else 'cpu')))
"""


def _json_of(cmd, *, timeout=120) -> dict:
  """The last stdout line of `cmd`, as JSON; RuntimeError with stderr if it fails."""
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr.strip()[-1000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def device_info() -> dict:
  """Backend, device kind and versions, from a child process (it frees the device)."""
  return _json_of([sys.executable, '-c', _DEVICE_SCRIPT])


def torch_info(torch_python: str | None) -> dict:
  """{'torch': version, 'cuda': bool, 'device': name} or {'skipped': why}."""
  if not torch_python:
    return {'skipped': NOT_INSTALLED}
  if not os.path.exists(torch_python):
    return {'skipped': f'{NOT_INSTALLED}: --torch-python {torch_python} does not exist'}
  try:
    return _json_of([torch_python, '-c', _TORCH_SCRIPT])
  except (RuntimeError, subprocess.SubprocessError) as e:
    return {'skipped': f'{NOT_INSTALLED}: {torch_python} cannot import torch ({e})'}


def part_commands(*, smoke: bool, torch: dict, torch_python, out, data_dir) -> dict:
  """{part: (argv, the JSON file the part writes)}."""
  py = sys.executable
  run_torch = not smoke and torch.get('cuda')
  speed = [py, str(HERE / 'speed.py'), f'--out={out / "train_step_vs_torch"}']
  if smoke:
    speed += ['--quick', '--cases=2d_quick']
  else:
    speed += [
      '--preset=gpu',
      f'--platform={os.environ.get("JAX_PLATFORMS", "")}',
      '--dtypes=bfloat16',
      '--steps=10',
      '--warmup=3',
      '--repeats=1',
      '--timeout=240',
    ]
  if run_torch:
    speed += [
      f'--torch-python={torch_python}',
      '--torch-device=cuda',
      f'--torch-options={TORCH_OPTIONS}',
    ]
  size = (
    ['--quick', '--repeats=1', '--steps=1'] if smoke else ['--preset=gpu', '--repeats=3']
  )
  memory = ['--quick'] if smoke else ['--preset=gpu']
  pipeline = ['--smoke', '--workers=0', '--repeats=1'] if smoke else ['--accelerator_scale']
  return {
    'train_step_vs_torch': (speed, out / 'train_step_vs_torch' / 'speed.json'),
    'upsampling': (
      [py, str(HERE / 'upsampling.py'), *size, f'--out={out / "upsampling"}'],
      out / 'upsampling' / 'upsampling.json',
    ),
    'memory_check': (
      [py, str(HERE / 'memory_check.py'), *memory, f'--out={out / "memory_check"}'],
      out / 'memory_check' / 'memory_check.json',
    ),
    'input_pipeline': (
      [
        py,
        str(HERE / 'input_pipeline.py'),
        *pipeline,
        f'--data_dir={data_dir}',
        f'--out={out / "input_pipeline"}',
      ],
      out / 'input_pipeline' / 'input_pipeline_accelerator.json',
    ),
  }


def run_part(argv, json_path: pathlib.Path, *, budget: float, log) -> dict:
  """Runs one part in its own process group, killed after `budget` seconds."""
  json_path.unlink(missing_ok=True)  # Not an earlier run's.
  start = time.perf_counter()
  with open(log, 'w') as log_file:
    proc = subprocess.Popen(
      argv, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
      code = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # The part and the workers it started.
      proc.wait()
      code = None
  row = {'seconds': time.perf_counter() - start, 'budget_s': budget, 'log': str(log)}
  tail = pathlib.Path(log).read_text(errors='replace').strip()[-2000:]
  if code is None:
    return dict(row, status='failed', error=f'timed out after {budget:.0f} s\n{tail}')
  if code != 0:
    return dict(row, status='failed', error=f'exit code {code}\n{tail}')
  if not json_path.exists():
    return dict(row, status='failed', error=f'wrote no {json_path}\n{tail}')
  return dict(row, status='ok', result=json.loads(json_path.read_text()))


# ---------------------------------------------------------------------------------
# One line of summary per part, from the part's own JSON.


def _summary_speed(result) -> str:
  cells = []
  for name, res in result['results'].items():
    for dtype in ('float32', 'bfloat16'):
      if dtype not in res:
        continue
      row = res[dtype]
      cell = f'{name} {dtype}: JAX {row["jax"]["ms_per_step_median"]:.1f} ms/step'
      if 'torch' in row:
        t = row['torch']
        cell += (
          f', PyTorch {t["ms_per_step_median"]:.1f} ms/step'
          f' (compile {t.get("options", {}).get("compile", "off")}),'
          f' JAX speed / PyTorch {row["ratio_jax_speed_over_torch"]:.2f}×'
        )
      cells.append(cell)
  return '; '.join(cells)


def _summary_upsampling(result) -> str:
  return '; '.join(
    f'{name}: train ex/s transpose {row["transpose"]["train_examples_per_s_median"]:.2f},'
    f' bilinear {row["bilinear"]["train_examples_per_s_median"]:.2f}'
    for name, row in result['results'].items()
  )


def _summary_memory(result) -> str:
  ratios = [r['plan_total'] / r['xla_total'] for r in result['rows']]
  return (
    f'{len(ratios)} compiled programs; planner total / XLA total'
    f' {min(ratios):.2f} to {max(ratios):.2f}'
  )


def _summary_pipeline(result) -> str:
  cells = []
  for name, row in result['cases'].items():
    rates = ', '.join(
      f'{k} workers {r["patches_per_s_median"]:.1f}/s' for k, r in row['by_workers'].items()
    )
    cells.append(f'{name}: {rates}')
  return '; '.join(cells)


SUMMARIES = {
  'train_step_vs_torch': _summary_speed,
  'upsampling': _summary_upsampling,
  'memory_check': _summary_memory,
  'input_pipeline': _summary_pipeline,
}


def markdown(report) -> str:
  """The table of `report`: a header line of the machine, then one row per part."""
  meta = report['meta']
  device = meta['device']
  torch = meta['torch']
  lines = [
    f'Device: {device.get("device_kind")} ({device.get("backend")},'
    f' {device.get("device_count")} device(s)); jax {device.get("jax")},'
    f' jaxlib {device.get("jaxlib")}; torch'
    f' {torch.get("torch", torch.get("skipped"))}; {meta["date"]};'
    f' {"smoke run" if meta["smoke"] else "full run"} in {meta["total_s"]:.0f} s.',
    '',
    '| part | status | seconds | budget s | summary |',
    '| --- | --- | ---: | ---: | --- |',
  ]
  for row in report['parts']:
    status = row['status']
    if status == 'failed':
      status = 'failed: ' + row['error'].splitlines()[0]
    elif row.get('torch'):
      status += f'; PyTorch {row["torch"]}'
    summary = row.get('summary', '').replace('|', '/')
    lines.append(
      f'| {row["part"]} | {status} | {row["seconds"]:.0f} | {row["budget_s"]:.0f} |'
      f' {summary} |'
    )
  return '\n'.join(lines) + '\n'


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='Tiny sizes, for a CPU.')
  parser.add_argument(
    '--allow-cpu', action='store_true', help='Run the full sizes on a CPU anyway.'
  )
  parser.add_argument('--torch-python', default=None, help='Interpreter with torch.')
  parser.add_argument('--out', default=str(HERE / 'out' / 'accelerator'))
  parser.add_argument(
    '--parts', default=','.join(PARTS), help=f'Comma-separated, of {",".join(PARTS)}.'
  )
  parser.add_argument(
    '--budget-scale',
    type=float,
    default=1.0,
    help='Multiplies every part budget (e.g. for a slow machine).',
  )
  args = parser.parse_args(argv)
  unknown = sorted(set(args.parts.split(',')) - set(PARTS))
  if unknown:
    parser.error(f'unknown --parts {unknown}; choose from {list(PARTS)}')
  return args


def _part_row(part, argv, json_path, *, budget, out, torch) -> dict:
  """Runs one part and summarises it; a summary that fails marks the part failed."""
  print(f'[{part}] {" ".join(argv[1:])} (budget {budget:.0f} s)', flush=True)
  row = dict(
    part=part,
    command=' '.join(argv),
    **run_part(argv, json_path, budget=budget, log=out / f'{part}.log'),
  )
  if part == 'train_step_vs_torch':
    row['torch'] = torch.get('skipped') or (
      None if torch.get('cuda') else 'skipped: torch has no CUDA device'
    )
  if row['status'] == 'ok':
    try:
      row['summary'] = SUMMARIES[part](row['result'])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
      row.update(status='failed', error=f'unexpected JSON: {type(e).__name__}: {e}')
  print(f'[{part}] {row["status"]} in {row["seconds"]:.0f} s', flush=True)
  return row


def main(argv=None):
  args = _parse(argv)
  start = time.perf_counter()
  device = device_info()
  if device['backend'] == 'cpu' and not (args.smoke or args.allow_cpu):
    sys.exit(
      'benchmarks/accelerator.py is meant for a machine with a GPU or TPU; JAX sees only'
      f' the CPU ({device["device_kind"]}). Run --smoke for the smoke run at tiny sizes,'
      ' or --allow-cpu to run the accelerator sizes here anyway.'
    )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  torch = torch_info(args.torch_python)
  meta = {
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'device': device,
    'torch': torch,
    'smoke': args.smoke,
  }
  with tempfile.TemporaryDirectory(prefix='unet_jax_accelerator_') as data_dir:
    commands = part_commands(
      smoke=args.smoke,
      torch=torch,
      torch_python=args.torch_python,
      out=out,
      data_dir=data_dir,
    )
    parts = [
      _part_row(
        part,
        *commands[part],
        budget=(SMOKE_BUDGET if args.smoke else BUDGETS[part]) * args.budget_scale,
        out=out,
        torch=torch,
      )
      for part in args.parts.split(',')
    ]
  meta['total_s'] = time.perf_counter() - start
  report = {'meta': meta, 'parts': parts}
  (out / 'accelerator.json').write_text(json.dumps(report, indent=2))
  (out / 'accelerator.md').write_text(markdown(report))
  print(markdown(report))
  print(f'wrote {out / "accelerator.json"} and {out / "accelerator.md"}')
  return report


if __name__ == '__main__':
  main()
