r"""Where the train step's time goes on XLA:CPU, by kind of operation.

Runs one of `benchmarks/speed.py`'s cases (the same network, loss and Adam step),
traces three steps with the JAX profiler (XLA:CPU's per-operation trace events, on
with `--xla_cpu_enable_xprof_traceme=true`, which this script sets for its own
process), and sums the events' durations by kind, read off the compiled HLO:

- conv forward / conv input grad / conv kernel grad: XLA convolutions (a kernel
  gradient is the one whose window is larger than 3 along some axis);
- native conv / native kernel grad / native Winograd conv / native Winograd kernel
  grad / native max pool: the C++ kernels of `unet_jax.ops.native`;
- oneDNN conv forward / input grad / kernel grad: `unet_jax.ops.onednn`'s calls;
- reduce-window (max pooling), concatenate, transpose/copy, iota/broadcast, dot,
  other: the rest.

Durations are per step and summed over threads, so with 2 threads the total exceeds
the step's wall time where operations ran side by side.

    .venv/bin/python benchmarks/profile_step.py --case=2d_transpose [--top=20]
    .venv/bin/python benchmarks/profile_step.py --case=3d_transpose \
        --kwargs='{"kernels": {"native_weight_grad": false, "native_forward": false}}'
"""

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

STEPS = 3


def _computations(hlo):
  """{fusion or call instruction name: text of the computation it calls}."""
  calls = dict(re.findall(r'%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)', hlo))
  bodies = {
    m.group(1): m.group(0)
    for m in re.finditer(r'^%([\w.\-]+) \(.*?\n}\n', hlo, re.S | re.M)
  }
  lines = dict(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = ([^\n]*)', hlo, re.M))
  return calls, bodies, lines


_ONEDNN = {
  'unet_jax_onednn_conv': 'oneDNN conv forward',
  'unet_jax_onednn_input_grad': 'oneDNN conv input grad',
  'unet_jax_onednn_wgrad': 'oneDNN conv kernel grad',
}


def kind(name, calls, bodies, lines):
  """The kind of operation a trace event named `name` ran."""
  line = lines.get(name, '')
  body = bodies.get(calls.get(name, ''), '')
  if 'custom_call_target="unet_jax_conv"' in line:
    return 'native conv (forward or input grad)'
  if 'custom_call_target="unet_jax_conv_winograd"' in line:
    return 'native Winograd conv (forward or input grad)'
  if 'custom_call_target="unet_jax_conv_winograd_wgrad"' in line:
    return 'native Winograd kernel grad'
  if 'custom_call_target="unet_jax_conv_wgrad"' in line:
    return 'native kernel grad'
  for target, label in _ONEDNN.items():
    if f'custom_call_target="{target}"' in line:
      return label
  if 'custom_call_target="unet_jax_max_pool' in line:
    return 'native max pool (forward or grad)'
  if 'convolution(' in body or ' convolution(' in line:
    text = body or line
    window = re.search(r'window=\{size=([\dx]+)', text)
    sizes = [int(v) for v in window.group(1).split('x')] if window else [1]
    if max(sizes) > 3 and any(s > 5 for s in sizes):
      return 'conv kernel grad (XLA)'
    return 'conv input grad (XLA)' if 'transpose(jvp' in text else 'conv forward (XLA)'
  if ' dot(' in body or ' dot(' in line:
    return 'dot'
  if 'reduce-window' in name or 'reduce-window(' in body:
    return 'reduce-window'
  if name.startswith('concatenate') or 'concatenate(' in body:
    return 'concatenate'
  if name.startswith(('wrapped_iota', 'wrapped_broadcast')):
    return 'iota/broadcast'
  if 'transpose' in name or 'copy' in name:
    return 'transpose/copy'
  return 'other (elementwise, reductions, optimizer)'


def profile(case, kwargs):
  import jax  # pylint: disable=g-import-not-at-top
  import speed  # pylint: disable=g-import-not-at-top

  step, state, _ = speed.build_step(case, kwargs=kwargs)
  for _ in range(2):
    *state, loss = step(*state)
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(STEPS):
    *state, loss = step(*state)
  loss.block_until_ready()
  wall_ms = (time.perf_counter() - start) / STEPS * 1e3
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(STEPS):
        *state, loss = step(*state)
      loss.block_until_ready()
    (path,) = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  calls, bodies, lines = _computations(step.as_text())
  by_kind, by_name = collections.Counter(), collections.Counter()
  for event in events:
    name = event.get('name', '')
    if event.get('ph') == 'X' and (name in lines or name in calls):
      by_kind[kind(name, calls, bodies, lines)] += event['dur'] / 1e3 / STEPS
      by_name[name] += event['dur'] / 1e3 / STEPS
  top = [
    {'name': name, 'ms': ms, 'kind': kind(name, calls, bodies, lines), 'hlo': lines[name]}
    for name, ms in by_name.most_common()
    if name in lines
  ]
  return wall_ms, dict(by_kind), top


def main(argv=None):
  import speed  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--case', default='2d_transpose', choices=sorted({**speed.CASES, **speed.QUICK_CASES})
  )
  parser.add_argument(
    '--kwargs',
    default='{}',
    help="UNet keyword overrides, JSON; 'kernels': a policy name or changes to 'auto'.",
  )
  parser.add_argument(
    '--top', type=int, default=0, help='Also list the N most expensive operations.'
  )
  parser.add_argument('--out', default=str(HERE / 'out'))
  args = parser.parse_args(argv)
  flag = '--xla_cpu_enable_xprof_traceme=true'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    # XLA reads its flags once, when the backend starts: re-run with the flag set.
    env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {flag}')
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
  case = {**speed.CASES, **speed.QUICK_CASES}[args.case]
  wall_ms, by_kind, top = profile(case, json.loads(args.kwargs))
  total = sum(by_kind.values())
  print(
    f'{args.case} {args.kwargs}: {wall_ms:.0f} ms per step (wall), '
    f'{total:.0f} ms of operations summed over threads'
  )
  for name, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f'  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {name}')
  for op in top[: args.top]:
    print(f'  {op["ms"]:8.1f} ms  {op["kind"][:24]:24}  {op["name"]}: {op["hlo"][:110]}')
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f'profile_{args.case}.json')
  with open(path, 'w') as f:
    json.dump(
      {
        'case': args.case,
        'kwargs': json.loads(args.kwargs),
        'wall_ms': wall_ms,
        'ms_by_kind': by_kind,
        'operations': top,
      },
      f,
      indent=1,
    )
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
