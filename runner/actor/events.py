"""The Apify platform's events websocket, as a stream of `PlatformEvent`s.

On the platform a run gets `ACTOR_EVENTS_WEBSOCKET_URL` (deprecated: `APIFY_ACTOR_EVENTS_WS_URL`). The platform sends
JSON text messages `{"name": ..., "data": {...}, "createdAt": ...}` on it: `systemInfo` (resource usage, periodic),
`migrating` (`{"timeRemainingSecs": ...}`: the run moves to another server), `aborting` (a graceful abort: the
container is killed about 30 s later) and `persistState` (`{"isMigrating": ...}`; the SDKs mostly generate it
themselves). What to do about each is the runtime's business: this module only delivers them, in order.

The listener logs `actor.events.connected`, `actor.events.disconnected` (code, reason), `actor.events.connect_failed`,
`actor.events.malformed` (reason, bounded excerpt) and `actor.events.dropped`. It names the socket by scheme, host and
port only: the path and query may carry the run's credentials.

Needs the asyncio backend (the `websockets` library is asyncio-only).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.frames import CloseCode
from websockets.uri import parse_uri

from runner.backoff import Backoff
from runner.errors import ConfigError

__all__ = ["DROPPABLE", "EXCERPT", "PlatformEvent", "Reconnect", "listen_events", "socket_name"]

log = structlog.get_logger("headlock.actor.events")

DROPPABLE: Final = frozenset({"systemInfo", "cpuInfo"})
"""Periodic reports, each superseded by the next: dropped, not waited for, when the reader is behind."""

EXCERPT: Final = 200
"""How much of a malformed message (or a close reason) is logged, in characters."""

_CLOSE_GRACE: Final = 1.0
"""Seconds the closing handshake may take when the listener stops; then the TCP connection is cut."""

_REFUSED: Final = frozenset(
    {
        CloseCode.PROTOCOL_ERROR,
        CloseCode.UNSUPPORTED_DATA,
        CloseCode.INVALID_DATA,
        # The platform's answer to an unknown run id or too many connections for the run (apify-sdk-python).
        CloseCode.POLICY_VIOLATION,
        CloseCode.MANDATORY_EXTENSION,
    }
)
"""Close codes that reconnecting soon cannot fix: the next attempt waits the longest delay."""

_NETWORK_ERRORS: Final = (OSError, WebSocketException)
"""What a failed connect raises (refused, unreachable, timed out, TLS, a rejected handshake); TimeoutError is an
OSError. Anything else is a bug and propagates."""


@dataclass(frozen=True, slots=True)
class PlatformEvent:
    """One well-formed message of the platform: a non-empty `name` and a JSON-object `data` (`{}` when absent)."""

    name: str
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    created_at: str | None = None
    """The message's `createdAt` (ISO 8601) as sent, when it is a string."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How the listener reconnects: jittered delays doubling from `initial` to `maximum` seconds.

    The delays start over after a connection that stayed up `healthy_after` seconds, so a server that accepts and
    hangs up at once still meets growing delays. `open_timeout` bounds one connect (TCP, TLS and handshake).

    Raises:
        ConfigError: a delay that is not positive, or `maximum < initial`.
    """

    initial: float = 0.5
    maximum: float = 30.0
    healthy_after: float = 10.0
    open_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.maximum >= self.initial and self.open_timeout > 0):
            raise ConfigError(
                "events reconnect: initial and open_timeout must be > 0 and maximum >= initial, got "
                f"initial={self.initial}, maximum={self.maximum}, open_timeout={self.open_timeout}"
            )
        if self.healthy_after < 0:
            raise ConfigError(f"events reconnect: healthy_after must be >= 0, got {self.healthy_after}")


def socket_name(url: str) -> str:
    """`scheme://host:port` of a ws:// or wss:// URL: what may be logged of it (no credentials, path or query).

    Raises:
        ConfigError: not a valid ws:// or wss:// URL (the message does not repeat the URL: it may hold a token).
    """
    try:
        uri = parse_uri(url)
    except (InvalidURI, ValueError):  # ValueError: a port that is not a number in range
        # `from None`: the websockets error repeats the whole URL, query string included.
        raise ConfigError(
            "ACTOR_EVENTS_WEBSOCKET_URL: not a valid ws:// or wss:// URL with a host and no fragment"
        ) from None
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    return f"{'wss' if uri.secure else 'ws'}://{host}:{uri.port}"


async def listen_events(
    url: str,
    send: MemoryObjectSendStream[PlatformEvent],
    *,
    reconnect: Reconnect = Reconnect(),
    task_status: TaskStatus[bool] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Send each well-formed event of the platform's websocket at `url` to `send`, until cancelled.

    Reports started after the first connect attempt, successful or not (`True` if it connected), so a runtime that
    starts it with `await group.start(...)` waits at most `reconnect.open_timeout` on a dead socket. Closes `send`
    when it ends, on a bad `url` too. Returns early only when the reading side of `send` is closed (nobody listens).

    A malformed message is logged and skipped; the connection stays up. A failed connect or a dropped connection is
    logged and retried after a backoff delay (see `Reconnect`), never raised: a run must not die because its event
    socket hiccuped. Backpressure: `systemInfo` and `cpuInfo` are dropped when `send`'s buffer is full; any other
    event waits for room, holding back the socket (websockets buffers a few messages, then TCP pushes back).

    Connects directly, ignoring the `HTTP(S)_PROXY` variables: they are set for crawling, not for the platform.

    Raises:
        ConfigError: `url` is not a ws:// or wss:// URL.
    """
    backoff = Backoff(reconnect.initial, reconnect.maximum)
    delivery = _Delivery(send)
    started = False
    async with send:
        where = socket_name(url)
        while True:
            try:
                ws = await connect(url, proxy=None, open_timeout=reconnect.open_timeout, close_timeout=_CLOSE_GRACE)
            except _NETWORK_ERRORS as exc:
                refused = isinstance(exc, InvalidStatus) and 400 <= exc.response.status_code < 500
                delay = _longest(reconnect) if refused else backoff.next()
                error = _scrub(f"{type(exc).__name__}: {exc}", url)
                log.warning("actor.events.connect_failed", url=where, error=error, retry_in=round(delay, 2))
                if not started:
                    started = True
                    task_status.started(False)
            else:
                if not started:
                    started = True
                    task_status.started(True)
                delay, reader_gone = await _serve(ws, delivery, backoff, reconnect, where)
                if reader_gone:
                    log.info("actor.events.stopped", url=where, reason="the reader closed its stream")
                    return
            await anyio.sleep(delay)


