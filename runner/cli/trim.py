"""`headlock trim`: delete the handled requests of a finished queue and give their space back.

A queue keeps every request it ever held, handled ones included: that is how it knows a URL was crawled (an
enqueue of it again is a no-op). On a queue that is done with, those rows are only weight: in PostgreSQL they share
one table (and its indexes) with every other queue of the schema. `trim` deletes the handled requests that ended
well, in batches of `BATCH` (short transactions: workers of other queues go on meanwhile), keeps the failed ones
(`headlock requests --failed`, `requeue --failed` still work), keeps the counts (`status` still says what the
crawl did), and vacuums: `VACUUM (ANALYZE)` of the requests table on postgres (the space becomes reusable by new
rows; the file does not shrink, see `VACUUM_FULL_HINT`), `VACUUM` of the queue's own file on the embedded store
(the file shrinks).

It refuses a queue that is not finished (a pending or locked request): a handler of the running crawl that found a
trimmed URL again would crawl it again. The same holds afterwards: trimming forgets which URLs were crawled, so
enqueueing one of them later crawls it again. Every statement deletes only rows that are handled and not failed at
that moment, so a request requeued or added meanwhile is never deleted.

Exit codes: 0 done (also when there was nothing to delete); 1 no such queue, the queue is not finished, or the
prompt was declined; 2 bad usage (`--yes` missing when stdin is not a terminal; the apify backend).
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import structlog

from runner.cli._common import EXIT_FATAL, EXIT_OK, EXIT_USAGE
from runner.errors import ConfigError, NotFoundError, QueueUnavailableError
from runner.open import open_postgres, postgres_dsn
from runner.queue.sqlite import SqliteQueue, queue_path, validate_queue_name
from runner.settings import Settings

if TYPE_CHECKING:
    from runner.queue.postgres import PostgresQueue

__all__ = ["BATCH", "VACUUM_FULL_HINT", "TrimResult", "add_parsers", "trim_command"]

log = structlog.get_logger("headlock.cli")

BATCH = 5000
"""Requests deleted per statement (each its own short transaction)."""
_MAX_BATCHES = 100_000
"""Most delete statements one trim runs (bounds the loop: 500 million requests)."""
_STATEMENT_TIMEOUT_MS = 300_000
"""A delete statement (one batch) the server cancels after this long; VACUUM runs unbounded (it can be long)."""
VACUUM_FULL_HINT = (
    "the freed space is reusable by new requests; to give it back to the operating system run"
    " `VACUUM FULL headlock_requests` (it locks the table, and so every queue of the schema, while it rewrites it)"
    " or pg_repack"
)

# The next batch of handled requests that ended well (in id order, after the last batch's), deleted with the
# condition checked again by the DELETE itself: a row requeued or failed meanwhile stays (READ COMMITTED re-reads a
# row it waited for). Answers the batch's size and last id (the paging) and how many rows went.
_PG_DELETE = """
WITH d AS (
    SELECT id FROM headlock_requests
    WHERE qid = %(q)s AND id > %(after)s AND order_no IS NULL AND NOT failed
    ORDER BY id LIMIT %(n)s
),
x AS (
    DELETE FROM headlock_requests r USING d
    WHERE r.qid = %(q)s AND r.id = d.id AND r.order_no IS NULL AND NOT r.failed
    RETURNING r.id
)
SELECT (SELECT count(*) FROM d), (SELECT max(id) FROM d), (SELECT count(*) FROM x)
"""
_PG_COUNT = "SELECT count(*) FILTER (WHERE NOT failed), count(*) FILTER (WHERE failed) FROM headlock_requests"
_PG_COUNT += " WHERE qid = %s AND order_no IS NULL"
_SQLITE_DELETE = (
    "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests WHERE order_no IS NULL AND failed = 0 LIMIT ?)"
)
_SQLITE_COUNT = "SELECT count(*) FILTER (WHERE failed = 0), count(*) FILTER (WHERE failed = 1) FROM requests"
_SQLITE_COUNT += " WHERE order_no IS NULL"


@dataclass(slots=True)
class TrimResult:
    """What a trim did (or, dry, would do): handled requests deleted, failed ones kept, sizes in bytes."""

    deleted: int = 0
    kept_failed: int = 0
    size_before: int | None = None
    size_after: int | None = None
    notices: list[str] = field(default_factory=list)


def _say(message: str) -> None:
    print(message)  # noqa: T201 - the command's output


def _error(message: str) -> None:
    print(f"headlock: error: {message}", file=sys.stderr)  # noqa: T201 - the command's output


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 1024 / 1024:.1f} MB"


def _requests(count: int) -> str:
    return f"{count:,} request{'' if count == 1 else 's'}"


# -- postgres ---------------------------------------------------------------------------------------------------------


async def _trim_postgres(settings: Settings, queue: PostgresQueue, *, dry_run: bool, vacuum: bool) -> TrimResult:
    """Delete (or count) the queue's handled requests on a connection of its own, then vacuum the table.

    Raises:
        QueueUnavailableError: the database failed a statement or could not be reached (without the password).
    """
    import psycopg  # noqa: PLC0415 - only this backend needs psycopg
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    from runner.queue.postgres import redact  # noqa: PLC0415

    dsn = postgres_dsn(settings)
    secrets = [str(conninfo_to_dict(dsn).get("password") or "")]
    result = TrimResult()
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=30, application_name="headlock trim"
        )
    except psycopg.Error as exc:
        raise QueueUnavailableError(
            f"cannot connect to {queue.database}: {redact(str(exc), secrets)}", endpoint="trim"
        ) from None  # the cause's message may carry connection details
    conn.add_notice_handler(lambda notice: result.notices.append(f"{notice.severity}: {notice.message_primary}"))
    try:
        await conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(_STATEMENT_TIMEOUT_MS),))
        row = await (await conn.execute(_PG_COUNT, (queue.qid,))).fetchone()
        assert row is not None  # noqa: S101 - an aggregate always returns its row
        result.kept_failed = int(row[1])
        if dry_run:
            result.deleted = int(row[0])
            return result
        size = "SELECT pg_total_relation_size('headlock_requests')"
        result.size_before = int((await (await conn.execute(size)).fetchone() or [0])[0])
        after = ""
        for _ in range(_MAX_BATCHES):
            cursor = await conn.execute(_PG_DELETE, {"q": queue.qid, "after": after, "n": BATCH})
            batch, last, deleted = await cursor.fetchone() or (0, None, 0)
            result.deleted += int(deleted)
            if batch < BATCH or last is None:
                break
            after = last
        if vacuum:
            await conn.execute("SET statement_timeout = 0")
            await conn.execute("VACUUM (ANALYZE) headlock_requests")
        result.size_after = int((await (await conn.execute(size)).fetchone() or [0])[0])
    except psycopg.Error as exc:
        raise QueueUnavailableError(
            f"{queue.database}: {redact(str(exc), secrets)}", endpoint="trim", maybe_applied=True
        ) from None
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()
    return result


# -- the embedded store -----------------------------------------------------------------------------------------------


def _trim_sqlite(path: Path, *, dry_run: bool, vacuum: bool) -> TrimResult:
    """Delete (or count) the handled requests of the queue file, then VACUUM it (in a thread: blocking).

    Raises:
        QueueUnavailableError: SQLite failed (the file is busy past 30 s, damaged, or the disk is full).
    """
    result = TrimResult()
    try:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=30)) as db:
            deleted, failed = db.execute(_SQLITE_COUNT).fetchone()
            result.kept_failed = int(failed)
            if dry_run:
                result.deleted = int(deleted)
                return result
            result.size_before = _file_size(path)
            for _ in range(_MAX_BATCHES):
                cursor = db.execute(_SQLITE_DELETE, (BATCH,))
                result.deleted += cursor.rowcount
                if cursor.rowcount < BATCH:
                    break
            if vacuum:
                db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        result.size_after = _file_size(path)
    except sqlite3.Error as exc:
        raise QueueUnavailableError(f"{path}: {exc}", endpoint="trim", maybe_applied=True) from exc
    return result


def _file_size(path: Path) -> int:
    """The queue file's size with its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


