"""Benchmark 1: runtime overhead. 20,000 requests, a no-op handler, concurrency 50.

    python -m tests.bench.overhead [--backend both|embedded|serve|postgres] [--requests 20000] [--concurrency 50]
                                   [--rate-limits default|off] [--fill store|http] [--processes 1] [--links 0]
                                   [--dsn DSN] [--rounds 3] [--synchronous-commit on|off]

`embedded` consumes the SQLite store in this process, or with `--processes N` in N child processes sharing the
file (handled/s then counts from the first child's start to the last one's end); it reports the largest size the
WAL reached. `--links N` (embedded) swaps the no-op handler for one that pushes an item and enqueues N links to
other requests of the queue, most of them already added by then: the per-request bookkeeping of a crawl without
the HTTP. Embedded runs report CPU time per request (all threads).

`serve` consumes the same queue over `headlock serve` (a `python -m runner.server` child on 127.0.0.1) through
`ApiQueue`, with `run()` in this process. `both` (the default) runs embedded, serve and serve without the
client-side rate limits, each in a fresh process so every peak RSS is its own, and ends with a line of ratios.
handled/s is timed around `run()`, after the queue is filled; so is CPU per request, of this process (the client)
and of the server (`serve` runs).

The queue is filled before the run: by default straight into the store file before the server starts (requests
added by another process: `ApiQueue` has none of them cached and must GET each one); `--fill http` adds them through
the runner's own `ApiQueue` instead (its cache then holds them all).

`postgres` compares the PostgreSQL queue with the embedded store in one run, A/B style: for each of `--processes`
(default `1,3`) it runs the embedded store and Postgres with that many worker processes (each a fresh child;
`--requests` × processes requests), in `--rounds` rounds whose order rotates, and ends with the medians and ranges of
the per-round ratios (Postgres / embedded at each process count, Postgres at N processes / at 1). The server is
`--dsn` (or HEADLOCK_BENCH_DSN), else a throwaway cluster set up as a server (`tests/bench/_pg.py`:
`--synchronous-commit`, default on). Each configuration gets a fresh schema, filled through `batch_add` from four
connections and vacuumed before the timed run. Postgres runs report the runner's CPU per request (all worker
processes) and the server's (every Postgres process, read from /proc: only for a server on this machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from runner import Context, Handler, JsonlDataset, RequestDraft, RequestQueue, SqliteQueue, WorkerSettings, run
from runner.queue.api import ApiQueue, RateLimits
from tests.bench._common import (
    child_server,
    cpu_seconds,
    emit,
    peak_rss_mb,
    quiet_logs,
    run_child_json,
    run_children_json,
    watch_size,
)
from tests.bench._pg import (
    DSN_VARIABLE,
    bench_server,
    cpu_delta,
    fresh_schema,
    postmaster_pid,
    rounded,
    server_cpu_seconds,
    server_settings,
)


async def noop(ctx: Context) -> None:
    """Do nothing."""


async def fill(queue: RequestQueue, count: int, *, url_keys: bool = False) -> None:
    """Add `count` requests in batches of 25, keyed `k<i>` or, with `url_keys`, by their normalized URL."""
    for start in range(0, count, 25):
        urls = [f"https://bench.example/{i}" for i in range(start, min(start + 25, count))]
        drafts = [RequestDraft(unique_key=url if url_keys else f"k{i}", url=url) for i, url in enumerate(urls, start)]
        await queue.batch_add(drafts, client_key="filler")


def linker(links: int, requests: int) -> Handler:
    """A handler that pushes one item and enqueues `links` URLs of other requests of the queue."""

    async def handle(ctx: Context) -> None:
        n = int(ctx.url.rsplit("/", 1)[1])
        await ctx.push_data({"url": ctx.url, "status": 200, "title": f"Page {n}"})
        await ctx.enqueue([f"https://bench.example/{(n * 7 + k) % requests}" for k in range(links)])

    return handle


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system, all threads) process `pid` on this machine has used so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on: the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed_run(
    queue: RequestQueue, storage: Path, concurrency: int, handler: Handler = noop
) -> tuple[int, float, float]:
    """Run `handler` over `queue`; return (handled, seconds, CPU seconds of this process)."""
    dataset = JsonlDataset.open(storage, "default")
    try:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        summary = await run(
            queue, handler, dataset, workers=WorkerSettings(concurrency=concurrency), progress_every=3600
        )
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    finally:
        dataset.close()
    return int(summary.stats["handled"]), elapsed, cpu


def wal_of(queue: SqliteQueue) -> Path:
    """The store's write-ahead log file."""
    return queue.path.with_name(queue.path.name + "-wal")


