"""The store contract, one suite for every backend: the embedded SQLite store and the PostgreSQL queue.

Ported from tests/test_store.py (the embedded store's own tests, which keep what only SQLite has: files, its clock,
WAL checkpoints, migrations of old files). Lock expiry here is real time on each store's own clock (SQLite's
`StoreClock`, Postgres's `now()`): short locks waited out by polling with a deadline.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from structlog.testing import capture_logs

from runner.errors import InvalidInputError, LockLostError, NotFoundError, QueueUnavailableError
from runner.models import QueueCounts, Request, RequestDraft, with_failed_mark
from runner.queue.admin import MAX_REQUEUE_BATCH, QueueAdmin, RequeueResult
from runner.queue.postgres import PostgresQueue
from runner.queue.protocol import RequestQueue
from runner.queue.sqlite import SqliteQueue
from runner.uniquekey import request_id_for

A = "client-a"
B = "client-b"
C = "client-c"
LONG = 60.0  # a lock that outlives any test
SHORT = 0.3  # a lock the test waits out by polling

Queue = SqliteQueue | PostgresQueue


@dataclass
class Backend:
    """One backend under test: how to open a(nother) handle on the test's queue and damage a stored row."""

    name: str
    open: Callable[[], Awaitable[Queue]]
    damage: Callable[[str, str], Awaitable[None]]
    handles: list[Queue] = field(default_factory=list)

    async def another(self) -> Queue:
        """A second handle on the same queue (another process, as far as the store can tell)."""
        queue = await self.open()
        self.handles.append(queue)
        return queue


async def _sqlite_damage(path: Path, request_id: str, text: str) -> None:
    def write() -> None:
        db = sqlite3.connect(path, isolation_level=None, timeout=5)
        try:
            db.execute("UPDATE requests SET data = ? WHERE id = ?", (text, request_id))
        finally:
            db.close()

    await anyio.to_thread.run_sync(write)


async def _postgres_damage(dsn: str, request_id: str, text: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("UPDATE headlock_requests SET data = %s::json WHERE id = %s", (text, request_id))


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """Where the test's queue lives on each backend: a fresh file, or a fresh schema of the session's server."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "q.sqlite")
    return "postgres", request.getfixturevalue("postgres_dsn")


@pytest.fixture
async def backend(target: tuple[str, str]) -> AsyncIterator[Backend]:
    """The test's queue on each backend; every handle opened through it is closed at the end."""
    name, where = target
    if name == "sqlite":

        async def open_sqlite() -> Queue:
            return SqliteQueue(Path(where))

        chosen = Backend(name, open_sqlite, partial(_sqlite_damage, Path(where)))
    else:
        chosen = Backend(name, partial(PostgresQueue.open, where, "q"), partial(_postgres_damage, where))
    try:
        yield chosen
    finally:
        for queue in chosen.handles:
            await queue.aclose()


@pytest.fixture
async def store(backend: Backend) -> Queue:
    """The first handle on the test's queue (closed by `backend`)."""
    return await backend.another()


def url(n: int | str) -> str:
    return f"http://example.com/{n}"


def rid(n: int | str) -> str:
    return request_id_for(url(n))


def draft(n: int | str, **extra: object) -> RequestDraft:
    return RequestDraft(unique_key=url(n), url=url(n), user_data={"n": str(n)}, **extra)


def stored(n: int | str, **fields: object) -> Request:
    return Request(id=rid(n), unique_key=url(n), url=url(n), **fields)


async def add(queue: Queue, *keys: int | str, forefront: bool = False, client_key: str = A) -> list[str]:
    result = await queue.batch_add([draft(k) for k in keys], client_key=client_key, forefront=forefront)
    return [p.request_id for p in result.processed_requests]


async def lock_keys(queue: Queue, client_key: str = A, *, limit: int = 25, lock_secs: float = LONG) -> list[str]:
    """Lock the head and return the locked requests' `userData.n` in head order."""
    head = await queue.lock_head(limit=limit, lock_secs=lock_secs, client_key=client_key)
    return [r.user_data["n"] for r in head.items]


async def poll_lock_head(queue: Queue, client_key: str) -> list[Request]:
    """Lock the head until it yields something; bounded by a deadline and a number of tries."""
    with anyio.fail_after(5):
        for _ in range(250):
            head = await queue.lock_head(limit=25, lock_secs=LONG, client_key=client_key)
            if head.items:
                return head.items
            await anyio.sleep(0.02)
    pytest.fail("lock_head never returned the request")


async def wait_unlocked(queue: Queue) -> None:
    """Poll until the store counts no live lock (the short locks have run out on its clock)."""
    with anyio.fail_after(5):
        for _ in range(250):
            if (await queue.counts()).locked == 0:
                return
            await anyio.sleep(0.02)
    pytest.fail("the locks never ran out")


async def handle(queue: Queue, n: int | str, client_key: str = A) -> None:
    request = await queue.get_request(rid(n))
    assert request is not None
    request.handled_at = datetime.now(UTC)
    await queue.update_request(request, client_key=client_key)


async def fail(queue: Queue, n: int | str, client_key: str = A, **extra: object) -> None:
    """End request `n` as the committer ends a request that failed for good: handled, marker, one more error."""
    request = await queue.get_request(rid(n))
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


async def live_locks(queue: Queue) -> list[tuple[str, str]]:
    return [(request_id, holder) for request_id, holder, _ in await queue.locks()]


# -- the Protocols ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_store_implements_both_protocols(store: Queue) -> None:
    """Every backend is a RequestQueue and a QueueAdmin."""
    assert isinstance(store, RequestQueue)
    assert isinstance(store, QueueAdmin)


@pytest.mark.anyio
async def test_a_new_queue_is_named_and_empty(store: Queue) -> None:
    """A queue made on first use has its name, a 17-character id and zero counts."""
    info = await store.get_info()
    assert info.name == "q"
    assert len(info.id) == 17
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (0, 0, 0)
    assert not info.had_multiple_clients


# -- ordering (§9) ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_normal_adds_are_fifo(store: Queue) -> None:
    """Requests added without forefront come out in the order they were added, across and within batches."""
    await add(store, 1, 2, 3)
    await add(store, 4)
    await add(store, 5, 6)
    await add(store, *range(7, 30))
    assert await lock_keys(store) == [str(n) for n in range(1, 26)]
    assert await lock_keys(store) == [str(n) for n in range(26, 30)]


@pytest.mark.anyio
async def test_forefront_batches_come_first_most_recent_first(store: Queue) -> None:
    """Forefront adds precede normal ones; the latest forefront batch is first, each batch in its own order."""
    await add(store, "n1", "n2")
    await add(store, "f1", "f2", forefront=True)
    await add(store, "n3")
    await add(store, "g1", "g2", forefront=True)
    assert await lock_keys(store) == ["g1", "g2", "f1", "f2", "n1", "n2", "n3"]


@pytest.mark.anyio
async def test_lock_head_returns_complete_requests_up_to_limit(store: Queue) -> None:
    """lock_head locks at most `limit` requests; returns them with userData, lockSecs and `locked_at`."""
    await add(store, 1, 2, 3)
    before = anyio.current_time()
    head = await store.lock_head(limit=2, lock_secs=LONG, client_key=A)
    assert head.locked_at is not None
    assert before <= head.locked_at <= anyio.current_time()
    assert [r.user_data for r in head.items] == [{"n": "1"}, {"n": "2"}]
    assert [r.id for r in head.items] == [rid(1), rid(2)]
    assert head.lock_secs == LONG
    assert await lock_keys(store) == ["3"]


@pytest.mark.parametrize(("forefront", "order"), [(True, ["1", "2", "3"]), (False, ["2", "3", "1"])])
@pytest.mark.anyio
async def test_delete_lock_puts_request_at_head_or_end(store: Queue, forefront: bool, order: list[str]) -> None:
    """delete_lock(forefront=True) puts the request at the head; the default puts it at the end."""
    await add(store, 1, 2, 3)
    assert await lock_keys(store, limit=1) == ["1"]
    await store.delete_lock(rid(1), client_key=A, forefront=forefront)
    assert await lock_keys(store) == order


@pytest.mark.anyio
async def test_forefront_delete_lock_goes_before_forefront_adds(store: Queue) -> None:
    """A request released with forefront after a forefront add is the newest forefront item, so it is first."""
    await add(store, 1, 2)
    assert await lock_keys(store, limit=1) == ["1"]
    await add(store, "f", forefront=True)
    await store.delete_lock(rid(1), client_key=A, forefront=True)
    assert await lock_keys(store) == ["1", "f", "2"]


@pytest.mark.anyio
async def test_an_expired_forefront_lock_comes_back_at_the_head(store: Queue) -> None:
    """A forefront request whose lock ran out is back before the normal requests."""
    await add(store, 1, 2)
    await add(store, "f", forefront=True)
    assert await lock_keys(store, limit=1, lock_secs=SHORT) == ["f"]
    await wait_unlocked(store)
    assert await lock_keys(store, B) == ["f", "1", "2"]


# -- dedup (§2.2 (9), (10)) ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_batch_add_dedups_by_unique_key(store: Queue) -> None:
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
    assert flags == [(rid(1), url(1), False, False), (rid(1), url(1), True, False), (rid(1), url(1), True, True)]
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (1, 1)


@pytest.mark.anyio
async def test_duplicate_within_one_batch_is_stored_once(store: Queue) -> None:
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
async def test_a_batch_of_present_and_new_requests_reports_each(store: Queue) -> None:
    """One batch of two known (one handled) and two new requests: each reported as it is, only the new counted."""
    await add(store, 1, 2)
    await handle(store, 2)
    result = await store.batch_add([draft(3), draft(1), draft(2), draft(4)], client_key=B)
    assert [(r.request_id, r.was_already_present, r.was_already_handled) for r in result.processed_requests] == [
        (rid(3), False, False),
        (rid(1), True, False),
        (rid(2), True, True),
        (rid(4), False, False),
    ]
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (4, 1, 3)
    assert await lock_keys(store) == ["1", "3", "4"]


@pytest.mark.anyio
async def test_forefront_add_of_present_request_does_not_move_it(store: Queue) -> None:
    """Re-adding an already present request with forefront leaves it where it is (as memory-storage does)."""
    await add(store, 1, 2)
    await add(store, 2, forefront=True)
    assert await lock_keys(store) == ["1", "2"]


@pytest.mark.anyio
async def test_batch_add_with_handled_at_is_stored_handled(store: Queue) -> None:
    """A draft carrying handledAt is stored handled: counted, never in the head."""
    await store.batch_add([draft(1, handledAt="2024-01-01T00:00:00Z"), draft(2)], client_key=A)
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (2, 1, 1)
    assert await lock_keys(store) == ["2"]
    request = await store.get_request(rid(1))
    assert request is not None
    assert request.handled_at == datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.anyio
async def test_batch_add_with_mismatched_id_is_refused(store: Queue) -> None:
    """A draft whose id does not match its uniqueKey raises request-id-invalid and stores nothing."""
    with pytest.raises(InvalidInputError) as caught:
        await store.batch_add([draft(1), draft(2, id="AAAAAAAAAAAAAAA")], client_key=A)
    assert caught.value.error_type == "request-id-invalid"
    assert (await store.get_info()).total_request_count == 0
    matching = await store.batch_add([draft(3, id=rid(3))], client_key=A)
    assert matching.processed_requests[0].request_id == rid(3)


@pytest.mark.anyio
async def test_invalid_draft_is_refused_and_head_stays_usable(store: Queue) -> None:
    """A draft that is not a valid request raises InvalidInputError up front instead of poisoning the head."""
    await add(store, 1)
    with pytest.raises(InvalidInputError, match="invalid request"):
        await store.batch_add([draft(2, retryCount="many")], client_key=A)
    with pytest.raises(InvalidInputError):
        await store.batch_add([draft(3, handledAt="yesterday")], client_key=A)
    assert await lock_keys(store) == ["1"]
    assert (await store.get_info()).total_request_count == 1


@pytest.mark.anyio
async def test_a_draft_that_cannot_be_stored_as_json_is_refused_and_its_batch_is_not_stored(store: Queue) -> None:
    """A plain draft whose userData has no JSON form raises InvalidInputError naming it; the batch stores nothing."""
    bad = RequestDraft(unique_key=url("bad"), url=url("bad"), user_data={"x": object()})
    with pytest.raises(InvalidInputError, match=r"request 'http://example.com/bad' cannot be stored as JSON"):
        await store.batch_add([draft(1), bad], client_key=A)
    assert (await store.get_info()).total_request_count == 0


@pytest.mark.anyio
async def test_empty_batch_adds_nothing(store: Queue) -> None:
    """An empty batch returns an empty result."""
    result = await store.batch_add([], client_key=A)
    assert (result.processed_requests, result.unprocessed_requests) == ([], [])


@pytest.mark.anyio
async def test_plain_and_extra_field_drafts_read_back_as_the_requests_they_describe(store: Queue) -> None:
    """A plain draft and one with extra fields read back alike, defaults set, odd characters intact."""
    plain = RequestDraft(
        unique_key=url(1), url=url(1), method="POST", payload="p", headers={"X-A": "b"}, user_data={"é": "ü\"'\x00"}
    )
    extra = RequestDraft.model_validate({"uniqueKey": url(2), "url": url(2), "custom": {"k": [1, 2]}})
    await store.batch_add([plain, extra], client_key=A)
    first, second = await store.get_request(rid(1)), await store.get_request(rid(2))
    assert first is not None
    assert second is not None
    assert first.to_api() == {
        "id": rid(1),
        "uniqueKey": url(1),
        "url": url(1),
        "method": "POST",
        "retryCount": 0,
        "userData": {"é": "ü\"'\x00"},
        "headers": {"X-A": "b"},
        "payload": "p",
        "errorMessages": [],
    }
    assert second.to_api()["custom"] == {"k": [1, 2]}
    assert (second.retry_count, second.error_messages) == (0, [])


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.anyio
async def test_deeply_nested_user_data_reads_back(store: Queue) -> None:
    """userData nested past the JSON parser's 200 levels reads back whole and does not block the head."""
    deep = RequestDraft(unique_key=url("deep"), url=url("deep"), user_data={"n": "deep", "x": nested(250)})
    await store.batch_add([deep], client_key=A)
    await add(store, 1)
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key=A)
    assert [r.user_data["n"] for r in head.items] == ["deep", "1"]
    assert head.items[0].user_data["x"] == nested(250)
    assert head.quarantined == 0


