"""The HTTP engines behind every `httpx.AsyncClient` headlock makes: httpx's own transport, or aiohttp's through
httpx-aiohttp (the default: about twice the speed, see the README's Performance section).

httpx-aiohttp maps aiohttp's errors onto httpx's, but not in a way a caller that retries can trust: a connection
the server closed after the request was sent (`ServerDisconnectedError`, a reset) comes out as `ConnectTimeout`,
which says "never sent"; an error it does not know (a malformed answer, a total timeout) comes out raw, not as an
`httpx.TransportError`. `AiohttpEngine` fixes both: `ConnectError`/`ConnectTimeout` only when aiohttp failed to
connect (or to get a connection in time), `ReadError` for every other failure, whatever the library said.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions

from runner.shared_client import plain_charset

__all__ = ["AiohttpEngine", "Engine", "transport_for"]

Engine = Literal["httpx", "aiohttp"]

_FOREIGN = (aiohttp.ClientError, OSError, TimeoutError)
"""What aiohttp may raise that httpx-aiohttp lets through unmapped."""


def transport_for(
    engine: Engine, limits: httpx.Limits, *, resend_on_stale: bool = True
) -> httpx.AsyncBaseTransport | None:
    """The transport of `engine` with `limits`; None for httpx's own (the client builds it from its limits)."""
    return AiohttpEngine(limits, resend_on_stale=resend_on_stale) if engine == "aiohttp" else None


def _mapped(exc: BaseException, request: httpx.Request | None) -> httpx.TransportError:
    """The httpx error for a failure of aiohttp's, telling unsent (connect) from maybe-applied (everything else)."""
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
    if isinstance(cause, aiohttp.ClientProxyConnectionError) and isinstance(exc, httpx.ProxyError):
        return exc
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(cause), request=request)
    if isinstance(cause, aiohttp.ConnectionTimeoutError):  # connecting, or waiting for a pooled connection
        return httpx.ConnectTimeout(str(cause) or "timed out connecting", request=request)
    if isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return exc  # a read timeout, a payload error, an unsupported URL: mapped right
    text = str(cause) if cause is not None else str(exc)
    return httpx.ReadError(f"{type(cause or exc).__name__}: {text}" if text else type(cause or exc).__name__)


class _Body(httpx.AsyncByteStream):
    """A response body from aiohttp whose read errors are mapped as `_mapped` does."""

    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner = inner
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except (httpx.TransportError, *_FOREIGN) as exc:
            raise _mapped(exc, self._request) from exc

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        except (httpx.TransportError, *_FOREIGN) as exc:
            raise _mapped(exc, self._request) from exc


class AiohttpEngine(httpx.AsyncBaseTransport):
    """httpx-aiohttp's transport with its errors mapped (see the module docstring).

    aiohttp sends an idempotent request (GET, PUT, DELETE) again, unasked, when a kept-alive connection turns out
    closed after it was sent: right for a handler's page, wrong for a client that must know an attempt may have
    been applied (the queue API's delete-lock answered 403 after a lost answer is done, not refused).
    `resend_on_stale=False` turns that off.
    """

    def __init__(self, limits: httpx.Limits, *, resend_on_stale: bool = True) -> None:
        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                ssl=self._inner.ssl_context,  # made once, by the transport (about 25 ms each)
                limit=limits.max_connections or 0,  # 0: no limit
                keepalive_timeout=limits.keepalive_expiry,  # None: no expiry, as for httpx
            )
            client = aiohttp.ClientSession(connector=connector)
            if not resend_on_stale:
                # No public switch (aiohttp 3.14): the attribute its request loop reads, checked by the API tests.
                client._retry_connection = False
            return client

        self._inner = AiohttpTransport(limits=limits, client=session)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except (httpx.TransportError, *_FOREIGN) as exc:
            error = _mapped(exc, request)
            if error is exc:
                raise
            raise error from exc
        assert isinstance(response.stream, httpx.AsyncByteStream)  # noqa: S101 - what the transport returns
        response.stream = _Body(response.stream, request)
        plain_charset(response)
        return response

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str],
        content: bytes | None,
        timeouts: httpx.Timeout,
    ) -> httpx.Response:
        """One request sent straight on this engine's aiohttp session, its whole body read: what an
        `httpx.AsyncClient` on this transport would answer (same session, same error mapping, body decoded by httpx
        from `Content-Encoding`), without building an `httpx.Request` or passing the client's layers (URL merging,
        auth, cookies, redirects, event hooks). For a caller that uses none of them (the API client); the response
        has no `request`, and redirects are not followed.

        Raises:
            httpx.TransportError: as `handle_async_request` maps them.
        """
        inner = self._inner
        if not isinstance(inner.client, aiohttp.ClientSession):
            inner.client = inner.get_client()
        try:
            with map_aiohttp_exceptions():
                async with inner.client.request(
                    method,
                    url,
                    params=params,
                    headers=headers,
                    data=content,
                    allow_redirects=False,
                    auto_decompress=False,
                    compress=False,
                    timeout=aiohttp.ClientTimeout(
                        sock_connect=timeouts.connect, sock_read=timeouts.read, connect=timeouts.pool
                    ),
                ) as answer:
                    body = await answer.read()
        except (httpx.TransportError, *_FOREIGN) as exc:
            error = _mapped(exc, None)
            if error is exc:
                raise
            raise error from exc
        return httpx.Response(answer.status, headers=answer.raw_headers, content=body)

    async def aclose(self) -> None:
        await self._inner.aclose()
