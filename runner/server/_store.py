"""The server's queues: what the endpoints call (`QueueRegistry`, `ServedStore`), and the embedded registry, one
`SqliteQueue` per queue file under the storage directory, opened on first use, with an index of queue ids.

The PostgreSQL registry (`serve --store postgresql://...`) is `runner.server._store_postgres.PostgresRegistry`.
"""

from __future__ import annotations

import secrets
import sqlite3
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import anyio
import anyio.to_thread
import structlog

from runner.errors import InvalidInputError, NotFoundError
from runner.queue.admin import QueueAdmin
from runner.queue.protocol import RequestQueue
from runner.queue.sqlite import Head, SqliteQueue, queue_path, validate_queue_name

__all__ = [
    "KeylessClients",
    "OpenQueue",
    "QueueRegistry",
    "ServedStore",
    "SqliteRegistry",
    "new_queue_name",
    "not_found",
]

T = TypeVar("T")

_log = structlog.get_logger("headlock.server")


class ServedStore(RequestQueue, QueueAdmin, Protocol):
    """One queue as the endpoints use it: the runtime's Protocol, the queue by hand, and two calls only the API has."""

    async def list_head(self, limit: int) -> Head:
        """The first `limit` unhandled requests in queue order, locked ones included, without `userData`."""
        ...

    async def delete_requests(self, request_ids: Sequence[str], *, client_key: str) -> list[str]:
        """Delete these requests, locked or not; return the ids that existed."""
        ...


def new_queue_name() -> str:
    """The name a queue created without one gets: `unnamed-` and 16 random letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "unnamed-" + "".join(secrets.choice(alphabet) for _ in range(16))


class KeylessClients:
    """The client keys the store is given for one queue's calls without `clientKey`: four at most.

    The platform counts each keyless call as a new client. A fresh key per call would add a row to the store's
    client table (and its in-memory cache) every time, without bound. Two keys are enough for `hadMultipleClients`
    (two keyless calls are two clients): the first keyless call the store records gets key 0, every later one
    key 1. Calls that take locks use other keys than calls that act on locks, so a keyless caller owns no lock:
    it cannot prolong, delete or unlock one, as a new client could not.
    """

    def __init__(self, prefix: str) -> None:
        """Build keys as `prefix` + role + number; `prefix` must not be a prefix of a real client's key."""
        self._prefix = prefix
        self._first_taken = False

    @contextmanager
    def key(self, given: str | None, *, locks: bool = False) -> Iterator[str]:
        """The key to pass to the store for one call: `given`, or a stand-in when it is None.

        Wrap only the store call: it records the key when it succeeds and nothing when it raises, and the first
        key is handed out again after a failure, so that a later keyless call is still counted as another client.
        """
        if given is not None:
            yield given
            return
        first = not self._first_taken
        self._first_taken = True
        try:
            yield f"{self._prefix}{'L' if locks else 'C'}{0 if first else 1}"
        except BaseException:
            if first:
                self._first_taken = False
            raise


@dataclass(frozen=True, slots=True)
class OpenQueue:
    """One served queue."""

    name: str
    store: ServedStore
    keyless: KeylessClients = field(compare=False)


class QueueRegistry(Protocol):
    """The queues one app serves: found by reference, created by name, deleted; started and closed with the app."""

    async def start(self) -> None:
        """Make ready to serve (the app's start-up); an error here stops the server before it takes calls."""
        ...

    async def resolve(self, ref: str) -> OpenQueue:
        """Find a queue by id, name, `~name` or `username~name`; the default queue is created on first use.

        Raises:
            NotFoundError: there is no such queue.
        """
        ...

    def public_id(self, queue: OpenQueue, store_id: str) -> str:
        """The id a queue reports: the default queue id for the queue named so, else the store's own."""
        ...

    async def get_or_create(self, name: str | None) -> tuple[OpenQueue, bool]:
        """Open the queue `name`, creating it when missing (a new `unnamed-...` one without a name); True when new.

        Raises:
            InvalidInputError: `name` is not a valid queue name.
        """
        ...

    async def delete(self, ref: str) -> None:
        """Delete a queue (by id, name or `~name`) with every request in it.

        Raises:
            NotFoundError: there is no such queue.
        """
        ...

    async def aclose(self) -> None:
        """Release every queue. Idempotent."""
        ...


def _read_id(path: Path) -> str | None:
    """The queue id stored in the file at `path`, or None when it is not (yet) a queue database."""
    try:
        db = sqlite3.connect(path, timeout=5.0)
        try:
            row = db.execute("SELECT id FROM queue").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


def not_found() -> NotFoundError:
    """The 404 of an unknown queue, as the platform words it."""
    return NotFoundError("Request Queue was not found", error_type="record-not-found")


