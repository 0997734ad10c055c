"""What only the PostgreSQL queue has: its migration, many clients racing, cancellation and timeouts, a database
restart, the DSN's password, its plans, and the CLI over it (the shared semantics are in test_store_contract.py)."""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from structlog.testing import capture_logs

from runner.errors import ConfigError, LockLostError, NotFoundError, QueueUnavailableError
from runner.models import Request, RequestDraft, utc_now
from runner.open import open_queue
from runner.queue.postgres import SCHEMA_VERSION, PostgresQueue, redact
from runner.results.jsonl import JsonlDataset
from runner.runtime import run
from runner.settings import Settings, WorkerSettings, load_settings
from tests._postgres import LOGIN_ROLE, SECRET_PASSWORD, Postgres, start_cluster
from tests.conftest import headlock, reaped, start_headlock, wait_for

A, B = "client-a", "client-b"
LONG = 60.0


def drafts(*keys: int | str) -> list[RequestDraft]:
    return [RequestDraft(unique_key=f"http://example.com/{k}", url=f"http://example.com/{k}") for k in keys]


@pytest.fixture
async def queue(postgres_dsn: str) -> AsyncIterator[PostgresQueue]:
    opened = await PostgresQueue.open(postgres_dsn, "q")
    try:
        yield opened
    finally:
        await opened.aclose()


async def raw(dsn: str) -> psycopg.AsyncConnection[Any]:
    """A connection of the test's own (autocommit), in the test's schema."""
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


# -- schema and queues ----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_many_workers_opening_at_once_migrate_the_schema_once(postgres_dsn: str) -> None:
    """Ten workers opening one fresh database at once: one migrates (under the advisory lock), all get one queue;
    a later open migrates nothing."""
    opened: list[PostgresQueue] = []

    async def open_one() -> None:
        opened.append(await PostgresQueue.open(postgres_dsn, "shared", pool_size=1))

    try:
        with capture_logs() as logs, anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(open_one)
        assert [e["version"] for e in logs if e["event"] == "queue.schema_migrated"] == [SCHEMA_VERSION]
        assert len({q.queue_id for q in opened}) == 1
        with capture_logs() as later:
            opened.append(await PostgresQueue.open(postgres_dsn, "shared"))
        assert not [e for e in later if e["event"] == "queue.schema_migrated"]
    finally:
        for q in opened:
            await q.aclose()
    async with await raw(postgres_dsn) as conn:
        assert await (await conn.execute("SELECT version FROM headlock_schema")).fetchall() == [(SCHEMA_VERSION,)]


