"""Contract tests of the embedded SQLite store (API contract §2, §4, §7, §8, §9) on real files in tmp_path."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from runner.errors import (
    AlreadyHandledError,
    InvalidInputError,
    LockLostError,
    NotFoundError,
    QueueError,
    QueueUnavailableError,
)
from runner.models import QueueCounts, Request, RequestDraft, with_failed_mark
from runner.queue._checkpoint import Checkpointer
from runner.queue._rows import _dump, _plain_json
from runner.queue.admin import MAX_REQUEUE_BATCH, QueueAdmin, RequeueResult
from runner.queue.protocol import RequestQueue
from runner.queue.sqlite import (
    _COUNTS,
    _HAS_LIVE_LOCKS,
    _HEAD_QUERY,
    _LIVE_LOCKS,
    _LOCKS_BY_CLIENT,
    _UNLOCK_CLIENT,
    SqliteQueue,
    StoreClock,
    queue_path,
    validate_queue_name,
)
from runner.uniquekey import normalize_url, request_id_for

A = "client-a"
B = "client-b"
LONG = 60.0  # a lock that outlives any test
SHORT = 0.3  # a lock the test waits out by polling


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteQueue]:
    queue = SqliteQueue(tmp_path / "q.sqlite")
    yield queue
    await queue.aclose()


def url(n: int | str) -> str:
    return f"http://example.com/{n}"


def draft(n: int | str, **extra: object) -> RequestDraft:
    return RequestDraft(unique_key=url(n), url=url(n), user_data={"n": str(n)}, **extra)


def stored(n: int | str, **fields: object) -> Request:
    return Request(id=request_id_for(url(n)), unique_key=url(n), url=url(n), **fields)


async def add(queue: SqliteQueue, *keys: int | str, forefront: bool = False, client_key: str = A) -> list[str]:
    result = await queue.batch_add([draft(k) for k in keys], client_key=client_key, forefront=forefront)
    return [p.request_id for p in result.processed_requests]


async def lock_keys(queue: SqliteQueue, client_key: str = A, *, limit: int = 25) -> list[str]:
    """Lock the head and return the locked requests' `userData.n` in head order."""
    head = await queue.lock_head(limit=limit, lock_secs=LONG, client_key=client_key)
    return [r.user_data["n"] for r in head.items]


async def poll_lock_head(queue: SqliteQueue, client_key: str) -> list[Request]:
    """Lock the head until it yields something; bounded by a deadline and a number of tries."""
    with anyio.fail_after(5):
        for _ in range(250):
            head = await queue.lock_head(limit=25, lock_secs=LONG, client_key=client_key)
            if head.items:
                return head.items
            await anyio.sleep(0.02)
    pytest.fail("lock_head never returned the request")


class Raw:
    """A connection of the test's own to a queue file, used from async tests through a worker thread, off the loop."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """Run one statement; return its rows."""
        return await anyio.to_thread.run_sync(lambda: self.db.execute(sql, params).fetchall())

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await anyio.to_thread.run_sync(self.db.executemany, sql, rows)


@asynccontextmanager
async def raw_connection(path: Path, *, busy_timeout: float = 5.0) -> AsyncIterator[Raw]:
    """A `Raw` connection (autocommit) to `path`, closed on exit."""
    db = await anyio.to_thread.run_sync(
        partial(sqlite3.connect, path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
    )
    try:
        yield Raw(db)
    finally:
        await anyio.to_thread.run_sync(db.close)


class SteppedTime:
    """A wall clock and a monotonic clock (ns) that a test moves by hand: `elapse` moves both, `step_wall` one."""

    def __init__(self, wall: int | None = None) -> None:
        self.wall = time.time_ns() if wall is None else wall
        self.mono = 10**15

    def elapse(self, secs: float) -> None:
        self.wall += int(secs * 1e9)
        self.mono += int(secs * 1e9)

    def step_wall(self, secs: float) -> None:
        self.wall += int(secs * 1e9)

    def clock(self) -> StoreClock:
        """A store clock reading these two (one per store: it holds the store's anchor)."""
        return StoreClock(wall_ns=lambda: self.wall, monotonic_ns=lambda: self.mono)


async def handle(queue: SqliteQueue, n: int | str, client_key: str = A) -> None:
    request = await queue.get_request(request_id_for(url(n)))
    assert request is not None
    request.handled_at = datetime.now(UTC)
    await queue.update_request(request, client_key=client_key)


# -- ids and unique keys (§7) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unique_key", "request_id"),
    [
        ("http://example.com", "8OamqXBCpPHxyH9"),
        ("http://example.com/a/b", "ZJAoqlRijenMQIn"),
        ("http://example.com/c/d", "hAhkwyk5oOBHKQC"),
    ],
)
def test_request_id_is_platform_hash_of_unique_key(unique_key: str, request_id: str) -> None:
    """The request id is the first 15 chars of base64(sha256(uniqueKey)) without +/=, as in the OAS examples."""
    assert request_id_for(unique_key) == request_id


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("HTTP://www.EXAMPLE.com/something/", "http://www.example.com/something"),
        ("https://example.com/?b=2&a=1&utm_source=x#frag", "https://example.com?a=1&b=2"),
        ("https://Example.com:443/A%20b/Path?q=hello world&Z=1", "https://example.com/A%20b/Path?Z=1&q=hello+world"),
        ("https://example.com/?a=2&a=1", "https://example.com?a=2&a=1"),
        ("http://example.com:8080/a b/", "http://example.com:8080/a%20b"),
    ],
)
def test_normalize_url_matches_crawlee_js(raw: str, normalized: str) -> None:
    """normalize_url gives the contract §7.2 results (Crawlee JS normalizeUrl)."""
    assert normalize_url(raw) == normalized


# -- the Protocol and the file -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_store_implements_protocol(store: SqliteQueue) -> None:
    """SqliteQueue satisfies the RequestQueue Protocol."""
    assert isinstance(store, RequestQueue)


@pytest.mark.parametrize("name", ["a", "Q1", "my-queue", "a" * 63])
def test_valid_queue_names_are_accepted(name: str) -> None:
    """DNS-safe names of 1-63 chars are valid and map to request_queues/<name>.sqlite."""
    assert validate_queue_name(name) == name
    assert queue_path(Path("/s"), name) == Path("/s/request_queues") / f"{name}.sqlite"


