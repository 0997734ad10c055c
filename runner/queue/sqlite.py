"""The embedded queue: one SQLite file per named queue, safe for several processes on one machine.

Ordering follows the platform's model (API contract §9): each pending request has an `order_no` whose absolute
value is a time in microseconds and whose sign says forefront (< 0) or not. Locking moves `order_no` to
±(lock expiry), so the available head is exactly the index range [-now, now]: lock-head reads `limit` index
entries whatever the queue size. A handled request has `order_no` NULL and leaves the partial index. The same
index finds the live locks, which are the entries outside that range (`_LIVE_LOCK`): locking and marking handled
update no second index (files of older versions lose theirs, `requests_locks`, on first open).

Every call runs in a worker thread, one at a time per store (one connection), inside `BEGIN IMMEDIATE` when it
writes, so a read-then-update cannot interleave with another process's. Opening takes no lock: the first call sets
the file up, in that thread. Inside the write lock each write takes its time from the store's clock (`StoreClock`:
the wall clock read once, then advanced by the monotonic clock), never at or before the file's last time, so order
numbers follow the writes and a lock lasts its length in real time whatever the wall clock does.

A request that failed for good (see `runner.models`: handled, with the failed marker in `userData`) also has its
`failed` column set, written with the row by every call that stores one, so the failed ones are counted and listed
through a partial index without reading any JSON. Files made before that column existed get it on first open (in
the schema's transaction): it is filled from the marker, and requests quarantined by older versions get the marker
too. Requests older versions ended as failed carry no marker and cannot be told from successes after retries: they
count as handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import string
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import anyio
import anyio.to_thread
import structlog

from runner.errors import AlreadyHandledError, InvalidInputError, LockLostError, NotFoundError, QueueUnavailableError
from runner.metrics import Metrics
from runner.models import (
    AddedRequest,
    BatchAddResult,
    LockedHead,
    QueueCounts,
    QueueInfo,
    Request,
    RequestDraft,
    RequestRegistration,
    format_api_datetime,
)
from runner.queue._checkpoint import Checkpointer
from runner.queue._rows import (
    _UNREADABLE,
    _check_client_key,
    _check_lock_secs,
    _dump,
    _listed,
    _load,
    _parse,
    _prepare,
    _quarantined,
    _reason,
    _salvage,
    _text,
    _to_datetime,
    validate_queue_name,
)
from runner.queue._thread import StoreThread, ThreadBatches
from runner.queue.admin import MAX_LIST_LIMIT, MAX_REQUEUE_BATCH, RequestPage, RequeueResult, can_requeue
from runner.queue.completion import Completion
from runner.queue.protocol import MAX_BATCH, MAX_LOCK_LIMIT, PreparedLinks
from runner.uniquekey import request_id_for

__all__ = ["Head", "SqliteQueue", "StoreClock", "queue_path", "validate_queue_name"]

T = TypeVar("T")

_log = structlog.get_logger("headlock.queue.sqlite")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id TEXT NOT NULL,
    name TEXT,
    created_at INTEGER NOT NULL,
    modified_at INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    handled INTEGER NOT NULL DEFAULT 0,
    had_multiple_clients INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clients (client_key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    order_no INTEGER,
    lock_client TEXT,
    lock_expires INTEGER,
    data TEXT NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0
);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS requests_head ON requests (order_no) WHERE order_no IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_failed ON requests (id) WHERE failed = 1;
"""
# A file from before the `failed` column (module docstring). Every JSON function is behind `json_valid`: a damaged
# row must not fail the migration (it is quarantined when the head reaches it).
_ADD_FAILED_COLUMN = (
    "ALTER TABLE requests ADD COLUMN failed INTEGER NOT NULL DEFAULT 0",
    "UPDATE requests SET data = json_set(data, '$.userData.__crawlee.state', 6) WHERE order_no IS NULL"
    " AND CASE WHEN json_valid(data) THEN json_type(data, '$.unreadableData') IS NOT NULL"
    " AND coalesce(json_type(data, '$.userData'), 'object') = 'object' ELSE 0 END",
    "UPDATE requests SET failed = 1 WHERE order_no IS NULL"
    " AND CASE WHEN json_valid(data) THEN json_extract(data, '$.userData.__crawlee.state') = 6 ELSE 0 END",
)
# Read every column the store uses, so a SQLite file with other tables of the same names fails at open,
# before the indexes are created on columns it may lack.
_SCHEMA_PROBES = (
    "SELECT one, id, name, created_at, modified_at, accessed_at, total, handled, had_multiple_clients"
    " FROM queue LIMIT 0",
    "SELECT client_key FROM clients LIMIT 0",
    "SELECT id, order_no, lock_client, lock_expires, data FROM requests LIMIT 0",
)
# The available head is the index range [-now, now]; rowid breaks ties so one batch keeps its order. `data` is read
# as bytes, which the JSON parser takes as they are (no str built first), and so that a row whose text is not UTF-8
# (damage) reaches the parser and its quarantine instead of failing the whole query in the sqlite3 module.
_HEAD_QUERY = (
    "SELECT rowid, id, order_no, CAST(data AS BLOB) FROM requests WHERE order_no BETWEEN ? AND ?"
    " ORDER BY order_no, rowid LIMIT ?"
)


def queue_path(storage_dir: Path, name: str) -> Path:
    """Where the embedded queue `name` lives under `storage_dir`."""
    return storage_dir / "request_queues" / f"{validate_queue_name(name)}.sqlite"


class StoreClock:
    """One store's time in microseconds: the wall clock read once (the anchor), then advanced by the monotonic clock.

    A wall-clock step (NTP, a resumed VM, an operator) after the anchor changes nothing: locks last their real
    length and order numbers keep increasing. The anchor is the wall time at the first reading, or the file's last
    time + 1 µs when that is later; and whenever the file holds a time at or after this clock's (another process,
    whose clock is ahead, wrote), the clock moves forward to just after it, never back, so the processes on one
    file converge on the clock that is furthest ahead.

    Limit: a process that starts after the wall clock stepped forward anchors ahead of the others; its first write
    moves the file's time forward and they follow, so the locks they hold expire that much early, once.

    Give each store its own (it holds the anchor); the two time sources are injectable for tests.
    """

    __slots__ = ("_monotonic_ns", "_offset", "_wall_ns")

    def __init__(
        self, *, wall_ns: Callable[[], int] = time.time_ns, monotonic_ns: Callable[[], int] = time.monotonic_ns
    ) -> None:
        """Read wall time from `wall_ns` (at the anchor only) and elapsed time from `monotonic_ns`, in ns."""
        self._wall_ns = wall_ns
        self._monotonic_ns = monotonic_ns
        self._offset: int | None = None  # store time minus monotonic time, in µs

    def now(self, last: int) -> int:
        """Return the time in µs, strictly after `last` (the file's latest time), moving forward to it if behind."""
        elapsed = self._monotonic_ns() // 1000
        offset = self._offset
        if offset is None:
            offset = self._wall_ns() // 1000 - elapsed
        now = elapsed + offset
        if now <= last:
            offset += last + 1 - now
            now = last + 1
        self._offset = offset
        return now


