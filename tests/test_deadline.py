"""The worker's deadline (`runner.deadline.Deadline`): one loop timer for one task's successive scopes."""

from __future__ import annotations

import anyio
import pytest

from runner.deadline import Deadline

pytestmark = pytest.mark.anyio

STEP = 0.05


async def test_a_watched_scope_is_cancelled_at_its_time() -> None:
    deadline = Deadline()
    started = anyio.current_time()
    with deadline.scope() as scope:
        deadline.watch(scope, started + STEP)
        await anyio.sleep(30)
    elapsed = anyio.current_time() - started
    assert scope.cancelled_caught
    assert STEP <= elapsed < 5
    deadline.close()


async def test_the_timer_of_an_earlier_scope_does_not_cut_a_later_one_short() -> None:
    # The first attempt ends at once; its deadline's timer stays armed and fires while the second one runs, whose
    # own deadline is later: that one must go on to its own time.
    deadline = Deadline()
    first = anyio.current_time()
    with deadline.scope() as scope:
        deadline.watch(scope, first + STEP)
    deadline.clear()
    second = anyio.current_time()
    with deadline.scope() as later:
        deadline.watch(later, second + 6 * STEP)
        await anyio.sleep(3 * STEP)  # past the first deadline
        assert not later.cancel_called
        await anyio.sleep(30)
    assert later.cancelled_caught
    assert anyio.current_time() - second >= 6 * STEP
    deadline.close()


async def test_an_earlier_deadline_rearms_the_timer() -> None:
    # The commit's deadline moves the attempt's: when it is earlier than the armed timer, it must still hold.
    deadline = Deadline()
    started = anyio.current_time()
    with deadline.scope() as scope:
        deadline.watch(scope, started + 60)
        deadline.watch(scope, started + STEP)
        await anyio.sleep(10)
    assert scope.cancelled_caught
    assert anyio.current_time() - started < 5
    deadline.close()


async def test_a_cleared_watch_cancels_nothing() -> None:
    deadline = Deadline()
    with deadline.scope() as scope:
        deadline.watch(scope, anyio.current_time() + STEP)
        deadline.clear()
        await anyio.sleep(3 * STEP)
    assert not scope.cancel_called
    deadline.close()
