"""The cyclic garbage collector during a run: fewer, larger young collections (`WorkerSettings.gc_threshold`).

CPython collects its youngest generation every 700 net container allocations; a crawl makes hundreds per page (the
HTTP engine's responses, headers, tasks), so the collector runs every page or two, and each tenth run scans the
middle generation too. Most of those objects die by reference count before a larger threshold is reached; the
collector then runs several times less often, for about the same work per run (measured in the README's
Performance section; CPython 3.14 raised its own default to 2,000 for the same reason). The garbage of reference
cycles waits that much longer: about a megabyte at 5,000.
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