@pytest.mark.parametrize(
    "name", ["", "-a", "a-", "a_b", "a.b", "a/b", "../etc", "a b", "a" * 64, "default\n", "default\r\n", "\ndefault"]
)
def test_invalid_queue_names_are_rejected(name: str, tmp_path: Path) -> None:
    """Names outside the DNS-safe rule raise InvalidInputError and create no file."""
    with pytest.raises(InvalidInputError, match="invalid queue name"):
        validate_queue_name(name)
    with pytest.raises(InvalidInputError):
        SqliteQueue.open(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_open_by_name_creates_named_queue(tmp_path: Path) -> None:
    """SqliteQueue.open creates request_queues/<name>.sqlite and names the queue after it."""
    queue = SqliteQueue.open(tmp_path, "shop-1")
    try:
        info = await queue.get_info()
    finally:
        await queue.aclose()
    assert await anyio.to_thread.run_sync((tmp_path / "request_queues" / "shop-1.sqlite").is_file)
    assert info.name == "shop-1"
    assert len(info.id) == 17
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (0, 0, 0)


@pytest.mark.anyio
async def test_corrupt_file_raises_queue_unavailable_naming_path(tmp_path: Path) -> None:
    """A file that is not SQLite makes the first call raise QueueUnavailableError naming the path, every time."""
    path = tmp_path / "q.sqlite"
    await anyio.to_thread.run_sync(path.write_bytes, b"definitely not a database\x00\xff" * 64)
    queue = SqliteQueue(path)
    try:
        for _ in range(2):  # a failed open is tried again by the next call
            with pytest.raises(QueueUnavailableError, match=re.escape(str(path))) as caught:
                await queue.get_info()
            assert "not a database" in str(caught.value)
            assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_foreign_sqlite_file_raises_queue_unavailable_until_it_is_a_queue(tmp_path: Path) -> None:
    """A SQLite file of something else is refused by each call, naming the path, until it can hold the queue."""
    path = tmp_path / "q.sqlite"
    async with raw_connection(path) as raw:
        await raw.execute("CREATE TABLE requests (id TEXT PRIMARY KEY, body TEXT)")
    queue = SqliteQueue(path)
    try:
        with pytest.raises(QueueUnavailableError, match=re.escape(f"{path} is not a headlock queue database")):
            await add(queue, 1)
        with pytest.raises(QueueUnavailableError, match=re.escape(f"{path} is not a headlock queue database")):
            await queue.get_info()
        async with raw_connection(path) as raw:
            await raw.execute("DROP TABLE requests")
        await add(queue, 1)
        assert (await queue.get_info()).total_request_count == 1
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_open_takes_no_lock_and_the_first_call_waits_off_the_event_loop(tmp_path: Path) -> None:
    """Opening a write-locked file returns at once; the first call waits in the store's thread, the loop runs on."""
    path = queue_path(tmp_path, "q")
    first = SqliteQueue(path)
    await add(first, 1)
    await first.aclose()
    ticks = 0
    answered = anyio.Event()
    infos = []

    async def first_call(queue: SqliteQueue) -> None:
        infos.append(await queue.get_info())
        answered.set()

    async with raw_connection(path) as raw:
        await raw.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        queue = SqliteQueue.open(tmp_path, "q", busy_timeout=5)
        assert time.monotonic() - started < 0.5
        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(first_call, queue)
                    for _ in range(1000):
                        if ticks >= 5:
                            break
                        await anyio.sleep(0.01)  # the ticker whose progress is measured, not a wait
                        ticks += 1
                    assert not answered.is_set()  # still waiting for the lock, yet the loop ran
                    await raw.execute("ROLLBACK")
                    await answered.wait()
        finally:
            await queue.aclose()
    assert ticks >= 5
    assert [info.total_request_count for info in infos] == [1]


@pytest.mark.anyio
async def test_a_call_cancelled_while_it_runs_in_the_store_thread_waits_for_its_end(store: SqliteQueue) -> None:
    """Cancelling a caller does not leave the connection in the middle of its call: it returns when the call ends."""
    await add(store, 1)
    returned = anyio.Event()

    async def cancelled_call(scope: anyio.CancelScope) -> None:
        with scope:
            await store.batch_add([draft(2)], client_key=A)  # waits in the thread for the raw lock
        returned.set()

    async with raw_connection(store.path) as raw:
        await raw.execute("BEGIN IMMEDIATE")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()
                tg.start_soon(cancelled_call, scope)
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
                await anyio.wait_all_tasks_blocked()
                assert not returned.is_set()  # still waiting for its call in the thread
                await raw.execute("ROLLBACK")
                await returned.wait()
    assert scope.cancelled_caught
    assert (await store.get_info()).total_request_count == 2  # the call ran to its end


@pytest.mark.anyio
async def test_a_write_cancelled_before_its_batch_goes_to_the_thread_is_never_written(store: SqliteQueue) -> None:
    """Writes made while a batch is in the thread wait for the next one: one cancelled meanwhile is dropped, the
    others go when the batch before ends."""
    await add(store, 1)
    outcomes: dict[int, str] = {}

    async def write(n: int, scope: anyio.CancelScope) -> None:
        with scope:
            await store.batch_add([draft(n)], client_key=A)
            outcomes[n] = "written"
        if scope.cancelled_caught:
            outcomes[n] = "cancelled"

    async with raw_connection(store.path) as raw:
        await raw.execute("BEGIN IMMEDIATE")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                scopes = {n: anyio.CancelScope() for n in (2, 3, 4)}
                tg.start_soon(write, 2, scopes[2])  # goes to the thread, which waits for the raw lock
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(write, 3, scopes[3])
                tg.start_soon(write, 4, scopes[4])
                await anyio.wait_all_tasks_blocked()
                scopes[3].cancel()
                await anyio.wait_all_tasks_blocked()
                assert outcomes == {3: "cancelled"}  # at once: it was not in the thread yet
                await raw.execute("ROLLBACK")
    assert outcomes == {2: "written", 3: "cancelled", 4: "written"}
    assert (await store.get_info()).total_request_count == 3  # 1, 2 and 4


@pytest.mark.anyio
async def test_a_first_call_cancelled_while_the_store_opens_waits_for_the_open_to_end(tmp_path: Path) -> None:
    """The store's plain calls (opening, reads) wait for their end in the thread when cancelled, as writes do."""
    first = SqliteQueue.open(tmp_path, "q")
    await add(first, 1)
    await first.aclose()
    queue = SqliteQueue.open(tmp_path, "q", busy_timeout=5)
    returned = anyio.Event()

    async def cancelled_call(scope: anyio.CancelScope) -> None:
        with scope:
            await queue.get_info()  # opens the store, which waits in the thread for the raw lock
        returned.set()

    try:
        async with raw_connection(queue.path) as raw:
            await raw.execute("BEGIN IMMEDIATE")
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    scope = anyio.CancelScope()
                    tg.start_soon(cancelled_call, scope)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
                    await anyio.wait_all_tasks_blocked()
                    assert not returned.is_set()  # still waiting for its call in the thread
                    await raw.execute("ROLLBACK")
                    await returned.wait()
        assert scope.cancelled_caught
    finally:
        await queue.aclose()


def nested(depth: int) -> dict[str, object]:
    """A dict nested `depth` levels deep."""
    value: dict[str, object] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("depth", [150, 200, 250])  # the JSON parser stops at 200 levels in all (3 above these)
@pytest.mark.anyio
async def test_deeply_nested_user_data_reads_back(store: SqliteQueue, depth: int) -> None:
    """userData nested past the JSON parser's 200 levels reads back whole and does not block the head."""
    deep = RequestDraft(unique_key=url("deep"), url=url("deep"), user_data={"n": "deep", "x": nested(depth)})
    await store.batch_add([deep], client_key=A)
    await add(store, 1)
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key=A)
    assert [r.user_data["n"] for r in head.items] == ["deep", "1"]
    assert head.items[0].user_data["x"] == nested(depth)
    assert head.quarantined == 0
    request = await store.get_request(request_id_for(url("deep")))
    assert request is not None
    assert request.user_data["x"] == nested(depth)
    await store.update_request(request.model_copy(update={"retry_count": 1}), client_key=A, lock_required=True)
    assert [item["uniqueKey"] for item in (await store.list_head(10)).items] == [url("deep"), url(1)]


