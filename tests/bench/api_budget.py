"""Benchmark 3: queue API calls per handled request against `headlock serve`, counted by the server per endpoint.

    python -m tests.bench.api_budget [--quick] [--requests 2000] [--pages 2000] [--idle-seconds 10]

Each scenario gets a fresh `tests.bench._api_server` child (`headlock serve` plus a counter of `METHOD /template
STATUS`). Workers are `run()` calls in this process, each with its own `ApiQueue` (default settings, so its own
httpx client, client key and rate limits) and the default `progress_every` of 5 s; several run concurrently.
Calls made to fill the queue are counted apart from the run's.

- fast: N requests pre-added by another client (`filler`), handler sleeps 10 ms; 1 and 4 workers, concurrency 10.
  A variant where the one worker's own `ApiQueue` added them (so its request cache already holds them).
- crawl: `handlers.crawl:handle` over the fast local site (`tests.bench._site`), start URL pre-added; the
  handlers' link adds are part of the run's calls; 1 and 4 workers, concurrency 10.
- slow: 20 requests, concurrency 10, handler sleeps 30 s, lock 60 s (`--quick`: 3 s and 6 s); 1 and 4 workers.
- idle: one worker with keep_alive on an empty queue: calls per second over `--idle-seconds`, then over as many
  again (the steady state, once the fetcher's backoff has grown).
- progress: the `GET /v2/request-queues/{queue_id}` (get_info) calls of the progress reporter, on their own line.

Targets (fast handlers: the fast and crawl scenarios): ≤ 1.15 calls per handled request with one worker, ≤ 2.1
with four.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

from handlers import crawl
from runner import Context, JsonlDataset, RequestDraft, Stopper, WorkerSettings, run
from runner.queue.api import ApiQueue
from tests.bench._common import child_server, emit, quiet_logs

PREFIX = "/v2/request-queues/{queue_id}"
GET_INFO = f"GET {PREFIX}"
TARGETS = {1: 1.15, 4: 2.1}
PROGRESS_EVERY = 5.0
HandlerFn = Callable[[Context], Awaitable[None]]


async def sleeper(ctx: Context, *, seconds: float) -> None:
    """Sleep, like a handler waiting on I/O."""
    await anyio.sleep(seconds)


@dataclass(slots=True)
class Scenario:
    """One measured configuration."""

    name: str
    workers: int
    handler: HandlerFn
    concurrency: int = 10
    lock_secs: float = 60.0
    prefill: int = 0
    fill_by: str = "another client"
    start_url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    idle_seconds: float | None = None
    target: float | None = None


def _short(key: str) -> str:
    """`PUT /v2/request-queues/{queue_id}/requests/{request_id} 200` as `PUT /requests/{request_id} 200`.

    Calls on the queue itself (get_info: `GET /v2/request-queues/{queue_id}`) keep their whole path.
    """
    method, path, status = key.split(" ")
    return f"{method} {path.removeprefix(PREFIX) or path} {status}"


async def _counts(control: httpx.AsyncClient, base: str, *, reset: bool = False) -> Counter[str]:
    calls = Counter[str]((await control.get(f"{base}/_bench/calls")).json())
    if reset:
        await control.post(f"{base}/_bench/reset")
    return calls


async def _fill(queue: ApiQueue, scenario: Scenario) -> None:
    if scenario.start_url is not None:
        await queue.batch_add(
            [RequestDraft(unique_key=scenario.start_url, url=scenario.start_url)], client_key="filler"
        )
    for start in range(0, scenario.prefill, 25):
        drafts = [
            RequestDraft(unique_key=f"k{i}", url=f"https://bench.example/{i}")
            for i in range(start, min(start + 25, scenario.prefill))
        ]
        await queue.batch_add(drafts, client_key="filler")


async def _run_workers(
    scenario: Scenario, queues: list[ApiQueue], storage: Path, stopper: Stopper
) -> list[dict[str, Any]]:
    summaries: list[dict[str, Any]] = []

    async def one(index: int, queue: ApiQueue) -> None:
        dataset = JsonlDataset.open(storage, f"worker{index}")
        try:
            summary = await run(
                queue,
                scenario.handler,
                dataset,
                workers=WorkerSettings(
                    concurrency=scenario.concurrency,
                    lock_secs=scenario.lock_secs,
                    keep_alive=scenario.idle_seconds is not None,
                ),
                options=scenario.options,
                stopper=stopper,
                progress_every=PROGRESS_EVERY,
            )
        finally:
            dataset.close()
        summaries.append(summary.as_dict())

    async with anyio.create_task_group() as tg:
        for index, queue in enumerate(queues):
            tg.start_soon(one, index, queue)
    return summaries


async def measure(scenario: Scenario) -> dict[str, Any]:
    """Run `scenario` against a fresh counting server; return its record."""
    storage = Path(tempfile.mkdtemp(prefix="headlock-bench-api-"))
    args = ["-m", "tests.bench._api_server", "--storage", str(storage)]
    with child_server(args) as server:
        async with httpx.AsyncClient() as control:
            queues = [
                await ApiQueue.open(base_url=server.url, token=None, name="default") for _ in range(scenario.workers)
            ]
            filler = (
                queues[0]
                if scenario.fill_by == "self"
                else await ApiQueue.open(base_url=server.url, token=None, name="default")
            )
            try:
                await _counts(control, server.url, reset=True)  # the get-or-create calls are setup, not the run's
                await _fill(filler, scenario)
                adds = await _counts(control, server.url, reset=True)
                for queue in queues:
                    queue.calls.clear()
                stopper = Stopper()
                snapshots: list[Counter[str]] = []
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    if scenario.idle_seconds is not None:

                        async def stop_later(seconds: float) -> None:
                            for _ in range(2):  # the window the targets name, then one more: the steady state
                                await anyio.sleep(seconds)
                                snapshots.append(await _counts(control, server.url))
                            stopper.stop("benchmark window over")

                        tg.start_soon(stop_later, scenario.idle_seconds)
                    summaries = await _run_workers(scenario, queues, storage, stopper)
                elapsed = time.perf_counter() - started
                calls = await _counts(control, server.url)
            finally:
                for queue in {*queues, filler}:
                    await queue.aclose()
    client_side = sum(sum(q.calls.values()) for q in queues)
    return _record(
        scenario,
        summaries=summaries,
        calls=calls,
        adds=adds,
        snapshots=snapshots,
        elapsed=elapsed,
        client_side=client_side,
    )


def _record(
    scenario: Scenario,
    *,
    summaries: list[dict[str, Any]],
    calls: Counter[str],
    adds: Counter[str],
    snapshots: list[Counter[str]],
    elapsed: float,
    client_side: int,
) -> dict[str, Any]:
    handled = sum(int(s["handled"]) for s in summaries)
    total = sum(calls.values())
    progress = sum(n for key, n in calls.items() if key.startswith(f"{GET_INFO} "))
    record: dict[str, Any] = {
        "benchmark": f"api_budget/{scenario.name}",
        "workers": scenario.workers,
        "concurrency_per_worker": scenario.concurrency,
        "lock_secs": scenario.lock_secs,
        "handled": handled,
        "seconds": round(elapsed, 2),
        "run_calls": total,
        "client_side_calls": client_side,
    }
    if scenario.idle_seconds is not None and len(snapshots) == 2:
        first, both = snapshots
        record |= {
            "idle_seconds": scenario.idle_seconds,
            "first_window": _window(first, scenario.idle_seconds),
            "second_window": _window(both - first, scenario.idle_seconds),
            "shutdown_calls": total - sum(both.values()),
            "progress_get_info_calls": sum(n for key, n in both.items() if key.startswith(f"{GET_INFO} ")),
            "worker_seconds": round(2 * scenario.idle_seconds, 2),
        }
        return record
    record |= {
        "calls_per_handled": round(total / max(handled, 1), 3),
        "calls_per_handled_without_progress": round((total - progress) / max(handled, 1), 3),
        "progress_get_info_calls": progress,
        "worker_seconds": round(elapsed * scenario.workers, 2),
        "calls_by_endpoint": {_short(k): n for k, n in sorted(calls.items())},
        "per_handled_by_endpoint": {_short(k): round(n / max(handled, 1), 3) for k, n in sorted(calls.items())},
        "prefill": {"requests": scenario.prefill + (scenario.start_url is not None), "added_by": scenario.fill_by},
        "prefill_calls": {_short(k): n for k, n in sorted(adds.items())},
        "retried_lost_given_back": [sum(int(s[key]) for s in summaries) for key in ("retried", "lost", "given_back")],
    }
    if scenario.target is not None:
        record |= {"target": f"<= {scenario.target}", "target_met": total / max(handled, 1) <= scenario.target}
    return record


def _window(calls: Counter[str], seconds: float) -> dict[str, Any]:
    """Calls per second in one idle window, with and without the progress reporter's."""
    total = sum(calls.values())
    progress = sum(n for key, n in calls.items() if key.startswith(f"{GET_INFO} "))
    return {
        "calls_per_s": round(total / seconds, 2),
        "calls_per_s_without_progress": round((total - progress) / seconds, 2),
        "calls_by_endpoint": {_short(k): n for k, n in sorted(calls.items())},
    }


