"""Group commit: calls that arrive while a batch is being written wait, then go out together in the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Batched", "GroupCommit"]


class Batched:
    """One call waiting for, or written in, a group commit; the write gives it its outcome (subclasses hold it).

    `GroupCommit.submit` sets both flags (no `__init__` to chain to: one call fewer a write): `taken`, in a batch
    being written (or written), so that cancelling its caller no longer takes it back; `done`, written.
    """

    __slots__ = ("done", "taken")
    taken: bool
    done: bool


B = TypeVar("B", bound=Batched)


class GroupCommit(Generic[B]):
    """Writes calls in batches: one written now when none is being written, else all that wait, together, next.

    Under load this turns N writes (transactions, thread hand-offs, API calls) into one, and costs a waiting call
    one loop future, set when the batch being written ends: no lock taken and released by every caller in turn,
    and not anyio's `Event` (its backend lookup, and asyncio's `Event` under it, which searches its waiters to
    remove each one). Needs asyncio.
    """

    def __init__(self, write: Callable[[list[B]], Awaitable[None]]) -> None:
        """`write(batch)` writes a batch and records each call's outcome on it; what it raises goes to the caller
        that ran it (the others of the batch find theirs recorded, or nothing: the write must record errors)."""
        self._write = write
        self._pending: list[B] = []
        self._waiting: list[asyncio.Future[None]] | None = None
        """The calls waiting for the batch being written to end; None while none is being written."""

    async def submit(self, call: B) -> None:
        """Return once `call` is written, its outcome recorded on it.

        Cancelled before its batch was taken, the call is never written; after, it is written regardless (its
        caller does not learn the outcome).
        """
        call.taken = call.done = False
        self._pending.append(call)
        try:
            while not call.done:
                if self._waiting is not None:
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiting.append(waiter)
                    await waiter  # cancelled, it is this caller's own future that is
                    continue
                batch, self._pending = self._pending, []
                for queued in batch:
                    queued.taken = True
                waiting: list[asyncio.Future[None]] = []
                self._waiting = waiting
                try:
                    await self._write(batch)
                finally:
                    for queued in batch:
                        queued.done = True
                    self._waiting = None
                    for waiter in waiting:
                        if not waiter.done():  # done: cancelled with its caller
                            waiter.set_result(None)
        except BaseException:
            if not call.taken:
                self._pending.remove(call)
            raise
