"""Benchmark 2: crawl speed. headlock against a bare anyio + httpx crawl of the same local site, in the same run.

    python -m tests.bench.crawl [--pages 5000] [--concurrency 50] [--rounds 5] [--no-pin]
                                [--transport httpx|aiohttp] [--baseline-transport httpx|aiohttp]

The site (`tests.bench._site`, precomputed pages over raw asyncio sockets) runs in a child process pinned to one
core; this process is pinned to another. Each round crawls the whole site twice, headlock and the baseline in
alternating order (ABBA), each from a fresh start:

- headlock: `run()` with `handlers.crawl:handle`, the embedded store, `max_depth` deep enough for every page, as
  many requests in flight to the site as workers (`politeness.per_host_concurrency`; robots.txt read once);
- baseline: 50 worker tasks on one memory stream, a set of normalized URLs for dedup, selectolax for title and links.

Both use the client `runner.runtime.default_http_client` builds for that concurrency (the output names its
transport), with aiohttp's engine (the default `workers.http_transport`) unless `--transport httpx` says otherwise;
the baseline uses the same one unless `--baseline-transport` names another. pages/s is timed
around the crawl loop; the target is headlock/baseline >= 0.8 on the medians, with the same transport on both
sides (the ratio within each round is printed too: it is less sensitive to load that changes between rounds). Each
run also records this process's CPU time per page (all threads, SQLite's included): with both crawlers bound by
one core, the CPU ratio says where the gap comes from and varies less than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit, urlunsplit

import anyio
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream
from selectolax.lexbor import LexborHTMLParser

from handlers import crawl
from runner import JsonlDataset, PolitenessSettings, SqliteQueue, WorkerSettings, normalize_url, run
from runner.runtime import default_http_client
from tests.bench._common import child_server, cpu_seconds, emit, machine, median, peak_rss_mb, pin_to, quiet_logs

TARGET = 0.8
Transport = Literal["httpx", "aiohttp"]


def client_description(client: httpx.AsyncClient, cfg: WorkerSettings) -> dict[str, Any]:
    """Which client and transport a crawl uses, and its pool size."""
    transport = getattr(client, "_transport", None)
    return {
        "client": f"{type(client).__module__}.{type(client).__name__}",
        "transport": f"{type(transport).__module__}.{type(transport).__name__}",
        "httpx": version("httpx"),
        "httpcore": version("httpcore"),
        "sniffio_installed": _installed("sniffio"),
        "built_by": f"runner.runtime.default_http_client(WorkerSettings(concurrency={cfg.concurrency}))",
    }


def _installed(name: str) -> bool:
    try:
        version(name)
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or metadata unreadable: either way, not usable
        return False
    return True


async def headlock_crawl(
    start: str, *, concurrency: int, max_depth: int, transport: Transport = "httpx"
) -> tuple[int, float, float]:
    """Crawl with `run()` and `handlers.crawl:handle` on a fresh embedded queue; return (pages, seconds, CPU s)."""
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-crawl-"))
    queue = SqliteQueue.open(storage, "default")
    dataset = JsonlDataset.open(storage, "default")
    try:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        summary = await run(
            queue,
            crawl.handle,
            dataset,
            workers=WorkerSettings(concurrency=concurrency, http_transport=transport),
            politeness=PolitenessSettings(per_host_concurrency=concurrency),  # one host: as the baseline's
            options={"max_depth": max_depth},
            start_urls=[start],
        )
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    finally:
        dataset.close()
        await queue.aclose()
    if summary.stats["failed"] or summary.stats["retried"]:
        raise RuntimeError(f"headlock crawl had failures: {summary.as_dict()}")
    return int(summary.stats["handled"]), elapsed, cpu


def _links(html: LexborHTMLParser, base: str) -> list[str]:
    """Same-host http(s) links without fragments, as `handlers.crawl` extracts them."""
    host = urlsplit(base).hostname
    links = []
    for node in html.css("a[href]"):
        href = node.attributes.get("href")
        if not href:
            continue
        parts = urlsplit(urljoin(base, href.strip()))
        if parts.scheme not in {"http", "https"} or parts.hostname != host:
            continue
        links.append(urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, "")))
    return links


async def bare_crawl(
    start: str, *, concurrency: int, max_depth: int, client: httpx.AsyncClient
) -> tuple[int, float, float]:
    """Breadth-first crawl with worker tasks, a memory stream and a set; return (pages, seconds, CPU s)."""
    send, receive = anyio.create_memory_object_stream[tuple[str, int]](math.inf)
    seen = {normalize_url(start)}
    results: list[dict[str, Any]] = []
    outstanding = 1
    send.send_nowait((start, 0))

    async def worker(pages: MemoryObjectReceiveStream[tuple[str, int]]) -> None:
        nonlocal outstanding
        async with pages:
            async for url, depth in pages:
                response = await client.get(url)
                html = LexborHTMLParser(response.text) if "html" in response.headers.get("content-type", "") else None
                title = html.css_first("title") if html is not None else None
                results.append(
                    {
                        "url": url,
                        "status": response.status_code,
                        "title": title.text(strip=True) if title is not None else None,
                        "depth": depth,
                    }
                )
                if html is not None and depth < max_depth:
                    for link in _links(html, str(response.url)):
                        key = normalize_url(link)
                        if key not in seen:
                            seen.add(key)
                            outstanding += 1
                            send.send_nowait((link, depth + 1))
                outstanding -= 1
                if outstanding == 0:
                    send.close()

    started, cpu_started = time.perf_counter(), cpu_seconds()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker, receive.clone())
        receive.close()
    return len(results), time.perf_counter() - started, cpu_seconds() - cpu_started


async def bench(
    site: str, *, pages: int, concurrency: int, rounds: int, transport: Transport, baseline_transport: Transport
) -> dict[str, Any]:
    """Alternate the two crawls `rounds` times each (ABBA order); return every run."""
    start = f"{site}/page/0"
    max_depth = pages  # deeper than any page of the tree
    cfg = WorkerSettings(concurrency=concurrency, http_transport=baseline_transport)
    runs: dict[str, list[tuple[int, float, float]]] = {"headlock": [], "baseline": []}
    described: dict[str, Any] = {}
    for index in range(rounds * 2):
        kind = ("headlock", "baseline", "baseline", "headlock")[index % 4]
        if kind == "headlock":
            runs[kind].append(
                await headlock_crawl(start, concurrency=concurrency, max_depth=max_depth, transport=transport)
            )
            continue
        client = default_http_client(cfg)
        described = client_description(client, cfg)
        try:
            runs[kind].append(await bare_crawl(start, concurrency=concurrency, max_depth=max_depth, client=client))
        finally:
            await client.aclose()
    for kind, results in runs.items():
        if any(count != pages for count, _, _ in results):
            raise RuntimeError(f"{kind} crawled {[c for c, _, _ in results]} pages, expected {pages}")
    return {"runs": runs, "client": described}


def main() -> None:
    """Start the site, run the rounds, print one line per crawler and one with the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each crawler")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the site and this process to cores")
    parser.add_argument("--transport", choices=["httpx", "aiohttp"], default="aiohttp", help="headlock's HTTP engine")
    parser.add_argument("--baseline-transport", choices=["httpx", "aiohttp"], help="default: the same as headlock's")
    args = parser.parse_args()
    quiet_logs()
    where = machine()  # before pinning, which hides the other cores
    site_args = ["-m", "tests.bench._site", "--pages", str(args.pages)]
    if not args.no_pin:
        site_args += ["--cpu", "1"]
    with child_server(site_args) as site:
        client_cpu = None if args.no_pin else pin_to(0)
        result = anyio.run(
            lambda: bench(
                site.url,
                pages=args.pages,
                concurrency=args.concurrency,
                rounds=args.rounds,
                transport=args.transport,
                baseline_transport=args.baseline_transport or args.transport,
            )
        )
    rates: dict[str, float] = {}
    cpu_per_page: dict[str, float] = {}
    for kind, results in result["runs"].items():
        per_run = [round(count / seconds, 1) for count, seconds, _ in results]
        cpu_runs = [round(cpu / count * 1000, 3) for count, _, cpu in results]
        rates[kind] = median(per_run)
        cpu_per_page[kind] = median(cpu_runs)
        emit(
            {
                "benchmark": f"crawl/{kind}",
                "pages": args.pages,
                "concurrency": args.concurrency,
                "runs": len(per_run),
                "pages_per_s_median": round(rates[kind], 1),
                "pages_per_s_runs": per_run,
                "seconds_runs": [round(seconds, 2) for _, seconds, _ in results],
                "cpu_ms_per_page_median": cpu_per_page[kind],
                "cpu_ms_per_page_runs": cpu_runs,
                "http_transport": args.transport if kind == "headlock" else args.baseline_transport or args.transport,
                "http": result["client"],
            },
            where,
        )
    ratio = rates["headlock"] / rates["baseline"]
    # Run r of each crawler shares round r (ABBA), so these ratios cancel drift between rounds.
    pairs = [
        round((h_count / h_secs) / (b_count / b_secs), 3)
        for (h_count, h_secs, _), (b_count, b_secs, _) in zip(
            result["runs"]["headlock"], result["runs"]["baseline"], strict=True
        )
    ]
    emit(
        {
            "benchmark": "crawl/compare",
            "headlock_vs_baseline": round(ratio, 3),
            "per_round_ratios": pairs,
            "per_round_ratio_median": round(median(pairs), 3),
            "baseline_vs_headlock_cpu_per_page": round(cpu_per_page["baseline"] / cpu_per_page["headlock"], 3),
            "target": f">= {TARGET}",
            "target_met": ratio >= TARGET,
            "peak_rss_mb_bench_process": peak_rss_mb(),
            "site_peak_rss_mb": site.peak_rss_mb,
            "pinned": None if args.no_pin else {"bench_process_cpu": client_cpu, "site_cpu": "1 (modulo usable)"},
        },
        where,
    )


if __name__ == "__main__":
    main()
