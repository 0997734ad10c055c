"""crawlee-python's side of the peer benchmark (`tests.bench.peers`): one crawl, one JSON line.

    PEERS_VENV/bin/python -I tests/bench/_peer_crawlee.py --url URL/page/0 [--concurrency 50] [--storage memory|fs]

Runs in the peers' venv: it imports only the standard library and crawlee. An `HttpCrawler` with crawlee's default
HTTP client (impit) and fixed concurrency finds links with one regex, enqueues them with `context.add_requests`
(crawlee dedups by unique key) and stores one item per page with `context.push_data`. `--storage memory` uses
`MemoryStorageClient`; `fs` leaves crawlee's default (`FileSystemStorageClient`, under `CRAWLEE_STORAGE_DIR`, which
the driver points at a temporary directory). `seconds` and `cpu_s` cover `await crawler.run(...)` alone (crawlee
opens its storages and starts its event manager and autoscaled pool inside it); building the crawler is setup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import resource
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

from crawlee import ConcurrencySettings
from crawlee.crawlers import HttpCrawler, HttpCrawlingContext
from crawlee.storage_clients import MemoryStorageClient

LINK = re.compile(r'href="([^"]+)"')
TITLE = re.compile(r"<title>([^<]*)</title>")


def page_links(html: str, base: str) -> list[str]:
    """Same-host http(s) links of `html` against `base`, each once, without fragment or trailing `/`.

    The same function is in each crawler of the benchmark (`_peer_headlock.py`, `_peer_scrapy.py`).
    """
    host = urlsplit(base).hostname
    links: dict[str, None] = {}
    for href in LINK.findall(html):
        parts = urlsplit(urljoin(base, href))
        if parts.scheme not in {"http", "https"} or parts.hostname != host:
            continue
        path = parts.path[:-1] if len(parts.path) > 1 and parts.path.endswith("/") else parts.path
        links[urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))] = None
    return list(links)


def title_of(html: str) -> str | None:
    """The text of `<title>`, if any."""
    found = TITLE.search(html)
    return found.group(1).strip() if found else None


@dataclass(slots=True)
class Tally:
    """What the handler saw: every fetch (a retry counts again), the distinct URLs, the non-200 answers."""

    fetched: int = 0
    urls: set[str] = field(default_factory=set)
    not_ok: int = 0

    def saw(self, url: str, status: int) -> None:
        """Count one fetch of `url`."""
        self.fetched += 1
        self.urls.add(url)
        self.not_ok += status != 200


async def crawl(start: str, *, concurrency: int, storage: str) -> dict[str, object]:
    """Crawl from `start`; return the JSON record (pages, seconds, CPU seconds, items, ...)."""
    tally = Tally()
    crawler = HttpCrawler(
        concurrency_settings=ConcurrencySettings(
            min_concurrency=concurrency, max_concurrency=concurrency, desired_concurrency=concurrency
        ),
        storage_client=MemoryStorageClient() if storage == "memory" else None,
    )

    @crawler.router.default_handler
    async def handle(context: HttpCrawlingContext) -> None:
        html = (await context.http_response.read()).decode()
        tally.saw(context.request.url, context.http_response.status_code)
        await context.push_data({"url": context.request.url, "title": title_of(html)})
        links = page_links(html, context.request.loaded_url or context.request.url)
        if links:
            await context.add_requests(links)

    started, cpu_started = time.perf_counter(), time.process_time()
    stats = await crawler.run([start])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    data = await crawler.get_data(limit=1)
    return {
        "pages": tally.fetched,
        "seconds": seconds,
        "cpu_s": cpu,
        "unique": len(tally.urls),
        "not_ok": tally.not_ok,
        "items": data.total,
        "failed": stats.requests_failed,
        "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    """Parse the arguments, crawl, print the record."""
    parser = argparse.ArgumentParser(description="crawlee-python's crawl for tests.bench.peers")
    parser.add_argument("--url", required=True, help="the start URL")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--storage", choices=["memory", "fs"], default="memory")
    args = parser.parse_args()
    # A root handler at WARNING first: crawlee then leaves logging as it is (its status lines would cost time), as
    # the other crawlers run with their info logs off.
    logging.basicConfig(level=logging.WARNING)
    record = asyncio.run(crawl(args.url, concurrency=args.concurrency, storage=args.storage))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