@pytest.mark.anyio
async def test_a_newer_schema_is_refused_and_left_alone(postgres_dsn: str) -> None:
    """A database migrated by a newer headlock is refused with a message saying to upgrade; nothing is changed."""
    await (await PostgresQueue.open(postgres_dsn, "q")).aclose()  # the schema exists
    async with await raw(postgres_dsn) as conn:
        await conn.execute("UPDATE headlock_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(QueueUnavailableError, match="newer than this headlock's"):
        await PostgresQueue.open(postgres_dsn, "q")
    async with await raw(postgres_dsn) as conn:
        assert await (await conn.execute("SELECT version FROM headlock_schema")).fetchall() == [(SCHEMA_VERSION + 1,)]


@pytest.mark.anyio
async def test_queues_of_one_database_are_apart_and_looking_one_up_creates_nothing(postgres_dsn: str) -> None:
    """Two names are two queues (own requests, counts, ids); create=False of a missing queue, even in an empty
    database, is NotFoundError and makes no table."""
    empty = Postgres(dsn=postgres_dsn).fresh_dsn("empty")
    with pytest.raises(NotFoundError, match="no queue 'ghost'"):
        await PostgresQueue.open(empty, "ghost", create=False)
    async with await raw(empty) as conn:
        row = await (await conn.execute("SELECT to_regclass('headlock_queues') IS NULL")).fetchone()
        assert row == (True,)
    one, two = await PostgresQueue.open(postgres_dsn, "one"), await PostgresQueue.open(postgres_dsn, "two")
    try:
        await one.batch_add(drafts(1, 2), client_key=A)
        await two.batch_add(drafts(2), client_key=A)
        assert [r.unique_key for r in (await two.lock_head(limit=5, lock_secs=LONG, client_key=A)).items] == [
            "http://example.com/2"
        ]
        assert [(await q.get_info()).total_request_count for q in (one, two)] == [2, 1]
        assert (await one.counts()).locked == 0
        assert (await one.get_info()).id != (await two.get_info()).id
        with pytest.raises(NotFoundError):
            await PostgresQueue.open(postgres_dsn, "three", create=False)
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.anyio
async def test_the_claim_reads_the_head_index_not_the_table(queue: PostgresQueue, postgres_dsn: str) -> None:
    """With 100,000 handled and 100,000 pending rows, the claim is an index scan of the head (no sequential scan,
    no sort), its "is anything locked" probe two index ranges (no filtering), and it locks the first requests."""
    async with await raw(postgres_dsn) as conn:
        await conn.execute(
            "INSERT INTO headlock_requests (qid, id, order_no, data)"
            " SELECT %s, 'seed' || lpad(n::text, 7, '0'), CASE WHEN n >= 100000 THEN n - 99999 END,"
            " json_build_object('id', 'seed' || lpad(n::text, 7, '0'), 'uniqueKey', 'k' || n,"
            " 'url', 'http://example.com/' || n)"
            " FROM generate_series(0, 199999) n",
            (queue.qid,),
        )
        await conn.execute("ANALYZE headlock_requests")
        from runner.queue.postgres._sql import CLAIM  # noqa: PLC0415 - the statement itself

        args = {"q": queue.qid, "n": 25, "lock_us": 1, "client": "explain"}
        async with conn.transaction(force_rollback=True):
            plan = "\n".join(r[0] for r in await (await conn.execute(f"EXPLAIN {CLAIM}", args)).fetchall())
    [claim] = [part for part in re.split(r"\n\s*CTE ", plan) if part.startswith("c\n")]
    assert "LockRows" in claim
    assert "Index Scan using headlock_requests_head" in claim
    assert "Sort" not in claim  # the index gives the head order: no sort of the pending set
    assert "Seq Scan on headlock_requests" not in plan
    # "Is anything locked" reads the two ranges beside the head: with an OR the planner filtered every row.
    assert not re.search(r"Filter: .*order_no", plan), plan
    head = await queue.lock_head(limit=25, lock_secs=LONG, client_key=A)
    assert [r.url for r in head.items] == [f"http://example.com/{n}" for n in range(100000, 100025)]


# -- many clients -----------------------------------------------------------------------------------------------------


@dataclass
class Racers:
    """Consumers that claim with short locks, sometimes stall past them, and record what they were granted."""

    dsn: str
    marked: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    granted: Counter[str] = field(default_factory=Counter)
    grants: list[tuple[str, int, int]] = field(default_factory=list)
    """(request id, the database's time just before and just after the claim, in µs)."""
    rng: random.Random = field(default_factory=lambda: random.Random(15))

    async def consume(self, queue: PostgresQueue, client: str) -> None:
        async with await raw(self.dsn) as clock:
            for _ in range(400):
                before = await self.now(clock)
                head = await queue.lock_head(limit=10, lock_secs=0.3, client_key=client)
                if not head.items:
                    if not head.queue_has_locked_requests:
                        return
                    await anyio.sleep(0.05)
                    continue
                after = await self.now(clock)
                self.grants += [(item.id, before, after) for item in head.items]
                for item in head.items:
                    self.granted[item.id] += 1
                if self.rng.random() < 0.15:
                    await self.stall(head.items)
                for item in head.items:
                    await self.mark(queue, item, client)

    async def stall(self, items: list[Request]) -> None:
        """Stall past the 0.3 s lock until another client has retaken one of `items` (at most 5 s): so every stall
        ends in a stale handled mark, whatever the machine's load does to the others' timing."""
        first = items[0].id
        seen = self.granted[first]
        with anyio.move_on_after(5):
            while self.granted[first] == seen:  # noqa: ASYNC110 - other tasks' claims: polled with a deadline
                await anyio.sleep(0.05)

    @staticmethod
    async def now(clock: psycopg.AsyncConnection[Any]) -> int:
        row = await (await clock.execute("SELECT (extract(epoch FROM now()) * 1e6)::bigint")).fetchone()
        assert row is not None
        return int(row[0])

    async def mark(self, queue: PostgresQueue, item: Request, client: str) -> None:
        try:
            await queue.update_request(
                item.model_copy(update={"handled_at": utc_now()}), client_key=client, lock_required=True
            )
        except LockLostError:
            self.refused += 1
        else:
            self.marked[item.id] += 1


@pytest.mark.slow
@pytest.mark.anyio
async def test_three_clients_racing_with_stalls_never_hold_one_request_at_once(postgres_dsn: str) -> None:
    """Three handles (three processes' pools) claim with 0.3 s locks and sometimes stall past them: every request
    is handled exactly once, a request is granted again only after its lock ran out (by the database's clock), and
    each stale handled mark was refused by the fence."""
    queues = [await PostgresQueue.open(postgres_dsn, "race", pool_size=2) for _ in range(3)]
    racers = Racers(postgres_dsn)
    try:
        for start in range(0, 600, 25):
            await queues[0].batch_add(drafts(*range(start, start + 25)), client_key="filler")
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for n, q in enumerate(queues):
                    tg.start_soon(racers.consume, q, f"racer-{n}")
        counts = await queues[0].counts()
    finally:
        for q in queues:
            await q.aclose()
    assert len(racers.marked) == 600
    assert set(racers.marked.values()) == {1}
    assert (counts.total, counts.handled, counts.pending, counts.locked) == (600, 600, 0, 0)
    assert racers.refused == len(racers.grants) - 600  # each re-grant followed a stall whose mark was refused
    assert racers.refused > 0
    by_request: dict[str, list[tuple[int, int]]] = {}
    for request_id, before, after in racers.grants:
        by_request.setdefault(request_id, []).append((before, after))
    for times in by_request.values():
        for (first, _), (_, second) in itertools.pairwise(sorted(times)):
            # Granted again only once the 0.3 s lock had run out: the claims' times lie within these bounds.
            assert second - first >= 300_000


@pytest.mark.anyio
async def test_overlapping_unsorted_batch_adds_from_six_clients_do_not_deadlock(postgres_dsn: str) -> None:
    """Six clients adding the same 25 new requests each round, each in its own shuffled order, all at once, 60
    rounds: no deadlock (rows are written in id order), every request stored and counted once."""
    queues = [await PostgresQueue.open(postgres_dsn, "adds", pool_size=1) for _ in range(6)]
    rounds = [anyio.Event() for _ in range(60)]
    arrived = [0] * len(rounds)
    try:

        async def adder(queue: PostgresQueue, seed: int) -> None:
            rng = random.Random(seed)
            for n, go in enumerate(rounds):
                keys = list(range(n * 25, n * 25 + 25))
                rng.shuffle(keys)
                arrived[n] += 1
                if arrived[n] == len(queues):
                    go.set()
                await go.wait()  # all four send this round's batch together
                await queue.batch_add(drafts(*keys), client_key=f"adder-{seed}")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n, q in enumerate(queues):
                    tg.start_soon(adder, q, n)
        info = await queues[0].get_info()
    finally:
        for q in queues:
            await q.aclose()
    assert (info.total_request_count, info.pending_request_count) == (1500, 1500)


# -- cancellation, timeouts, restarts ---------------------------------------------------------------------------------


async def wait_for_lock_wait(conn: psycopg.AsyncConnection[Any]) -> None:
    """Poll pg_stat_activity until a headlock connection waits on a lock (the statement under test has arrived)."""
    with anyio.fail_after(10):
        for _ in range(500):
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'headlock' AND wait_event_type = 'Lock'"
            )
            row = await cursor.fetchone()
            if row is not None and row[0] > 0:
                return
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_a_cancelled_call_completes_and_leaves_its_connection_to_the_next_call(postgres_dsn: str) -> None:
    """A prolong cancelled while it waits on a row lock runs to its end (shielded): the lock is prolonged, the one
    pooled connection comes back good, and the next calls work."""
    queue = await PostgresQueue.open(postgres_dsn, "q", pool_size=1)
    try:
        [request_id] = [r.request_id for r in (await queue.batch_add(drafts(1), client_key=A)).processed_requests]
        await queue.lock_head(limit=1, lock_secs=5, client_key=A)
        before = await queue.locks()
        async with await raw(postgres_dsn) as holder:
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM headlock_requests WHERE id = %s FOR UPDATE", (request_id,))
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def prolong() -> None:
                    with scope:
                        await queue.prolong_lock(request_id, lock_secs=3600, client_key=A)

                tg.start_soon(prolong)
                await wait_for_lock_wait(holder)
                scope.cancel()
                await anyio.sleep(0.1)  # the cancellation is delivered (the call goes on, shielded)
                await holder.execute("COMMIT")
        assert scope.cancel_called
        after = await queue.locks()
        assert after[0][2] > before[0][2]  # the cancelled prolong was applied whole
        for _ in range(3):
            assert (await queue.counts()).locked == 1
        stats = queue._pool.get_stats()
        assert stats.get("returns_bad", 0) == 0
        assert stats.get("connections_lost", 0) == 0
    finally:
        await queue.aclose()