# -- limits (§2.1, §4.2) -------------------------------------------------------------------------------------------

Call = Callable[[Queue], Awaitable[object]]
INVALID_CALLS: dict[str, Call] = {
    "lock_head limit 0": lambda q: q.lock_head(limit=0, lock_secs=LONG, client_key=A),
    "lock_head limit 26": lambda q: q.lock_head(limit=26, lock_secs=LONG, client_key=A),
    "lock_head lockSecs 0": lambda q: q.lock_head(limit=1, lock_secs=0, client_key=A),
    "lock_head lockSecs nan": lambda q: q.lock_head(limit=1, lock_secs=float("nan"), client_key=A),
    "lock_head lockSecs inf": lambda q: q.lock_head(limit=1, lock_secs=float("inf"), client_key=A),
    "lock_head clientKey empty": lambda q: q.lock_head(limit=1, lock_secs=LONG, client_key=""),
    "lock_head clientKey 33": lambda q: q.lock_head(limit=1, lock_secs=LONG, client_key="k" * 33),
    "batch of 26": lambda q: q.batch_add([draft(n) for n in range(26)], client_key=A),
    "batch_add clientKey empty": lambda q: q.batch_add([draft(1)], client_key=""),
    "prolong lockSecs 0": lambda q: q.prolong_lock(rid(0), lock_secs=0, client_key=A),
    "prolong lockSecs nan": lambda q: q.prolong_lock(rid(0), lock_secs=float("nan"), client_key=A),
    "prolong clientKey 33": lambda q: q.prolong_lock(rid(0), lock_secs=LONG, client_key="k" * 33),
    "delete_lock clientKey empty": lambda q: q.delete_lock(rid(0), client_key=""),
    "unlock clientKey 33": lambda q: q.unlock_requests(client_key="k" * 33),
    "update clientKey empty": lambda q: q.update_request(stored(1), client_key=""),
    "list limit 0": lambda q: q.list_requests(limit=0),
    "requeue too many": lambda q: q.requeue(["x"] * (MAX_REQUEUE_BATCH + 1), client_key=A),
}