DAMAGE: dict[str, tuple[bytes, str, str, int, list[str]]] = {
    # name: (stored bytes, salvaged uniqueKey, salvaged url, retryCount, errorMessages kept)
    "not a request": (b'{"id": 1}', "", "", 0, []),
    "bad field": (
        b'{"uniqueKey": "http://example.com/2", "url": "http://example.com/2", "retryCount": 2,'
        b' "errorMessages": ["e1"], "userData": "not a dict"}',
        url(2),
        url(2),
        2,
        ["e1"],
    ),
    "truncated": (
        b'{"id": "x", "uniqueKey": "http://example.com/2", "url": "http://example.com/2", "userD',
        url(2),
        url(2),
        0,
        [],
    ),
    "not utf-8": (b'{"uniqueKey": "http://example.com/2\xff", "url": "http://example.com/2"}', "", url(2), 0, []),
    "lone surrogate": (b'{"uniqueKey": "k\\ud800", "url": "http://example.com/2"}', "k?", url(2), 0, []),
    "nested too deep": (b'{"url": "http://example.com/2", "userData": ' + b"[" * 100_000, "", url(2), 0, []),
    "not an object": (b"[1, 2]", "", "", 0, []),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
@pytest.mark.anyio
async def test_an_unreadable_row_is_quarantined_and_the_rest_of_the_head_is_locked(
    store: SqliteQueue, damage: tuple[bytes, str, str, int, list[str]]
) -> None:
    """lock_head ends an unreadable row as failed (text kept, logged, counted) and returns the rest of the batch.

    Before that, `get_request` of the row raises QueueUnavailableError and `list_head` shows what can be read.
    """
    raw_data, unique_key, salvaged_url, retry_count, messages = damage
    rid1, rid2, rid3 = await add(store, 1, 2, 3)
    async with raw_connection(store.path) as raw:
        await raw.execute("UPDATE requests SET data = CAST(? AS TEXT) WHERE id = ?", (raw_data, rid2))
    with pytest.raises(QueueUnavailableError, match=f"stored request {rid2} is unreadable"):
        await store.get_request(rid2)
    listed = (await store.list_head(10)).items
    assert [item["id"] for item in listed] == [rid1, rid2, rid3]
    assert listed[1].get("url", "") == salvaged_url
    with capture_logs() as logs:
        head = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert [r.id for r in head.items] == [rid1, rid3]
    assert head.quarantined == 1
    [event] = [e for e in logs if e["event"] == "queue.request_quarantined"]
    assert event["request_id"] == rid2
    assert event["reason"]
    assert [(lock_id, holder) for lock_id, holder, _ in await store.locks()] == [(rid1, B), (rid3, B)]
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (3, 1, 2)
    assert info.had_multiple_clients
    ended = await store.get_request(rid2)
    assert ended is not None
    assert (ended.id, ended.unique_key, ended.url, ended.retry_count) == (rid2, unique_key, salvaged_url, retry_count)
    assert ended.handled_at is not None
    assert ended.error_messages == [*messages, f"quarantined: stored request unreadable: {event['reason']}"]
    assert ended.model_extra is not None
    assert ended.model_extra["unreadableData"] == raw_data.decode("utf-8", "backslashreplace")
    again = await store.lock_head(limit=25, lock_secs=LONG, client_key="client-c")
    assert (again.items, again.quarantined, again.queue_has_locked_requests) == ([], 0, True)


@pytest.mark.anyio
async def test_a_head_of_unreadable_rows_is_quarantined_and_the_rows_behind_it_fill_the_batch(
    store: SqliteQueue,
) -> None:
    """More unreadable rows than `limit` at the head are all quarantined, and readable ones fill the batch."""
    ids = await add(store, *range(25))
    await add(store, *range(25, 30))
    async with raw_connection(store.path) as raw:
        await raw.executemany("UPDATE requests SET data = '{' WHERE id = ?", [(i,) for i in ids[:12]])
    head = await store.lock_head(limit=5, lock_secs=LONG, client_key=A)
    assert [r.user_data["n"] for r in head.items] == ["12", "13", "14", "15", "16"]
    assert head.quarantined == 12
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (12, 18)


@pytest.mark.anyio
async def test_closed_store_raises_queue_unavailable(tmp_path: Path) -> None:
    """After aclose (idempotent) every call raises QueueUnavailableError."""
    queue = SqliteQueue(tmp_path / "q.sqlite")
    await queue.aclose()
    await queue.aclose()
    with pytest.raises(QueueUnavailableError):
        await queue.get_info()
    with pytest.raises(QueueUnavailableError):
        await add(queue, 1)


# -- ordering (§9) ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_normal_adds_are_fifo(store: SqliteQueue) -> None:
    """Requests added without forefront come out in the order they were added, across and within batches."""
    await add(store, 1, 2, 3)
    await add(store, 4)
    await add(store, 5, 6)
    assert await lock_keys(store) == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.anyio
async def test_forefront_batches_come_first_most_recent_first(store: SqliteQueue) -> None:
    """Forefront adds precede normal ones; the latest forefront batch is first, each batch in its own order."""
    await add(store, "n1", "n2")
    await add(store, "f1", "f2", forefront=True)
    await add(store, "n3")
    await add(store, "g1", "g2", forefront=True)
    assert await lock_keys(store) == ["g1", "g2", "f1", "f2", "n1", "n2", "n3"]


@pytest.mark.anyio
async def test_lock_head_returns_complete_requests_up_to_limit(store: SqliteQueue) -> None:
    """lock_head locks at most `limit` requests; returns them with userData, lockSecs and `locked_at`."""
    await add(store, 1, 2, 3)
    before = anyio.current_time()
    head = await store.lock_head(limit=2, lock_secs=LONG, client_key=A)
    assert head.locked_at is not None
    assert before <= head.locked_at <= anyio.current_time()
    assert [r.user_data for r in head.items] == [{"n": "1"}, {"n": "2"}]
    assert [r.id for r in head.items] == [request_id_for(url(1)), request_id_for(url(2))]
    assert head.lock_secs == LONG
    assert await lock_keys(store) == ["3"]


@pytest.mark.parametrize(("forefront", "order"), [(True, ["1", "2", "3"]), (False, ["2", "3", "1"])])
@pytest.mark.anyio
async def test_delete_lock_puts_request_at_head_or_end(store: SqliteQueue, forefront: bool, order: list[str]) -> None:
    """delete_lock(forefront=True) puts the request at the head; the default puts it at the end."""
    await add(store, 1, 2, 3)
    assert await lock_keys(store, limit=1) == ["1"]
    await store.delete_lock(request_id_for(url(1)), client_key=A, forefront=forefront)
    assert await lock_keys(store) == order


@pytest.mark.anyio
async def test_forefront_delete_lock_goes_before_forefront_adds(store: SqliteQueue) -> None:
    """A request released with forefront after a forefront add is the newest forefront item, so it is first."""
    await add(store, 1, 2)
    assert await lock_keys(store, limit=1) == ["1"]
    await add(store, "f", forefront=True)
    await store.delete_lock(request_id_for(url(1)), client_key=A, forefront=True)
    assert await lock_keys(store) == ["1", "f", "2"]


# -- dedup (§2.2 (9), (10)) ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_batch_add_dedups_by_unique_key(store: SqliteQueue) -> None:
    """A repeated uniqueKey returns the existing id with wasAlreadyPresent, and wasAlreadyHandled once handled."""
    first = await store.batch_add([draft(1)], client_key=A)
    again = await store.batch_add([draft(1)], client_key=A)
    await handle(store, 1)
    late = await store.batch_add([draft(1)], client_key=A)
    flags = [
        (r.request_id, r.unique_key, r.was_already_present, r.was_already_handled)
        for result in (first, again, late)
        for r in result.processed_requests
    ]
    rid = request_id_for(url(1))
    assert flags == [(rid, url(1), False, False), (rid, url(1), True, False), (rid, url(1), True, True)]
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (1, 1)


@pytest.mark.anyio
async def test_duplicate_within_one_batch_is_stored_once(store: SqliteQueue) -> None:
    """Two drafts with one uniqueKey in a batch: the first is added, the second reports wasAlreadyPresent."""
    result = await store.batch_add([draft(1), draft(2), draft(1)], client_key=A)
    assert [(r.unique_key, r.was_already_present) for r in result.processed_requests] == [
        (url(1), False),
        (url(2), False),
        (url(1), True),
    ]
    assert result.unprocessed_requests == []
    assert (await store.get_info()).total_request_count == 2
    assert await lock_keys(store) == ["1", "2"]


@pytest.mark.anyio
async def test_forefront_add_of_present_request_does_not_move_it(store: SqliteQueue) -> None:
    """Re-adding an already present request with forefront leaves it where it is (as memory-storage does)."""
    await add(store, 1, 2)
    await add(store, 2, forefront=True)
    assert await lock_keys(store) == ["1", "2"]


@pytest.mark.anyio
async def test_batch_add_with_handled_at_is_stored_handled(store: SqliteQueue) -> None:
    """A draft carrying handledAt is stored handled: counted, never in the head."""
    await store.batch_add([draft(1, handledAt="2024-01-01T00:00:00Z"), draft(2)], client_key=A)
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (2, 1, 1)
    assert await lock_keys(store) == ["2"]
    request = await store.get_request(request_id_for(url(1)))
    assert request is not None
    assert request.handled_at == datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.anyio
async def test_batch_add_with_mismatched_id_is_refused(store: SqliteQueue) -> None:
    """A draft whose id does not match its uniqueKey raises request-id-invalid and stores nothing."""
    with pytest.raises(InvalidInputError) as caught:
        await store.batch_add([draft(1), draft(2, id="AAAAAAAAAAAAAAA")], client_key=A)
    assert caught.value.error_type == "request-id-invalid"
    assert (await store.get_info()).total_request_count == 0
    matching = await store.batch_add([draft(3, id=request_id_for(url(3)))], client_key=A)
    assert matching.processed_requests[0].request_id == request_id_for(url(3))


@pytest.mark.anyio
async def test_invalid_draft_is_refused_and_head_stays_usable(store: SqliteQueue) -> None:
    """A draft that is not a valid request raises InvalidInputError up front instead of poisoning the head."""
    await add(store, 1)
    with pytest.raises(InvalidInputError, match="invalid request"):
        await store.batch_add([draft(2, retryCount="many")], client_key=A)
    with pytest.raises(InvalidInputError):
        await store.batch_add([draft(3, handledAt="yesterday")], client_key=A)
    assert await lock_keys(store) == ["1"]
    assert (await store.get_info()).total_request_count == 1


@pytest.mark.anyio
async def test_empty_batch_adds_nothing(store: SqliteQueue) -> None:
    """An empty batch returns an empty result."""
    result = await store.batch_add([], client_key=A)
    assert (result.processed_requests, result.unprocessed_requests) == ([], [])


# -- limits (§2.1, §4.2) -------------------------------------------------------------------------------------------

Call = Callable[[SqliteQueue], Awaitable[object]]
INVALID_CALLS: dict[str, Call] = {
    "lock_head limit 0": lambda q: q.lock_head(limit=0, lock_secs=LONG, client_key=A),
    "lock_head limit 26": lambda q: q.lock_head(limit=26, lock_secs=LONG, client_key=A),
    "lock_head lockSecs 0": lambda q: q.lock_head(limit=1, lock_secs=0, client_key=A),
    "lock_head lockSecs -1": lambda q: q.lock_head(limit=1, lock_secs=-1, client_key=A),
    "lock_head lockSecs nan": lambda q: q.lock_head(limit=1, lock_secs=float("nan"), client_key=A),
    "lock_head lockSecs inf": lambda q: q.lock_head(limit=1, lock_secs=float("inf"), client_key=A),
    "lock_head clientKey empty": lambda q: q.lock_head(limit=1, lock_secs=LONG, client_key=""),
    "lock_head clientKey 33": lambda q: q.lock_head(limit=1, lock_secs=LONG, client_key="k" * 33),
    "batch of 26": lambda q: q.batch_add([draft(n) for n in range(26)], client_key=A),
    "batch_add clientKey empty": lambda q: q.batch_add([draft(1)], client_key=""),
    "batch_add clientKey 33": lambda q: q.batch_add([draft(1)], client_key="k" * 33),
    "prolong lockSecs 0": lambda q: q.prolong_lock(request_id_for(url(0)), lock_secs=0, client_key=A),
    "prolong lockSecs nan": lambda q: q.prolong_lock(request_id_for(url(0)), lock_secs=float("nan"), client_key=A),
    "prolong clientKey 33": lambda q: q.prolong_lock(request_id_for(url(0)), lock_secs=LONG, client_key="k" * 33),
    "delete_lock clientKey empty": lambda q: q.delete_lock(request_id_for(url(0)), client_key=""),
    "unlock clientKey 33": lambda q: q.unlock_requests(client_key="k" * 33),
    "update clientKey empty": lambda q: q.update_request(stored(1), client_key=""),
}


@pytest.mark.parametrize("call", INVALID_CALLS.values(), ids=INVALID_CALLS.keys())
@pytest.mark.anyio
async def test_out_of_range_arguments_raise_invalid_input(store: SqliteQueue, call: Call) -> None:
    """Arguments outside the contract's limits raise InvalidInputError and change nothing."""
    await add(store, 0)
    with pytest.raises(InvalidInputError):
        await call(store)
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (1, 0)
    assert await lock_keys(store) == ["0"]


@pytest.mark.anyio
async def test_limits_at_the_edges_are_accepted(store: SqliteQueue) -> None:
    """A batch of 25, limit 25 and client keys of 1 and 32 chars are accepted."""
    await store.batch_add([draft(n) for n in range(25)], client_key="k")
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key="k" * 32)
    assert len(head.items) == 25


# -- lock ownership (§2.2 (16), (17); §4.2) -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_other_client_cannot_prolong_or_delete_lock(store: SqliteQueue) -> None:
    """Only the holder may prolong or delete a lock; another client key gets LockLostError."""
    [rid] = await add(store, 1)
    await lock_keys(store, A)
    with pytest.raises(LockLostError) as caught:
        await store.prolong_lock(rid, lock_secs=LONG, client_key=B)
    assert caught.value.error_type == "request-handled-or-locked"
    with pytest.raises(LockLostError):
        await store.delete_lock(rid, client_key=B)
    assert await lock_keys(store, B) == []
    await store.delete_lock(rid, client_key=A)
    assert await lock_keys(store, B) == ["1"]


@pytest.mark.anyio
async def test_lock_ops_on_unknown_request_raise_not_found(store: SqliteQueue) -> None:
    """Prolonging or deleting the lock of an unknown id raises NotFoundError; get_request returns None."""
    rid = request_id_for(url("missing"))
    with pytest.raises(NotFoundError):
        await store.prolong_lock(rid, lock_secs=LONG, client_key=A)
    with pytest.raises(NotFoundError):
        await store.delete_lock(rid, client_key=A)
    assert await store.get_request(rid) is None


@pytest.mark.anyio
async def test_lock_ops_on_handled_request_raise_lock_lost(store: SqliteQueue) -> None:
    """Once a request is handled its former holder's prolong and delete_lock raise LockLostError."""
    [rid] = await add(store, 1)
    await lock_keys(store, A)
    await handle(store, 1)
    with pytest.raises(LockLostError, match="handled"):
        await store.prolong_lock(rid, lock_secs=LONG, client_key=A)
    with pytest.raises(LockLostError):
        await store.delete_lock(rid, client_key=A)


