"""`PoliteTransport`: the httpx transport around the configured engine that makes every request of the shared
client wait its host's turn (`Hosts`), obey robots.txt (`RobotsCache`) and teach the host's state its answers.

A request holds its host's slot until its response is closed (the body read, as `client.get` does; a streamed
response left open keeps its slot), not only until its headers came.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from time import perf_counter

import httpx

from runner.politeness.hosts import Hosts, HostState, host_key
from runner.politeness.robots import RobotsCache

__all__ = ["ROBOTS_EXTENSION", "PoliteTransport"]

ROBOTS_EXTENSION = "headlock.robots_txt"
"""A request extension: True asks for a robots.txt check of this request when `politeness.robots_txt` is unset
(`client.get(url, extensions={ROBOTS_EXTENSION: True})`; the ready crawl handler does)."""


class _Held(httpx.AsyncByteStream):
    """A response body whose close gives back its host's slot (once)."""

    __slots__ = ("_host", "_hosts", "_inner")

    def __init__(self, inner: httpx.AsyncByteStream, hosts: Hosts, host: HostState) -> None:
        self._inner = inner
        self._hosts = hosts
        self._host: HostState | None = host

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._inner.__aiter__()  # the engine's own iterator: no generator layer per chunk

    async def aclose(self) -> None:
        host, self._host = self._host, None
        try:
            await self._inner.aclose()
        finally:
            if host is not None:
                self._hosts.release(host)


class PoliteTransport(httpx.AsyncBaseTransport):
    """Per-host politeness around `inner` (see the module docstring).

    `robots`: None checks nothing; `robots_all` checks every request, else only those with `ROBOTS_EXTENSION`.

    Raises (from `handle_async_request`, besides the engine's errors):
        RobotsDisallowedError: robots.txt forbids the URL (it is not fetched).
        RobotsUnavailableError: robots.txt is unreachable now.
    """

    def __init__(
        self, inner: httpx.AsyncBaseTransport, hosts: Hosts, *, robots: RobotsCache | None, robots_all: bool = False
    ) -> None:
        self._inner = inner
        self.hosts = hosts
        self._robots = robots
        self._robots_all = robots_all

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        hosts = self.hosts
        host = hosts.get(host_key(request.url))
        robots = self._robots
        if robots is not None and (self._robots_all or request.extensions.get(ROBOTS_EXTENSION)):
            await robots.check(request, host)
        if not hosts.try_start(host):
            await hosts.wait_turn(host)
        epoch = host.epoch
        started = perf_counter()  # latency only: a duration, so the cheapest clock (anyio's looks up its backend)
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            hosts.release(host)
            raise
        status = response.status_code
        hosts.observe(
            host,
            status,
            epoch=epoch,
            latency=perf_counter() - started,
            retry_after=response.headers.get("retry-after") if status in (429, 503) else None,
        )
        if response.is_closed:  # read whole already (a transport that buffers): its close will not come to us
            hosts.release(host)
            return response
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)  # noqa: S101 - what an async transport returns
        response.stream = _Held(stream, hosts, host)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
