"""The `headlock` command line: run, enqueue, status, unlock, health, serve."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import structlog

from runner.actor.input import describe_input, input_settings
from runner.actor.platform import ActorPlatform, read_input
from runner.commit import add_requests
from runner.context import make_draft
from runner.errors import ConfigError, HeadlockError, InvalidUrlError
from runner.health import DEFAULT_MAX_AGE, check_health
from runner.loader import load_handler
from runner.logs import configure_logging
from runner.metrics import Metrics, PrometheusMetrics
from runner.open import RunBackends, api_client, open_queue, open_run, open_store
from runner.router import Handler
from runner.runtime import RunSummary, run
from runner.settings import Settings, load_settings, random_client_key
from runner.shutdown import Stopper
from runner.start import start_drafts
from runner.stats import RunStats
from runner.uniquekey import unique_key_function

if TYPE_CHECKING:
    from runner.api.client import ApiClient

__all__ = ["main"]

log = structlog.get_logger("headlock.cli")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_MIGRATED = 75
"""A migrated Actor run that no signal ended (EX_TEMPFAIL): not 0, so the platform resumes the run elsewhere."""
MIGRATION_WAIT = 120.0
"""Longest wait, after a migration's shutdown, for the platform to stop the process."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `headlock` script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "health":
        return _health(args)
    try:
        settings = load_settings(args.config, **_overrides(args))
    except ConfigError as exc:
        print(f"headlock: error: {exc}", file=sys.stderr)  # noqa: T201 - before logging is configured
        if getattr(args, "summary", None) is not None:
            _write_summary(args.summary, _failure_summary(exc, client_key=None))
        return EXIT_USAGE
    token = settings.api.token.get_secret_value() if settings.api.token else ""
    configure_logging(fmt=settings.log_format, level=settings.log_level, secrets=[token])
    try:
        code: int = anyio.run(_COMMANDS[args.command], settings, args)
    except Exception as exc:
        error = _headlock_error(exc)
        if error is None:
            raise
        if isinstance(error, ConfigError | InvalidUrlError):
            log.error("config.invalid", error=str(error))
            return EXIT_USAGE
        log.error("run.fatal", error=str(error), error_type=type(error).__name__)
        return EXIT_FATAL
    return code


def _headlock_error(exc: BaseException) -> HeadlockError | None:
    """The first HeadlockError in `exc`, looking inside exception groups (task groups raise those)."""
    if isinstance(exc, HeadlockError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _headlock_error(inner)) is not None:
                return found
    return None


# -- commands ------------------------------------------------------------------------------------------------


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    """`headlock run`; with `--summary`, the summary file is written on every way out (a `reason` always)."""
    try:
        summary, code = await _crawl(settings, args)
    except BaseException as exc:
        if args.summary is not None:
            failure = _failure_summary(exc, client_key=settings.workers.client_key)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_write_summary, args.summary, failure)
        raise
    if args.summary is not None:
        await anyio.to_thread.run_sync(_write_summary, args.summary, {**summary.as_dict(), "exit_code": code})
    return code


async def _crawl(settings: Settings, args: argparse.Namespace) -> tuple[RunSummary, int]:
    if not settings.handler:
        raise ConfigError("handler: required (set it in the config file, HEADLOCK_HANDLER or --handler)")
    handler = load_handler(settings.handler)
    start_drafts(settings.start_urls)  # fail on a bad start URL before touching the queue (any key will do)
    metrics = _metrics(settings)
    stopper = Stopper()
    received: list[int] = []
    signalled = anyio.Event()
    async with _serving_metrics(metrics, settings), anyio.create_task_group() as tg:
        # Signals are watched from before the queue is opened: a stop while the API is still being reached
        # (a container stopped at start) ends the run at once instead of killing the process.
        tg.start_soon(_watch_signals, stopper, received, signalled)
        async with contextlib.AsyncExitStack() as stack:
            opened = await _open_unless_stopped(settings, args, stopper, metrics, stack)
            migrated = False
            if opened is None:
                summary = RunSummary(
                    reason=stopper.reason or "stopped",
                    client_key=settings.workers.client_key or "",
                    stats=RunStats().as_dict(),
                    released=0,
                )
            else:
                settings, backends = opened
                summary, migrated = await _consume(backends, handler, settings, stopper, metrics)
        code = 128 + received[0] if received else EXIT_OK
        if migrated and not received:
            code = await _wait_to_be_moved(signalled, received)
        tg.cancel_scope.cancel()
    return summary, code


