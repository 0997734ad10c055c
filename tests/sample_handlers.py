"""Handlers used by the CLI tests (imported by `headlock run` subprocesses as tests.sample_handlers:...)."""

from __future__ import annotations

import os
import random

import anyio
import anyio.to_thread

from runner import Context


async def _record(ctx: Context) -> None:
    """Append "<request id> <pid>" to `options.attempts_file`, if set, in a worker thread (file I/O blocks the loop)."""
    path = ctx.options.get("attempts_file")
    if path:
        await anyio.to_thread.run_sync(_append, path, f"{ctx.request.id} {os.getpid()}\n".encode())


def _append(path: str, line: bytes) -> None:
    # One short O_APPEND write per line: lines from several processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def slow(ctx: Context) -> None:
    """Record the attempt, sleep `options.sleep` (+ up to `options.sleep_jitter`) seconds, push the URL."""
    await _record(ctx)
    jitter = float(ctx.options.get("sleep_jitter", 0)) * random.random()
    await anyio.sleep(float(ctx.options.get("sleep", 0)) + jitter)
    await ctx.push_data({"url": ctx.url, "pid": os.getpid()})


async def gated(ctx: Context) -> None:
    """Record the attempt, wait until the file `options.gate` exists, sleep `options.sleep` s, push the URL.

    A test holds every handler in flight until it creates the gate. The wait polls every 0.1 s (off the event loop)
    and gives up after `options.gate_timeout` seconds (default 60) with a TimeoutError.
    """
    await _record(ctx)
    gate = anyio.Path(ctx.options["gate"])
    with anyio.fail_after(float(ctx.options.get("gate_timeout", 60))):
        while not await gate.exists():  # noqa: ASYNC110 - the gate is a file another process makes; no Event for it
            await anyio.sleep(0.1)
    await anyio.sleep(float(ctx.options.get("sleep", 0)))
    await ctx.push_data({"url": ctx.url, "pid": os.getpid()})


async def noop(ctx: Context) -> None:
    """Record the attempt and push the URL."""
    await _record(ctx)
    await ctx.push_data({"url": ctx.url, "pid": os.getpid()})
