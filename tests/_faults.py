"""A fault-injecting ASGI layer in front of the real `headlock serve` app, driven by rules a test sets.

Each rule matches a method and a path pattern and applies to its next `times` matching calls:
- `stall_before`: wait that long (or until `release` is set) before the server sees the call;
- `stall_after`: let the server apply the call, then wait that long before answering (a lost answer when the
  client gives up first);
- `answer`: answer this status (with `Retry-After` if given) without the server seeing the call;
- `error_after`: let the server apply the call, then answer 500 (applied, not acknowledged).
Every call is recorded (`calls`) with its arrival time, and `arrived(pattern)` is an event per pattern.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.server import create_app
from tests._server import serving_app


@dataclass
class Rule:
    """What to do to the next `times` calls matching `method` and `path` (a regex searched in the path)."""

    method: str
    path: str
    times: int = 1
    stall_before: float = 0.0
    stall_after: float = 0.0
    answer: int | None = None
    retry_after: str | None = None
    error_after: bool = False
    release: anyio.Event | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """True if this rule applies to the call (and has uses left)."""
        return self.hits < self.times and method == self.method and re.search(self.path, path) is not None


@dataclass
class Call:
    """One call as it arrived."""

    method: str
    path: str
    query: str
    at: float


@dataclass
class FaultPlan:
    """The rules and the record of calls, shared by the middleware and the test."""

    rules: list[Rule] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    closed: anyio.Event = field(default_factory=anyio.Event)
    """Set when the server stops: every stall ends then."""
    _waiters: list[tuple[str, str, anyio.Event]] = field(default_factory=list)

    def add(self, rule: Rule) -> Rule:
        """Add `rule` (checked before earlier ones)."""
        self.rules.insert(0, rule)
        return rule

    def arrived(self, method: str, path: str) -> anyio.Event:
        """An event set when the next call matching `method` and `path` arrives."""
        event = anyio.Event()
        self._waiters.append((method, path, event))
        return event

    def count(self, method: str, path: str) -> int:
        """How many calls matching `method` and `path` arrived so far."""
        return sum(1 for c in self.calls if c.method == method and re.search(path, c.path))

    def _record(self, method: str, path: str, query: str) -> Rule | None:
        self.calls.append(Call(method, path, query, anyio.current_time()))
        for waiter in list(self._waiters):
            if waiter[0] == method and re.search(waiter[1], path):
                self._waiters.remove(waiter)
                waiter[2].set()
        for rule in self.rules:
            if rule.matches(method, path):
                rule.hits += 1
                return rule
        return None


class _Faults:
    """The ASGI middleware applying a `FaultPlan`."""

    def __init__(self, app: ASGIApp, *, plan: FaultPlan) -> None:
        self.app = app
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.plan._record(scope["method"], scope["path"], scope.get("query_string", b"").decode())
        if rule is None:
            await self.app(scope, receive, send)
            return
        if rule.stall_before:
            await _stall(rule.stall_before, rule.release or self.plan.closed)
        if rule.answer is not None:
            await _answer(send, rule.answer, rule.retry_after)
            return
        if not (rule.stall_after or rule.error_after):
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)  # applied by the server; its answer is held back
        if rule.stall_after:
            await _stall(rule.stall_after, rule.release or self.plan.closed)
        if rule.error_after:
            await _answer(send, 500, None)
            return
        for message in held:
            await send(message)


async def _stall(seconds: float, release: anyio.Event) -> None:
    with anyio.move_on_after(seconds):
        await release.wait()


async def _answer(send: Send, status: int, retry_after: str | None) -> None:
    body = json.dumps({"error": {"type": "injected", "message": f"injected {status}"}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def faulty_server(storage: Path) -> AsyncIterator[tuple[str, FaultPlan]]:
    """`headlock serve`'s app over `storage` in this event loop, behind a fault plan; yields (base URL, plan)."""
    plan = FaultPlan()
    app = create_app(storage, middleware=[Middleware(_Faults, plan=plan)])
    async with serving_app(app) as url:
        try:
            yield url, plan
        finally:
            plan.closed.set()
