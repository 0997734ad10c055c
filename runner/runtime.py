"""Wires the roles together: one task group owns the heartbeat, the progress reporter, the fetcher and the workers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog

from runner.commit import Committer, RetryPolicy
from runner.context import SharedHttp
from runner.errors import ConfigError, QueueError
from runner.fetcher import fetch
from runner.gcpolicy import young_threshold
from runner.handoff import Handoff
from runner.heartbeat import keep_alive
from runner.leases import Lease, Leases
from runner.loopwatch import LoopMonitor
from runner.metrics import Metrics
from runner.politeness import Hosts, hosts_for, polite_transport
from runner.progress import report_progress
from runner.queue.protocol import RequestQueue
from runner.results.protocol import ResultsSink
from runner.router import Handler
from runner.settings import PolitenessSettings, StartRequest, WorkerSettings, random_client_key
from runner.shared_client import HandlerClient
from runner.shutdown import STOP_MARGIN, Stopper, drain_on_stop, release_all
from runner.start import start_drafts
from runner.stats import ErrorTally, RunStats
from runner.uniquekey import UniqueKeyFunction, normalize_parts
from runner.worker import Worker

__all__ = ["RunSummary", "run"]

log = structlog.get_logger("headlock.runtime")


@dataclass(frozen=True, slots=True)
class RunSummary:
    """How a run ended."""

    reason: str
    """`finished` (queue done), `max_requests`, or the stop reason (e.g. `SIGTERM`)."""
    client_key: str
    stats: dict[str, Any]
    released: int
    results: str | None = None
    """Where the items are (`ResultsSink.location`: a file path, or the dataset)."""
    pending: int | None = None
    """Requests the queue still had pending at the end; None when it could not be asked."""
    failed_top: tuple[dict[str, Any], ...] = ()
    """The most common errors of the requests that failed for good here, as `{"count", "error"}` (`ErrorTally`)."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "reason": self.reason,
            "client_key": self.client_key,
            "released": self.released,
            **self.stats,
            "results": self.results,
            "pending": self.pending,
            "failed_top": list(self.failed_top),
        }


