"""`headlock trim` through the real CLI: handled requests of a finished queue deleted, failed ones and the counts
kept, other queues untouched, the vacuum, the refusals, and a request requeued while the delete waits."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from runner.models import RequestDraft, with_failed_mark
from runner.queue.postgres import PostgresQueue
from runner.queue.sqlite import SqliteQueue, queue_path
from runner.uniquekey import request_id_for
from tests.conftest import headlock, reaped, start_headlock, wait_for

Queue = SqliteQueue | PostgresQueue
HANDLED_AT = datetime(2026, 12, 1, tzinfo=UTC).isoformat()


def drafts(start: int, stop: int, *, handled: bool = False, failed: bool = False) -> list[RequestDraft]:
    """Drafts `k<start>`..`k<stop-1>` (long URLs, so the rows weigh something), stored handled or failed if asked."""
    extra: dict[str, Any] = {"handledAt": HANDLED_AT} if handled or failed else {}
    user_data = with_failed_mark({}) if failed else {}
    return [
        RequestDraft(unique_key=f"k{i}", url=f"https://a.example/{'x' * 300}/{i}", user_data=user_data, **extra)
        for i in range(start, stop)
    ]


async def fill(queue: Queue, *, handled: int, failed: int, pending: int = 0) -> None:
    """`handled` handled requests, then `failed` failed and `pending` pending ones."""
    ranges = [(0, handled, {"handled": True}), (handled, handled + failed, {"failed": True})]
    ranges.append((handled + failed, handled + failed + pending, {}))
    for start, stop, kind in ranges:
        for first in range(start, stop, 25):
            await queue.batch_add(drafts(first, min(first + 25, stop), **kind), client_key="filler")


async def rows(queue: Queue, state: str) -> int:
    """How many requests the queue lists in `state` (a full listing, bounded)."""
    count, after = 0, None
    for _ in range(100):
        page = await queue.list_requests(after=after, limit=1000, **{state: True})
        count += len(page.items)
        after = page.next_after
        if after is None:
            return count
    raise AssertionError("listing did not end")


class Where:
    """The test's queue on one backend: the CLI's environment and a way to open it from the test."""

    def __init__(self, kind: str, tmp_path: Path, dsn: str | None) -> None:
        self.kind, self.tmp_path, self.dsn = kind, tmp_path, dsn
        self.env = {"HEADLOCK_QUEUE__BACKEND": "postgres", "HEADLOCK_QUEUE__DSN": dsn} if dsn else {}

    async def open(self, name: str = "default") -> Queue:
        if self.dsn is not None:
            return await PostgresQueue.open(self.dsn, name)
        return SqliteQueue.open(self.tmp_path / "storage", name)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return headlock(*args, cwd=self.tmp_path, **self.env)

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@pytest.fixture(params=["embedded", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    """The test's queue on the embedded store (a fresh directory) or Postgres (a fresh schema)."""
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgres" else None
    return Where(request.param, tmp_path, dsn)


def build(where: Where, *, handled: int, failed: int, pending: int = 0, other: int = 0) -> None:
    """The queue `default` filled so, and a queue `other` with `other` handled requests."""

    async def make() -> None:
        for name, counts in (("default", (handled, failed, pending)), ("other", (other, 0, 0))):
            if name == "other" and not other:
                continue
            queue = await where.open(name)
            try:
                await fill(queue, handled=counts[0], failed=counts[1], pending=counts[2])
            finally:
                await queue.aclose()

    anyio.run(make)


def listed(where: Where, name: str = "default") -> dict[str, int]:
    """Handled, failed and pending requests the queue `name` still stores."""

    async def read() -> dict[str, int]:
        queue = await where.open(name)
        try:
            return {state: await rows(queue, state) for state in ("handled", "failed", "pending")}
        finally:
            await queue.aclose()

    return anyio.run(read)


