"""The event loop's clock as the runtime reads it (`runner.clock.loop_clock`)."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from runner.clock import loop_clock


@pytest.mark.anyio
async def test_on_asyncios_own_loop_the_clock_is_the_loops_time() -> None:
    clock = loop_clock()
    assert clock is time.monotonic  # what `BaseEventLoop.time` returns, without its frame
    before = asyncio.get_running_loop().time()
    assert before <= clock() <= asyncio.get_running_loop().time()
    assert abs(clock() - anyio.current_time()) < 1


class _ShiftedLoop(asyncio.SelectorEventLoop):
    """A loop whose clock is its own (an hour ahead of `time.monotonic`)."""

    def time(self) -> float:
        return time.monotonic() + 3600


def test_a_loop_with_its_own_time_is_read_through_it() -> None:
    async def read() -> tuple[float, float]:
        return loop_clock()(), asyncio.get_running_loop().time()

    loop = _ShiftedLoop()
    try:
        read_by_clock, read_by_loop = loop.run_until_complete(read())
    finally:
        loop.close()
    assert abs(read_by_clock - read_by_loop) < 1  # the loop's hour-ahead time, not time.monotonic
    assert read_by_clock - time.monotonic() > 3000


def test_outside_a_loop_the_clock_is_anyios() -> None:
    assert loop_clock() is anyio.current_time
