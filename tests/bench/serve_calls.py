"""`headlock serve` alone: API calls a second on one core, under a lean load generator replaying a worker's calls.

    python -m tests.bench.serve_calls [--requests 20000] [--connections 64] [--rounds 1]
    python -m tests.bench.serve_calls --base REV [--rounds 4]      # A/B: REV's server beside this checkout's
    python -m tests.bench.serve_calls --profile /tmp/serve.prof    # the server's cProfile (one round)

The queue is filled straight into the store file before the server starts (as `tests.bench.overhead` does). The
server (`python -m runner.server`) runs pinned to CPU 1; this process, pinned to CPU 0, drives it over
`--connections` keep-alive connections with raw aiohttp: each connection's loop locks 25 requests
(`POST head/lock`), then GETs each and PUTs it back with `handledAt`, as `ApiQueue` does (2.04 calls a request),
until the queue is empty. Figures: calls/s, the server's CPU per call (its `/proc/<pid>/stat`, every thread), this
process's CPU per call. With `--base`, rounds alternate (ABBA...) between REV's server (a temporary git worktree)
and this checkout's, the load generator and the fill being this checkout's; the last line has the medians and the
median per-pair ratio (head / base) of each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from runner import RequestDraft, SqliteQueue
from tests._server import read_listening_url
from tests.bench._common import REPO, STOP_TIMEOUT, cpu_seconds, emit, machine, pin_to

LOCK_LIMIT = 25
LOCK_SECS = 600
CLIENT_CPU = 0
SERVER_CPU = 1
# The child pins itself before it imports anything, so that every thread it starts (SQLite's) inherits the CPU.
_CHILD = """\
import os, runpy, sys
cpu, profile, *args = sys.argv[1:]
if hasattr(os, "sched_setaffinity"):
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {allowed[int(cpu) % len(allowed)]})
sys.argv = ["runner.server", *args]
if profile:
    import cProfile, signal
    # uvicorn re-raises the SIGTERM it stopped on once it is done: exit then, so that the stats get written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    profiler = cProfile.Profile()
    profiler.enable()
try:
    runpy.run_module("runner.server", run_name="__main__", alter_sys=True)
finally:
    if profile:
        profiler.disable()
        profiler.dump_stats(profile)
"""


def fill(storage: Path, count: int) -> None:
    """Add `count` requests to the queue `default` under `storage`, 25 a batch, before any server runs."""

    async def add() -> None:
        queue = SqliteQueue.open(storage, "default")
        try:
            for start in range(0, count, 25):
                drafts = [
                    RequestDraft(unique_key=f"k{i}", url=f"https://bench.example/{i}")
                    for i in range(start, min(start + 25, count))
                ]
                await queue.batch_add(drafts, client_key="filler")
        finally:
            await queue.aclose()

    asyncio.run(add())


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user, system; every thread) process `pid` has used so far, from `/proc/<pid>/stat`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@contextmanager
def server(tree: Path, storage: Path, *, profile: str = "") -> Iterator[tuple[str, int]]:
    """Run `python -m runner.server` from `tree` over `storage`, pinned to SERVER_CPU; yield (URL, pid)."""
    args = ["--host", "127.0.0.1", "--port", "0", "--storage", str(storage)]
    # The caller's PYTHONPATH stays after the tree's (e.g. a directory with optional packages to try).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(SERVER_CPU), profile, *args], stdout=subprocess.PIPE, env=env, cwd=tree
    )
    try:
        yield read_listening_url(proc), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class Load:
    """The load generator's counts."""

    def __init__(self) -> None:
        self.calls = 0
        self.handled = 0
        self.errors: dict[str, int] = {}


async def _call(session: aiohttp.ClientSession, load: Load, method: str, url: str, **kwargs: Any) -> Any:
    async with session.request(method, url, **kwargs) as response:
        body = await response.read()
        load.calls += 1
        if response.status >= 300:
            key = f"{method} {response.status}"
            load.errors[key] = load.errors.get(key, 0) + 1
            return None
        return json.loads(body)["data"]


async def _connection(session: aiohttp.ClientSession, base: str, client: str, load: Load, budget: int) -> None:
    """One connection's loop: lock 25, GET and PUT (handled) each, until the queue's head is empty."""
    queue = f"{base}/v2/request-queues/default"
    lock = {"limit": str(LOCK_LIMIT), "lockSecs": str(LOCK_SECS), "clientKey": client}
    key = {"clientKey": client}
    headers = {"Content-Type": "application/json"}
    for _ in range(budget):  # bounded: each round handles at least one request or ends the loop
        head = await _call(session, load, "POST", f"{queue}/head/lock", params=lock)
        if not head or not head["items"]:
            return
        for item in head["items"]:
            url = f"{queue}/requests/{item['id']}"
            stored = await _call(session, load, "GET", url)
            if stored is None:
                continue
            stored["handledAt"] = "2025-01-01T00:00:00.000Z"
            stored.pop("lockExpiresAt", None)
            if await _call(session, load, "PUT", url, params=key, data=json.dumps(stored), headers=headers):
                load.handled += 1


