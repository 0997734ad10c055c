"""`headlock serve`: the embedded store as the Apify API (the `server` extra)."""

from __future__ import annotations

import argparse
import sys

from runner.cli._common import EXIT_USAGE


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
