"""Results in the postgres queue's database: a request's new links, its items and its handled mark in one
transaction fenced on the lease (a lost lease or a crash leaves no duplicate item and no partial work), the
dataset itself, the settings that choose it, and `headlock export` over it."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from runner.commit import Committer, RetryPolicy
from runner.errors import ConfigError, InvalidInputError, LockLostError
from runner.leases import Leases
from runner.models import Request, RequestDraft, utc_now
from runner.open import open_run, results_in_postgres
from runner.queue.completion import AtomicCompletion
from runner.queue.postgres import SCHEMA_VERSION, PostgresQueue
from runner.queue.postgres._schema import MIGRATIONS
from runner.queue.sqlite import queue_path
from runner.results.jsonl import JsonlDataset
from runner.results.postgres import PostgresDataset
from runner.runtime import run
from runner.settings import Settings, WorkerSettings, load_settings
from runner.stats import RunStats
from tests.conftest import headlock, reaped, run_config, start_headlock, wait_for
from tests.test_cli import attempts, write_urls

A, B = "client-a", "client-b"
LONG = 60.0


def drafts(*keys: int | str) -> list[RequestDraft]:
    return [RequestDraft(unique_key=f"http://example.com/{k}", url=f"http://example.com/{k}") for k in keys]


def item(n: int | str) -> str:
    return json.dumps({"url": f"http://example.com/{n}", "n": n})


def done(request: Request) -> Request:
    return request.model_copy(update={"handled_at": utc_now()})


@pytest.fixture
async def queue(postgres_dsn: str) -> AsyncIterator[PostgresQueue]:
    opened = await PostgresQueue.open(postgres_dsn, "q")
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
async def dataset(queue: PostgresQueue) -> PostgresDataset:
    return await PostgresDataset.open(queue, "items")


async def raw(dsn: str) -> psycopg.AsyncConnection[Any]:
    """A connection of the test's own (autocommit), in the test's schema."""
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def rows(dsn: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    async with await raw(dsn) as conn:
        return await (await conn.execute(sql, args)).fetchall()


async def stored_items(dsn: str, name: str = "items") -> list[dict[str, Any]]:
    found = await rows(
        dsn,
        "SELECT i.item::text FROM headlock_items i JOIN headlock_datasets d USING (did) WHERE d.name = %s"
        " ORDER BY i.seq",
        name,
    )
    return [json.loads(text) for (text,) in found]


async def request_ids(dsn: str) -> set[str]:
    return {request_id for (request_id,) in await rows(dsn, "SELECT id FROM headlock_requests")}


async def wait_for_lock_wait(conn: psycopg.AsyncConnection[Any], statement: str = "") -> None:
    """Poll pg_stat_activity until a headlock connection waits on a lock in a statement starting with `statement`."""
    with anyio.fail_after(10):
        for _ in range(500):
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'headlock'"
                " AND wait_event_type = 'Lock' AND ltrim(query) LIKE %s",
                (f"{statement}%",),
            )
            row = await cursor.fetchone()
            if row is not None and row[0] > 0:
                return
            await anyio.sleep(0.02)


async def one_locked(queue: PostgresQueue, key: int | str = 0, *, lock_secs: float = LONG) -> Request:
    """Add the request `key` at the head and lock it as client A."""
    await queue.batch_add(drafts(key), client_key="filler", forefront=True)
    head = await queue.lock_head(limit=1, lock_secs=lock_secs, client_key=A)
    [request] = head.items
    return request


# -- one transaction, fenced on the lease -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_complete_writes_the_links_the_items_and_the_mark_together(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """Links (both ends of the queue), items in push order and the handled mark land; a link already in the queue
    is reported as not new; the counts follow; all of it in one transaction (one xmin)."""
    request = await one_locked(queue)
    await queue.batch_add(drafts("known"), client_key="filler")
    assert isinstance(queue, AtomicCompletion)
    assert queue.completes_into(dataset)
    result = await queue.complete(
        done(request),
        client_key=A,
        links={False: drafts("a", "b", "known"), True: drafts("front")},
        items=[item(1), item(2), item(3)],
        dataset=dataset,
    )
    assert result.new == {"http://example.com/a", "http://example.com/b", "http://example.com/front"}
    assert set(result.links) == result.new | {"http://example.com/known"}
    assert result.items == 3
    assert [i["n"] for i in await stored_items(postgres_dsn)] == [1, 2, 3]
    written = await rows(
        postgres_dsn,
        "SELECT DISTINCT xmin::text FROM headlock_items UNION SELECT xmin::text FROM headlock_requests"
        " WHERE id = %s OR data->>'uniqueKey' LIKE '%%/a'",
        request.id,
    )
    assert len(written) == 1
    stored = await queue.get_request(request.id)
    assert stored is not None
    assert stored.handled_at is not None
    head = await queue.lock_head(limit=10, lock_secs=LONG, client_key=B)
    assert [r.unique_key for r in head.items] == [f"http://example.com/{k}" for k in ("front", "known", "a", "b")]
    info = await queue.get_info()
    assert (info.total_request_count, info.handled_request_count) == (5, 1)


@pytest.mark.anyio
async def test_a_lease_lost_mid_commit_leaves_no_item_and_no_link(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """Another client retakes the request while the complete waits on its row (links and items written, the mark
    not yet): the mark matches no lock of ours, LockLostError, and none of the links or items remain."""
    request = await one_locked(queue)
    before = await request_ids(postgres_dsn)
    async with await raw(postgres_dsn) as thief:
        # The other client's claim of the (expired) lock, caught in its transaction: it holds the row.
        await thief.execute("BEGIN")
        await thief.execute("UPDATE headlock_requests SET lock_client = %s WHERE id = %s", (B, request.id))
        outcome: list[BaseException] = []

        async def commit() -> None:
            try:
                await queue.complete(
                    done(request), client_key=A, links={False: drafts("x", "y")}, items=[item(1)], dataset=dataset
                )
            except LockLostError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(commit)
            await wait_for_lock_wait(thief)  # the links and the item are in, the mark waits for the row
            await thief.execute("COMMIT")
    assert len(outcome) == 1
    assert "not locked by this client" in str(outcome[0])
    assert await stored_items(postgres_dsn) == []
    assert await request_ids(postgres_dsn) == before
    assert (await queue.get_info()).total_request_count == 1
    stored = await queue.get_request(request.id)
    assert stored is not None
    assert stored.handled_at is None


@pytest.mark.anyio
async def test_an_expired_lease_retaken_by_another_client_stores_nothing(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """A lock that ran out and was retaken: the late complete is refused whole; the new holder's commit lands."""
    request = await one_locked(queue, lock_secs=0.2)
    with anyio.fail_after(10):
        for _ in range(200):  # until the 0.2 s lock has run out on the database's clock
            retaken = await queue.lock_head(limit=1, lock_secs=LONG, client_key=B)
            if retaken.items:
                break
            await anyio.sleep(0.05)
    with pytest.raises(LockLostError):
        await queue.complete(done(request), client_key=A, links={False: drafts("x")}, items=[item(1)], dataset=dataset)
    assert await stored_items(postgres_dsn) == []
    await queue.complete(done(retaken.items[0]), client_key=B, links={}, items=[item(2)], dataset=dataset)
    assert [i["n"] for i in await stored_items(postgres_dsn)] == [2]


