"""Benchmark 4: queue size. 1,000,000 requests in the embedded store against 1,000.

    python -m tests.bench.scale [--requests 1000000] [--small 1000] [--lock-calls 500] [--rss-requests 1000]

1. enqueue: `--requests` requests through the public `batch_add` (25 per call, one call at a time), with the rate
   of each tenth; then, as a floor, the same rows bulk-inserted with raw SQL into another queue file (headlock has
   no bulk API) and read back through the store to check them;
2. lock-head latency: `--lock-calls` timed `lock_head(limit=25)` calls on the small and on the big queue, each
   followed by an untimed `unlock_requests`, so the head stays full; p50/p99/mean;
3. RSS: `run()` with a no-op handler over the first `--rss-requests` requests (`workers.max_requests`), in a fresh
   process for each queue so each peak RSS is its own; RSS must not grow with the queue's size.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from runner import Context, JsonlDataset, RequestDraft, SqliteQueue, WorkerSettings, request_id_for, run
from runner.queue.sqlite import queue_path
from tests.bench._common import (
    current_rss_mb,
    emit,
    peak_rss_mb,
    percentile,
    quiet_logs,
    run_child_json,
)

RSS_GROWTH_LIMIT_MB = 5.0
"""The largest peak-RSS difference between the big and the small queue still read as "does not grow"."""


async def noop(ctx: Context) -> None:
    """Do nothing."""


def _draft(i: int) -> RequestDraft:
    return RequestDraft(unique_key=f"k{i}", url=f"https://scale.example/{i}")


async def enqueue_api(queue: SqliteQueue, count: int) -> dict[str, Any]:
    """Add `count` requests, 25 per `batch_add`, one call at a time; rates per tenth."""
    tenth = max(25, count // 10 // 25 * 25)
    segments: list[float] = []
    started = segment_started = time.perf_counter()
    for start in range(0, count, 25):
        await queue.batch_add([_draft(i) for i in range(start, min(start + 25, count))], client_key="filler")
        done = min(start + 25, count)
        if done % tenth == 0 or done == count:
            now = time.perf_counter()
            segments.append(round((done - len(segments) * tenth) / (now - segment_started)))
            segment_started = now
    elapsed = time.perf_counter() - started
    return {
        "requests": count,
        "calls": -(-count // 25),
        "seconds": round(elapsed, 1),
        "requests_per_s": round(count / elapsed),
        "requests_per_s_by_tenth": segments,
    }


def enqueue_bulk(path: Path, template: dict[str, Any], count: int) -> dict[str, Any]:
    """Insert `count` rows shaped like the store's (same `data` JSON) with raw SQL in one transaction."""
    started = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=NORMAL")
        position = time.time_ns() // 1000 - 1  # in the past, so the head range [-now, now] covers it
        db.execute("BEGIN IMMEDIATE")
        for start in range(0, count, 10_000):
            rows = []
            for i in range(start, min(start + 10_000, count)):
                key = f"k{i}"
                data = {**template, "id": request_id_for(key), "uniqueKey": key, "url": f"https://scale.example/{i}"}
                rows.append((data["id"], position, json.dumps(data, ensure_ascii=False)))
            db.executemany("INSERT OR IGNORE INTO requests (id, order_no, data) VALUES (?, ?, ?)", rows)
        db.execute(
            "UPDATE queue SET total = total + ?, modified_at = max(modified_at, ?), accessed_at = max(accessed_at, ?)",
            (count, position, position),
        )
        db.execute("COMMIT")
    finally:
        db.close()
    elapsed = time.perf_counter() - started
    return {"requests": count, "seconds": round(elapsed, 1), "requests_per_s": round(count / elapsed)}


def stored_template(path: Path) -> dict[str, Any]:
    """The `data` JSON of one stored request, as the store writes it."""
    db = sqlite3.connect(path)
    try:
        template: dict[str, Any] = json.loads(db.execute("SELECT data FROM requests LIMIT 1").fetchone()[0])
    finally:
        db.close()
    return template


async def check_bulk(queue: SqliteQueue, count: int) -> None:
    """The bulk rows read back through the store: counted, and lockable as complete requests."""
    info = await queue.get_info()
    head = await queue.lock_head(limit=25, lock_secs=60, client_key="check")
    await queue.unlock_requests(client_key="check")
    if info.pending_request_count != count or len(head.items) != min(25, count):
        raise RuntimeError(f"bulk rows do not read back: {info}, {len(head.items)} locked")


async def lock_latency(queue: SqliteQueue, calls: int) -> dict[str, Any]:
    """Time `calls` lock_head(limit=25) calls, releasing between them (untimed); after 20 warm-up calls."""
    timings: list[float] = []
    for index in range(calls + 20):
        started = time.perf_counter()
        head = await queue.lock_head(limit=25, lock_secs=60, client_key="latency")
        elapsed = time.perf_counter() - started
        if len(head.items) != 25:
            raise RuntimeError(f"the head ran short: {len(head.items)} items")
        await queue.unlock_requests(client_key="latency")
        if index >= 20:
            timings.append(elapsed * 1000)
    return {
        "calls": calls,
        "p50_ms": round(percentile(timings, 0.5), 3),
        "p99_ms": round(percentile(timings, 0.99), 3),
        "mean_ms": round(sum(timings) / len(timings), 3),
    }


