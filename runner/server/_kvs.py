"""Key-value stores on disk: `key_value_stores/<stem>/<key>` holds a record's bytes, as crawlee's local storage.

Beside each record a sidecar `<key>.__metadata__.json` holds its `key`, `content_type` and `size` (crawlee's
fields), and the store's own `__metadata__.json` its id and name (see `_storages`). A key longer than
`_PLAIN_KEY_LENGTH` does not fit in a file name with its sidecar's suffix (255 bytes): its files are named by a
prefix of it and a hash (`<prefix>~<sha256>`), and its key is read from the sidecar. Records are written through a
temporary file and a rename, and each store's calls take turns (one lock per store), so a reader sees a record and
its content type from the same write.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runner.errors import InvalidInputError
from runner.server import _wire as wire
from runner.server._storages import METADATA_FILENAME, Storage, StorageIndex, write_atomically

__all__ = ["MAX_KEY_LENGTH", "KeyValueStores", "Record", "validate_key"]

MAX_KEY_LENGTH = 256
_KEY = re.compile(r"[a-zA-Z0-9!\-_.'()]{1,256}")
"""The platform's record keys, matched with `fullmatch`."""
_SIDECAR = f".{METADATA_FILENAME}"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_PLAIN_KEY_LENGTH = 200
"""Longest key used as its file's name: with the sidecar suffix and a temporary suffix it stays within 255 bytes."""
_HASHED = re.compile(r"[a-zA-Z0-9!\-_.'()]{1,100}~[0-9a-f]{40}")
"""The file name of a longer key (`_file_name`), matched with `fullmatch`."""


def _file_name(key: str) -> str:
    """The name of a record's file: the key itself, or for a long one a prefix of it and a hash of it."""
    if len(key) <= _PLAIN_KEY_LENGTH:
        return key
    return f"{key[:100]}~{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def validate_key(key: str) -> str:
    """Return `key` if it is a valid record key, else raise a 400 that gives the rule.

    Beyond the platform's rule (1-256 of `a-zA-Z0-9!-_.'()`), `.` and `..` (they name directories) and keys ending
    in `__metadata__.json` (the names of the metadata files) are refused.
    """
    if not _KEY.fullmatch(key) or key in {".", ".."} or key.endswith(METADATA_FILENAME):
        raise InvalidInputError(
            f"Invalid input: record key {key[:300]!r} is not valid: use 1-{MAX_KEY_LENGTH} characters of"
            " a-z A-Z 0-9 ! - _ . ' ( ), not '.' or '..', not ending in '__metadata__.json'",
            status=400,
            error_type="invalid-input",
        )
    return key


def _guess_type(key: str) -> str:
    """The content type of a record that has no sidecar (a file put there by hand)."""
    suffix = Path(key).suffix.lower()
    return {".json": "application/json; charset=utf-8", ".txt": "text/plain; charset=utf-8"}.get(
        suffix, DEFAULT_CONTENT_TYPE
    )


@dataclass(frozen=True, slots=True)
class Record:
    """One record: its bytes and the content type it was stored with."""

    key: str
    value: bytes
    content_type: str


