"""Results of handlers: JSON lines appended to `<storage>/datasets/<name>.jsonl`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Dataset"]

_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
"""One encoder for every line: `json.dumps` with options builds a new one per call."""


class Dataset:
    """An append-only JSONL file, safe for several processes.

    Each `push` is one `write()` on an `O_APPEND` descriptor, so lines from concurrent processes never interleave.
    The write goes to the page cache (microseconds), so it runs on the event loop rather than in a thread.
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
        """Append `items`; return how many."""
        lines = [_ENCODER.encode(item) for item in items]
        if lines:
            os.write(self._fd, ("\n".join(lines) + "\n").encode())
        return len(lines)

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
