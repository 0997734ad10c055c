"""A local multi-host test site that records, per host, what a polite crawler must be judged by.

Each host is its own port on 127.0.0.1, served in process (anyio TCP listeners in the test's task group, minimal
HTTP/1.1 with keep-alive). `/page/0` links to every page of its host, other pages to nothing new; `/robots.txt` is
404 unless the host's `robots` says otherwise. Per host the site records every request's arrival time, path and
User-Agent, and the number in flight at every moment (its maximum), so a test asserts on the server's view.

    async with open_site({"a": HostSpec(pages=20), "b": HostSpec(pages=20)}) as site:
        site.url("a")                 # http://127.0.0.1:<port>
        site.log("a").max_in_flight
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import SocketStream

Reply = tuple[int, dict[str, str], bytes]
"""(status, headers, body)."""


@dataclass
class HostLog:
    """What one host saw."""

    in_flight: int = 0
    max_in_flight: int = 0
    hits: list[tuple[float, str, str]] = field(default_factory=list)
    """(arrival on `anyio.current_time()`, path, User-Agent), in order."""
    changed: anyio.Event = field(default_factory=anyio.Event)

    def starts(self, *, pages_only: bool = True) -> list[float]:
        """Arrival times of the requests (without robots.txt by default)."""
        return [at for at, path, _ in self.hits if not pages_only or path != "/robots.txt"]

    def paths(self) -> list[str]:
        """Paths requested, in order."""
        return [path for _, path, _ in self.hits]

    def min_gap(self) -> float:
        """The least time between two consecutive page request arrivals (inf with fewer than two)."""
        starts = self.starts()
        return min((b - a for a, b in itertools.pairwise(starts)), default=float("inf"))

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait (no polling) until `condition()` holds, checked at each request's arrival."""
        while not condition():
            await self.changed.wait()

    def _changed(self) -> None:
        changed, self.changed = self.changed, anyio.Event()
        changed.set()


@dataclass
class HostSpec:
    """How one host behaves."""

    pages: int = 10
    latency: float = 0.0
    """Seconds each page answer takes."""
    robots: Reply | None = None
    """The robots.txt answer; None: 404."""
    respond: Callable[[str, HostLog], Reply | None] | None = None
    """A say on each page request before the default answer: a reply, or None for the default page."""


class Site:
    """The running site: URLs and logs by host name."""

    def __init__(self, specs: Mapping[str, HostSpec]) -> None:
        self.specs = dict(specs)
        self.ports: dict[str, int] = {}
        self.logs = {name: HostLog() for name in specs}

    def url(self, name: str) -> str:
        """The origin of host `name`."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def log(self, name: str) -> HostLog:
        """What host `name` saw."""
        return self.logs[name]

    def page_urls(self, name: str) -> list[str]:
        """Every page URL of host `name`."""
        return [f"{self.url(name)}/page/{i}" for i in range(self.specs[name].pages)]

    async def _serve(self, name: str, stream: SocketStream) -> None:
        spec, log = self.specs[name], self.logs[name]
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = await stream.receive(65536)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                status, extra, body = await self._answer(spec, log, path, headers.get("user-agent", ""))
                reply = [
                    f"HTTP/1.1 {status} X",
                    f"Content-Length: {len(body)}",
                    *(f"{k}: {v}" for k, v in extra.items()),
                ]
                try:
                    await stream.send(("\r\n".join(reply) + "\r\n\r\n").encode() + body)
                except (anyio.BrokenResourceError, OSError):
                    return
                finally:
                    log.in_flight -= 1

    async def _answer(self, spec: HostSpec, log: HostLog, path: str, agent: str) -> Reply:
        log.hits.append((anyio.current_time(), path, agent))
        log.in_flight += 1
        log.max_in_flight = max(log.max_in_flight, log.in_flight)
        log._changed()
        if path == "/robots.txt":
            return spec.robots or (404, {}, b"not found")
        if spec.latency:
            await anyio.sleep(spec.latency)
        if spec.respond is not None and (reply := spec.respond(path, log)) is not None:
            return reply
        number = int(path.rsplit("/", 1)[-1]) if path.startswith("/page/") else -1
        if not 0 <= number < spec.pages:
            return 404, {}, b"no such page"
        links = "".join(f'<a href="/page/{i}">p{i}</a>' for i in range(1, spec.pages)) if number == 0 else ""
        html = f"<html><head><title>page {number}</title></head><body>{links}</body></html>"
        return 200, {"Content-Type": "text/html"}, html.encode()


@contextlib.asynccontextmanager
async def open_site(specs: Mapping[str, HostSpec]) -> AsyncIterator[Site]:
    """Serve `specs` (one port each) while the block runs."""
    site = Site(specs)
    async with anyio.create_task_group() as tg:
        for name in specs:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            site.ports[name] = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - anyio, not Django

            async def handle(stream: SocketStream, name: str = name) -> None:
                await site._serve(name, stream)

            async def serve(listener: anyio.abc.SocketListener = listener, handle: Any = handle) -> None:
                async with listener:
                    await listener.serve(handle)

            tg.start_soon(serve)
        try:
            yield site
        finally:
            tg.cancel_scope.cancel()
