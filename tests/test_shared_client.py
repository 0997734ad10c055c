"""`runner.shared_client`: the handlers' client keeps and sends cookies and decodes text exactly as httpx's own does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest

from runner import PolitenessSettings, WorkerSettings
from runner.runtime import default_http_client
from runner.shared_client import HandlerClient, LeanCookies

pytestmark = pytest.mark.anyio

ANSWERS: dict[str, tuple[list[tuple[str, str]], bytes]] = {
    "/set": ([("Content-Type", "text/plain"), ("Set-Cookie", "session=abc; Path=/")], b"set"),
    "/set-again": ([("Content-Type", "text/plain"), ("Set-Cookie", "session=xyz; Path=/")], b"set"),
    "/latin": ([("Content-Type", "text/html; charset=iso-8859-1")], "café".encode("latin-1")),
    "/quoted": ([("Content-Type", 'text/html; charset="iso-8859-1"')], "café".encode("latin-1")),
    "/upper": ([("Content-Type", "TEXT/HTML;CHARSET=ISO-8859-1")], "café".encode("latin-1")),
    "/unknown": ([("Content-Type", "text/html; charset=no-such-codec")], "café".encode()),
    "/two-params": ([("Content-Type", "text/html; format=x; charset=iso-8859-1")], "café".encode("latin-1")),
    "/none": ([("Content-Type", "text/html")], "café".encode()),
}


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp runs on asyncio only."""
    return "asyncio"


@asynccontextmanager
async def site() -> AsyncIterator[str]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 answering `ANSWERS` by path; `/cookie` echoes the Cookie header."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def serve(client: anyio.abc.SocketStream) -> None:
        async with client:
            buffer = b""
            for _ in range(100):  # requests on one connection
                with anyio.move_on_after(5):
                    while b"\r\n\r\n" not in buffer:
                        try:
                            buffer += await client.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            return  # the client closed its connection
                if b"\r\n\r\n" not in buffer:
                    return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
                if path == "/cookie":
                    headers, body = [("Content-Type", "text/plain")], fields.get("cookie", "").encode()
                else:
                    headers, body = ANSWERS[path]
                text = "".join(f"{name}: {value}\r\n" for name, value in headers)
                await client.send(f"HTTP/1.1 200 OK\r\n{text}Content-Length: {len(body)}\r\n\r\n".encode() + body)

    async with listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        tg.start_soon(listener.serve, serve)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("engine", ["aiohttp", "httpx"])
@pytest.mark.parametrize("polite", [False, True])
async def test_the_shared_client_keeps_and_sends_cookies_as_httpx_does(engine: str, polite: bool) -> None:
    """A cookie a response sets is sent with later requests and replaced by a later one; a response without one
    changes nothing."""
    cfg = WorkerSettings(http_transport=engine)  # type: ignore[arg-type]
    politeness = PolitenessSettings() if polite else None
    async with site() as url, default_http_client(cfg, politeness) as client:
        assert isinstance(client, HandlerClient)
        assert isinstance(client.cookies, LeanCookies)
        with anyio.fail_after(10):
            assert (await client.get(f"{url}/cookie")).text == ""
            await client.get(f"{url}/set")
            assert (await client.get(f"{url}/cookie")).text == "session=abc"
            await client.get(f"{url}/none")  # no Set-Cookie: nothing changes
            assert (await client.get(f"{url}/cookie")).text == "session=abc"
            await client.get(f"{url}/set-again")
            assert (await client.get(f"{url}/cookie")).text == "session=xyz"
        assert dict(client.cookies) == {"session": "xyz"}
        client.cookies = {"other": "1"}  # set by hand, as on httpx's own client
        assert isinstance(client.cookies, LeanCookies)
        with anyio.fail_after(10):
            assert (await client.get(f"{url}/cookie")).text == "other=1"


@pytest.mark.parametrize("engine", ["aiohttp", "httpx"])
async def test_the_shared_client_decodes_every_content_type_as_httpx_does(engine: str) -> None:
    """Text and encoding of each answer equal plain httpx's: plain, quoted, upper-case, unknown and absent charsets."""
    cfg = WorkerSettings(http_transport=engine)  # type: ignore[arg-type]
    async with site() as url, default_http_client(cfg) as ours, httpx.AsyncClient() as plain:
        for path in ANSWERS:
            with anyio.fail_after(10):
                mine, theirs = await ours.get(url + path), await plain.get(url + path)
            assert (mine.encoding, mine.text) == (theirs.encoding, theirs.text), path
    assert theirs.text == "café"