async def embedded(requests: int, concurrency: int, links: int = 0) -> dict[str, Any]:
    """The embedded store in this process."""
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-"))
    queue = SqliteQueue.open(storage, "default")
    handler = linker(links, requests) if links else noop
    try:
        with watch_size(wal_of(queue)) as wal:
            await fill(queue, requests, url_keys=bool(links))
            handled, elapsed, cpu = await timed_run(queue, storage, concurrency, handler)
    finally:
        await queue.aclose()
    return {
        "benchmark": "overhead/embedded",
        "requests": requests,
        "concurrency": concurrency,
        "handler": f"push 1 item, enqueue {links} links" if links else "no-op",
        "handled": handled,
        "seconds": round(elapsed, 2),
        "handled_per_s": round(handled / elapsed),
        "cpu_us_per_request": round(cpu / handled * 1e6),
        "peak_rss_mb": peak_rss_mb(),
        "wal_largest_mb": wal.largest_mb,
    }


async def embedded_processes(requests: int, concurrency: int, processes: int) -> dict[str, Any]:
    """`processes` child processes consuming one store file, each with `concurrency` workers."""
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-"))
    queue = SqliteQueue.open(storage, "default")
    try:
        await fill(queue, requests)
    finally:
        await queue.aclose()
    child = ["-m", "tests.bench.overhead", "--child-run", str(storage), "--concurrency", str(concurrency)]
    with watch_size(wal_of(queue)) as wal:
        results = await anyio.to_thread.run_sync(run_children_json, [child] * processes)
    handled = sum(r["handled"] for r in results)
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {
        "benchmark": "overhead/embedded",
        "requests": requests,
        "concurrency": concurrency,
        "processes": processes,
        "handled": handled,
        "handled_by_process": [r["handled"] for r in results],
        "seconds": round(elapsed, 2),
        "handled_per_s": round(handled / elapsed),
        "cpu_us_per_request": round(sum(r["cpu_s"] for r in results) / handled * 1e6),
        "peak_rss_mb_by_process": [r["peak_rss_mb"] for r in results],
        "wal_largest_mb": wal.largest_mb,
    }


async def child_run(storage: Path, concurrency: int) -> dict[str, Any]:
    """In a child process: consume the shared store until it is empty."""
    queue = SqliteQueue.open(storage, "default")
    try:
        started = time.time()
        handled, _, cpu = await timed_run(queue, storage, concurrency)
        ended = time.time()
    finally:
        await queue.aclose()
    return {"handled": handled, "started": started, "ended": ended, "cpu_s": cpu, "peak_rss_mb": peak_rss_mb()}


async def serve(requests: int, concurrency: int, *, rate_limits: str, fill_via: str) -> dict[str, Any]:
    """`headlock serve` in a child process, consumed through `ApiQueue` by `run()` in this process."""
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-"))
    if fill_via == "store":
        store = SqliteQueue.open(storage, "default")
        try:
            await fill(store, requests)
        finally:
            await store.aclose()
    # default: the client's own choice (the platform's limits on the platform's API only: none on loopback).
    paced = {"default": {}, "platform": {"rate_limits": RateLimits()}, "off": {"rate_limits": None}}[rate_limits]
    args = ["-m", "runner.server", "--host", "127.0.0.1", "--port", "0", "--storage", str(storage)]
    with child_server(args) as server:
        queue = await ApiQueue.open(base_url=server.url, token=None, name="default", **paced)
        try:
            if fill_via == "http":
                await fill(queue, requests)
            queue.calls.clear()
            server_before = process_cpu_seconds(server.pid)
            handled, elapsed, cpu = await timed_run(queue, storage, concurrency)
            server_cpu = process_cpu_seconds(server.pid) - server_before
        finally:
            await queue.aclose()
        calls = dict(sorted(queue.calls.items()))
    return {
        "benchmark": "overhead/serve",
        "requests": requests,
        "concurrency": concurrency,
        "rate_limits": {
            "default": "default (none against a server that is not the platform's)",
            "platform": "the platform's (batch 40/s, single 400/s)",
            "off": "off",
        }[rate_limits],
        "filled_via": "store file before start (cold ApiQueue cache)" if fill_via == "store" else "ApiQueue (warm)",
        "handled": handled,
        "seconds": round(elapsed, 2),
        "handled_per_s": round(handled / elapsed),
        "cpu_us_per_request": round(cpu / max(handled, 1) * 1e6),
        "server_cpu_us_per_request": round(server_cpu / max(handled, 1) * 1e6),
        "server_calls_per_cpu_s": round(sum(calls.values()) / server_cpu) if server_cpu > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "server_peak_rss_mb": server.peak_rss_mb,
        "api_calls": sum(calls.values()),
        "api_calls_per_handled": round(sum(calls.values()) / max(handled, 1), 3),
        "api_calls_by_endpoint": calls,
        "api_client": f"ApiQueue's own httpx.AsyncClient on {type(queue.api._client._transport).__name__}",
    }