@pytest.mark.anyio
async def test_a_call_past_the_timeout_is_cancelled_on_the_server_and_the_pool_goes_on(postgres_dsn: str) -> None:
    """A write stuck on a row lock longer than the call timeout fails as QueueUnavailableError (not applied),
    in about that time; the pool's connection works on."""
    queue = await PostgresQueue.open(postgres_dsn, "q", pool_size=1, call_timeout=0.5)
    try:
        [request_id] = [r.request_id for r in (await queue.batch_add(drafts(1), client_key=A)).processed_requests]
        await queue.lock_head(limit=1, lock_secs=LONG, client_key=A)
        async with await raw(postgres_dsn) as holder:
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM headlock_requests WHERE id = %s FOR UPDATE", (request_id,))
            started = anyio.current_time()
            with pytest.raises(QueueUnavailableError) as caught:
                await queue.delete_lock(request_id, client_key=A)
            took = anyio.current_time() - started
            await holder.execute("ROLLBACK")
        assert 0.4 < took < 3
        assert not caught.value.maybe_applied
        assert "lock timeout" in str(caught.value) or "statement" in str(caught.value)
        assert await queue.locks()  # still locked: the timed-out release did nothing
        await queue.delete_lock(request_id, client_key=A)
        assert await queue.locks() == []
    finally:
        await queue.aclose()