@pytest.mark.anyio
async def test_released_lock_cannot_be_prolonged(store: SqliteQueue) -> None:
    """After delete_lock the former holder no longer owns the request."""
    [rid] = await add(store, 1)
    await lock_keys(store, A)
    await store.delete_lock(rid, client_key=A)
    with pytest.raises(LockLostError):
        await store.prolong_lock(rid, lock_secs=LONG, client_key=A)


@pytest.mark.anyio
async def test_holder_prolongs_lock_to_now_plus_lock_secs(store: SqliteQueue) -> None:
    """prolong_lock returns now + lockSecs and keeps the request locked for that long."""
    [rid] = await add(store, 1)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    before = datetime.now(UTC)
    expires = await store.prolong_lock(rid, lock_secs=3600, client_key=A)
    after = datetime.now(UTC)
    assert before + timedelta(seconds=3600) <= expires <= after + timedelta(seconds=3600)
    assert [(lock_id, holder) for lock_id, holder, _ in await store.locks()] == [(rid, A)]
    assert await lock_keys(store, B) == []


@pytest.mark.anyio
async def test_expired_lock_retaken_by_other_client_is_lost(store: SqliteQueue) -> None:
    """When a lock expires and another client locks the request, the old holder's prolong raises LockLostError."""
    [rid] = await add(store, 1)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    assert [r.id for r in await poll_lock_head(store, B)] == [rid]
    with pytest.raises(LockLostError):
        await store.prolong_lock(rid, lock_secs=LONG, client_key=A)
    with pytest.raises(LockLostError):
        await store.delete_lock(rid, client_key=A)
    await store.prolong_lock(rid, lock_secs=LONG, client_key=B)


# -- the store's clock: wall-clock steps and several processes -----------------------------------------------------


@pytest.mark.anyio
async def test_a_backward_wall_clock_step_does_not_lengthen_locks(tmp_path: Path) -> None:
    """After the wall clock steps back an hour, a 2 s lock still expires after 2 s of monotonic time."""
    time_ = SteppedTime()
    queue = SqliteQueue(tmp_path / "q.sqlite", clock=time_.clock())
    try:
        [rid] = await add(queue, 1)
        await queue.lock_head(limit=1, lock_secs=2, client_key=A)
        time_.step_wall(-3600)
        time_.elapse(1.9)
        held = await queue.lock_head(limit=1, lock_secs=LONG, client_key=B)
        assert (held.items, held.queue_has_locked_requests) == ([], True)
        time_.elapse(0.2)
        assert [r.id for r in (await queue.lock_head(limit=1, lock_secs=LONG, client_key=B)).items] == [rid]
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_a_forward_wall_clock_step_does_not_expire_locks_early(tmp_path: Path) -> None:
    """After a 1 h forward wall-clock step a 2 s lock is held for 2 s of monotonic time, for two stores."""
    time_ = SteppedTime()
    path = tmp_path / "q.sqlite"
    mine, other = SqliteQueue(path, clock=time_.clock()), SqliteQueue(path, clock=time_.clock())
    try:
        await other.get_info()  # opened (its clock anchored) before the step
        [rid] = await add(mine, 1)
        await mine.lock_head(limit=1, lock_secs=2, client_key=A)
        time_.step_wall(3600)
        time_.elapse(1.9)
        for queue in (other, mine):
            held = await queue.lock_head(limit=1, lock_secs=LONG, client_key=B)
            assert (held.items, held.queue_has_locked_requests) == ([], True)
        assert [(lock_id, holder) for lock_id, holder, _ in await other.locks()] == [(rid, A)]
        await mine.prolong_lock(rid, lock_secs=2, client_key=A)
        time_.elapse(1.9)
        assert (await other.lock_head(limit=1, lock_secs=LONG, client_key=B)).items == []
        time_.elapse(0.2)
        assert [r.id for r in (await other.lock_head(limit=1, lock_secs=LONG, client_key=B)).items] == [rid]
    finally:
        await mine.aclose()
        await other.aclose()


@pytest.mark.anyio
async def test_stores_with_different_wall_clocks_follow_the_one_ahead(tmp_path: Path) -> None:
    """A store whose wall clock is 1 h behind follows the file's time: FIFO and lock lengths hold across stores."""
    ahead, behind = SteppedTime(), SteppedTime()
    behind.wall -= 3600 * 10**9
    path = tmp_path / "q.sqlite"
    first, late = SqliteQueue(path, clock=ahead.clock()), SqliteQueue(path, clock=behind.clock())
    try:
        await add(first, 1)
        await add(late, 2)
        await add(first, 3)
        assert await lock_keys(late, limit=1) == ["1"]
        head = await late.lock_head(limit=1, lock_secs=2, client_key=B)
        assert [r.user_data["n"] for r in head.items] == ["2"]
        for time_ in (ahead, behind):
            time_.elapse(1.9)
        assert await lock_keys(first, "client-c") == ["3"]
        for time_ in (ahead, behind):
            time_.elapse(0.2)
        assert await lock_keys(first, "client-c") == ["2"]
    finally:
        await first.aclose()
        await late.aclose()


# -- lock expiry and queueHasLockedRequests (§8, §9) --------------------------------------------------------------


@pytest.mark.anyio
async def test_locked_request_comes_back_after_lock_expires(store: SqliteQueue) -> None:
    """A locked request is not handed out again until its lock expires; then lock_head returns it."""
    await add(store, 1)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    blocked = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert blocked.items == []
    assert blocked.queue_has_locked_requests
    assert [r.user_data["n"] for r in await poll_lock_head(store, B)] == ["1"]


@pytest.mark.anyio
async def test_queue_has_locked_requests_tracks_any_live_lock(store: SqliteQueue) -> None:
    """queueHasLockedRequests is true while anyone (the caller included) holds a lock, false when none is held."""
    empty = await store.lock_head(limit=1, lock_secs=LONG, client_key=A)
    assert (empty.items, empty.queue_has_locked_requests) == ([], False)
    await add(store, 1, 2)
    locked = await store.lock_head(limit=1, lock_secs=LONG, client_key=A)
    assert locked.queue_has_locked_requests
    await handle(store, 1)
    assert (await store.lock_head(limit=1, lock_secs=LONG, client_key=A)).queue_has_locked_requests
    own = await store.lock_head(limit=1, lock_secs=LONG, client_key=A)
    assert (own.items, own.queue_has_locked_requests) == ([], True)
    await handle(store, 2)
    done = await store.lock_head(limit=1, lock_secs=LONG, client_key=A)
    assert (done.items, done.queue_has_locked_requests) == ([], False)


# -- update_request (§2.2 (14)) -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_update_with_handled_at_marks_handled_and_releases_lock(store: SqliteQueue) -> None:
    """handledAt moves the counters pending->handled, removes the request from the head and releases its lock."""
    [rid, _] = await add(store, 1, 2)
    await lock_keys(store, A, limit=1)
    request = await store.get_request(rid)
    assert request is not None
    request.handled_at = datetime.now(UTC)
    registration = await store.update_request(request, client_key=A)
    assert (registration.request_id, registration.was_already_present, registration.was_already_handled) == (
        rid,
        True,
        False,
    )
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (2, 1, 1)
    assert await store.locks() == []
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert [r.user_data["n"] for r in head.items] == ["2"]
    stored_request = await store.get_request(rid)
    assert stored_request is not None
    assert stored_request.handled_at is not None


@pytest.mark.anyio
async def test_handled_lock_release_clears_queue_has_locked_requests(store: SqliteQueue) -> None:
    """After the only locked request is marked handled, no lock remains in the queue."""
    await add(store, 1)
    await lock_keys(store, A)
    await handle(store, 1, client_key=A)
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert (head.items, head.queue_has_locked_requests) == ([], False)


@pytest.mark.anyio
async def test_update_without_handled_at_keeps_lock(store: SqliteQueue) -> None:
    """An update without handledAt stores the new body but the holder keeps the lock."""
    [rid] = await add(store, 1)
    await lock_keys(store, A)
    await store.update_request(stored(1, user_data={"n": "1", "seen": True}, retry_count=1), client_key=A)
    blocked = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert (blocked.items, blocked.queue_has_locked_requests) == ([], True)
    await store.prolong_lock(rid, lock_secs=LONG, client_key=A)
    request = await store.get_request(rid)
    assert request is not None
    assert (request.user_data, request.retry_count) == ({"n": "1", "seen": True}, 1)


@pytest.mark.anyio
async def test_update_of_unknown_id_inserts(store: SqliteQueue) -> None:
    """update_request of an id not in the queue inserts it (wasAlreadyPresent false), pending or handled."""
    pending = await store.update_request(stored(1, user_data={"n": "1"}), client_key=A)
    handled = await store.update_request(stored(2, handled_at=datetime.now(UTC)), client_key=A)
    assert [(r.was_already_present, r.was_already_handled) for r in (pending, handled)] == [(False, False)] * 2
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (2, 1)
    assert await lock_keys(store) == ["1"]


@pytest.mark.anyio
async def test_update_with_mismatched_id_is_refused(store: SqliteQueue) -> None:
    """An id that does not match the uniqueKey raises request-id-invalid and stores nothing."""
    bad = Request(id=request_id_for(url(2)), unique_key=url(1), url=url(1))
    with pytest.raises(InvalidInputError) as caught:
        await store.update_request(bad, client_key=A)
    assert caught.value.error_type == "request-id-invalid"
    assert (await store.get_info()).total_request_count == 0


@pytest.mark.anyio
async def test_update_clearing_handled_at_makes_request_pending(store: SqliteQueue) -> None:
    """A PUT without handledAt on a handled request makes it pending again and reports wasAlreadyHandled."""
    await add(store, 1)
    await handle(store, 1)
    registration = await store.update_request(stored(1, user_data={"n": "1"}), client_key=A)
    assert registration.was_already_handled
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (0, 1)
    assert await lock_keys(store) == ["1"]


@pytest.mark.anyio
async def test_update_does_not_store_echoed_lock_fields(store: SqliteQueue) -> None:
    """Lock fields a client echoes in the body are not stored; lock state lives only in the store."""
    [rid] = await add(store, 1)
    echoed = stored(1, lockExpiresAt="2030-01-01T00:00:00.000Z", lockByClient=B, extraField=1)
    await store.update_request(echoed, client_key=A)
    request = await store.get_request(rid)
    assert request is not None
    assert request.model_extra == {"extraField": 1}


