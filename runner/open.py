"""Open what the settings name: the queue (the embedded store, PostgreSQL or the HTTP API) and the results sink
beside it (the local dataset file on the embedded backend, the queue's database on postgres, the API's dataset on
apify; `results_backend` chooses another)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from runner.errors import ConfigError
from runner.metrics import Metrics
from runner.queue.protocol import RequestQueue
from runner.queue.sqlite import SqliteQueue, queue_path, validate_queue_name
from runner.results.jsonl import JsonlDataset
from runner.results.protocol import ResultsSink
from runner.settings import Settings

if TYPE_CHECKING:
    from runner.api.client import ApiClient, RateLimits
    from runner.api.resources import ActorRun, KeyValueStore
    from runner.queue.postgres import PostgresQueue

__all__ = [
    "RunBackends",
    "api_client",
    "api_token",
    "check_writable",
    "open_postgres",
    "open_queue",
    "open_run",
    "open_store",
    "pacing",
    "postgres_dsn",
    "results_in_postgres",
]

PLATFORM_HOSTS = ("api.apify.com",)
"""API hosts that never answer without a token: asking them without one is refused before any call."""


async def open_queue(settings: Settings, *, metrics: Metrics | None = None) -> RequestQueue:
    """Open (creating if needed) the configured queue; it reports its calls to `metrics` if given.

    The embedded queue's file (or the directory it will be made in) is checked to be writable first, creating
    nothing: the store itself opens lazily, and its first call would otherwise find out much later.

    Raises:
        ConfigError: the API backend without a base URL, or on the platform without a token; an embedded queue
            whose storage cannot be written (read-only, no permission), naming the path; the postgres backend
            without a DSN (or without the `postgres` extra).
        QueueError: the queue cannot be opened.
    """
    if settings.queue.backend == "postgres":
        return await open_postgres(settings, metrics=metrics)
    if settings.queue.backend == "embedded":
        path = queue_path(settings.storage_dir, validate_queue_name(settings.queue.name))
        await anyio.to_thread.run_sync(check_writable, path)
        return SqliteQueue.open(settings.storage_dir, settings.queue.name, metrics=metrics)
    from runner.queue.api import ApiQueue  # noqa: PLC0415 - only the API backend needs it

    api = settings.api
    token = api_token(settings)
    return await ApiQueue.open(
        base_url=api.base_url,
        token=token,
        queue_id=settings.queue.id,
        name=None if settings.queue.id else settings.queue.name,
        timeout=api.timeout,
        max_retries=api.max_retries,
        metrics=metrics or Metrics(),
        rate_limits=pacing(settings),
    )


def pacing(settings: Settings) -> RateLimits | None:
    """The client-side pacing `api.pacing` asks for (`auto`: the platform's limits on the platform's API only)."""
    from runner.api.client import RateLimits, platform_limits  # noqa: PLC0415 - only the API backend needs it

    if settings.api.pacing == "auto":
        return platform_limits(settings.api.base_url)
    return RateLimits() if settings.api.pacing == "on" else None


def postgres_dsn(settings: Settings) -> str:
    """The postgres backend's DSN.

    Raises:
        ConfigError: none is set.
    """
    if settings.queue.dsn is None or not settings.queue.dsn.get_secret_value().strip():
        raise ConfigError(
            "queue.dsn: required for backend 'postgres' (set HEADLOCK_QUEUE__DSN or DATABASE_URL, or [queue] dsn in"
            " the config file)"
        )
    return settings.queue.dsn.get_secret_value()


async def open_postgres(settings: Settings, *, create: bool = True, metrics: Metrics | None = None) -> PostgresQueue:
    """The configured queue in PostgreSQL (the schema brought up to date), created unless `create` is false.

    Raises:
        ConfigError: no DSN, a DSN that does not parse, or psycopg is not installed.
        NotFoundError: `create` is false and there is no such queue.
        QueueError: the database cannot be reached.
    """
    dsn = postgres_dsn(settings)
    try:
        from runner.queue.postgres import PostgresQueue  # noqa: PLC0415 - only this backend needs psycopg
    except ImportError as exc:
        raise ConfigError(f"queue.backend 'postgres' needs psycopg: pip install 'headlock[postgres]' ({exc})") from exc
    return await PostgresQueue.open(
        dsn, validate_queue_name(settings.queue.name), create=create, metrics=metrics or Metrics()
    )


def results_in_postgres(settings: Settings) -> bool:
    """Whether results go to a dataset in the postgres queue's database: `results_backend` "postgres", or "auto"
    with the postgres queue (a request's links, items and handled mark then commit in one transaction).

    Raises:
        ConfigError: `results_backend` "postgres" with another queue backend (the dataset lives in the queue's
            database).
    """
    if settings.results_backend == "postgres" and settings.queue.backend != "postgres":
        raise ConfigError(
            f"results_backend: 'postgres' needs queue.backend 'postgres' (the dataset lives in the queue's"
            f" database), got queue.backend {settings.queue.backend!r}"
        )
    return settings.queue.backend == "postgres" and settings.results_backend in ("auto", "postgres")


@dataclass(slots=True)
class RunBackends:
    """What `headlock run` works with, opened from the settings: the queue, the results sink, and on the API the
    shared client and the Actor's store and run object (None elsewhere)."""

    queue: RequestQueue
    results: ResultsSink
    api: ApiClient | None = None
    store: KeyValueStore | None = None
    actor_run: ActorRun | None = None


def api_client(settings: Settings, *, metrics: Metrics | None = None) -> ApiClient:
    """One client for every API call of the run (queue, dataset, store, run), as the settings describe it.

    Raises:
        ConfigError: no base URL, or the platform's API without a token.
    """
    from runner.api.client import ApiClient  # noqa: PLC0415 - only the API backend needs it

    api = settings.api
    token = api_token(settings)
    return ApiClient(
        base_url=api.base_url,
        token=token,
        timeout=api.timeout,
        max_retries=api.max_retries,
        metrics=metrics or Metrics(),
        rate_limits=pacing(settings),
    )


async def open_store(settings: Settings, api: ApiClient) -> KeyValueStore | None:
    """The Actor's default key-value store, when the settings name one."""
    from runner.api.resources import KeyValueStore  # noqa: PLC0415

    store_id = settings.actor.key_value_store_id
    return None if store_id is None else await KeyValueStore.open(api, store_id=store_id)


@asynccontextmanager
async def open_run(
    settings: Settings, *, metrics: Metrics | None = None, api: ApiClient | None = None
) -> AsyncIterator[RunBackends]:
    """Open the queue and the results sink the settings name (and the Actor's store and run on the API); close them
    all when the block ends. `api`, if given, is used and left open.

    Raises:
        ConfigError: missing API settings, or results_backend 'postgres' with another queue backend.
        QueueError: a backend cannot be opened (e.g. no such queue or dataset).
    """
    results_in_postgres(settings)  # a results backend the queue cannot have: said before anything is opened
    async with contextlib.AsyncExitStack() as stack:
        if settings.queue.backend in ("embedded", "postgres") and not settings.results_on_api():
            results: ResultsSink
            if results_in_postgres(settings):
                from runner.results.postgres import PostgresDataset  # noqa: PLC0415 - only this backend needs psycopg

                pg = await open_postgres(settings, metrics=metrics)
                stack.push_async_callback(pg.aclose)
                queue: RequestQueue = pg
                results = await PostgresDataset.open(pg, settings.dataset)
            else:
                queue = await open_queue(settings, metrics=metrics)
                stack.push_async_callback(queue.aclose)
                results = await _local_results(settings)
            stack.push_async_callback(results.aclose)
            yield RunBackends(queue, results)
            return
        from runner.api.resources import ActorRun  # noqa: PLC0415
        from runner.queue.api import ApiQueue  # noqa: PLC0415
        from runner.results.apify import ApiDataset  # noqa: PLC0415

        if api is None:
            api = api_client(settings, metrics=metrics)
            stack.push_async_callback(api.aclose)
        if settings.queue.backend == "apify":
            queue = await ApiQueue.open_over(
                api, queue_id=settings.queue.id, name=None if settings.queue.id else settings.queue.name
            )
        else:
            queue = await open_queue(settings, metrics=metrics)
        stack.push_async_callback(queue.aclose)
        if settings.results_on_api():
            sink: ResultsSink = await ApiDataset.open(
                api, dataset_id=settings.dataset_id, name=None if settings.dataset_id else settings.dataset
            )
        else:
            sink = await _local_results(settings)
        stack.push_async_callback(sink.aclose)
        store = await open_store(settings, api)
        run_id = settings.actor.run_id
        yield RunBackends(queue, sink, api, store, None if run_id is None else ActorRun(api, run_id))


async def _local_results(settings: Settings) -> JsonlDataset:
    """The local dataset file, opened for appending.

    Raises:
        ConfigError: it cannot be created or opened (a read-only directory, no permission), naming the path.
    """
    try:
        return await anyio.to_thread.run_sync(JsonlDataset.open, settings.storage_dir, settings.dataset)
    except OSError as exc:
        path = settings.storage_dir / "datasets" / f"{settings.dataset}.jsonl"
        raise ConfigError(_unwritable(Path(exc.filename) if exc.filename else path, exc)) from exc


def api_token(settings: Settings) -> str | None:
    """The API token the settings give, if any; every command that calls the API should get it here.

    Raises:
        ConfigError: no base URL, or none of the token for the platform's API, which would refuse every call (the
            retries of an unreachable host would take half a minute to say so). `headlock serve` without
            `--token` takes calls without one: any other host may be asked without a token; a wrong or missing
            token there is a 401, which fails at once (UnauthorizedError).
    """
    api = settings.api
    if not api.base_url:
        raise ConfigError("api.base_url: required for backend 'apify'")
    token = api.token.get_secret_value() if api.token else None
    host = (urlsplit(api.base_url).hostname or "").lower()
    if not token and host in PLATFORM_HOSTS:
        raise ConfigError(
            f"api.token: required for {api.base_url} (set APIFY_TOKEN or HEADLOCK_API__TOKEN, or [api] token in"
            " the config file; for a local `headlock serve`, set --api-base-url)"
        )
    return token


def check_writable(path: Path) -> None:
    """Check that the file `path` can be written, or created with its missing parent directories; create nothing.

    Raises:
        ConfigError: the file, its directory or the nearest existing parent cannot be written (a read-only mount,
            no permission), naming it.
    """
    target = path if path.exists() else None
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    for place in (target, directory):
        if place is not None and not os.access(place, os.W_OK | (os.X_OK if place.is_dir() else 0)):
            reason = errno.EROFS if _read_only_mount(place) else errno.EACCES
            raise ConfigError(_unwritable(place, OSError(reason, os.strerror(reason))))


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _unwritable(path: Path, exc: OSError) -> str:
    why = exc.strerror or str(exc)
    return f"storage is not writable: {path}: {why} (check the mount and permissions, or set --storage-dir)"