async def _wait_to_be_moved(signalled: anyio.Event, received: list[int]) -> int:
    """After a migration's shutdown: stay up until the platform stops the process, as the official SDKs do.

    Exiting 0 now would end the run as succeeded and the platform would not resume it; so wait (bounded) for its
    signal, then exit with that signal's code, or with EXIT_MIGRATED if none comes.
    """
    log.info("actor.migrated_waiting", wait_at_most=MIGRATION_WAIT)
    with anyio.move_on_after(MIGRATION_WAIT):
        await signalled.wait()
    return 128 + received[0] if received else EXIT_MIGRATED


async def _open_unless_stopped(
    settings: Settings,
    args: argparse.Namespace,
    stopper: Stopper,
    metrics: Metrics,
    stack: contextlib.AsyncExitStack,
) -> tuple[Settings, RunBackends] | None:
    """Read the Actor's input (on the API) and open the run's backends into `stack`; None if a stop comes first.

    Returns the settings with the input applied, and the backends.
    """
    opened: tuple[Settings, RunBackends] | None = None
    async with anyio.create_task_group() as tg:

        async def cancel_on_stop() -> None:
            await stopper.graceful.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(cancel_on_stop)
        api = None
        if settings.queue.backend == "apify" or settings.results_on_api():
            api = api_client(settings, metrics=metrics)
            stack.push_async_callback(api.aclose)
            settings = await _with_actor_input(settings, args, api)
            start_drafts(settings.start_urls)
        backends = await stack.enter_async_context(open_run(settings, metrics=metrics, api=api))
        opened = settings, backends
        tg.cancel_scope.cancel()
    return opened


async def _with_actor_input(settings: Settings, args: argparse.Namespace, api: ApiClient) -> Settings:
    """`settings` with the Actor's input record applied, when the settings name the run's key-value store."""
    store = await open_store(settings, api)
    if store is None:
        return settings
    actor_input = await read_input(store, settings.actor.input_key)
    if actor_input is None:
        return settings
    log.info("actor.input", key=settings.actor.input_key, **describe_input(actor_input))
    return load_settings(args.config, actor_input=input_settings(actor_input), **_overrides(args))


async def _consume(
    backends: RunBackends, handler: Handler, settings: Settings, stopper: Stopper, metrics: Metrics
) -> tuple[RunSummary, bool]:
    """Run the crawl (with the Actor's platform around it, on the platform); return its summary and whether the
    run is being moved (a `migrating` event)."""
    actor = settings.actor
    platform = None
    if actor.run_id or actor.events_url or actor.key_value_store_id or actor.timeout_at:
        platform = ActorPlatform(
            actor, stopper=stopper, grace=settings.workers.grace, store=backends.store, run=backends.actor_run
        )
    stats = await platform.restore_stats() if platform is not None else None
    log.info("results.location", where=backends.results.location)
    async with anyio.create_task_group() as tg:
        if platform is not None:
            await tg.start(platform.serve, stats)
        summary = await run(
            backends.queue,
            handler,
            backends.results,
            workers=settings.workers,
            options=settings.handler_options,
            start_urls=settings.start_urls,
            stopper=stopper,
            progress_every=settings.progress_every,
            metrics=metrics,
            health_file=settings.health_path(),
            stats=stats,
            progress_hook=platform.on_progress if platform is not None else None,
            unique_key=unique_key_function(settings.queue.unique_keys),
        )
        tg.cancel_scope.cancel()
    if platform is None:
        return summary, False
    await platform.finish(summary, results=backends.results.location)
    return summary, platform.migrated


def _metrics_address(settings: Settings) -> tuple[str, int] | None:
    """Where metrics are served: `metrics_port` (on `metrics_host`), else the Actor's web server port on every
    interface (the platform routes that port to the container); None: nowhere."""
    if settings.metrics_port:
        return settings.metrics_host, settings.metrics_port
    if settings.actor.web_server_port:
        return "0.0.0.0", settings.actor.web_server_port  # noqa: S104 - the platform's port reaches the container
    return None


