"""Handlers used by the CLI tests (imported by `headlock run` subprocesses as tests.sample_handlers:...)."""

from __future__ import annotations

import os
import random

import anyio

from runner import Context


def _record(ctx: Context, path_key: str = "attempts_file") -> None:
    path = ctx.options.get(path_key)
    if path:
        # One short O_APPEND write per line: lines from several processes never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{ctx.request.id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


async def slow(ctx: Context) -> None:
    """Record the attempt, sleep `options.sleep` (+ up to `options.sleep_jitter`) seconds, push the URL."""
    _record(ctx)
    jitter = float(ctx.options.get("sleep_jitter", 0)) * random.random()
    await anyio.sleep(float(ctx.options.get("sleep", 0)) + jitter)
    await ctx.push_data({"url": ctx.url, "pid": os.getpid()})


async def noop(ctx: Context) -> None:
    """Record the attempt and push the URL."""
    _record(ctx)
    await ctx.push_data({"url": ctx.url, "pid": os.getpid()})
