"""`headlock status`, `requests`, `requeue`, `purge` and `unlock`: the queue by hand, on every backend.

These commands only look a queue up, they never create one: `status --queue NAME` (and the others) of a queue that
does not exist say so on one line and exit 1, leaving no file (embedded), queue row or tables (postgres) or queue
(API: a GET of `~NAME`, not the get-or-create a run does) behind. Exit codes: 0 done; 1 no such queue, a URL given
to `requeue --url` is not in it, or `purge` was declined at its prompt; 2 bad usage (e.g. `purge` without `--yes`
when stdin is not a terminal).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import structlog

from runner.cli._common import EXIT_FATAL, EXIT_OK, EXIT_USAGE
from runner.context import make_draft
from runner.errors import ConfigError, NotFoundError, QueueError
from runner.metrics import Metrics
from runner.models import QueueCounts, is_failed
from runner.open import api_client, api_token, open_postgres, open_queue
from runner.queue.admin import MAX_LIST_LIMIT, MAX_REQUEUE_BATCH, RequeueResult
from runner.queue.sqlite import SqliteQueue, queue_path, validate_queue_name
from runner.settings import Settings, random_client_key
from runner.uniquekey import request_id_for, unique_key_function

if TYPE_CHECKING:
    from runner.queue.api import ApiQueue
    from runner.queue.postgres import PostgresQueue


log = structlog.get_logger("headlock.cli")

_MAX_PAGES = 10_000
"""Most pages one command reads (bounds every listing loop, whatever a server answers)."""
_TABLE_WIDTH = 120
"""The table's width when the terminal's is unknown (output to a pipe or a file)."""
_DATASET_METADATA = ".__metadata__.json"
"""The suffix of the metadata `headlock serve` keeps beside a dataset's file (`runner/server/_storages.py`)."""


def _error(message: str) -> None:
    print(f"headlock: error: {message}", file=sys.stderr)  # noqa: T201 - the command's output


def _say(message: str) -> None:
    print(message)  # noqa: T201 - the command's output


async def _open_existing(settings: Settings) -> SqliteQueue | ApiQueue | PostgresQueue | None:
    """The configured queue if it exists (None, with the reason on stderr, when it does not); nothing is created.

    Raises:
        ConfigError: an invalid queue name, or the API backend without a base URL.
        QueueError: the API's lookup failed otherwise.
    """
    name = settings.queue.name
    if settings.queue.backend == "postgres":
        try:
            return await open_postgres(settings, create=False)
        except NotFoundError as exc:
            _error(f"{exc} (nothing was created)")
            return None
    if settings.queue.backend == "embedded":
        path = queue_path(settings.storage_dir, validate_queue_name(name))
        if not await anyio.to_thread.run_sync(path.is_file):
            _error(f"no queue {name!r}: {path} does not exist (nothing was created)")
            return None
        return SqliteQueue(path)
    from runner.queue.api import ApiQueue  # noqa: PLC0415 - only the API backend needs it

    api = settings.api
    token = api_token(settings)  # no base URL, or the platform's without a token: a ConfigError at once
    try:
        return await ApiQueue.open(
            base_url=api.base_url,
            token=token,
            queue_id=settings.queue.id,
            name=None if settings.queue.id else name,
            create=False,
            timeout=api.timeout,
            max_retries=api.max_retries,
            metrics=Metrics(),
        )
    except NotFoundError:
        which = f"id {settings.queue.id!r}" if settings.queue.id else repr(name)
        _error(f"no queue {which} at {api.base_url} (nothing was created)")
        return None


# -- status ---------------------------------------------------------------------------------------------------


def _status_lines(name: str, counts: QueueCounts, multiple: bool) -> list[str]:
    rows = [
        ("queue", name),
        ("total", counts.total),
        ("handled", counts.handled),
        ("failed", counts.failed),
        ("pending", counts.pending),
        ("locked", counts.locked),
    ]
    lines = [f"{key:<8} {value:>8}" if isinstance(value, int) else f"{key:<8} {value}" for key, value in rows]
    for holder, count in (counts.locks_by_client or {}).items():
        lines.append(f"         {count:>8} locked by {holder}")
    lines.append("used by  " + ("several clients" if multiple else "one client (or none yet)"))
    if not counts.exact:
        lines.append("(failed and locked counted over part of the queue only: lower bounds)")
    if counts.failed:
        lines.append("see them: headlock requests --failed; run them again: headlock requeue --failed")
    return lines


