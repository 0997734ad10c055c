"""Queue backends: the `RequestQueue` Protocol, the embedded SQLite store and the HTTP API client."""

from runner.queue.protocol import MAX_BATCH, MAX_CLIENT_KEY, MAX_LOCK_LIMIT, RequestQueue

__all__ = ["MAX_BATCH", "MAX_CLIENT_KEY", "MAX_LOCK_LIMIT", "RequestQueue"]
