"""Makes the repository root importable in tests (for `configs`), and shares one JAX
compilation cache between the test processes (xdist workers and the subprocesses the
tests start): many tests compile the same tiny networks, and on a CPU compiling them
costs more than running them. The cache lives in .pytest_cache/ (not committed)."""

import os

os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(os.path.dirname(os.path.abspath(__file__)), '.pytest_cache', 'jax'),
)