def test_trim_deletes_the_handled_requests_and_keeps_the_failed_ones_and_the_counts(where: Where) -> None:
    """A finished queue of 600 handled and 3 failed requests: the 600 rows go, the 3 stay, `status` says the same
    as before, another queue beside it keeps its rows, and the store is vacuumed."""
    build(where, handled=600, failed=3, other=40)
    before = where.status()
    done = where.cli("trim", "--yes")
    assert done.returncode == 0, done.stderr
    assert "deleted 600 requests handled in queue 'default'" in done.stdout
    assert "3 requests failed kept" in done.stdout
    assert listed(where) == {"handled": 0, "failed": 3, "pending": 0}
    assert where.status() == before
    assert (before["total"], before["handled"], before["failed"]) == (603, 600, 3)
    requeue = where.cli("requeue", "--failed")  # the failed ones can still be run again
    assert requeue.returncode == 0, requeue.stderr
    assert "requeued 3 failed requests" in requeue.stdout
    if where.dsn is not None:
        assert listed(where, "other")["handled"] == 40
        with psycopg.connect(where.dsn) as conn:
            vacuumed = conn.execute(
                "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables"
                " WHERE relname = 'headlock_requests' AND schemaname = current_schema()"
            ).fetchone()
        assert vacuumed == (True,)
        assert "VACUUM FULL headlock_requests" in done.stdout
    else:
        sizes = [line for line in done.stdout.splitlines() if line.startswith("queue file:")]
        before_mb, after_mb = (float(part.split()[0]) for part in sizes[0][len("queue file: ") :].split(", "))
        assert after_mb < before_mb / 2  # VACUUM gave the space back: the file shrank


def test_a_queue_that_is_not_finished_is_refused_and_left_as_it_is(where: Where) -> None:
    """One request still pending: trim says why it refuses, exits 1 and deletes nothing."""
    build(where, handled=30, failed=0, pending=1)
    done = where.cli("trim", "--yes")
    assert done.returncode == 1
    assert "is not finished: 1 pending, 0 locked" in done.stderr
    assert listed(where) == {"handled": 30, "failed": 0, "pending": 1}


def test_a_dry_run_counts_and_deletes_nothing(where: Where) -> None:
    """`--dry-run` says how many would go and leaves every row (no `--yes` needed)."""
    build(where, handled=30, failed=2)
    done = where.cli("trim", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would delete 30 requests handled in queue 'default'" in done.stdout
    assert listed(where) == {"handled": 30, "failed": 2, "pending": 0}


def test_trim_without_yes_off_a_terminal_is_refused(tmp_path: Path) -> None:
    """stdin is not a terminal and there is no `--yes`: exit 2, nothing deleted."""
    where = Where("embedded", tmp_path, None)
    build(where, handled=10, failed=0)
    done = where.cli("trim")
    assert done.returncode == 2
    assert "pass --yes" in done.stderr
    assert listed(where)["handled"] == 10


def test_a_missing_queue_is_said_and_nothing_is_created(tmp_path: Path, postgres_dsn: str) -> None:
    """No such queue: one line, exit 1, and neither a queue file nor a table is made."""
    done = headlock("trim", "--yes", cwd=tmp_path)
    assert done.returncode == 1
    assert "no queue 'default'" in done.stderr
    assert not queue_path(tmp_path / "storage", "default").exists()
    env = {"HEADLOCK_QUEUE__BACKEND": "postgres", "HEADLOCK_QUEUE__DSN": postgres_dsn}
    done = headlock("trim", "--yes", cwd=tmp_path, **env)
    assert done.returncode == 1
    assert "no queue 'default'" in done.stderr
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT to_regclass('headlock_queues')").fetchone() == (None,)


def test_the_api_backend_is_refused_with_the_reason(tmp_path: Path) -> None:
    """On the apify backend trim is a usage error that says where it works, before any call."""
    done = headlock("trim", "--yes", "--backend", "apify", "--api-base-url", "http://127.0.0.1:9", cwd=tmp_path)
    assert done.returncode == 2
    assert "trim works on the embedded and postgres backends" in done.stderr


@pytest.mark.slow
def test_a_request_requeued_while_the_delete_waits_for_it_is_not_deleted(tmp_path: Path, postgres_dsn: str) -> None:
    """Another transaction holds a handled request's row and makes it pending: the delete waits for it, then sees
    the new version and leaves it; every other handled request goes."""
    where = Where("postgres", tmp_path, postgres_dsn)
    build(where, handled=60, failed=0)
    target = request_id_for("k7")
    with psycopg.connect(postgres_dsn) as holder:
        cursor = holder.execute(
            "UPDATE headlock_requests SET order_no = (extract(epoch FROM now()) * 1000000)::bigint * 1024"
            " WHERE id = %s RETURNING id",
            (target,),
        )
        assert cursor.fetchone() == (target,)  # uncommitted: trim's snapshot sees a finished queue
        proc = start_headlock("trim", "--yes", cwd=tmp_path, **where.env)
        with reaped(proc):

            def waiting() -> bool:
                with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = 'headlock trim' AND wait_event_type = 'Lock'"
                    ).fetchone()
                return row is not None and row[0] > 0

            wait_for(waiting, 30, "trim's delete to wait for the held row")
            holder.commit()
            out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "deleted 59 requests handled" in out
    assert listed(where) == {"handled": 0, "failed": 0, "pending": 1}
