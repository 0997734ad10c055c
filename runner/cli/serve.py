"""`headlock serve`: the embedded store, or a PostgreSQL database, as the Apify API (the `server` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.cli._common import EXIT_USAGE

STORE_HELP = (
    "where the request queues are: 'embedded' (default: SQLite files under --storage), 'postgres' (the database"
    " HEADLOCK_QUEUE__DSN or DATABASE_URL names: keeps the password off the command line), or a PostgreSQL DSN"
    " (postgresql://... or key=value pairs). On PostgreSQL every serve on the database shares its queues (replicas"
    " behind a load balancer); datasets, key-value stores and runs stay under each server's --storage"
)
"""The same text as `runner.server._command.STORE_HELP` (this module must not import the server extra)."""


def serve_command(args: argparse.Namespace) -> int:
    try:
        from runner.server import _command  # noqa: PLC0415 - the server is an optional extra
        from runner.server._wire import is_storage_name  # noqa: PLC0415
    except ImportError as exc:
        print(f"headlock: error: serve needs the server extra: pip install 'headlock[server]' ({exc})", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    for flag in ("default_queue_id", "default_dataset_id", "default_kv_store_id"):
        if not is_storage_name(value := getattr(args, flag)):
            option = "--" + flag.replace("_", "-")
            print(f"headlock: error: {option}: must be 1-63 letters, digits or '-', got {value!r}", file=sys.stderr)  # noqa: T201
            return EXIT_USAGE
    return _command.run(args)


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `serve` (its own options: it serves a storage directory or a database, not one queue)."""
    serve = commands.add_parser(
        "serve",
        help="serve the embedded store (or --store postgres) as the Apify API v2 (request queues, datasets,"
        " key-value stores, runs)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    serve.add_argument("--storage", type=Path, default=Path("storage"), help="storage directory")
    serve.add_argument("--store", default="embedded", metavar="embedded|postgres|DSN", help=STORE_HELP)
    serve.add_argument("--token", help="require this API token (Authorization: Bearer)")
    serve.add_argument("--log-format", choices=["auto", "console", "json"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    for option, name in (
        ("--default-queue-id", "request queue"),
        ("--default-dataset-id", "dataset"),
        ("--default-kv-store-id", "key-value store"),
    ):
        serve.add_argument(
            option, default="default", help=f"the {name} every run reports as its default (created on first use)"
        )
    serve.set_defaults(command=serve_command, needs_settings=False)