@pytest.mark.parametrize("call", INVALID_CALLS.values(), ids=INVALID_CALLS.keys())
@pytest.mark.anyio
async def test_out_of_range_arguments_raise_invalid_input(store: Queue, call: Call) -> None:
    """Arguments outside the contract's limits raise InvalidInputError and change nothing."""
    await add(store, 0)
    with pytest.raises(InvalidInputError):
        await call(store)
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (1, 0)
    assert await lock_keys(store) == ["0"]


@pytest.mark.anyio
async def test_limits_at_the_edges_are_accepted(store: Queue) -> None:
    """A batch of 25, limit 25 and client keys of 1 and 32 chars are accepted."""
    await store.batch_add([draft(n) for n in range(25)], client_key="k")
    head = await store.lock_head(limit=25, lock_secs=LONG, client_key="k" * 32)
    assert len(head.items) == 25


# -- lock ownership and fencing (§2.2 (16), (17); §4.2) -----------------------------------------------------------


@pytest.mark.anyio
async def test_other_client_cannot_prolong_or_delete_lock(store: Queue) -> None:
    """Only the holder may prolong or delete a lock; another client key gets LockLostError."""
    [request_id] = await add(store, 1)
    await lock_keys(store, A)
    with pytest.raises(LockLostError) as caught:
        await store.prolong_lock(request_id, lock_secs=LONG, client_key=B)
    assert caught.value.error_type == "request-handled-or-locked"
    with pytest.raises(LockLostError):
        await store.delete_lock(request_id, client_key=B)
    assert await lock_keys(store, B) == []
    await store.delete_lock(request_id, client_key=A)
    assert await lock_keys(store, B) == ["1"]


@pytest.mark.anyio
async def test_lock_ops_on_unknown_request_raise_not_found(store: Queue) -> None:
    """Prolonging or deleting the lock of an unknown id raises NotFoundError; get_request returns None."""
    with pytest.raises(NotFoundError):
        await store.prolong_lock(rid("missing"), lock_secs=LONG, client_key=A)
    with pytest.raises(NotFoundError):
        await store.delete_lock(rid("missing"), client_key=A)
    assert await store.get_request(rid("missing")) is None


@pytest.mark.anyio
async def test_lock_ops_on_handled_request_raise_lock_lost(store: Queue) -> None:
    """Once a request is handled its former holder's prolong and delete_lock raise LockLostError."""
    [request_id] = await add(store, 1)
    await lock_keys(store, A)
    await handle(store, 1)
    with pytest.raises(LockLostError, match="handled"):
        await store.prolong_lock(request_id, lock_secs=LONG, client_key=A)
    with pytest.raises(LockLostError):
        await store.delete_lock(request_id, client_key=A)


@pytest.mark.anyio
async def test_released_lock_cannot_be_prolonged(store: Queue) -> None:
    """After delete_lock the former holder no longer owns the request."""
    [request_id] = await add(store, 1)
    await lock_keys(store, A)
    await store.delete_lock(request_id, client_key=A)
    with pytest.raises(LockLostError):
        await store.prolong_lock(request_id, lock_secs=LONG, client_key=A)


@pytest.mark.anyio
async def test_holder_prolongs_lock_to_now_plus_lock_secs(store: Queue) -> None:
    """prolong_lock returns now + lockSecs (the store's clock: here the machine's) and keeps the request locked."""
    [request_id] = await add(store, 1)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    before = datetime.now(UTC)
    expires = await store.prolong_lock(request_id, lock_secs=3600, client_key=A)
    after = datetime.now(UTC)
    slack = timedelta(seconds=1)  # the database's clock read at its transaction's start
    assert before + timedelta(seconds=3600) - slack <= expires <= after + timedelta(seconds=3600) + slack
    assert await live_locks(store) == [(request_id, A)]
    assert await lock_keys(store, B) == []