class KeyValueStores(StorageIndex):
    """The key-value stores under `storage/key_value_stores/`."""

    what = "key-value store"

    def __init__(self, storage_dir: Path) -> None:
        """Serve the stores under `storage_dir/key_value_stores/`."""
        super().__init__(storage_dir / "key_value_stores")

    def metadata_path(self, stem: str) -> Path:
        """The store's metadata, inside its directory."""
        return self.directory / stem / METADATA_FILENAME

    def _data_exists(self, stem: str) -> bool:
        return (self.directory / stem).is_dir()

    def _stems(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(
            entry.name for entry in os.scandir(self.directory) if entry.is_dir() and wire.is_storage_name(entry.name)
        )

    def _create_data(self, stem: str) -> None:
        (self.directory / stem).mkdir(parents=True, exist_ok=True)

    def _delete_data(self, stem: str) -> None:
        shutil.rmtree(self.directory / stem, ignore_errors=True)

    def path(self, storage: Storage) -> Path:
        """The directory of a store."""
        return self.directory / storage.stem

    # -- records -------------------------------------------------------------------------------------------

    async def get_record(self, storage: Storage, key: str) -> Record | None:
        """The record `key`, or None."""
        async with self._turn(storage):
            return await self._run(self._read, storage, key)

    def _read(self, storage: Storage, key: str) -> Record | None:
        directory, name = self.path(storage), _file_name(key)
        try:
            value = (directory / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        content_type = _guess_type(key)
        try:
            sidecar = json.loads((directory / f"{name}{_SIDECAR}").read_bytes())
            if isinstance(sidecar, dict) and isinstance(sidecar.get("content_type"), str):
                content_type = sidecar["content_type"]
        except (FileNotFoundError, ValueError):
            pass
        return Record(key=key, value=value, content_type=content_type)

    async def record_size(self, storage: Storage, key: str) -> int | None:
        """The size of the record `key` in bytes, or None when there is none (for HEAD)."""
        async with self._turn(storage):
            return await self._run(self._size, storage, key)

    def _size(self, storage: Storage, key: str) -> int | None:
        path = self.path(storage) / _file_name(key)
        return path.stat().st_size if path.is_file() else None

    async def set_record(self, storage: Storage, key: str, value: bytes, content_type: str) -> None:
        """Store `value` under `key` with its content type, replacing any record there."""
        async with self._turn(storage):
            await self._run(self._write, storage, key, value, content_type)

    def _write(self, storage: Storage, key: str, value: bytes, content_type: str) -> None:
        directory, name = self.path(storage), _file_name(key)
        directory.mkdir(parents=True, exist_ok=True)
        sidecar = {"key": key, "content_type": content_type, "size": len(value)}
        # The sidecar first: a record file never exists without the content type it was written with.
        write_atomically(directory / f"{name}{_SIDECAR}", json.dumps(sidecar).encode())
        write_atomically(directory / name, value)

    async def delete_record(self, storage: Storage, key: str) -> bool:
        """Delete the record `key`; False when there was none."""
        async with self._turn(storage):
            return await self._run(self._unlink, storage, key)

    def _unlink(self, storage: Storage, key: str) -> bool:
        directory, name = self.path(storage), _file_name(key)
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            return False
        (directory / f"{name}{_SIDECAR}").unlink(missing_ok=True)
        return True

    async def list_keys(
        self, storage: Storage, *, after: str | None, limit: int, prefix: str | None
    ) -> tuple[list[tuple[str, int]], bool]:
        """`(key, size)` of up to `limit` records in key order after `after` (exclusive), and whether more follow."""
        async with self._turn(storage):
            return await self._run(self._list, storage, after, limit, prefix)

    def _list(
        self, storage: Storage, after: str | None, limit: int, prefix: str | None
    ) -> tuple[list[tuple[str, int]], bool]:
        directory = self.path(storage)
        if not directory.is_dir():
            return [], False
        # Record files only: not sidecars, not the store's metadata, not temporary files (their `~` is no key's).
        keys: dict[str, str] = {}  # key -> file name
        for entry in os.scandir(directory):
            name = entry.name
            if name.endswith(METADATA_FILENAME) or not entry.is_file():
                continue
            if _KEY.fullmatch(name):
                keys[name] = name
            elif _HASHED.fullmatch(name) and (key := _sidecar_key(directory / f"{name}{_SIDECAR}")) is not None:
                keys[key] = name
        ordered = sorted(key for key in keys if not prefix or key.startswith(prefix))
        start = bisect.bisect_right(ordered, after) if after is not None else 0
        page = ordered[start : start + limit]
        sizes = []
        for key in page:
            try:
                sizes.append((key, (directory / keys[key]).stat().st_size))
            except FileNotFoundError:  # deleted by hand since the scan
                continue
        return sizes, start + limit < len(ordered)


def _sidecar_key(path: Path) -> str | None:
    """The key a sidecar names (for a record whose file is named by a hash), None when unreadable."""
    try:
        key = json.loads(path.read_bytes()).get("key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) and _KEY.fullmatch(key) else None
