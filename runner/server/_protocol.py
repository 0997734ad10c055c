"""The HTTP protocol `serve` runs uvicorn with: uvicorn's own (httptools when installed, else h11), each response
sent with one `send` system call instead of two.

uvicorn writes a response's status line and headers when the app starts the response, and the body when the app
sends it: two writes, each a `send` to the socket straight away (the socket has `TCP_NODELAY`) and a segment the
client must wake up for. On loopback, where a call costs the server a few hundred microseconds of CPU, that second
`send` is about a tenth of it. Here the connection's transport keeps what is written during one step of the event
loop and hands it on, joined, at the end of that step: the bytes and their order are the same, only fewer segments.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

__all__ = ["http_protocol"]


class _OneWritePerStep(asyncio.Transport):
    """A transport that passes on what is written in one step of the event loop with one write, at its end.

    Everything else goes to the real transport; closing it first writes what is held (an abort drops it, as the
    real transport drops its own buffer).
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


class _OneWriteMixin(asyncio.Protocol):
    """Gives the protocol (uvicorn's, after this class in the bases) a `_OneWritePerStep` transport."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        wrapped = _OneWritePerStep(cast("asyncio.Transport", transport), asyncio.get_running_loop())
        super().connection_made(wrapped)


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class as `http="auto"` picks it (httptools if installed, else h11), writing each
    event-loop step's output with one system call."""
    base: type[asyncio.Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: PLC0415 - needs httptools
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: PLC0415

        base = H11Protocol
    else:
        base = HttpToolsProtocol
    return type(f"OneWrite{base.__name__}", (_OneWriteMixin, base), {})
