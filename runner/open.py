"""Open the queue the settings name: the embedded store or the HTTP API."""

from __future__ import annotations

from runner.errors import ConfigError
from runner.metrics import Metrics
from runner.queue.protocol import RequestQueue
from runner.queue.sqlite import SqliteQueue, validate_queue_name
from runner.settings import Settings

__all__ = ["open_queue"]


async def open_queue(settings: Settings, *, metrics: Metrics | None = None) -> RequestQueue:
    """Open (creating if needed) the configured queue; it reports its calls to `metrics` if given.

    Raises:
        ConfigError: the API backend without a token or base URL.
        QueueError: the queue cannot be opened.
    """
    if settings.queue.backend == "embedded":
        return SqliteQueue.open(settings.storage_dir, validate_queue_name(settings.queue.name), metrics=metrics)
    from runner.queue.api import ApiQueue  # noqa: PLC0415 - only the API backend needs it

    api = settings.api
    if not api.base_url:
        raise ConfigError("api.base_url: required for backend 'apify'")
    token = api.token.get_secret_value() if api.token else None
    return await ApiQueue.open(
        base_url=api.base_url,
        token=token,
        queue_id=settings.queue.id,
        name=None if settings.queue.id else settings.queue.name,
        timeout=api.timeout,
        max_retries=api.max_retries,
        metrics=metrics or Metrics(),
    )
