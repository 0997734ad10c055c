"""Group commit (`runner.groupcommit`): batching, and what cancellation does to a call before and after its batch."""

from __future__ import annotations

import anyio
import pytest

from runner.groupcommit import Batched, GroupCommit

pytestmark = pytest.mark.anyio


class Call(Batched):
    __slots__ = ("name", "written")

    def __init__(self, name: str) -> None:
        self.name = name
        self.written = False


class Writer:
    """Records each batch; a batch stays in flight until `release` is set (then `release` is renewed)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = anyio.Event()
        self.fail: BaseException | None = None

    async def write(self, batch: list[Call]) -> None:
        self.batches.append([call.name for call in batch])
        await self.release.wait()
        self.release = anyio.Event()
        if self.fail is not None:
            raise self.fail
        for call in batch:
            call.written = True


async def test_calls_that_arrive_during_a_write_go_together_in_the_next() -> None:
    writer = Writer()
    group = GroupCommit[Call](writer.write)
    calls = [Call(str(n)) for n in range(4)]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(group.submit, call)
                await anyio.wait_all_tasks_blocked()
            writer.release.set()  # the first batch ends ...
            await anyio.wait_all_tasks_blocked()
            writer.release.set()  # ... and the second, which carries the three that waited
    assert writer.batches == [["0"], ["1", "2", "3"]]
    assert all(call.written and call.done for call in calls)


async def test_a_call_cancelled_before_its_batch_is_taken_is_never_written() -> None:
    writer = Writer()
    group = GroupCommit[Call](writer.write)
    first, doomed, last = Call("first"), Call("doomed"), Call("last")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(group.submit, first)
            await anyio.wait_all_tasks_blocked()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await group.submit(doomed)  # waits behind `first`: cancelled there
            tg.start_soon(group.submit, last)
            await anyio.wait_all_tasks_blocked()
            writer.release.set()
            await anyio.wait_all_tasks_blocked()
            writer.release.set()
    assert writer.batches == [["first"], ["last"]]
    assert not doomed.written


async def test_a_failed_write_raises_in_the_caller_that_ran_it_and_ends_the_others() -> None:
    writer = Writer()
    group = GroupCommit[Call](writer.write)
    raised: list[str] = []

    async def submit(call: Call) -> None:
        try:
            await group.submit(call)
        except RuntimeError:
            raised.append(call.name)

    calls = [Call("a"), Call("b"), Call("c")]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(submit, call)
                await anyio.wait_all_tasks_blocked()
            writer.release.set()  # "a" is written; "b" and "c" go next, together
            await anyio.wait_all_tasks_blocked()
            writer.fail = RuntimeError("disk on fire")
            writer.release.set()
    assert writer.batches == [["a"], ["b", "c"]]
    assert len(raised) == 1  # the one that ran the write; the other finds no outcome recorded
    assert all(call.done for call in calls)
    assert [call.written for call in calls] == [True, False, False]
