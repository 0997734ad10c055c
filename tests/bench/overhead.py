"""Benchmark 1: runtime overhead. 20,000 requests, a no-op handler, concurrency 50, embedded store.

    python -m tests.bench.overhead [--requests 20000] [--concurrency 50]

Prints handled/s (timed around run(), after the queue is filled) and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import anyio

from runner import Context, Dataset, RequestDraft, SqliteQueue, WorkerSettings, run


async def noop(ctx: Context) -> None:
    """Do nothing."""


async def fill(queue: SqliteQueue, count: int) -> None:
    """Add `count` requests in batches of 25."""
    for start in range(0, count, 25):
        drafts = [
            RequestDraft(unique_key=f"k{i}", url=f"https://bench.example/{i}")
            for i in range(start, min(start + 25, count))
        ]
        await queue.batch_add(drafts, client_key="filler")


async def main(requests: int, concurrency: int) -> dict[str, object]:
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-"))
    queue = SqliteQueue.open(storage, "default")
    await fill(queue, requests)
    dataset = Dataset.open(storage, "default")
    started = time.perf_counter()
    summary = await run(queue, noop, dataset, workers=WorkerSettings(concurrency=concurrency), progress_every=3600)
    elapsed = time.perf_counter() - started
    await queue.aclose()
    return {
        "benchmark": "overhead/embedded",
        "requests": requests,
        "handled": summary.stats["handled"],
        "seconds": round(elapsed, 2),
        "handled_per_s": round(summary.stats["handled"] / elapsed),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
    }


if __name__ == "__main__":
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(anyio.run(main, args.requests, args.concurrency)))
