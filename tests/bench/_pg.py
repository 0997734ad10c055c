"""What the Postgres benchmarks share: a throwaway cluster tuned like a server, schemas per run, and server CPU.

The cluster comes from `tests/_postgres.py` (initdb into /tmp, a unix socket only) but is then set up as a server
would be, not as the tests' (which turn fsync off): `fsync`, `full_page_writes` on, `synchronous_commit` as asked
(Postgres's default is on; off is the nearer match for the embedded store's `synchronous=NORMAL` in WAL mode, which
may lose the last commits on a power cut but not on a crash of the process), `max_wal_size` 1 GB (the default 1 GB
since PG 14 too; a smaller one checkpoints during the runs), `shared_buffers` 256 MB.

Server CPU: the postmaster's own and reaped children's time (`/proc/PID/stat` utime, stime, cutime, cstime) plus
every live child's, so backends, autovacuum and the WAL writer are all counted, including backends that exited. The
postmaster is found as the parent of a backend (`pg_backend_pid()`), so this also works for a server given by DSN
when it runs on this machine; elsewhere the figure is None.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from tests._postgres import Postgres, start_cluster

DSN_VARIABLE = "HEADLOCK_BENCH_DSN"
"""How a child process gets the DSN (not on its command line, where `ps` would show a password)."""

_TICKS = os.sysconf("SC_CLK_TCK")
_SETTINGS_SHOWN = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "shared_buffers",
    "max_wal_size",
)
_schemas = itertools.count(1)


@contextmanager
def bench_server(dsn: str | None, *, synchronous_commit: str = "on") -> Iterator[str]:
    """The DSN to benchmark against: `dsn` as given, or a throwaway cluster set up as a server (module docstring),
    stopped and removed when the block ends."""
    if dsn:
        yield dsn
        return
    cluster = start_cluster()
    try:
        _tune(cluster, synchronous_commit)
        yield cluster.dsn
    finally:
        cluster.stop()


def _tune(cluster: Postgres, synchronous_commit: str) -> None:
    settings = {
        "fsync": "on",
        "full_page_writes": "on",
        "synchronous_commit": synchronous_commit,
        "max_wal_size": "1GB",
        "shared_buffers": "256MB",
        "deadlock_timeout": "1s",
    }
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        for key, value in settings.items():
            conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")
    cluster.restart()  # shared_buffers needs it


def server_settings(dsn: str) -> dict[str, str]:
    """The server settings that decide these figures."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {name: str(conn.execute(f"SHOW {name}").fetchone()[0]) for name in _SETTINGS_SHOWN}  # type: ignore[index]


@contextmanager
def fresh_schema(dsn: str, prefix: str = "bench") -> Iterator[str]:
    """A DSN whose search_path is a new, empty schema; the schema is dropped with its tables when the block ends."""
    schema = f"{prefix}_{os.getpid()}_{next(_schemas)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield make_conninfo(dsn, options=f"-csearch_path={schema}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def postmaster_pid(dsn: str) -> int | None:
    """The server's postmaster, if it runs on this machine (the parent of a backend of ours), else None."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        try:
            fields = _stat(backend)
        except OSError:
            return None
    return int(fields[1])


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: the command name, which may hold spaces, cut off."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def server_cpu_seconds(postmaster: int | None) -> float | None:
    """CPU seconds the server has used so far (module docstring), or None when it is not on this machine."""
    if postmaster is None:
        return None
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(int(entry.name))
        except (OSError, ValueError):
            continue  # exited meanwhile: its time is in the postmaster's cutime now
        if int(fields[1]) == postmaster:  # ppid
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    try:
        own = _stat(postmaster)
    except OSError:
        return None
    ticks += sum(int(x) for x in own[11:15])  # utime, stime, cutime, cstime
    return ticks / _TICKS


def cpu_delta(before: float | None, after: float | None) -> float | None:
    """`after - before`, or None when either is unknown."""
    return None if before is None or after is None else after - before


def rounded(value: Any, digits: int = 0) -> Any:
    """`round(value, digits)`, None kept."""
    return None if value is None else round(value, digits) if digits else round(value)
