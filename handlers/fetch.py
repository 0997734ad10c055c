"""Fetch each request's URL and record its status, title and timing.

headlock run --handler handlers.fetch:handle
"""

from __future__ import annotations

from handlers._http import get_page
from runner import Context

__all__ = ["handle"]


async def handle(ctx: Context) -> None:
    """GET the URL; push `{url, loaded_url, status, title, elapsed_ms, bytes}` to the dataset."""
    page = await get_page(ctx)
    await ctx.push_data(
        {
            "url": ctx.url,
            "loaded_url": str(page.response.url),
            "status": page.response.status_code,
            "title": page.title,
            "elapsed_ms": round(page.elapsed_ms, 2),
            "bytes": len(page.response.content),
        }
    )
