"""The PostgreSQL results sink: a dataset's items in the queue's database, committed with the handled mark.

Schema (the queue's migrations, `runner.queue.postgres._schema`, version 2):

    headlock_datasets  one row per dataset: did (internal), name, created_at
    headlock_items     (did, seq) -> item: the item's JSON text as pushed (`json`: key order kept), `seq` from an
                       identity sequence, so a dataset reads back in push order

With the postgres queue, the committer does not push: it calls `PostgresQueue.complete`, which writes a request's
new links, its items and its handled mark in one transaction fenced on the lease
(`runner.queue.postgres._complete`), so a lost lease or a crash leaves no duplicate item and no partial work.
`push_lines` (one statement, all or nothing) serves any other caller.

Push order is the order of the inserts: items of one request in the order pushed; across workers, the order the
sequence handed out numbers, which can differ from commit order by the few milliseconds of a transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from runner.errors import ConfigError, DatasetWriteError, HeadlockError, InvalidInputError, QueueError

if TYPE_CHECKING:
    from runner.queue.postgres import PostgresQueue

__all__ = ["INSERT_ITEMS", "MAX_NAME", "PostgresDataset", "PostgresSnapshot", "check_dataset_name"]

Conn = psycopg.AsyncConnection[Any]

MAX_NAME = 255
"""Longest dataset name (a key of a unique index)."""

INSERT_ITEMS = """
INSERT INTO headlock_items (did, item)
SELECT u.did, u.item::json FROM unnest(%(dids)b::integer[], %(items)b::text[]) WITH ORDINALITY AS u(did, item, n)
ORDER BY u.n
"""
"""Append items (each with its dataset) in the order given: the sequence numbers them in that order. The arrays go in
binary (`%b`): the text form would escape every quote of every item with a regex."""

_FIND = "SELECT did FROM headlock_datasets WHERE name = %s"
_CREATE = "INSERT INTO headlock_datasets (name) VALUES (%s) ON CONFLICT (name) DO NOTHING"
_READ = "SELECT item::text FROM headlock_items WHERE did = %s ORDER BY seq"
_EXPORT_FETCH = 2000
"""Rows fetched per round trip by `PostgresSnapshot.lines` (a server-side cursor: memory stays bounded)."""


def check_dataset_name(name: str) -> str:
    """Return `name` if it can name a dataset in the database.

    Raises:
        InvalidInputError: empty, longer than `MAX_NAME`, or holding a NUL character.
    """
    if not 1 <= len(name) <= MAX_NAME or "\x00" in name:
        raise InvalidInputError(
            f"a dataset name is 1-{MAX_NAME} characters without NUL, got {name[:40]!r}", endpoint="open dataset"
        )
    return name


class PostgresDataset:
    """A `ResultsSink` over a dataset in a `PostgresQueue`'s database, on the queue's connection pool.

    Open it with `PostgresDataset.open(queue, name)`. The queue owns the pool: close the queue after this sink
    (closing the sink releases nothing).
    """

    def __init__(self, queue: PostgresQueue, *, did: int, name: str) -> None:
        """Use `PostgresDataset.open`: it finds or creates the dataset."""
        self.queue = queue
        self.did = did
        self.name = name

    @classmethod
    async def open(cls, queue: PostgresQueue, name: str) -> PostgresDataset:
        """The dataset `name` in the queue's database, created if missing.

        Raises:
            InvalidInputError: an invalid name.
            QueueError: the database cannot be reached.
        """
        check_dataset_name(name)

        async def find_or_create(conn: Conn) -> int:
            row = await (await conn.execute(_FIND, (name,))).fetchone()
            if row is None:
                await conn.execute(_CREATE, (name,))
                row = await (await conn.execute(_FIND, (name,))).fetchone()
            assert row is not None  # noqa: S101 - inserted or found just now; datasets are never renamed
            return int(row[0])

        return cls(queue, did=await queue._run("open dataset", find_or_create), name=name)

    @property
    def location(self) -> str:
        """The database (without the password) and the dataset's name."""
        return f"{self.queue.database}, dataset {self.name!r}"

    async def push_lines(self, lines: Sequence[str]) -> int:
        """Append `lines` in one statement (all or nothing); return how many.

        Raises:
            DatasetWriteError: nothing was stored, or (the connection broke under the commit) maybe all of it.
        """
        if not lines:
            return 0
        args = {"dids": [self.did] * len(lines), "items": list(lines)}
        try:
            await self.queue._run("push items", lambda conn: conn.execute(INSERT_ITEMS, args))
        except QueueError as exc:
            maybe = " (they may have been stored)" if exc.maybe_applied else ""
            raise DatasetWriteError(f"cannot store {len(lines)} items in {self.location}{maybe}: {exc}") from exc
        return len(lines)

    async def count(self) -> int:
        """How many items the dataset holds (an index scan: it grows with the dataset)."""

        async def read(conn: Conn) -> int:
            cursor = await conn.execute("SELECT count(*) FROM headlock_items WHERE did = %s", (self.did,))
            row = await cursor.fetchone()
            return 0 if row is None else int(row[0])

        return await self.queue._run("count items", read, write=False)

    async def drop(self) -> None:
        """Delete the dataset with every item in it (one transaction). Cannot be undone; the handle is unusable after.

        Raises:
            QueueError: the database failed (nothing was deleted then).
        """

        async def drop(conn: Conn) -> None:
            async with conn.transaction():
                await conn.execute("DELETE FROM headlock_datasets WHERE did = %s", (self.did,))
                await conn.execute("DELETE FROM headlock_items WHERE did = %s", (self.did,))

        await self.queue._run("drop dataset", drop)

    async def aclose(self) -> None:
        """Nothing to release: the pool is the queue's. Idempotent."""

    def __repr__(self) -> str:
        return f"PostgresDataset({self.location!r})"


