"""`headlock status` and `unlock`: the queue by hand."""

from __future__ import annotations

import argparse
import json
from typing import Any

import structlog

from runner.cli._common import EXIT_OK
from runner.errors import ConfigError
from runner.open import open_queue
from runner.settings import Settings

log = structlog.get_logger("headlock.cli")


async def status_command(settings: Settings, args: argparse.Namespace) -> int:
    queue = await open_queue(settings)
    try:
        info = await queue.get_info()
        lister = getattr(queue, "locks", None)
        locks = await lister() if lister is not None else None
    finally:
        await queue.aclose()
    by_client: dict[str, int] = {}
    for _, holder, _ in locks or []:
        by_client[holder] = by_client.get(holder, 0) + 1
    report: dict[str, Any] = {
        "queue": info.name or info.id,
        "total": info.total_request_count,
        "handled": info.handled_request_count,
        "pending": info.pending_request_count,
        "had_multiple_clients": info.had_multiple_clients,
        "locked": None if locks is None else len(locks),
        "locks_by_client": by_client,
    }
    if args.json:
        print(json.dumps(report))  # noqa: T201 - the command's output
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")  # noqa: T201 - the command's output
    return EXIT_OK


async def unlock_command(settings: Settings, args: argparse.Namespace) -> int:
    client_key = settings.workers.client_key
    if not client_key:
        raise ConfigError("unlock: --client-key is required")
    queue = await open_queue(settings)
    try:
        count = await queue.unlock_requests(client_key=client_key)
    finally:
        await queue.aclose()
    log.info("unlock.done", unlocked=count)
    return EXIT_OK


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `status` and `unlock`."""
    status = commands.add_parser("status", parents=[common], help="queue counts and who holds locks")
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")

    unlock = commands.add_parser("unlock", parents=[common], help="release every lock a client key holds")
    unlock.add_argument("--client-key", required=True, help="the client key whose locks to release")
    status.set_defaults(command=status_command, needs_settings=True)
    unlock.set_defaults(command=unlock_command, needs_settings=True)
