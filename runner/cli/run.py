"""`headlock run`: the crawl, with the Actor's platform around it when it runs as one, and its summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus

from runner.actor.input import describe_input, input_settings
from runner.actor.platform import ActorPlatform, read_input
from runner.cli._args import handler_option, overrides
from runner.cli._common import EXIT_FATAL, EXIT_MIGRATED, EXIT_OK, EXIT_USAGE, first_leaf, headlock_error
from runner.errors import ConfigError, InvalidUrlError
from runner.health import check_health
from runner.loader import load_handler
from runner.metrics import Metrics, PrometheusMetrics
from runner.open import RunBackends, api_client, open_run, open_store
from runner.router import Handler
from runner.runtime import RunSummary, run
from runner.settings import Settings, load_settings
from runner.shutdown import Stopper
from runner.start import start_drafts
from runner.stats import RunStats
from runner.uniquekey import unique_key_function

if TYPE_CHECKING:
    from runner.api.client import ApiClient


log = structlog.get_logger("headlock.cli")

EXIT_FAILED_REQUESTS = 3
"""`--fail-on-error` (`fail_on_error = true`): the run ended, and requests failed for good (a signal's or a
migration's exit code wins over it)."""
MIGRATION_WAIT = 120.0
"""Longest wait, after a migration's shutdown, for the platform to stop the process."""


async def run_command(settings: Settings, args: argparse.Namespace) -> int:
    """`headlock run`; with `--summary`, the summary file is written on every way out (a `reason` always)."""
    processes = getattr(args, "processes", 1)  # a Namespace made by hand may lack it
    if processes > 1:
        from runner.cli._group import run_group  # noqa: PLC0415 - the group module uses this one's summary writer

        return await run_group(settings, args, processes)
    try:
        summary, code = await _crawl(settings, args)
    except BaseException as exc:
        if args.summary is not None:
            failure = failure_summary(exc, client_key=settings.workers.client_key)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(write_summary, args.summary, failure)
        raise
    if args.summary is not None:
        await anyio.to_thread.run_sync(write_summary, args.summary, {**summary.as_dict(), "exit_code": code})
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
        # Started, not just scheduled: the first connection may be made before this task would first run (aiohttp
        # sends its SYN within the opening call's step), and a SIGTERM then would kill the process outright.
        await tg.start(_watch_signals, stopper, received, signalled)
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
        elif code == EXIT_OK and settings.fail_on_error and _failed(summary):
            code = EXIT_FAILED_REQUESTS
        tg.cancel_scope.cancel()
    return summary, code


def _failed(summary: RunSummary) -> int:
    """Requests the run ended as failed: its handlers' failures and the unreadable requests the queue ended."""
    return int(summary.stats.get("failed", 0)) + int(summary.stats.get("quarantined", 0))


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
    return load_settings(args.config, actor_input=input_settings(actor_input), **overrides(args))


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
            politeness=settings.politeness,
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


def failure_summary(exc: BaseException, *, client_key: str | None) -> dict[str, Any]:
    """The summary of a run that ended with `exc`: why (`reason`), the error and the exit code."""
    error = headlock_error(exc)
    shown: BaseException = error if error is not None else first_leaf(exc)
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


def write_summary(path: Path, data: dict[str, Any]) -> None:
    """Write the summary JSON next to where it goes, then rename: a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        partial.replace(path)
    except OSError as exc:
        log.error("summary.write_failed", path=str(path), error=str(exc))


async def _watch_signals(
    stopper: Stopper,
    received: list[int],
    signalled: anyio.Event | None = None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SIGINT/SIGTERM start the graceful stop; a second one forces it. Reports started once the handlers are in."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            received.append(signum)
            stopper.stop(signal.Signals(signum).name)
            if signalled is not None:
                signalled.set()


def processes_option(text: str) -> int:
    """`--processes`: a positive integer, or `auto` (the CPUs this process may run on).

    Raises:
        argparse.ArgumentTypeError: anything else (argparse names the option).
    """
    if text == "auto":
        return len(os.sched_getaffinity(0))
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return count


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `run`."""
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
    run_cmd.add_argument(
        "--processes",
        type=processes_option,
        default=1,
        metavar="N",
        help="worker processes sharing the queue, each its own client key; auto: one per CPU (default 1)",
    )
    run_cmd.add_argument("--summary", type=Path, help="write the run summary as JSON to this file, however it ends")
    run_cmd.add_argument(
        "-O",
        "--option",
        action="append",
        type=handler_option,
        metavar="KEY=VALUE",
        help='a handler option (ctx.options), over the config file\'s; VALUE is a TOML value (2, false, "x") or a '
        "bare word (a string); repeatable",
    )
    run_cmd.add_argument(
        "--fail-on-error",
        action="store_const",
        const=True,
        help=f"exit {EXIT_FAILED_REQUESTS} when requests failed for good (default: exit 0 once the run ended)",
    )
    run_cmd.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    run_cmd.add_argument("--metrics-host", help="address for --metrics-port (default 127.0.0.1)")
    run_cmd.add_argument("--health-file", type=Path, help="touched by the heartbeat (default STORAGE/headlock.health)")
    run_cmd.set_defaults(command=run_command, needs_settings=True)
