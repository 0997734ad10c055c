"""The runtime's guarantees under injected faults: every request ends, and a lease is only as good as its proof.

Faults come from real parts: the real `headlock serve` app behind a fault-injecting layer (`tests/_faults.py`), a
real SQLite store, a real file-size limit for a full disk, and handlers that really block the event loop.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import resource
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
import structlog

from runner import (
    Context,
    InvalidItemError,
    JsonlDataset,
    NoRetry,
    NotFoundError,
    Request,
    SqliteQueue,
    Stopper,
    WorkerSettings,
    request_id_for,
    run,
)
from runner.commit import Committer, RetryPolicy
from runner.context import make_draft
from runner.handoff import Handoff
from runner.heartbeat import keep_alive
from runner.leases import Lease, Leases
from runner.models import utc_now
from runner.queue.api import ApiQueue
from runner.results.items import encode_item
from runner.results.jsonl import read_items
from runner.stats import RunStats
from runner.worker import Worker
from tests._faults import FaultPlan, Rule, faulty_server
from tests.conftest import seed

pytestmark = pytest.mark.anyio

URL = "https://a.example/1"
RID = request_id_for(URL)
PUT_REQUEST = r"/requests/[^/]+$"
LOCK = r"/requests/[^/]+/lock$"
HEAD_LOCK = r"/head/lock$"


def fast(**overrides: object) -> WorkerSettings:
    """Worker settings for tests: no retry backoff, short grace."""
    base: dict[str, object] = {"concurrency": 4, "retry_backoff": 0.0, "grace": 5.0, "handler_timeout": 10.0}
    return WorkerSettings.model_validate(base | overrides)


async def api_queue(base_url: str, **options: Any) -> ApiQueue:
    """The served `default` queue over HTTP, with short timeouts and quick retries."""
    return await ApiQueue.open(base_url=base_url, token=None, name="default", **options)


async def items_of(dataset: JsonlDataset) -> list[dict[str, Any]]:
    """The dataset's items, read off the event loop."""
    return await anyio.to_thread.run_sync(read_items, dataset.path)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The captured log events called `name`."""
    return [e for e in logs if e["event"] == name]


# -- every request ends --------------------------------------------------------------------------------------


async def test_a_commit_that_outlives_its_timeout_lets_go_of_the_lease(
    storage: Path, dataset: JsonlDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handled mark stalled past the commit timeout drops the lease: no endless prolonging, the run ends."""
    monkeypatch.setattr("runner.worker.COMMIT_TIMEOUT", 1.0)

    async def handle(ctx: Context) -> None:
        pass

    async with faulty_server(storage / "server") as (url, plan):
        plan.add(Rule("PUT", PUT_REQUEST, stall_before=4.0))
        api = await api_queue(url, timeout=10.0)
        await seed(api, [URL])
        with structlog.testing.capture_logs() as logs, anyio.fail_after(30):
            summary = await run(api, handle, dataset, workers=fast(lock_secs=2.0))
        request = await api.get_request(RID)
        await api.aclose()
    assert events(logs, "request.commit_timed_out")
    assert request is not None
    assert request.handled_at is not None
    assert summary.stats["handled"] + summary.stats["lost"] >= 1