class SqliteRegistry:
    """The queues of one storage directory, owned by one app: opened on first use, closed by `aclose`."""

    def __init__(self, storage_dir: Path, *, default_id: str | None = None) -> None:
        """Serve the queues under `storage_dir/request_queues/`.

        `default_id` is the runs' default queue (`serve --default-queue-id`): when no queue has that id or name,
        it is created on first use as the queue named so, and that queue reports it as its id.
        """
        self._storage_dir = storage_dir
        self._default_id = default_id
        self._open: dict[str, OpenQueue] = {}
        self._ids: dict[str, str] = {}  # queue id -> queue name (file stem)
        self._lock = anyio.Lock()
        # Per server process: after a restart, a keyless call is again a client the queue has not seen.
        self._keyless_prefix = f"anonymous-{secrets.token_hex(6)}-"

    async def start(self) -> None:
        """Index the queue files there are."""
        await self.index()

    async def index(self) -> None:
        """Learn the ids of queue files not indexed yet (created before start-up or by other processes)."""
        known = set(self._ids.values())
        directory = self._storage_dir / "request_queues"
        # File system calls run in a worker thread, as every store call does: none blocks the event loop.
        found = await anyio.to_thread.run_sync(lambda: sorted(directory.glob("*.sqlite")))
        paths = [p for p in found if p.stem not in known]
        for path in paths:
            queue_id = await anyio.to_thread.run_sync(_read_id, path)
            if queue_id is None:
                _log.warning("server.queue_file_skipped", path=str(path))
                continue
            self._ids[queue_id] = path.stem

    async def resolve(self, ref: str) -> OpenQueue:
        """Find a queue by id, name, `~name` or `username~name`; the default queue is created on first use.

        Raises:
            NotFoundError: there is no such queue.
        """
        try:
            return await self._resolve(ref)
        except NotFoundError:
            if ref != self._default_id:
                raise
        queue, _ = await self.get_or_create(ref)
        _log.info("server.default_queue_created", id=ref)
        return queue

    def public_id(self, queue: OpenQueue, store_id: str) -> str:
        """The id a queue reports: the default queue id for the queue named so, else the store's own."""
        return self._default_id if queue.name == self._default_id else store_id

    async def _resolve(self, ref: str) -> OpenQueue:
        if "~" in ref:
            return await self._existing(ref.split("~", 1)[1])
        name = self._ids.get(ref)
        if name is None:
            await self.index()
            name = self._ids.get(ref, ref)
        return await self._existing(name)

    async def _existing(self, name: str) -> OpenQueue:
        if name in self._open:
            return self._open[name]
        try:
            path = queue_path(self._storage_dir, name)
        except InvalidInputError:
            raise not_found() from None
        if not await anyio.to_thread.run_sync(path.exists):
            raise not_found()
        queue, _ = await self._get(name)
        return queue

    async def get_or_create(self, name: str | None) -> tuple[OpenQueue, bool]:
        """Open the queue `name`, creating it when missing; True when it was created.

        Without a name a new queue is created under a generated name (`unnamed-...`).

        Raises:
            InvalidInputError: `name` is not a valid queue name.
        """
        if name is None:
            name = new_queue_name()
        validate_queue_name(name)
        return await self._get(name)

    async def _get(self, name: str) -> tuple[OpenQueue, bool]:
        async with self._lock:
            if name in self._open:
                return self._open[name], False
            created = not await anyio.to_thread.run_sync(queue_path(self._storage_dir, name).exists)
            store = await anyio.to_thread.run_sync(SqliteQueue.open, self._storage_dir, name)
            try:
                info = await store.get_info()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await store.aclose()
                raise
            queue = OpenQueue(name=name, store=store, keyless=KeylessClients(self._keyless_prefix))
            self._open[name] = queue
            self._ids[info.id] = name
            if name == self._default_id:
                # It reports the default id as its own (`public_id`), and clients call it by that: without this
                # alias each of their calls would miss the index and re-read the directory (two thread hand-offs).
                self._ids.setdefault(name, name)
            return queue, created

    async def delete(self, ref: str) -> None:
        """Delete a queue (by id, name or `~name`): close its store and remove its files. The default queue is not
        created to be deleted.

        Calls on it still in flight fail as on a closed store (503); the next call naming it gets a 404.

        Raises:
            NotFoundError: there is no such queue.
        """
        queue = await self._resolve(ref)
        async with self._lock:
            if self._open.get(queue.name) is queue:
                del self._open[queue.name]
            for queue_id in [i for i, name in self._ids.items() if name == queue.name]:
                del self._ids[queue_id]
            try:
                await queue.store.drop()
            except NotFoundError:
                raise not_found() from None
        _log.info("server.queue_deleted", name=queue.name)

    async def aclose(self) -> None:
        """Close every open queue. Idempotent."""
        async with self._lock:
            queues, self._open = list(self._open.values()), {}
        for queue in queues:
            await queue.store.aclose()
