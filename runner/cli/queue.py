"""`headlock enqueue`, `status` and `unlock`: the queue by hand."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio
import anyio.to_thread
import structlog

from runner.cli._common import EXIT_OK
from runner.commit import add_requests
from runner.context import make_draft
from runner.errors import ConfigError
from runner.open import open_queue
from runner.settings import Settings, random_client_key
from runner.uniquekey import unique_key_function

log = structlog.get_logger("headlock.cli")


async def enqueue_command(settings: Settings, args: argparse.Namespace) -> int:
    urls: list[str] = list(args.urls)
    if args.file:
        read = sys.stdin.read if str(args.file) == "-" else args.file.read_text
        text = await anyio.to_thread.run_sync(read)
        urls.extend(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if not urls:
        raise ConfigError("enqueue: give URLs as arguments or --file FILE")
    key_function = unique_key_function(settings.queue.unique_keys)
    drafts = [make_draft(url, label=args.label, key_function=key_function) for url in urls]  # all checked first
    queue = await open_queue(settings)
    try:
        client_key = settings.workers.client_key or random_client_key()
        added = await add_requests(queue, drafts, client_key=client_key, forefront=args.forefront)
    finally:
        await queue.aclose()
    log.info("enqueue.done", given=len(drafts), added=added, already_present=len(drafts) - added)
    return EXIT_OK


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