# -- postgres ---------------------------------------------------------------------------------------------------------


async def fill_postgres(dsn: str, name: str, count: int, *, clients: int = 4) -> None:
    """Fill the Postgres queue `name` with `count` requests through `batch_add`, `clients` connections at once
    (without waiting for each commit's flush: the fill is not what is measured)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: PLC0415 - only this backend needs psycopg

    from runner.queue.postgres import PostgresQueue  # noqa: PLC0415

    options = f"{conninfo_to_dict(dsn).get('options') or ''} -csynchronous_commit=off".strip()
    queue = await PostgresQueue.open(make_conninfo(dsn, options=options), name, pool_size=clients)

    async def add(first: int, stop: int) -> None:
        for start in range(first, stop, 25):
            drafts = [
                RequestDraft(unique_key=f"k{i}", url=f"https://bench.example/{i}")
                for i in range(start, min(start + 25, stop))
            ]
            await queue.batch_add(drafts, client_key="filler")

    try:
        share = -(-count // clients // 25) * 25
        async with anyio.create_task_group() as tg:
            for first in range(0, count, share):
                tg.start_soon(add, first, min(first + share, count))
    finally:
        await queue.aclose()


async def child_run_postgres(name: str, concurrency: int) -> dict[str, Any]:
    """In a child process: consume the Postgres queue `name` (DSN in HEADLOCK_BENCH_DSN) until it is empty."""
    from runner.queue.postgres import PostgresQueue  # noqa: PLC0415

    queue = await PostgresQueue.open(os.environ[DSN_VARIABLE], name)
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-"))
    try:
        started = time.time()
        handled, _, cpu = await timed_run(queue, storage, concurrency)
        ended = time.time()
    finally:
        await queue.aclose()
    return {"handled": handled, "started": started, "ended": ended, "cpu_s": cpu, "peak_rss_mb": peak_rss_mb()}


def vacuum(dsn: str) -> None:
    """VACUUM ANALYZE the queue's tables, so the fill's dead rows and statistics are not the run's business."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) headlock_requests")
        conn.execute("VACUUM (ANALYZE) headlock_clients")


def postgres_processes(dsn: str, requests: int, concurrency: int, processes: int) -> dict[str, Any]:
    """`processes` child processes consuming one Postgres queue (a fresh schema) of `requests` requests."""
    postmaster = postmaster_pid(dsn)
    with fresh_schema(dsn) as schema_dsn:
        anyio.run(fill_postgres, schema_dsn, "default", requests)
        vacuum(schema_dsn)
        child = ["-m", "tests.bench.overhead", "--child-postgres", "default", "--concurrency", str(concurrency)]
        server_before = server_cpu_seconds(postmaster)
        results = run_children_json([child] * processes, env={DSN_VARIABLE: schema_dsn})
        server_cpu = cpu_delta(server_before, server_cpu_seconds(postmaster))
    handled = sum(r["handled"] for r in results)
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {
        "benchmark": "overhead/postgres",
        "requests": requests,
        "concurrency": concurrency,
        "processes": processes,
        "handled": handled,
        "handled_by_process": [r["handled"] for r in results],
        "seconds": round(elapsed, 2),
        "handled_per_s": round(handled / elapsed),
        "cpu_us_per_request": round(sum(r["cpu_s"] for r in results) / handled * 1e6),
        "server_cpu_us_per_request": rounded(None if server_cpu is None else server_cpu / handled * 1e6),
        "peak_rss_mb_by_process": [r["peak_rss_mb"] for r in results],
    }


def _spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), digits),
        "range": [round(min(values), digits), round(max(values), digits)],
    }


