"""`runner.http.AiohttpEngine`: aiohttp's failures come out as httpx errors that tell unsent from maybe-applied."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest

from runner.http import AiohttpEngine

pytestmark = pytest.mark.anyio

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp runs on asyncio only."""
    return "asyncio"


@asynccontextmanager
async def hang_up_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server on 127.0.0.1 that reads each request's head and closes the connection without an answer; yields its
    URL and the request heads it read."""
    heads: list[bytes] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def serve(client: anyio.abc.SocketStream) -> None:
        async with client:
            data = b""
            with anyio.move_on_after(5):
                while b"\r\n\r\n" not in data:
                    data += await client.receive()
            heads.append(data.split(b"\r\n", 1)[0])

    async with listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        tg.start_soon(listener.serve, serve)
        yield f"http://127.0.0.1:{port}", heads
        tg.cancel_scope.cancel()


async def test_a_connection_closed_after_the_request_is_a_read_error_not_connect() -> None:
    """The server read the request and hung up: maybe applied, so `ReadError` (httpx-aiohttp alone says
    `ConnectTimeout`, which a retrying caller reads as "never sent")."""
    async with hang_up_server() as (url, heads), httpx.AsyncClient(transport=AiohttpEngine(LIMITS)) as client:
        with anyio.fail_after(10), pytest.raises(httpx.ReadError, match="ServerDisconnectedError"):
            await client.post(f"{url}/write", content=b"{}")
    assert heads == [b"POST /write HTTP/1.1"]


async def test_a_refused_connection_is_a_connect_error() -> None:
    """Nothing listens: nothing was sent, `ConnectError`."""
    async with hang_up_server() as (url, _):
        pass  # closed: its port refuses now
    async with httpx.AsyncClient(transport=AiohttpEngine(LIMITS)) as client:
        with anyio.fail_after(10), pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/")


@pytest.mark.parametrize(("resend", "sent"), [(True, 2), (False, 1)])
async def test_an_idempotent_request_is_sent_again_unasked_only_when_allowed(resend: bool, sent: int) -> None:
    """aiohttp resends a GET whose connection closed unanswered; `resend_on_stale=False` (the API client's) sends
    it once, so the caller knows of the lost answer."""
    engine = AiohttpEngine(LIMITS, resend_on_stale=resend)
    async with hang_up_server() as (url, heads), httpx.AsyncClient(transport=engine) as client:
        with anyio.fail_after(10), pytest.raises(httpx.ReadError):
            await client.get(f"{url}/x")
    assert heads == [b"GET /x HTTP/1.1"] * sent
