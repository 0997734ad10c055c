"""The fetcher's leases on their way to the workers: a buffer, and the idle workers waiting on it in turn."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

import anyio
import sniffio

__all__ = ["Handoff"]

T = TypeVar("T")


class _Waiter:
    """One idle worker parked until an item (or the end) is handed to it."""

    __slots__ = ("ended", "event", "future", "item")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None
        self.event: anyio.Event | None = None
        self.item: object = None
        self.ended = False
        if sniffio.current_async_library() == "asyncio":
            self.future = asyncio.get_running_loop().create_future()
        else:
            self.event = anyio.Event()

    @property
    def woken(self) -> bool:
        return self.ended or self.item is not None

    def wake(self, item: object) -> None:
        self.item = item
        self._set()

    def end(self) -> None:
        self.ended = True
        self._set()

    def _set(self) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_result(None)
        elif self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if self.future is not None:
            await self.future
        elif self.event is not None:
            await self.event.wait()


class Handoff(Generic[T]):
    """Items put by one producer, each taken by one of many consumers (`async for item in handoff`).

    What `anyio.create_memory_object_stream` was here, at about a quarter of its cost per item (measured: 18 to
    5 µs): a consumer that finds the buffer empty parks on one future of the running loop (an `anyio.Event` off
    asyncio), with no checkpoint, event and receiver record per item. Items go to the longest-waiting consumer, or
    to the buffer. A consumer cancelled after an item was handed to it, before it ran, puts the item back at the
    front: nothing handed out is lost. `None` cannot be an item.
    """

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._ended = False

    def __len__(self) -> int:
        """Items buffered (not yet taken)."""
        return len(self._items)

    def put(self, item: T) -> None:
        """Hand `item` to a waiting consumer, or buffer it; never blocks.

        Raises:
            anyio.ClosedResourceError: after `end`.
        """
        if self._ended:
            raise anyio.ClosedResourceError
        self._offer(item)

    def _offer(self, item: T, *, back: bool = False) -> None:
        if self._waiters:
            self._waiters.popleft().wake(item)
        elif back:
            self._items.appendleft(item)
        else:
            self._items.append(item)

    def end(self) -> None:
        """No more items: consumers stop once the buffer is empty. Idempotent."""
        self._ended = True
        while self._waiters:
            self._waiters.popleft().end()

    def take_all(self) -> list[T]:
        """Take every buffered item at once, without a checkpoint (shutdown's give-back of prefetched work)."""
        items = list(self._items)
        self._items.clear()
        return items

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._items:
            return self._items.popleft()
        if self._ended:
            raise StopAsyncIteration
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.wait()
        except BaseException:
            if waiter.item is not None:
                self._offer(waiter.item, back=True)  # type: ignore[arg-type] # handed to us, not run: it stays
            elif not waiter.woken:
                self._waiters.remove(waiter)
            raise
        if waiter.item is None:
            raise StopAsyncIteration
        return waiter.item  # type: ignore[return-value]
