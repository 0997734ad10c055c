"""Datasets and key-value stores by id or name: a metadata file per storage, an in-memory index of ids.

Each storage has a stem, its file or directory name under the storage directory, and a metadata file beside its
data (`__metadata__.json`, crawlee's name and fields: `id`, `name`, `created_at`). A named storage's stem is its
name; an unnamed one's is its id. Data that has no metadata yet (a dataset file a local `headlock run` wrote, a
store directory made by hand) gets it, with a new id, when first asked for.

An id this server has never seen is created on first use (an Actor is handed ids by its environment and expects
them to exist); a `~name` that does not exist is a 404, as on the platform.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import structlog

from runner.errors import NotFoundError, QueueUnavailableError
from runner.server import _wire as wire

__all__ = ["METADATA_FILENAME", "Storage", "StorageIndex", "modified_at", "new_id", "write_atomically"]

T = TypeVar("T")

_log = structlog.get_logger("headlock.server")

METADATA_FILENAME = "__metadata__.json"
_ID_ALPHABET = string.ascii_letters + string.digits


def new_id() -> str:
    """A new storage id: 17 letters and digits, as the platform's."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(17))


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers see the old or the new file whole.

    The temporary name has a `~`, which no record key or storage name may contain.
    """
    temporary = path.with_name(f"{path.name}~{secrets.token_hex(4)}")
    try:
        with temporary.open("wb") as file:
            file.write(data)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class Storage:
    """One dataset or key-value store: its id, name (None when unnamed), stem and creation time."""

    id: str
    name: str | None
    stem: str
    created_at: datetime


def _unavailable(what: str, exc: OSError) -> QueueUnavailableError:
    return QueueUnavailableError(f"the {what} storage cannot be read or written: {exc}")


class StorageIndex(ABC):
    """The storages of one kind under one directory: ids to stems, resolved and created under one lock.

    Every file system call runs in a worker thread.
    """

    what: str
    """What the storages are called in messages ("dataset", "key-value store")."""

    def __init__(self, directory: Path) -> None:
        """Index the storages under `directory` (created when the first storage is)."""
        self.directory = directory
        self._by_id: dict[str, Storage] = {}
        self._by_stem: dict[str, Storage] = {}
        self._lock = anyio.Lock()
        self._turns: dict[str, anyio.Lock] = {}

    def _turn(self, storage: Storage) -> anyio.Lock:
        """The lock one storage's reads and writes take turns on (its data and metadata change together)."""
        return self._turns.setdefault(storage.stem, anyio.Lock())

    # -- what each kind defines ------------------------------------------------------------------------------

    @abstractmethod
    def metadata_path(self, stem: str) -> Path:
        """Where the metadata of the storage `stem` lives."""

    @abstractmethod
    def _data_exists(self, stem: str) -> bool:
        """Whether the storage `stem` has data (a file or directory) without looking at its metadata."""

    @abstractmethod
    def _stems(self) -> list[str]:
        """The stems of every storage on disk, with or without metadata."""

    @abstractmethod
    def _create_data(self, stem: str) -> None:
        """Create the (empty) data of a new storage."""

    @abstractmethod
    def _delete_data(self, stem: str) -> None:
        """Delete the data of a storage; its metadata is deleted after."""

    # -- the index -----------------------------------------------------------------------------------------

    def not_found(self) -> NotFoundError:
        """The 404 for a storage of this kind."""
        return NotFoundError(f"{self.what[0].upper()}{self.what[1:]} was not found", error_type="record-not-found")

    def _read_metadata(self, stem: str) -> Storage | None:
        """The storage `stem` as its metadata file says, or None when it has none (or an unreadable one)."""
        path = self.metadata_path(stem)
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            _log.warning("server.storage_metadata_unreadable", path=str(path), error=str(exc))
            return None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
            _log.warning("server.storage_metadata_unreadable", path=str(path), error="no id")
            return None
        name = body.get("name")
        try:
            created = datetime.fromisoformat(str(body.get("created_at")))
        except ValueError:
            created = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return Storage(id=body["id"], name=name if isinstance(name, str) else None, stem=stem, created_at=created)

    def _write_metadata(self, storage: Storage) -> None:
        self.metadata_path(storage.stem).parent.mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {
            "id": storage.id,
            "name": storage.name,
            "created_at": storage.created_at.isoformat(),
        }
        write_atomically(self.metadata_path(storage.stem), json.dumps(body).encode())

    def _load(self, stem: str) -> Storage | None:
        """The storage `stem`: its metadata, or new metadata when it has data but none yet; None when absent."""
        storage = self._read_metadata(stem)
        if storage is None and self._data_exists(stem):
            storage = Storage(id=new_id(), name=stem, stem=stem, created_at=datetime.now(UTC))
            self._write_metadata(storage)
        return storage

    def _remember(self, storage: Storage) -> Storage:
        self._by_id[storage.id] = storage
        self._by_stem[storage.stem] = storage
        return storage

    def _scan(self) -> list[Storage]:
        found = []
        for stem in self._stems():
            if stem in self._by_stem:
                continue
            storage = self._read_metadata(stem)
            if storage is not None:
                found.append(storage)
        return found

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            raise _unavailable(self.what, exc) from exc

    async def index(self) -> None:
        """Learn the ids of storages on disk not indexed yet (made before start-up or by other processes)."""
        async with self._lock:
            for storage in await self._run(self._scan):
                self._remember(storage)

    async def resolve(self, ref: str, *, create: bool = True) -> Storage:
        """Find a storage by id, name, `~name` or `username~name`; an unseen id is created when `create`.

        Raises:
            NotFoundError: a `~name` that does not exist, or an unseen id when not `create` (or one that cannot
                be a file name).
        """
        async with self._lock:
            if "~" in ref:
                name = ref.split("~", 1)[1]
                storage = self._by_stem.get(name)
                if storage is None and wire.is_storage_name(name):
                    storage = await self._run(self._load, name)
                if storage is None:
                    raise self.not_found()
                return self._remember(storage)
            storage = self._by_id.get(ref) or self._by_stem.get(ref)
            if storage is not None and await self._run(self._present, storage):
                return storage
            self._forget(storage)
            for found in await self._run(self._scan):
                self._remember(found)
            storage = self._by_id.get(ref)
            if storage is None and wire.is_storage_name(ref):
                storage = await self._run(self._load, ref)
                if storage is None and create:
                    storage = Storage(id=ref, name=None, stem=ref, created_at=datetime.now(UTC))
                    await self._run(self._create, storage)
                    _log.info("server.storage_created", kind=self.what, id=ref, reason="unseen id")
            if storage is None:
                raise self.not_found()
            return self._remember(storage)

    def _present(self, storage: Storage) -> bool:
        """Whether a remembered storage is still on disk (another process or a person may have deleted it)."""
        return self.metadata_path(storage.stem).exists()

    def _forget(self, storage: Storage | None) -> None:
        if storage is not None:
            self._by_id.pop(storage.id, None)
            self._by_stem.pop(storage.stem, None)

    def _create(self, storage: Storage) -> None:
        self._create_data(storage.stem)
        self._write_metadata(storage)

    async def get_or_create(self, name: str | None) -> tuple[Storage, bool]:
        """The storage named `name`, created when missing (True then); without a name always a new unnamed one.

        Raises:
            InvalidInputError: `name` is not a valid storage name.
        """
        if name is not None:
            wire.storage_name(name, self.what)
        async with self._lock:
            if name is not None:
                storage = await self._run(self._load, name)
                if storage is not None:
                    if storage.name is None:  # made for an unseen id that is also this name: it is named now
                        storage = Storage(id=storage.id, name=name, stem=name, created_at=storage.created_at)
                        await self._run(self._write_metadata, storage)
                    return self._remember(storage), False
            storage_id = new_id()
            storage = Storage(id=storage_id, name=name, stem=name or storage_id, created_at=datetime.now(UTC))
            await self._run(self._create, storage)
            return self._remember(storage), True

    async def delete(self, ref: str) -> Storage:
        """Delete a storage and its metadata; return what it was.

        Raises:
            NotFoundError: there is no such storage (an unseen id is not created to be deleted).
        """
        storage = await self.resolve(ref, create=False)
        async with self._lock, self._turn(storage):
            await self._run(self._delete, storage)
            self._forget(storage)
        return storage

    def _delete(self, storage: Storage) -> None:
        self._delete_data(storage.stem)
        self.metadata_path(storage.stem).unlink(missing_ok=True)


def modified_at(path: Path) -> datetime:
    """The modification time of `path` (in a worker thread), now when it has gone."""
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime, UTC)
    except FileNotFoundError:
        return datetime.now(UTC)
