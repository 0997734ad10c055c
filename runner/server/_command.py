"""The `serve` command's arguments and its run, for `python -m runner.server` (and for `headlock serve` to share)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.logs import configure_logging
from runner.server import _wire as wire
from runner.server._runs import RunDefaults
from runner.server.app import serve

__all__ = ["add_arguments", "run"]

EXIT_OK = 0
EXIT_FATAL = 1


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
    # stdout carries only the address line (scripts read the port from it); events go to stderr, token scrubbed.
    configure_logging(fmt=args.log_format or "auto", level=args.log_level or "warning", secrets=[args.token or ""])
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
        )
    except OSError as exc:
        print(f"headlock: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FATAL
    return EXIT_OK