@pytest.fixture
def own_cluster() -> Iterator[Postgres]:
    """A cluster of this test's own (it restarts it)."""
    from tests._postgres import ClusterError  # noqa: PLC0415

    try:
        cluster = start_cluster()
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_run_goes_on_through_a_database_restart(own_cluster: Postgres, tmp_path: Path) -> None:
    """`run()` over the queue while the database restarts mid-run: the queue reconnects by itself, every request
    is handled, none is stored twice."""
    dsn = own_cluster.fresh_dsn()
    queue = await PostgresQueue.open(dsn, "q", call_timeout=5)
    dataset = await anyio.to_thread.run_sync(JsonlDataset.open, tmp_path, "items")
    handled = 0
    restarted = anyio.Event()

    async def handler(ctx: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == 100:
            await anyio.to_thread.run_sync(own_cluster.restart)
            restarted.set()
        await ctx.push_data({"url": ctx.url})
        await anyio.sleep(0.005)

    try:
        for start in range(0, 400, 25):
            await queue.batch_add(drafts(*range(start, start + 25)), client_key="filler")
        workers = WorkerSettings(concurrency=8, lock_secs=10, retry_backoff=0, max_retries=5)
        with anyio.fail_after(90):
            summary = await run(queue, handler, dataset, workers=workers, progress_every=60)
        counts = await queue.counts()
    finally:
        await queue.aclose()
        await dataset.aclose()
    assert restarted.is_set()
    text = await anyio.Path(tmp_path / "datasets" / "items.jsonl").read_text()
    urls = [json.loads(line)["url"] for line in text.splitlines()]
    assert Counter(urls) == Counter({f"http://example.com/{n}": 1 for n in range(400)})
    assert (counts.total, counts.handled, counts.failed, counts.locked) == (400, 400, 0, 0)
    assert summary is not None


# -- the password ----------------------------------------------------------------------------------------------------


def assert_hidden(text: str) -> None:
    assert SECRET_PASSWORD not in text
    assert SECRET_PASSWORD.replace("@", "%40").replace("%", "%25") not in text


def chain(exc: BaseException) -> str:
    """Every message and repr along an exception's cause and context chain."""
    parts = []
    seen: BaseException | None = exc
    for _ in range(20):
        if seen is None:
            break
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.anyio
async def test_the_dsns_password_is_never_shown(postgres: Postgres, caplog: pytest.LogCaptureFixture) -> None:
    """Not by a wrong password's error, a missing database's, a malformed DSN's, the queue's repr, the settings'
    repr, a validation error, nor any log line (ours or psycopg's)."""
    if postgres.datadir is None:
        pytest.fail("this test needs the test cluster of its own (unset HEADLOCK_TEST_POSTGRES_DSN)")
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with capture_logs() as logs:
        with pytest.raises(QueueUnavailableError) as wrong:
            await PostgresQueue.open(postgres.secret_dsn().replace(SECRET_PASSWORD, SECRET_PASSWORD + "x"), "q")
        seen.append(chain(wrong.value))
        url = f"postgresql://{postgres.secret_dsn()}"  # not a URL: a malformed DSN that quotes the password
        with pytest.raises(ConfigError) as malformed:
            await PostgresQueue.open(url, "q")
        seen.append(chain(malformed.value))
        missing = postgres.secret_dsn().replace("dbname=postgres", "dbname=nosuchdb")
        with pytest.raises(QueueUnavailableError, match="nosuchdb") as absent:
            await PostgresQueue.open(missing, "q")
        seen.append(chain(absent.value))
        schema_dsn = make_conninfo(postgres.fresh_dsn(), user=LOGIN_ROLE, password=SECRET_PASSWORD)
        queue = await PostgresQueue.open(schema_dsn, "q")
        try:
            seen += [repr(queue), str(queue), queue.where]
            await queue.batch_add(drafts(1), client_key=A)
        finally:
            await queue.aclose()
    assert "password authentication failed" in str(wrong.value)
    settings = load_settings(queue={"backend": "postgres", "dsn": postgres.secret_dsn()})
    seen += [repr(settings), str(settings), settings.model_dump_json()]
    with pytest.raises(ConfigError) as invalid:
        load_settings(queue={"backend": "postgres", "dsn": postgres.secret_dsn(), "nope": 1})
    seen.append(chain(invalid.value))
    seen += [json.dumps(event, default=str) for event in logs]
    seen += [record.getMessage() for record in caplog.records]
    for text in seen:
        assert_hidden(text)
    assert redact(f"postgresql://u:{quote(SECRET_PASSWORD, safe='')}@h/db") == "postgresql://u:***@h/db"
    assert redact(f"host=h password='{SECRET_PASSWORD}' user=u") == "host=h password=*** user=u"


# -- settings and the CLI ---------------------------------------------------------------------------------------------


def test_the_dsn_comes_from_the_settings_then_database_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HEADLOCK_QUEUE__DSN and the config file win over DATABASE_URL, which fills in only when nothing else does;
    DATABASE_URL alone does not choose the backend."""
    monkeypatch.delenv("HEADLOCK_QUEUE__DSN", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://from-database-url/db")
    assert load_settings().queue.backend == "embedded"
    fallback = load_settings(queue={"backend": "postgres"}).queue.dsn
    assert fallback is not None
    assert fallback.get_secret_value() == "postgresql://from-database-url/db"
    config = tmp_path / "headlock.toml"
    config.write_text('[queue]\nbackend = "postgres"\ndsn = "host=from-file"\n')
    from_file = load_settings(config).queue.dsn
    assert from_file is not None
    assert from_file.get_secret_value() == "host=from-file"
    monkeypatch.setenv("HEADLOCK_QUEUE__DSN", "host=from-env")
    from_env = load_settings(config).queue.dsn
    assert from_env is not None
    assert from_env.get_secret_value() == "host=from-env"


@pytest.mark.anyio
async def test_the_postgres_backend_without_a_dsn_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend postgres with no DSN anywhere: a ConfigError naming queue.dsn and where to set it."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("HEADLOCK_QUEUE__DSN", raising=False)
    with pytest.raises(ConfigError, match=r"queue\.dsn: required for backend 'postgres'.*DATABASE_URL"):
        await open_queue(Settings(queue={"backend": "postgres"}))  # type: ignore[arg-type]


@pytest.mark.slow
def test_enqueue_then_two_runs_crawl_each_page_once_and_the_queue_commands_work(
    postgres_dsn: str, site: str, tmp_path: Path
) -> None:
    """`headlock enqueue` a start page, two `headlock run` processes on one Postgres queue crawl the site, each page
    handled once across both; status, requests, requeue and purge work on the queue."""
    env = {"HEADLOCK_QUEUE__BACKEND": "postgres", "HEADLOCK_QUEUE__DSN": postgres_dsn, "HEADLOCK_QUEUE__NAME": "crawl"}
    # Each run's items in a file of its own, to see that both took part (the postgres dataset is tested elsewhere).
    env["HEADLOCK_RESULTS_BACKEND"] = "jsonl"
    missing = headlock("status", cwd=tmp_path, **env)
    assert missing.returncode == 1
    assert "no queue 'crawl'" in missing.stderr
    added = headlock("enqueue", f"{site}/page/0", cwd=tmp_path, **env)
    assert added.returncode == 0, added.stderr
    args = ["run", "--handler", "handlers.crawl:handle", "-O", "max_depth=3", "--concurrency", "4"]
    items = [tmp_path / f"w{n}/datasets/default.jsonl" for n in range(2)]
    for n in range(2):
        (tmp_path / f"w{n}").mkdir()
    # The first run stops after 100 of the 156 pages, and the second starts once the first has handled a page: both
    # take part however the machine's load orders their start-ups (a second run that was up first could crawl the
    # whole site before the first had begun).
    first = start_headlock(*args, "--max-requests", "100", "--storage-dir", str(tmp_path / "w0"), cwd=tmp_path, **env)
    with reaped(first):
        wait_for(lambda: items[0].exists() and items[0].read_text(), 60, "the first run's first item")
        second = start_headlock(*args, "--storage-dir", str(tmp_path / "w1"), cwd=tmp_path, **env)
        with reaped(second):
            for proc in (first, second):
                _, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err[-3000:]
    per_run = [[json.loads(line)["url"] for line in path.read_text().splitlines()] for path in items]
    every = Counter(per_run[0] + per_run[1])
    assert set(every.values()) == {1}
    assert all(per_run), "both runs handled pages"
    status = headlock("status", "--json", cwd=tmp_path, **env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["total"], report["handled"], report["pending"], report["locked"]) == (len(every), len(every), 0, 0)
    assert report["had_multiple_clients"]
    listed = headlock("requests", "--handled", "--json", "--limit", "5", cwd=tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 5
    again = headlock("requeue", "--url", f"{site}/page/0", cwd=tmp_path, **env)
    assert again.returncode == 0, again.stderr
    assert "requeued 1 request" in again.stdout
    assert json.loads(headlock("status", "--json", cwd=tmp_path, **env).stdout)["pending"] == 1
    purged = headlock("purge", "--yes", cwd=tmp_path, **env)
    assert purged.returncode == 0, purged.stderr
    assert "deleted queue 'crawl' (in postgres " in purged.stdout
    assert headlock("status", cwd=tmp_path, **env).returncode == 1