def _check_holder(row: tuple[int | None, str | None, int | None] | None, client_key: str, endpoint: str) -> None:
    """Check that `client_key` holds the lock of a request row `(order_no, lock_client, lock_expires)`.

    A lock that expired is still its holder's until another client locks the request.

    Raises:
        NotFoundError: there is no such request (`row` is None).
        LockLostError: the request is handled, unlocked, or locked by another client.
    """
    if row is None:
        raise NotFoundError("Request was not found", endpoint=endpoint, error_type="record-not-found")
    order_no, holder, expires = row
    if order_no is None:
        raise AlreadyHandledError(
            "request is already handled", endpoint=endpoint, error_type="request-handled-or-locked"
        )
    if expires is None or holder != client_key:
        raise LockLostError(
            "request is not locked by this client", endpoint=endpoint, error_type="request-handled-or-locked"
        )


_LIVE_LOCK = "(order_no > ? OR order_no < -?) AND lock_expires > ?"
"""A live lock, each `?` the store's now: a locked row's place is ±(its expiry) (`_LOCK_ROWS`, `_prolong`), outside
the head's range [-now, now] while the lock lasts, so `requests_head` finds it (two range scans), and the locks need
no index of their own to keep up at every lock and handled mark. `lock_expires > ?` keeps the test exact."""
# Fixed texts (no input is formatted into them), hence the noqa.
_HAS_LIVE_LOCKS = f"SELECT EXISTS (SELECT 1 FROM requests WHERE {_LIVE_LOCK})"  # noqa: S608
_UNLOCK_CLIENT = (
    "UPDATE requests SET order_no = CASE WHEN order_no < 0 THEN -? ELSE ? END, lock_client = NULL,"  # noqa: S608
    f" lock_expires = NULL WHERE {_LIVE_LOCK} AND lock_client = ?"
)
_LIVE_LOCKS = f"SELECT id, lock_client, lock_expires FROM requests WHERE {_LIVE_LOCK} ORDER BY lock_expires"  # noqa: S608
_COUNTS = (
    "SELECT total, handled, (SELECT count(*) FROM requests WHERE failed = 1),"  # noqa: S608
    f" (SELECT count(*) FROM requests WHERE {_LIVE_LOCK}) FROM queue"
)
_LOCKS_BY_CLIENT = (
    f"SELECT lock_client, count(*) FROM requests WHERE {_LIVE_LOCK}"  # noqa: S608
    " GROUP BY lock_client ORDER BY lock_client"
)
_LIST_STATES = (
    f"(order_no IS NOT NULL AND {_LIVE_LOCK})",
    "(order_no IS NOT NULL AND (lock_expires IS NULL OR lock_expires <= ?))",
    "failed = 1",
    "(order_no IS NULL AND failed = 0)",
)
"""The SQL of `list_requests`'s states, in its argument order: locked, pending, failed, handled (each `?` is now)."""


_MARK_SET = (
    "UPDATE requests SET order_no = NULL, lock_client = NULL, lock_expires = NULL, failed = 0,"
    " data = json_set(data, '$.handledAt', ?)"
)
_HELD_BY = " AND lock_client = ? AND order_no IS NOT NULL AND lock_expires IS NOT NULL"
"""The fence of a handled mark: `_check_holder`'s rule in the `WHERE`, so it updates no row unless ours."""
_MARK_HANDLED = f"{_MARK_SET} WHERE id = ?{_HELD_BY}"


def _size(count: int) -> int:
    """`count` rounded up to a power of two: the statements of `size` values below (made once each, `cache`) and
    the connection's statement cache then hold few texts."""
    return 1 << (count - 1).bit_length()


@cache
def _mark_rows(size: int) -> str:
    """The handled mark of `size` ids (`_mark_all`): the stamp, the ids, the holder."""
    return f"{_MARK_SET} WHERE id IN ({','.join('?' * size)}){_HELD_BY}"


@cache
def _lock_rows(size: int) -> str:
    """`_LOCK_ROWS` of `size` rowids (`?3`...)."""
    return f"{_LOCK_ROWS} IN ({','.join(f'?{number}' for number in range(3, 3 + size))})"


@cache
def _stored_ids(size: int) -> str:
    """Which of `size` ids are stored."""
    return f"SELECT id FROM requests WHERE id IN ({','.join('?' * size)})"  # noqa: S608 - placeholders only


@cache
def _insert_rows(size: int) -> str:
    """The insert of `size` rows `(id, order_no, data, failed)`, each skipped if its id is stored."""
    values = ",".join(["(?, ?, ?, ?)"] * size)
    return f"INSERT OR IGNORE INTO requests (id, order_no, data, failed) VALUES {values}"  # noqa: S608 - placeholders only


def _padded(values: list[Any], size: int) -> list[Any]:
    """`values` padded to `size` with its last value (a repeated id matches, or is ignored, once)."""
    return values + values[-1:] * (size - len(values))


_LOCK_ROWS = (
    "UPDATE requests SET order_no = CASE WHEN order_no > 0 THEN ?1 ELSE -?1 END, lock_client = ?2, lock_expires = ?1"
    " WHERE rowid"
)
"""Locks the rows whose rowids follow (`?3`...) for `?2` until `?1`, each keeping its place's sign (forefront)."""
_IN_CHUNK = 256
"""Most ids in one `IN (...)` list (and rows in one multi-row INSERT): far below SQLite's 32,766 parameters."""

_NO_LINKS = Completion()
_Links = list[tuple[bool, list[tuple[str, str, bool, bool, str]]]]
"""Links as `prepare_links` makes them: by forefront flag, `_prepare`'s tuple of each draft."""

_HEAD_FIELDS = ("uniqueKey", "url", "method", "retryCount")
"""The fields of a head item after its `id` (taken from the row)."""


@dataclass(frozen=True, slots=True)
class Head:
    """The first unhandled requests (locked ones included) and the queue's state, for GET /head."""

    items: list[dict[str, Any]]
    queue_modified_at: datetime
    had_multiple_clients: bool


