"""The local results sink: JSON lines appended to `<storage>/datasets/<name>.jsonl` (the embedded default)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.errors import DatasetWriteError
from runner.results.items import encode_item

__all__ = ["JsonlDataset", "read_items"]


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
        """Open the named dataset under `storage_dir`."""
        return cls(storage_dir / "datasets" / f"{name}.jsonl")

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


def read_items(path: Path) -> list[dict[str, Any]]:
    """Read every item of a dataset file (for tests and tools)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