@pytest.mark.anyio
async def test_expired_lock_retaken_by_other_client_is_lost(store: Queue) -> None:
    """When a lock expires and another client locks the request, the old holder's prolong raises LockLostError."""
    [request_id] = await add(store, 1)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    assert [r.id for r in await poll_lock_head(store, B)] == [request_id]
    with pytest.raises(LockLostError):
        await store.prolong_lock(request_id, lock_secs=LONG, client_key=A)
    with pytest.raises(LockLostError):
        await store.delete_lock(request_id, client_key=A)
    await store.prolong_lock(request_id, lock_secs=LONG, client_key=B)


@pytest.mark.anyio
async def test_a_lost_leases_late_writes_change_nothing(store: Queue) -> None:
    """After another client retook the expired lock, the old holder's fenced failure record and handled mark raise
    LockLostError and write nothing: the request stays the new holder's, unhandled, unchanged."""
    [request_id] = await add(store, 1)
    [mine] = (await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)).items
    assert [r.id for r in await poll_lock_head(store, B)] == [request_id]
    failure = mine.model_copy(update={"retry_count": 1, "error_messages": ["boom"]})
    for attempt in (failure, failure.model_copy(update={"handled_at": datetime.now(UTC)})):
        with pytest.raises(LockLostError) as caught:
            await store.update_request(attempt, client_key=A, lock_required=True)
        assert caught.value.error_type == "request-handled-or-locked"
    assert await live_locks(store) == [(request_id, B)]
    after = await store.get_request(request_id)
    assert after is not None
    assert (after.retry_count, after.error_messages, after.handled_at) == (0, [], None)
    assert (await store.get_info()).handled_request_count == 0


@pytest.mark.anyio
async def test_fenced_update_of_a_request_another_client_handled_keeps_it_handled(store: Queue) -> None:
    """A fenced failure record for a request another client handled raises LockLostError; it stays handled."""
    [request_id] = await add(store, 1)
    [mine] = (await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)).items
    [theirs] = await poll_lock_head(store, B)
    await store.update_request(
        theirs.model_copy(update={"handled_at": datetime.now(UTC)}), client_key=B, lock_required=True
    )
    with pytest.raises(LockLostError, match="handled"):
        await store.update_request(mine.model_copy(update={"retry_count": 1}), client_key=A, lock_required=True)
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (1, 0)
    assert (await store.lock_head(limit=1, lock_secs=LONG, client_key=C)).items == []
    after = await store.get_request(request_id)
    assert after is not None
    assert (after.retry_count, after.handled_at is not None) == (0, True)


@pytest.mark.anyio
async def test_fenced_update_of_an_unlocked_or_unknown_request_is_refused(store: Queue) -> None:
    """A fenced update of an unlocked request raises LockLostError, of an unknown id NotFoundError; none stores."""
    await add(store, 1)
    with pytest.raises(LockLostError, match="not locked by this client"):
        await store.update_request(stored(1, retry_count=5), client_key=A, lock_required=True)
    with pytest.raises(NotFoundError) as caught:
        await store.update_request(stored(2, handled_at=datetime.now(UTC)), client_key=A, lock_required=True)
    assert caught.value.error_type == "record-not-found"
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (1, 0)
    request = await store.get_request(rid(1))
    assert request is not None
    assert request.retry_count == 0


@pytest.mark.anyio
async def test_fenced_update_by_the_holder_of_an_expired_lock_nobody_retook_applies_and_keeps_the_lock(
    store: Queue,
) -> None:
    """The holder of an expired lock nobody retook may write a fenced update, release it, and mark it handled."""
    [request_id] = await add(store, 1)
    [mine] = (await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)).items
    await wait_unlocked(store)
    await store.update_request(mine.model_copy(update={"retry_count": 1}), client_key=A, lock_required=True)
    await store.delete_lock(request_id, client_key=A, forefront=True)
    [again] = (await store.lock_head(limit=1, lock_secs=LONG, client_key=A)).items
    assert again.retry_count == 1
    await store.update_request(
        again.model_copy(update={"handled_at": datetime.now(UTC)}), client_key=A, lock_required=True
    )
    assert (await store.get_info()).handled_request_count == 1


@pytest.mark.anyio
async def test_fenced_updates_arriving_together_each_get_their_own_outcome(store: Queue) -> None:
    """Twenty handled marks sent at once (group-committed) all apply, while a lost one among them is refused
    alone and a second update of the same request in the same group lands after the first."""
    ids = await add(store, *range(20))
    held = (await store.lock_head(limit=20, lock_secs=LONG, client_key=A)).items
    await store.delete_lock(ids[19], client_key=A)
    outcomes: dict[str, object] = {}

    async def mark(request: Request, update: dict[str, Any], key: str) -> None:
        try:
            await store.update_request(request.model_copy(update=update), client_key=A, lock_required=True)
            outcomes[key] = "ok"
        except LockLostError as exc:
            outcomes[key] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(mark, held[0], {"retry_count": 7}, "retry")
            for n, request in enumerate(held):
                tg.start_soon(
                    mark, request, {"handled_at": datetime.now(UTC), "retry_count": 8 if n == 0 else 0}, str(n)
                )
    assert all(outcomes[str(n)] == "ok" for n in range(19))
    assert isinstance(outcomes["19"], LockLostError)
    assert outcomes["retry"] == "ok"
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (19, 1)
    first = await store.get_request(ids[0])
    assert first is not None
    assert (first.retry_count, first.handled_at is not None) == (8, True)  # the later update of it landed last
    assert await lock_keys(store, B) == ["19"]


