"""`headlock enqueue`: add URLs (arguments, a file or stdin) to the queue."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `enqueue`."""
    enqueue = commands.add_parser("enqueue", parents=[common], help="add URLs to the queue")
    enqueue.add_argument("urls", nargs="*", metavar="URL")
    enqueue.add_argument("--file", "-f", type=Path, help="read URLs from a file, one per line ('-' for stdin)")
    enqueue.add_argument("--label", help="userData.label for the router")
    enqueue.add_argument("--forefront", action="store_true", help="add to the head of the queue")
    enqueue.add_argument("--client-key", help=argparse.SUPPRESS)
    enqueue.set_defaults(command=enqueue_command, needs_settings=True)
