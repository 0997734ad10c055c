"""The embedded store's own thread: every call on its SQLite connection runs there, one at a time, in order; and
the group commit of its writes, whose batches the thread hands back to the loop itself (`ThreadBatches`)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import anyio

__all__ = ["StoreThread", "ThreadBatch", "ThreadBatches"]

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("args", "done", "error", "fn", "loop", "result", "waiter")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.args = args
        self.loop = loop
        self.waiter: asyncio.Future[None] = loop.create_future()
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None


def _finish(job: _Job[Any], result: object, error: BaseException | None) -> None:
    """On the loop: record the outcome and wake the caller (whichever future it waits on now)."""
    job.done, job.result, job.error = True, result, error
    if not job.waiter.done():
        job.waiter.set_result(None)


class StoreThread:
    """Runs calls in one long-lived daemon thread, started at the first call: what `anyio.to_thread.run_sync` with a
    limiter of one did for the store, at about a quarter of its CPU per call on one core (a micro-benchmark of
    empty calls here: 75-92 µs with anyio's worker threads, 22-25 µs with this one's C-level `SimpleQueue`).

    As with `run_sync` (not abandoned on cancel), a caller cancelled while its call runs waits for it to end, then
    raises the cancellation: the connection is never left in the middle of a call. Needs asyncio (as the store's
    users do: the runtime's aiohttp engine, `headlock serve`).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job[Any] | tuple[Callable[..., object], tuple[Any, ...]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the thread; its result, or what it raised."""
        job = _Job(fn, args, asyncio.get_running_loop())
        if self._thread is None:
            self._start()
        self._jobs.put(job)  # read after `_start`, which may have replaced it
        try:
            await job.waiter
        except BaseException:
            if not job.done:  # cancelled while it runs: wait for its end, as `run_sync` does
                job.waiter = job.loop.create_future()
                with anyio.CancelScope(shield=True):
                    await job.waiter
            raise
        if job.error is not None:
            error, job.error = job.error, None  # no cycle through the frame that raises it
            raise error
        return job.result  # type: ignore[return-value]

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` in the thread, after the calls given before, and return at once: `fn` reports its own
        outcome (what it raises is dropped)."""
        if self._thread is None:
            self._start()
        self._jobs.put((fn, args))

    def stop(self) -> None:
        """End the thread after the calls already given to it. Idempotent; a later `run` starts a new one (on a
        queue of its own: the calls given to the old one still run there, first)."""
        with self._start_lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._jobs, self._thread = queue.SimpleQueue(), None

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, args=(self._jobs,), name=self._name, daemon=True)
                self._thread.start()

    @staticmethod
    def _work(jobs: queue.SimpleQueue[_Job[Any] | tuple[Callable[..., object], tuple[Any, ...]] | None]) -> None:
        while (job := jobs.get()) is not None:
            if isinstance(job, tuple):  # posted
                with contextlib.suppress(BaseException):
                    job[0](*job[1])
                continue
            try:
                result, error = job.fn(*job.args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits for the outcome
                job.loop.call_soon_threadsafe(_finish, job, result, error)


class ThreadBatch(Protocol):
    """What `ThreadBatches` needs of a call: the two flags it keeps, and the future its caller waits on."""

    taken: bool
    """In a batch given to the thread: cancelling its caller no longer takes it back."""
    done: bool
    """Its batch has ended (its outcome is recorded on it)."""
    waiter: asyncio.Future[None]

    def outcome(self) -> Any:
        """What the write returned, or raise what it raised."""
        ...


B = TypeVar("B", bound=ThreadBatch)


class ThreadBatches(Generic[B]):
    """Group commit in the store's thread: a call made while no batch is in the thread goes there at the end of the
    loop iteration it was made in, with every call made in that iteration; calls made while a batch is in the thread
    go, all together, in the next one, given to the thread by the end of the one before.

    What `runner.groupcommit.GroupCommit` does with a writer task that waits on the thread for the whole batch, at
    less per call: the thread hands each batch's end to the loop (one callback, setting every caller's future), so
    a call costs one future and no task waits for the others. As with `StoreThread.run`, a caller cancelled after
    its batch was taken waits for the batch's end before the cancellation goes on. Needs asyncio.
    """

    def __init__(self, thread: StoreThread, write: Callable[[list[B]], None]) -> None:
        """`write(batch)`, run in the thread, records each call's outcome on it, its errors too: what it raises is
        lost (its callers would find no outcome)."""
        self._thread = thread
        self._write = write
        self._pending: list[B] = []
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the calls while `_busy`."""

    async def submit(self, call: B) -> Any:
        """`call.outcome()` once `call`'s batch has ended.

        Cancelled before its batch was taken, the call is never written; after, it is written regardless, and its
        caller waits for that before the cancellation goes on.
        """
        # While a batch is out, every call is on its loop (which its end wakes): no `get_running_loop`, which costs
        # a `getpid` on CPython 3.11.
        loop = self._loop
        if loop is None or not self._busy:
            loop = asyncio.get_running_loop()
        call.taken = call.done = False
        waiter: asyncio.Future[None] = asyncio.Future(loop=loop)  # directly: `create_future` is a frame around it
        call.waiter = waiter
        self._pending.append(call)
        if not self._busy:
            # At the end of this loop iteration, with the calls made in it: the workers whose answers came in one
            # poll share a transaction instead of the first of them going alone.
            self._busy, self._loop = True, loop
            loop.call_soon(self._give, loop)
        try:
            await waiter
        except BaseException:
            if not call.taken:
                self._pending.remove(call)
            elif not call.done:  # in the thread: wait for its end, as `StoreThread.run` does
                call.waiter = loop.create_future()
                with anyio.CancelScope(shield=True):
                    await call.waiter
            raise
        return call.outcome()

    def _give(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending:  # all cancelled before it went
            self._busy = False
            return
        batch, self._pending = self._pending, []
        for call in batch:
            call.taken = True
        self._busy = True
        self._thread.post(self._run, batch, loop)

    def _run(self, batch: list[B], loop: asyncio.AbstractEventLoop) -> None:
        """In the thread: write the batch, then hand its end to the loop."""
        try:
            self._write(batch)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the outcome
                loop.call_soon_threadsafe(self._ended, batch, loop)

    def _ended(self, batch: list[B], loop: asyncio.AbstractEventLoop) -> None:
        """On the loop: wake the batch's callers, and give the thread the calls that came meanwhile."""
        for call in batch:
            call.done = True
            if not call.waiter.done():  # done: cancelled with its caller
                call.waiter.set_result(None)
        self._busy = False
        if self._pending:
            self._give(loop)
