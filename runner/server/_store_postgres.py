"""The server's queues in PostgreSQL (`serve --store postgresql://...`): every replica on the database serves the same
queues, so several servers behind a load balancer share one queue.

Each call looks its queue up in the database (one indexed read): a queue another replica created, deleted or
re-created under the same name is served as it is now, never from a stale copy. Only the handles are kept here, by
the queue's internal id, which the database never reuses. Needs the `postgres` extra (psycopg).
"""

from __future__ import annotations

import secrets

import structlog

from runner.errors import NotFoundError
from runner.queue.postgres._served import QueueDatabase, QueueRow
from runner.server._store import KeylessClients, OpenQueue, new_queue_name, not_found

__all__ = ["PostgresRegistry"]

_log = structlog.get_logger("headlock.server")


class PostgresRegistry:
    """The queues of one PostgreSQL database, owned by one app: the pool opens at `start`, closes at `aclose`."""

    def __init__(
        self, dsn: str, *, default_id: str | None = None, pool_size: int = 10, call_timeout: float = 30.0
    ) -> None:
        """Serve the queues of the database `dsn` names (kept only to connect at `start`, never shown).

        `default_id` is the runs' default queue (`serve --default-queue-id`): when no queue has that id or name,
        it is created on first use as the queue named so, and that queue reports it as its id.
        """
        self._dsn = dsn
        self._default_id = default_id
        self._pool_size = pool_size
        self._call_timeout = call_timeout
        self._database: QueueDatabase | None = None
        self._open: dict[int, OpenQueue] = {}  # qid -> the handle, its keyless clients with it
        # Per server process: a keyless call is a client the queue has not seen on any other replica.
        self._keyless_prefix = f"anonymous-{secrets.token_hex(6)}-"

    def __repr__(self) -> str:
        where = "not started" if self._database is None else self._database.database
        return f"PostgresRegistry({where!r})"

    async def start(self) -> None:
        """Connect and bring the schema up to date.

        Raises:
            ConfigError: the DSN does not parse.
            QueueUnavailableError: the database cannot be reached, refuses the login, or holds a newer schema.
        """
        self._database = await QueueDatabase.open(self._dsn, pool_size=self._pool_size, call_timeout=self._call_timeout)
        _log.info("server.store_opened", store=self._database.database)

    def _db(self) -> QueueDatabase:
        if self._database is None:
            raise RuntimeError("PostgresRegistry.start was not called")  # a programming error, not a queue error
        return self._database

    def _handle(self, row: QueueRow) -> OpenQueue:
        queue = self._open.get(row.qid)
        if queue is None:
            queue = OpenQueue(name=row.name, store=self._db().queue(row), keyless=KeylessClients(self._keyless_prefix))
            self._open[row.qid] = queue
        return queue

    async def _find(self, ref: str) -> OpenQueue:
        if "~" in ref:
            row = await self._db().find(ref.split("~", 1)[1], by_name=True)
        else:
            row = await self._db().find(ref)
        if row is None:
            raise not_found()
        return self._handle(row)

    async def resolve(self, ref: str) -> OpenQueue:
        """Find a queue by id, name, `~name` or `username~name`; the default queue is created on first use.

        Raises:
            NotFoundError: there is no such queue.
        """
        try:
            return await self._find(ref)
        except NotFoundError:
            if ref != self._default_id:
                raise
        queue, created = await self.get_or_create(ref)
        if created:
            _log.info("server.default_queue_created", id=ref)
        return queue

    def public_id(self, queue: OpenQueue, store_id: str) -> str:
        """The id a queue reports: the default queue id for the queue named so, else the database's own."""
        return self._default_id if queue.name == self._default_id else store_id

    async def get_or_create(self, name: str | None) -> tuple[OpenQueue, bool]:
        """Open the queue `name`, creating it when missing; True when this call created it (one replica's does).

        Raises:
            InvalidInputError: `name` is not a valid queue name.
        """
        row, created = await self._db().create(new_queue_name() if name is None else name)
        return self._handle(row), created

    async def delete(self, ref: str) -> None:
        """Delete a queue (by id, name or `~name`) with every request in it. The default queue is not created to be
        deleted. Calls on it in flight here fail as on a closed queue (503); the next call naming it is a 404, on
        every replica.

        Raises:
            NotFoundError: there is no such queue.
        """
        queue = await self._find(ref)
        store = queue.store
        for qid in [qid for qid, open_queue in self._open.items() if open_queue is queue]:
            del self._open[qid]
        try:
            await store.drop()
        except NotFoundError:
            raise not_found() from None  # deleted through another replica meanwhile
        _log.info("server.queue_deleted", name=queue.name)

    async def aclose(self) -> None:
        """Close the pool. Idempotent."""
        self._open = {}
        if self._database is not None:
            await self._database.aclose()