# -- the command ------------------------------------------------------------------------------------------------------


async def _open(settings: Settings) -> SqliteQueue | PostgresQueue | None:
    """The configured queue if it exists (None, said on stderr, when it does not); nothing is created.

    Raises:
        ConfigError: the apify backend, an invalid queue name, no DSN.
    """
    name = settings.queue.name
    if settings.queue.backend == "postgres":
        try:
            return await open_postgres(settings, create=False)
        except NotFoundError as exc:
            _error(f"{exc} (nothing was created)")
            return None
    if settings.queue.backend == "embedded":
        path = queue_path(settings.storage_dir, validate_queue_name(name))
        if not await anyio.to_thread.run_sync(path.is_file):
            _error(f"no queue {name!r}: {path} does not exist (nothing was created)")
            return None
        return SqliteQueue(path)
    raise ConfigError(
        f"trim: queue.backend {settings.queue.backend!r} keeps its requests on the API's server, which manages their"
        " storage; trim works on the embedded and postgres backends"
    )


async def _confirm(what: str, yes: bool) -> int | None:
    """None when the trim may go on; else the exit code (not a terminal to ask on, or declined)."""
    if yes:
        return None
    if not sys.stdin.isatty():
        _error(f"trim deletes {what} for good: pass --yes (stdin is not a terminal to ask on)")
        return EXIT_USAGE
    try:
        answer = await anyio.to_thread.run_sync(input, f"Delete {what}? This cannot be undone. [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        _say("nothing deleted")
        return EXIT_FATAL
    return None


def _where(queue: SqliteQueue | PostgresQueue) -> str:
    return str(queue.path) if isinstance(queue, SqliteQueue) else f"in {queue.database}"


async def _trim(settings: Settings, queue: SqliteQueue | PostgresQueue, *, dry_run: bool, vacuum: bool) -> TrimResult:
    if isinstance(queue, SqliteQueue):
        path = queue.path
        await queue.aclose()  # its connection would keep VACUUM waiting
        return await anyio.to_thread.run_sync(lambda: _trim_sqlite(path, dry_run=dry_run, vacuum=vacuum))
    return await _trim_postgres(settings, queue, dry_run=dry_run, vacuum=vacuum)


async def trim_command(settings: Settings, args: argparse.Namespace) -> int:
    """Check the queue is finished, ask (unless `--yes` or `--dry-run`), delete, vacuum, report."""
    queue = await _open(settings)
    if queue is None:
        return EXIT_FATAL
    name = repr(settings.queue.name)
    try:
        where = _where(queue)
        counts = await queue.counts()
        if counts.pending or counts.locked:
            _error(
                f"queue {name} ({where}) is not finished: {counts.pending:,} pending, {counts.locked:,} locked."
                " trim deletes handled requests, and a crawl that found one of their URLs again would crawl it again:"
                " let the crawl end first (or delete the whole queue with `headlock purge`)"
            )
            return EXIT_FATAL
        if not args.dry_run:
            refused = await _confirm(f"the handled requests of queue {name} ({where})", args.yes)
            if refused is not None:
                return refused
        result = await _trim(settings, queue, dry_run=args.dry_run, vacuum=not args.no_vacuum)
    finally:
        await queue.aclose()
    _report(name, where, result, dry_run=args.dry_run, postgres=settings.queue.backend == "postgres")
    return EXIT_OK


def _report(name: str, where: str, result: TrimResult, *, dry_run: bool, postgres: bool) -> None:
    kept = f"; {_requests(result.kept_failed)} failed kept" if result.kept_failed else ""
    if dry_run:
        _say(f"would delete {_requests(result.deleted)} handled in queue {name} ({where}){kept} (dry run)")
        return
    _say(f"deleted {_requests(result.deleted)} handled in queue {name} ({where}){kept}; the counts stay as they were")
    what = "table headlock_requests (every queue of the schema)" if postgres else "queue file"
    _say(f"{what}: {_mb(result.size_before)} before, {_mb(result.size_after)} after")
    for notice in result.notices:
        _say(f"postgres said: {notice}")
    if postgres and result.deleted:
        _say(VACUUM_FULL_HINT)
    log.info(
        "trim.done",
        deleted=result.deleted,
        kept_failed=result.kept_failed,
        size_before=result.size_before,
        size_after=result.size_after,
    )


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `trim`."""
    trim = commands.add_parser(
        "trim",
        parents=[common],
        help="delete the handled requests of a finished queue and vacuum (failed ones and the counts stay)",
    )
    trim.add_argument("--dry-run", action="store_true", help="only say how many would be deleted")
    trim.add_argument("--no-vacuum", action="store_true", help="delete only; leave the vacuum to autovacuum")
    trim.add_argument("--yes", "-y", action="store_true", help="do not ask (required when stdin is not a terminal)")
    trim.set_defaults(command=trim_command, needs_settings=True)
