"""The cyclic garbage collector during a run: fewer young collections (`WorkerSettings.gc_threshold`).

CPython runs its youngest generation's collection every 700 net container allocations, and the middle one's every
tenth time: a 3,000-page crawl ran them 314 and 28 times, and the full one twice (about 0.09 ms a page). At 5,000
they ran 38, 3 and 0 times, in about 60 % of the time: a collection's work follows the objects alive when it runs,
and most of a page's objects (the engine's responses, headers, tasks) are freed by their reference counts before
that. Garbage in reference cycles lives that much longer; the benchmarks' peak RSS moved by at most a megabyte
(README, Performance).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DEFAULT_GC_THRESHOLD", "young_threshold"]

DEFAULT_GC_THRESHOLD = 5_000
"""The youngest generation's threshold during a run (Python's own is 700)."""


@contextmanager
def young_threshold(threshold: int) -> Iterator[None]:
    """Raise the collector's youngest threshold to `threshold` for the block (0, or a lower value than the one set,
    changes nothing).

    The process has one collector: on exit the thresholds before are put back only if they are still the ones set
    here (a nested or concurrent run that found them raised leaves them to the run that raised them).
    """
    before = gc.get_threshold()
    if threshold <= before[0] or not gc.isenabled():
        yield
        return
    ours = (threshold, *before[1:])
    gc.set_threshold(*ours)
    try:
        yield
    finally:
        if gc.get_threshold() == ours:
            gc.set_threshold(*before)
