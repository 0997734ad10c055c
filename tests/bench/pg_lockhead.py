"""Benchmark 4 on PostgreSQL: a queue of 1,000,000 requests against one of 1,000 (as tests.bench.scale does for the
embedded store).

    python -m tests.bench.pg_lockhead [--requests 1000000] [--small 1000] [--add-requests 100000] [--lock-calls 500]
                                      [--held 2000] [--rss-requests 1000] [--dsn DSN] [--synchronous-commit on|off]

1. batch add: the first `--add-requests` requests of the big queue through the public `batch_add` (25 per call, one
   call at a time), with the rate of each tenth; the rest bulk-loaded with COPY (rows shaped as the queue stores
   them, read back through the queue to check); then, into the full table, 20,000 new requests and 20,000 that are
   already there (dedup hits), one call at a time;
2. lock-head latency: `--lock-calls` timed `lock_head(limit=25)` calls on the small and on the big queue (after
   VACUUM ANALYZE, as autovacuum would leave a loaded table), each followed by an untimed `unlock_requests`, so the
   head stays full; p50/p99/mean; then the big queue again while another client holds `--held` locks, and again
   while another session holds a snapshot open (a REPEATABLE READ transaction left idle: vacuum and the index's
   dead-entry hints cannot clear what the claims leave behind while it lasts);
3. RSS: `run()` with a no-op handler over the first `--rss-requests` requests, in a fresh process for each queue.

The server is `--dsn` (or HEADLOCK_BENCH_DSN), else a throwaway cluster set up as a server (`tests/bench/_pg.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg

from runner import Context, JsonlDataset, RequestDraft, WorkerSettings, request_id_for, run
from runner.queue.postgres import PostgresQueue
from tests.bench._common import current_rss_mb, emit, peak_rss_mb, percentile, quiet_logs, run_child_json
from tests.bench._pg import DSN_VARIABLE, bench_server, fresh_schema, server_settings

RSS_GROWTH_LIMIT_MB = 5.0
"""The largest peak-RSS difference between the big and the small queue still read as "does not grow"."""
CHECK_ADDS = 20_000
"""Requests of each batch-add check into the full table (new ones, then ones already there)."""


async def noop(ctx: Context) -> None:
    """Do nothing."""


def _drafts(start: int, stop: int) -> list[RequestDraft]:
    return [RequestDraft(unique_key=f"k{i}", url=f"https://scale.example/{i}") for i in range(start, stop)]


async def add_rate(queue: PostgresQueue, start: int, stop: int, *, tenths: bool = False) -> dict[str, Any]:
    """Add requests `start`..`stop`, 25 per `batch_add`, one call at a time; with `tenths`, the rate of each tenth."""
    count = stop - start
    tenth = max(25, count // 10 // 25 * 25)
    segments: list[float] = []
    began = segment_began = time.perf_counter()
    for first in range(start, stop, 25):
        await queue.batch_add(_drafts(first, min(first + 25, stop)), client_key="filler")
        done = min(first + 25, stop) - start
        if tenths and (done % tenth == 0 or done == count):
            now = time.perf_counter()
            segments.append(round((done - len(segments) * tenth) / (now - segment_began)))
            segment_began = now
    elapsed = time.perf_counter() - began
    result: dict[str, Any] = {"requests": count, "seconds": round(elapsed, 1), "requests_per_s": round(count / elapsed)}
    if tenths:
        result["requests_per_s_by_tenth"] = segments
    return result


def bulk_load(dsn: str, qid: int, start: int, stop: int) -> dict[str, Any]:
    """COPY requests `start`..`stop` into queue `qid` as the queue stores them (JSON like a stored row's), pending,
    and count them on the filler's row."""
    began = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT data::text FROM headlock_requests WHERE qid = %s LIMIT 1", (qid,)).fetchone()
        assert row is not None  # the API adds came first
        template = json.loads(row[0])
        now_us = int(conn.execute("SELECT (extract(epoch FROM now()) * 1000000)::bigint").fetchone()[0])  # type: ignore[index]
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY headlock_requests (qid, id, order_no, data) FROM STDIN") as copy:
                for i in range(start, stop):
                    key = f"k{i}"
                    data = {
                        **template,
                        "id": request_id_for(key),
                        "uniqueKey": key,
                        "url": f"https://scale.example/{i}",
                    }
                    # In the past (the available head), in order, 1024 ticks a microsecond as the queue counts.
                    copy.write_row(
                        (qid, data["id"], (now_us - 10_000_000 + i // 1024) * 1024 + i % 1024, json.dumps(data))
                    )
            cur.execute(
                "UPDATE headlock_clients SET total = total + %s WHERE qid = %s AND client_key = 'filler'",
                (stop - start, qid),
            )
    elapsed = time.perf_counter() - began
    return {"requests": stop - start, "seconds": round(elapsed, 1), "requests_per_s": round((stop - start) / elapsed)}


def vacuum(dsn: str) -> None:
    """VACUUM ANALYZE the queue's tables (what autovacuum leaves after a load)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) headlock_requests")
        conn.execute("VACUUM (ANALYZE) headlock_clients")


def table_mb(dsn: str) -> dict[str, float]:
    """The requests table's and its indexes' sizes, in MB."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        heap, indexes = conn.execute(
            "SELECT pg_table_size('headlock_requests'), pg_indexes_size('headlock_requests')"
        ).fetchone()  # type: ignore[misc]
    return {"table_mb": round(heap / 1024 / 1024, 1), "indexes_mb": round(indexes / 1024 / 1024, 1)}


async def lock_latency(queue: PostgresQueue, calls: int) -> dict[str, Any]:
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


async def hold(queue: PostgresQueue, count: int) -> None:
    """Lock `count` requests of the head for another client (10 minutes), as a fleet's in-flight set."""
    for _ in range(-(-count // 25)):
        await queue.lock_head(limit=25, lock_secs=600, client_key="fleet")


async def build(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fill both queues, time the adds and the claims."""
    big, small, lock_calls, held = args.requests, args.small, args.lock_calls, args.held
    added = min(args.add_requests, big)
    results: dict[str, Any] = {}
    big_queue = await PostgresQueue.open(dsn, "big")
    small_queue = await PostgresQueue.open(dsn, "small")
    try:
        results["add_api"] = await add_rate(big_queue, 0, added, tenths=True)
        results["bulk"] = await anyio.to_thread.run_sync(bulk_load, dsn, big_queue.qid, added, big)
        info = await big_queue.get_info()
        if info.pending_request_count != big:
            raise RuntimeError(f"the bulk rows do not count: {info}")
        results["add_into_full"] = await add_rate(big_queue, big, big + CHECK_ADDS)
        results["add_dedup_hits"] = await add_rate(big_queue, 0, CHECK_ADDS)
        await add_rate(small_queue, 0, small)
        await anyio.to_thread.run_sync(vacuum, dsn)
        results["sizes"] = await anyio.to_thread.run_sync(table_mb, dsn)
        results["lock_small"] = await lock_latency(small_queue, lock_calls)
        results["lock_big"] = await lock_latency(big_queue, lock_calls)
        if held:
            await hold(big_queue, held)
            results["lock_big_held"] = await lock_latency(big_queue, lock_calls)
            await big_queue.unlock_requests(client_key="fleet")
        async with await psycopg.AsyncConnection.connect(dsn) as snapshot:
            await snapshot.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await snapshot.execute("SELECT count(*) FROM headlock_queues")  # takes the snapshot, then sits idle
            results["lock_big_old_snapshot"] = await lock_latency(big_queue, lock_calls)
            await snapshot.rollback()
    finally:
        await big_queue.aclose()
        await small_queue.aclose()
    return results


async def child_run(name: str, max_requests: int) -> dict[str, Any]:
    """In a fresh process: run the no-op handler over the first `max_requests` requests of queue `name`."""
    queue = await PostgresQueue.open(os.environ[DSN_VARIABLE], name)
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-"))
    dataset = JsonlDataset.open(storage, f"rss-{name}")
    before = current_rss_mb()
    try:
        started = time.perf_counter()
        summary = await run(
            queue, noop, dataset, workers=WorkerSettings(concurrency=50, max_requests=max_requests), progress_every=3600
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


def main() -> None:
    """Build, measure, print one line per figure and one with the comparisons."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="size of the big queue")
    parser.add_argument("--small", type=int, default=1000, help="size of the small queue")
    parser.add_argument("--add-requests", type=int, default=100_000, help="of the big queue, added through batch_add")
    parser.add_argument("--lock-calls", type=int, default=500)
    parser.add_argument("--held", type=int, default=2000, help="locks another client holds in the last measurement")
    parser.add_argument("--rss-requests", type=int, default=1000, help="requests each RSS run handles")
    parser.add_argument("--dsn", default=os.environ.get(DSN_VARIABLE), help="the server (default: a new one)")
    parser.add_argument("--synchronous-commit", choices=["on", "off"], default="on", help="the new server's")
    parser.add_argument("--child-run", metavar="QUEUE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_logs()
    if args.child_run:
        emit(anyio.run(child_run, args.child_run, args.rss_requests), where={})
        return
    with bench_server(args.dsn, synchronous_commit=args.synchronous_commit) as server, fresh_schema(server) as dsn:
        settings = server_settings(server)
        built = anyio.run(build, dsn, args)
        child = ["-m", "tests.bench.pg_lockhead", "--rss-requests", str(args.rss_requests), "--child-run"]
        rss = {name: run_child_json([*child, name], env={DSN_VARIABLE: dsn}) for name in ("small", "big")}
    emit({"benchmark": "pg_scale/add_api", "batch": 25, "into": "an empty table", **built["add_api"]})
    emit({"benchmark": "pg_scale/add_copy", "how": "COPY, one transaction", **built["bulk"]})
    emit({"benchmark": "pg_scale/add_api", "batch": 25, "into": f"{args.requests} rows", **built["add_into_full"]})
    emit({"benchmark": "pg_scale/add_api", "batch": 25, "all_present": True, **built["add_dedup_hits"]})
    sizes = {"small": args.small, "big": args.requests + CHECK_ADDS}
    for name in ("small", "big"):
        emit({"benchmark": "pg_scale/lock_head", "pending": sizes[name], "limit": 25, **built[f"lock_{name}"]})
    if "lock_big_held" in built:
        emit(
            {
                "benchmark": "pg_scale/lock_head",
                "pending": sizes["big"],
                "held_by_another_client": args.held,
                "limit": 25,
                **built["lock_big_held"],
            }
        )
    emit(
        {
            "benchmark": "pg_scale/lock_head",
            "pending": sizes["big"],
            "snapshot_held_by_another_session": True,
            "limit": 25,
            **built["lock_big_old_snapshot"],
        }
    )
    for name in ("small", "big"):
        emit(
            {"benchmark": "pg_scale/runner_rss", "pending": sizes[name], "max_requests": args.rss_requests, **rss[name]}
        )
    growth = rss["big"]["peak_rss_mb"] - rss["small"]["peak_rss_mb"]
    small, large = built["lock_small"], built["lock_big"]
    emit(
        {
            "benchmark": "pg_scale/compare",
            "pending": f"{sizes['big']} vs {args.small}",
            "server": settings,
            "table": built["sizes"],
            "lock_head_p50_big_vs_small": round(large["p50_ms"] / small["p50_ms"], 2),
            "lock_head_p99_big_vs_small": round(large["p99_ms"] / small["p99_ms"], 2),
            "p99_target": "<= 2x",
            "p99_target_met": large["p99_ms"] <= 2 * small["p99_ms"],
            "handled_per_s_big_vs_small": round(rss["big"]["handled_per_s"] / rss["small"]["handled_per_s"], 2),
            "peak_rss_growth_mb": round(growth, 1),
            "rss_target": f"does not grow with queue size (< {RSS_GROWTH_LIMIT_MB} MB)",
            "rss_target_met": growth < RSS_GROWTH_LIMIT_MB,
        }
    )


if __name__ == "__main__":
    main()
