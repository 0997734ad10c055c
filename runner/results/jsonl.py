"""The local results sink: JSON lines appended to `<storage>/datasets/<name>.jsonl` (the embedded default)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.errors import DatasetWriteError
from runner.results.items import encode_item

__all__ = ["JsonlDataset", "dataset_path", "iter_lines", "read_items", "whole_lines_size"]

_READ_STEP = 1 << 20
"""Bytes read per step by `iter_lines`."""


class JsonlDataset:
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
    def open(cls, storage_dir: Path, name: str) -> JsonlDataset:
        """Open the named dataset under `storage_dir` (`dataset_path`), creating it if missing.

        Raises:
            OSError: the directory or the file cannot be created or opened for appending.
        """
        return cls(dataset_path(storage_dir, name))

    def push(self, items: Iterable[Mapping[str, Any]]) -> int:
        """Validate and append `items`; return how many.

        Raises:
            InvalidItemError: an item cannot be stored (nothing is written then).
            DatasetWriteError: the write failed (full disk, I/O error): nothing of it stays in the file.
        """
        return self.write_lines([encode_item(item) for item in items])

    @property
    def location(self) -> str:
        """The file's path."""
        return str(self.path)

    async def push_lines(self, lines: Sequence[str]) -> int:
        """`write_lines`, as the `ResultsSink` Protocol has it: on the event loop (see the class docstring)."""
        return self.write_lines(lines)

    def write_lines(self, lines: Sequence[str]) -> int:
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
        written = 0
        try:
            try:
                while written < len(data):  # a short write: the rest, or the error that stopped it
                    written += os.write(self._fd, data[written:])
            except OSError as exc:
                if written:
                    self._cut_back(written)
                raise DatasetWriteError(f"cannot write to dataset {self.path}: {exc}") from exc
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return len(lines)

    def _cut_back(self, written: int) -> None:
        """Truncate the `written` bytes of a failed write (we hold the lock: nobody appended after them; an append
        leaves the offset at the end of what it wrote, and a write that fails writes nothing)."""
        try:
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_CUR) - written)
        except OSError as exc:
            raise DatasetWriteError(f"dataset {self.path} may end in a partial line: {exc}") from exc

    async def aclose(self) -> None:
        """Close the file. Idempotent."""
        self.close()

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"JsonlDataset({str(self.path)!r})"


def dataset_path(storage_dir: Path, name: str) -> Path:
    """Where the local dataset `name` lives: `<storage_dir>/datasets/<name>.jsonl`."""
    return storage_dir / "datasets" / f"{name}.jsonl"


def whole_lines_size(path: Path) -> int:
    """The file's size now, taken under a shared `flock`: a push under way (exclusive lock) is wholly in it or not.

    Reading up to this size (`iter_lines`) is a consistent snapshot of a dataset that is being appended to.

    Raises:
        OSError: the file cannot be opened (FileNotFoundError when missing).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            return os.fstat(fd).st_size
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def iter_lines(path: Path, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """`(line number, line)` of each non-blank line in the first `end` bytes of the file (all of it if None).

    Lines come without their newline, read a block at a time: memory is bounded by the longest line, whatever the
    file's size. A last line without its newline (cut short) is not an item and is left out.

    Raises:
        OSError: the file cannot be read.
    """
    with path.open("rb", buffering=_READ_STEP) as file:
        left = end
        for number, line in enumerate(file, start=1):
            if left is not None:
                if left <= 0:
                    return
                left -= len(line)
                if left < 0:
                    return  # the snapshot ends inside this line
            if not line.endswith(b"\n"):
                return
            if line.strip():
                yield number, line.rstrip(b"\r\n")


def read_items(path: Path) -> list[dict[str, Any]]:
    """Read every item of a dataset file (for tests and tools)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