@pytest.mark.anyio
async def test_fenced_update_after_another_client_took_the_expired_lock_raises_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """A fenced update after another client retook the expired lock raises LockLostError and writes nothing."""
    time_ = SteppedTime()
    queue = SqliteQueue(tmp_path / "q.sqlite", clock=time_.clock())
    try:
        [rid] = await add(queue, 1)
        [mine] = (await queue.lock_head(limit=1, lock_secs=2, client_key=A)).items
        time_.elapse(2.1)
        assert [r.id for r in (await queue.lock_head(limit=1, lock_secs=LONG, client_key=B)).items] == [rid]
        failure = mine.model_copy(update={"retry_count": 1, "error_messages": ["boom"]})
        for attempt in (failure, failure.model_copy(update={"handled_at": datetime.now(UTC)})):
            with pytest.raises(LockLostError) as caught:
                await queue.update_request(attempt, client_key=A, lock_required=True)
            assert caught.value.error_type == "request-handled-or-locked"
        assert [(lock_id, holder) for lock_id, holder, _ in await queue.locks()] == [(rid, B)]
        stored_request = await queue.get_request(rid)
        assert stored_request is not None
        assert (stored_request.retry_count, stored_request.error_messages, stored_request.handled_at) == (0, [], None)
        assert (await queue.get_info()).handled_request_count == 0
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_fenced_update_of_a_request_another_client_handled_keeps_it_handled(tmp_path: Path) -> None:
    """A fenced failure record for a request another client handled raises LockLostError; it stays handled."""
    time_ = SteppedTime()
    queue = SqliteQueue(tmp_path / "q.sqlite", clock=time_.clock())
    try:
        [rid] = await add(queue, 1)
        [mine] = (await queue.lock_head(limit=1, lock_secs=2, client_key=A)).items
        time_.elapse(2.1)
        [theirs] = (await queue.lock_head(limit=1, lock_secs=LONG, client_key=B)).items
        await queue.update_request(
            theirs.model_copy(update={"handled_at": datetime.now(UTC)}), client_key=B, lock_required=True
        )
        with pytest.raises(LockLostError, match="handled"):
            await queue.update_request(mine.model_copy(update={"retry_count": 1}), client_key=A, lock_required=True)
        info = await queue.get_info()
        assert (info.handled_request_count, info.pending_request_count) == (1, 0)
        assert (await queue.lock_head(limit=1, lock_secs=LONG, client_key="client-c")).items == []
        stored_request = await queue.get_request(rid)
        assert stored_request is not None
        assert (stored_request.retry_count, stored_request.handled_at is not None) == (0, True)
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_fenced_update_of_an_unlocked_or_unknown_request_is_refused(store: SqliteQueue) -> None:
    """A fenced update of an unlocked request raises LockLostError, of an unknown id NotFoundError; none stores."""
    await add(store, 1)
    with pytest.raises(LockLostError, match="not locked by this client"):
        await store.update_request(stored(1, retry_count=5), client_key=A, lock_required=True)
    with pytest.raises(NotFoundError) as caught:
        await store.update_request(stored(2, handled_at=datetime.now(UTC)), client_key=A, lock_required=True)
    assert caught.value.error_type == "record-not-found"
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (1, 0)
    request = await store.get_request(request_id_for(url(1)))
    assert request is not None
    assert request.retry_count == 0


@pytest.mark.anyio
async def test_fenced_update_by_the_holder_of_an_expired_lock_nobody_retook_applies_and_keeps_the_lock(
    tmp_path: Path,
) -> None:
    """The holder of an expired lock nobody retook may write a fenced update and then release its lock."""
    time_ = SteppedTime()
    queue = SqliteQueue(tmp_path / "q.sqlite", clock=time_.clock())
    try:
        [rid] = await add(queue, 1)
        [mine] = (await queue.lock_head(limit=1, lock_secs=2, client_key=A)).items
        time_.elapse(5)
        await queue.update_request(mine.model_copy(update={"retry_count": 1}), client_key=A, lock_required=True)
        await queue.delete_lock(rid, client_key=A, forefront=True)
        [again] = (await queue.lock_head(limit=1, lock_secs=2, client_key=A)).items
        assert again.retry_count == 1
        await queue.update_request(
            again.model_copy(update={"handled_at": datetime.now(UTC)}), client_key=A, lock_required=True
        )
        assert (await queue.get_info()).handled_request_count == 1
    finally:
        await queue.aclose()


# -- unlock_requests and hadMultipleClients (§2.2 (12), §8) -------------------------------------------------------


@pytest.mark.anyio
async def test_unlock_requests_releases_only_callers_locks(store: SqliteQueue) -> None:
    """unlock_requests releases the calling client's live locks only and returns how many."""
    await add(store, 1, 2, 3)
    assert await lock_keys(store, A, limit=2) == ["1", "2"]
    assert await lock_keys(store, B, limit=1) == ["3"]
    assert await store.unlock_requests(client_key=A) == 2
    assert await store.unlock_requests(client_key=A) == 0
    assert [holder for _, holder, _ in await store.locks()] == [B]
    assert await lock_keys(store, "client-c") == ["1", "2"]
    assert await store.unlock_requests(client_key=B) == 1


@pytest.mark.anyio
async def test_every_reader_of_live_locks_finds_forefront_and_plain_ones(store: SqliteQueue) -> None:
    """A live lock is found from the head index by its place outside [-now, now], above it (a plain request) or
    below it (a forefront one): the locked flag of lock-head, counts, the locks list, the locked listing and
    unlock_requests all see both kinds, and none sees a lock that ran out."""
    await add(store, "plain")
    await add(store, "first", forefront=True)
    assert await lock_keys(store, A) == ["first", "plain"]
    await add(store, "short")
    assert [r.url for r in (await store.lock_head(limit=1, lock_secs=0.05, client_key=B)).items] == [url("short")]
    ran_out = time.monotonic() + 5
    while (await store.counts()).locked != 2:  # the short lock runs out by the store's clock
        assert time.monotonic() < ran_out
        await anyio.sleep(0.01)
    retaken = await store.lock_head(limit=1, lock_secs=LONG, client_key=B)  # "short" again: three live locks
    assert [r.url for r in retaken.items] == [url("short")]
    assert (await store.lock_head(limit=1, lock_secs=LONG, client_key=B)).queue_has_locked_requests
    counts = await store.counts()
    assert (counts.locked, counts.locks_by_client) == (3, {A: 2, B: 1})
    assert sorted(holder for _, holder, _ in await store.locks()) == [A, A, B]
    listed = await store.list_requests(limit=10, locked=True)
    assert sorted(item["url"] for item in listed.items) == [url("first"), url("plain"), url("short")]
    assert await store.unlock_requests(client_key=A) == 2
    assert await lock_keys(store, B) == ["first", "plain"]


@pytest.mark.anyio
async def test_the_live_lock_readers_search_the_head_index_on_a_large_queue(store: SqliteQueue) -> None:
    """With 200,000 pending rows, every statement that looks for live locks is a search of `requests_head` (the
    store keeps no index of the locks: locking and marking handled update one index less), never a scan."""
    seed = """
        WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < 199999)
        INSERT INTO requests (id, order_no, data)
        SELECT printf('seed%011d', n), n + 1, json_object('id', printf('seed%011d', n), 'uniqueKey', n, 'url', n)
        FROM seq
    """
    await store.get_info()  # the first call creates the schema
    async with raw_connection(store.path) as raw:
        await raw.execute("BEGIN")
        await raw.execute(seed)
        await raw.execute("COMMIT")
        indexes = {row[0] for row in await raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "requests_locks" not in indexes
        statements = [_HAS_LIVE_LOCKS, _UNLOCK_CLIENT, _LIVE_LOCKS, _COUNTS, _LOCKS_BY_CLIENT]
        for statement in statements:
            params = [10**12] * statement.count("?")
            plan = [row[3] for row in await raw.execute("EXPLAIN QUERY PLAN " + statement, params)]
            assert any("USING INDEX requests_head" in step for step in plan), (statement, plan)
            scans = [step for step in plan if step.startswith("SCAN requests")]
            assert all("USING INDEX requests_failed" in step for step in scans), (statement, plan)  # its own, partial


@pytest.mark.anyio
async def test_had_multiple_clients_counts_client_keys(tmp_path: Path) -> None:
    """hadMultipleClients stays false for one client key (even over two connections) and turns true on a second."""
    path = tmp_path / "q.sqlite"
    first, second = SqliteQueue(path), SqliteQueue(path)
    try:
        await add(first, 1, 2)
        assert not (await second.lock_head(limit=1, lock_secs=LONG, client_key=A)).had_multiple_clients
        assert not (await first.get_info()).had_multiple_clients
        assert (await second.lock_head(limit=1, lock_secs=LONG, client_key=B)).had_multiple_clients
        assert (await first.get_info()).had_multiple_clients
        assert (await first.lock_head(limit=1, lock_secs=LONG, client_key=A)).had_multiple_clients
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.anyio
async def test_counters_track_total_handled_pending(store: SqliteQueue) -> None:
    """totalRequestCount counts distinct requests; handled + pending = total."""
    await add(store, 1, 2, 3)
    await add(store, 3, 4)
    await handle(store, 2)
    await handle(store, 4)
    await handle(store, 4)
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (4, 2, 2)
    assert info.created_at <= info.modified_at <= datetime.now(UTC)


# -- several connections on one file ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_stores_never_lock_the_same_request(tmp_path: Path) -> None:
    """Two stores on one file (like two processes), four lockers each, lock every request exactly once."""
    path = tmp_path / "q.sqlite"
    stores = [SqliteQueue(path), SqliteQueue(path)]
    expected: set[str] = set()
    locked: list[str] = []

    async def locker(queue: SqliteQueue, client_key: str) -> None:
        while items := (await queue.lock_head(limit=5, lock_secs=LONG, client_key=client_key)).items:
            locked.extend(r.id for r in items)

    try:
        for start in range(0, 500, 25):
            expected.update(await add(stores[0], *range(start, start + 25)))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for s, queue in enumerate(stores):
                    for w in range(4):
                        tg.start_soon(locker, queue, f"store{s}-worker{w}")
    finally:
        for queue in stores:
            await queue.aclose()
    assert len(expected) == 500
    assert Counter(locked) == Counter(expected)


@pytest.mark.anyio
async def test_lock_head_uses_head_index_on_large_queue(store: SqliteQueue) -> None:
    """With 200,000 pending and 50,000 handled rows the lock-head query is an index range search, not a scan."""
    # Seeded inside SQLite (ids need not be uniqueKey hashes here): rows 0..199,999 pending in order, the rest handled.
    seed = """
        WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < 249999)
        INSERT INTO requests (id, order_no, data)
        SELECT printf('seed%011d', n), CASE WHEN n < 200000 THEN n + 1 END,
               json_object('id', printf('seed%011d', n), 'uniqueKey', ?1 || n, 'url', ?1 || n)
        FROM seq
    """
    await store.get_info()  # the first call creates the schema
    async with raw_connection(store.path) as raw:
        await raw.execute("BEGIN")
        await raw.execute(seed, (url(""),))
        await raw.execute("UPDATE queue SET total = 250000, handled = 50000")
        await raw.execute("COMMIT")
        plan = [row[3] for row in await raw.execute("EXPLAIN QUERY PLAN " + _HEAD_QUERY, (-(10**16), 10**16, 25))]
    assert len(plan) == 1
    assert "USING INDEX requests_head" in plan[0]
    assert not any("SCAN" in step or "TEMP B-TREE" in step for step in plan)
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key=A)
    assert [r.url for r in head.items] == [url(n) for n in range(25)]
    info = await store.get_info()
    assert (info.total_request_count, info.pending_request_count) == (250_000, 200_000)


