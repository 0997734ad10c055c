"""Results of handlers: JSON lines appended to `<storage>/datasets/<name>.jsonl`."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.errors import DatasetWriteError, InvalidItemError

__all__ = ["Dataset", "encode_item", "read_items"]


def _default(value: object) -> str:
    """Dates and times as ISO 8601; anything else JSON has no form for is refused."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} values have no JSON form")


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=_default)
"""One encoder for every line: `json.dumps` with options builds a new one per call."""


def encode_item(item: object) -> str:
    """One dataset line for `item`, a mapping with string keys and JSON values (dates become ISO strings).

    Raises:
        InvalidItemError: not a mapping, or a value JSON cannot represent (NaN, bytes, sets, tuple keys, a cycle).
    """
    if not isinstance(item, Mapping):
        raise InvalidItemError(f"a dataset item must be a dict, got {type(item).__name__}")
    try:
        return _ENCODER.encode(item)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidItemError(f"dataset item cannot be stored as JSON: {exc}") from exc


class Dataset:
    """An append-only JSONL file, safe for several processes.

    Each push is one `write()` on an `O_APPEND` descriptor under an exclusive `flock`, so lines from concurrent
    processes never interleave, and a write the disk refuses half-way is cut back off: the file only ever holds
    whole lines. The write goes to the page cache (microseconds), so it runs on the event loop rather than in a
    thread.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @classmethod
    def open(cls, storage_dir: Path, name: str) -> Dataset:
        """Open the named dataset under `storage_dir`."""
        return cls(storage_dir / "datasets" / f"{name}.jsonl")

    def push(self, items: Iterable[Mapping[str, Any]]) -> int:
        """Validate and append `items`; return how many.

        Raises:
            InvalidItemError: an item cannot be stored (nothing is written then).
            DatasetWriteError: the write failed (full disk, I/O error): nothing of it stays in the file.
        """
        return self.push_lines([encode_item(item) for item in items])

    def push_lines(self, lines: Sequence[str]) -> int:
        """Append lines made by `encode_item`; return how many.

        Raises:
            DatasetWriteError: the write failed (full disk, I/O error): nothing of it stays in the file.
        """
        if not lines:
            return 0
        data = ("\n".join(lines) + "\n").encode()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise DatasetWriteError(f"cannot lock dataset {self.path}: {exc}") from exc
        try:
            size = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, data)
                while written < len(data):  # a short write: the rest, or the error that stopped it
                    written += os.write(self._fd, data[written:])
            except OSError as exc:
                self._cut_back(size)
                raise DatasetWriteError(f"cannot write to dataset {self.path}: {exc}") from exc
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return len(lines)

    def _cut_back(self, size: int) -> None:
        """Truncate a failed write's partial line (we hold the lock: nobody appended after it)."""
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise DatasetWriteError(f"dataset {self.path} may end in a partial line: {exc}") from exc

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r})"


def read_items(path: Path) -> list[dict[str, Any]]:
    """Read every item of a dataset file (for tests and tools)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
