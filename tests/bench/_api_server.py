"""`headlock serve` with server-side call counting, for the API budget benchmark.

    python -m tests.bench._api_server --storage DIR

Serves `runner.server.create_app(DIR)` on 127.0.0.1 like `headlock serve` (same listening socket, same uvicorn
settings) and prints `listening on URL` first. Every answered call is counted as `METHOD /path/template STATUS`
(e.g. `PUT /v2/request-queues/{queue_id}/requests/{request_id} 200`). `GET /_bench/calls` answers the counts as a
JSON object; `POST /_bench/reset` zeroes them. Neither is counted.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections import Counter
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from runner.server import create_app

try:  # the very socket `headlock serve` listens on, so the benchmark sees its TCP behaviour too
    from runner.server.app import _bind as bind_like_serve
except ImportError:  # pragma: no cover - renamed upstream: an equivalent plain listening socket

    def bind_like_serve(host: str, port: int) -> socket.socket:
        """A listening TCP socket on host:port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        return sock


class CountingApp:
    """Wraps the API app: counts every answered call by method, route template and status."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()

    def template(self, scope: Scope) -> str:
        """The route path that serves `scope` (method included in the match), else the raw path."""
        partial = None
        for route in self.app.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", scope["path"]))
            if match == Match.PARTIAL and partial is None:
                partial = str(getattr(route, "path", scope["path"]))
        return partial or scope["path"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/_bench/calls":
            await _json(send, dict(sorted(self.counts.items())))
            return
        if scope["path"] == "/_bench/reset":
            self.counts.clear()
            await _json(send, {})
            return
        status = 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.counts[f"{scope['method']} {self.template(scope)} {status}"] += 1


async def _json(send: Send, data: object) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="headlock serve, counting calls")
    parser.add_argument("--storage", type=Path, required=True)
    args = parser.parse_args()
    sock = bind_like_serve("127.0.0.1", 0)
    with sock:
        app = CountingApp(create_app(args.storage))
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", server_header=False)
        print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