async def child_run(storage: Path, name: str, max_requests: int) -> dict[str, Any]:
    """In a fresh process: run the no-op handler over the first `max_requests` requests of queue `name`."""
    queue = SqliteQueue.open(storage, name)
    dataset = JsonlDataset.open(storage, f"rss-{name}")
    before = current_rss_mb()
    try:
        started = time.perf_counter()
        summary = await run(
            queue,
            noop,
            dataset,
            workers=WorkerSettings(concurrency=50, max_requests=max_requests),
            progress_every=3600,
        )
        elapsed = time.perf_counter() - started
    finally:
        dataset.close()
        await queue.aclose()
    return {
        "handled": summary.stats["handled"],
        "reason": summary.reason,
        "seconds": round(elapsed, 2),
        "handled_per_s": round(int(summary.stats["handled"]) / elapsed),
        "rss_before_run_mb": before,
        "peak_rss_mb": peak_rss_mb(),
    }


async def build(storage: Path, big: int, small: int, lock_calls: int) -> dict[str, Any]:
    """Fill both queues, bulk-insert the floor figure, time lock_head on each."""
    results: dict[str, Any] = {}
    big_queue = SqliteQueue.open(storage, "big")
    small_queue = SqliteQueue.open(storage, "small")
    try:
        results["enqueue_api"] = await enqueue_api(big_queue, big)
        await enqueue_api(small_queue, small)
        bulk_path = queue_path(storage, "bulk")
        schema = SqliteQueue(bulk_path)
        await schema.get_info()  # the first call creates the schema
        await schema.aclose()
        results["enqueue_bulk"] = enqueue_bulk(bulk_path, stored_template(queue_path(storage, "big")), big)
        bulk_queue = SqliteQueue(bulk_path)
        try:
            await check_bulk(bulk_queue, big)
        finally:
            await bulk_queue.aclose()
        results["lock_small"] = await lock_latency(small_queue, lock_calls)
        results["lock_big"] = await lock_latency(big_queue, lock_calls)
    finally:
        await big_queue.aclose()
        await small_queue.aclose()
    results["big_file_mb"] = round(queue_path(storage, "big").stat().st_size / 1024 / 1024, 1)
    return results


def main() -> None:
    """Build, measure, print one line per figure and one with the comparisons."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="size of the big queue")
    parser.add_argument("--small", type=int, default=1000, help="size of the small queue")
    parser.add_argument("--lock-calls", type=int, default=500)
    parser.add_argument("--rss-requests", type=int, default=1000, help="requests each RSS run handles")
    parser.add_argument("--child-run", nargs=2, metavar=("STORAGE", "QUEUE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_logs()
    if args.child_run:
        storage, name = args.child_run
        emit(anyio.run(child_run, Path(storage), name, args.rss_requests))
        return
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-scale-"))
    built = anyio.run(build, storage, args.requests, args.small, args.lock_calls)
    rss = {
        name: run_child_json(
            ["-m", "tests.bench.scale", "--child-run", str(storage), name, "--rss-requests", str(args.rss_requests)]
        )
        for name in ("small", "big")
    }
    api, bulk = built["enqueue_api"], built["enqueue_bulk"]
    emit({"benchmark": "scale/enqueue_api", **api, "file_mb": built["big_file_mb"], "batch": 25})
    emit(
        {
            "benchmark": "scale/enqueue_bulk_sql",
            **bulk,
            "vs_api": round(bulk["requests_per_s"] / api["requests_per_s"], 1),
        }
    )
    sizes = {"small": args.small, "big": args.requests}
    for name in ("small", "big"):
        emit({"benchmark": "scale/lock_head", "pending": sizes[name], "limit": 25, **built[f"lock_{name}"]})
    for name in ("small", "big"):
        emit({"benchmark": "scale/runner_rss", "pending": sizes[name], "max_requests": args.rss_requests, **rss[name]})
    growth = rss["big"]["peak_rss_mb"] - rss["small"]["peak_rss_mb"]
    emit(
        {
            "benchmark": "scale/compare",
            "pending": f"{args.requests} vs {args.small}",
            "lock_head_p50_big_vs_small": round(built["lock_big"]["p50_ms"] / built["lock_small"]["p50_ms"], 2),
            "lock_head_p99_big_vs_small": round(built["lock_big"]["p99_ms"] / built["lock_small"]["p99_ms"], 2),
            "handled_per_s_big_vs_small": round(rss["big"]["handled_per_s"] / rss["small"]["handled_per_s"], 2),
            "peak_rss_growth_mb": round(growth, 1),
            "rss_target": f"does not grow with queue size (< {RSS_GROWTH_LIMIT_MB} MB)",
            "rss_target_met": growth < RSS_GROWTH_LIMIT_MB,
        }
    )


if __name__ == "__main__":
    main()
