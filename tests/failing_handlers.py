"""Handlers that fail on purpose (imported by `headlock run` subprocesses as tests.failing_handlers:...).

A "broken" page is one whose page number is a multiple of `options.every` (default 3). The handler is "fixed" once
the file `options.fixed` exists: a test fixes it by creating the file, as a user would fix their parser.
"""

from __future__ import annotations

import anyio

from runner import Context, NoRetry


async def _broken(ctx: Context) -> bool:
    """Whether this request's page is one the handler cannot parse (until it is fixed)."""
    fixed = ctx.options.get("fixed")
    if fixed and await anyio.Path(fixed).exists():
        return False
    number = ctx.url.rstrip("/").rsplit("/", 1)[-1]
    return number.isdigit() and int(number) % int(ctx.options.get("every", 3)) == 0


async def flaky(ctx: Context) -> None:
    """Push the URL; on a broken page raise ValueError (retried, then failed for good)."""
    if await _broken(ctx):
        raise ValueError(f"no price on {ctx.url}")
    await ctx.push_data({"url": ctx.url})


async def refuses(ctx: Context) -> None:
    """Push the URL; on a broken page raise NoRetry (failed at once)."""
    if await _broken(ctx):
        raise NoRetry(f"gone for good: {ctx.url}")
    await ctx.push_data({"url": ctx.url})