# -- lock expiry and queueHasLockedRequests (§8, §9) --------------------------------------------------------------


@pytest.mark.anyio
async def test_locked_request_comes_back_after_lock_expires(store: Queue) -> None:
    """A locked request is not handed out again until its lock expires; then lock_head returns it."""
    await add(store, 1)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    blocked = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert blocked.items == []
    assert blocked.queue_has_locked_requests
    assert [r.user_data["n"] for r in await poll_lock_head(store, B)] == ["1"]


@pytest.mark.anyio
async def test_queue_has_locked_requests_tracks_any_live_lock(store: Queue) -> None:
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


@pytest.mark.anyio
async def test_an_expired_lock_counts_as_no_lock(store: Queue) -> None:
    """Once a lock runs out nobody holds it: not counted, not listed as locked; it is available where its expiry
    put it (after the requests added before that)."""
    await add(store, 1, 2)
    await store.lock_head(limit=1, lock_secs=SHORT, client_key=A)
    await wait_unlocked(store)
    assert [i["id"] for i in (await store.list_requests(limit=5, pending=True)).items] == sorted([rid(1), rid(2)])
    assert (await store.list_requests(limit=5, locked=True)).items == []
    assert await store.locks() == []
    head = await store.lock_head(limit=1, lock_secs=LONG, client_key=B)
    assert [r.id for r in head.items] == [rid(2)]
    assert [r.id for r in (await store.lock_head(limit=1, lock_secs=LONG, client_key=B)).items] == [rid(1)]


# -- update_request (§2.2 (14)) -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_update_with_handled_at_marks_handled_and_releases_lock(store: Queue) -> None:
    """handledAt moves the counters pending->handled, removes the request from the head and releases its lock."""
    [request_id, _] = await add(store, 1, 2)
    await lock_keys(store, A, limit=1)
    request = await store.get_request(request_id)
    assert request is not None
    request.handled_at = datetime.now(UTC)
    registration = await store.update_request(request, client_key=A)
    assert (registration.request_id, registration.was_already_present, registration.was_already_handled) == (
        request_id,
        True,
        False,
    )
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (2, 1, 1)
    assert await store.locks() == []
    assert await lock_keys(store, B) == ["2"]
    after = await store.get_request(request_id)
    assert after is not None
    assert after.handled_at is not None


@pytest.mark.anyio
async def test_update_without_handled_at_keeps_lock(store: Queue) -> None:
    """An update without handledAt stores the new body but the holder keeps the lock."""
    [request_id] = await add(store, 1)
    await lock_keys(store, A)
    await store.update_request(stored(1, user_data={"n": "1", "seen": True}, retry_count=1), client_key=A)
    blocked = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert (blocked.items, blocked.queue_has_locked_requests) == ([], True)
    await store.prolong_lock(request_id, lock_secs=LONG, client_key=A)
    request = await store.get_request(request_id)
    assert request is not None
    assert (request.user_data, request.retry_count) == ({"n": "1", "seen": True}, 1)


@pytest.mark.anyio
async def test_update_of_unknown_id_inserts(store: Queue) -> None:
    """update_request of an id not in the queue inserts it (wasAlreadyPresent false), pending or handled."""
    pending = await store.update_request(stored(1, user_data={"n": "1"}), client_key=A)
    handled = await store.update_request(stored(2, handled_at=datetime.now(UTC)), client_key=A)
    assert [(r.was_already_present, r.was_already_handled) for r in (pending, handled)] == [(False, False)] * 2
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count) == (2, 1)
    assert await lock_keys(store) == ["1"]


@pytest.mark.anyio
async def test_update_with_mismatched_id_is_refused(store: Queue) -> None:
    """An id that does not match the uniqueKey raises request-id-invalid and stores nothing."""
    bad = Request(id=rid(2), unique_key=url(1), url=url(1))
    with pytest.raises(InvalidInputError) as caught:
        await store.update_request(bad, client_key=A)
    assert caught.value.error_type == "request-id-invalid"
    assert (await store.get_info()).total_request_count == 0


@pytest.mark.anyio
async def test_update_clearing_handled_at_makes_request_pending(store: Queue) -> None:
    """A PUT without handledAt on a handled request makes it pending again and reports wasAlreadyHandled."""
    await add(store, 1)
    await handle(store, 1)
    registration = await store.update_request(stored(1, user_data={"n": "1"}), client_key=A)
    assert registration.was_already_handled
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (0, 1)
    assert await lock_keys(store) == ["1"]


@pytest.mark.anyio
async def test_update_does_not_store_echoed_lock_fields(store: Queue) -> None:
    """Lock fields a client echoes in the body are not stored; lock state lives only in the store."""
    [request_id] = await add(store, 1)
    echoed = stored(1, lockExpiresAt="2030-01-01T00:00:00.000Z", lockByClient=B, extraField=1)
    await store.update_request(echoed, client_key=A)
    request = await store.get_request(request_id)
    assert request is not None
    assert request.model_extra == {"extraField": 1}


