"""Follow same-host links breadth-first, recording every page.

    headlock run --handler handlers.crawl:handle --start-url https://example.com

Options (`[handler_options]` in the config, read from `ctx.options`):
    max_depth (int, default 3): links deeper than this many hops from a start URL are not followed.
    same_host (bool, default true): follow only links to the host of the page they are on.
Bound the total with the runtime's `workers.max_requests`.

robots.txt is obeyed by default: a disallowed page fails as `NoRetry: disallowed by robots.txt: <url>` and is never
fetched, a Crawl-delay paces its host. `politeness.robots_txt = false` turns that off (see `[politeness]`).
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit, urlunsplit

from handlers._http import get_page
from runner import Context

__all__ = ["handle"]


async def handle(ctx: Context) -> None:
    """GET the page, push `{url, status, title, depth}`, enqueue its links one level deeper."""
    page = await get_page(ctx, robots_txt=True)
    depth = int(ctx.user_data.get("depth", 0))
    await ctx.push_data({"url": ctx.url, "status": page.response.status_code, "title": page.title, "depth": depth})
    if page.html is None or depth >= int(ctx.options.get("max_depth", 3)):
        return
    base = str(page.response.url)
    host = urlsplit(base).hostname
    same_host = bool(ctx.options.get("same_host", True))
    links = []
    for node in page.html.css("a[href]"):
        href = node.attributes.get("href")
        if not href:
            continue
        parts = urlsplit(urljoin(base, href.strip()))
        if parts.scheme not in {"http", "https"} or (same_host and parts.hostname != host):
            continue
        links.append(urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, "")))
    if links:
        await ctx.enqueue(links, user_data={"depth": depth + 1})