class PostgresSnapshot:
    """A dataset read as it was when opened, for `headlock export`: one read-only REPEATABLE READ transaction on
    a connection of its own (blocking calls: run it in a worker thread).

    The transaction holds the database's oldest snapshot while it lasts, which keeps vacuum from reclaiming the
    queue's dead rows meanwhile: export a very large dataset outside a busy crawl, or from a replica.
    """

    def __init__(self, conn: psycopg.Connection[Any], did: int, location: str, secrets: Sequence[str] = ()) -> None:
        self._conn = conn
        self._did = did
        self.location = location
        self._secrets = tuple(secrets)

    @classmethod
    def open(cls, dsn: str, name: str, *, timeout: float = 30.0) -> PostgresSnapshot:
        """Connect to `dsn` and begin the snapshot of dataset `name`; close it with `close` (or `with`).

        Raises:
            ConfigError: no such dataset (nothing is created), or a DSN that does not parse.
            HeadlockError: the database cannot be reached (the message without the password).
        """
        from runner.queue.postgres._connect import parse_target, redact  # noqa: PLC0415 - beside psycopg

        check_dataset_name(name)
        target = parse_target(dsn)
        try:
            conn = psycopg.connect(dsn, connect_timeout=max(int(timeout), 2), application_name="headlock export")
        except psycopg.Error as exc:
            raise HeadlockError(f"export: cannot connect to {target}: {redact(str(exc), target.secrets)}") from None
        try:
            # One read-only snapshot from the first statement on (psycopg begins the transaction with it).
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(int(timeout * 1000)),))
            exists = conn.execute("SELECT to_regclass('headlock_datasets') IS NOT NULL").fetchone()
            row = conn.execute(_FIND, (name,)).fetchone() if exists and exists[0] else None
        except psycopg.Error as exc:
            conn.close()
            raise HeadlockError(f"export: {target}: {redact(str(exc), target.secrets)}") from None
        if row is None:
            conn.close()
            raise ConfigError(f"export: no dataset {name!r} in {target}")
        return cls(conn, int(row[0]), f"{target}, dataset {name!r}", target.secrets)

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """`(position, JSON text)` of each item in push order (positions from 1), streamed through a server-side
        cursor; every call reads the same snapshot.

        Raises:
            HeadlockError: the read failed.
        """
        try:
            with self._conn.cursor(name="headlock_export") as cursor:
                cursor.itersize = _EXPORT_FETCH
                cursor.execute(_READ, (self._did,))
                for number, (text,) in enumerate(cursor, start=1):
                    yield number, text.encode()
        except psycopg.Error as exc:
            from runner.queue.postgres._connect import redact  # noqa: PLC0415

            raise HeadlockError(f"export: cannot read {self.location}: {redact(str(exc), self._secrets)}") from None

    def close(self) -> None:
        """End the snapshot and the connection. Idempotent."""
        self._conn.close()

    def __enter__(self) -> PostgresSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