# -- unlock_requests, clients and counters (§2.2 (12), §8) --------------------------------------------------------


@pytest.mark.anyio
async def test_unlock_requests_releases_only_callers_live_locks(store: Queue) -> None:
    """unlock_requests releases the calling client's live locks only, in their places, and returns how many."""
    await add(store, 1, 2, 3)
    await add(store, "f", forefront=True)
    assert await lock_keys(store, A, limit=3) == ["f", "1", "2"]
    assert await lock_keys(store, B, limit=1) == ["3"]
    assert await store.unlock_requests(client_key=A) == 3
    assert await store.unlock_requests(client_key=A) == 0
    assert [holder for _, holder, _ in await store.locks()] == [B]
    assert await lock_keys(store, C) == ["f", "1", "2"]
    assert await store.unlock_requests(client_key=B) == 1


@pytest.mark.anyio
async def test_had_multiple_clients_counts_client_keys(backend: Backend) -> None:
    """hadMultipleClients stays false for one client key (even over two handles) and turns true on a second."""
    first, second = await backend.another(), await backend.another()
    await add(first, 1, 2)
    assert not (await second.lock_head(limit=1, lock_secs=LONG, client_key=A)).had_multiple_clients
    assert not (await first.get_info()).had_multiple_clients
    assert (await second.lock_head(limit=1, lock_secs=LONG, client_key=B)).had_multiple_clients
    assert (await first.get_info()).had_multiple_clients
    assert (await first.lock_head(limit=1, lock_secs=LONG, client_key=A)).had_multiple_clients


@pytest.mark.anyio
async def test_counters_track_total_handled_pending_across_clients(store: Queue) -> None:
    """totalRequestCount counts distinct requests whoever added them; handled + pending = total."""
    await add(store, 1, 2, 3)
    await add(store, 3, 4, client_key=B)
    await handle(store, 2)
    await handle(store, 4, client_key=C)
    await handle(store, 4)
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (4, 2, 2)
    assert info.created_at <= info.modified_at <= datetime.now(UTC) + timedelta(seconds=1)


@pytest.mark.anyio
async def test_two_handles_never_lock_the_same_request(backend: Backend) -> None:
    """Two handles on one queue (like two processes), four lockers each, lock every request exactly once."""
    stores = [await backend.another(), await backend.another()]
    expected: set[str] = set()
    locked: list[str] = []

    async def locker(queue: Queue, client_key: str) -> None:
        while items := (await queue.lock_head(limit=5, lock_secs=LONG, client_key=client_key)).items:
            locked.extend(r.id for r in items)

    for start in range(0, 500, 25):
        expected.update(await add(stores[0], *range(start, start + 25)))
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for s, queue in enumerate(stores):
                for w in range(4):
                    tg.start_soon(locker, queue, f"store{s}-worker{w}")
    assert len(expected) == 500
    assert Counter(locked) == Counter(expected)


# -- unreadable rows -------------------------------------------------------------------------------------------------

DAMAGE = {
    # name: (stored text, salvaged uniqueKey, salvaged url, retryCount, errorMessages kept)
    "not a request": ('{"id": 1}', "", "", 0, []),
    "bad field": (
        '{"uniqueKey": "http://example.com/2", "url": "http://example.com/2", "retryCount": 2,'
        ' "errorMessages": ["e1"], "userData": "not a dict"}',
        url(2),
        url(2),
        2,
        ["e1"],
    ),
    "not an object": ("[1, 2]", "", "", 0, []),
}
"""Damage any backend can hold (the Postgres column is `json`: what does not parse cannot be stored there)."""


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
@pytest.mark.anyio
async def test_an_unreadable_row_is_quarantined_and_the_rest_of_the_head_is_locked(
    backend: Backend, store: Queue, damage: tuple[str, str, str, int, list[str]]
) -> None:
    """lock_head ends an unreadable row as failed (text kept, logged, counted) and returns the rest of the batch;
    before that, get_request of it raises QueueUnavailableError."""
    text, unique_key, salvaged_url, retry_count, messages = damage
    rid1, rid2, rid3 = await add(store, 1, 2, 3)
    await backend.damage(rid2, text)
    with pytest.raises(QueueUnavailableError, match=f"stored request {rid2} is unreadable"):
        await store.get_request(rid2)
    with capture_logs() as logs:
        head = await store.lock_head(limit=25, lock_secs=LONG, client_key=B)
    assert [r.id for r in head.items] == [rid1, rid3]
    assert head.quarantined == 1
    [event] = [e for e in logs if e["event"] == "queue.request_quarantined"]
    assert event["request_id"] == rid2
    assert await live_locks(store) == [(rid1, B), (rid3, B)]
    info = await store.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (3, 1, 2)
    ended = await store.get_request(rid2)
    assert ended is not None
    assert (ended.id, ended.unique_key, ended.url, ended.retry_count) == (rid2, unique_key, salvaged_url, retry_count)
    assert ended.is_failed
    assert ended.error_messages == [*messages, f"quarantined: stored request unreadable: {event['reason']}"]
    assert ended.model_extra is not None
    assert "unreadableData" in ended.model_extra
    assert (await store.counts()).failed == 1
    [listed] = (await store.list_requests(limit=10, failed=True)).items
    assert listed["id"] == rid2
    again = await store.lock_head(limit=25, lock_secs=LONG, client_key=C)
    assert (again.items, again.quarantined, again.queue_has_locked_requests) == ([], 0, True)


