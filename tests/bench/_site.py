"""A fast local test site for the crawl benchmarks: the demo site's pages, precomputed, over raw asyncio sockets.

    python -m tests.bench._site --pages 5000 [--cpu 1]

Prints `listening on http://127.0.0.1:PORT` first, then serves HTTP/1.1 keep-alive (pipelining too) until SIGTERM.
Pages are `handlers.demo_site.page_html` (a 5-ary tree from /page/0), so every crawler sees the same links as in the
demos; `/page/N/` answers like `/page/N`. `--cpu` pins the process to one core where the OS allows it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from handlers.demo_site import page_html
from tests.bench._common import pin_to

_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found"


def responses(pages: int) -> dict[bytes, bytes]:
    """Every answer, whole, keyed by request path."""
    table: dict[bytes, bytes] = {}
    for i in range(pages):
        body = page_html(i, pages)
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n"
        answer = head.encode() + body
        table[f"/page/{i}".encode()] = answer
        table[f"/page/{i}/".encode()] = answer
    return table


class _Site(asyncio.Protocol):
    """One connection: answers each complete request head from the table (requests carry no body)."""

    def __init__(self, table: dict[bytes, bytes]) -> None:
        self._table = table
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        answers = []
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            line = self._buffer[: self._buffer.find(b"\r\n")]
            self._buffer = self._buffer[end + 4 :]
            parts = line.split(b" ")
            answers.append(self._table.get(parts[1], _NOT_FOUND) if len(parts) == 3 else _NOT_FOUND)
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))


async def serve(pages: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    table = responses(pages)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Site(table), "127.0.0.1", 0, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    """Parse the arguments, pin, serve."""
    parser = argparse.ArgumentParser(description="serve the benchmark site on 127.0.0.1")
    parser.add_argument("--pages", type=int, default=5000)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (modulo the usable ones)")
    args = parser.parse_args()
    if args.cpu is not None:
        pin_to(args.cpu)
    asyncio.run(serve(args.pages))


if __name__ == "__main__":
    main()