class _Write(Generic[T]):
    """One write waiting for, or done by, a group commit (`ThreadBatches`)."""

    __slots__ = ("args", "done", "endpoint", "error", "fn", "result", "taken", "waiter")

    taken: bool
    done: bool
    waiter: asyncio.Future[None]

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...], endpoint: str) -> None:
        self.fn = fn
        self.args = args
        self.endpoint = endpoint
        self.result: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class SqliteQueue:
    """A `RequestQueue` stored in one SQLite file (WAL mode)."""

    head_is_consistent: ClassVar[Literal[True]] = True
    """Every committed add is in the head at once (`runner.queue.protocol.ConsistentHead`)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 30.0,
        metrics: Metrics | None = None,
        clock: StoreClock | None = None,
    ) -> None:
        """A queue stored in the file at `path` (created if needed); report each operation to `metrics` if given.

        `clock` is this store's time (a new `StoreClock` by default; tests inject one with stepped time sources).

        Cheap, synchronous and safe on the event loop: it touches no file. The first operation, in the store's
        thread, creates the directory and the file, sets WAL mode and the schema; a failure there (the file is
        locked past `busy_timeout`, is not a queue database, cannot be created) raises `QueueUnavailableError`
        naming the path, and the next operation tries again.
        """
        self.path = path
        self._metrics = metrics or Metrics()
        self._time = clock or StoreClock()
        self._busy_timeout = busy_timeout
        self._thread = StoreThread(f"headlock-store {path.name}")
        self._opening = anyio.Lock(fast_acquire=True)
        self._db: sqlite3.Connection  # connected by `_setup`
        self._connected = self._ready = self._closed = False
        self._writes = ThreadBatches[_Write[Any]](self._thread, self._write_batch)
        self._known_clients: set[str] = set()
        self._checkpointer = Checkpointer(path)

    @classmethod
    def open(
        cls,
        storage_dir: Path,
        name: str,
        *,
        busy_timeout: float = 30.0,
        metrics: Metrics | None = None,
        clock: StoreClock | None = None,
    ) -> SqliteQueue:
        """Open the named queue under `storage_dir` (`request_queues/<name>.sqlite`)."""
        return cls(queue_path(storage_dir, name), busy_timeout=busy_timeout, metrics=metrics, clock=clock)

    def __repr__(self) -> str:
        return f"SqliteQueue({str(self.path)!r})"

    # -- plumbing -----------------------------------------------------------------------------------------

    async def _open(self, endpoint: str) -> None:
        """Run `_setup` in the store's thread unless it has succeeded; one caller at a time."""
        async with self._opening:
            if not self._ready:
                await self._thread.run(self._setup, endpoint)

    def _setup(self, endpoint: str) -> None:
        """Connect, put the file in WAL mode and create the schema (once; a failure leaves it to the next operation).

        Raises:
            QueueUnavailableError: naming `endpoint` and the path: the store is closed, or the file cannot be
                created, is locked past the busy timeout, is not a database, or is a database of something else.
        """
        if self._closed:
            raise QueueUnavailableError(f"the queue {self.path} is closed", endpoint=endpoint)
        try:
            if not self._connected:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_timeout
                )
                self._connected = True
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints run in their own thread (see `_checkpoint`), not inside whichever commit crosses 1000 pages.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        except (OSError, sqlite3.Error) as exc:
            raise QueueUnavailableError(f"cannot open queue database {self.path}: {exc}", endpoint=endpoint) from exc
        self._write(self._init_schema, self.path.stem, endpoint, endpoint=endpoint)
        try:
            self._clock()  # anchors the store's clock at open, at or after the file's last time
        except sqlite3.Error as exc:
            raise self._map(exc, endpoint) from exc
        self._ready = True

    def _init_schema(self, name: str, endpoint: str) -> None:
        # executescript() would COMMIT our transaction first; run the statements one by one instead.
        def run(script: str) -> None:
            for statement in script.split(";"):
                if statement.strip():
                    self._db.execute(statement)

        run(_SCHEMA)
        try:
            for probe in _SCHEMA_PROBES:
                self._db.execute(probe)
        except sqlite3.OperationalError as exc:
            raise QueueUnavailableError(
                f"{self.path} is not a headlock queue database: {exc}", endpoint=endpoint
            ) from exc
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
        if "failed" not in columns:
            for statement in _ADD_FAILED_COLUMN:
                self._db.execute(statement)
            _log.info("queue.schema_migrated", path=str(self.path), added="requests.failed")
        run(_INDEXES)
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'requests_locks'").fetchone():
            self._db.execute("DROP INDEX requests_locks")  # an older version's: `_LIVE_LOCK` needs none
            _log.info("queue.schema_migrated", path=str(self.path), dropped="requests_locks")
        if self._db.execute("SELECT 1 FROM queue").fetchone() is None:
            now = self._time.now(0)
            alphabet = string.ascii_letters + string.digits
            queue_id = "".join(secrets.choice(alphabet) for _ in range(17))
            self._db.execute(
                "INSERT INTO queue (one, id, name, created_at, modified_at, accessed_at) VALUES (1, ?, ?, ?, ?, ?)",
                (queue_id, name, now, now, now),
            )

    def _write(self, fn: Callable[..., T], *args: Any, endpoint: str) -> T:
        """Run `fn` inside `BEGIN IMMEDIATE` ... `COMMIT`, rolling back on any error."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._map(exc, endpoint) from exc
        try:
            result = fn(*args)
            self._db.execute("COMMIT")
        except BaseException as exc:
            # The rolled-back transaction may have recorded a client key that `_touch` already cached.
            self._known_clients.clear()
            if self._db.in_transaction:
                # A failing ROLLBACK must not hide the error that caused it.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._map(exc, endpoint) from exc
            raise
        return result

    def _map(self, exc: sqlite3.Error, endpoint: str) -> QueueUnavailableError:
        return QueueUnavailableError(f"SQLite error on {self.path}: {exc}", endpoint=endpoint)

    def _run(self, fn: Callable[..., T], *args: Any, endpoint: str, write: bool = True) -> Coroutine[Any, Any, T]:
        """Run one operation (see `_execute`), reporting its outcome and duration when metrics are on.

        Not a coroutine itself: the usual write is the group commit's own, one coroutine frame fewer a call."""
        if not self._metrics.enabled:
            if write and self._ready:
                return self._writes.submit(_Write(fn, args, endpoint))
            return self._execute(fn, *args, endpoint=endpoint, write=write)
        return self._measured(fn, *args, endpoint=endpoint, write=write)

    async def _measured(self, fn: Callable[..., T], *args: Any, endpoint: str, write: bool) -> T:
        status = "cancelled"
        started = anyio.current_time()
        try:
            result = await self._execute(fn, *args, endpoint=endpoint, write=write)
            status = "ok"
        except Exception as exc:
            status = type(exc).__name__
            raise
        finally:
            # The endpoint may name a request ("prolong_lock <id>"): the metric is labelled by operation only.
            operation = endpoint.partition(" ")[0]
            self._metrics.queue_call("embedded", operation, status, anyio.current_time() - started)
        return result

    async def _execute(self, fn: Callable[..., T], *args: Any, endpoint: str, write: bool = True) -> T:
        """Run `fn` in the store's thread; writes are group-committed.

        Writes that arrive while another batch is being written wait for their turn and then go, together, into
        one transaction (each in its own savepoint, so one failing write does not undo the others). Under load
        this turns N commits and N thread hand-offs into one.
        """
        if not self._ready:
            await self._open(endpoint)
        if not write:

            def read() -> T:
                try:
                    return fn(*args)
                except sqlite3.Error as exc:
                    raise self._map(exc, endpoint) from exc

            return await self._thread.run(read)
        written: T = await self._writes.submit(_Write(fn, args, endpoint))  # cancelled before it is taken: not written
        return written

    def _write_batch(self, batch: list[_Write[Any]]) -> None:
        """In the store's thread: write `batch` (`_write_batch_locked`); every write of it gets an outcome."""
        try:
            with self._checkpointer.writing:
                self._write_batch_locked(batch)
        except BaseException as exc:  # a bug: each caller gets it, rather than no outcome at all
            for op in batch:
                if op.error is None:
                    op.result, op.error = None, exc
            raise
        self._checkpointer.committed()

    def _write_batch_locked(self, batch: list[_Write[Any]]) -> None:
        """Run `batch` in one transaction, each write in a savepoint, and give every write its true outcome.

        A write that fails is rolled back to its savepoint and the others go on. But on a full disk or an I/O
        error (a spilled page cache that cannot be written, a failed COMMIT) SQLite may end the whole transaction
        itself: then nothing of the group is stored and every write of it, those that had succeeded too, gets a
        `QueueUnavailableError` (the ones after it do not run; a failure decided on the group's undone writes is
        not a true answer either).
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for op in batch:
                op.error = self._map(exc, op.endpoint)
                op.error.__cause__ = exc
            return
        try:
            lost = self._run_savepoints(batch)
            if lost is None:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            lost = exc
        if lost is None:
            return
        self._known_clients.clear()  # the undone writes may have recorded client keys
        if self._db.in_transaction:
            # A failing ROLLBACK must not hide the error that caused it.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        for op in batch:
            op.result = None
            op.error = QueueUnavailableError(
                f"SQLite error on {self.path}: {lost} (the transaction was rolled back: nothing of this call was"
                " stored)",
                endpoint=op.endpoint,
            )
            op.error.__cause__ = lost

    def _run_savepoints(self, batch: list[_Write[Any]]) -> BaseException | None:
        """Run each write of `batch` in its own savepoint; return the error that ended the transaction, if one did.

        Raises:
            sqlite3.Error: a SAVEPOINT, ROLLBACK TO or RELEASE failed (the transaction is lost too).
        """
        marks: list[_Write[Any]] = []
        others: list[_Write[Any]] = []
        for op in batch:
            (marks if getattr(op.fn, "__func__", None) is SqliteQueue._mark_handled else others).append(op)
        if len(marks) > 1:
            try:
                done = self._mark_all(marks)
            except sqlite3.Error as exc:
                if not self._db.in_transaction:
                    return exc
                self._db.execute("ROLLBACK TO marks")
                self._db.execute("RELEASE marks")
                done = False  # each mark alone, to get its own error
            if done:  # the writes of one batch are concurrent calls: any order of them is a valid one
                batch = others
        for op in batch:
            self._db.execute("SAVEPOINT op")
            try:
                op.result = op.fn(*op.args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                if not self._db.in_transaction:  # SQLite rolled everything back itself
                    return exc
                self._known_clients.clear()  # the undone write may have recorded a client key
                op.error = self._map(exc, op.endpoint) if isinstance(exc, sqlite3.Error) else exc
                if op.error is not exc:
                    op.error.__cause__ = exc
                self._db.execute("ROLLBACK TO op")
            self._db.execute("RELEASE op")
        return None

    def _mark_all(self, marks: list[_Write[Any]]) -> bool:
        """Apply a batch's handled marks with their links in the savepoint `marks`, each mark fenced in the `WHERE`
        of one `executemany`: the queue row is updated once for all of them, not once per mark. False (nothing of it
        kept) when any mark missed: then each goes alone, so the miss gets its own error and keeps none of its
        links.

        Raises:
            sqlite3.Error: a statement failed, the savepoint still open (`_run_savepoints` undoes it).
        """
        now = self._clock()
        stamp = format_api_datetime(_to_datetime(now))
        self._db.execute("SAVEPOINT marks")
        (handled, added), done = self._insert_all_links([op.args[3] for op in marks], now)
        handled += len(marks)
        holders: dict[str, list[str]] = {}
        for op in marks:
            holders.setdefault(op.args[1], []).append(op.args[0])
        marked = 0
        # One statement per holder (and per chunk of ids), not one per mark: each statement the thread runs lets
        # go of the GIL and must take it back from the busy event loop.
        for client_key, ids in holders.items():
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                size = _size(len(chunk))
                marked += self._db.execute(_mark_rows(size), (stamp, *_padded(chunk, size), client_key)).rowcount
        if marked != len(marks):  # a miss, or one request marked twice
            self._db.execute("ROLLBACK TO marks")
            self._db.execute("RELEASE marks")
            return False
        for client_key in holders:
            self._touch(now, client_key, handled=handled, total=added)
            handled = added = 0  # counted once, with the first
        self._db.execute("RELEASE marks")
        for op, links in zip(marks, done, strict=True):
            op.result = links
        return True

    def _clock(self) -> int:
        """Return the store's time in microseconds, strictly after the file's last write's (see `StoreClock`).

        Called inside the write lock, so writes get increasing times (FIFO and "most recently forefronted first"
        hold across processes); `_touch` stores it. Reads that compare with now call it too.
        """
        last: int = self._db.execute("SELECT accessed_at FROM queue").fetchone()[0]
        return self._time.now(last)

    def _touch(
        self, now: int, client_key: str | None, *, changed: bool = True, handled: int = 0, total: int = 0
    ) -> None:
        """Record an access (a modification when `changed`) and the client key (for `hadMultipleClients`); add
        `handled` and `total` to the queue's counts (a modification) in the same statement.

        Every write calls it: the stored `accessed_at` is what `_clock` reads.
        """
        if handled or total:
            self._db.execute(
                "UPDATE queue SET modified_at = ?, accessed_at = ?, handled = handled + ?, total = total + ?",
                (now, now, handled, total),
            )
        elif changed:
            self._db.execute("UPDATE queue SET modified_at = ?, accessed_at = ?", (now, now))
        else:
            self._db.execute("UPDATE queue SET accessed_at = ?", (now,))
        if client_key is not None and client_key not in self._known_clients:
            self._db.execute("INSERT OR IGNORE INTO clients VALUES (?)", (client_key,))
            self._db.execute("UPDATE queue SET had_multiple_clients = 1 WHERE (SELECT count(*) FROM clients) > 1")
            self._known_clients.add(client_key)

    # -- the Protocol -------------------------------------------------------------------------------------

    async def lock_head(self, *, limit: int, lock_secs: float, client_key: str) -> LockedHead:
        """Lock up to `limit` (≤ 25) available requests in queue order and return them complete.

        A stored request that cannot be read (damage to the file) is quarantined instead of failing the call: it
        is ended as handled-failed, its text kept in `unreadableData` and an error message added, and it is
        counted in `LockedHead.quarantined`; the requests behind it take its place in the batch.
        """
        endpoint = "lock_head"
        _check_client_key(client_key, endpoint)
        if not 1 <= limit <= MAX_LOCK_LIMIT:
            raise InvalidInputError(f"limit must be 1-{MAX_LOCK_LIMIT}, got {limit}", endpoint=endpoint)
        _check_lock_secs(lock_secs, endpoint)
        # The locks are taken at or after this moment, so they expire `lock_secs` after it at the earliest.
        locked_at = anyio.current_time()
        head, quarantined = await self._run(self._lock_head, limit, lock_secs, client_key, locked_at, endpoint=endpoint)
        for request_id, reason in quarantined:  # logged once committed
            _log.warning("queue.request_quarantined", request_id=request_id, reason=reason, path=str(self.path))
        return head

    def _lock_head(
        self, limit: int, lock_secs: float, client_key: str, locked_at: float
    ) -> tuple[LockedHead, list[tuple[str, str]]]:
        """Lock and read the head; also return `(request_id, reason)` of each row it quarantined (see `lock_head`)."""
        now = self._clock()
        expires = now + int(lock_secs * 1_000_000)
        items: list[Request] = []
        quarantined: list[tuple[str, str]] = []
        wanted = limit
        # A quarantined row leaves the head, so each further round reads rows not seen yet: it ends with a round
        # that quarantined nothing, or at the end of the head.
        while wanted:
            rows = self._db.execute(_HEAD_QUERY, (-now, now, wanted)).fetchall()
            locks = []
            for rowid, request_id, _order_no, data in rows:
                try:
                    items.append(_parse(data))
                except _UNREADABLE as exc:
                    quarantined.append((request_id, self._quarantine(rowid, request_id, data, exc, now)))
                    continue
                # By rowid: the index entry already gave it, so no second lookup through the id index per row.
                locks.append(rowid)
            if locks:  # one statement for the batch (see `_mark_all`), the sign of each order kept
                size = _size(len(locks))
                self._db.execute(_lock_rows(size), (expires, client_key, *_padded(locks, size)))
            wanted = 0 if len(rows) < wanted else wanted - len(locks)
        self._touch(now, client_key, changed=bool(items or quarantined))
        has_locks = bool(items) or self._db.execute(_HAS_LIVE_LOCKS, (now,) * 3).fetchone()[0]
        multiple = self._db.execute("SELECT had_multiple_clients FROM queue").fetchone()[0]
        head = LockedHead(
            items=items,
            lock_secs=lock_secs,
            queue_has_locked_requests=bool(has_locks),
            had_multiple_clients=bool(multiple),
            locked_at=locked_at,
            quarantined=len(quarantined),
        )
        return head, quarantined

    def _quarantine(self, rowid: int, request_id: str, data: str | bytes, exc: BaseException, now: int) -> str:
        """End an unreadable row as handled-failed, in the caller's transaction; return the reason."""
        reason = _reason(exc)
        self._db.execute(
            "UPDATE requests SET order_no = NULL, lock_client = NULL, lock_expires = NULL, data = ?, failed = 1"
            " WHERE rowid = ?",
            (_quarantined(request_id, data, reason, now), rowid),
        )
        self._db.execute("UPDATE queue SET handled = handled + 1")
        return reason

    async def prolong_lock(
        self, request_id: str, *, lock_secs: float, client_key: str, forefront: bool = False
    ) -> datetime:
        """Extend this client's lock to now + `lock_secs`.

        A lock that expired is still this client's until another client locks the request.
        """
        endpoint = f"prolong_lock {request_id}"
        _check_client_key(client_key, endpoint)
        _check_lock_secs(lock_secs, endpoint)
        return await self._run(self._prolong, request_id, lock_secs, client_key, forefront, endpoint=endpoint)

    def _owned(self, request_id: str, client_key: str, endpoint: str) -> None:
        row = self._db.execute(
            "SELECT order_no, lock_client, lock_expires FROM requests WHERE id = ?", (request_id,)
        ).fetchone()
        _check_holder(row, client_key, endpoint)

    def _prolong(self, request_id: str, lock_secs: float, client_key: str, forefront: bool) -> datetime:
        endpoint = f"prolong_lock {request_id}"
        self._owned(request_id, client_key, endpoint)
        now = self._clock()
        expires = now + int(lock_secs * 1_000_000)
        self._db.execute(
            "UPDATE requests SET order_no = ?, lock_expires = ? WHERE id = ?",
            (-expires if forefront else expires, expires, request_id),
        )
        self._touch(now, client_key)
        return _to_datetime(expires)

    async def delete_lock(self, request_id: str, *, client_key: str, forefront: bool = False) -> None:
        """Release this client's lock; the request goes to the head (`forefront`) or the end of the queue."""
        endpoint = f"delete_lock {request_id}"
        _check_client_key(client_key, endpoint)
        await self._run(self._delete_lock, request_id, client_key, forefront, endpoint=endpoint)

    def _delete_lock(self, request_id: str, client_key: str, forefront: bool) -> None:
        self._owned(request_id, client_key, f"delete_lock {request_id}")
        now = self._clock()
        self._db.execute(
            "UPDATE requests SET order_no = ?, lock_client = NULL, lock_expires = NULL WHERE id = ?",
            (-now if forefront else now, request_id),
        )
        self._touch(now, client_key)

    async def unlock_requests(self, *, client_key: str) -> int:
        """Release every unexpired lock `client_key` holds; return how many."""
        _check_client_key(client_key, "unlock_requests")
        return await self._run(self._unlock, client_key, endpoint="unlock_requests")

    def _unlock(self, client_key: str) -> int:
        now = self._clock()
        cursor = self._db.execute(_UNLOCK_CLIENT, (now, now, now, now, now, client_key))
        self._touch(now, client_key, changed=cursor.rowcount > 0)
        return cursor.rowcount

    async def update_request(
        self, request: Request, *, client_key: str, forefront: bool = False, lock_required: bool = False
    ) -> RequestRegistration:
        """Replace the stored request (inserting it when unknown, unless `lock_required`).

        With `handled_at` set it leaves the head and its lock is released; without it, it is pending again and
        keeps any lock it has. Lock fields echoed in the body (`lockExpiresAt`) are not stored.

        `lock_required` fences the write, in the same transaction: it is applied only while `client_key` holds the
        request's lock (an expired lock nobody retook counts, and a write without `handled_at` keeps it).

        Raises:
            InvalidInputError: the id does not match the uniqueKey, or the request cannot be stored as JSON.
            LockLostError: `lock_required`, and the request is handled, unlocked or locked by another client.
            NotFoundError: `lock_required`, and there is no such request.
        """
        endpoint = f"update_request {request.id}"
        _check_client_key(client_key, endpoint)
        if request.id != request_id_for(request.unique_key):
            raise InvalidInputError(
                "Request ID does not correspond to uniqueKey",
                endpoint=endpoint,
                error_type="request-id-invalid",
            )
        data = _dump(request, endpoint)
        fenced = endpoint if lock_required else ""
        return await self._run(self._update, request, data, client_key, forefront, fenced, endpoint=endpoint)

    def _update(
        self, request: Request, data: str, client_key: str, forefront: bool, fenced: str
    ) -> RequestRegistration:
        """Store `request`; `fenced` is the endpoint when the write requires `client_key`'s lock, else ""."""
        now = self._clock()
        handled = request.handled_at is not None
        failed = int(request.is_failed)
        row = self._db.execute(
            "SELECT order_no, lock_client, lock_expires FROM requests WHERE id = ?", (request.id,)
        ).fetchone()
        if fenced:
            _check_holder(row, client_key, fenced)
        position = -now if forefront else now
        if row is None:
            self._db.execute(
                "INSERT INTO requests (id, order_no, data, failed) VALUES (?, ?, ?, ?)",
                (request.id, None if handled else position, data, failed),
            )
            self._db.execute("UPDATE queue SET total = total + 1, handled = handled + ?", (int(handled),))
            self._touch(now, client_key)
            return RequestRegistration(request_id=request.id, was_already_present=False, was_already_handled=False)
        order_no, _, lock_expires = row
        was_handled = order_no is None
        if handled:
            self._db.execute(
                "UPDATE requests SET order_no = NULL, lock_client = NULL, lock_expires = NULL, data = ?, failed = ?"
                " WHERE id = ?",
                (data, failed, request.id),
            )
        elif lock_expires is not None and (fenced or lock_expires > now):
            # A live lock stays; so does the fencing holder's expired one (it is still theirs to release). A locked
            # request is unhandled: its `failed` is 0 already.
            self._db.execute("UPDATE requests SET data = ? WHERE id = ?", (data, request.id))
        else:
            self._db.execute(
                "UPDATE requests SET order_no = ?, lock_client = NULL, lock_expires = NULL, data = ?, failed = 0"
                " WHERE id = ?",
                (position, data, request.id),
            )
        if handled != was_handled:
            self._db.execute("UPDATE queue SET handled = handled + ?", (1 if handled else -1,))
        self._touch(now, client_key)
        return RequestRegistration(request_id=request.id, was_already_present=True, was_already_handled=was_handled)

    def prepare_links(self, links: Mapping[bool, Sequence[RequestDraft]]) -> PreparedLinks:
        """Check and serialize links for `mark_handled` (`HandledMark`), as `batch_add` does its drafts.

        Raises:
            InvalidInputError: a draft that is not a valid request, or has no JSON form.
        """
        return [(forefront, [_prepare(draft, "batch_add") for draft in drafts]) for forefront, drafts in links.items()]

    def mark_handled(
        self, request_id: str, *, client_key: str, links: PreparedLinks = ()
    ) -> Coroutine[Any, Any, Completion]:
        """Mark a request this client holds handled (`HandledMark`), adding `links` (from `prepare_links`) in the same
        savepoint: its stored JSON gets `handledAt` in place, in the statement that releases the lock, so nothing of
        the request is parsed or serialized here. Not a coroutine itself (the group commit's is awaited: one frame
        fewer a page); an invalid `client_key` raises at the call.

        Raises:
            AlreadyHandledError: it is handled already.
            LockLostError: unlocked, or locked by another client.
            NotFoundError: there is no such request.
        """
        endpoint = f"mark_handled {request_id}"
        _check_client_key(client_key, endpoint)
        return self._run(self._mark_handled, request_id, client_key, endpoint, links, endpoint=endpoint)

    def _mark_handled(self, request_id: str, client_key: str, endpoint: str, links: PreparedLinks) -> Completion:
        now = self._clock()
        added, done = self._insert_links(links, now)
        marked = self._db.execute(_MARK_HANDLED, (format_api_datetime(_to_datetime(now)), request_id, client_key))
        if marked.rowcount != 1:
            self._owned(request_id, client_key, endpoint)  # raises the reason (the savepoint undoes the links)
            raise AssertionError(f"{endpoint}: the lock holder's row was not updated")  # pragma: no cover
        self._db.execute("UPDATE queue SET handled = handled + 1 + ?, total = total + ?", added)
        self._touch(now, client_key)
        return done

    def _insert_all_links(self, links: list[PreparedLinks], now: int) -> tuple[tuple[int, int], list[Completion]]:
        """`_insert_links` of several marks' links at once (in their order: the first mark to name a new link adds
        it), in one read of the ids already stored and one multi-row insert per chunk; `(new ones stored handled,
        new ones)` and each mark's completion."""
        if not any(links):  # most marks carry no new link
            return (0, 0), [_NO_LINKS] * len(links)
        rows: list[tuple[str, int | None, str, int]] = []
        for prepared_links in links:
            for forefront, prepared in cast("_Links", prepared_links):
                position = -now if forefront else now
                rows.extend(
                    (rid, None if handled else position, data, int(failed))
                    for rid, _, handled, failed, data in prepared
                )
        ids = list(dict.fromkeys(map(itemgetter(0), rows)))
        stored: set[str] = set()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            size = _size(len(chunk))
            stored.update(map(itemgetter(0), self._db.execute(_stored_ids(size), _padded(chunk, size))))
        for start in range(0, len(rows), _IN_CHUNK):
            chunk_rows = rows[start : start + _IN_CHUNK]
            size = _size(len(chunk_rows))
            self._db.execute(_insert_rows(size), list(chain.from_iterable(_padded(chunk_rows, size))))
        done: list[Completion] = []
        added = handled_added = 0
        for prepared_links in links:
            if not prepared_links:
                done.append(_NO_LINKS)
                continue
            keys: dict[str, str] = {}
            new: list[str] = []
            for _, prepared in cast("_Links", prepared_links):
                for request_id, unique_key, handled, _, _ in prepared:
                    keys[unique_key] = request_id
                    if request_id not in stored:
                        stored.add(request_id)  # a later mark naming it finds it there
                        new.append(unique_key)
                        added += 1
                        handled_added += handled
            done.append(Completion(links=keys, new=frozenset(new)))
        return (handled_added, added), done

    def _insert_links(self, links: PreparedLinks, now: int) -> tuple[tuple[int, int], Completion]:
        """Insert prepared links (`prepare_links`); `(new ones stored handled, new ones)` and what the links were."""
        if not links:
            return (0, 0), _NO_LINKS
        keys: dict[str, str] = {}
        new: list[str] = []
        added = handled_added = 0
        for forefront, prepared in cast("_Links", links):  # made by `prepare_links`
            position = -now if forefront else now
            for request_id, unique_key, handled, failed, data in prepared:
                keys[unique_key] = request_id
                if self._insert(request_id, handled, failed, data, position):
                    new.append(unique_key)
                    added += 1
                    handled_added += handled
        return (handled_added, added), Completion(links=keys, new=frozenset(new))

    async def batch_add(
        self, requests: Sequence[RequestDraft], *, client_key: str, forefront: bool = False
    ) -> BatchAddResult:
        """Add up to 25 requests, deduplicated by `uniqueKey` (the first of duplicates in one batch wins).

        A draft may carry `handledAt` (it is stored as handled) and extra fields, and `id` only if it matches.

        Raises:
            InvalidInputError: more than 25 drafts, a draft whose `id` does not match its uniqueKey, or a
                draft that is not a valid request (nothing of the batch is stored then).
        """
        endpoint = "batch_add"
        _check_client_key(client_key, endpoint)
        if len(requests) > MAX_BATCH:
            raise InvalidInputError(
                f"a batch holds at most {MAX_BATCH} requests, got {len(requests)}", endpoint=endpoint
            )
        if not requests:
            return BatchAddResult()
        # Validate before storing: a row that does not read back as a `Request` would break every lock_head.
        prepared = [_prepare(draft, endpoint) for draft in requests]
        return await self._run(self._batch_add, prepared, client_key, forefront, endpoint=endpoint)

    def _batch_add(
        self, prepared: Sequence[tuple[str, str, bool, bool, str]], client_key: str, forefront: bool
    ) -> BatchAddResult:
        now = self._clock()
        position = -now if forefront else now
        processed: list[AddedRequest] = []
        added = handled_added = 0
        for request_id, unique_key, handled, failed, data in prepared:
            present = not self._insert(request_id, handled, failed, data, position)
            was_handled = False
            if present:
                row = self._db.execute("SELECT order_no FROM requests WHERE id = ?", (request_id,)).fetchone()
                was_handled = row[0] is None
            else:
                added += 1
                handled_added += handled
            processed.append(
                AddedRequest(
                    request_id=request_id,
                    unique_key=unique_key,
                    was_already_present=present,
                    was_already_handled=was_handled,
                )
            )
        if added:
            self._db.execute("UPDATE queue SET total = total + ?, handled = handled + ?", (added, handled_added))
        self._touch(now, client_key, changed=added > 0)
        return BatchAddResult(processed_requests=processed)

    def _insert(self, request_id: str, handled: bool, failed: bool, data: str, position: int) -> bool:
        """Store one prepared request at `position` in the head (none when handled); False if it was there already."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO requests (id, order_no, data, failed) VALUES (?, ?, ?, ?)",
            (request_id, None if handled else position, data, int(failed)),
        )
        return cursor.rowcount > 0

    async def list_head(self, limit: int) -> Head:
        """The first `limit` unhandled requests in queue order, locked ones included, without `userData`."""
        return await self._run(self._list_head, limit, endpoint="list_head", write=False)

    def _list_head(self, limit: int) -> Head:
        # One read transaction, so the items and the queue row are one snapshot.
        self._db.execute("BEGIN")
        try:
            rows = self._db.execute(
                "SELECT id, CAST(data AS BLOB) FROM requests WHERE order_no IS NOT NULL ORDER BY order_no, rowid"
                " LIMIT ?",
                (limit,),
            ).fetchall()
            modified, multiple = self._db.execute("SELECT modified_at, had_multiple_clients FROM queue").fetchone()
        finally:
            self._db.execute("COMMIT")
        items = []
        for request_id, data in rows:
            try:
                request = json.loads(data)
            except _UNREADABLE:
                request = None
            if not isinstance(request, dict):  # an unreadable row (not quarantined yet): what can be read of it
                request = _salvage(_text(data))
            items.append({"id": request_id} | {key: request[key] for key in _HEAD_FIELDS if key in request})
        return Head(items=items, queue_modified_at=_to_datetime(modified), had_multiple_clients=bool(multiple))

    async def delete_requests(self, request_ids: Sequence[str], *, client_key: str) -> list[str]:
        """Delete these requests, locked or not; return the ids that existed."""
        _check_client_key(client_key, "delete_requests")
        return await self._run(self._delete, request_ids, client_key, endpoint="delete_requests")

    def _delete(self, request_ids: Sequence[str], client_key: str) -> list[str]:
        now = self._clock()
        deleted: list[str] = []
        handled = 0
        for request_id in request_ids:
            row = self._db.execute("SELECT order_no FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                continue
            self._db.execute("DELETE FROM requests WHERE id = ?", (request_id,))
            deleted.append(request_id)
            handled += row[0] is None
        self._db.execute("UPDATE queue SET total = total - ?, handled = handled - ?", (len(deleted), handled))
        self._touch(now, client_key, changed=bool(deleted))
        return deleted

    async def get_request(self, request_id: str) -> Request | None:
        """Return the stored request, or None.

        Raises:
            QueueUnavailableError: the stored request is unreadable (damage to the file). It reads as the failed
                request `lock_head` makes of it once that has quarantined it; a read does not write it.
        """
        row = await self._run(
            lambda: self._db.execute("SELECT CAST(data AS BLOB) FROM requests WHERE id = ?", (request_id,)).fetchone(),
            endpoint=f"get_request {request_id}",
            write=False,
        )
        return None if row is None else _load(request_id, row[0], f"get_request {request_id}")

    async def get_info(self) -> QueueInfo:
        """Return the queue's metadata and counters."""
        return await self._run(self._info, endpoint="get_info", write=False)

    def _info(self) -> QueueInfo:
        queue_id, name, created, modified, accessed, total, handled, multiple = self._db.execute(
            "SELECT id, name, created_at, modified_at, accessed_at, total, handled, had_multiple_clients FROM queue"
        ).fetchone()
        return QueueInfo(
            id=queue_id,
            name=name,
            created_at=_to_datetime(created),
            modified_at=_to_datetime(modified),
            accessed_at=_to_datetime(accessed),
            total_request_count=total,
            handled_request_count=handled,
            pending_request_count=total - handled,
            had_multiple_clients=bool(multiple),
        )

    async def locks(self) -> list[tuple[str, str, datetime]]:
        """Return `(request_id, client_key, expires_at)` for every unexpired lock (for `headlock status`)."""

        def read() -> list[tuple[str, str, datetime]]:
            rows = self._db.execute(_LIVE_LOCKS, (self._clock(),) * 3).fetchall()
            return [(rid, holder, _to_datetime(expires)) for rid, holder, expires in rows]

        return await self._run(read, endpoint="locks", write=False)

    # -- the queue by hand (`runner.queue.admin.QueueAdmin`) ------------------------------------------------

    async def counts(self) -> QueueCounts:
        """Handled, failed, pending and locked requests, and the locks by client key, from one read snapshot.

        The queue row keeps the totals; failed and locked requests are counted through partial indexes (see
        `_LIVE_LOCK`), so the cost grows with those two counts, never with the queue's size, and no JSON is read.
        """
        return await self._run(self._counts, endpoint="counts", write=False)

    def _counts(self) -> QueueCounts:
        self._db.execute("BEGIN")  # one snapshot for both statements
        try:
            now = self._clock()
            total, handled, failed, locked = self._db.execute(_COUNTS, (now,) * 3).fetchone()
            holders = self._db.execute(_LOCKS_BY_CLIENT, (now,) * 3).fetchall()
        finally:
            self._db.execute("COMMIT")
        return QueueCounts(
            total=total,
            handled=handled - failed,
            failed=failed,
            pending=total - handled - locked,
            locked=locked,
            locks_by_client=dict(holders),
        )

    async def list_requests(
        self,
        *,
        after: str | None = None,
        limit: int,
        locked: bool = False,
        pending: bool = False,
        failed: bool = False,
        handled: bool = False,
    ) -> RequestPage:
        """Up to `limit` requests with ids after `after`, in id order, of the states asked (a union; none: all).

        A lock is live while its expiry is after the store's clock. `next_after` is the last id of a full page.

        Raises:
            InvalidInputError: `limit` is not 1-`MAX_LIST_LIMIT`.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidInputError(f"limit must be 1-{MAX_LIST_LIMIT}, got {limit}", endpoint="list_requests")
        states = (locked, pending, failed, handled)
        rows = await self._run(self._list, after, limit, states, endpoint="list_requests", write=False)
        items = [_listed(request_id, data) for request_id, data in rows]
        return RequestPage(items=items, next_after=items[-1]["id"] if len(items) == limit else None)

    def _list(self, after: str | None, limit: int, states: tuple[bool, bool, bool, bool]) -> list[tuple[str, bytes]]:
        conditions: list[str] = []
        args: list[Any] = []
        if after is not None:
            conditions.append("id > ?")
            args.append(after)
        chosen = [sql for sql, asked in zip(_LIST_STATES, states, strict=True) if asked]
        if chosen:
            conditions.append(f"({' OR '.join(chosen)})")
            now = self._clock()
            args.extend(now for sql in chosen for _ in range(sql.count("?")))
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = f"SELECT id, CAST(data AS BLOB) FROM requests{where} ORDER BY id LIMIT ?"  # noqa: S608 - fixed parts
        rows: list[tuple[str, bytes]] = self._db.execute(sql, [*args, limit]).fetchall()
        return rows

    async def requeue(self, request_ids: Sequence[str], *, client_key: str) -> RequeueResult:
        """Return the handled requests among `request_ids` to pending at the end of the queue, with a fresh retry
        budget (`Request.requeued`), in one transaction. Idempotent: pending and locked ones are left as they are.

        Raises:
            InvalidInputError: more than `MAX_REQUEUE_BATCH` ids, or a bad client key.
        """
        _check_client_key(client_key, "requeue")
        if len(request_ids) > MAX_REQUEUE_BATCH:
            raise InvalidInputError(
                f"requeue takes at most {MAX_REQUEUE_BATCH} requests a call, got {len(request_ids)}",
                endpoint="requeue",
            )
        if not request_ids:
            return RequeueResult()
        return await self._run(self._requeue, list(request_ids), client_key, endpoint="requeue")

    def _requeue(self, request_ids: list[str], client_key: str) -> RequeueResult:
        now = self._clock()
        result = RequeueResult()
        for request_id in request_ids:
            row = self._db.execute(
                "SELECT order_no, CAST(data AS BLOB) FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
            if row is None:
                result.missing.append(request_id)
                continue
            if row[0] is not None:
                result.not_handled.append(request_id)
                continue
            try:
                request = _parse(row[1])
                data = _dump(request.requeued(), "requeue") if can_requeue(request) else None
            except (*_UNREADABLE, InvalidInputError):  # damage the head has not quarantined yet
                data = None
            if data is None:
                result.unreadable.append(request_id)
                continue
            self._db.execute(
                "UPDATE requests SET order_no = ?, lock_client = NULL, lock_expires = NULL, data = ?, failed = 0"
                " WHERE id = ?",
                (now, data, request_id),
            )
            result.requeued.append(request_id)
        if result.requeued:
            self._db.execute("UPDATE queue SET handled = handled - ?", (len(result.requeued),))
        self._touch(now, client_key, changed=bool(result.requeued))
        return result

    async def drop(self) -> None:
        """Close the store and delete its file with its `-wal` and `-shm` files. Cannot be undone.

        Another process that has the file open keeps writing to the deleted file, unseen: stop runs first.

        Raises:
            NotFoundError: there is no queue file.
            QueueUnavailableError: a file cannot be deleted.
        """
        await self.aclose()

        def delete() -> None:
            if not self.path.exists():
                raise NotFoundError(f"no queue file {self.path}", endpoint="drop", error_type="record-not-found")
            try:
                for suffix in ("", "-wal", "-shm"):
                    self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            except OSError as exc:
                raise QueueUnavailableError(f"cannot delete {self.path}: {exc}", endpoint="drop") from exc

        await anyio.to_thread.run_sync(delete)

    async def aclose(self) -> None:
        """Stop the checkpoint thread and close the connection (the last one to the file folds the WAL in).

        Idempotent.
        """
        try:
            await self._thread.run(self._close)
        finally:
            self._thread.stop()

    def _close(self) -> None:
        self._closed = True
        self._checkpointer.close()
        if self._connected:
            self._db.close()
