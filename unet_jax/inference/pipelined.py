"""Items through three stages in order, the host stages beside the device one.

    results = pipelined.run_in_order(
        cases, read=read_case, compute=predict_case, write=write_case, prefetch=True)

For each item in order: `write(item, compute(read(item)))`. With `prefetch`,
`read` of item i + 1 runs in a background thread while `compute` of item i runs
in the calling thread, and `write` of item i - 1 in a second background thread:
the host reads ahead and writes behind while the device computes. `compute`
always runs in the calling thread (where JAX dispatches); each background stage
has one thread and holds at most one item, so at most one item is in flight
each way.

Nothing is lost or reordered: each stage sees the items in order (one thread
each), `write`'s results come back in order, and an error raised by any stage
of item i is raised after every `write` of the items before it has finished,
as a loop would raise it. When several stages fail, the earliest item's error
(and for one item, the earliest stage's) is the one raised, as in the loop. No
thread is left running on return, on error, or on KeyboardInterrupt: a read
ahead that has not started is cancelled, one that has is waited for, and so is
the write behind.

Without `prefetch`, the stages run one after the other in the calling thread:
the plain loop.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any, Callable, Sequence


def _loop(items, read, compute, write) -> list[Any]:
  return [write(item, compute(read(item))) for item in items]


def run_in_order(
  items: Sequence[Any],
  *,
  read: Callable[[Any], Any],
  compute: Callable[[Any], Any],
  write: Callable[[Any, Any], Any],
  prefetch: bool = True,
) -> list[Any]:
  """`[write(item, compute(read(item))) for item in items]`, overlapped.

  Args:
    items: in the order to process them.
    read: item -> input of `compute`; with `prefetch`, in a background thread,
      one item ahead.
    compute: that input -> input of `write`; in the calling thread.
    write: (item, output of `compute`) -> result; with `prefetch`, in a
      background thread, one item behind.
    prefetch: overlap the stages (module docstring); False: the plain loop.

  Returns:
    `write`'s results, in the items' order.

  Raises:
    Whatever a stage raised first in the loop's order, after the items before
    it are written.
  """
  if not prefetch or len(items) < 2:
    return _loop(items, read, compute, write)
  reader = futures.ThreadPoolExecutor(1, thread_name_prefix='unet_jax-read')
  writer = futures.ThreadPoolExecutor(1, thread_name_prefix='unet_jax-write')
  results, ahead, behind = [], reader.submit(read, items[0]), None
  try:
    for i, item in enumerate(items):
      try:
        value = ahead.result()
        ahead = reader.submit(read, items[i + 1]) if i + 1 < len(items) else None
        value = compute(value)
      except BaseException:
        earlier = behind.exception() if behind is not None else None
        if earlier is not None:  # The item before failed to write: its error first.
          raise earlier from None
        raise
      if behind is not None:
        results.append(behind.result())
      behind = writer.submit(write, item, value)
      del value
    results.append(behind.result())
    return results
  finally:
    if ahead is not None:
      ahead.cancel()
    reader.shutdown(wait=True, cancel_futures=True)
    writer.shutdown(wait=True, cancel_futures=True)
