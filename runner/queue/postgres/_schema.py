"""The PostgreSQL queue's schema: versioned migrations under an advisory lock, and finding or creating a queue."""

from __future__ import annotations

import secrets
import string
from typing import Any

import psycopg
import structlog

from runner.errors import QueueUnavailableError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "find_queue", "migrate"]

Conn = psycopg.AsyncConnection[Any]

_log = structlog.get_logger("headlock.queue.postgres")

ADVISORY_CLASS = 0x6865_6164  # "head": the first key of the migration's advisory lock; the second is the schema's

SCHEMA_VERSION = 2
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE headlock_queues (
            qid integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            name text UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE headlock_clients (
            qid integer NOT NULL REFERENCES headlock_queues ON DELETE CASCADE,
            client_key text NOT NULL,
            total bigint NOT NULL DEFAULT 0,
            handled bigint NOT NULL DEFAULT 0,
            modified_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (qid, client_key)
        )""",
        # No foreign key to the queue: its check would take a share lock on the one queue row in every insert.
        # Autovacuum settings for a table whose head is rewritten all the time (as pgqueuer ships them).
        """CREATE TABLE headlock_requests (
            qid integer NOT NULL,
            id text NOT NULL,
            order_no bigint,
            lock_client text,
            failed boolean NOT NULL DEFAULT false,
            data json NOT NULL,
            PRIMARY KEY (qid, id)
        ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
                autovacuum_vacuum_cost_delay = 0)""",
        "CREATE INDEX headlock_requests_head ON headlock_requests (qid, order_no) WHERE order_no IS NOT NULL",
        "CREATE INDEX headlock_requests_failed ON headlock_requests (qid, id) WHERE failed",
    ),
    (
        # Results beside the queue (`runner.results.postgres`): one items table keyed by dataset, ordered by an
        # identity sequence (push order). `json`, not `jsonb`: an item keeps its text, key order included, as the
        # other datasets keep it (export's CSV columns come in the order first seen), and every item encode_item
        # accepts is storable (jsonb refuses \u0000). No foreign key, as for the requests.
        """CREATE TABLE headlock_datasets (
            did integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE headlock_items (
            did integer NOT NULL,
            seq bigint GENERATED ALWAYS AS IDENTITY,
            item json NOT NULL,
            PRIMARY KEY (did, seq)
        )""",
    ),
)
"""Migration n takes the schema from version n to n + 1; append, never edit."""


async def find_queue(conn: Conn, name: str, *, create: bool) -> tuple[int, str] | None:
    """Migrate the schema (unless `create` is false and there is none), then find (or create) the queue `name`.

    Raises:
        QueueUnavailableError: the schema is newer than this version knows, or tables of these names are not
            headlock's.
    """
    if not create:
        exists = await (await conn.execute("SELECT to_regclass('headlock_queues') IS NOT NULL")).fetchone()
        if exists is None or not exists[0]:
            return None
    await migrate(conn)
    if create:
        alphabet = string.ascii_letters + string.digits
        queue_id = "".join(secrets.choice(alphabet) for _ in range(17))
        await conn.execute(
            "INSERT INTO headlock_queues (id, name) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (queue_id, name)
        )
    row = await (await conn.execute("SELECT qid, id FROM headlock_queues WHERE name = %s", (name,))).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


async def migrate(conn: Conn) -> None:
    """Bring the schema to `SCHEMA_VERSION` in one transaction, under an advisory lock per schema: workers opening
    at once wait for the first, then find it done."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(coalesce(current_schema(), '')))", (ADVISORY_CLASS,)
        )
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS headlock_schema"
            " (one integer PRIMARY KEY CHECK (one = 1), version integer NOT NULL)"
        )
        row = await (await conn.execute("SELECT version FROM headlock_schema")).fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise QueueUnavailableError(
                f"the database holds headlock schema version {version}, newer than this headlock's"
                f" ({SCHEMA_VERSION}): upgrade headlock",
                endpoint="open queue",
            )
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                await conn.execute(statement)
        if version != SCHEMA_VERSION:
            _log.info("queue.schema_migrated", version=SCHEMA_VERSION, previous=version)
            await conn.execute(
                "INSERT INTO headlock_schema (one, version) VALUES (1, %s)"
                " ON CONFLICT (one) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )
