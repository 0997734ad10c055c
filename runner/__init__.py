"""headlock: a worker-pool crawler runtime for request queues with locks.

A handler is `async def handle(ctx: Context) -> None`; `run()` consumes a `RequestQueue` with it.
"""

from runner.context import Context
from runner.errors import (
    AlreadyHandledError,
    ConfigError,
    DatasetWriteError,
    HandlerImportError,
    HeadlockError,
    InvalidInputError,
    InvalidItemError,
    InvalidUrlError,
    LockLostError,
    NoRetry,
    NotFoundError,
    QueueError,
    QueueUnavailableError,
    RateLimitedError,
    RobotsDisallowedError,
    RobotsUnavailableError,
    UnauthorizedError,
)
from runner.metrics import Metrics, PrometheusMetrics
from runner.models import BatchAddResult, LockedHead, QueueInfo, Request, RequestDraft, RequestRegistration
from runner.queue.protocol import RequestQueue
from runner.queue.sqlite import SqliteQueue
from runner.results.jsonl import JsonlDataset
from runner.results.protocol import ResultsSink
from runner.router import Handler, Router
from runner.runtime import RunSummary, run
from runner.settings import PolitenessSettings, Settings, WorkerSettings, load_settings
from runner.shutdown import Stopper
from runner.signals import stop_on_signals
from runner.uniquekey import KeyConvention, normalize_url, request_id_for, unique_key_function

__all__ = [
    "AlreadyHandledError",
    "BatchAddResult",
    "ConfigError",
    "Context",
    "DatasetWriteError",
    "Handler",
    "HandlerImportError",
    "HeadlockError",
    "InvalidInputError",
    "InvalidItemError",
    "InvalidUrlError",
    "JsonlDataset",
    "KeyConvention",
    "LockLostError",
    "LockedHead",
    "Metrics",
    "NoRetry",
    "NotFoundError",
    "PolitenessSettings",
    "PrometheusMetrics",
    "QueueError",
    "QueueInfo",
    "QueueUnavailableError",
    "RateLimitedError",
    "Request",
    "RequestDraft",
    "RequestQueue",
    "RequestRegistration",
    "ResultsSink",
    "RobotsDisallowedError",
    "RobotsUnavailableError",
    "Router",
    "RunSummary",
    "Settings",
    "SqliteQueue",
    "Stopper",
    "UnauthorizedError",
    "WorkerSettings",
    "load_settings",
    "normalize_url",
    "request_id_for",
    "run",
    "stop_on_signals",
    "unique_key_function",
]