async def run(
    queue: RequestQueue,
    handler: Handler,
    dataset: ResultsSink,
    *,
    workers: WorkerSettings | None = None,
    http: httpx.AsyncClient | None = None,
    options: Mapping[str, Any] | None = None,
    start_urls: Sequence[str | StartRequest] = (),
    stopper: Stopper | None = None,
    progress_every: float = 5.0,
    metrics: Metrics | None = None,
    health_file: Path | None = None,
    stats: RunStats | None = None,
    progress_hook: Callable[[Mapping[str, Any]], None] | None = None,
    unique_key: UniqueKeyFunction = normalize_parts,
    politeness: PolitenessSettings | None = None,
) -> RunSummary:
    """Consume `queue` with `handler` until it is done or `stopper` stops it, then release every lock.

    Installs no signal handlers: call `stopper.stop()` (the CLI does on SIGTERM/SIGINT). `metrics` (disabled by
    default) reports the run's counters while it runs; the heartbeat touches `health_file`, if given, every few
    seconds (see `runner.health`). `stats` (fresh by default) may carry counters of an earlier life of the run (a
    resumed Actor run); `progress_hook` gets each progress report's fields. `unique_key` makes the default
    `uniqueKey` of the URLs enqueued (start URLs and links; `runner.uniquekey.unique_key_function`).
    `politeness` (`PolitenessSettings()` by default) rules the shared client built when `http` is None: per-host
    slots, delays, backoff, robots.txt and User-Agent (`runner.politeness`); a client of the caller's is used as is.

    Raises:
        QueueError: the queue refused us (unauthorized, invalid input) or a fatal call failed.
        InvalidUrlError: a start URL is not absolute http(s).
    """
    cfg = workers or WorkerSettings()
    stopper = stopper or Stopper()
    client_key = cfg.client_key or random_client_key()
    metrics = metrics or Metrics()
    own_http = http is None
    client, hosts = _client(http, cfg, politeness)  # first: a broken install fails before anything needs closing
    leases, stats, errors = Leases(), stats or RunStats(), ErrorTally()
    metrics.track(stats, leases)
    committer = Committer(
        queue,
        leases,
        dataset,
        stats,
        client_key=client_key,
        policy=RetryPolicy(max_retries=cfg.max_retries, backoff=cfg.retry_backoff),
    )
    handoff = Handoff[Lease]()  # the fetcher's leases to the workers
    fetch_scope, crawl_scope = anyio.CancelScope(), anyio.CancelScope()
    crawl_done = anyio.Event()
    structlog.contextvars.bind_contextvars(client_key=client_key)
    monitor = LoopMonitor()
    log.info("run.starting", concurrency=cfg.concurrency, lock_secs=cfg.lock_secs, keep_alive=cfg.keep_alive)

    released = 0
    try:
        await _prepare(
            queue, committer, stable_key=bool(cfg.client_key), start_urls=start_urls, key_function=unique_key
        )

        async with anyio.create_task_group() as services:
            await services.start(monitor.watch)
            await services.start(
                partial(
                    keep_alive,
                    queue,
                    leases,
                    stats,
                    client_key=client_key,
                    lock_secs=cfg.lock_secs,
                    health_file=health_file,
                )
            )
            services.start_soon(
                partial(
                    report_progress,
                    queue,
                    leases,
                    stats,
                    every=progress_every,
                    metrics=metrics,
                    hook=progress_hook,
                    hosts=hosts,
                )
            )
            services.start_soon(
                partial(
                    drain_on_stop,
                    stopper,
                    fetch_scope=fetch_scope,
                    buffered=handoff,
                    crawl_scope=crawl_scope,
                    crawl_done=crawl_done,
                    committer=committer,
                    grace=cfg.grace,
                )
            )
            try:
                with crawl_scope, young_threshold(cfg.gc_threshold):
                    async with anyio.create_task_group() as crawl:
                        crawl.start_soon(
                            partial(
                                _fetch_until_stopped,
                                fetch_scope,
                                queue=queue,
                                send=handoff,
                                committer=committer,
                                cfg=cfg,
                                hosts=hosts,
                            )
                        )
                        worker = Worker(
                            handler,
                            committer,
                            client,
                            options or {},
                            cfg.handler_timeout,
                            lock_secs=cfg.lock_secs,
                            monitor=monitor,
                            unique_key=unique_key,
                            errors=errors,
                            hosts=hosts,
                        )
                        for _ in range(cfg.concurrency):
                            crawl.start_soon(worker.run, handoff)
            finally:
                crawl_done.set()
                handoff.end()
                released = await release_all(committer, deadline=_stop_deadline(stopper, cfg.grace))
                services.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A task group wraps what stops the run; the caller gets the one error itself (e.g. NotFoundError).
        raise _sole_error(group) or group  # noqa: B904 - the group is the sole error's context
    finally:
        if own_http:
            with anyio.CancelScope(shield=True):
                await client.aclose()
        structlog.contextvars.unbind_contextvars("client_key")

    reason = stopper.reason or (
        "max_requests" if cfg.max_requests and stats.finished >= cfg.max_requests else "finished"
    )
    summary = RunSummary(
        reason=reason,
        client_key=client_key,
        stats=stats.as_dict(),
        released=released,
        results=dataset.location,
        pending=await _pending(queue),
        failed_top=tuple(errors.top(TOP_ERRORS)),
    )
    log.info("run.finished", **summary.as_dict())
    return summary


TOP_ERRORS = 5
"""How many of the most common errors the summary lists."""


async def _pending(queue: RequestQueue) -> int | None:
    """The queue's pending count for the summary (one call, at most a few seconds); None if it does not answer."""
    with anyio.move_on_after(5):
        try:
            return (await queue.get_info()).pending_request_count
        except QueueError as exc:
            log.debug("run.pending_unknown", error=str(exc))
    return None


def _sole_error(group: BaseExceptionGroup[Any]) -> Exception | None:
    """The only non-cancellation leaf of `group`, if there is exactly one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif not isinstance(exc, anyio.get_cancelled_exc_class()):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], Exception) else None


def _stop_deadline(stopper: Stopper, grace: float) -> float | None:
    """When a requested stop must be over (the documented stop timeout is grace + 10 s); None without a stop."""
    return None if stopper.requested_at is None else stopper.requested_at + grace + STOP_MARGIN


def _client(
    http: httpx.AsyncClient | None, cfg: WorkerSettings, politeness: PolitenessSettings | None
) -> tuple[httpx.AsyncClient | SharedHttp, Hosts | None]:
    """The caller's client as it is, or the shared one with its hosts (default politeness when none is given)."""
    if http is not None:
        return http, None
    polite = politeness or PolitenessSettings()
    hosts = hosts_for(polite)
    return shared_http(cfg, polite, hosts=hosts), hosts