@pytest.mark.anyio
async def test_completes_at_once_share_transactions_and_a_refused_one_leaves_nothing(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """Ten completes at once, one of them for a lease another client took: nine land with their links and items in
    two transactions (the first alone, the rest grouped), the refused one leaves nothing; a link two of them sent
    is new for one."""
    await queue.batch_add(drafts(*range(10)), client_key="filler")
    head = await queue.lock_head(limit=10, lock_secs=LONG, client_key=A)
    assert len(head.items) == 10
    lost = head.items[4]
    async with await raw(postgres_dsn) as conn:
        await conn.execute("UPDATE headlock_requests SET lock_client = %s WHERE id = %s", (B, lost.id))
    refused: list[str] = []
    new: Counter[str] = Counter()

    async def commit(n: int, request: Request) -> None:
        try:
            result = await queue.complete(
                done(request),
                client_key=A,
                links={False: drafts(f"link-{n}", "shared", *(["late"] if n else []))},
                items=[item(n)],
                dataset=dataset,
            )
            new.update(result.new)
        except LockLostError:
            refused.append(request.id)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for n, request in enumerate(head.items):
                tg.start_soon(commit, n, request)
    assert refused == [lost.id]
    # A link several completes sent is new for one of them (in the first transaction, or within the group).
    assert new == Counter({f"http://example.com/link-{n}": 1 for n in range(10) if n != 4}) + Counter(
        {"http://example.com/shared": 1, "http://example.com/late": 1}
    )
    assert sorted(i["n"] for i in await stored_items(postgres_dsn)) == [n for n in range(10) if n != 4]
    keys = {key for (key,) in await rows(postgres_dsn, "SELECT data->>'uniqueKey' FROM headlock_requests")}
    assert "http://example.com/link-4" not in keys
    assert {f"http://example.com/link-{n}" for n in range(10) if n != 4} | {"http://example.com/shared"} <= keys
    transactions = await rows(postgres_dsn, "SELECT DISTINCT xmin::text FROM headlock_items")
    assert len(transactions) == 2
    info = await queue.get_info()
    assert (info.total_request_count, info.handled_request_count) == (21, 9)


@pytest.mark.anyio
async def test_a_complete_without_handled_at_or_into_another_handles_dataset_is_refused(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str, tmp_path: Path
) -> None:
    """A complete without handledAt, with a bad link, or into a dataset of another queue handle (another pool: no
    shared transaction) is refused before anything is written."""
    request = await one_locked(queue)
    with pytest.raises(InvalidInputError, match="handledAt"):
        await queue.complete(request, client_key=A, links={}, items=[], dataset=dataset)
    bad = RequestDraft(unique_key="http://example.com/bad", url="http://example.com/bad", id="not-its-id")
    with pytest.raises(InvalidInputError):
        await queue.complete(done(request), client_key=A, links={False: [bad]}, items=[item(1)], dataset=dataset)
    other = await PostgresQueue.open(postgres_dsn, "q")
    try:
        foreign = await PostgresDataset.open(other, "items")
        assert not queue.completes_into(foreign)
        local = await anyio.to_thread.run_sync(JsonlDataset.open, tmp_path, "d")
        assert not queue.completes_into(local)
        local.close()
        with pytest.raises(InvalidInputError, match="not a dataset of"):
            await queue.complete(done(request), client_key=A, links={}, items=[], dataset=foreign)
    finally:
        await other.aclose()
    assert (await queue.get_info()).handled_request_count == 0
    assert await stored_items(postgres_dsn) == []


@pytest.mark.anyio
async def test_completes_with_nothing_but_the_mark_go_as_one_statement_and_a_refused_one_alone_fails(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """No-op pages (no link, no item) at once, one of them retaken by another client: that one LockLostError, the
    rest handled by one statement (after the first, alone)."""
    await queue.batch_add(drafts(*range(6)), client_key="filler")
    head = await queue.lock_head(limit=6, lock_secs=LONG, client_key=A)
    async with await raw(postgres_dsn) as conn:
        await conn.execute("UPDATE headlock_requests SET lock_client = %s WHERE id = %s", (B, head.items[3].id))
    outcomes: dict[int, bool] = {}

    async def commit(n: int, request: Request) -> None:
        try:
            result = await queue.complete(done(request), client_key=A, links={}, items=[], dataset=dataset)
            outcomes[n] = result.items == 0 and not result.links
        except LockLostError:
            outcomes[n] = False

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for n, request in enumerate(head.items):
                tg.start_soon(commit, n, request)
    assert outcomes == {n: n != 3 for n in range(6)}
    marked = await rows(postgres_dsn, "SELECT DISTINCT xmin::text FROM headlock_requests WHERE order_no IS NULL")
    assert len(marked) == 2
    assert (await queue.get_info()).handled_request_count == 5


@pytest.mark.anyio
async def test_one_request_completed_twice_at_once_stores_its_items_once(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """Two completes of one request arriving together never share a transaction: the first lands, the second
    finds it handled (LockLostError), one item is stored."""
    await queue.batch_add(drafts("other"), client_key="filler")
    request = await one_locked(queue)
    other = (await queue.lock_head(limit=1, lock_secs=LONG, client_key=A)).items[0]
    outcomes: list[str] = []

    async def commit(request: Request, n: int) -> None:
        try:
            await queue.complete(done(request), client_key=A, links={}, items=[item(n)], dataset=dataset)
            outcomes.append("done")
        except LockLostError as exc:
            outcomes.append(str(exc))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit, other, 0)  # first: alone; the two below wait and go together
            tg.start_soon(commit, request, 1)
            tg.start_soon(commit, request, 2)
    assert outcomes.count("done") == 2
    assert len([o for o in outcomes if "already handled" in o]) == 1
    assert sorted(i["n"] for i in await stored_items(postgres_dsn)) in ([0, 1], [0, 2])


@pytest.mark.anyio
async def test_an_item_the_database_refuses_fails_its_own_complete_only(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """A group in which one complete carries an item the database refuses (not JSON) and one a text that is not
    UTF-8 (a lone surrogate): those fail with InvalidInputError and write nothing, the others are written."""
    await queue.batch_add(drafts(*range(4)), client_key="filler")
    head = await queue.lock_head(limit=4, lock_secs=LONG, client_key=A)
    errors: dict[int, str] = {}

    async def commit(n: int, request: Request) -> None:
        try:
            line = {2: "not json", 3: '{"a": "\ud800"}'}.get(n, item(n))
            await queue.complete(
                done(request), client_key=A, links={False: drafts(f"l{n}")}, items=[line], dataset=dataset
            )
        except InvalidInputError as exc:
            errors[n] = str(exc)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for n, request in enumerate(head.items):
                tg.start_soon(commit, n, request)
    assert sorted(errors) == [2, 3]
    assert errors[2].startswith(f"complete {head.items[2].id}: ")
    assert "UTF-8" in errors[3]
    assert sorted(i["n"] for i in await stored_items(postgres_dsn)) == [0, 1]
    keys = {key for (key,) in await rows(postgres_dsn, "SELECT data->>'uniqueKey' FROM headlock_requests")}
    assert not {"http://example.com/l2", "http://example.com/l3"} & keys
    assert {"http://example.com/l0", "http://example.com/l1"} <= keys
    stored = await queue.get_request(head.items[2].id)
    assert stored is not None
    assert stored.handled_at is None


@pytest.mark.anyio
async def test_two_clients_completing_with_links_to_each_others_requests_do_not_deadlock(
    postgres_dsn: str,
) -> None:
    """Each round, two workers complete requests whose links are the other's requests being completed at the same
    moment (links first, marks last: no wait cycle); every round ends with all of them handled."""
    queues = [await PostgresQueue.open(postgres_dsn, "q", pool_size=2) for _ in range(2)]
    try:
        sinks = [await PostgresDataset.open(q, "items") for q in queues]
        for n in range(40):
            keys = [f"r{n}-{side}-{k}" for side in range(2) for k in range(4)]
            await queues[0].batch_add(drafts(*keys), client_key="filler")
            held = []
            for side, q in enumerate(queues):
                head = await q.lock_head(limit=4, lock_secs=LONG, client_key=f"w{side}")
                held.append(head.items)
            assert [len(items) for items in held] == [4, 4]
            go = anyio.Event()

            async def commit(side: int, request: Request, go: anyio.Event = go, held: list[Any] = held) -> None:
                links = [RequestDraft(unique_key=r.unique_key, url=r.url) for r in held[1 - side]]
                await go.wait()
                await queues[side].complete(
                    done(request), client_key=f"w{side}", links={False: links}, items=[item(0)], dataset=sinks[side]
                )

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for side in range(2):
                        for request in held[side]:
                            tg.start_soon(commit, side, request)
                    go.set()
        info = await queues[0].get_info()
    finally:
        for q in queues:
            await q.aclose()
    assert (info.total_request_count, info.handled_request_count) == (320, 320)


# -- through the committer and the runtime ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_committer_completes_atomically_and_a_lost_lease_counts_as_lost(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """Committer.succeed goes through complete: links counted, `seen` learns them (`recent` is not kept: the head
    shows every add at once), items counted; a lease retaken mid-commit returns False, counts lost, stores nothing
    and teaches `seen` nothing."""
    stats = RunStats()
    leases = Leases()
    committer = Committer(queue, leases, dataset, stats, client_key=A, policy=RetryPolicy())
    first = await one_locked(queue, 0)
    lease = leases.add(first, anyio.current_time() + LONG)
    assert await committer.succeed(lease, {False: drafts("a", "b")}, [item(0)])
    assert (stats.handled, stats.enqueued, stats.items) == (1, 2, 1)
    assert "http://example.com/a" in committer.seen
    assert committer.recent is None
    second = await one_locked(queue, 1)
    lease = leases.add(second, anyio.current_time() + LONG)
    async with await raw(postgres_dsn) as thief:
        await thief.execute("BEGIN")
        await thief.execute("UPDATE headlock_requests SET lock_client = %s WHERE id = %s", (B, second.id))
        results: list[bool] = []

        async def commit() -> None:
            results.append(await committer.succeed(lease, {False: drafts("c")}, [item(1)]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(commit)
            await wait_for_lock_wait(thief)
            await thief.execute("COMMIT")
    assert results == [False]
    assert (stats.handled, stats.enqueued, stats.items, stats.lost) == (1, 2, 1, 1)
    assert "http://example.com/c" not in committer.seen
    assert [i["n"] for i in await stored_items(postgres_dsn)] == [0]
    assert second.id not in leases


async def linker(ctx: Any) -> None:
    """Push the page's URL; pages below 100 link to two more."""
    n = int(ctx.url.rsplit("/", 1)[1])
    await ctx.push_data({"url": ctx.url})
    if n < 100:
        await ctx.enqueue([f"http://example.com/{2 * n + 1}", f"http://example.com/{2 * n + 2}"])


@pytest.mark.anyio
async def test_a_run_commits_each_pages_item_with_its_handled_mark(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """`run()` over the postgres queue and dataset: every page once, each item in the transaction that marked its
    page handled (the item's xmin is the handled row's)."""
    workers = WorkerSettings(concurrency=8, lock_secs=30)
    with anyio.fail_after(60):
        summary = await run(queue, linker, dataset, workers=workers, start_urls=["http://example.com/0"])
    assert summary.stats["handled"] == 201
    urls = Counter(i["url"] for i in await stored_items(postgres_dsn))
    assert urls == Counter({f"http://example.com/{n}": 1 for n in range(201)})
    mismatched = await rows(
        postgres_dsn,
        "SELECT i.item->>'url' FROM headlock_items i JOIN headlock_requests r ON r.data->>'url' = i.item->>'url'"
        " WHERE r.xmin <> i.xmin OR r.order_no IS NOT NULL",
    )
    assert mismatched == []
    assert summary.results == dataset.location


# -- the dataset ------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_push_lines_appends_in_order_and_datasets_are_apart(
    queue: PostgresQueue, dataset: PostgresDataset, postgres_dsn: str
) -> None:
    """push_lines (the path outside complete) appends in order; two names are two datasets; opening one again
    finds it; count and drop; the location names the database and the dataset."""
    other = await PostgresDataset.open(queue, "other")
    assert await dataset.push_lines([item(1), item(2)]) == 2
    assert await other.push_lines([item(3)]) == 1
    assert await dataset.push_lines([]) == 0
    assert await dataset.push_lines([item(4)]) == 1
    assert [i["n"] for i in await stored_items(postgres_dsn)] == [1, 2, 4]
    assert [i["n"] for i in await stored_items(postgres_dsn, "other")] == [3]
    again = await PostgresDataset.open(queue, "items")
    assert again.did == dataset.did
    assert (await dataset.count(), await other.count()) == (3, 1)
    await other.drop()
    assert await stored_items(postgres_dsn, "other") == []
    assert await rows(postgres_dsn, "SELECT name FROM headlock_datasets") == [("items",)]
    assert dataset.location == f"{queue.database}, dataset 'items'"
    with pytest.raises(InvalidInputError, match="dataset name"):
        await PostgresDataset.open(queue, "")


@pytest.mark.anyio
async def test_a_version_1_database_gets_the_items_tables_and_keeps_its_queue(postgres_dsn: str) -> None:
    """A database migrated by the queue-only headlock (schema 1) is brought to this version on open: its queue
    and requests stay, the items tables appear."""
    async with await raw(postgres_dsn) as conn, conn.transaction():
        for statement in MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute("CREATE TABLE headlock_schema (one integer PRIMARY KEY CHECK (one = 1), version integer)")
        await conn.execute("INSERT INTO headlock_schema VALUES (1, 1)")
        await conn.execute("INSERT INTO headlock_queues (id, name) VALUES ('abcdefghijklmnopq', 'q')")
    queue = await PostgresQueue.open(postgres_dsn, "q")
    try:
        assert queue.queue_id == "abcdefghijklmnopq"
        dataset = await PostgresDataset.open(queue, "items")
        await dataset.push_lines([item(1)])
    finally:
        await queue.aclose()
    assert await rows(postgres_dsn, "SELECT version FROM headlock_schema") == [(SCHEMA_VERSION,)]
    assert [i["n"] for i in await stored_items(postgres_dsn)] == [1]


# -- settings and the CLI ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_results_go_to_the_queues_database_on_postgres_unless_told(postgres_dsn: str, tmp_path: Path) -> None:
    """auto on postgres: the postgres dataset, which the committer completes into; jsonl: the local file;
    results_backend postgres with another queue: a ConfigError naming both keys."""
    base = {"queue": {"backend": "postgres", "dsn": postgres_dsn}, "storage_dir": tmp_path, "dataset": "d"}
    async with open_run(load_settings(**base)) as backends:
        assert isinstance(backends.results, PostgresDataset)
        assert isinstance(backends.queue, PostgresQueue)
        assert backends.queue.completes_into(backends.results)
    async with open_run(load_settings(**base, results_backend="jsonl")) as backends:
        assert isinstance(backends.results, JsonlDataset)
    assert results_in_postgres(load_settings(**base, results_backend="postgres"))
    assert not results_in_postgres(load_settings(storage_dir=tmp_path))
    wrong = Settings(results_backend="postgres", storage_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"results_backend: 'postgres' needs queue\.backend 'postgres'"):
        results_in_postgres(wrong)
    with pytest.raises(ConfigError, match="results_backend"):
        async with open_run(wrong):
            pass


@pytest.mark.slow
def test_export_reads_the_postgres_dataset_as_jsonl_json_and_csv(postgres_dsn: str, tmp_path: Path) -> None:
    """`headlock export` on the postgres backend streams the dataset in push order, key order kept: JSONL as
    stored, one JSON array, CSV with the columns first seen; a missing dataset is exit 2."""
    env = {"HEADLOCK_QUEUE__BACKEND": "postgres", "HEADLOCK_QUEUE__DSN": postgres_dsn}
    lines = [json.dumps({"url": f"u{n}", "b": n, **({"nested": {"x": [n]}} if n % 2 else {})}) for n in range(5)]

    async def fill() -> None:
        queue = await PostgresQueue.open(postgres_dsn, "default")
        try:
            await (await PostgresDataset.open(queue, "default")).push_lines(lines)
        finally:
            await queue.aclose()

    anyio.run(fill)
    jsonl = headlock("export", cwd=tmp_path, **env)
    assert jsonl.returncode == 0, jsonl.stderr
    assert jsonl.stdout.splitlines() == lines
    as_json = headlock("export", "--format", "json", "-o", "out.json", cwd=tmp_path, **env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == [json.loads(line) for line in lines]
    as_csv = headlock("export", "--format", "csv", cwd=tmp_path, **env)
    assert as_csv.returncode == 0, as_csv.stderr
    # (text mode reads the \r\n line ends as \n)
    assert as_csv.stdout.splitlines()[:3] == ["url,b,nested", "u0,0,", 'u1,1,"{""x"":[1]}"']
    missing = headlock("export", "--dataset", "nope", cwd=tmp_path, **env)
    assert missing.returncode == 2
    assert "no dataset 'nope'" in missing.stderr


# -- crashes ----------------------------------------------------------------------------------------------------------


def pg_count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return 0 if row is None else int(row[0])


@pytest.fixture
def crash_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(backend, environment) for `headlock run` on the embedded store or postgres."""
    kind: str = request.param
    if kind == "embedded":
        yield kind, {}
        return
    dsn = request.getfixturevalue("postgres_dsn")
    yield kind, {"HEADLOCK_QUEUE__BACKEND": "postgres", "HEADLOCK_QUEUE__DSN": dsn}


@pytest.mark.slow
@pytest.mark.parametrize("crash_env", ["postgres", "embedded"], indirect=True)
def test_kill_9_mid_commit_then_a_rerun_stores_each_item_once_on_postgres_only(
    crash_env: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """`headlock run` is SIGKILLed while its commits wait on the queue (the items written, the handled marks
    behind another writer's lock), then run again: on postgres every page's item is in the dataset once; the
    embedded store (items in a file, marks in the queue) stores the waiting pages' items twice."""
    kind, env = crash_env
    count = 8
    log, gate = tmp_path / "attempts.log", tmp_path / "gate"
    cfg = run_config(
        tmp_path / "c.toml", "gated", log, concurrency=4, prefetch=0, lock_secs=30, client_key="crash-1",
        options={"gate": str(gate)},
    )  # fmt: skip
    added = headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path, **env)
    assert added.returncode == 0, added.stderr
    proc = start_headlock("run", "--config", str(cfg), cwd=tmp_path, **env)
    with reaped(proc), writer_lock(kind, env, tmp_path) as hold:
        wait_for(lambda: sum(attempts(log).values()) == 4, 30, "four handlers to start")
        hold()  # the queue's rows (postgres) or its file (embedded) now wait behind another writer
        gate.touch()
        _wait_for_blocked_commit(kind, env, tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    gate.touch()
    again = headlock("run", "--config", str(cfg), cwd=tmp_path, timeout=90, **env)
    assert again.returncode == 0, again.stderr[-3000:]
    urls = Counter(i["url"] for i in _items(kind, env, tmp_path))
    assert set(urls) == {f"https://a.example/p{n}" for n in range(count)}
    twice = sorted(url for url, seen in urls.items() if seen > 1)
    if kind == "postgres":
        assert twice == []
    else:
        assert len(twice) == 4  # the four whose items were in the file when the process died


@contextlib.contextmanager
def writer_lock(kind: str, env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A call that takes another writer's lock on the queue (postgres: every unhandled row; embedded: the database
    file), released on exit."""
    held: list[psycopg.Connection[Any] | sqlite3.Connection] = []

    def hold() -> None:
        if kind == "postgres":
            conn = psycopg.connect(env["HEADLOCK_QUEUE__DSN"])
            conn.execute("SELECT 1 FROM headlock_requests WHERE order_no IS NOT NULL FOR UPDATE")
            held.append(conn)
        else:
            lite = sqlite3.connect(queue_path(tmp_path / "storage", "default"), isolation_level=None)
            lite.execute("BEGIN IMMEDIATE")
            held.append(lite)

    try:
        yield hold
    finally:
        for conn in held:
            conn.rollback()
            conn.close()


def _wait_for_blocked_commit(kind: str, env: dict[str, str], tmp_path: Path) -> None:
    """Until the run's commits are inside their transaction (postgres: a mark waits on the row lock) or past their
    push (embedded: the four items are in the file, the marks wait for the database)."""
    if kind == "postgres":
        dsn = env["HEADLOCK_QUEUE__DSN"]
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'headlock' AND wait_event_type = 'Lock'"
            " AND query LIKE '%UPDATE headlock_requests r%'"
        )
        wait_for(lambda: pg_count(dsn, sql) > 0, 20, "a handled mark to wait on the row lock")
    else:
        path = tmp_path / "storage" / "datasets" / "default.jsonl"
        wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 4, 20, "the four items in the file")


def _items(kind: str, env: dict[str, str], tmp_path: Path) -> list[dict[str, Any]]:
    if kind == "embedded":
        text = (tmp_path / "storage" / "datasets" / "default.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]
    exported = headlock("export", cwd=tmp_path, **env)
    assert exported.returncode == 0, exported.stderr
    return [json.loads(line) for line in exported.stdout.splitlines()]


@pytest.mark.slow
def test_kill_9_mid_crawl_then_a_rerun_stores_every_pages_item_once(
    postgres_dsn: str, site: str, tmp_path: Path
) -> None:
    """A crawl on postgres SIGKILLed once 30 pages are in, then run again under the same client key: every page the
    queue handled has exactly one item, and nothing is pending."""
    env = {"HEADLOCK_QUEUE__BACKEND": "postgres", "HEADLOCK_QUEUE__DSN": postgres_dsn}
    assert headlock("enqueue", f"{site}/page/0", cwd=tmp_path, **env).returncode == 0
    args = ["run", "--handler", "handlers.crawl:handle", "-O", "max_depth=3", "--concurrency", "8"]
    env_run = {**env, "HEADLOCK_WORKERS__CLIENT_KEY": "crawler-1"}
    proc = start_headlock(*args, cwd=tmp_path, **env_run)
    with reaped(proc):
        wait_for(lambda: pg_count(postgres_dsn, "SELECT count(*) FROM headlock_items") >= 30, 60, "30 items")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    again = headlock(*args, cwd=tmp_path, timeout=120, **env_run)
    assert again.returncode == 0, again.stderr[-3000:]
    urls = Counter(i["url"] for i in _items("postgres", env, tmp_path))
    handled = pg_count(postgres_dsn, "SELECT count(*) FROM headlock_requests WHERE order_no IS NULL")
    assert set(urls.values()) == {1}
    assert len(urls) == handled
    assert pg_count(postgres_dsn, "SELECT count(*) FROM headlock_requests WHERE order_no IS NOT NULL") == 0