def postgres_compare(
    requests: int, concurrency: int, processes: list[int], *, rounds: int, dsn: str | None, synchronous_commit: str
) -> None:
    """The embedded store and Postgres at each process count, `rounds` times in rotating order, then the ratios."""
    configs = [(kind, n) for n in processes for kind in ("embedded", "postgres")]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {config: [] for config in configs}
    with bench_server(dsn, synchronous_commit=synchronous_commit) as server:
        settings = server_settings(server)
        for round_no in range(rounds):
            shift = round_no % len(configs)
            for kind, n in configs[shift:] + configs[:shift]:
                count = requests * n
                if kind == "postgres":
                    result = postgres_processes(server, count, concurrency, n)
                    result["server"] = settings
                else:
                    args = ["-m", "tests.bench.overhead", "--backend", "embedded", "--requests", str(count)]
                    args += ["--concurrency", str(concurrency), "--processes", str(n)]
                    result = run_child_json(args)
                result["round"] = round_no + 1
                results[kind, n].append(result)
                emit(result)
    rate = {config: [r["handled_per_s"] for r in rows] for config, rows in results.items()}
    compare: dict[str, Any] = {"benchmark": "overhead/postgres_compare", "rounds": rounds, "server": settings}
    for n in processes:
        compare[f"handled_per_s_embedded_{n}p"] = _spread(rate["embedded", n], 0)
        compare[f"handled_per_s_postgres_{n}p"] = _spread(rate["postgres", n], 0)
        ratios = [p / e for p, e in zip(rate["postgres", n], rate["embedded", n], strict=True)]
        compare[f"postgres_vs_embedded_{n}p"] = _spread(ratios)
        pg_rows = results["postgres", n]
        compare[f"runner_cpu_us_per_request_postgres_{n}p"] = _spread([r["cpu_us_per_request"] for r in pg_rows], 0)
        server = [r["server_cpu_us_per_request"] for r in pg_rows if r["server_cpu_us_per_request"] is not None]
        compare[f"server_cpu_us_per_request_postgres_{n}p"] = _spread(server, 0) if server else None
        embedded_cpu = [r["cpu_us_per_request"] for r in results["embedded", n]]
        compare[f"runner_cpu_us_per_request_embedded_{n}p"] = _spread(embedded_cpu, 0)
    if 1 in processes:
        for n in processes:
            if n != 1:
                scaling = [m / one for m, one in zip(rate["postgres", n], rate["postgres", 1], strict=True)]
                compare[f"postgres_{n}p_vs_1p"] = _spread(scaling)
    emit(compare)


def both(requests: int, concurrency: int) -> None:
    """Each configuration in a fresh process (so each peak RSS is its own), then the ratios."""
    common = ["-m", "tests.bench.overhead", "--requests", str(requests), "--concurrency", str(concurrency)]
    results = {
        "embedded": run_child_json([*common, "--backend", "embedded"]),
        "serve": run_child_json([*common, "--backend", "serve"]),
        "serve_unlimited": run_child_json([*common, "--backend", "serve", "--rate-limits", "off"]),
    }
    for result in results.values():
        emit(result)
    base = results["embedded"]["handled_per_s"]
    emit(
        {
            "benchmark": "overhead/compare",
            "serve_vs_embedded_handled_per_s": round(results["serve"]["handled_per_s"] / base, 3),
            "serve_unlimited_vs_embedded_handled_per_s": round(results["serve_unlimited"]["handled_per_s"] / base, 3),
        }
    )


def main() -> None:
    """Parse the arguments and run the chosen backend(s)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backend", choices=["both", "embedded", "serve", "postgres"], default="both")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--rate-limits", choices=["default", "platform", "off"], default="default", help="ApiQueue's pacing"
    )
    parser.add_argument("--fill", choices=["store", "http"], default="store", help="how the serve queue is filled")
    parser.add_argument(
        "--processes",
        default=None,
        help="embedded: child processes sharing the store (default 1); postgres: the counts to compare (default 1,3)",
    )
    parser.add_argument("--links", type=int, default=0, help="embedded: links each request's handler enqueues")
    parser.add_argument("--dsn", default=os.environ.get(DSN_VARIABLE), help="postgres: the server (default: a new one)")
    parser.add_argument("--rounds", type=int, default=3, help="postgres: rounds of every configuration")
    parser.add_argument("--synchronous-commit", choices=["on", "off"], default="on", help="postgres: the new server's")
    parser.add_argument("--child-run", type=Path, metavar="STORAGE", help=argparse.SUPPRESS)
    parser.add_argument("--child-postgres", metavar="QUEUE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_logs()
    if args.child_run:
        emit(anyio.run(child_run, args.child_run, args.concurrency), where={})
        return
    if args.child_postgres:
        emit(anyio.run(child_run_postgres, args.child_postgres, args.concurrency), where={})
        return
    counts = [int(n) for n in (args.processes or ("1,3" if args.backend == "postgres" else "1")).split(",")]
    if args.backend == "postgres":
        postgres_compare(
            args.requests,
            args.concurrency,
            counts,
            rounds=args.rounds,
            dsn=args.dsn,
            synchronous_commit=args.synchronous_commit,
        )
        return
    if args.backend == "embedded" and counts[0] > 1:
        emit(anyio.run(embedded_processes, args.requests, args.concurrency, counts[0]))
        return
    if args.backend == "both":
        both(args.requests, args.concurrency)
        return
    if args.backend == "embedded":
        result = anyio.run(embedded, args.requests, args.concurrency, args.links)
    else:
        result = anyio.run(
            lambda: serve(args.requests, args.concurrency, rate_limits=args.rate_limits, fill_via=args.fill)
        )
    emit(result)


if __name__ == "__main__":
    main()