def _metrics(settings: Settings) -> Metrics:
    """Prometheus metrics when they are served (see `_metrics_address`), else the disabled instance.

    Raises:
        ConfigError: `metrics_port` is set but prometheus-client is not installed (for the Actor's port, that is
            only logged: the platform sets the port whether or not anyone wants metrics).
    """
    if _metrics_address(settings) is None:
        return Metrics()
    try:
        return PrometheusMetrics()
    except ImportError as exc:
        if settings.metrics_port:
            raise ConfigError(
                f"metrics_port: needs the metrics extra: pip install 'headlock[metrics]' ({exc})"
            ) from exc
        log.warning("metrics.unavailable", reason="the metrics extra is not installed", error=str(exc))
        return Metrics()


@contextlib.asynccontextmanager
async def _serving_metrics(metrics: Metrics, settings: Settings) -> AsyncIterator[None]:
    """Serve `/metrics` while the block runs, if there is an address; started and stopped off the event loop.

    Raises:
        ConfigError: the address cannot be bound.
    """
    stack = contextlib.ExitStack()
    address = _metrics_address(settings)
    if address is not None and metrics.enabled:
        host, port = address
        try:
            health = partial(check_health, settings.health_path())
            serving = metrics.serve(host, port, health=health)
            url = await anyio.to_thread.run_sync(stack.enter_context, serving)
        except OSError as exc:
            raise ConfigError(f"metrics_port: cannot serve metrics on {host}:{port}: {exc}") from exc
        log.info("metrics.serving", url=url)
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stack.close)  # the server's shutdown waits for its poll loop


def _failure_summary(exc: BaseException, *, client_key: str | None) -> dict[str, Any]:
    """The summary of a run that ended with `exc`: why (`reason`), the error and the exit code."""
    error = _headlock_error(exc)
    shown: BaseException = error if error is not None else _first_leaf(exc)
    if isinstance(shown, KeyboardInterrupt):
        reason, code = "SIGINT", 128 + signal.SIGINT
    elif error is None:
        reason, code = "crashed", EXIT_FATAL  # a bug: the traceback follows on stderr
    elif isinstance(error, ConfigError | InvalidUrlError):
        reason, code = "invalid_config", EXIT_USAGE
    else:
        reason, code = "fatal", EXIT_FATAL
    return {
        "reason": reason,
        "error": str(shown),
        "error_type": type(shown).__name__,
        "exit_code": code,
        "client_key": client_key,
    }


def _first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception in `exc` (task groups wrap what they raise)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _write_summary(path: Path, data: dict[str, Any]) -> None:
    """Write the summary JSON next to where it goes, then rename: a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        partial.replace(path)
    except OSError as exc:
        log.error("summary.write_failed", path=str(path), error=str(exc))


async def _watch_signals(stopper: Stopper, received: list[int], signalled: anyio.Event | None = None) -> None:
    """SIGINT/SIGTERM start the graceful stop; a second one forces it."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            received.append(signum)
            stopper.stop(signal.Signals(signum).name)
            if signalled is not None:
                signalled.set()


async def _enqueue(settings: Settings, args: argparse.Namespace) -> int:
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


async def _status(settings: Settings, args: argparse.Namespace) -> int:
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


async def _unlock(settings: Settings, args: argparse.Namespace) -> int:
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


def _health(args: argparse.Namespace) -> int:
    """Exit 0 if the heartbeat touched the health file less than `--max-age` seconds ago, else 1; one line either way.

    Never 2, even for a bad configuration: Docker reserves that code in health checks.
    """
    try:
        settings = load_settings(args.config, **_overrides(args))
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)  # noqa: T201 - the command's output
        return EXIT_FATAL
    healthy, line = check_health(settings.health_path(), max_age=args.max_age)
    print(line, file=sys.stdout if healthy else sys.stderr)
    return EXIT_OK if healthy else EXIT_FATAL


def _serve(args: argparse.Namespace) -> int:
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


_COMMANDS = {"run": _run, "enqueue": _enqueue, "status": _status, "unlock": _unlock}


