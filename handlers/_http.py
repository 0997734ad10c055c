"""What the ready handlers share: a checked GET and the page title."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from selectolax.lexbor import LexborHTMLParser

from runner import Context, NoRetry
from runner.politeness import ROBOTS_EXTENSION

__all__ = ["Page", "get_page"]

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class RetryableStatusError(Exception):
    """A status that may pass on a later attempt (5xx, 429)."""


@dataclass(slots=True)
class Page:
    """A fetched page."""

    response: httpx.Response
    elapsed_ms: float
    html: LexborHTMLParser | None

    @property
    def title(self) -> str | None:
        """The text of `<title>`, stripped."""
        node = self.html.css_first("title") if self.html is not None else None
        return node.text(strip=True) if node is not None else None


async def get_page(ctx: Context, *, robots_txt: bool = False) -> Page:
    """GET `ctx.url`, parsing HTML bodies; with `robots_txt`, the shared client checks robots.txt first (when
    `politeness.robots_txt` is unset: true or false there decides for every request).

    Raises:
        NoRetry: the URL is not http(s) (file://, ftp://, ...): such requests can never succeed.
        RetryableStatusError: a 5xx or 429 answer, so the runtime retries it.
        RobotsDisallowedError: robots.txt forbids the URL (a NoRetry: the request fails, unfetched).
        RobotsUnavailableError: robots.txt is unreachable now (the request is retried).
    """
    scheme = urlsplit(ctx.url).scheme.lower()
    if scheme not in {"http", "https"}:
        raise NoRetry(f"unsupported URL scheme {scheme!r}: only http and https are fetched")
    started = time.perf_counter()
    extensions = {ROBOTS_EXTENSION: True} if robots_txt else None
    response = await ctx.http.get(ctx.url, headers=ctx.request.headers, extensions=extensions)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code in RETRY_STATUSES:
        raise RetryableStatusError(f"HTTP {response.status_code} from {ctx.url}")
    is_html = "html" in response.headers.get("content-type", "")
    return Page(response, elapsed_ms, LexborHTMLParser(response.text) if is_html else None)
