"""Benchmark: a throttled host does not slow the others. A 2-host crawl, one host limited to 1 request at a time
with a 100 ms delay, against the free host crawled alone, in the same run.

    python -m tests.bench.polite [--pages 3000] [--throttled-pages 60] [--concurrency 10] [--rounds 3] [--no-pin]
                                 [--transport httpx|aiohttp]

Two `tests.bench._site` processes (two ports: two hosts) run pinned to one core, this process to another. Each round
crawls, from a fresh embedded queue with `run()` and `handlers.crawl:handle` (robots.txt read: both answer 404):

- alone: the free host's `--pages` pages, with `politeness.per_host_concurrency = --concurrency` (so the only limit
  is the worker pool);
- mixed: both hosts' start pages, the free host as above and the throttled one with its own limits
  (`politeness.hosts."<origin>" = {per_host_concurrency = 1, per_host_delay = 0.1}`) and `--throttled-pages` pages,
  enough that it is still being crawled when the free host is done.

Ten workers by default: few enough that workers sitting on the throttled host's requests would show (with 50, the
pool hides most of it). The free host's rate is its pages over the time from its first page finished to its last
(recorded by a wrapper around the handler). The figure is `mixed_vs_alone`, the median over rounds of mixed rate /
alone rate (1.0: the throttled host costs the free one nothing), with the requests given back for the busy host
(`deferred`) and the throttled host's pages done while the free host was crawled.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio

from handlers import crawl
from runner import Context, JsonlDataset, SqliteQueue, WorkerSettings, run
from runner.settings import HostPoliteness, PolitenessSettings
from tests.bench._common import child_server, emit, machine, median, pin_to, quiet_logs

Transport = Literal["httpx", "aiohttp"]


async def timed_crawl(
    starts: list[str], *, concurrency: int, politeness: PolitenessSettings, transport: Transport
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Crawl from `starts`; return each host's page finish times (`time.perf_counter()`) and the last progress."""
    done: dict[str, list[float]] = {}
    progress: dict[str, Any] = {}

    async def handle(ctx: Context) -> None:
        await crawl.handle(ctx)
        done.setdefault(urlsplit(ctx.url).netloc, []).append(time.perf_counter())

    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-polite-"))
    queue = SqliteQueue.open(storage, "default")
    dataset = JsonlDataset.open(storage, "default")
    try:
        summary = await run(
            queue,
            handle,
            dataset,
            workers=WorkerSettings(concurrency=concurrency, http_transport=transport),
            options={"max_depth": 10_000},
            start_urls=starts,
            politeness=politeness,
            progress_every=0.5,
            progress_hook=progress.update,
        )
    finally:
        dataset.close()
        await queue.aclose()
    if summary.stats["failed"] or summary.stats["retried"]:
        raise RuntimeError(f"crawl had failures: {summary.as_dict()}")
    return done, progress


def rate(times: list[float]) -> float:
    """Pages per second from the first finish to the last."""
    return (len(times) - 1) / (max(times) - min(times))


async def bench(
    free: str, throttled: str, *, concurrency: int, rounds: int, transport: Transport
) -> dict[str, list[Any]]:
    """Alternate alone and mixed crawls `rounds` times; return the figures of each."""
    wide = PolitenessSettings(per_host_concurrency=concurrency)
    mixed = PolitenessSettings(
        per_host_concurrency=concurrency,
        hosts={throttled: HostPoliteness(per_host_concurrency=1, per_host_delay=0.1)},
    )
    free_host, throttled_host = urlsplit(free).netloc, urlsplit(throttled).netloc
    out: dict[str, list[Any]] = {"alone": [], "mixed": [], "ratio": [], "deferred": [], "throttled_done": []}
    for index in range(rounds * 2):
        kind = ("alone", "mixed", "mixed", "alone")[index % 4]
        if kind == "alone":
            done, _ = await timed_crawl(
                [f"{free}/page/0"], concurrency=concurrency, politeness=wide, transport=transport
            )
            out["alone"].append(round(rate(done[free_host]), 1))
            continue
        done, progress = await timed_crawl(
            [f"{throttled}/page/0", f"{free}/page/0"], concurrency=concurrency, politeness=mixed, transport=transport
        )
        free_times = done[free_host]
        out["mixed"].append(round(rate(free_times), 1))
        out["deferred"].append(progress.get("deferred"))
        out["throttled_done"].append(sum(1 for at in done.get(throttled_host, []) if at <= max(free_times)))
    pairs = zip(out["alone"], out["mixed"], strict=True)
    out["ratio"] = [round(m / a, 3) for a, m in pairs]
    return out


def main() -> None:
    """Run the benchmark and print its JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=3000, help="pages of the free host")
    parser.add_argument("--throttled-pages", type=int, default=60, help="pages of the throttled host")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true", help="do not pin the sites and this process to cores")
    parser.add_argument("--transport", choices=["httpx", "aiohttp"], default="aiohttp")
    args = parser.parse_args()
    quiet_logs()
    where = machine()
    pin = [] if args.no_pin else ["--cpu", "1"]
    free_args = ["-m", "tests.bench._site", "--pages", str(args.pages), *pin]
    throttled_args = ["-m", "tests.bench._site", "--pages", str(args.throttled_pages), *pin]
    with child_server(free_args) as free, child_server(throttled_args) as throttled:
        if not args.no_pin:
            pin_to(0)
        result = anyio.run(
            lambda: bench(
                free.url, throttled.url, concurrency=args.concurrency, rounds=args.rounds, transport=args.transport
            )
        )
    emit(
        {
            "benchmark": "polite/two_hosts",
            "pages": args.pages,
            "throttled_pages": args.throttled_pages,
            "throttled_limits": {"per_host_concurrency": 1, "per_host_delay": 0.1},
            "concurrency": args.concurrency,
            "http_transport": args.transport,
            "free_alone_pages_per_s": result["alone"],
            "free_mixed_pages_per_s": result["mixed"],
            "ratios": result["ratio"],
            "mixed_vs_alone": median(result["ratio"]),
            "deferred": result["deferred"],
            "throttled_pages_done_meanwhile": result["throttled_done"],
        },
        where,
    )


if __name__ == "__main__":
    main()