# -- arguments -----------------------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags given on the command line, as nested settings (so they win over file and env)."""
    top = {
        "handler": "handler",
        "storage_dir": "storage_dir",
        "log_format": "log_format",
        "log_level": "log_level",
        "metrics_port": "metrics_port",
        "metrics_host": "metrics_host",
        "health_file": "health_file",
    }
    sections = {
        "queue": {"queue": "name", "backend": "backend", "queue_id": "id"},
        "api": {"api_base_url": "base_url"},
        "workers": {
            "concurrency": "concurrency",
            "lock_secs": "lock_secs",
            "client_key": "client_key",
            "keep_alive": "keep_alive",
            "max_requests": "max_requests",
            "grace": "grace",
            "handler_timeout": "handler_timeout",
            "max_retries": "max_retries",
        },
    }
    given = {k: v for k, v in vars(args).items() if v is not None}
    result: dict[str, Any] = {field: given[flag] for flag, field in top.items() if flag in given}
    if given.get("start_url"):
        result["start_urls"] = given["start_url"]
    for section, fields in sections.items():
        values = {field: given[flag] for flag, field in fields.items() if flag in given}
        if values:
            result[section] = values
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headlock", description="A worker-pool crawler runtime for request queues with locks."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, help="TOML settings file (see config/local.toml)")
    common.add_argument("--storage-dir", type=Path, help="where embedded queues and datasets live (./storage)")
    common.add_argument("--queue", help="queue name (default: default)")
    common.add_argument("--backend", choices=["embedded", "apify"], help="queue backend (default: embedded)")
    common.add_argument("--queue-id", help="API queue id (apify backend)")
    common.add_argument("--api-base-url", help="API base URL, e.g. http://127.0.0.1:8000 for headlock serve")
    common.add_argument("--log-format", choices=["auto", "console", "json"], help="default: console on a TTY")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    run_cmd = commands.add_parser("run", parents=[common], help="consume the queue with a handler (the main job)")
    run_cmd.add_argument("--handler", help="the handler as module:function, e.g. handlers.crawl:handle")
    run_cmd.add_argument("--concurrency", type=int, help="handler workers (default 10)")
    run_cmd.add_argument("--lock-secs", type=float, help="lock duration in seconds (default 60)")
    run_cmd.add_argument("--handler-timeout", type=float, help="seconds per attempt (default 60)")
    run_cmd.add_argument("--max-retries", type=int, help="retries of a failing request (default 3)")
    run_cmd.add_argument("--client-key", help="stable worker identity, 1-32 chars (default: random)")
    run_cmd.add_argument("--grace", type=float, help="seconds in-flight handlers get on shutdown (default 30)")
    run_cmd.add_argument("--max-requests", type=int, help="stop after this many finished requests")
    run_cmd.add_argument("--keep-alive", action="store_const", const=True, help="keep polling when the queue is empty")
    run_cmd.add_argument("--start-url", action="append", help="enqueue this URL first (repeatable)")
    run_cmd.add_argument("--summary", type=Path, help="write the run summary as JSON to this file, however it ends")
    run_cmd.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    run_cmd.add_argument("--metrics-host", help="address for --metrics-port (default 127.0.0.1)")
    run_cmd.add_argument("--health-file", type=Path, help="touched by the heartbeat (default STORAGE/headlock.health)")

    enqueue = commands.add_parser("enqueue", parents=[common], help="add URLs to the queue")
    enqueue.add_argument("urls", nargs="*", metavar="URL")
    enqueue.add_argument("--file", "-f", type=Path, help="read URLs from a file, one per line ('-' for stdin)")
    enqueue.add_argument("--label", help="userData.label for the router")
    enqueue.add_argument("--forefront", action="store_true", help="add to the head of the queue")
    enqueue.add_argument("--client-key", help=argparse.SUPPRESS)

    status = commands.add_parser("status", parents=[common], help="queue counts and who holds locks")
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")

    unlock = commands.add_parser("unlock", parents=[common], help="release every lock a client key holds")
    unlock.add_argument("--client-key", required=True, help="the client key whose locks to release")

    health = commands.add_parser("health", help="exit 0 if a running `headlock run` beat recently, else 1")
    health.add_argument("--config", "-c", type=Path, help="TOML settings file (for health_file / storage_dir)")
    health.add_argument("--storage-dir", type=Path, help="where the default health file lives (./storage)")
    health.add_argument("--health-file", type=Path, help="the file `headlock run` touches (default: from settings)")
    health.add_argument(
        "--max-age",
        type=_positive,
        default=DEFAULT_MAX_AGE,
        help=f"seconds since the last beat still healthy (default {DEFAULT_MAX_AGE:g}: three beats)",
    )

    serve = commands.add_parser(
        "serve", help="serve the embedded store as the Apify API v2 (request queues, datasets, key-value stores, runs)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    serve.add_argument("--storage", type=Path, default=Path("storage"), help="storage directory")
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
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value