def scenarios(args: argparse.Namespace, site: str) -> list[Scenario]:
    """Every configuration, in the order measured."""
    fast = partial(sleeper, seconds=0.01)
    slow_secs, slow_lock = (3.0, 6.0) if args.quick else (30.0, 60.0)
    slow = partial(sleeper, seconds=slow_secs)
    crawl_options = {"max_depth": args.pages}
    start = f"{site}/page/0"
    found: list[Scenario] = []
    for workers in (1, 4):
        found.append(Scenario("fast", workers, fast, prefill=args.requests, target=TARGETS[workers]))
    found.append(Scenario("fast_self_added", 1, fast, prefill=args.requests, fill_by="self", target=TARGETS[1]))
    for workers in (1, 4):
        found.append(
            Scenario("crawl", workers, crawl.handle, start_url=start, options=crawl_options, target=TARGETS[workers])
        )
    for workers in (1, 4):
        found.append(Scenario("slow", workers, slow, lock_secs=slow_lock, prefill=20))
    found.append(Scenario("idle", 1, fast, idle_seconds=args.idle_seconds))
    return found


def main() -> None:
    """Run every scenario, one JSON line each, then the progress line and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small counts and short sleeps")
    parser.add_argument("--requests", type=int, default=None, help="pre-added requests (fast); default 2000")
    parser.add_argument("--pages", type=int, default=None, help="site size (crawl); default 2000")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle window; default 10")
    args = parser.parse_args()
    args.requests = args.requests or (300 if args.quick else 2000)
    args.pages = args.pages or (300 if args.quick else 2000)
    args.idle_seconds = args.idle_seconds or (3.0 if args.quick else 10.0)
    quiet_logs()
    records: dict[tuple[str, int], dict[str, Any]] = {}
    with child_server(["-m", "tests.bench._site", "--pages", str(args.pages)]) as site:
        for scenario in scenarios(args, site.url):
            record = anyio.run(measure, scenario)
            records[(scenario.name, scenario.workers)] = record
            emit(record)
    progress_calls = sum(record["progress_get_info_calls"] for record in records.values())
    worker_seconds = sum(record["worker_seconds"] for record in records.values())
    emit(
        {
            "benchmark": "api_budget/progress",
            "progress_every_s": PROGRESS_EVERY,
            "get_info_calls": progress_calls,
            "worker_seconds": round(worker_seconds, 1),
            "get_info_calls_per_s_per_worker": round(progress_calls / worker_seconds, 3),
            "expected_per_s_per_worker": round(1 / PROGRESS_EVERY, 3),
            "note": "progress get_info over all scenarios: in calls_per_handled, not in *_without_progress",
        }
    )
    emit(
        {
            "benchmark": "api_budget/compare",
            "fast_4_vs_1_workers": _ratio(records, "fast"),
            "crawl_4_vs_1_workers": _ratio(records, "crawl"),
            "slow_4_vs_1_workers": _ratio(records, "slow"),
            "fast_self_added_vs_other_client": round(
                records[("fast_self_added", 1)]["calls_per_handled"] / records[("fast", 1)]["calls_per_handled"], 3
            ),
            "targets_met": {
                f"{name}/{workers}w": record["target_met"]
                for (name, workers), record in records.items()
                if "target_met" in record
            },
        }
    )


def _ratio(records: dict[tuple[str, int], dict[str, Any]], name: str) -> float:
    four: float = records[(name, 4)]["calls_per_handled"]
    one: float = records[(name, 1)]["calls_per_handled"]
    return round(four / one, 3)


if __name__ == "__main__":
    main()
