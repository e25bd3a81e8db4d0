"""The package's shape: imports run one way, no circles, a small top level, short functions.

The layers, lowest first (STYLE.md, "Layout"):

    config, distributed, checkpointing, visualize     (top-level modules: no layer above)
    ops -> models -> losses, metrics, data, reporting -> planning -> inference
        -> evaluation -> crossval -> train -> launch.py

A module may import its own layer and those below it, never one above. Sibling packages
of one layer (losses, metrics, data) must not form a circle. Every import counts,
including those inside functions.
"""

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'unet_jax'

LAYERS = {
  'config': 0,
  'distributed': 0,
  'checkpointing': 0,
  'visualize': 0,
  'ops': 1,
  'models': 2,
  'losses': 3,
  'metrics': 3,
  'data': 3,
  'reporting': 3,
  'planning': 4,
  'inference': 5,
  'evaluation': 6,
  'crossval': 7,
  'train': 8,
}
MAX_TOP_LEVEL_MODULES = 6
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  """Every module of the package by dotted name."""
  found = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts = parts[:-1]
    found['.'.join(parts)] = path
  return found


def _imports(path: pathlib.Path, module: str) -> set[str]:
  """The unet_jax modules `path` imports, anywhere in it."""
  out = set()
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith('unet_jax'))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')
        anchor = anchor[: len(anchor) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      if base.startswith('unet_jax'):
        out.update(f'{base}.{a.name}' for a in node.names)
        out.add(base)
  return out


def _unit(name: str) -> str | None:
  """The layer unit of a dotted name: 'unet_jax.data.folder' -> 'data'."""
  parts = name.split('.')
  return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _edges() -> dict[str, set[str]]:
  modules = _modules()
  return {m: {i for i in _imports(p, m) if _unit(i)} for m, p in modules.items()}


def test_every_module_has_a_layer():
  units = {_unit(m) for m in _modules() if m != 'unet_jax'}
  assert None not in units, sorted(
    m for m in _modules() if not _unit(m) and m != 'unet_jax'
  )


def test_imports_run_one_way():
  upward = []
  for module, targets in _edges().items():
    if module == 'unet_jax':
      continue
    for target in targets:
      if LAYERS[_unit(target)] > LAYERS[_unit(module)]:
        upward.append(f'{module} imports {target}')
  assert not upward, '\n'.join(sorted(upward))


def test_no_circle_between_subpackages():
  graph = collections.defaultdict(set)
  for module, targets in _edges().items():
    if module == 'unet_jax':
      continue
    for target in targets:
      if _unit(target) != _unit(module):
        graph[_unit(module)].add(_unit(target))

  def reaches(start, goal, seen):
    for nxt in graph[start]:
      if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
        return True
    return False

  circles = sorted(u for u in LAYERS if reaches(u, u, {u}))
  assert not circles, f'subpackages on a circle: {circles}; edges {dict(graph)}'


def test_only_the_entry_points_import_train():
  importers = sorted(
    m
    for m, targets in _edges().items()
    if _unit(m) != 'train' and any(_unit(t) == 'train' for t in targets)
  )
  assert importers == []


def test_the_checker_sees_an_upward_import(tmp_path):
  # The walker itself: a function-local upward import must be found.
  path = tmp_path / 'x.py'
  path.write_text('def f():\n  from unet_jax import train\n  from ..data import folder\n')
  found = _imports(path, 'unet_jax.inference.x')
  assert 'unet_jax.train' in found and 'unet_jax.data.folder' in found


def test_small_top_level():
  modules = sorted(p.name for p in PACKAGE.glob('*.py'))
  assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def _long_functions(paths) -> list[str]:
  long = []
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f'{path}:{node.lineno} {node.name} ({lines} lines)')
  return long


def test_no_long_functions():
  # From `def` to the function's last line, docstring included.
  assert _long_functions(sorted(PACKAGE.rglob('*.py')) + [ROOT / 'launch.py']) == []


@pytest.mark.parametrize('lines, found', [(80, False), (81, True)])
def test_the_length_check_counts_lines(tmp_path, lines, found):
  body = ''.join(f'  x{i} = {i}\n' for i in range(lines - 1))
  path = tmp_path / 'f.py'
  path.write_text('def f():\n' + body)
  assert bool(_long_functions([path])) is found
