"""Group commit: calls that arrive while a batch is being written wait, then go out together in the next one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["Batched", "GroupCommit"]


class Batched:
    """One call waiting for, or written in, a group commit; the write gives it its outcome (subclasses hold it)."""

    __slots__ = ("done", "taken")

    def __init__(self) -> None:
        self.taken = False
        """In a batch being written (or written): cancelling its caller no longer takes it back."""
        self.done = False


B = TypeVar("B", bound=Batched)


class GroupCommit(Generic[B]):
    """Writes calls in batches: one written now when none is being written, else all that wait, together, next.

    Under load this turns N writes (transactions, thread hand-offs, API calls) into one, and costs a waiting call
    one shared event per batch: no lock taken and released by every caller in turn.
    """

    def __init__(self, write: Callable[[list[B]], Awaitable[None]]) -> None:
        """`write(batch)` writes a batch and records each call's outcome on it; what it raises goes to the caller
        that ran it (the others of the batch find theirs recorded, or nothing: the write must record errors)."""
        self._write = write
        self._pending: list[B] = []
        self._ended: anyio.Event | None = None
        """Set when the batch being written ends; None while none is."""

    async def submit(self, call: B) -> None:
        """Return once `call` is written, its outcome recorded on it.

        Cancelled before its batch was taken, the call is never written; after, it is written regardless (its
        caller does not learn the outcome).
        """
        self._pending.append(call)
        try:
            while not call.done:
                if self._ended is not None:
                    await self._ended.wait()
                    continue
                batch, self._pending = self._pending, []
                for queued in batch:
                    queued.taken = True
                ended = self._ended = anyio.Event()
                try:
                    await self._write(batch)
                finally:
                    for queued in batch:
                        queued.done = True
                    self._ended = None
                    ended.set()
        except BaseException:
            if not call.taken:
                self._pending.remove(call)
            raise