@pytest.mark.anyio
async def test_locked_database_raises_queue_unavailable_and_loses_nothing(tmp_path: Path) -> None:
    """A write blocked past busy_timeout raises QueueUnavailableError; after the lock goes, the store works."""
    path = tmp_path / "q.sqlite"
    queue = SqliteQueue(path, busy_timeout=0.2)
    try:
        await add(queue, 1)
        async with raw_connection(path, busy_timeout=0) as raw:
            await raw.execute("BEGIN EXCLUSIVE")
            with pytest.raises(QueueUnavailableError, match="locked") as caught:
                await add(queue, 2)
            assert re.search(re.escape(str(path)), str(caught.value))
            with pytest.raises(QueueUnavailableError):
                await queue.lock_head(limit=1, lock_secs=LONG, client_key=A)
            await raw.execute("ROLLBACK")
        assert (await queue.get_info()).total_request_count == 1
        await add(queue, 2)
        assert await lock_keys(queue) == ["1", "2"]
        info = await queue.get_info()
        assert (info.total_request_count, info.pending_request_count) == (2, 2)
    finally:
        await queue.aclose()


def wal_restarts(wal: Path) -> int:
    """How often the WAL started over: the checkpoint sequence number in its header (big-endian, bytes 12-15)."""
    with wal.open("rb") as file:
        header = file.read(16)
    return int.from_bytes(header[12:16], "big") if len(header) == 16 else 0


@pytest.mark.anyio
async def test_wal_starts_over_under_sustained_writes_and_folds_in_at_close(tmp_path: Path) -> None:
    """The store's commits drive checkpoints: the WAL starts over while writes go on and folds in at close.

    How many commits a checkpoint round spans (so how large the WAL grows) depends on how long its syncs take,
    which a loaded disk stretches to seconds: that is not asserted. That each round ends with the WAL starting over
    is (`test_checkpoint_catch_up_starts_the_wal_over_at_the_next_write`).
    """
    path = tmp_path / "q.sqlite"
    wal = path.with_name(path.name + "-wal")
    queue = SqliteQueue(path)
    written = restarts = 0
    try:
        with anyio.fail_after(120):
            for _ in range(200):  # 200 rounds of 50 back-to-back commits at most; about 5 are enough
                for _ in range(50):
                    await add(queue, written)
                    written += 1
                restarts = await anyio.to_thread.run_sync(wal_restarts, wal)
                if restarts >= 2:
                    break
    finally:
        await queue.aclose()
    assert restarts >= 2, f"the WAL started over {restarts} times in {written} commits"
    assert not await anyio.to_thread.run_sync(wal.exists)  # the last connection copied the rest into the file
    async with raw_connection(path) as raw:
        assert await raw.execute("SELECT count(*) FROM requests") == [(written,)]
        assert await raw.execute("PRAGMA integrity_check") == [("ok",)]


def test_checkpoint_catch_up_starts_the_wal_over_at_the_next_write(tmp_path: Path) -> None:
    """A writer that waited for the checkpointer's last pass starts the WAL over with its next write.

    The writer commits back to back, as the store does: each transaction inside `writing`, then `committed()`.
    """
    path = tmp_path / "c.sqlite"
    wal = path.with_name(path.name + "-wal")
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "wal_autocheckpoint=0"):
        db.execute(f"PRAGMA {pragma}")
    db.execute("CREATE TABLE t (x BLOB)")
    checkpointer = Checkpointer(path, every=20)
    caught_up = 0
    deadline = time.monotonic() + 30
    try:
        for _ in range(50_000):  # as the store writes: each transaction inside `writing`, then `committed()`
            waited = not checkpointer.writing.acquire(blocking=False)
            if waited:
                checkpointer.writing.acquire()  # the checkpointer's last pass held it
            try:
                before = wal_restarts(wal)
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t VALUES (randomblob(3000))")
                db.execute("COMMIT")
                if waited:
                    assert wal_restarts(wal) == before + 1
                    caught_up += 1
            finally:
                checkpointer.writing.release()
            checkpointer.committed()
            if caught_up == 3 or time.monotonic() > deadline:
                break
    finally:
        checkpointer.close()
        db.close()
    assert caught_up == 3


@pytest.mark.anyio
async def test_plain_and_extra_field_drafts_read_back_as_the_requests_they_describe(store: SqliteQueue) -> None:
    """A plain draft (stored without a second validation) and one with extra fields read back alike, defaults set."""
    plain = RequestDraft(
        unique_key=url(1), url=url(1), method="POST", payload="p", headers={"X-A": "b"}, user_data={"é": "ü\"'"}
    )
    extra = RequestDraft.model_validate({"uniqueKey": url(2), "url": url(2), "custom": {"k": [1, 2]}})
    await store.batch_add([plain, extra], client_key=A)
    first, second = await store.get_request(request_id_for(url(1))), await store.get_request(request_id_for(url(2)))
    assert first is not None
    assert second is not None
    assert first.to_api() == {
        "id": request_id_for(url(1)),
        "uniqueKey": url(1),
        "url": url(1),
        "method": "POST",
        "retryCount": 0,
        "userData": {"é": "ü\"'"},
        "headers": {"X-A": "b"},
        "payload": "p",
        "errorMessages": [],
    }
    assert second.to_api()["custom"] == {"k": [1, 2]}
    assert second.retry_count == 0
    assert second.error_messages == []
    head = await store.list_head(10)
    assert [(item["uniqueKey"], item["retryCount"]) for item in head.items] == [(url(1), 0), (url(2), 0)]


@pytest.mark.anyio
async def test_a_draft_that_cannot_be_stored_as_json_is_refused_and_its_batch_is_not_stored(
    store: SqliteQueue,
) -> None:
    """A plain draft whose userData has no JSON form raises InvalidInputError naming it; the batch stores nothing."""
    bad = RequestDraft(unique_key=url("bad"), url=url("bad"), user_data={"x": object()})
    with pytest.raises(InvalidInputError, match=r"request 'http://example.com/bad' cannot be stored as JSON"):
        await store.batch_add([draft(1), bad], client_key=A)
    assert (await store.get_info()).total_request_count == 0


# -- failed requests and the queue by hand (runner.queue.admin) -------------------------------------------------

FAILED_MARK = {"__crawlee": {"state": 6}}


async def fail(queue: SqliteQueue, n: int | str, client_key: str = A, **extra: object) -> None:
    """End request `n` as the committer ends a request that failed for good: handled, marker, one more error."""
    request = await queue.get_request(request_id_for(url(n)))
    assert request is not None
    ended = request.model_copy(
        update={
            "handled_at": datetime.now(UTC),
            "retry_count": request.retry_count + 1,
            "error_messages": [*request.error_messages, f"ValueError: page {n}"],
            "user_data": with_failed_mark(request.user_data),
            **extra,
        }
    )
    await queue.update_request(ended, client_key=client_key)


@pytest.mark.anyio
async def test_admin_protocol(store: SqliteQueue) -> None:
    """SqliteQueue is a QueueAdmin."""
    assert isinstance(store, QueueAdmin)


@pytest.mark.anyio
async def test_counts_tell_handled_failed_pending_and_locked_apart(store: SqliteQueue) -> None:
    """Six requests: one ended well, one failed, one locked by A, one by B, two pending; the locks by client."""
    await add(store, *range(6))
    await handle(store, 0)
    await fail(store, 1)
    assert await lock_keys(store, A, limit=1) == ["2"]
    assert await lock_keys(store, B, limit=1) == ["3"]
    counts = await store.counts()
    assert counts == QueueCounts(
        total=6, handled=1, failed=1, pending=2, locked=2, locks_by_client={A: 1, B: 1}, exact=True
    )
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (2, 4)  # the API's counters are unchanged


