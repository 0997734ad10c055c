"""test_reliability.py's scenarios on the PostgreSQL queue, through the real CLI: a worker killed with SIGKILL, a
graceful stop with work in flight, a restart under the same client key, slow handlers with short locks, and the
database restarting mid-run; in process, commits meeting an outage of the database and a commit's lost answer."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from psycopg.conninfo import make_conninfo
from structlog.testing import capture_logs

from runner.context import Context
from runner.models import RequestDraft
from runner.queue.postgres import PostgresQueue
from runner.results.jsonl import JsonlDataset
from runner.results.postgres import PostgresDataset
from runner.results.protocol import ResultsSink
from runner.runtime import run
from runner.settings import WorkerSettings
from tests._pgproxy import pg_proxy
from tests._postgres import ClusterError, Postgres, start_cluster
from tests.conftest import headlock, reaped, run_config, start_headlock, wait_for
from tests.test_cli import attempts, logged, progressed, write_urls
from tests.test_reliability import pids

pytestmark = pytest.mark.slow

State = tuple[int, int, list[tuple[str, str, datetime]]]


def pg_env(dsn: str) -> dict[str, str]:
    """The environment that points a `headlock` command at the queue `default` in `dsn`."""
    return {"HEADLOCK_QUEUE__BACKEND": "postgres", "HEADLOCK_QUEUE__DSN": dsn}


async def read_state(dsn: str) -> State:
    """(total, handled, live locks) of the queue `default` in `dsn`."""
    queue = await PostgresQueue.open(dsn, "default", create=False)
    try:
        info = await queue.get_info()
        return info.total_request_count, info.handled_request_count, await queue.locks()
    finally:
        await queue.aclose()


def pg_state(dsn: str) -> State:
    """`read_state` from synchronous code."""
    return anyio.run(read_state, dsn)


def enqueue(tmp_path: Path, dsn: str, count: int) -> None:
    """`headlock enqueue` `count` URLs into the queue."""
    added = headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path, **pg_env(dsn))
    assert added.returncode == 0, added.stderr


def test_kill_9_of_one_of_three_workers_loses_nothing_and_runs_only_its_requests_again(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """One of three workers is SIGKILLed mid-crawl: every page ends handled, repeats are the dead one's in-flight
    requests only, never one a live worker ran."""
    count = 120
    enqueue(tmp_path, postgres_dsn, count)
    log = tmp_path / "attempts.log"
    cfg = run_config(tmp_path / "c.toml", "slow", log, concurrency=4, prefetch=4, lock_secs=2, options={"sleep": 0.3})
    procs = [start_headlock("run", "--config", str(cfg), cwd=tmp_path, **pg_env(postgres_dsn)) for _ in range(3)]
    victim = procs[0]
    with reaped(*procs):
        wait_for(lambda: log.exists() and str(victim.pid) in log.read_text(), 20, "the victim to start handlers")
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=10)
        for proc in procs[1:]:
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-2000:]
    attempted = pids(log)
    assert len(attempted) == count
    repeated = {rid: who for rid, who in attempted.items() if len(who) > 1}
    assert all(who[0] == victim.pid and victim.pid not in who[1:] for who in repeated.values()), repeated
    assert all(len(who) == 2 for who in repeated.values()), repeated  # once by the victim, once by a live worker
    assert len(repeated) <= 8  # at most the victim's in-flight and prefetched requests
    assert pg_state(postgres_dsn) == (count, count, [])


def test_graceful_stop_with_50_in_flight_gives_back_the_prefetched_and_leaves_no_lock(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """SIGTERM with 50 handlers running and 25 prefetched: those 25 go back at once, the 50 finish, exit 143, and
    the queue holds no lock afterwards."""
    enqueue(tmp_path, postgres_dsn, 200)
    log = tmp_path / "attempts.log"
    gate = tmp_path / "gate"
    grace = 30.0
    cfg = run_config(
        tmp_path / "c.toml", "gated", log, concurrency=50, prefetch=25, grace=grace, options={"gate": str(gate)}
    )
    summary = tmp_path / "summary.json"
    events = tmp_path / "events.jsonl"
    proc = start_headlock(
        "run",
        "--config",
        str(cfg),
        "--summary",
        str(summary),
        "--log-format",
        "json",
        cwd=tmp_path,
        stderr=events,
        HEADLOCK_PROGRESS_EVERY="0.2",
        **pg_env(postgres_dsn),
    )
    with reaped(proc):
        wait_for(lambda: progressed(events, in_flight=50, prefetched=25), 30, "50 handlers running and 25 prefetched")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: logged(events, "shutdown.draining"), 10, "the drain to start")
        [draining] = logged(events, "shutdown.draining")
        assert (draining["given_back"], draining["in_flight"]) == (25, 50)
        assert len(pg_state(postgres_dsn)[2]) == 50  # the prefetched 25 were released while the 50 still run
        gate.touch()
        released = time.monotonic()
        proc.communicate(timeout=grace + 10)
    assert proc.returncode == 143, events.read_text()[-2000:]
    assert time.monotonic() - released < grace / 2  # the drain ends with the last handler, not at the deadline
    result = json.loads(summary.read_text())
    assert (result["handled"], result["given_back"]) == (50, 25)
    assert sum(attempts(log).values()) == 50  # nothing started after the signal
    assert pg_state(postgres_dsn) == (200, 50, [])


def test_restart_with_the_same_client_key_frees_its_stale_locks_at_once(tmp_path: Path, postgres_dsn: str) -> None:
    """A worker killed holding 60 s locks and restarted under its key releases them at start instead of waiting."""
    count = 20
    enqueue(tmp_path, postgres_dsn, count)
    log = tmp_path / "attempts.log"
    cfg = run_config(
        tmp_path / "c.toml", "slow", log, concurrency=2, lock_secs=60, client_key="worker-1", options={"sleep": 30}
    )
    first = start_headlock("run", "--config", str(cfg), cwd=tmp_path, **pg_env(postgres_dsn))
    with reaped(first):
        wait_for(lambda: sum(attempts(log).values()) >= 2, 20, "two handlers to start")
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
    locks = pg_state(postgres_dsn)[2]
    assert len(locks) == count  # 2 in flight + prefetched, all locked for 60 s by the dead worker
    assert {holder for _, holder, _ in locks} == {"worker-1"}
    first_expiry = min(expires for _, _, expires in locks)
    cfg = run_config(tmp_path / "c.toml", "noop", log, concurrency=4, lock_secs=60, client_key="worker-1")
    result = headlock(
        "run", "--config", str(cfg), "--log-format", "json", cwd=tmp_path, timeout=90, **pg_env(postgres_dsn)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert datetime.now(UTC) < first_expiry  # done before any stale lock ran out: freed at start, not waited out
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(e["event"] == "run.released_stale_locks" and e["count"] == count for e in events)
    assert pg_state(postgres_dsn) == (count, count, [])


def test_slow_handlers_with_short_locks_are_never_processed_twice(tmp_path: Path, postgres_dsn: str) -> None:
    """Locks of 2 s, handlers of 3-6 s, three workers: the heartbeat holds every lock; nothing runs twice."""
    count = 9
    enqueue(tmp_path, postgres_dsn, count)
    log = tmp_path / "attempts.log"
    cfg = run_config(
        tmp_path / "c.toml",
        "slow",
        log,
        concurrency=3,
        prefetch=1,
        lock_secs=2,
        handler_timeout=30,
        options={"sleep": 3, "sleep_jitter": 3},
    )
    procs = [start_headlock("run", "--config", str(cfg), cwd=tmp_path, **pg_env(postgres_dsn)) for _ in range(3)]
    with reaped(*procs):
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-2000:]
    seen = attempts(log)
    assert len(seen) == count
    assert max(seen.values()) == 1
    assert len({pid for who in pids(log).values() for pid in who}) > 1  # the workers shared the queue
    assert pg_state(postgres_dsn) == (count, count, [])


@pytest.fixture
def own_cluster() -> Iterator[Postgres]:
    """A cluster of this test's own (it restarts it)."""
    try:
        cluster = start_cluster()
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_database_restart_mid_run_is_survived_and_the_run_finishes(tmp_path: Path, own_cluster: Postgres) -> None:
    """The database restarts (its connections cut) while two workers crawl: both reconnect and finish, every page is
    handled once, and no lock is left."""
    dsn = own_cluster.fresh_dsn()
    count = 300
    enqueue(tmp_path, dsn, count)
    log = tmp_path / "attempts.log"
    cfg = run_config(tmp_path / "c.toml", "slow", log, concurrency=4, lock_secs=30, options={"sleep": 0.1})
    events = [tmp_path / f"events{n}.jsonl" for n in range(2)]
    procs = [
        start_headlock("run", "--config", str(cfg), "--log-format", "json", cwd=tmp_path, stderr=err, **pg_env(dsn))
        for err in events
    ]
    with reaped(*procs):
        wait_for(lambda: sum(attempts(log).values()) >= 40, 30, "the workers to get going")
        own_cluster.restart()
        at_restart = sum(attempts(log).values())
        for proc, err in zip(procs, events, strict=True):
            proc.communicate(timeout=90)
            assert proc.returncode == 0, err.read_text()[-3000:]
    assert at_restart < count - 40  # the restart came mid-run, with most of the work still to do
    for err in events:  # psycopg's pool warned meanwhile: in our format, so the JSON log stays JSON
        assert all(json.loads(line)["event"] for line in err.read_text().splitlines())
    seen = attempts(log)
    assert len(seen) == count
    assert max(seen.values()) == 1
    assert pg_state(dsn) == (count, count, [])


