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
from runner.errors import ConfigError, InvalidUrlError
from runner.models import RequestDraft
from runner.open import open_queue
from runner.settings import Settings, random_client_key
from runner.uniquekey import UniqueKeyFunction, unique_key_function

log = structlog.get_logger("headlock.cli")


def read_url_file(file: Path) -> tuple[str, str]:
    """The text of a URL file (`-`: standard input) without a UTF-8 BOM, and its name for messages.

    Raises:
        ConfigError: the file is missing, unreadable or not UTF-8 text (one line naming it).
    """
    if str(file) == "-":
        name, text = "<stdin>", sys.stdin.read()
    else:
        name = str(file)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"enqueue --file: no such file: {name}") from None
        except OSError as exc:
            raise ConfigError(f"enqueue --file: cannot read {name}: {exc.strerror or exc}") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{name}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text.removeprefix("\ufeff"), name


def parse_url_lines(text: str) -> list[tuple[int, str]]:
    """`(line number, URL)` of each line that holds one: blank lines and `#` comments are skipped.

    A comment is a line starting with `#` (after spaces) or the rest of a line from a `#` that follows a space or
    a tab (` # note`); a `#` inside a URL (a fragment, `/#/route`) is kept.
    """
    urls: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        for marker in (" #", "\t#"):
            line = line.partition(marker)[0]
        line = line.strip()
        if line and not line.startswith("#"):
            urls.append((number, line))
    return urls


def drafts_of(
    lines: list[tuple[str, str]], *, label: str | None, key_function: UniqueKeyFunction
) -> list[RequestDraft]:
    """A draft of each `(where, url)`, all checked before any is enqueued.

    Raises:
        InvalidUrlError: `where: not an absolute http(s) URL: ...` for the first bad one.
    """
    drafts = []
    for where, url in lines:
        try:
            drafts.append(make_draft(url, label=label, key_function=key_function))
        except InvalidUrlError as exc:
            raise InvalidUrlError(f"{where}: {exc}") from exc
    return drafts


async def enqueue_command(settings: Settings, args: argparse.Namespace) -> int:
    """Check every URL (arguments, then the file's lines), then add them all; a bad one adds nothing (exit 2)."""
    given: list[tuple[str, str]] = [(f"URL argument {n}", url) for n, url in enumerate(args.urls, start=1)]
    if args.file:
        text, name = await anyio.to_thread.run_sync(read_url_file, args.file)
        given += [(f"{name}:{number}", url) for number, url in parse_url_lines(text)]
    if not given:
        where = f" ({args.file} has none)" if args.file else ""
        raise ConfigError(f"enqueue: give URLs as arguments or --file FILE{where}")
    key_function = unique_key_function(settings.queue.unique_keys)
    drafts = drafts_of(given, label=args.label, key_function=key_function)
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
    enqueue = commands.add_parser(
        "enqueue",
        parents=[common],
        help="add URLs to the queue",
        description="Add URLs to the queue. Every URL is checked first: one bad URL adds nothing (exit 2).",
    )
    enqueue.add_argument("urls", nargs="*", metavar="URL")
    enqueue.add_argument(
        "--file",
        "-f",
        type=Path,
        help="read URLs from a UTF-8 file, one per line ('-' for stdin); blank lines and # comments are skipped",
    )
    enqueue.add_argument("--label", help="userData.label for the router")
    enqueue.add_argument("--forefront", action="store_true", help="add to the head of the queue")
    enqueue.add_argument("--client-key", help=argparse.SUPPRESS)
    enqueue.set_defaults(command=enqueue_command, needs_settings=True)
