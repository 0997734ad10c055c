"""`PostgresQueue`: the Protocol methods and the queue by hand over one connection pool (see the package docstring)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, ClassVar, Literal, TypeVar

import anyio
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from runner.errors import (
    AlreadyHandledError,
    InvalidInputError,
    LockLostError,
    NotFoundError,
    QueueError,
    QueueUnavailableError,
)
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
)
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
    validate_queue_name,
)
from runner.queue.admin import MAX_LIST_LIMIT, MAX_REQUEUE_BATCH, RequestPage, RequeueResult, can_requeue
from runner.queue.completion import Completion
from runner.queue.postgres._complete import Completions
from runner.queue.postgres._connect import Target, connection_lost, mapped, open_database
from runner.queue.postgres._schema import find_queue
from runner.queue.postgres._sql import (
    BATCH_ADD,
    CLAIM,
    FENCED,
    HIGH,
    LIST_STATES,
    LOCKED,
    LOCKED_ROWS,
    LOW,
    NOW,
    QUARANTINE,
    TICKS,
)
from runner.queue.protocol import MAX_BATCH, MAX_LOCK_LIMIT
from runner.results.protocol import ResultsSink
from runner.uniquekey import request_id_for

__all__ = ["PostgresQueue"]

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

_log = structlog.get_logger("headlock.queue.postgres")


def _to_datetime(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def _lock_us(lock_secs: float) -> int:
    return max(int(lock_secs * 1_000_000), 1)


@dataclass(eq=False, slots=True)
class _Fenced:
    """One fenced update waiting for, or written by, a group commit."""

    request_id: str
    data: str
    handled: bool
    failed: bool
    client_key: str
    endpoint: str
    taken: bool = False
    error: QueueError | None = None


class PostgresQueue:
    """A `RequestQueue` and `QueueAdmin` stored in PostgreSQL; many processes and machines may share one queue.

    Open it with `PostgresQueue.open`.

    With a `runner.results.postgres.PostgresDataset` opened over it, it is also an
    `runner.queue.completion.AtomicCompletion`: `complete` writes a request's new links, its items and its handled
    mark in one transaction fenced on the lease (`runner.queue.postgres._complete`), and the committer calls it
    instead of `batch_add` + `push_lines` + `update_request`.
    """

    head_is_consistent: ClassVar[Literal[True]] = True
    """Every committed add is in the head at once (`runner.queue.protocol.ConsistentHead`)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Conn],
        target: Target,
        *,
        qid: int,
        queue_id: str,
        name: str,
        timeout: float,
        metrics: Metrics,
    ) -> None:
        """Use `PostgresQueue.open`: it creates the pool, migrates the schema and finds or creates the queue."""
        self._pool = pool
        self._target = target
        self.qid = qid
        self.queue_id = queue_id
        self.name = name
        self._timeout = timeout
        self._metrics = metrics
        self._clients: set[str] = set()
        self._fenced: list[_Fenced] = []
        self._fenced_turn = anyio.Lock(fast_acquire=True)
        self._completions = Completions(self)
        self._closed = False

    @classmethod
    async def open(
        cls,
        dsn: str,
        name: str,
        *,
        create: bool = True,
        pool_size: int = 4,
        call_timeout: float = 30.0,
        metrics: Metrics | None = None,
    ) -> PostgresQueue:
        """Connect to `dsn`, bring the schema to this version (safe from any number of workers at once) and find
        the queue `name`, creating it unless `create` is false.

        `call_timeout` bounds every call: the server cancels a statement that runs longer (`statement_timeout`), and a
        call that gets no connection or no answer within it raises `QueueUnavailableError`.

        Raises:
            ConfigError: a DSN that does not parse.
            InvalidInputError: an invalid queue name.
            NotFoundError: `create` is false and there is no such queue (nothing is created).
            QueueUnavailableError: the database cannot be reached, or holds a newer headlock schema.
        """
        validate_queue_name(name)
        target, found, pool = await open_database(
            dsn,
            call_timeout=call_timeout,
            application="headlock",
            pool_size=pool_size,
            endpoint="open queue",
            first=partial(find_queue, name=name, create=create),
        )
        if found is None:
            raise NotFoundError(f"no queue {name!r} in {target}", endpoint="open queue", error_type="record-not-found")
        await pool.open(wait=False)  # connects in the background; the first call waits for it (bounded)
        return cls(
            pool, target, qid=found[0], queue_id=found[1], name=name, timeout=call_timeout, metrics=metrics or Metrics()
        )

    def __repr__(self) -> str:
        return f"PostgresQueue({str(self._target)!r}, {self.name!r})"

    @property
    def database(self) -> str:
        """The database, without the password (for messages): `postgres HOST:PORT/DBNAME`."""
        return str(self._target)

    @property
    def where(self) -> str:
        """The database and queue, without the password (for messages)."""
        return f"{self._target}, queue {self.name!r}"

    # -- plumbing -----------------------------------------------------------------------------------------

    async def _run(self, endpoint: str, fn: Callable[[Conn], Awaitable[T]], *, write: bool = True) -> T:
        """Run `fn` on a pooled connection (see `_shielded`), reporting its outcome and duration to the metrics."""
        if not self._metrics.enabled:
            return await self._shielded(endpoint, fn, write)
        status = "cancelled"
        started = anyio.current_time()
        try:
            result = await self._shielded(endpoint, fn, write)
            status = "ok"
        except Exception as exc:
            status = type(exc).__name__
            raise
        finally:
            self._metrics.queue_call("postgres", endpoint.partition(" ")[0], status, anyio.current_time() - started)
        return result

    async def _shielded(self, endpoint: str, fn: Callable[[Conn], Awaitable[T]], write: bool) -> T:
        """Run `fn` shielded from cancellation (a cancelled caller gets the outcome's cancellation afterwards, not a
        connection abandoned mid-query), bounded by the timeout; map psycopg's errors.

        A call whose connection was gone (a database restart) is tried once more on a fresh one, after the pool
        dropped its dead ones: a read always, a write when the server's answer shows it was not applied.
        """
        if self._closed:
            raise QueueUnavailableError(f"the queue {self.where} is closed", endpoint=endpoint)
        for attempt in (1, 2):
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(self._timeout + 5):
                        async with self._pool.connection(timeout=self._timeout) as conn:
                            return await fn(conn)
                except TimeoutError:
                    raise QueueUnavailableError(
                        f"{self._target} did not answer within {self._timeout + 5:g} s",
                        endpoint=endpoint,
                        maybe_applied=write,
                    ) from None
                except psycopg.Error as exc:
                    lost = connection_lost(exc)
                    if lost:
                        with anyio.move_on_after(self._timeout):
                            await self._pool.check()  # drop the pool's other dead connections now
                    # A read may always go again; a write only when the server said it failed (a SQLSTATE:
                    # `terminating connection`, `shutting down`), so it was not applied.
                    if lost and attempt == 1 and (not write or exc.sqlstate is not None):
                        continue
                    raise self._map(exc, endpoint, write=write) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _map(self, exc: psycopg.Error, endpoint: str, *, write: bool) -> QueueError:
        return mapped(exc, self._target, endpoint, write=write)

    async def _register(self, client_key: str, endpoint: str) -> None:
        """Give `client_key` its counter row (once per client key and handle)."""
        if client_key in self._clients:
            return
        await self._run(
            endpoint,
            lambda conn: conn.execute(
                "INSERT INTO headlock_clients (qid, client_key) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (self.qid, client_key),
            ),
        )
        self._clients.add(client_key)

    async def _diagnose(self, conn: Conn, request_ids: Sequence[str]) -> dict[str, tuple[bool, str | None]]:
        """`(handled, lock_client)` of each of `request_ids` that exists (for the error of a refused write)."""
        cursor = await conn.execute(
            "SELECT id, order_no IS NULL, lock_client FROM headlock_requests WHERE qid = %s AND id = ANY(%s::text[])",
            (self.qid, list(request_ids)),
        )
        return {row[0]: (row[1], row[2]) for row in await cursor.fetchall()}

    def _refusal(self, state: tuple[bool, str | None] | None, endpoint: str) -> QueueError:
        if state is None:
            return NotFoundError("Request was not found", endpoint=endpoint, error_type="record-not-found")
        if state[0]:
            return AlreadyHandledError(
                "request is already handled", endpoint=endpoint, error_type="request-handled-or-locked"
            )
        return LockLostError(
            "request is not locked by this client", endpoint=endpoint, error_type="request-handled-or-locked"
        )

    # -- the Protocol -------------------------------------------------------------------------------------

    async def lock_head(self, *, limit: int, lock_secs: float, client_key: str) -> LockedHead:
        """Lock up to `limit` (≤ 25) available requests in queue order and return them complete, in one statement.

        A stored request that cannot be read as a request is quarantined as the embedded store does (ended as
        failed, its text kept in `unreadableData`), and the requests behind it take its place in the batch.
        """
        endpoint = "lock_head"
        _check_client_key(client_key, endpoint)
        if not 1 <= limit <= MAX_LOCK_LIMIT:
            raise InvalidInputError(f"limit must be 1-{MAX_LOCK_LIMIT}, got {limit}", endpoint=endpoint)
        _check_lock_secs(lock_secs, endpoint)
        await self._register(client_key, endpoint)
        locked_at = anyio.current_time()
        args = {"q": self.qid, "lock_us": _lock_us(lock_secs), "client": client_key}
        items: list[Request] = []
        quarantined: list[tuple[str, str]] = []
        has_locks = multiple = False
        wanted = limit
        # A quarantined row leaves the head, so each round reads rows not seen yet (bounded all the same).
        for _ in range(100):
            rows = await self._run(endpoint, _claim(args, wanted))
            locked = sorted((row for row in rows if row[0] is not None), key=lambda row: row[1])
            _, _, _, has_locks, multiple = next(row for row in rows if row[0] is None)
            bad: list[tuple[str, str, BaseException]] = []
            for request_id, _, data, _, _ in locked:
                try:
                    items.append(_parse(data))
                except _UNREADABLE as exc:
                    bad.append((request_id, data, exc))
            if bad:
                quarantined.extend(await self._quarantine(bad, client_key))
            if len(locked) < wanted or not bad:
                break
            wanted = len(bad)
        for request_id, reason in quarantined:
            _log.warning("queue.request_quarantined", request_id=request_id, reason=reason, queue=self.where)
        return LockedHead(
            items=items,
            lock_secs=lock_secs,
            queue_has_locked_requests=bool(items) or bool(has_locks),
            had_multiple_clients=bool(multiple),
            locked_at=locked_at,
            quarantined=len(quarantined),
        )

    async def _quarantine(self, bad: list[tuple[str, str, BaseException]], client_key: str) -> list[tuple[str, str]]:
        """End unreadable rows this client just locked as handled-failed; return `(request_id, reason)` of each."""
        now_us = int(datetime.now(UTC).timestamp() * 1_000_000)  # only the handledAt written into the JSON
        reasons = [(request_id, _reason(exc)) for request_id, _, exc in bad]
        data = [
            _quarantined(request_id, text, reason, now_us)
            for (request_id, text, _), (_, reason) in zip(bad, reasons, strict=True)
        ]
        args = {"q": self.qid, "ids": [b[0] for b in bad], "data": data, "client": client_key}
        await self._run("lock_head", lambda conn: conn.execute(QUARANTINE, args))
        return reasons

    async def prolong_lock(
        self, request_id: str, *, lock_secs: float, client_key: str, forefront: bool = False
    ) -> datetime:
        """Extend this client's lock to the database's now + `lock_secs`; return the new expiry.

        A lock that expired is still this client's until another client locks the request.
        """
        endpoint = f"prolong_lock {request_id}"
        _check_client_key(client_key, endpoint)
        _check_lock_secs(lock_secs, endpoint)
        sql = (
            f"UPDATE headlock_requests SET order_no = %(sign)s * ({NOW} + %(lock_us)s) * {TICKS}"  # noqa: S608
            " WHERE qid = %(q)s AND id = %(id)s AND lock_client = %(client)s AND order_no IS NOT NULL"
            f" RETURNING {NOW} + %(lock_us)s"
        )
        args = {"q": self.qid, "id": request_id, "client": client_key, "lock_us": _lock_us(lock_secs)}
        args["sign"] = -1 if forefront else 1

        async def prolong(conn: Conn) -> int:
            row = await (await conn.execute(sql, args)).fetchone()
            if row is None:
                raise self._refusal((await self._diagnose(conn, [request_id])).get(request_id), endpoint)
            return int(row[0])

        return _to_datetime(await self._run(endpoint, prolong))

    async def delete_lock(self, request_id: str, *, client_key: str, forefront: bool = False) -> None:
        """Release this client's lock; the request goes to the head (`forefront`) or the end of the queue."""
        endpoint = f"delete_lock {request_id}"
        _check_client_key(client_key, endpoint)
        sql = (
            f"UPDATE headlock_requests SET order_no = %(sign)s * {NOW} * {TICKS}, lock_client = NULL"  # noqa: S608
            " WHERE qid = %(q)s AND id = %(id)s AND lock_client = %(client)s AND order_no IS NOT NULL"
        )
        args = {"q": self.qid, "id": request_id, "client": client_key, "sign": -1 if forefront else 1}

        async def release(conn: Conn) -> None:
            cursor = await conn.execute(sql, args)
            if cursor.rowcount != 1:
                raise self._refusal((await self._diagnose(conn, [request_id])).get(request_id), endpoint)

        await self._run(endpoint, release)

    async def unlock_requests(self, *, client_key: str) -> int:
        """Release every unexpired lock `client_key` holds (to the head or the end, as they were); return how many."""
        _check_client_key(client_key, "unlock_requests")
        # In the order they were in (each lock of one claim has its own place): they come back as they left.
        sql = f"""
            WITH high AS (
                SELECT id, order_no FROM headlock_requests
                WHERE qid = %(q)s AND order_no > {HIGH} AND lock_client = %(client)s FOR UPDATE
            ),
            low AS (
                SELECT id, order_no FROM headlock_requests
                WHERE qid = %(q)s AND order_no < {LOW} AND lock_client = %(client)s FOR UPDATE
            ),
            l AS (SELECT * FROM high UNION ALL SELECT * FROM low),
            p AS (SELECT id, order_no, least(row_number() OVER (ORDER BY order_no) - 1, {TICKS - 1}) AS place FROM l)
            UPDATE headlock_requests r
            SET order_no = (CASE WHEN p.order_no < 0 THEN -1 ELSE 1 END) * {NOW} * {TICKS} + p.place,
                lock_client = NULL
            FROM p WHERE r.qid = %(q)s AND r.id = p.id
        """  # noqa: S608 - fixed parts only

        async def unlock(conn: Conn) -> int:
            return (await conn.execute(sql, {"q": self.qid, "client": client_key})).rowcount

        return await self._run("unlock_requests", unlock)

    async def update_request(
        self, request: Request, *, client_key: str, forefront: bool = False, lock_required: bool = False
    ) -> RequestRegistration:
        """Replace the stored request (inserting it when unknown, unless `lock_required`).

        With `handled_at` set it leaves the head and its lock is released; without it, it is pending again and
        keeps a lock it has. `lock_required` fences the write in the statement itself: it applies only while
        `client_key` holds the request's lock (an expired lock nobody retook counts, and a write without
        `handled_at` keeps it). Fenced writes arriving together are written by one statement.

        Raises:
            InvalidInputError: the id does not match the uniqueKey, or the request cannot be stored as JSON.
            LockLostError: `lock_required`, and the request is handled, unlocked or locked by another client.
            NotFoundError: `lock_required`, and there is no such request.
        """
        endpoint = f"update_request {request.id}"
        _check_client_key(client_key, endpoint)
        if request.id != request_id_for(request.unique_key):
            raise InvalidInputError(
                "Request ID does not correspond to uniqueKey", endpoint=endpoint, error_type="request-id-invalid"
            )
        data = _dump(request, endpoint)
        handled = request.handled_at is not None
        await self._register(client_key, endpoint)
        if not lock_required:
            return await self._run(
                endpoint,
                lambda conn: self._update(
                    conn,
                    request.id,
                    data,
                    handled=handled,
                    failed=request.is_failed,
                    client_key=client_key,
                    forefront=forefront,
                ),
            )
        op = _Fenced(request.id, data, handled, request.is_failed, client_key, endpoint)
        await self._group_commit(op)
        return RequestRegistration(request_id=request.id, was_already_present=True, was_already_handled=False)

    async def _group_commit(self, op: _Fenced) -> None:
        """Write `op` with the fenced updates waiting beside it: while one group is being written, later ones wait
        for their turn and then go together in one statement."""
        self._fenced.append(op)
        try:
            async with self._fenced_turn:
                if not op.taken:
                    batch, self._fenced = self._fenced, []
                    for queued in batch:
                        queued.taken = True
                    await self._write_fenced(batch)
        except BaseException:
            if not op.taken:
                self._fenced.remove(op)  # cancelled before it was written: it never happens
            raise
        if op.error is not None:
            raise op.error

    async def _write_fenced(self, batch: list[_Fenced]) -> None:
        """Write `batch` in rounds of distinct requests (in arrival order), each round one statement in id order;
        give every update its own outcome."""
        rounds: list[list[_Fenced]] = []
        for op in batch:
            for group in rounds:
                if all(other.request_id != op.request_id for other in group):
                    group.append(op)
                    break
            else:
                rounds.append([op])
        for done, group in enumerate(rounds):
            try:
                await self._write_round(group)
            except BaseException:
                # Interrupted between rounds: the later ones were never written, and their callers must know.
                for later in rounds[done + 1 :]:
                    for op in later:
                        op.error = QueueUnavailableError("interrupted before it was written", endpoint=op.endpoint)
                raise

    async def _write_round(self, group: list[_Fenced]) -> None:
        """One statement for `group` (distinct requests, written in id order); each op gets its outcome."""
        group.sort(key=lambda op: op.request_id)
        args = {
            "q": self.qid,
            "ids": [op.request_id for op in group],
            "data": [op.data for op in group],
            "handled": [op.handled for op in group],
            "failed": [op.failed for op in group],
            "clients": [op.client_key for op in group],
        }

        async def write(conn: Conn) -> None:
            applied = {row[0] for row in await (await conn.execute(FENCED, args)).fetchall()}
            refused = [op for op in group if op.request_id not in applied]
            if refused:
                states = await self._diagnose(conn, [op.request_id for op in refused])
                for op in refused:
                    op.error = self._refusal(states.get(op.request_id), op.endpoint)

        try:
            await self._run("update_request", write)
        except QueueError as exc:
            message = str(exc).partition(": ")[2] or str(exc)  # without the group's endpoint: each op names its own
            for op in group:
                op.error = type(exc)(
                    message, endpoint=op.endpoint, error_type=exc.error_type, maybe_applied=exc.maybe_applied
                )
                op.error.__cause__ = exc

    async def _update(
        self,
        conn: Conn,
        request_id: str,
        data: str,
        *,
        handled: bool,
        failed: bool,
        client_key: str,
        forefront: bool,
    ) -> RequestRegistration:
        """An unfenced update (or insert) in one transaction, as the embedded store's `_update`."""
        position = f"{'-' if forefront else ''}{NOW} * {TICKS}"
        args = {"q": self.qid, "id": request_id, "data": data, "failed": failed, "client": client_key}
        for _ in range(3):  # a concurrent insert of the same id makes the insert a no-op: read it again
            async with conn.transaction():
                cursor = await conn.execute(
                    f"SELECT order_no, lock_client, order_no IS NOT NULL AND {LOCKED} FROM headlock_requests"  # noqa: S608
                    " WHERE qid = %(q)s AND id = %(id)s FOR UPDATE",
                    args,
                )
                row = await cursor.fetchone()
                if row is None:
                    inserted = await conn.execute(
                        "INSERT INTO headlock_requests (qid, id, order_no, data, failed) VALUES (%(q)s, %(id)s,"  # noqa: S608
                        f" {'NULL' if handled else position}, %(data)s::json, %(failed)s) ON CONFLICT DO NOTHING",
                        args,
                    )
                    if inserted.rowcount != 1:
                        continue
                    await self._count(conn, total=1, handled=int(handled), client_key=client_key)
                    return RequestRegistration(
                        request_id=request_id, was_already_present=False, was_already_handled=False
                    )
                order_no, lock_client, live = row
                was_handled = order_no is None
                if handled:
                    sql = "order_no = NULL, lock_client = NULL, data = %(data)s::json, failed = %(failed)s"
                elif lock_client is not None and live:
                    sql = "data = %(data)s::json"  # a live lock stays
                else:
                    sql = f"order_no = {position}, lock_client = NULL, data = %(data)s::json, failed = false"
                await conn.execute(f"UPDATE headlock_requests SET {sql} WHERE qid = %(q)s AND id = %(id)s", args)  # noqa: S608
                if handled != was_handled:
                    await self._count(conn, total=0, handled=1 if handled else -1, client_key=client_key)
                return RequestRegistration(
                    request_id=request_id, was_already_present=True, was_already_handled=was_handled
                )
        raise QueueUnavailableError(
            "the request kept changing under the update", endpoint=f"update_request {request_id}"
        )

    async def _count(self, conn: Conn, *, total: int, handled: int, client_key: str) -> None:
        await conn.execute(
            "UPDATE headlock_clients SET total = total + %s, handled = handled + %s, modified_at = now()"
            " WHERE qid = %s AND client_key = %s",
            (total, handled, self.qid, client_key),
        )

    async def batch_add(
        self, requests: Sequence[RequestDraft], *, client_key: str, forefront: bool = False
    ) -> BatchAddResult:
        """Add up to 25 requests, deduplicated by `uniqueKey` (the first of duplicates in one batch wins), in one
        statement that writes them in id order.

        A draft may carry `handledAt` (it is stored as handled) and extra fields, and `id` only if it matches. A
        request another client adds at the same moment is reported as already present.

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
        prepared = [_prepare(draft, endpoint) for draft in requests]
        await self._register(client_key, endpoint)
        unique: dict[str, tuple[str, str, bool, bool, str]] = {}
        for item in prepared:
            unique.setdefault(item[0], item)
        rows = list(unique.values())
        args = {
            "q": self.qid,
            "client": client_key,
            "forefront": forefront,
            "ids": [r[0] for r in rows],
            "data": [r[4] for r in rows],
            "handled": [r[2] for r in rows],
            "failed": [r[3] for r in rows],
            "places": list(range(len(rows))),
        }

        async def add(conn: Conn) -> list[tuple[str, bool, bool]]:
            # Planned on each call, never prepared: a prepared statement's generic plan, chosen while the table was
            # small, kept adds into a new queue at 500-800/s until autoanalyze (4,000-9,000/s planned each time).
            return await (await conn.execute(BATCH_ADD, args, prepare=False)).fetchall()

        outcome = {request_id: (new, handled) for request_id, new, handled in await self._run(endpoint, add)}
        processed: list[AddedRequest] = []
        seen: set[str] = set()
        for request_id, unique_key, _, _, _ in prepared:
            # Not in the answer: another client's insert, committed after this statement's snapshot, won.
            new, handled = outcome.get(request_id, (False, False))
            first = request_id not in seen
            seen.add(request_id)
            processed.append(
                AddedRequest(
                    request_id=request_id,
                    unique_key=unique_key,
                    was_already_present=not (new and first),
                    was_already_handled=handled and not (new and first),
                )
            )
        return BatchAddResult(processed_requests=processed)

    async def get_request(self, request_id: str) -> Request | None:
        """Return the stored request, or None.

        Raises:
            QueueUnavailableError: the stored request is unreadable (it reads as failed once `lock_head`
                quarantined it).
        """
        endpoint = f"get_request {request_id}"

        async def read(conn: Conn) -> tuple[str] | None:
            cursor = await conn.execute(
                "SELECT data::text FROM headlock_requests WHERE qid = %s AND id = %s", (self.qid, request_id)
            )
            return await cursor.fetchone()

        row = await self._run(endpoint, read, write=False)
        return None if row is None else _load(request_id, row[0], endpoint)

    async def get_info(self) -> QueueInfo:
        """The queue's metadata and counters, summed over its clients' rows.

        `modifiedAt` and `accessedAt` are the last add or handled change (locks move no timestamp here).
        """

        async def read(conn: Conn) -> tuple[Any, ...] | None:
            cursor = await conn.execute(
                "SELECT q.id, q.name, (extract(epoch FROM q.created_at) * 1000000)::bigint,"
                " coalesce(sum(k.total), 0), coalesce(sum(k.handled), 0),"
                " (extract(epoch FROM greatest(q.created_at, max(k.modified_at))) * 1000000)::bigint,"
                " count(k.client_key) > 1"
                " FROM headlock_queues q LEFT JOIN headlock_clients k ON k.qid = q.qid WHERE q.qid = %s"
                " GROUP BY q.qid",
                (self.qid,),
            )
            return await cursor.fetchone()

        row = await self._run("get_info", read, write=False)
        if row is None:
            raise NotFoundError(
                f"the queue {self.where} was deleted", endpoint="get_info", error_type="record-not-found"
            )
        queue_id, name, created, total, handled, modified, multiple = row
        return QueueInfo(
            id=queue_id,
            name=name,
            created_at=_to_datetime(int(created)),
            modified_at=_to_datetime(int(modified)),
            accessed_at=_to_datetime(int(modified)),
            total_request_count=int(total),
            handled_request_count=int(handled),
            pending_request_count=int(total) - int(handled),
            had_multiple_clients=bool(multiple),
        )

    async def locks(self) -> list[tuple[str, str, datetime]]:
        """`(request_id, client_key, expires_at)` of every live lock, soonest expiry first."""

        async def read(conn: Conn) -> list[tuple[str, str, int]]:
            cursor = await conn.execute(
                f"SELECT id, lock_client, abs(order_no) / {TICKS} FROM {LOCKED_ROWS} l"  # noqa: S608
                " ORDER BY abs(order_no)",
                {"q": self.qid},
            )
            return await cursor.fetchall()

        rows = await self._run("locks", read, write=False)
        return [(request_id, holder, _to_datetime(int(us))) for request_id, holder, us in rows]

    # -- results in the same transaction (`runner.queue.completion.AtomicCompletion`) ------------------------

    def completes_into(self, sink: ResultsSink) -> bool:
        """Whether `complete` can write into `sink`: a `PostgresDataset` opened over this queue."""
        return self._completions.completes_into(sink)

    async def complete(
        self,
        request: Request,
        *,
        client_key: str,
        links: Mapping[bool, Sequence[RequestDraft]],
        items: Sequence[str],
        dataset: ResultsSink,
    ) -> Completion:
        """Add `links`, append `items` to `dataset` and store `request` as handled in one transaction, fenced on
        the lease: all of it, or (`LockLostError`) none of it. Completes arriving together share a transaction.

        Raises: see `runner.queue.completion.AtomicCompletion.complete`.
        """
        return await self._completions.complete(
            request, client_key=client_key, links=links, items=items, dataset=dataset
        )

    # -- the queue by hand (`runner.queue.admin.QueueAdmin`) ------------------------------------------------

    async def counts(self) -> QueueCounts:
        """Handled, failed, pending and locked requests, and the locks by client key, from one snapshot.

        Totals come from the clients' rows, failed and locked requests through their indexes: the cost grows with
        those counts, not with the queue's size.
        """
        sql = (
            "SELECT (SELECT coalesce(sum(total), 0) FROM headlock_clients WHERE qid = %(q)s),"  # noqa: S608
            " (SELECT coalesce(sum(handled), 0) FROM headlock_clients WHERE qid = %(q)s),"
            " (SELECT count(*) FROM headlock_requests WHERE qid = %(q)s AND failed),"
            " (SELECT coalesce(json_object_agg(lock_client, n), '{}')::text FROM (SELECT lock_client, count(*) AS n"
            f" FROM {LOCKED_ROWS} l GROUP BY lock_client) l)"
        )

        async def read(conn: Conn) -> tuple[Any, ...] | None:
            return await (await conn.execute(sql, {"q": self.qid})).fetchone()

        row = await self._run("counts", read, write=False)
        assert row is not None  # noqa: S101 - an aggregate always returns its row
        total, handled, failed = int(row[0]), int(row[1]), int(row[2])
        holders: dict[str, int] = dict(sorted(json.loads(row[3]).items()))
        locked = sum(holders.values())
        return QueueCounts(
            total=total,
            handled=handled - failed,
            failed=failed,
            pending=total - handled - locked,
            locked=locked,
            locks_by_client=holders,
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

        A lock is live while its expiry is after the database's now. `next_after` is the last id of a full page.

        Raises:
            InvalidInputError: `limit` is not 1-`MAX_LIST_LIMIT`.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidInputError(f"limit must be 1-{MAX_LIST_LIMIT}, got {limit}", endpoint="list_requests")
        conditions = ["qid = %(q)s"]
        if after is not None:
            conditions.append("id > %(after)s")
        chosen = [sql for sql, asked in zip(LIST_STATES, (locked, pending, failed, handled), strict=True) if asked]
        if chosen:
            conditions.append(f"({' OR '.join(chosen)})")
        sql = (
            f"SELECT id, data::text FROM headlock_requests WHERE {' AND '.join(conditions)}"  # noqa: S608
            " ORDER BY id LIMIT %(limit)s"
        )

        async def read(conn: Conn) -> list[tuple[str, str]]:
            return await (await conn.execute(sql, {"q": self.qid, "after": after, "limit": limit})).fetchall()

        rows = await self._run("list_requests", read, write=False)
        items = [_listed(request_id, data.encode()) for request_id, data in rows]
        return RequestPage(items=items, next_after=items[-1]["id"] if len(items) == limit else None)

    async def requeue(self, request_ids: Sequence[str], *, client_key: str) -> RequeueResult:
        """Return the handled requests among `request_ids` to pending at the end of the queue (in the order given),
        with a fresh retry budget, in one transaction. Idempotent: pending and locked ones are left as they are.

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
        await self._register(client_key, "requeue")
        ids = list(request_ids)

        async def requeue(conn: Conn) -> RequeueResult:
            result = RequeueResult()
            async with conn.transaction():
                cursor = await conn.execute(
                    "SELECT id, order_no IS NULL, data::text FROM headlock_requests WHERE qid = %s"
                    " AND id = ANY(%s::text[]) ORDER BY id FOR UPDATE",
                    (self.qid, ids),
                )
                found = {row[0]: (row[1], row[2]) for row in await cursor.fetchall()}
                back: dict[str, str] = {}
                for request_id in ids:
                    state = found.get(request_id)
                    if state is None:
                        result.missing.append(request_id)
                    elif not state[0]:
                        result.not_handled.append(request_id)
                    elif request_id not in back:
                        data = _requeued(state[1])
                        if data is None:
                            result.unreadable.append(request_id)
                        else:
                            back[request_id] = data
                            result.requeued.append(request_id)
                if back:
                    order = sorted(back)
                    places = {request_id: place for place, request_id in enumerate(back)}
                    await conn.execute(
                        f"UPDATE headlock_requests r SET order_no = {NOW} * {TICKS} + u.place, lock_client = NULL,"  # noqa: S608
                        " failed = false, data = u.data::json FROM unnest(%s::text[], %s::text[], %s::integer[])"
                        " AS u(id, data, place) WHERE r.qid = %s AND r.id = u.id",
                        (order, [back[i] for i in order], [places[i] for i in order], self.qid),
                    )
                    await self._count(conn, total=0, handled=-len(back), client_key=client_key)
            return result

        return await self._run("requeue", requeue)

    async def drop(self) -> None:
        """Delete the queue with every request in it, and close this handle. Cannot be undone.

        Raises:
            NotFoundError: the queue does not exist (any more).
        """

        async def drop(conn: Conn) -> None:
            async with conn.transaction():
                cursor = await conn.execute("DELETE FROM headlock_queues WHERE qid = %s", (self.qid,))
                if cursor.rowcount != 1:
                    raise NotFoundError(f"no queue {self.where}", endpoint="drop", error_type="record-not-found")
                await conn.execute("DELETE FROM headlock_requests WHERE qid = %s", (self.qid,))

        try:
            await self._run("drop", drop)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._pool.close(timeout=self._timeout)


def _claim(args: dict[str, Any], wanted: int) -> Callable[[Conn], Awaitable[list[tuple[Any, ...]]]]:
    """The claim statement (`CLAIM`) for `wanted` requests, as a call `_run` makes."""

    async def claim(conn: Conn) -> list[tuple[Any, ...]]:
        return await (await conn.execute(CLAIM, {**args, "n": wanted})).fetchall()

    return claim


def _requeued(data: str) -> str | None:
    """The stored JSON of a handled request made pending again (`Request.requeued`), or None when it cannot be
    (unreadable, or quarantined damage)."""
    try:
        request = _parse(data)
        return _dump(request.requeued(), "requeue") if can_requeue(request) else None
    except (*_UNREADABLE, InvalidInputError):
        return None
