"""robots.txt, fetched once per host through the client's own engine and kept until it expires (RFC 9309).

An answer 2xx is parsed with Protego (Scrapy's parser) from its first `MAX_ROBOTS_BYTES` (Google reads 500 KiB);
4xx (but 429) means no rules: everything allowed; 5xx, 429, a timeout or a network error means "unreachable": the
request fails with `RobotsUnavailableError` (retried per the run's policy) and the next attempt asks again after
`UNAVAILABLE_SECS`. Redirects are followed, up to five; more count as no rules. A Crawl-delay for our User-Agent
becomes the host's delay (`Hosts.set_crawl_delay`).
"""

from __future__ import annotations

from collections import OrderedDict
from time import monotonic
from typing import TYPE_CHECKING

import anyio
import httpx
import structlog
from protego import Protego

from runner.errors import RobotsDisallowedError, RobotsUnavailableError
from runner.politeness.hosts import HostKey, Hosts, HostState, origin

if TYPE_CHECKING:
    from runner.settings import PolitenessSettings

__all__ = ["MAX_ROBOTS_BYTES", "RobotsCache"]

log = structlog.get_logger("headlock.politeness")

MAX_ROBOTS_BYTES = 500 * 1024
"""Longest robots.txt read; the rest is ignored, as Google does."""
MAX_REDIRECTS = 5
UNAVAILABLE_SECS = 1.0
"""How long an unreachable robots.txt is not asked again (its requests fail meanwhile, to be retried)."""


class _Entry:
    __slots__ = ("error", "expires_at", "fetching", "rules")

    def __init__(self) -> None:
        self.rules: Protego | None = None
        """None: no rules (allow all)."""
        self.error: str | None = None
        """Why robots.txt is unreachable now; None once known."""
        self.expires_at = 0.0
        """On `time.monotonic()`: a cache's own clock, cheaper than anyio's (looked up on every request)."""
        self.fetching: anyio.Event | None = None


class RobotsCache:
    """Per-host robots.txt verdicts, at most `max_hosts` hosts (least recently used forgotten)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, hosts: Hosts, settings: PolitenessSettings) -> None:
        self._transport = transport
        self._hosts = hosts
        self._agent = settings.user_agent
        self._timeout = settings.robots_timeout
        self._keep = settings.robots_cache_secs
        self._size = settings.max_hosts
        self._entries: OrderedDict[HostKey, _Entry] = OrderedDict()

    async def check(self, request: httpx.Request, host: HostState) -> None:
        """Return if robots.txt lets our User-Agent fetch `request`'s URL (fetching robots.txt first if needed).

        Raises:
            RobotsDisallowedError: the rules forbid it (a NoRetry: the request fails at once, unfetched).
            RobotsUnavailableError: robots.txt is unreachable now (5xx, 429, a timeout): retry later.
        """
        entry = self._entries.get(host.key)
        if entry is None or entry.expires_at <= monotonic():
            entry = await self._entry(host)
        else:
            self._entries.move_to_end(host.key)
        if entry.error is not None:
            raise RobotsUnavailableError(f"robots.txt of {origin(host.key)} unreachable ({entry.error}): retry later")
        if entry.rules is None:
            return
        url = str(request.url)
        if not entry.rules.can_fetch(url, self._agent):
            self._hosts.robots_disallowed += 1
            log.debug("politeness.robots_disallowed", url=url)
            raise RobotsDisallowedError(f"disallowed by robots.txt: {url}")

    async def _entry(self, host: HostState) -> _Entry:
        entries = self._entries
        entry = entries.get(host.key)
        if entry is None:
            entry = entries[host.key] = _Entry()
            while len(entries) > self._size:
                entries.popitem(last=False)
        else:
            entries.move_to_end(host.key)
        while entry.expires_at <= monotonic():
            if entry.fetching is not None:  # another request fetches it: wait for that one
                await entry.fetching.wait()
                continue
            entry.fetching = anyio.Event()
            try:
                await self._refresh(entry, host)
            finally:
                entry.fetching.set()
                entry.fetching = None
        return entry

    async def _refresh(self, entry: _Entry, host: HostState) -> None:
        """Fetch and parse robots.txt into `entry` (never raises but for cancellation)."""
        url = f"{origin(host.key)}/robots.txt"
        try:
            with anyio.fail_after(self._timeout):
                status, text = await self._fetch(httpx.URL(url))
        except TimeoutError:
            status, text = None, f"timed out after {self._timeout:g} s"
        except httpx.HTTPError as exc:
            status, text = None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        now = monotonic()
        if status is None or status >= 500 or status == 429:
            entry.rules = None
            entry.error = text if status is None else f"HTTP {status}"
            entry.expires_at = now + UNAVAILABLE_SECS
            log.warning("politeness.robots_unavailable", host=origin(host.key), error=entry.error)
            return
        entry.error = None
        entry.expires_at = now + self._keep
        entry.rules = Protego.parse(text) if 200 <= status < 300 else None
        delay = entry.rules.crawl_delay(self._agent) if entry.rules is not None else None
        if delay:
            self._hosts.set_crawl_delay(host, float(delay))
        log.info("politeness.robots_fetched", host=origin(host.key), status=status, crawl_delay_s=delay)

    async def _fetch(self, url: httpx.URL) -> tuple[int, str]:
        """(status, body text) of robots.txt at `url`, redirects followed; after too many, (404, "") (no rules)."""
        for _ in range(MAX_REDIRECTS + 1):
            request = httpx.Request("GET", url, headers={"User-Agent": self._agent, "Accept": "text/plain, */*;q=0.5"})
            response = await self._transport.handle_async_request(request)
            response.request = request
            try:
                if response.is_redirect and (location := response.headers.get("location")):
                    url = url.join(location)
                    continue
                if not 200 <= response.status_code < 300:
                    return response.status_code, ""
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_ROBOTS_BYTES:
                        break
                return response.status_code, bytes(body[:MAX_ROBOTS_BYTES]).decode("utf-8", errors="replace")
            finally:
                await response.aclose()
        return 404, ""
