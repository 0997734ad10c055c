"""Scrapy's side of the peer benchmark (`tests.bench.peers`): one crawl, one JSON line.

    PEERS_VENV/bin/python -I tests/bench/_peer_scrapy.py --url URL/page/0 [--concurrency 50]

Runs in the peers' venv: it imports only the standard library and Scrapy. A Spider with Scrapy's defaults (its
asyncio reactor, the default scheduler and dupefilter, cookies, retries) except the benchmark's: `CONCURRENT_REQUESTS`
and `CONCURRENT_REQUESTS_PER_DOMAIN` = N, no robots.txt, no download delay, no AutoThrottle, no telnet console,
`LOG_LEVEL="ERROR"`. `parse` finds links with one regex, yields a `Request` per link (the dupefilter drops the seen
ones) and one dict per page; the items go to a feed export, a JSONL file in a temporary directory (as headlock's
dataset does), and are counted from it after the crawl. `seconds` and `cpu_s` run from the `spider_opened` signal to
`spider_closed`, so the process's setup (settings, reactor, middlewares) is not timed.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import scrapy
from scrapy import signals
from scrapy.crawler import CrawlerProcess
from scrapy.http import Response

LINK = re.compile(r'href="([^"]+)"')
TITLE = re.compile(r"<title>([^<]*)</title>")


def page_links(html: str, base: str) -> list[str]:
    """Same-host http(s) links of `html` against `base`, each once, without fragment or trailing `/`.

    The same function is in each crawler of the benchmark (`_peer_headlock.py`, `_peer_crawlee.py`). Dropping the
    trailing `/` matters most here: Scrapy's fingerprint keeps it, so `/page/N/` would be fetched as a second page.
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
    """What the spider saw (every response; a retry counts again), and when the crawl ran."""

    fetched: int = 0
    urls: set[str] = field(default_factory=set)
    not_ok: int = 0
    started: float = 0.0
    cpu_started: float = 0.0
    seconds: float = 0.0
    cpu: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def saw(self, url: str, status: int) -> None:
        """Count one fetch of `url`."""
        self.fetched += 1
        self.urls.add(url)
        self.not_ok += status != 200

    def start_clock(self) -> None:
        """At `spider_opened`."""
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def stop_clock(self) -> None:
        """At `spider_closed`."""
        self.seconds = time.perf_counter() - self.started
        self.cpu = time.process_time() - self.cpu_started


class PeerSpider(scrapy.Spider):
    """Follow the site's links from the start URL, one item per page."""

    name = "peers"

    def __init__(self, start: str, tally: Tally, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_url = start
        self.tally = tally

    async def start(self) -> AsyncIterator[Any]:
        """The start URL, through the dupefilter (`start_urls` would skip it: its links back would fetch it again)."""
        yield scrapy.Request(self.start_url, callback=self.parse)

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> PeerSpider:
        """Connect the clock to the open and close signals."""
        spider: PeerSpider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.on_opened, signal=signals.spider_opened)
        crawler.signals.connect(spider.on_closed, signal=signals.spider_closed)
        return spider

    def on_opened(self) -> None:
        """The crawl starts: so does the clock."""
        self.tally.start_clock()

    def on_closed(self, reason: str) -> None:
        """The crawl is over: stop the clock, keep the stats (Scrapy's own counters) and why it closed."""
        self.tally.stop_clock()
        self.tally.stats = {**self.crawler.stats.get_stats(), "finish_reason": reason}

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        """One item, then a request per link."""
        html = response.text
        self.tally.saw(response.request.url if response.request else response.url, response.status)
        yield {"url": response.url, "title": title_of(html)}
        for link in page_links(html, response.url):
            yield scrapy.Request(link, callback=self.parse)


def crawl(start: str, *, concurrency: int) -> dict[str, Any]:
    """Crawl from `start` in this process's reactor; return the record."""
    tally = Tally()
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-scrapy-"))
    feed = storage / "items.jsonl"
    try:
        process = CrawlerProcess(
            settings={
                "CONCURRENT_REQUESTS": concurrency,
                "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
                "ROBOTSTXT_OBEY": False,
                "LOG_LEVEL": "ERROR",
                "DOWNLOAD_DELAY": 0,
                "AUTOTHROTTLE_ENABLED": False,
                "TELNETCONSOLE_ENABLED": False,
                "FEEDS": {feed.as_uri(): {"format": "jsonlines"}},
            }
        )
        crawler = process.create_crawler(PeerSpider)
        process.crawl(crawler, start=start, tally=tally)
        process.start()
        stats = tally.stats
        items = len(feed.read_bytes().splitlines()) if feed.exists() else 0
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return {
        "pages": tally.fetched,
        "seconds": tally.seconds,
        "cpu_s": tally.cpu,
        "unique": len(tally.urls),
        "not_ok": tally.not_ok,
        "items": items,
        "failed": stats.get("log_count/ERROR", 0),
        "retried": stats.get("retry/count", 0),
        "finish_reason": stats.get("finish_reason"),
        "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    """Parse the arguments, crawl, print the record."""
    parser = argparse.ArgumentParser(description="Scrapy's crawl for tests.bench.peers")
    parser.add_argument("--url", required=True, help="the start URL")
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(crawl(args.url, concurrency=args.concurrency)), flush=True)


if __name__ == "__main__":
    main()
