"""A fault-injecting HTTP/1.1 proxy for tests, in front of a real server on 127.0.0.1.

Every request is forwarded to the upstream server and its answer passed back, unless a rule matching it says
otherwise: answer it without forwarding (`Respond`), forward it and then close the connection without answering
(`ForwardThenDrop`: applied, never acknowledged), forward it and never answer (`Stall`: the client's timeout ends
it), or forward it and answer with a changed JSON body (`Rewrite`). Every request is recorded in `seen` with the
time it arrived (`anyio.current_time()`, the clock `ApiQueue` uses), so tests can measure when retries came.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import httpx
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["FaultProxy", "ForwardThenDrop", "Respond", "Rewrite", "Seen", "Stall", "fault_proxy"]

MAX_HEAD = 64 * 1024
# Headers that belong to one hop, not passed on: the proxy's own client and its answers set their own framing.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})
# The proxy's client has already decoded the upstream's answer it passes back.
_DECODED = frozenset({*_HOP, "content-encoding"})


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer without forwarding: the server never sees the request."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    """A JSON body, or None for none."""


@dataclass(frozen=True, slots=True)
class ForwardThenDrop:
    """Forward the request, wait for the server's answer, then close the client's connection without answering."""


@dataclass(frozen=True, slots=True)
class Stall:
    """Forward the request (or not), then never answer: the client's own timeout ends the attempt."""

    forward: bool = True


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Forward the request and answer with `change(answer's JSON body)` instead, status and headers unchanged."""

    change: Callable[[Any], Any]


Action = Respond | ForwardThenDrop | Stall | Rewrite


@dataclass(slots=True)
class _Rule:
    method: str
    path: re.Pattern[str]
    action: Action
    times: int | None

    def take(self, method: str, path: str) -> bool:
        """Whether this rule applies to the request, using up one of its `times` if so."""
        if method != self.method or not self.path.search(path) or self.times == 0:
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the proxy read."""

    method: str
    path: str
    query: str
    at: float
    """`anyio.current_time()` when the request had arrived in full."""
    fault: str | None
    """The name of the action applied to it, None when it was passed through."""


class FaultProxy:
    """The proxy's rules and records; `url` is what clients use instead of the upstream's."""

    def __init__(self, url: str, upstream: httpx.AsyncClient) -> None:
        self.url = url
        self.seen: list[Seen] = []
        self._rules: list[_Rule] = []
        self._upstream = upstream

    def add(self, method: str, path: str, action: Action, *, times: int | None = 1) -> None:
        """Apply `action` to the next `times` requests (None: every one) whose path matches the regex `path`."""
        self._rules.append(_Rule(method, re.compile(path), action, times))

    def calls(self, method: str, path: str) -> list[Seen]:
        """The requests seen so far with this method whose path matches the regex `path`."""
        pattern = re.compile(path)
        return [s for s in self.seen if s.method == method and pattern.search(s.path)]

    def _action(self, method: str, path: str) -> Action | None:
        for rule in self._rules:
            if rule.take(method, path):
                return rule.action
        return None

    async def serve(self, client: anyio.abc.SocketStream) -> None:
        """Handle one client connection: its requests one after another (keep-alive) until it closes."""
        async with client:
            reader = BufferedByteReceiveStream(client)
            while True:
                try:
                    head = await reader.receive_until(b"\r\n\r\n", MAX_HEAD)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                request = _parse_head(head)
                length = int(request.headers.get("content-length", "0"))
                request.body = await reader.receive_exactly(length) if length else b""
                path, _, query = request.target.partition("?")
                action = self._action(request.method, path)
                self.seen.append(
                    Seen(request.method, path, query, anyio.current_time(), type(action).__name__ if action else None)
                )
                if not await self._answer(client, action, request):
                    return

    async def _answer(self, client: anyio.abc.SocketStream, action: Action | None, request: _Request) -> bool:
        """Apply `action` to one request; return whether the connection stays open."""
        if isinstance(action, Respond):
            content = b"" if action.body is None else json.dumps(action.body).encode()
            extra = {"content-type": "application/json"} if action.body is not None else {}
            return await _send(client, _response(action.status, {**extra, **action.headers}, content))
        if isinstance(action, Stall) and not action.forward:
            await anyio.sleep_forever()
        forwarded = {k: v for k, v in request.headers.items() if k not in _HOP}
        upstream = await self._upstream.request(request.method, request.target, headers=forwarded, content=request.body)
        if isinstance(action, ForwardThenDrop):
            return False
        if isinstance(action, Stall):
            await anyio.sleep_forever()
        content = upstream.content
        if isinstance(action, Rewrite):
            content = json.dumps(action.change(upstream.json())).encode()
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _DECODED}
        return await _send(client, _response(upstream.status_code, kept, content))


async def _send(client: anyio.abc.SocketStream, data: bytes) -> bool:
    """Send an answer; return False when the client has gone (its timeout closed the connection)."""
    try:
        await client.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        return False
    return True


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes = b""


def _parse_head(head: bytes) -> _Request:
    """The request a head (without the blank line) starts."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        raise NotImplementedError("the test proxy reads Content-Length bodies only")
    return _Request(method, target, headers)


def _response(status: int, headers: Mapping[str, str], content: bytes) -> bytes:
    reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items())]
    if status not in (204, 304):
        lines.append(f"content-length: {len(content)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content


@asynccontextmanager
async def fault_proxy(upstream: str) -> AsyncIterator[FaultProxy]:
    """Run a proxy to the server at `upstream` (a base URL) on 127.0.0.1 for the duration of the block."""
    async with (
        httpx.AsyncClient(base_url=upstream, timeout=30) as client,
        await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener,
        anyio.create_task_group() as group,
    ):
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - anyio's typed attribute, not Django's
        proxy = FaultProxy(f"http://127.0.0.1:{port}", client)
        group.start_soon(listener.serve, proxy.serve, group)
        try:
            yield proxy
        finally:
            group.cancel_scope.cancel()