def outage_urls(count: int) -> list[RequestDraft]:
    return [RequestDraft(unique_key=f"http://example.com/{n}", url=f"http://example.com/{n}") for n in range(count)]


async def counting(attempts: Counter[str], ctx: Context) -> None:
    """Count the attempt, push an item, link to one page more (a link to a known page past the first ten)."""
    attempts[ctx.url] += 1
    await ctx.push_data({"url": ctx.url})
    await ctx.enqueue([f"http://example.com/{int(ctx.url.rsplit('/', 1)[1]) % 10}"])


@pytest.mark.anyio
@pytest.mark.parametrize("results", ["postgres", "jsonl"])
async def test_commits_wait_out_an_outage_under_their_locks_and_nothing_runs_twice(
    tmp_path: Path, own_cluster: Postgres, results: str
) -> None:
    """The database goes down for 3 s (three times a call's own timeout) while requests finish: their commits
    (one transaction with the dataset in the database; links, items and mark one after another with a JSONL file)
    wait for it under their locks instead of giving the requests back, so nothing runs twice and none is lost."""
    dsn = own_cluster.fresh_dsn()
    count = 25
    queue = await PostgresQueue.open(dsn, "default", call_timeout=1)
    seen: Counter[str] = Counter()
    down, halted, back = anyio.Event(), anyio.Event(), anyio.Event()

    async def handler(ctx: Context) -> None:
        await counting(seen, ctx)
        if ctx.url.endswith("/5"):
            down.set()  # the database goes down now: this attempt's commit (and the others') meet the outage
            await halted.wait()  # so its commit cannot win the race with the halt (a busy machine is slow to halt)

    async def outage() -> None:
        await down.wait()
        await anyio.to_thread.run_sync(own_cluster.halt)
        halted.set()
        await anyio.sleep(3)  # the fault itself: an outage of this length
        await anyio.to_thread.run_sync(own_cluster.resume)
        back.set()

    try:
        dataset: ResultsSink = (
            await PostgresDataset.open(queue, "items")
            if results == "postgres"
            else await anyio.to_thread.run_sync(JsonlDataset, tmp_path / "d.jsonl")
        )
        await queue.batch_add(outage_urls(count), client_key="enqueuer")
        workers = WorkerSettings(concurrency=4, lock_secs=20, prefetch=2)
        with anyio.fail_after(90), capture_logs() as events:
            async with anyio.create_task_group() as tg:
                tg.start_soon(outage)
                summary = await run(queue, handler, dataset, workers=workers)
        assert back.is_set()
        assert seen == Counter({f"http://example.com/{n}": 1 for n in range(count)})
        assert summary.stats["handled"] == count
        assert summary.stats["failed"] == summary.stats["retried"] == summary.stats["lost"] == 0
        names = Counter(e["event"] for e in events)
        assert names["request.commit_waiting"] > 0  # the outage did meet commits
        assert names["request.commit_failed"] == 0
        info = await queue.get_info()
        assert (info.handled_request_count, await queue.locks()) == (count, [])
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_a_complete_whose_answer_is_lost_counts_as_handled_once(tmp_path: Path, own_cluster: Postgres) -> None:
    """The connection breaks after the server got a complete's COMMIT (applied, never acknowledged): the retry
    finds the request handled under our lease, so the attempt counts as handled, not lost or run again."""
    assert own_cluster.root is not None
    schema_dsn = own_cluster.fresh_dsn()
    count = 12
    async with pg_proxy(str(own_cluster.root)) as proxy:
        dsn = make_conninfo(schema_dsn, host=proxy.host, port=proxy.port)
        queue = await PostgresQueue.open(dsn, "default")
        seen: Counter[str] = Counter()

        async def handler(ctx: Context) -> None:
            await counting(seen, ctx)
            if ctx.url.endswith("/3"):
                proxy.lose_next_commit_answer()

        try:
            dataset = await PostgresDataset.open(queue, "items")
            await queue.batch_add(outage_urls(count), client_key="enqueuer")
            with anyio.fail_after(60), capture_logs() as events:
                summary = await run(queue, handler, dataset, workers=WorkerSettings(concurrency=1, lock_secs=20))
            assert proxy.drops == 1
            assert seen == Counter({f"http://example.com/{n}": 1 for n in range(count)})
            assert (summary.stats["handled"], summary.stats["lost"], summary.stats["items"]) == (count, 0, count)
            assert [e["event"] for e in events if e["event"].startswith(("request.commit", "lease."))] == [
                "request.commit_waiting"
            ]
            info = await queue.get_info()
            assert (info.handled_request_count, await queue.locks()) == (count, [])
        finally:
            await queue.aclose()