@pytest.mark.anyio
async def test_the_failed_column_follows_the_marker_through_every_write(store: SqliteQueue) -> None:
    """Failed by update, by a batch add of an ended request, and back: handled again without the marker, requeued."""
    await add(store, 1, 2)
    await fail(store, 1)
    marked = RequestDraft.model_validate(
        {"uniqueKey": url(3), "url": url(3), "handledAt": "2026-01-01T00:00:00Z", "userData": FAILED_MARK}
    )
    await store.batch_add([marked], client_key=A)
    assert (await store.counts()).failed == 2
    put = stored(4, handled_at=datetime.now(UTC), user_data=FAILED_MARK)  # a PUT of a request the queue lacks
    await store.update_request(put, client_key=A)
    assert (await store.counts()).failed == 3
    await store.delete_requests([put.id], client_key=A)
    request = await store.get_request(request_id_for(url(3)))
    assert request is not None
    assert request.is_failed
    await store.update_request(request.model_copy(update={"user_data": {}}), client_key=A)  # ended well after all
    assert (await store.counts()).failed == 1
    pending = await store.get_request(request_id_for(url(1)))
    assert pending is not None
    await store.update_request(pending.model_copy(update={"handled_at": None}), client_key=A)  # a marker, pending
    counts = await store.counts()
    assert (counts.failed, counts.pending) == (0, 2)


@pytest.mark.anyio
async def test_failed_requests_are_counted_and_listed_through_the_partial_index(store: SqliteQueue) -> None:
    """The failed count and the failed listing read the `requests_failed` index, not the table's rows."""
    await add(store, 1)
    async with raw_connection(store.path) as raw:
        count_plan = await raw.execute("EXPLAIN QUERY PLAN SELECT count(*) FROM requests WHERE failed = 1")
        list_plan = await raw.execute(
            "EXPLAIN QUERY PLAN SELECT id, data FROM requests WHERE id > ? AND (failed = 1) ORDER BY id LIMIT 5", ("",)
        )
    assert "requests_failed" in str(count_plan)
    assert "requests_failed" in str(list_plan)


@pytest.mark.anyio
async def test_a_quarantined_row_is_failed(store: SqliteQueue) -> None:
    """An unreadable row ended by lock_head carries the marker (and its label, if readable) and counts as failed."""
    (rid,) = await add(store, 1)
    async with raw_connection(store.path) as raw:
        await raw.execute(
            "UPDATE requests SET data = ? WHERE id = ?",
            ('{"uniqueKey": "k", "url": "u", "userData": {"label": "detail"}, "retryCount": "x"}', rid),
        )
    head = await store.lock_head(limit=1, lock_secs=LONG, client_key=A)
    assert head.quarantined == 1
    ended = await store.get_request(rid)
    assert ended is not None
    assert ended.is_failed
    assert ended.label == "detail"
    assert (await store.counts()).failed == 1
    [item] = (await store.list_requests(limit=10, failed=True)).items
    assert item["id"] == rid


@pytest.mark.anyio
async def test_list_requests_by_state_in_id_order_and_by_pages(store: SqliteQueue) -> None:
    """Each state alone, a union, every request; pages of 2 continue after the last id and end on a short page."""
    ids = await add(store, *range(7))
    await handle(store, 0)
    await fail(store, 1)
    await fail(store, 2)
    [locked] = [r.id for r in (await store.lock_head(limit=1, lock_secs=LONG, client_key=A)).items]

    async def listed(**states: bool) -> list[str]:
        return [item["id"] for item in (await store.list_requests(limit=100, **states)).items]

    failed_ids = {request_id_for(url(1)), request_id_for(url(2))}
    assert set(await listed(failed=True)) == failed_ids
    assert await listed(handled=True) == [request_id_for(url(0))]
    assert await listed(locked=True) == [locked]
    pending = set(ids) - failed_ids - {request_id_for(url(0)), locked}
    assert set(await listed(pending=True)) == pending
    assert set(await listed(failed=True, pending=True)) == failed_ids | pending
    assert await listed() == sorted(ids)
    pages: list[list[str]] = []
    after = None
    for _ in range(10):
        page = await store.list_requests(after=after, limit=2)
        pages.append([item["id"] for item in page.items])
        after = page.next_after
        if after is None:
            break
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert [i for p in pages for i in p] == sorted(ids)
    with pytest.raises(InvalidInputError, match="limit"):
        await store.list_requests(limit=0)


@pytest.mark.anyio
async def test_an_expired_lock_lists_as_pending_by_the_stores_clock(tmp_path: Path) -> None:
    """A lock past its expiry on the store's clock is pending, even when the wall clock says otherwise."""
    time_ = SteppedTime()
    queue = SqliteQueue(tmp_path / "q.sqlite", clock=time_.clock())
    try:
        (rid,) = await add(queue, 1)
        await queue.lock_head(limit=1, lock_secs=10, client_key=A)
        time_.step_wall(-3600)  # the wall clock goes back: the lock must still run out on time
        time_.elapse(11)
        assert [i["id"] for i in (await queue.list_requests(limit=5, pending=True)).items] == [rid]
        assert (await queue.list_requests(limit=5, locked=True)).items == []
        assert (await queue.counts()).locked == 0
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_requeue_gives_a_fresh_retry_budget_keeps_the_errors_and_is_idempotent(store: SqliteQueue) -> None:
    """A failed and an ended request go back to the end of the queue: retry 0, no handledAt, no marker, the errors
    and other userData kept; pending, missing and quarantined ids are reported and left alone; twice changes nothing."""
    await add(store, 1, 2, 3, 4)
    await fail(store, 1, user_data={"label": "detail", "__crawlee": {"state": 6, "crawlDepth": 2}})
    await handle(store, 2)
    (damaged,) = await add(store, 5)
    async with raw_connection(store.path) as raw:
        await raw.execute("UPDATE requests SET data = '{' WHERE id = ?", (damaged,))
    assert (await store.lock_head(limit=25, lock_secs=LONG, client_key=B)).quarantined == 1
    await store.unlock_requests(client_key=B)
    ids = [request_id_for(url(n)) for n in (1, 2, 3)]
    result = await store.requeue([*ids, "noSuchRequest", damaged], client_key=A)
    assert (result.requeued, result.not_handled, result.missing, result.unreadable) == (
        ids[:2],
        [ids[2]],
        ["noSuchRequest"],
        [damaged],
    )
    again = await store.get_request(ids[0])
    assert again is not None
    assert (again.handled_at, again.retry_count, again.error_messages) == (None, 0, ["ValueError: page 1"])
    assert again.user_data == {"label": "detail", "__crawlee": {"crawlDepth": 2}}
    counts = await store.counts()
    assert (counts.handled, counts.failed, counts.pending) == (0, 1, 4)
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key=A)
    assert [r.url for r in head.items] == [url(3), url(4), url(1), url(2)]  # at the end, in the order given
    second = await store.requeue(ids, client_key=A)
    assert (second.requeued, second.not_handled) == ([], ids)


@pytest.mark.anyio
async def test_requeue_takes_a_bounded_batch(store: SqliteQueue) -> None:
    """More than MAX_REQUEUE_BATCH ids in one call is an InvalidInputError; no ids is nothing done."""
    with pytest.raises(InvalidInputError, match=f"at most {MAX_REQUEUE_BATCH}"):
        await store.requeue(["x"] * (MAX_REQUEUE_BATCH + 1), client_key=A)
    assert await store.requeue([], client_key=A) == RequeueResult()


@pytest.mark.anyio
async def test_drop_deletes_the_file_and_its_wal_and_shm(tmp_path: Path) -> None:
    """drop closes the store and removes the queue file and its -wal/-shm, which another connection to the file (a
    process still on it) keeps; a second drop is NotFoundError."""
    path = tmp_path / "q.sqlite"
    queue = SqliteQueue(path)
    await add(queue, 1)
    async with raw_connection(path) as raw:
        await raw.execute("SELECT count(*) FROM requests")
        await queue.drop()
        assert not [p async for p in anyio.Path(tmp_path).iterdir()]
    with pytest.raises(NotFoundError):
        await SqliteQueue(path).drop()


_OLD_SCHEMA = """
CREATE TABLE queue (one INTEGER PRIMARY KEY CHECK (one = 1), id TEXT NOT NULL, name TEXT, created_at INTEGER NOT NULL,
    modified_at INTEGER NOT NULL, accessed_at INTEGER NOT NULL, total INTEGER NOT NULL DEFAULT 0,
    handled INTEGER NOT NULL DEFAULT 0, had_multiple_clients INTEGER NOT NULL DEFAULT 0);
CREATE TABLE clients (client_key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE requests (id TEXT PRIMARY KEY, order_no INTEGER, lock_client TEXT, lock_expires INTEGER,
    data TEXT NOT NULL);
CREATE INDEX requests_head ON requests (order_no) WHERE order_no IS NOT NULL;
CREATE INDEX requests_locks ON requests (lock_expires) WHERE lock_expires IS NOT NULL;
INSERT INTO queue VALUES (1, 'oldQueueId', 'q', 1, 1, 1, 6, 4, 0);
"""


@pytest.mark.anyio
async def test_a_file_from_before_the_failed_column_is_migrated_on_open(tmp_path: Path) -> None:
    """An old file gets the column: requests with the marker (crawlee's) and those older versions quarantined count
    as failed; a damaged row does not stop the migration and is quarantined later; the file keeps working."""
    path = tmp_path / "q.sqlite"

    def row(n: int, **fields: object) -> tuple[str, str]:
        return request_id_for(url(n)), json.dumps(
            {"id": request_id_for(url(n)), "uniqueKey": url(n), "url": url(n)} | fields
        )

    done = "2026-01-01T00:00:00.000Z"
    rows = [
        (*row(1, handledAt=done, userData={"__crawlee": {"state": 6}}), None),  # failed by crawlee
        (*row(2, handledAt=done, unreadableData="{", errorMessages=["quarantined: ..."]), None),  # old quarantine
        (*row(3, handledAt=done, errorMessages=["ValueError: x"]), None),  # ended: failed or not, nobody knows
        (*row(4), 10),
        (request_id_for(url(5)), "{", 11),  # damage
        (request_id_for(url(6)), '{"handledAt": "', None),  # damage, handled: the migration reads it too
    ]

    def build() -> None:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.executescript(_OLD_SCHEMA)
            db.executemany("INSERT INTO requests (id, data, order_no) VALUES (?, ?, ?)", rows)
            db.commit()

    await anyio.to_thread.run_sync(build)
    queue = SqliteQueue(path)
    try:
        with capture_logs() as logs:
            counts = await queue.counts()
        migrated = [e for e in logs if e["event"] == "queue.schema_migrated"]
        assert [e.get("added") or e.get("dropped") for e in migrated] == ["requests.failed", "requests_locks"]
        assert (counts.total, counts.handled, counts.failed, counts.pending) == (6, 2, 2, 2)
        quarantined = await queue.get_request(request_id_for(url(2)))
        assert quarantined is not None
        assert quarantined.is_failed
        head = await queue.lock_head(limit=5, lock_secs=LONG, client_key=A)
        assert ([r.url for r in head.items], head.quarantined) == ([url(4)], 1)
        assert (await queue.counts()).failed == 3
    finally:
        await queue.aclose()
    again = SqliteQueue(path)  # a second open finds the column and migrates nothing
    try:
        with capture_logs() as logs:
            assert (await again.counts()).failed == 3
        assert not [e for e in logs if e["event"] == "queue.schema_migrated"]
    finally:
        await again.aclose()


