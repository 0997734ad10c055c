"""The one Protocol every results backend implements and the runtime depends on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["ResultsSink", "WritesNow"]


@runtime_checkable
class ResultsSink(Protocol):
    """Where the items of successful attempts are stored.

    Items arrive as JSON object texts made by `runner.results.items.encode_item` (checked when the handler pushed
    them), so a sink never sees a value it cannot store as JSON. The committer writes them before the request's
    handled mark: a push that fails fails the attempt, and a push whose answer was lost may store its items twice
    when the attempt is retried (at-least-once).
    """

    @property
    def location(self) -> str:
        """Where the items are, for people: a file path, or the dataset's id and address."""
        ...

    async def push_lines(self, lines: Sequence[str]) -> int:
        """Store `lines` (JSON objects); return how many.

        Raises:
            DatasetWriteError: nothing or not all of it was stored for sure (a full disk, an API error after its
                retries); the attempt fails and is retried.
        """
        ...

    async def aclose(self) -> None:
        """Flush and release files or connections. Idempotent."""
        ...


@runtime_checkable
class WritesNow(Protocol):
    """A sink that stores lines without waiting (the local JSONL file: one `write()` to the page cache): the
    committer calls `write_lines` directly, one coroutine fewer a page than `push_lines`."""

    def write_lines(self, lines: Sequence[str]) -> int:
        """`ResultsSink.push_lines`, synchronously, with the same errors."""
        ...
