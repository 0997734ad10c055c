"""headlock's side of the peer benchmark (`tests.bench.peers`): one crawl, one JSON line.

    python -m tests.bench._peer_headlock --url URL/page/0 [--concurrency 50] [--crawler headlock|headlock-httpx|bare]

Runs in headlock's venv, from the repository root:

- `headlock`: `runner.run()` with default `WorkerSettings(concurrency=N)` (so the default HTTP engine) and
  `PolitenessSettings(per_host_concurrency=N)` (one host, every worker on it, as Scrapy is configured) on a fresh
  embedded SQLite queue and JSONL dataset in a temporary directory; the handler GETs with `ctx.http`, pushes one item
  per page with `ctx.push_data` and enqueues the page's links with `ctx.enqueue` (headlock dedups by unique key);
- `headlock-httpx`: the same with `WorkerSettings(http_transport="httpx")`;
- `bare`: N worker tasks on one memory stream, a set for dedup and a list for the items, on the client
  `runner.runtime.default_http_client(WorkerSettings(concurrency=N))` builds (the engine `headlock` uses).

`--gc-threshold N` sets headlock's `WorkerSettings.gc_threshold` (default its own, 5,000), and runs the bare loop
under the same `runner.gcpolicy.young_threshold(N)` (default: Python's collector as it is). `gc_collections` counts
the collector's runs of each generation during the crawl.

Links come from one regex, the same function as in `_peer_crawlee.py` and `_peer_scrapy.py`. `seconds` and `cpu_s`
cover the crawl alone (`run()`, or the bare task group); imports (the aiohttp engine's too, which headlock imports
when it first builds its client) and opening the queue and dataset are setup.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from runner import Context, JsonlDataset, PolitenessSettings, SqliteQueue, WorkerSettings, run
from runner.gcpolicy import young_threshold
from runner.runtime import default_http_client
from tests.bench._common import quiet_logs

LINK = re.compile(r'href="([^"]+)"')
TITLE = re.compile(r"<title>([^<]*)</title>")


def page_links(html: str, base: str) -> list[str]:
    """Same-host http(s) links of `html` against `base`, each once, without fragment or trailing `/`.

    The same function is in each crawler of the benchmark (`_peer_crawlee.py`, `_peer_scrapy.py`).
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


def collections() -> list[int]:
    """The collector's runs so far, by generation."""
    return [generation["collections"] for generation in gc.get_stats()]


def record(tally: Tally, seconds: float, cpu: float, **extra: Any) -> dict[str, Any]:
    """The JSON line a crawl prints."""
    return {
        "pages": tally.fetched,
        "seconds": seconds,
        "cpu_s": cpu,
        "unique": len(tally.urls),
        "not_ok": tally.not_ok,
        **extra,
        "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def handler(tally: Tally) -> Callable[[Context], Awaitable[None]]:
    """The crawl's handler, counting into `tally`."""

    async def handle(ctx: Context) -> None:
        response = await ctx.http.get(ctx.url)
        tally.saw(ctx.url, response.status_code)
        html = response.text
        await ctx.push_data({"url": ctx.url, "title": title_of(html)})
        links = page_links(html, str(response.url))
        if links:
            await ctx.enqueue(links)

    return handle


async def headlock_crawl(start: str, workers: WorkerSettings) -> dict[str, Any]:
    """Crawl with `run()` on a fresh embedded queue and JSONL dataset; return the record."""
    tally = Tally()
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-peers-"))
    try:
        queue = SqliteQueue.open(storage, "default")
        dataset = JsonlDataset.open(storage, "default")
        try:
            runs, started, cpu_started = collections(), time.perf_counter(), time.process_time()
            # One host, as for Scrapy (CONCURRENT_REQUESTS_PER_DOMAIN = N): every worker may be on it at once.
            polite = PolitenessSettings(per_host_concurrency=workers.concurrency)
            summary = await run(queue, handler(tally), dataset, workers=workers, politeness=polite, start_urls=[start])
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            runs = [after - before for after, before in zip(collections(), runs, strict=True)]
        finally:
            dataset.close()
            await queue.aclose()
        items = len(dataset.path.read_bytes().splitlines())
        return record(
            tally,
            seconds,
            cpu,
            items=items,
            failed=summary.stats["failed"],
            retried=summary.stats["retried"],
            http_transport=workers.http_transport,
            gc_collections=runs,
        )
    finally:
        shutil.rmtree(storage, ignore_errors=True)


async def bare_crawl(start: str, workers: WorkerSettings, gc_threshold: int = 0) -> dict[str, Any]:
    """Breadth-first crawl with worker tasks, a memory stream, a set and a list; return the record."""
    tally = Tally()
    client = default_http_client(workers)
    send, receive = anyio.create_memory_object_stream[str](math.inf)
    seen = {start}
    items: list[dict[str, Any]] = []
    outstanding = 1
    send.send_nowait(start)

    async def worker(urls: MemoryObjectReceiveStream[str]) -> None:
        nonlocal outstanding
        async with urls:
            async for url in urls:
                response = await client.get(url)
                tally.saw(url, response.status_code)
                html = response.text
                items.append({"url": url, "title": title_of(html)})
                for link in page_links(html, str(response.url)):
                    if link not in seen:
                        seen.add(link)
                        outstanding += 1
                        send.send_nowait(link)
                outstanding -= 1
                if outstanding == 0:
                    send.close()

    try:
        runs, started, cpu_started = collections(), time.perf_counter(), time.process_time()
        with young_threshold(gc_threshold):
            async with anyio.create_task_group() as tg:
                for _ in range(workers.concurrency):
                    tg.start_soon(worker, receive.clone())
                receive.close()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        runs = [after - before for after, before in zip(collections(), runs, strict=True)]
    finally:
        await client.aclose()
    return record(tally, seconds, cpu, items=len(items), http_transport=workers.http_transport, gc_collections=runs)


def main() -> None:
    """Parse the arguments, crawl, print the record."""
    parser = argparse.ArgumentParser(description="headlock's crawls for tests.bench.peers")
    parser.add_argument("--url", required=True, help="the start URL")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--crawler", choices=["headlock", "headlock-httpx", "bare"], default="headlock")
    parser.add_argument("--gc-threshold", type=int, default=None, help="the collector's youngest threshold")
    args = parser.parse_args()
    quiet_logs()
    tuned = {} if args.gc_threshold is None else {"gc_threshold": args.gc_threshold}
    if args.crawler == "headlock-httpx":
        workers = WorkerSettings(concurrency=args.concurrency, http_transport="httpx", **tuned)
    else:
        workers = WorkerSettings(concurrency=args.concurrency, **tuned)
    if workers.http_transport == "aiohttp":
        # Imports are not timed for any crawler; the client headlock builds imports its engine when it is first made.
        importlib.import_module("httpx_aiohttp")
    if args.crawler == "bare":
        crawled = anyio.run(bare_crawl, args.url, workers, args.gc_threshold or 0)
    else:
        crawled = anyio.run(headlock_crawl, args.url, workers)
    print(json.dumps(crawled), flush=True)


if __name__ == "__main__":
    main()
