"""The event loop's clock, read cheaply: the time every lease, deadline and backoff is measured on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import anyio
import sniffio

__all__ = ["loop_clock"]


def loop_clock() -> Callable[[], float]:
    """A function returning what `anyio.current_time()` returns, without anyio's lookup of the running backend at
    every call (about a seventh of its cost, and the hot path reads the clock several times a request).

    On asyncio that is the running loop's own `time`, or `time.monotonic` itself where that is all the loop's `time`
    does (asyncio's own loops: one Python frame fewer a read); elsewhere, or outside an event loop,
    `anyio.current_time`. Keep it only as long as the loop it was taken in runs.
    """
    try:
        if sniffio.current_async_library() == "asyncio":
            loop = asyncio.get_running_loop()
            return time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
    except (sniffio.AsyncLibraryNotFoundError, RuntimeError):
        pass
    return anyio.current_time
