"""A local test site on 127.0.0.1: N linked pages, served from a thread (tests) or a process (benchmarks)."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def page_html(i: int, pages: int) -> bytes:
    """Page i links to its 5 children in a 5-ary tree, back to the root, to itself with a fragment, and off-site."""
    children = "".join(f'<a href="/page/{c}">child {c}</a> ' for c in range(5 * i + 1, 5 * i + 6) if c < pages)
    return (
        f"<html><head><title>Page {i}</title></head><body>{children}"
        f'<a href="/page/0">home</a> <a href="#top">top</a> <a href="/page/{i}/">self</a>'
        f'<a href="http://elsewhere.invalid/x">away</a> <a href="mailto:a@b.c">mail</a></body></html>'
    ).encode()


def make_handler(pages: int) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving `pages` pages under /page/<i>."""

    class Site(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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

        def log_message(self, *args: object) -> None:
            pass

    return Site


@contextmanager
def serve_site(pages: int) -> Iterator[str]:
    """Serve the site from a background thread; yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(pages))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="serve the test site")
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.pages))
    print(f"http://127.0.0.1:{srv.server_address[1]}", flush=True)  # noqa: T201
    srv.serve_forever()