async def status_command(settings: Settings, args: argparse.Namespace) -> int:
    queue = await _open_existing(settings)
    if queue is None:
        return EXIT_FATAL
    try:
        info = await queue.get_info()
        counts = await queue.counts()
    finally:
        await queue.aclose()
    name = info.name or info.id
    if args.json:
        report: dict[str, Any] = {
            "queue": name,
            "total": counts.total,
            "handled": counts.handled,
            "failed": counts.failed,
            "pending": counts.pending,
            "locked": counts.locked,
            "locks_by_client": counts.locks_by_client,
            "had_multiple_clients": info.had_multiple_clients,
            "exact": counts.exact,
        }
        _say(json.dumps(report))
    else:
        _say("\n".join(_status_lines(name, counts, info.had_multiple_clients)))
    return EXIT_OK


# -- requests -------------------------------------------------------------------------------------------------


async def _collect(
    queue: SqliteQueue | ApiQueue | PostgresQueue, state: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The first `limit` requests in the state (None: all), and whether there are more."""
    from runner.queue.api import ApiQueue  # noqa: PLC0415 - only the API backend needs it

    flags = {} if state is None else {state: True}
    items: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(_MAX_PAGES):
        wanted = limit + 1 - len(items)
        # A page the API backend filters itself (failed, handled) may match few of its items: ask for big pages.
        size = MAX_LIST_LIMIT if isinstance(queue, ApiQueue) and state in ("failed", "handled") else wanted
        page = await queue.list_requests(after=after, limit=min(max(size, 1), MAX_LIST_LIMIT), **flags)
        items.extend(page.items)
        after = page.next_after
        if after is None or len(items) > limit:
            break
    return items[:limit], len(items) > limit


def _state(item: dict[str, Any], locked: set[str]) -> str:
    if item.get("handledAt") is not None:
        return "failed" if is_failed(item) else "handled"
    return "locked" if item.get("id") in locked else "pending"


def _label(item: dict[str, Any]) -> str:
    user_data = item.get("userData")
    label = user_data.get("label") if isinstance(user_data, dict) else None
    return label if isinstance(label, str) else ""


def _errors(item: dict[str, Any]) -> list[str]:
    messages = item.get("errorMessages")
    return [m for m in messages if isinstance(m, str)] if isinstance(messages, list) else []


def _last(errors: list[str]) -> str:
    return errors[-1] if errors else ""


def _fit(text: str, width: int, *, middle: bool = False) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis: at the end, or in the `middle` (for URLs,
    whose ends tell them apart)."""
    line = " ".join(text.split())
    if len(line) <= width:
        return line
    if not middle:
        return line[: max(width - 1, 0)] + "…"
    tail = (width - 1) // 2
    return line[: width - 1 - tail] + "…" + line[len(line) - tail :]


def _table(rows: Sequence[tuple[str, int, str, str, str]], width: int) -> list[str]:
    """Rows of (state, retries, label, url, last error) as aligned columns, at most `width` characters a line."""
    label_w = min(max([len("LABEL"), *(len(r[2]) for r in rows)]), 12)
    url_w = min(max([len("URL"), *(len(r[3]) for r in rows)]), 40)
    fixed = 7 + 1 + 7 + 1 + label_w + 1 + url_w + 1
    error_w = max(width - fixed, 20)
    lines = [f"{'STATE':<7} {'RETRIES':>7} {'LABEL':<{label_w}} {'URL':<{url_w}} LAST ERROR"]
    for state, retries, label, url, error in rows:
        lines.append(
            f"{state:<7} {retries:>7} {_fit(label, label_w):<{label_w}} {_fit(url, url_w, middle=True):<{url_w}} "
            f"{_fit(error, error_w)}".rstrip()
        )
    return lines


async def requests_command(settings: Settings, args: argparse.Namespace) -> int:
    queue = await _open_existing(settings)
    if queue is None:
        return EXIT_FATAL
    try:
        items, more = await _collect(queue, args.state, args.limit)
        # The items carry no lock state: without a filter, the locked ones are listed apart (a few, usually).
        locked = set()
        if args.state is None and any(item.get("handledAt") is None for item in items):
            locked = {item["id"] for item in (await _collect(queue, "locked", MAX_LIST_LIMIT))[0]}
    finally:
        await queue.aclose()
    states = [args.state or _state(item, locked) for item in items]
    if args.json:
        for item, state in zip(items, states, strict=True):
            record = {
                "id": item.get("id"),
                "url": item.get("url"),
                "uniqueKey": item.get("uniqueKey"),
                "method": item.get("method", "GET"),
                "label": _label(item) or None,
                "state": state,
                "retryCount": item.get("retryCount", 0),
                "handledAt": item.get("handledAt"),
                "errorMessages": _errors(item),
            }
            _say(json.dumps(record, ensure_ascii=False))
    elif items:
        rows = [
            (
                state,
                int(item.get("retryCount") or 0),
                _label(item),
                str(item.get("url", "")),
                (_errors(item) or [""])[-1],
            )
            for item, state in zip(items, states, strict=True)
        ]
        width = shutil.get_terminal_size((_TABLE_WIDTH, 24)).columns
        _say("\n".join(_table(rows, min(max(width, 80), 200))))
    else:
        what = f"{args.state} requests" if args.state else "requests"
        print(f"no {what} in the queue", file=sys.stderr)  # noqa: T201 - the command's output
    if more:
        print(f"showing the first {args.limit}: --limit N for more", file=sys.stderr)  # noqa: T201
    return EXIT_OK


# -- requeue --------------------------------------------------------------------------------------------------


def _merge(total: RequeueResult, part: RequeueResult) -> None:
    total.requeued.extend(part.requeued)
    total.not_handled.extend(part.not_handled)
    total.missing.extend(part.missing)
    total.unreadable.extend(part.unreadable)


async def _requeue_failed(
    queue: SqliteQueue | ApiQueue | PostgresQueue, *, client_key: str, dry_run: bool
) -> RequeueResult:
    """Requeue (or, dry, only find) every failed request, one page at a time."""
    total = RequeueResult()
    after: str | None = None
    for _ in range(_MAX_PAGES):
        page = await queue.list_requests(after=after, limit=MAX_REQUEUE_BATCH, failed=True)
        ids = [item["id"] for item in page.items]
        if dry_run:
            unreadable = {item["id"] for item in page.items if "unreadableData" in item}
            _merge(total, RequeueResult(requeued=[i for i in ids if i not in unreadable], unreadable=list(unreadable)))
        elif ids:
            _merge(total, await queue.requeue(ids, client_key=client_key))
        after = page.next_after
        if after is None:
            break
    return total


async def _classify(queue: SqliteQueue | ApiQueue | PostgresQueue, request_ids: Sequence[str]) -> RequeueResult:
    """What `requeue` would do with each id, read only."""
    result = RequeueResult()
    for request_id in request_ids:
        try:
            request = await queue.get_request(request_id)
        except QueueError:  # stored damage: unreadable, as requeue would find it
            result.unreadable.append(request_id)
            continue
        if request is None:
            result.missing.append(request_id)
        elif request.handled_at is None:
            result.not_handled.append(request_id)
        elif "unreadableData" in (request.model_extra or {}):
            result.unreadable.append(request_id)
        else:
            result.requeued.append(request_id)
    return result


def _requests(count: int) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def _left(count: int) -> str:
    return f"left {'1 request' if count == 1 else f'{count} requests'} as {'it is' if count == 1 else 'they are'}:"


async def requeue_command(settings: Settings, args: argparse.Namespace) -> int:
    urls_by_id: dict[str, str] = {}
    if args.url:
        key_function = unique_key_function(settings.queue.unique_keys)
        for url in args.url:  # all checked before the queue is opened
            urls_by_id[request_id_for(make_draft(url, key_function=key_function).unique_key)] = url
    queue = await _open_existing(settings)
    if queue is None:
        return EXIT_FATAL
    client_key = settings.workers.client_key or random_client_key()
    try:
        if not urls_by_id:
            result = await _requeue_failed(queue, client_key=client_key, dry_run=args.dry_run)
        elif args.dry_run:
            result = await _classify(queue, list(urls_by_id))
        else:
            result = RequeueResult()
            ids = list(urls_by_id)
            for start in range(0, len(ids), MAX_REQUEUE_BATCH):
                _merge(result, await queue.requeue(ids[start : start + MAX_REQUEUE_BATCH], client_key=client_key))
    finally:
        await queue.aclose()
    _report_requeue(result, urls_by_id, dry_run=args.dry_run)
    return EXIT_FATAL if result.missing else EXIT_OK


def _report_requeue(result: RequeueResult, urls_by_id: dict[str, str], *, dry_run: bool) -> None:
    count = len(result.requeued)
    what = ("failed request" if not urls_by_id else "request") + ("" if count == 1 else "s")
    if dry_run:
        _say(f"would requeue {count} {what} (dry run: nothing changed)")
    elif count:
        _say(f"requeued {count} {what}: pending again with a fresh retry budget, error messages kept")
    else:
        _say(f"no {what} to requeue")
    if result.not_handled:
        _say(f"{_left(len(result.not_handled))} not handled (pending or locked)")
    if result.unreadable:
        _say(
            f"{_left(len(result.unreadable))} unreadable (quarantined damage), see `headlock requests --failed"
            " --json` for the stored text"
        )
    for request_id in result.missing:
        _error(f"not in the queue: {urls_by_id.get(request_id, request_id)}")
    log.debug(
        "requeue.done",
        dry_run=dry_run,
        requeued=count,
        not_handled=len(result.not_handled),
        unreadable=len(result.unreadable),
        missing=len(result.missing),
    )


# -- purge ----------------------------------------------------------------------------------------------------


def _dataset_files(settings: Settings) -> list[Path]:
    """The local dataset's file and the metadata `headlock serve` may keep beside it, those that exist."""
    directory = settings.storage_dir / "datasets"
    files = [directory / f"{settings.dataset}.jsonl", directory / f"{settings.dataset}{_DATASET_METADATA}"]
    return [path for path in files if path.is_file()]


async def _confirm(targets: list[str], yes: bool) -> int | None:
    """None when the purge may go on; else the exit code (refused: not a terminal, or declined)."""
    if yes:
        return None
    if not sys.stdin.isatty():
        _error(f"purge deletes {' and '.join(targets)} for good: pass --yes (stdin is not a terminal to ask on)")
        return EXIT_USAGE
    prompt = f"Delete {' and '.join(targets)}? This cannot be undone. [y/N] "
    try:
        answer = await anyio.to_thread.run_sync(input, prompt)
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        _say("nothing deleted")
        return EXIT_FATAL
    return None


def _delete_files(files: Sequence[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)


async def purge_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.dataset and settings.results_on_api():
        api_token(settings)  # the same checks, before anything is asked or deleted
    queue = await _open_existing(settings)
    try:
        targets = [] if queue is None else [await _describe(queue, settings)]
        dataset = await _dataset_target(settings) if args.dataset else None
        if dataset is not None:
            targets.append(dataset[0])
        if not targets:
            return EXIT_FATAL
        refused = await _confirm(targets, args.yes)
        if refused is not None:
            return refused
        if queue is not None:
            await queue.drop()
            _say(f"deleted {targets[0]}")
        if dataset is not None:
            await dataset[1]()
            _say(f"deleted {dataset[0]}")
    finally:
        if queue is not None:
            await queue.aclose()
    return EXIT_OK


async def _dataset_target(settings: Settings) -> tuple[str, Callable[[], Awaitable[object]]] | None:
    """The results dataset as the purge prompt names it, and what deletes it; None (said on stderr) when there is
    no local one."""
    if settings.results_on_api():
        name = f"dataset {settings.dataset_id or settings.dataset!r} at {settings.api.base_url}"
        return name, partial(_delete_api_dataset, settings)
    files = await anyio.to_thread.run_sync(_dataset_files, settings)
    if not files:
        _error(f"no dataset {settings.dataset!r} under {settings.storage_dir / 'datasets'}")
        return None
    return f"dataset {settings.dataset!r} ({files[0]})", partial(anyio.to_thread.run_sync, _delete_files, files)


async def _describe(queue: SqliteQueue | ApiQueue | PostgresQueue, settings: Settings) -> str:
    """The queue as the purge prompt names it: name, where, how many requests."""
    total = (await queue.get_info()).total_request_count
    where = str(queue.path) if isinstance(queue, SqliteQueue) else f"at {settings.api.base_url}"
    if settings.queue.backend == "postgres":
        from runner.queue.postgres import PostgresQueue  # noqa: PLC0415 - only this backend needs psycopg

        if isinstance(queue, PostgresQueue):
            where = f"in {queue.database}"
    return f"queue {settings.queue.id or settings.queue.name!r} ({where}, {_requests(total)})"


async def _delete_api_dataset(settings: Settings) -> None:
    """`DELETE /v2/datasets/{id}` (or `~name`); a dataset that is not there is said so, not an error."""
    from runner.api.client import Endpoint  # noqa: PLC0415 - only the API backend needs it

    endpoint = Endpoint("DELETE", "datasets", "", "other", "short")
    api = api_client(settings)
    try:
        ref = settings.dataset_id or f"~{settings.dataset}"
        answer = await api.call(endpoint, resource_id=ref)
        if answer.response.status_code == 404:
            _error(f"no dataset {ref!r} at {settings.api.base_url}")
            return
        api.check(endpoint, answer.response, maybe_applied=answer.ambiguous)
    finally:
        await api.aclose()


# -- unlock ---------------------------------------------------------------------------------------------------


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `status`, `requests`, `requeue`, `purge` and `unlock`."""
    status = commands.add_parser("status", parents=[common], help="queue counts: handled, failed, pending, locked")
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    status.set_defaults(command=status_command, needs_settings=True)

    listing = commands.add_parser("requests", parents=[common], help="list requests: URL, label, retries and errors")
    states = listing.add_mutually_exclusive_group()
    for state, meaning in (
        ("failed", "failed for good"),
        ("pending", "waiting, nobody holds them"),
        ("locked", "held by a worker (in flight or in retry backoff)"),
        ("handled", "ended well"),
    ):
        states.add_argument(f"--{state}", dest="state", action="store_const", const=state, help=f"only those {meaning}")
    listing.add_argument("--limit", type=_positive, default=100, help="at most N requests (default 100)")
    listing.add_argument("--json", action="store_true", help="JSON lines with every error message")
    listing.set_defaults(command=requests_command, needs_settings=True, state=None)

    requeue = commands.add_parser(
        "requeue", parents=[common], help="run handled requests again: pending, fresh retry budget, errors kept"
    )
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--failed", action="store_true", help="every failed request")
    which.add_argument("--url", nargs="+", metavar="URL", help="these URLs (by their uniqueKey)")
    requeue.add_argument("--dry-run", action="store_true", help="only say how many")
    requeue.add_argument("--client-key", help=argparse.SUPPRESS)
    requeue.set_defaults(command=requeue_command, needs_settings=True)

    purge = commands.add_parser("purge", parents=[common], help="delete the queue (and with --dataset its results)")
    purge.add_argument("--dataset", action="store_true", help="delete the results dataset too")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask (required when stdin is not a terminal)")
    purge.set_defaults(command=purge_command, needs_settings=True)

    unlock = commands.add_parser("unlock", parents=[common], help="release every lock a client key holds")
    unlock.add_argument("--client-key", required=True, help="the client key whose locks to release")
    unlock.set_defaults(command=unlock_command, needs_settings=True)
