"""The README's Python examples run as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_readme_python_examples_run():
  blocks = _python_blocks()
  assert len(blocks) >= 2, 'the README has its model and losses examples'
  for block in blocks:
    namespace = {}
    exec(compile(block, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  # The losses example leaves its results behind; check they are real numbers.
  assert float(namespace['loss']) > 0
  assert namespace['total'].sum() == 3 * 2 * 30 * 32
