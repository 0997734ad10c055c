"""A real platform-events websocket server on 127.0.0.1 for tests, as the Apify platform runs one for each run.

    async with event_server() as server:
        # point ACTOR_EVENTS_WEBSOCKET_URL (or listen_events) at server.url, then:
        await server.wait_connected(1)
        await server.send("migrating", {"timeRemainingSecs": 30})

`send` and `send_raw` go to every client connected at that moment (none is queued for later clients). Needs the
asyncio backend.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import anyio
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["EventServer", "event_server"]

WAIT_TIMEOUT = 10.0


class EventServer:
    """The handle `event_server()` yields."""

    def __init__(self) -> None:
        self.url = ""
        """`ws://127.0.0.1:PORT`; any path and query are accepted."""
        self.connections = 0
        """Connections accepted so far, closed ones included."""
        self.hang_up = False
        """When true, each new connection is cut as soon as it is accepted (a server that accepts, then fails)."""
        self._open: set[ServerConnection] = set()
        self._changed = anyio.Event()

    async def send(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send the event `{"name", "data", "createdAt"}` to every connected client."""
        created = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        await self.send_raw(json.dumps({"name": name, "data": data, "createdAt": created}))

    async def send_raw(self, message: str | bytes) -> None:
        """Send `message` as is (a text frame for `str`, a binary frame for `bytes`) to every connected client."""
        for ws in list(self._open):
            with suppress(ConnectionClosed):  # a client leaving meanwhile
                await ws.send(message)

    async def wait_connected(self, n: int, within: float = WAIT_TIMEOUT) -> None:
        """Wait until `n` connections have been accepted in total and one is open.

        Raises:
            AssertionError: not within `within` seconds.
        """
        with anyio.move_on_after(within):
            while self.connections < n or not self._open:
                changed = self._changed
                await changed.wait()
            return
        raise AssertionError(f"{n} connections not seen within {within} s (saw {self.connections})")

    async def drop(self) -> None:
        """Cut every open connection abruptly (no closing handshake: the clients see code 1006)."""
        for ws in list(self._open):
            ws.transport.abort()

    async def close(self, code: int, reason: str = "") -> None:
        """Close every open connection with a closing handshake carrying `code` and `reason`."""
        async with anyio.create_task_group() as group:
            for ws in list(self._open):
                group.start_soon(ws.close, code, reason)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        if self.hang_up:
            ws.transport.abort()
            self._notify()
            return
        self._open.add(ws)
        self._notify()
        try:
            await ws.wait_closed()
        finally:
            self._open.discard(ws)
            self._notify()


@asynccontextmanager
async def event_server(port: int = 0) -> AsyncIterator[EventServer]:
    """Serve platform events on 127.0.0.1:`port` (0: an ephemeral port) until the block ends."""
    handle = EventServer()
    # A short close_timeout: leaving the block closes the clients' connections within a second.
    async with serve(handle._handle, "127.0.0.1", port, close_timeout=1) as server:
        sock_port = next(iter(server.sockets)).getsockname()[1]
        handle.url = f"ws://127.0.0.1:{sock_port}"
        yield handle