async def drive(base: str, connections: int, requests: int) -> tuple[Load, float]:
    """Consume the queue over `connections` connections; return the counts and the wall seconds."""
    load = Load()
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm up: the first call opens the queue's store.
        await _call(session, load, "GET", f"{base}/v2/request-queues/default")
        load.calls = 0
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for n in range(connections):
                tg.create_task(_connection(session, base, f"bench-{n}", load, requests))
        elapsed = time.perf_counter() - started
    return load, elapsed


def measure(tree: Path, requests: int, connections: int, *, profile: str = "") -> dict[str, Any]:
    """One round against `tree`'s server on a freshly filled queue."""
    with tempfile.TemporaryDirectory(prefix="headlock-serve-calls-") as tmp:
        storage = Path(tmp)
        fill(storage, requests)
        with server(tree, storage, profile=profile) as (url, pid):
            (user_before, system_before), client_before = proc_cpu_seconds(pid), cpu_seconds()
            load, elapsed = asyncio.run(drive(url, connections, requests))
            (user_after, system_after), client_cpu = proc_cpu_seconds(pid), cpu_seconds() - client_before
    server_user, server_system = user_after - user_before, system_after - system_before
    server_cpu = server_user + server_system
    calls = max(load.calls, 1)
    return {
        "requests": requests,
        "connections": connections,
        "handled": load.handled,
        "calls": load.calls,
        "errors": load.errors,
        "seconds": round(elapsed, 2),
        "calls_per_s": round(load.calls / elapsed),
        "handled_per_s": round(load.handled / elapsed),
        "server_cpu_us_per_call": round(server_cpu / calls * 1e6),
        "server_cpu_system_share": round(server_system / server_cpu, 3) if server_cpu else None,
        "server_cpu_share": round(server_cpu / elapsed, 3),
        "client_cpu_us_per_call": round(client_cpu / calls * 1e6),
        "server_calls_per_cpu_s": round(load.calls / server_cpu) if server_cpu else None,
    }


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """`rev` checked out in a temporary git worktree."""
    with tempfile.TemporaryDirectory(prefix="headlock-serve-calls-base-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), rev], cwd=REPO, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


_FIGURES = ("calls_per_s", "server_cpu_us_per_call", "client_cpu_us_per_call", "server_calls_per_cpu_s")


def _summary(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"benchmark": "serve_calls/summary"}
    for name, runs in rows.items():
        summary[name] = {key: statistics.median(r[key] for r in runs if r[key] is not None) for key in _FIGURES}
    if "base" in rows:
        summary["median_ratio_head_over_base"] = {
            key: round(statistics.median(h[key] / b[key] for h, b in zip(rows["head"], rows["base"], strict=True)), 3)
            for key in _FIGURES
        }
    return summary


def main() -> None:
    """Run the rounds (alternating with `--base`), one JSON line each, then the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--base", help="a commit whose server to compare against")
    parser.add_argument("--profile", default="", help="write the server's cProfile stats here (one round, no --base)")
    args = parser.parse_args()
    where = machine()  # before pinning: it counts the CPUs this process may use
    pin_to(CLIENT_CPU)
    if args.profile:
        emit(
            {
                "benchmark": "serve_calls",
                "tree": "head",
                **measure(REPO, args.requests, args.connections, profile=args.profile),
            },
            where,
        )
        return
    rows: dict[str, list[dict[str, Any]]] = {"head": []}
    with _maybe_worktree(args.base) as base_tree:
        if base_tree is not None:
            rows["base"] = []
        for n in range(args.rounds):
            order = [("head", REPO)] if base_tree is None else [("base", base_tree), ("head", REPO)]
            if n % 2:
                order.reverse()
            for name, tree in order:
                row = {
                    "benchmark": "serve_calls",
                    "tree": name,
                    "round": n + 1,
                    **measure(tree, args.requests, args.connections),
                }
                rows[name].append(row)
                emit(row, where)
    emit(_summary(rows) | ({"base_rev": args.base} if args.base else {}), where)


@contextmanager
def _maybe_worktree(rev: str | None) -> Iterator[Path | None]:
    """The worktree of `rev`, or None without one."""
    if rev is None:
        yield None
        return
    with worktree(rev) as tree:
        yield tree


if __name__ == "__main__":
    main()