# -- the handled mark from an id (`HandledMark`, what the committer uses on this store) --------------------------


@pytest.mark.anyio
async def test_mark_handled_patches_the_stored_request_and_releases_its_lock(store: SqliteQueue) -> None:
    """mark_handled by the holder sets handledAt (the API's format) and keeps every other stored field."""
    await store.batch_add([draft(1, headers={"X-A": "1"}, payload="p")], client_key=A)
    [held] = (await store.lock_head(limit=1, lock_secs=LONG, client_key=A)).items
    before = datetime.now(UTC) - timedelta(seconds=1)
    await store.mark_handled(held.id, client_key=A)
    after = await store.get_request(held.id)
    assert after is not None
    assert after.handled_at is not None
    assert before <= after.handled_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert after.model_copy(update={"handled_at": None}) == held
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", after.model_dump(mode="json")["handled_at"])
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (1, 0)
    assert await store.locks() == []
    assert (await store.lock_head(limit=1, lock_secs=LONG, client_key=B)).items == []


@pytest.mark.anyio
async def test_mark_handled_is_fenced_on_the_lock(store: SqliteQueue) -> None:
    """mark_handled of a request another client holds, an unlocked, handled or unknown one stores nothing."""
    [theirs_id, unlocked_id] = await add(store, 1, 2)
    [theirs] = (await store.lock_head(limit=1, lock_secs=LONG, client_key=B)).items
    assert theirs.id == theirs_id
    with pytest.raises(LockLostError, match="not locked by this client"):
        await store.mark_handled(theirs_id, client_key=A)
    with pytest.raises(LockLostError, match="not locked by this client"):
        await store.mark_handled(unlocked_id, client_key=A)
    with pytest.raises(NotFoundError):
        await store.mark_handled(request_id_for(url(3)), client_key=A)
    assert (await store.get_info()).handled_request_count == 0
    await store.mark_handled(theirs_id, client_key=B)
    with pytest.raises(AlreadyHandledError):
        await store.mark_handled(theirs_id, client_key=B)
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (1, 1)
    for request_id in (theirs_id, unlocked_id):
        request = await store.get_request(request_id)
        assert request is not None
        assert (request.handled_at is not None) == (request_id == theirs_id)


@pytest.mark.anyio
async def test_handled_marks_committed_together_each_get_their_own_outcome(store: SqliteQueue) -> None:
    """Marks that arrive together go in one group commit (one statement for all); when one of them misses, the
    others still apply with their links and the miss gets its own error and keeps no link, as if each had gone
    alone."""
    ids = await add(store, 0, 1, 2, 3, 4)
    assert await lock_keys(store, A, limit=4) == ["0", "1", "2", "3"]
    assert await lock_keys(store, B, limit=1) == ["4"]
    await store.mark_handled(ids[3], client_key=A)
    outcomes: dict[int, BaseException | None] = {}

    async def mark(n: int) -> None:
        try:
            await store.mark_handled(ids[n], client_key=A, links=store.prepare_links({False: [draft(f"link{n}")]}))
            outcomes[n] = None
        except QueueError as exc:
            outcomes[n] = exc

    async with raw_connection(store.path) as raw:
        await raw.execute("BEGIN IMMEDIATE")  # the store's next write waits for it: the marks queue up behind
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(store.batch_add, [draft("x")], client_key=A))
                await anyio.wait_all_tasks_blocked()
                for n in range(5):
                    tg.start_soon(mark, n)
                await anyio.wait_all_tasks_blocked()
                await raw.execute("ROLLBACK")
    assert [outcomes[n] for n in range(3)] == [None, None, None]
    assert isinstance(outcomes[3], AlreadyHandledError)
    assert isinstance(outcomes[4], LockLostError)
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (4, 5)  # "x" and the links of 0, 1, 2
    for n in range(5):  # the links of the marks that missed were not kept
        assert (await store.get_request(request_id_for(url(f"link{n}"))) is not None) == (n < 3)
    for n, request_id in enumerate(ids):
        request = await store.get_request(request_id)
        assert request is not None
        assert (request.handled_at is not None) == (n < 4)
    assert [(request_id, holder) for request_id, holder, _ in await store.locks()] == [(ids[4], B)]


@pytest.mark.anyio
async def test_links_of_marks_committed_together_are_stored_once_each_and_reported_to_the_first(
    store: SqliteQueue,
) -> None:
    """Marks of two holders in one group commit, more than one chunk of them (`_IN_CHUNK`), some naming the same
    new link, some a stored one: each link is stored once, in order, reported new to the first mark naming it."""
    count = 300
    ids = await add(store, "old")
    assert await lock_keys(store, B, limit=1) == ["old"]  # "old" stays pending under B's lock: a stored link
    for start in range(0, count, 25):
        ids += await add(store, *range(start, start + 25))
        await store.lock_head(limit=25, lock_secs=LONG, client_key=A)
    done: dict[int, Any] = {}

    async def mark(n: int) -> None:
        links = [draft(f"link{n}"), draft("shared"), draft("old")]
        done[n] = await store.mark_handled(ids[n + 1], client_key=A, links=store.prepare_links({False: links}))

    async with raw_connection(store.path) as raw:
        await raw.execute("BEGIN IMMEDIATE")  # the store's next write waits for it: the marks queue up behind
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(store.batch_add, [draft("x")], client_key=A))
                await anyio.wait_all_tasks_blocked()
                for n in range(count):
                    tg.start_soon(mark, n)
                await anyio.wait_all_tasks_blocked()
                await raw.execute("ROLLBACK")
    assert done[0].new == {url("link0"), url("shared")}
    assert all(done[n].new == {url(f"link{n}")} for n in range(1, count))
    assert all(set(done[n].links) == {url(f"link{n}"), url("shared"), url("old")} for n in range(count))
    info = await store.get_info()
    # "old" (locked by B), "x", the 300 links and "shared" are pending; the 300 marked are handled.
    assert (info.handled_request_count, info.pending_request_count) == (count, 1 + 1 + count + 1)
    await store.delete_lock(ids[0], client_key=B, forefront=True)
    head = []
    for _ in range(20):
        batch = await lock_keys(store, A)
        if not batch:
            break
        head += batch
    assert head == ["old", "x", "link0", "shared", *(f"link{n}" for n in range(1, count))]  # in the order added


@pytest.mark.anyio
async def test_mark_handled_adds_the_links_with_the_mark_or_none_of_them(store: SqliteQueue) -> None:
    """The links given to mark_handled are stored in the mark's write and reported (new ones apart); a refused mark
    stores none of them."""
    [mine, theirs] = await add(store, "mine", "theirs")
    assert await lock_keys(store, A, limit=1) == ["mine"]
    assert await lock_keys(store, B, limit=1) == ["theirs"]
    links = store.prepare_links({False: [draft("new"), draft("theirs")], True: [draft("first")]})
    done = await store.mark_handled(mine, client_key=A, links=links)
    assert done.links == {url(n): request_id_for(url(n)) for n in ("new", "theirs", "first")}
    assert done.new == {url("new"), url("first")}
    assert await lock_keys(store, B) == ["first", "new"]  # forefront first
    with pytest.raises(LockLostError):
        await store.mark_handled(theirs, client_key=A, links=store.prepare_links({False: [draft("lost")]}))
    assert await store.get_request(request_id_for(url("lost"))) is None
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (4, 1)


@pytest.mark.anyio
async def test_prepare_links_refuses_a_link_with_no_json_form(store: SqliteQueue) -> None:
    with pytest.raises(InvalidInputError, match="cannot be stored as JSON"):
        store.prepare_links({False: [RequestDraft(unique_key=url("x"), url=url("x"), user_data={"x": object()})]})


@pytest.mark.parametrize(
    ("fields", "by_orjson"),
    [
        ({}, True),
        ({"user_data": {"label": "DETAIL"}}, True),
        ({"method": "POST", "user_data": {"ü": '\u2028\x00\x1f\x7f"\\/ \U0001f600'}}, True),
        ({"user_data": {"when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)}}, False),  # orjson would write +00:00
        ({"user_data": {"n": 2**70, "x": float("nan"), "t": (1, "a")}}, False),
        ({"headers": {"a": "b"}, "payload": "p", "no_retry": True}, False),
    ],
)
def test_a_links_stored_json_is_pydantics_whoever_writes_it(fields: dict[str, Any], by_orjson: bool) -> None:
    """The usual link is written by orjson (`_plain_json`), any other by pydantic: the text is the same."""
    link = RequestDraft(unique_key=url("x"), url=url("x"), **fields)
    fast = _plain_json(link)
    assert (fast is not None) == by_orjson
    assert (fast or _dump(link, "batch_add")) == _dump(link, "batch_add")


@pytest.mark.anyio
async def test_mark_handled_by_the_holder_of_an_expired_lock_nobody_retook_applies(store: SqliteQueue) -> None:
    """A lock that ran out is still its holder's until someone retakes it: the mark applies."""
    [request_id] = await add(store, 1)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    with anyio.fail_after(5):
        for _ in range(250):  # polled until the lock has run out on the store's clock
            if (await store.counts()).locked == 0:
                break
            await anyio.sleep(0.02)
    assert (await store.counts()).locked == 0
    await store.mark_handled(request_id, client_key=A)
    assert (await store.get_info()).handled_request_count == 1