def shared_http(
    cfg: WorkerSettings, politeness: PolitenessSettings | None = None, *, hosts: Hosts | None = None
) -> SharedHttp:
    """The handlers' client as `default_http_client` builds it, on first use; an engine that is not installed is
    refused now, without importing it.

    Raises:
        ConfigError: the aiohttp engine is asked for and httpx-aiohttp cannot be found (a broken install).
    """
    build = partial(default_http_client, cfg, politeness, hosts=hosts)
    if cfg.http_transport != "aiohttp":
        return SharedHttp(build)
    try:
        found = sys.modules["httpx_aiohttp"] if "httpx_aiohttp" in sys.modules else find_spec("httpx_aiohttp")
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(
            "workers.http_transport: 'aiohttp' needs httpx-aiohttp, a dependency of headlock: reinstall it"
            " (pip install httpx-aiohttp aiohttp), or set workers.http_transport = 'httpx'"
        )
    return SharedHttp(build)


def default_http_client(
    cfg: WorkerSettings, politeness: PolitenessSettings | None = None, *, hosts: Hosts | None = None
) -> httpx.AsyncClient:
    """The client handlers share when the caller gives none (a `runner.shared_client.HandlerClient`): redirects
    followed, pool sized to the workers.

    With `http_transport = "aiohttp"` (the default) the requests go through aiohttp's engine (httpx-aiohttp);
    handlers see the same `httpx.AsyncClient` and `httpx.Response` either way. With `politeness`, the engine is
    wrapped in `runner.politeness.PoliteTransport` (with `hosts`, fresh by default) and every request carries its
    `user_agent`; without, the client is the bare engine (as the benchmarks' baselines use it).

    Raises:
        ConfigError: the aiohttp transport is asked for but httpx-aiohttp cannot be imported (a broken install).
    """
    limits = httpx.Limits(max_connections=cfg.concurrency * 2, max_keepalive_connections=cfg.concurrency * 2)
    transport: httpx.AsyncBaseTransport | None = None
    if cfg.http_transport == "aiohttp":
        try:
            from runner.http import AiohttpEngine  # noqa: PLC0415 - imports aiohttp (large) only when chosen
        except ImportError as exc:
            raise ConfigError(
                f"workers.http_transport: 'aiohttp' needs httpx-aiohttp, a dependency of headlock: reinstall it"
                f" (pip install httpx-aiohttp aiohttp), or set workers.http_transport = 'httpx' ({exc})"
            ) from exc
        transport = AiohttpEngine(limits)
    headers: dict[str, str] | None = None
    if politeness is not None:
        engine = transport or httpx.AsyncHTTPTransport(limits=limits)
        transport = polite_transport(engine, politeness, hosts)
        headers = {"User-Agent": politeness.user_agent}
    return HandlerClient(
        follow_redirects=True,
        timeout=httpx.Timeout(cfg.handler_timeout),
        limits=limits,
        transport=transport,
        headers=headers,
    )


async def _prepare(
    queue: RequestQueue,
    committer: Committer,
    *,
    stable_key: bool,
    start_urls: Sequence[str | StartRequest],
    key_function: UniqueKeyFunction,
) -> None:
    if stable_key:
        # A restarted worker with a stable key frees the locks its previous life left, instead of waiting.
        stale = await queue.unlock_requests(client_key=committer.client_key)
        if stale:
            log.info("run.released_stale_locks", count=stale)
    if start_urls:
        await committer.add(start_drafts(start_urls, key_function=key_function))


async def _fetch_until_stopped(
    scope: anyio.CancelScope,
    *,
    queue: RequestQueue,
    send: Handoff[Lease],
    committer: Committer,
    cfg: WorkerSettings,
    hosts: Hosts | None = None,
) -> None:
    backoff_until, next_backoff_end = (
        (lambda: committer.backoff_until, committer.next_backoff_end)
        if hosts is None
        else (
            # Requests given back for a busy host (runner.worker) are ours on purpose too, and come back as due.
            lambda: max(committer.backoff_until, hosts.deferred_until()),
            partial(_sooner, committer.next_backoff_end, hosts.next_deferral_end),
        )
    )
    with scope:
        await fetch(
            queue,
            send,
            committer.leases,
            committer.stats,
            client_key=committer.client_key,
            capacity=cfg.concurrency + cfg.prefetch,
            batch=cfg.batch,
            lock_secs=cfg.lock_secs,
            keep_alive=cfg.keep_alive,
            max_requests=cfg.max_requests,
            backoff_until=backoff_until,
            next_backoff_end=next_backoff_end,
            recent=committer.recent,  # None on a consistent head: no read-back before the run may call it finished
        )


def _sooner(*ends: Callable[[], float | None]) -> float | None:
    """The soonest of the times `ends` give (None: none)."""
    due = [end for end in (when() for when in ends) if end is not None]
    return min(due) if due else None
