"""Signals as a task, for library scripts: the CLI's graceful stop on SIGINT and SIGTERM around a block of code."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

from runner.shutdown import Stopper

__all__ = ["stop_on_signals"]

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@asynccontextmanager
async def stop_on_signals(
    stopper: Stopper | None = None, *, signals: Sequence[signal.Signals] = DEFAULT_SIGNALS
) -> AsyncIterator[Stopper]:
    """Within the block, the first of `signals` stops `stopper` gracefully and a second forces it; yield it.

    Pass the stopper to `run(..., stopper=stopper)`: Ctrl-C then ends the run as `headlock run` does (stop
    fetching, give back prefetched requests, let handlers finish within the grace, release every lock), `run`
    returns its summary (`reason` is the signal's name, e.g. `SIGINT`) and no `KeyboardInterrupt` is raised.
    The handlers are installed when the block starts and the previous ones are back when it ends. A new `Stopper`
    is made when none is given.

    Raises:
        RuntimeError: not in the main thread (only it receives signals).
    """
    stopper = stopper if stopper is not None else Stopper()
    async with anyio.create_task_group() as tg:
        await tg.start(_stop_on, stopper, tuple(signals))
        try:
            yield stopper
        finally:
            tg.cancel_scope.cancel()


async def _stop_on(
    stopper: Stopper, signals: tuple[signal.Signals, ...], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(*signals) as received:
        task_status.started()  # the handlers are in place: a signal from now on stops the run
        async for signum in received:
            stopper.stop(signal.Signals(signum).name)