async def test_a_commit_the_queue_refuses_is_recorded_and_retried_per_policy(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A link with no JSON form makes the commit fail for good: recorded as an attempt, then failed, not looped; the
    attempts' items are not stored (the links are checked before anything is written)."""

    async def handle(ctx: Context) -> None:
        await ctx.push_data({"url": ctx.url})
        await ctx.enqueue("https://a.example/child", user_data={"when": object()})

    await seed(queue, [URL])
    with anyio.fail_after(20):
        summary = await run(queue, handle, dataset, workers=fast(max_retries=1))
    request = await queue.get_request(RID)
    assert request is not None
    assert request.handled_at is not None
    assert request.retry_count == 2
    assert len(request.error_messages) == 2
    assert all(m.startswith("commit failed: ") and "JSON" in m for m in request.error_messages)
    assert summary.stats["failed"] == 1
    assert await queue.get_request(request_id_for("https://a.example/child")) is None
    assert await items_of(dataset) == []


async def test_a_handler_blocking_the_event_loop_ends_after_max_retries_and_says_so(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A handler that blocks the loop past its lock counts each attempt, fails after max_retries, and is reported."""

    async def blocking(ctx: Context) -> None:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # the loop is blocked: no prolong can be sent
            pass

    await seed(queue, [URL])
    with structlog.testing.capture_logs() as logs, anyio.fail_after(30):
        summary = await run(queue, blocking, dataset, workers=fast(lock_secs=1.0, max_retries=1))
    request = await queue.get_request(RID)
    assert request is not None
    assert request.handled_at is not None
    assert request.retry_count == 2
    assert len(request.error_messages) == 2
    for message in request.error_messages:
        match = re.fullmatch(r"lock expired: the event loop was blocked for (\d+\.\d) s", message)
        assert match is not None, message
        assert float(match.group(1)) >= 1.0
    assert summary.stats["failed"] == 1
    assert events(logs, "loop.blocked")
    assert await queue.locks() == []


async def test_a_no_retry_from_the_handlers_own_task_group_fails_at_once(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """NoRetry raised inside a task group (so wrapped in an exception group) still fails without retries."""

    async def handle(ctx: Context) -> None:
        async def refuse() -> None:
            raise NoRetry("not for us")

        async with anyio.create_task_group() as tg:
            tg.start_soon(refuse)

    await seed(queue, [URL])
    with anyio.fail_after(20):
        summary = await run(queue, handle, dataset, workers=fast(max_retries=3))
    request = await queue.get_request(RID)
    assert request is not None
    assert request.error_messages == ["NoRetry: not for us"]
    assert (summary.stats["failed"], summary.stats["retried"]) == (1, 0)


async def test_a_wrong_queue_id_stops_the_run_instead_of_retrying_forever(storage: Path, dataset: JsonlDataset) -> None:
    """A 404 on get-head-and-lock (no such queue) is fatal: the run raises NotFoundError at once."""

    async def handle(ctx: Context) -> None:
        pass

    async with faulty_server(storage / "server") as (url, _plan):
        api = ApiQueue(base_url=url, queue_id="NoSuchQueue12345", token=None)
        with anyio.fail_after(10), pytest.raises(NotFoundError, match="head/lock"):
            await run(api, handle, dataset, workers=fast())
        await api.aclose()


# -- bad items and a full disk -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [
        pytest.param({("tuple", "key"): 1}, id="tuple-key"),
        pytest.param({"x": math.nan}, id="nan"),
        pytest.param({"x": [1, {"y": -math.inf}]}, id="infinity"),
        pytest.param({"x": b"bytes"}, id="bytes"),
        pytest.param({"x": {1, 2}}, id="set"),
        pytest.param("a string", id="string"),
        pytest.param(["not a dict"], id="list-of-strings"),
        pytest.param({"x": "\ud800"}, id="lone-surrogate"),
    ],
)
async def test_an_item_json_cannot_represent_is_the_handlers_error(
    queue: SqliteQueue, dataset: JsonlDataset, item: object
) -> None:
    """`push_data` refuses a value JSON has no form for: that request's attempts fail, the run and others go on."""

    async def handle(ctx: Context) -> None:
        if ctx.url == URL:
            await ctx.push_data(item)  # type: ignore[arg-type]
        else:
            await ctx.push_data({"url": ctx.url})

    await seed(queue, [URL, "https://a.example/2"])
    with anyio.fail_after(20):
        summary = await run(queue, handle, dataset, workers=fast(max_retries=1))
    request = await queue.get_request(RID)
    assert request is not None
    assert request.retry_count == 2
    assert all(m.startswith("InvalidItemError: ") for m in request.error_messages)
    assert (summary.stats["handled"], summary.stats["failed"]) == (1, 1)
    assert await items_of(dataset) == [{"url": "https://a.example/2"}]


@pytest.mark.parametrize(
    ("item", "stored"),
    [
        pytest.param({"big": 2**70}, {"big": 2**70}, id="int-past-64-bits"),
        pytest.param({1: "a", None: "b"}, {"1": "a", "null": "b"}, id="non-string-keys"),
        pytest.param({"title": None, "n": 1.5}, {"title": None, "n": 1.5}, id="null"),
        pytest.param({"at": dt.date(2026, 12, 2)}, {"at": "2026-12-02"}, id="date"),
    ],
)
def test_values_json_has_a_form_for_are_stored(item: dict[Any, Any], stored: dict[str, Any]) -> None:
    """What the fast encoder refuses or cannot be trusted with, JSON may still have a form for: stored as it."""
    assert json.loads(encode_item(item)) == stored


async def test_a_circular_item_is_refused_by_push_data() -> None:
    """A dict that contains itself is refused with InvalidItemError, not a crash."""
    item: dict[str, Any] = {}
    item["self"] = item
    with pytest.raises(InvalidItemError, match="Circular"):
        encode_item(item)


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A real full disk for this process: files cannot grow past `limit` bytes (writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def test_a_full_disk_fails_the_attempt_and_never_leaves_a_partial_line(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """Items that do not fit on the disk fail that attempt (recorded, retried): the file holds only whole lines."""
    await anyio.to_thread.run_sync(dataset.push, [{"filler": "x" * 1000}] * 900)  # about 900 KB already there
    big = "y" * 60_000

    async def handle(ctx: Context) -> None:
        await ctx.push_data([{"url": ctx.url, "big": big}] * 3)

    await seed(queue, [URL])
    path = anyio.Path(dataset.path)
    size = (await path.stat()).st_size
    with file_size_limit(size + 100_000), anyio.fail_after(20):
        summary = await run(queue, handle, dataset, workers=fast(max_retries=1))
    assert (await path.stat()).st_size == size  # nothing half-written stayed
    assert all(line.endswith("}") for line in (await path.read_text()).splitlines())
    request = await queue.get_request(RID)
    assert request is not None
    assert request.retry_count == 2
    assert all("commit failed: " in m and "dataset" in m for m in request.error_messages)
    assert summary.stats["failed"] == 1


# -- a lease is only as good as its proof --------------------------------------------------------------------


async def test_a_lost_leases_late_failure_is_not_written_over_the_new_holders_outcome(
    storage: Path, queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A handler failing after its lock was taken and handled by another client records nothing (fenced)."""
    stolen = anyio.Event()
    thief = SqliteQueue.open(storage, "default")

    async def handle(ctx: Context) -> None:
        # Behind the worker's back: its lock is released and the request taken and handled by another client.
        await thief.unlock_requests(client_key="victim")
        head = await thief.lock_head(limit=1, lock_secs=30, client_key="thief")
        await thief.update_request(head.items[0].model_copy(update={"handled_at": utc_now()}), client_key="thief")
        stolen.set()
        raise RuntimeError("late failure")

    await seed(queue, [URL])
    with anyio.fail_after(20):
        summary = await run(queue, handle, dataset, workers=fast(client_key="victim", lock_secs=30.0))
    await thief.aclose()
    request = await queue.get_request(RID)
    assert stolen.is_set()
    assert request is not None
    assert request.handled_at is not None  # still the thief's outcome
    assert (request.retry_count, request.error_messages) == (0, [])
    assert summary.stats["lost"] == 1


async def test_a_request_handed_out_again_replaces_its_stale_lease_and_cancels_its_handler() -> None:
    """Locking a request whose lease is still registered loses the old lease (handler cancelled, counts right)."""
    leases = Leases()
    stored = Request(id=RID, unique_key=URL, url=URL)
    old = leases.add(stored, anyio.current_time() + 10)
    scope = anyio.CancelScope()
    assert leases.start(old, scope)
    new = leases.add(stored, anyio.current_time() + 10)
    assert old.lost
    assert old.expired
    assert scope.cancel_called
    assert leases.get(RID) is new
    assert leases.statistics() == (1, 0, 1)
    leases.remove(old)  # a late removal of the old lease leaves the new one alone
    assert leases.get(RID) is new


async def test_a_lock_taken_after_retries_is_dated_from_the_attempt_that_took_it(
    storage: Path, dataset: JsonlDataset
) -> None:
    """Get-head-and-lock answered 503 twice: the lease counts from the third attempt, so the handler's work stands."""

    async def handle(ctx: Context) -> None:
        await ctx.push_data({"url": ctx.url})

    async with faulty_server(storage / "server") as (url, plan):
        api = await api_queue(url, timeout=10.0)
        await seed(api, [URL, "https://a.example/2"])
        plan.add(Rule("POST", HEAD_LOCK, times=2, answer=503, retry_after="1.5"))
        with anyio.fail_after(30):
            summary = await run(api, handle, dataset, workers=fast(lock_secs=2.5))
        request = await api.get_request(RID)
        await api.aclose()
    assert plan.count("POST", HEAD_LOCK) >= 3
    assert request is not None
    assert (request.retry_count, request.error_messages) == (0, [])
    assert (summary.stats["handled"], summary.stats["lost"]) == (2, 0)


async def test_one_stalled_prolong_does_not_hold_back_the_others(storage: Path) -> None:
    """While one lease's prolong stalls until its lock runs out, a lease due at the next beat is still prolonged."""
    lock_secs = 4.0
    async with faulty_server(storage / "server") as (url, plan):
        api = await api_queue(url, timeout=30.0)
        await seed(api, [URL, "https://a.example/2"])
        head = await api.lock_head(limit=2, lock_secs=30, client_key="k")
        first, second = sorted(head.items, key=lambda r: r.url)
        plan.add(Rule("PUT", rf"/requests/{first.id}/lock$", times=10, stall_before=30.0))
        leases, stats = Leases(), RunStats()
        now = anyio.current_time()
        stalled = leases.add(first, now + 2.6)  # due at the first beat (t = 1): its prolong stalls until 2.6
        later = leases.add(second, now + 3.6)  # not due at t = 1; due at t = 2, well before the stall ends
        async with anyio.create_task_group() as tg:
            await tg.start(partial(keep_alive, api, leases, stats, client_key="k", lock_secs=lock_secs))
            with anyio.fail_after(10):
                await leases.wait_changed(until=lambda: stalled.lost)
            renewed = later.expires_at
            tg.cancel_scope.cancel()
        await api.aclose()
    assert stalled.lost
    assert not later.lost
    assert renewed > now + 3.6  # prolonged while the other lease's call was stalled


async def test_a_prolong_in_flight_cannot_stretch_a_short_retry_backoff(storage: Path, dataset: JsonlDataset) -> None:
    """A heartbeat prolong still in flight when the attempt fails lands first: the retry comes after the backoff."""
    attempts: list[float] = []
    failed_at: list[float] = []

    async with faulty_server(storage / "server") as (url, plan):
        api = await api_queue(url, timeout=10.0)
        await seed(api, [URL])
        arrived = plan.arrived("PUT", LOCK)
        plan.add(Rule("PUT", LOCK, stall_before=0.5))

        async def handle(ctx: Context) -> None:
            attempts.append(anyio.current_time())
            if len(attempts) == 1:
                await arrived.wait()  # the heartbeat's prolong is on its way (stalled before the server)
                failed_at.append(anyio.current_time())
                raise RuntimeError("fails while its lock is being prolonged")

        with anyio.fail_after(30):
            summary = await run(api, handle, dataset, workers=fast(lock_secs=4.0, retry_backoff=1.0))
        await api.aclose()
    assert len(attempts) == 2
    # The stalled prolong (4 s) landing after the give-back's (a backoff of 0.75-1.25 s) would hold the request
    # until 4.5 s after the failure.
    assert attempts[1] - failed_at[0] < 3.0
    assert summary.stats["handled"] == 1


async def test_locks_taken_by_a_call_whose_answer_was_lost_do_not_hold_up_the_end(
    storage: Path, dataset: JsonlDataset
) -> None:
    """A get-head-and-lock applied but unanswered leaves orphan locks: they are freed when idle, not waited out."""
    handled: Counter[str] = Counter()

    async def handle(ctx: Context) -> None:
        handled[ctx.url] += 1

    urls = [f"https://a.example/{i}" for i in range(3)]
    async with faulty_server(storage / "server") as (url, plan):
        api = await api_queue(url, timeout=1.0)
        await seed(api, urls)
        plan.add(Rule("POST", HEAD_LOCK, stall_after=5.0))  # locks applied, the answer comes after the timeout
        with anyio.fail_after(20):  # the orphans' locks (60 s) would otherwise be waited out
            await run(api, handle, dataset, workers=fast(lock_secs=60.0))
        info = await api.get_info()
        await api.aclose()
    assert set(handled) == set(urls)
    assert info.handled_request_count == 3


async def test_shutdown_ends_within_grace_plus_ten_seconds_whatever_stalls(
    storage: Path, dataset: JsonlDataset
) -> None:
    """A handled mark and give-backs that never answer cannot stretch a graceful stop past grace + 10 s."""
    started = anyio.Event()

    async def handle(ctx: Context) -> None:
        started.set()

    stopper = Stopper()
    plan: FaultPlan
    async with faulty_server(storage / "server") as (url, plan):
        api = await api_queue(url, timeout=120.0, max_retries=0)
        await seed(api, [f"https://a.example/{i}" for i in range(10)])
        plan.add(Rule("PUT", PUT_REQUEST, times=100, stall_before=300.0))
        plan.add(Rule("DELETE", LOCK, times=100, stall_before=300.0))
        plan.add(Rule("POST", r"/requests/unlock$", times=100, stall_before=300.0))

        async def stop_soon() -> None:
            await started.wait()
            stopper.stop("test")

        grace = 1.0
        with anyio.fail_after(grace + 10 + 5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_soon)
                began = anyio.current_time()
                summary = await run(api, handle, dataset, workers=fast(grace=grace, concurrency=2), stopper=stopper)
                took = anyio.current_time() - began
        await api.aclose()
    assert summary.reason == "test"
    assert took <= grace + 10


# -- the guards, each with a test that fails without it (see tests/mutation.py) -------------------------------


async def test_nothing_is_committed_under_a_lease_whose_lock_ran_out(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """The committer's fence: a lease past its expiry stores no item, adds no link and marks nothing handled."""
    await seed(queue, [URL])
    head = await queue.lock_head(limit=1, lock_secs=30, client_key="k")
    leases, stats = Leases(), RunStats()
    committer = Committer(queue, leases, dataset, stats, client_key="k", policy=RetryPolicy())
    lease = leases.add(head.items[0], anyio.current_time() - 0.001)  # our reckoning says it ran out
    leases.start(lease, anyio.CancelScope())
    ok = await committer.succeed(lease, {False: [make_draft("https://a.example/child")]}, [encode_item({"a": 1})])
    assert not ok
    request = await queue.get_request(RID)
    assert request is not None
    assert request.handled_at is None
    assert await items_of(dataset) == []
    assert RID not in leases
    assert stats.lost == 1


async def test_a_lease_whose_prolongs_keep_failing_is_lost_when_its_lock_runs_out(storage: Path) -> None:
    """Prolongs answered 503 every time: the lease is lost at its expiry (its handler cancelled), not kept on."""
    async with faulty_server(storage / "server") as (url, plan):
        api = await api_queue(url, timeout=5.0, max_retries=0)
        await seed(api, [URL])
        head = await api.lock_head(limit=1, lock_secs=30, client_key="k")
        plan.add(Rule("PUT", LOCK, times=1000, answer=503))
        leases, stats = Leases(), RunStats()
        lease = leases.add(head.items[0], anyio.current_time() + 1.5)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(keep_alive, api, leases, stats, client_key="k", lock_secs=2.0))
            with anyio.fail_after(10):
                await leases.wait_changed(until=lambda: lease.lost)
            tg.cancel_scope.cancel()
        await api.aclose()
    assert lease.lost
    assert lease.expired
    assert anyio.current_time() >= lease.expires_at
    assert plan.count("PUT", LOCK) >= 1


async def test_a_retry_waits_for_its_backoff(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """A failed request is attempted again only after the retry backoff (base 1 s: at least 0.75 s later)."""
    attempts: list[float] = []
    failed_at: list[float] = []

    async def once_failing(ctx: Context) -> None:
        attempts.append(anyio.current_time())
        if len(attempts) == 1:
            failed_at.append(anyio.current_time())
            raise RuntimeError("first")

    await seed(queue, [URL])
    with anyio.fail_after(20):
        await run(queue, once_failing, dataset, workers=fast(retry_backoff=1.0))
    assert len(attempts) == 2
    assert attempts[1] - failed_at[0] >= 0.75


async def test_requests_given_back_on_shutdown_keep_their_place_at_the_front(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """Prefetched requests released by a graceful stop go back to the head, ahead of the requests never locked."""
    release = anyio.Event()
    started: list[str] = []

    async def handle(ctx: Context) -> None:
        started.append(ctx.url)
        if len(started) == 2:
            stopper.stop("test")
        await release.wait()

    urls = [f"https://a.example/{i:02d}" for i in range(20)]
    await seed(queue, urls)
    stopper = Stopper()

    async def let_go() -> None:
        await stopper.graceful.wait()
        release.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            summary = await run(queue, handle, dataset, workers=fast(concurrency=2, prefetch=5), stopper=stopper)
    given_back = summary.stats["given_back"]
    assert given_back == 5
    head = await queue.lock_head(limit=given_back, lock_secs=30, client_key="after")
    # The five prefetched ones (locked right after the two started) come first, not the 13 never locked.
    assert sorted(r.url for r in head.items) == urls[2:7]


async def test_a_lease_that_ran_out_while_buffered_is_not_run(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """A worker given a lease whose lock already ran out (by our reckoning) neither runs the handler nor commits."""
    ran: list[str] = []

    async def handle(ctx: Context) -> None:
        ran.append(ctx.url)

    await seed(queue, [URL])
    head = await queue.lock_head(limit=1, lock_secs=30, client_key="k")
    leases, stats = Leases(), RunStats()
    committer = Committer(queue, leases, dataset, stats, client_key="k", policy=RetryPolicy())
    handoff = Handoff[Lease]()
    handoff.put(leases.add(head.items[0], anyio.current_time() - 0.001))
    handoff.end()
    async with httpx.AsyncClient() as http:
        await Worker(handle, committer, http, {}, 10.0).run(handoff)
    assert ran == []
    assert stats.lost == 1
    request = await queue.get_request(RID)
    assert request is not None
    assert (request.handled_at, request.retry_count) == (None, 0)


async def _two_leases(queue: SqliteQueue, dataset: JsonlDataset) -> tuple[Committer, Handoff[Lease], list[Lease]]:
    """Two requests locked for "k", in a hand-off that then ends, and a committer over them."""
    await seed(queue, [URL, f"{URL}/next"])
    head = await queue.lock_head(limit=2, lock_secs=30, client_key="k")
    leases = Leases()
    committer = Committer(queue, leases, dataset, RunStats(), client_key="k", policy=RetryPolicy())
    handoff = Handoff[Lease]()
    held = [leases.add(request, anyio.current_time() + 30) for request in head.items]
    for lease in held:
        handoff.put(lease)
    handoff.end()
    return committer, handoff, held


async def test_a_lease_lost_while_its_failure_is_recorded_does_not_cancel_the_next_handler(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A worker's attempts share its cancel scope: a lease lost after its handler ended (here while its failure is
    being recorded) must not cancel the handler of the worker's next request."""
    committer, handoff, held = await _two_leases(queue, dataset)
    failed = anyio.Event()
    ran: list[str] = []

    async def handle(ctx: Context) -> None:
        if ctx.request.id == held[0].request.id:
            failed.set()
            raise RuntimeError("first one fails")
        await anyio.lowlevel.checkpoint()  # where a stale cancellation would land
        ran.append(ctx.url)

    async def lose_first() -> None:
        await failed.wait()  # runs while the worker waits for the store to record the failure
        committer.leases.lose(held[0], "test: lost after its handler ended")

    with anyio.fail_after(10):
        async with httpx.AsyncClient() as http, anyio.create_task_group() as tg:
            tg.start_soon(lose_first)
            await Worker(handle, committer, http, {}, 10.0).run(handoff)
    assert ran == [held[1].request.url]
    second = await queue.get_request(held[1].request.id)
    assert second is not None
    assert (second.handled_at is not None, second.retry_count) == (True, 0)


async def test_a_handler_that_turns_its_timeout_into_an_error_leaves_the_next_one_uncancelled(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A handler catching its timeout's cancellation and raising something else is recorded with that error; the
    worker's next request runs in a fresh scope, not in the cancelled one."""
    committer, handoff, held = await _two_leases(queue, dataset)
    ran: list[str] = []

    async def handle(ctx: Context) -> None:
        if ctx.request.id == held[0].request.id:
            try:
                await anyio.sleep(30)
            except anyio.get_cancelled_exc_class():
                raise RuntimeError("cleanup failed") from None
        await anyio.lowlevel.checkpoint()
        ran.append(ctx.url)

    with anyio.fail_after(10):
        async with httpx.AsyncClient() as http:
            await Worker(handle, committer, http, {}, 0.3).run(handoff)
    assert ran == [held[1].request.url]
    first, second = [await queue.get_request(lease.request.id) for lease in held]
    assert first is not None
    assert second is not None
    assert first.error_messages == ["RuntimeError: cleanup failed"]
    assert (second.handled_at is not None, second.retry_count) == (True, 0)


async def test_a_lease_the_queue_refuses_is_dropped_not_recorded_as_an_attempt(
    storage: Path, queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A prolong refused (another client holds the lock) cancels the handler; the attempt is neither recorded nor
    re-proved, and the new holder's lock is left alone."""
    started, cancelled = anyio.Event(), anyio.Event()
    thief = SqliteQueue.open(storage, "default")
    stopper = Stopper()

    async def handle(ctx: Context) -> None:
        started.set()
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()

    async def steal() -> None:
        await started.wait()
        await thief.unlock_requests(client_key="victim")
        await thief.lock_head(limit=1, lock_secs=30, client_key="thief")
        await cancelled.wait()
        stopper.stop("test")  # the run would otherwise wait for the thief's lock to run out

    await seed(queue, [URL])
    with structlog.testing.capture_logs() as logs, anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(steal)
            summary = await run(
                queue,
                handle,
                dataset,
                workers=fast(client_key="victim", lock_secs=1.0),
                stopper=stopper,
            )
    locks = await queue.locks()
    await thief.aclose()
    assert summary.stats["lost"] == 1
    dropped = events(logs, "lease.dropped")
    assert dropped
    assert all("not locked by this client" in e["reason"] for e in dropped)
    assert not events(logs, "lease.reclaim_failed")
    assert [(rid, holder) for rid, holder, _ in locks] == [(RID, "thief")]
    request = await queue.get_request(RID)
    assert request is not None
    assert request.retry_count == 0
