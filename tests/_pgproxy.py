"""A TCP proxy in front of a PostgreSQL server that can lose an answer: armed, it forwards the client's next
`COMMIT` to the server and then cuts both connections before the server's reply gets back, so the transaction is
applied but never acknowledged (the fault a worker sees when the network breaks at the worst moment).

It parses nothing but the frontend's simple-query messages (`Q`, what psycopg sends for BEGIN/COMMIT); every other
byte passes through unread. TLS is not spoken: point it at a Unix socket or a plain TCP port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc

__all__ = ["PgProxy", "pg_proxy"]

_COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"
"""The simple-query message `COMMIT` (its length, 11, counts itself and the text with its NUL)."""


@dataclass(eq=False)
class PgProxy:
    """Where to connect (`host`, `port`), and the switch that makes the next COMMIT's answer get lost."""

    host: str
    port: int
    drops: int = 0
    """Answers lost so far."""
    _armed: int = field(default=0, repr=False)

    def lose_next_commit_answer(self, times: int = 1) -> None:
        """Lose the answer of the next `times` COMMITs (each on whichever connection sends it)."""
        self._armed += times

    async def serve(self, client: anyio.abc.SocketStream, upstream_path: str) -> None:
        async with client, await anyio.connect_unix(upstream_path) as server, anyio.create_task_group() as tg:

            async def down() -> None:
                try:
                    async for chunk in server:
                        await client.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(down)
            try:
                async for chunk in client:
                    await server.send(chunk)
                    if self._armed and _COMMIT in chunk:
                        self._armed -= 1
                        self.drops += 1
                        # Let the server read it (it commits), then cut both sides before any reply is relayed.
                        tg.cancel_scope.cancel()
                        return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                pass
            tg.cancel_scope.cancel()


@asynccontextmanager
async def pg_proxy(socket_dir: str, port: int = 5432) -> AsyncIterator[PgProxy]:
    """A proxy on 127.0.0.1 (a free port) to the server listening on `socket_dir`'s Unix socket for `port`."""
    upstream = f"{socket_dir}/.s.PGSQL.{port}"
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        address = listener.extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610 - anyio, not Django
        proxy = PgProxy(host=str(address[0]), port=int(address[1]))

        async def serve(client: anyio.abc.SocketStream) -> None:
            await proxy.serve(client, upstream)

        tg.start_soon(listener.serve, serve)
        yield proxy
        tg.cancel_scope.cancel()