async def _serve(
    ws: ClientConnection, delivery: _Delivery, backoff: Backoff, reconnect: Reconnect, where: str
) -> tuple[float, bool]:
    """Deliver `ws`'s events until it closes; return the delay before the next attempt and whether the reader left."""
    opened = anyio.current_time()
    log.info("actor.events.connected", url=where)
    try:
        reader_gone = await delivery.pump(ws)
    finally:
        # On cancellation too: a polite close, bounded, then the TCP connection is cut whatever happened.
        with anyio.move_on_after(_CLOSE_GRACE, shield=True):
            await ws.close()
        ws.transport.abort()
    if reader_gone:
        return 0.0, True
    if anyio.current_time() - opened >= reconnect.healthy_after:
        backoff.reset()
    code = ws.close_code
    delay = _longest(reconnect) if code in _REFUSED else backoff.next()
    log.warning(
        "actor.events.disconnected",
        url=where,
        code=code,
        reason=(ws.close_reason or "")[:EXCERPT],
        retry_in=round(delay, 2),
    )
    return delay, False


@dataclass(slots=True)
class _Delivery:
    """Parses messages and hands events to the reader; counts the periodic ones dropped because it lags."""

    send: MemoryObjectSendStream[PlatformEvent]
    dropped: int = 0

    async def pump(self, ws: ClientConnection) -> bool:
        """Deliver every message of `ws` until it closes; true if the reading side of `send` was closed."""
        try:
            async for message in ws:
                try:
                    event = _parse(message)
                except _MalformedError as exc:
                    excerpt = message[:EXCERPT] if isinstance(message, str) else repr(message[:EXCERPT])
                    log.warning("actor.events.malformed", reason=str(exc), excerpt=excerpt, size=len(message))
                    continue
                if event.name not in DROPPABLE:
                    await self.send.send(event)
                    continue
                try:
                    self.send.send_nowait(event)
                except anyio.WouldBlock:
                    self.dropped += 1
                    if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8...: the log stays short
                        log.warning("actor.events.dropped", name=event.name, dropped=self.dropped)
        except ConnectionClosed:
            pass  # a drop, not an error: the close code and reason are on `ws`
        except anyio.BrokenResourceError:
            return True
        return False


class _MalformedError(Exception):
    """A message that is not an event; the message says why."""


def _parse(message: str | bytes) -> PlatformEvent:
    """The event in one message.

    Raises:
        _MalformedError: the message is not UTF-8 JSON, not an object, has no non-empty string `name`, or a `data`
            that is neither an object nor null.
    """
    try:
        text = message.decode() if isinstance(message, bytes) else message
        body = json.loads(text)
    except UnicodeDecodeError:
        raise _MalformedError("not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise _MalformedError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _MalformedError(f"not a JSON object but {type(body).__name__}")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise _MalformedError("`name` is not a non-empty string")
    data = body.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise _MalformedError(f"`data` of {name!r} is not an object but {type(data).__name__}")
    created_at = body.get("createdAt")
    return PlatformEvent(
        name=name, data=MappingProxyType(data), created_at=created_at if isinstance(created_at, str) else None
    )


def _longest(reconnect: Reconnect) -> float:
    """The longest backoff delay, jittered as `Backoff`'s are."""
    return reconnect.maximum * random.uniform(0.5, 1.0)


def _scrub(text: str, url: str) -> str:
    """`text` without `url`'s path, query string or credentials (an error message may repeat them)."""
    parts = urlsplit(url)
    for secret in (parts.query, parts.path.strip("/"), parts.password, parts.username):
        if secret:
            text = text.replace(secret, "***")
    return text
