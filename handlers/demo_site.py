"""A small local site to crawl: N linked pages on 127.0.0.1 (demos, tests and benchmarks).

    python -m handlers.demo_site --port 8765 --pages 500 --background

Page i links to its 5 children in a 5-ary tree (so every page is reachable from /page/0), back to the root, to
itself with a fragment and a trailing slash, and to an off-site and a mailto: address, which crawlers must skip.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["page_html", "serve_site"]


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
            if len(parts) == 2 and parts[0] == "page" and parts[1].isdigit() and int(parts[1]) < pages:
                body, status = page_html(int(parts[1]), pages), 200
            else:
                body, status = b"not found", 404
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
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


def main() -> None:
    """Serve the site in the foreground, or (`--background`) in a child process that lives `--lifetime` seconds."""
    parser = argparse.ArgumentParser(description="serve the demo site on 127.0.0.1")
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--background", action="store_true", help="return once listening; serve from a child")
    parser.add_argument("--lifetime", type=float, default=900, help="seconds a background site lives")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(args.pages))
    print(f"demo site: http://127.0.0.1:{server.server_address[1]}/page/0 ({args.pages} pages)", flush=True)  # noqa: T201
    if args.background:
        if os.fork():
            return  # the socket is bound and listening already: a crawl started next cannot race it
        os.setsid()
        threading.Timer(args.lifetime, server.shutdown).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
