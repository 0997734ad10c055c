"""The `serve` command's arguments and its run, for `python -m runner.server` (and for `headlock serve` to share)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, quote_plus

from runner.errors import ConfigError, HeadlockError
from runner.logs import configure_logging
from runner.server import _wire as wire
from runner.server._runs import RunDefaults
from runner.server.app import serve

__all__ = ["STORE_HELP", "add_arguments", "run", "store_dsn"]

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
STORE_HELP = (
    "where the request queues are: 'embedded' (default: SQLite files under --storage), 'postgres' (the database"
    " HEADLOCK_QUEUE__DSN or DATABASE_URL names: keeps the password off the command line), or a PostgreSQL DSN"
    " (postgresql://... or key=value pairs). On PostgreSQL every serve on the database shares its queues (replicas"
    " behind a load balancer); datasets, key-value stores and runs stay under each server's --storage"
)


def store_dsn(value: str | None, env: Mapping[str, str]) -> str | None:
    """The PostgreSQL DSN `--store` names (from `env` for 'postgres'), or None for the embedded store.

    Raises:
        ConfigError: a value that is none of those (not shown: it may hold a password), or 'postgres' without a
            DSN in the environment.
    """
    if value is None or value == "embedded":
        return None
    if value == "postgres":
        dsn = env.get("HEADLOCK_QUEUE__DSN", "").strip() or env.get("DATABASE_URL", "").strip()
        if not dsn:
            raise ConfigError("--store postgres: set HEADLOCK_QUEUE__DSN or DATABASE_URL to the database's DSN")
        return dsn
    if value.startswith(("postgresql://", "postgres://")) or "=" in value:
        return value
    raise ConfigError(
        "--store: must be 'embedded', 'postgres' or a PostgreSQL DSN (postgresql://... or key=value pairs);"
        " the value given is not shown, as it may hold a password"
    )


def _dsn_secrets(dsn: str) -> list[str]:
    """The DSN's password in every form it may be written in (for the log scrubber).

    Raises:
        ConfigError: psycopg is not installed, or the DSN does not parse (the message shows no password).
    """
    try:
        from runner.queue.postgres import _connect  # noqa: PLC0415 - only this store needs psycopg
    except ImportError as exc:
        raise ConfigError(f"--store postgres needs psycopg: pip install 'headlock[postgres]' ({exc})") from exc
    return sorted({form for value in _connect.parse_target(dsn).secrets for form in _forms(value)})


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret)}


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _storage_id(text: str) -> str:
    """A default storage id: it names the storage's file when it is created, so it must be a valid name."""
    if not wire.is_storage_name(text):
        raise argparse.ArgumentTypeError(f"must be 1-63 letters, digits or '-' (not at either end), got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` options to `parser`."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--storage", type=Path, default=Path("storage"), help="storage directory")
    parser.add_argument("--store", default="embedded", metavar="embedded|postgres|DSN", help=STORE_HELP)
    parser.add_argument("--token", help="require this API token (Authorization: Bearer)")
    parser.add_argument("--log-format", choices=["auto", "console", "json"])
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    defaults = RunDefaults()
    for option, name, default in (
        ("--default-queue-id", "request queue", defaults.queue_id),
        ("--default-dataset-id", "dataset", defaults.dataset_id),
        ("--default-kv-store-id", "key-value store", defaults.kv_store_id),
    ):
        parser.add_argument(
            option,
            type=_storage_id,
            default=default,
            help=f"the {name} every run reports as its default, created on first use (default: {default})",
        )


def _announce(url: str) -> None:
    print(f"listening on {url}", flush=True)  # noqa: T201 - the first line tells scripts the bound port


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code."""
    try:
        dsn = store_dsn(args.store, os.environ)
        hidden = [] if dsn is None else _dsn_secrets(dsn)
    except ConfigError as exc:
        print(f"headlock: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    # stdout carries only the address line (scripts read the port from it); events go to stderr, secrets scrubbed.
    hidden = [*hidden, args.token or ""]
    configure_logging(fmt=args.log_format or "auto", level=args.log_level or "warning", secrets=hidden)
    defaults = RunDefaults(
        queue_id=args.default_queue_id, dataset_id=args.default_dataset_id, kv_store_id=args.default_kv_store_id
    )
    try:
        serve(
            args.host,
            args.port,
            args.storage,
            token=args.token,
            log_level=args.log_level or "warning",
            ready=_announce,
            defaults=defaults,
            queue_dsn=dsn,
        )
    except OSError as exc:
        print(f"headlock: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FATAL
    except (HeadlockError, RuntimeError) as exc:
        print(f"headlock: error: serve did not start: {_scrub(str(exc), hidden)}", file=sys.stderr)  # noqa: T201
        return EXIT_FATAL
    return EXIT_OK