@pytest.mark.anyio
async def test_a_head_of_unreadable_rows_is_quarantined_and_the_rows_behind_it_fill_the_batch(
    backend: Backend, store: Queue
) -> None:
    """More unreadable rows than `limit` at the head are all quarantined, and readable ones fill the batch."""
    ids = await add(store, *range(25))
    await add(store, *range(25, 30))
    for request_id in ids[:12]:
        await backend.damage(request_id, "{}")
    head = await store.lock_head(limit=5, lock_secs=LONG, client_key=A)
    assert [r.user_data["n"] for r in head.items] == ["12", "13", "14", "15", "16"]
    assert head.quarantined == 12
    info = await store.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (12, 18)


# -- the queue by hand (runner.queue.admin) -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_counts_tell_handled_failed_pending_and_locked_apart(store: Queue) -> None:
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
    assert (info.handled_request_count, info.pending_request_count) == (2, 4)


@pytest.mark.anyio
async def test_the_failed_state_follows_the_marker_through_every_write(store: Queue) -> None:
    """Failed by update, by a batch add of an ended request and by a PUT of a new one; then ended well, pending."""
    await add(store, 1, 2)
    await fail(store, 1)
    marked = RequestDraft.model_validate(
        {
            "uniqueKey": url(3),
            "url": url(3),
            "handledAt": "2026-01-01T00:00:00Z",
            "userData": {"__crawlee": {"state": 6}},
        }
    )
    await store.batch_add([marked], client_key=A)
    assert (await store.counts()).failed == 2
    await store.update_request(stored(4, handled_at=datetime.now(UTC), user_data=with_failed_mark({})), client_key=A)
    assert (await store.counts()).failed == 3
    request = await store.get_request(rid(3))
    assert request is not None
    assert request.is_failed
    await store.update_request(request.model_copy(update={"user_data": {}}), client_key=A)  # ended well after all
    assert (await store.counts()).failed == 2
    pending = await store.get_request(rid(1))
    assert pending is not None
    await store.update_request(pending.model_copy(update={"handled_at": None}), client_key=A)  # a marker, pending
    counts = await store.counts()
    assert (counts.failed, counts.pending, counts.total) == (1, 2, 4)


@pytest.mark.anyio
async def test_list_requests_by_state_in_id_order_and_by_pages(store: Queue) -> None:
    """Each state alone, a union, every request; pages of 2 continue after the last id and end on a short page."""
    ids = await add(store, *range(7))
    await handle(store, 0)
    await fail(store, 1)
    await fail(store, 2)
    [locked] = [r.id for r in (await store.lock_head(limit=1, lock_secs=LONG, client_key=A)).items]

    async def listed(**states: bool) -> list[str]:
        return [item["id"] for item in (await store.list_requests(limit=100, **states)).items]

    failed_ids = {rid(1), rid(2)}
    assert set(await listed(failed=True)) == failed_ids
    assert await listed(handled=True) == [rid(0)]
    assert await listed(locked=True) == [locked]
    pending = set(ids) - failed_ids - {rid(0), locked}
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
    [item] = (await store.list_requests(limit=1, failed=True, after=sorted(failed_ids)[0])).items
    assert item["userData"] == {"n": item["uniqueKey"].rsplit("/", 1)[1], "__crawlee": {"state": 6}}


@pytest.mark.anyio
async def test_requeue_gives_a_fresh_retry_budget_keeps_the_errors_and_is_idempotent(
    backend: Backend, store: Queue
) -> None:
    """A failed and an ended request go back to the end of the queue: retry 0, no handledAt, no marker, the errors
    and other userData kept; pending, missing and quarantined ids are reported and left alone; twice changes nothing."""
    await add(store, 1, 2, 3, 4)
    await fail(store, 1, user_data={"label": "detail", "__crawlee": {"state": 6, "crawlDepth": 2}})
    await handle(store, 2)
    (damaged,) = await add(store, 5)
    await backend.damage(damaged, "{}")
    assert (await store.lock_head(limit=25, lock_secs=LONG, client_key=B)).quarantined == 1
    await store.unlock_requests(client_key=B)
    ids = [rid(n) for n in (1, 2, 3)]
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
    assert await store.requeue([], client_key=A) == RequeueResult()


@pytest.mark.anyio
async def test_drop_deletes_the_queue_and_a_second_drop_is_not_found(backend: Backend, store: Queue) -> None:
    """drop deletes every request of the queue and closes the handle; dropping it again is NotFoundError, and
    opening it again makes a new, empty queue."""
    await add(store, 1, 2)
    old_id = (await store.get_info()).id
    other = await backend.another()  # a handle opened before the drop (another process's)
    await store.drop()
    with pytest.raises(QueueUnavailableError):
        await store.get_info()
    with pytest.raises(NotFoundError):
        await other.drop()
    fresh = await backend.another()
    info = await fresh.get_info()
    assert (info.total_request_count, info.id != old_id) == (0, True)
    assert await lock_keys(fresh) == []
