"""Where the database is and what its errors mean: the DSN without its password, psycopg errors as headlock's."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import anyio
import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from runner.errors import ConfigError, InvalidInputError, QueueError, QueueUnavailableError

__all__ = ["CONNECTION_LOST", "Target", "connection_lost", "mapped", "open_database", "parse_target", "redact"]

T = TypeVar("T")

CONNECTION_LOST = ("57P01", "57P02", "57P03", "08000", "08003", "08006", "08001", "08004")
"""SQLSTATEs of a server that went away or refuses connections for now (restart, shutdown, crash recovery)."""


def redact(text: str, secret_values: Sequence[str] = ()) -> str:
    """`text` with the given secrets, and anything that looks like a DSN's password, replaced by `***`."""
    for value in secret_values:
        if value:
            for form in {value, quote(value, safe=""), quote_plus(value)}:
                text = text.replace(form, "***")
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the database is, without the password: for messages and reprs."""

    host: str
    port: str
    dbname: str
    secrets: tuple[str, ...] = field(repr=False)

    def __str__(self) -> str:
        return f"postgres {self.host}:{self.port}/{self.dbname}"


def parse_target(dsn: str) -> Target:
    """Parse `dsn` (a libpq conninfo string or a postgresql:// URL).

    Raises:
        ConfigError: it does not parse (the message shows it without its password).
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ConfigError(
            f"queue.dsn: not a valid PostgreSQL connection string: {redact(str(exc))}"
        ) from None  # the original message may quote the DSN, password included
    password = str(params.get("password") or "")
    return Target(
        host=str(params.get("host") or "localhost"),
        port=str(params.get("port") or "5432"),
        dbname=str(params.get("dbname") or params.get("user") or ""),
        secrets=(password,) if password else (),
    )


def mapped(exc: psycopg.Error, target: Target, endpoint: str, *, write: bool) -> QueueError:
    """The headlock error for a psycopg one (its message without the password)."""
    message = redact(str(exc).strip() or type(exc).__name__, target.secrets)
    if isinstance(exc, PoolTimeout):
        return QueueUnavailableError(f"no connection to {target}: {message}", endpoint=endpoint)
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return QueueUnavailableError(f"{target}: statement cancelled: {message}", endpoint=endpoint)
    if isinstance(exc, psycopg.DataError):
        return InvalidInputError(f"{target} refused the data: {message}", endpoint=endpoint)
    # Without a SQLSTATE the connection broke under the statement: a commit may have happened unanswered.
    unanswered = write and exc.sqlstate is None and isinstance(exc, psycopg.OperationalError)
    return QueueUnavailableError(f"{target}: {message}", endpoint=endpoint, maybe_applied=unanswered)


def connection_lost(exc: psycopg.Error) -> bool:
    """Whether `exc` says the connection is gone (not a refused statement): the pool's connections may all be."""
    if isinstance(exc, PoolTimeout):
        return False
    if exc.sqlstate is None:
        return isinstance(exc, psycopg.OperationalError)
    return exc.sqlstate in CONNECTION_LOST


def session_setup(call_timeout: float, application: str) -> tuple[Callable[[Any], Awaitable[None]], dict[str, Any]]:
    """The `configure` callback and the connection arguments of every connection: statements and lock waits bounded
    on the server (cancelled and rolled back there), and no connection left idle in a transaction holding row locks."""
    timeout_ms = int(call_timeout * 1000)

    async def configure(conn: Any) -> None:
        await conn.execute(
            "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false)",
            (str(timeout_ms), str(timeout_ms), str(max(timeout_ms * 2, 1000))),
        )

    kwargs: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": max(int(call_timeout), 2),
        "application_name": application,
    }
    return configure, kwargs


async def open_database(
    dsn: str,
    *,
    call_timeout: float,
    application: str,
    pool_size: int,
    endpoint: str,
    first: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
) -> tuple[Target, T, AsyncConnectionPool[psycopg.AsyncConnection[Any]]]:
    """Run `first` on one connection of its own (the schema, the queue), then make the pool, opening in the
    background; return the target, what `first` returned and the pool. A wrong password or a missing database
    fails at once with the server's reason (a pool would try again until its timeout).

    Raises:
        ConfigError: a DSN that does not parse.
        QueueUnavailableError: no connection, or no answer within `call_timeout` (+5 s), named by `endpoint`.
        QueueError: what `first` raised, psycopg's errors mapped.
    """
    target = parse_target(dsn)
    configure, kwargs = session_setup(call_timeout, application)
    try:
        with anyio.CancelScope(shield=True), anyio.fail_after(call_timeout + 5):
            conn = await psycopg.AsyncConnection.connect(dsn, **kwargs)
    except (psycopg.Error, TimeoutError) as exc:
        reason = "no connection within the timeout" if isinstance(exc, TimeoutError) else str(exc)
        raise QueueUnavailableError(
            f"cannot connect to {target}: {redact(reason, target.secrets)}", endpoint=endpoint
        ) from None  # the cause's message may carry connection details
    try:
        with anyio.CancelScope(shield=True), anyio.fail_after(call_timeout + 5):
            await configure(conn)
            result = await first(conn)
    except TimeoutError:
        raise QueueUnavailableError(
            f"{target} did not answer within {call_timeout + 5:g} s", endpoint=endpoint
        ) from None
    except psycopg.Error as exc:
        raise mapped(exc, target, endpoint, write=True) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max(pool_size, 1),
        kwargs=kwargs,
        configure=configure,
        open=False,
        timeout=call_timeout,
        name=application.replace(" ", "-"),
    )
    return target, result, pool
