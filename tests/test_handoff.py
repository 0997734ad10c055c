"""The fetcher-to-workers hand-off (`runner.handoff.Handoff`): order, the end, and nothing lost to cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import pytest

from runner.handoff import Handoff

pytestmark = pytest.mark.anyio


async def take(handoff: Handoff[str], got: list[str], name: str) -> None:
    """Consume `handoff` into `got`, each item as `name:item`, until it ends."""
    async for item in handoff:
        got.append(f"{name}:{item}")


async def take_one(handoff: Handoff[str], got: list[str], name: str) -> None:
    """Take one item of `handoff` into `got` as `name:item`."""
    async for item in handoff:
        got.append(f"{name}:{item}")
        return


async def test_items_go_to_the_longest_waiting_consumer_then_to_the_buffer() -> None:
    handoff, got = Handoff[str](), []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take_one, handoff, got, "a")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(take_one, handoff, got, "b")
            await anyio.wait_all_tasks_blocked()
            for item in ("1", "2", "3"):
                handoff.put(item)
            assert len(handoff) == 1  # two were handed to the waiting consumers, one is buffered
    assert got == ["a:1", "b:2"]
    assert handoff.take_all() == ["3"]
    assert len(handoff) == 0


async def test_the_end_stops_consumers_once_the_buffer_is_empty_and_refuses_more() -> None:
    handoff, got = Handoff[str](), []
    handoff.put("1")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, handoff, got, "a")
            tg.start_soon(take, handoff, got, "b")
            await anyio.wait_all_tasks_blocked()
            handoff.end()
            handoff.end()
    assert got == ["a:1"]
    with pytest.raises(anyio.ClosedResourceError):
        handoff.put("2")


async def test_an_item_handed_to_a_consumer_cancelled_before_it_ran_goes_to_the_next() -> None:
    """Cancelled between being handed an item and running: the item goes on to the next consumer, not lost.

    anyio's cancel scopes wait for such a task to run on (it then has the item); a plain `Task.cancel` does not,
    so the fault is injected with one, on a task of its own.
    """
    handoff, got = Handoff[str](), []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            doomed = asyncio.get_running_loop().create_task(take_one(handoff, got, "a"))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(take_one, handoff, got, "b")
            await anyio.wait_all_tasks_blocked()
            handoff.put("1")  # to "a", the longest waiting ...
            doomed.cancel()  # ... cancelled before it runs
            await asyncio.wait([doomed])
    assert doomed.cancelled()
    assert got == ["b:1"]


async def test_a_consumer_cancelled_while_waiting_is_not_handed_anything() -> None:
    handoff, got = Handoff[str](), []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            doomed = anyio.CancelScope()
            tg.start_soon(_in_scope, doomed, take, handoff, got, "a")
            await anyio.wait_all_tasks_blocked()
            doomed.cancel()
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(take_one, handoff, got, "b")
            await anyio.wait_all_tasks_blocked()
            handoff.put("1")
    assert got == ["b:1"]


async def _in_scope(scope: anyio.CancelScope, fn: Callable[..., Awaitable[None]], *args: object) -> None:
    """Run `fn(*args)` inside `scope`, so the test can cancel this one task."""
    with scope:
        await fn(*args)
