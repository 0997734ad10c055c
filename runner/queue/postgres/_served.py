"""What `headlock serve --store postgresql://...` needs beyond `PostgresQueue`: the queues of one database behind one
connection pool (`QueueDatabase`), found by id or name, and queues on that pool (`ServedQueue`) that also read the
head without locking and delete requests, as the API does.

Every server replica on the database sees the same queues: nothing about a queue is kept in one process but the
queue handles themselves (keyed by the queue's internal `qid`, which is never reused), so a queue deleted or
re-created through another replica is found as it is now.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from runner.errors import NotFoundError, QueueUnavailableError
from runner.metrics import Metrics
from runner.queue._rows import _check_client_key, _salvage, _to_datetime, validate_queue_name
from runner.queue.postgres._connect import Target, connection_lost, mapped, open_database
from runner.queue.postgres._queue import PostgresQueue
from runner.queue.postgres._schema import migrate
from runner.queue.sqlite import _HEAD_FIELDS, Head

__all__ = ["QueueDatabase", "QueueRow", "ServedQueue"]

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

_ID_ALPHABET = string.ascii_letters + string.digits

_LIST_HEAD = """
WITH m AS (
    SELECT (extract(epoch FROM greatest(q.created_at, max(k.modified_at))) * 1000000)::bigint AS modified,
        count(k.client_key) > 1 AS multiple
    FROM headlock_queues q LEFT JOIN headlock_clients k ON k.qid = q.qid WHERE q.qid = %(q)s GROUP BY q.qid
),
h AS (
    SELECT id, data::text AS data, order_no FROM headlock_requests
    WHERE qid = %(q)s AND order_no IS NOT NULL ORDER BY order_no, id LIMIT %(n)s
)
SELECT m.modified, m.multiple, h.id, h.data FROM m LEFT JOIN h ON true ORDER BY h.order_no, h.id
"""
"""The first n unhandled requests (locked ones included) and the queue's state, from one snapshot; no row when the
queue is gone."""

_DELETE = """
WITH d AS (
    DELETE FROM headlock_requests WHERE qid = %(q)s AND id = ANY(%(ids)s::text[])
    RETURNING id, order_no IS NULL AS handled
),
k AS (
    UPDATE headlock_clients SET total = total - (SELECT count(*) FROM d),
        handled = handled - (SELECT count(*) FROM d WHERE handled), modified_at = now()
    WHERE qid = %(q)s AND client_key = %(client)s AND EXISTS (SELECT 1 FROM d)
)
SELECT id FROM d
"""
"""Delete requests (locked or not) and take them off the counts, on the deleting client's row (the sums over the
clients stay right)."""


@dataclass(frozen=True, slots=True)
class QueueRow:
    """A queue as the database names it: `qid` (internal, never reused), `id` (the API's), `name`."""

    qid: int
    id: str
    name: str


class ServedQueue(PostgresQueue):
    """A `PostgresQueue` on the pool of a `QueueDatabase` (made by `QueueDatabase.queue`), with the two calls only the
    API serves: `list_head` and `delete_requests`. Its `aclose` (and `drop`) leave the shared pool open."""

    async def list_head(self, limit: int) -> Head:
        """The first `limit` unhandled requests in queue order, locked ones included, without `userData`.

        Raises:
            NotFoundError: the queue was deleted.
        """

        async def read(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await conn.execute(_LIST_HEAD, {"q": self.qid, "n": limit})).fetchall()

        rows = await self._run("list_head", read, write=False)
        if not rows:
            raise NotFoundError(
                f"the queue {self.where} was deleted", endpoint="list_head", error_type="record-not-found"
            )
        items = [_head_item(request_id, data) for _, _, request_id, data in rows if request_id is not None]
        return Head(items=items, queue_modified_at=_to_datetime(int(rows[0][0])), had_multiple_clients=rows[0][1])

    async def delete_requests(self, request_ids: Sequence[str], *, client_key: str) -> list[str]:
        """Delete these requests, locked or not; return the ids that existed, in the order given."""
        _check_client_key(client_key, "delete_requests")
        if not request_ids:
            return []
        await self._register(client_key, "delete_requests")
        args = {"q": self.qid, "ids": sorted(set(request_ids)), "client": client_key}

        async def delete(conn: Conn) -> set[str]:
            return {row[0] for row in await (await conn.execute(_DELETE, args)).fetchall()}

        deleted = await self._run("delete_requests", delete)
        return [request_id for request_id in dict.fromkeys(request_ids) if request_id in deleted]

    async def aclose(self) -> None:
        """Refuse further calls on this handle; the pool is the database's (`QueueDatabase.aclose`). Idempotent."""
        self._closed = True


def _head_item(request_id: str, data: str) -> dict[str, Any]:
    try:
        request = json.loads(data)
    except ValueError:  # pragma: no cover - the column is json: the database parsed it
        request = None
    if not isinstance(request, dict):
        request = _salvage(data)
    return {"id": request_id} | {key: request[key] for key in _HEAD_FIELDS if key in request}


class QueueDatabase:
    """The queues of one database (the schema its DSN's `search_path` names) behind one connection pool.

    Open it with `QueueDatabase.open`. The `ServedQueue`s it hands out share its pool; `aclose` closes it.
    """

    def __init__(self, pool: AsyncConnectionPool[Conn], target: Target, *, timeout: float, metrics: Metrics) -> None:
        """Use `QueueDatabase.open`."""
        self._pool = pool
        self._target = target
        self._timeout = timeout
        self._metrics = metrics
        self._closed = False

    @classmethod
    async def open(
        cls, dsn: str, *, pool_size: int = 10, call_timeout: float = 30.0, metrics: Metrics | None = None
    ) -> QueueDatabase:
        """Connect to `dsn`, bring the schema to this version (safe from any number of replicas at once) and open a
        pool of at most `pool_size` connections. The connection settings are `PostgresQueue.open`'s: every call is
        bounded by `call_timeout`, on the server too.

        Raises:
            ConfigError: a DSN that does not parse.
            QueueUnavailableError: the database cannot be reached (a wrong password, no such database), or holds a
                newer headlock schema.
        """
        target, _, pool = await open_database(
            dsn,
            call_timeout=call_timeout,
            application="headlock serve",
            pool_size=pool_size,
            endpoint="open database",
            first=migrate,
        )
        await pool.open(wait=False)
        return cls(pool, target, timeout=call_timeout, metrics=metrics or Metrics())

    def __repr__(self) -> str:
        return f"QueueDatabase({str(self._target)!r})"

    @property
    def database(self) -> str:
        """The database, without the password (for messages): `postgres HOST:PORT/DBNAME`."""
        return str(self._target)

    async def _call(self, endpoint: str, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run `fn` on a pooled connection, shielded and bounded as `PostgresQueue`'s calls; once more on a fresh
        connection when the first was gone (every call here is a read or an idempotent insert)."""
        if self._closed:
            raise QueueUnavailableError(f"the database {self._target} is closed", endpoint=endpoint)
        for attempt in (1, 2):
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(self._timeout + 5):
                        async with self._pool.connection(timeout=self._timeout) as conn:
                            return await fn(conn)
                except TimeoutError:
                    raise QueueUnavailableError(
                        f"{self._target} did not answer within {self._timeout + 5:g} s", endpoint=endpoint
                    ) from None
                except psycopg.Error as exc:
                    if connection_lost(exc):
                        with anyio.move_on_after(self._timeout):
                            await self._pool.check()
                        if attempt == 1:
                            continue
                    raise mapped(exc, self._target, endpoint, write=False) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def find(self, ref: str, *, by_name: bool = False) -> QueueRow | None:
        """The queue whose id is `ref` or, failing that, whose name is (only the name when `by_name`); None if none."""
        if "\x00" in ref:  # no id or name holds one, and PostgreSQL text cannot carry it
            return None
        sql = (
            "SELECT qid, id, name FROM headlock_queues WHERE name = %(ref)s"
            if by_name
            else "SELECT qid, id, name FROM headlock_queues WHERE id = %(ref)s OR name = %(ref)s"
            " ORDER BY id = %(ref)s DESC LIMIT 1"
        )

        async def read(conn: Conn) -> tuple[Any, ...] | None:
            return await (await conn.execute(sql, {"ref": ref})).fetchone()

        row = await self._call("find queue", read)
        return None if row is None else QueueRow(qid=int(row[0]), id=str(row[1]), name=str(row[2]))

    async def create(self, name: str) -> tuple[QueueRow, bool]:
        """The queue named `name`, created when missing (True then). Replicas creating it at once get one queue.

        Raises:
            InvalidInputError: `name` is not a valid queue name.
        """
        validate_queue_name(name)
        queue_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(17))

        async def create(conn: Conn) -> tuple[tuple[Any, ...], bool] | None:
            cursor = await conn.execute(
                "INSERT INTO headlock_queues (id, name) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING"
                " RETURNING qid, id, name",
                (queue_id, name),
            )
            row = await cursor.fetchone()
            if row is not None:
                return row, True
            cursor = await conn.execute("SELECT qid, id, name FROM headlock_queues WHERE name = %s", (name,))
            row = await cursor.fetchone()
            return None if row is None else (row, False)

        for _ in range(3):  # found missing between the insert and the read: deleted by another replica just then
            found = await self._call("create queue", create)
            if found is not None:
                row, created = found
                return QueueRow(qid=int(row[0]), id=str(row[1]), name=str(row[2])), created
        raise QueueUnavailableError(f"the queue {name!r} kept being deleted while created", endpoint="create queue")

    def queue(self, row: QueueRow) -> ServedQueue:
        """A handle on the queue `row` over this database's pool (no call is made)."""
        return ServedQueue(
            self._pool,
            self._target,
            qid=row.qid,
            queue_id=row.id,
            name=row.name,
            timeout=self._timeout,
            metrics=self._metrics,
        )

    async def aclose(self) -> None:
        """Close the pool: every queue handed out fails its calls from now on. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._pool.close(timeout=self._timeout)
