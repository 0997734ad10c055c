"""The embedded store's own thread: every call on its SQLite connection runs there, one at a time, in order."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["StoreThread"]

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
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
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
    def _work(jobs: queue.SimpleQueue[_Job[Any] | None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                result, error = job.fn(*job.args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits for the outcome
                job.loop.call_soon_threadsafe(_finish, job, result, error)
