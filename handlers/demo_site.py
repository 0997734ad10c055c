"""A small local site to crawl: N linked pages on 127.0.0.1 (demos, tests and benchmarks).

    python -m handlers.demo_site --port 8765 --pages 500 --background

Run twice, the second start finds the first one's site on the port, says so and exits 0. It prints the serving
process's PID and how to stop it (`kill PID`); a background site also stops by itself after `--lifetime` seconds.

Page i links to its 5 children in a 5-ary tree (so every page is reachable from /page/0), back to the root, to
itself with a fragment and a trailing slash, and to an off-site and a mailto: address, which crawlers must skip.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["DEFAULT_PORT", "WHOAMI_PATH", "main", "page_html", "running_site", "serve_site"]

DEFAULT_PORT = 8765
"""The port `--background` takes unless told otherwise (config/local.toml's start URL points there)."""
WHOAMI_PATH = "/__demo_site__"
"""Answers `{"demo_site": true, "pid": ..., "pages": ...}`: how a second start knows the port holds a demo site."""


def page_html(i: int, pages: int) -> bytes:
    """The HTML of page `i` of a site of `pages` pages."""
    children = "".join(f'<a href="/page/{c}">child {c}</a> ' for c in range(5 * i + 1, 5 * i + 6) if c < pages)
    return (
        f"<html><head><title>Page {i}</title></head><body>{children}"
        f'<a href="/page/0">home</a> <a href="#top">top</a> <a href="/page/{i}/">self</a>'
        f'<a href="http://elsewhere.invalid/x">away</a> <a href="mailto:a@b.c">mail</a></body></html>'
    ).encode()


def _handler(pages: int) -> type[BaseHTTPRequestHandler]:
    class Site(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            content_type = "text/html; charset=utf-8"
            if len(parts) == 2 and parts[0] == "page" and parts[1].isdigit() and int(parts[1]) < pages:
                body, status = page_html(int(parts[1]), pages), 200
            elif self.path == WHOAMI_PATH:
                body, status = json.dumps({"demo_site": True, "pid": os.getpid(), "pages": pages}).encode(), 200
                content_type = "application/json"
            else:
                body, status = b"not found", 404
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

    return Site


@contextmanager
def serve_site(pages: int, port: int = 0) -> Iterator[str]:
    """Serve the site from a background thread; yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(pages))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def running_site(port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """What the demo site on 127.0.0.1:`port` says about itself (`pid`, `pages`), or None if no demo site answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{WHOAMI_PATH}", timeout=timeout) as answer:
            about = json.loads(answer.read())
    except (OSError, ValueError):
        return None
    return about if isinstance(about, dict) and about.get("demo_site") is True else None


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the site in the foreground, or (`--background`) in a child process that lives `--lifetime` seconds.

    A demo site already on the port is left running (exit 0): so the command can be run twice. Anything else on
    the port is one line on stderr (exit 1).
    """
    parser = argparse.ArgumentParser(description="serve the demo site on 127.0.0.1")
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    parser.add_argument("--background", action="store_true", help="return once listening; serve from a child")
    parser.add_argument("--lifetime", type=float, default=900, help="seconds a background site lives (default 900)")
    args = parser.parse_args(argv)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(args.pages))
    except OSError as exc:
        return _port_taken(args.port, args.pages, exc)
    url = f"http://127.0.0.1:{server.server_address[1]}/page/0"
    if not args.background:
        print(f"demo site: {url} ({args.pages} pages), pid {os.getpid()}; stop it with Ctrl-C", flush=True)  # noqa: T201
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
        server.server_close()
        return 0
    sys.stdout.flush()
    child = os.fork()
    if child:
        # The socket is bound and listening already: a crawl started next cannot race the child.
        server.socket.close()
        minutes = f"{args.lifetime / 60:g} min" if args.lifetime >= 60 else f"{args.lifetime:g} s"
        print(  # noqa: T201
            f"demo site: {url} ({args.pages} pages), pid {child}, for {minutes}; stop it with: kill {child}",
            flush=True,
        )
        return 0
    os.setsid()
    _detach_stdio()  # a caller reading our output (a pipe) sees its end when the parent exits
    threading.Timer(args.lifetime, server.shutdown).start()
    server.serve_forever()
    server.server_close()
    os._exit(0)


def _port_taken(port: int, pages: int, exc: OSError) -> int:
    """Say what holds `port`: a demo site (exit 0, it goes on serving) or something else (exit 1)."""
    if exc.errno != errno.EADDRINUSE:
        print(f"demo site: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", file=sys.stderr)  # noqa: T201
        return 1
    about = running_site(port)
    if about is None:
        print(  # noqa: T201
            f"demo site: port {port} on 127.0.0.1 is taken by something else (not a demo site); stop it or pick"
            " another port with --port",
            file=sys.stderr,
        )
        return 1
    pid, running = about.get("pid"), about.get("pages")
    other = f"; you asked for {pages}: stop it first to change that" if running != pages else ""
    print(  # noqa: T201
        f"demo site: already running at http://127.0.0.1:{port}/page/0 ({running} pages{other}), pid {pid};"
        f" stop it with: kill {pid}",
        flush=True,
    )
    return 0


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


if __name__ == "__main__":
    raise SystemExit(main())
