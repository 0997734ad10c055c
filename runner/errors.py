"""The one exception tree of headlock.

    HeadlockError
    ├── ConfigError                 invalid settings or CLI input (the CLI exits 2)
    ├── HandlerImportError          a `module:function` handler path that does not resolve (exit 2)
    ├── InvalidUrlError             a URL that is not absolute http(s) (also a ValueError)
    ├── InvalidItemError            a dataset item JSON cannot represent (also a ValueError): the handler's error
    ├── DatasetWriteError           the dataset could not be written (full disk, I/O error): that attempt fails
    ├── QueueError                  a queue or other API call failed; `.endpoint` names the operation
    │   ├── LockLostError           the lock is not (or no longer) ours: expired and retaken, handled, released
    │   │   └── AlreadyHandledError the request is handled already (by whom, the store does not say)
    │   ├── NotFoundError           unknown queue or request
    │   ├── InvalidInputError       the queue refused the arguments (limit > 25, bad client key, body too large)
    │   ├── UnauthorizedError       missing or wrong API token
    │   ├── RateLimitedError        429 after every retry
    │   └── QueueUnavailableError   network errors, 5xx, timeouts, a locked or full SQLite file, after every retry
    ├── RobotsUnavailableError      robots.txt could not be read (5xx, 429, timeout): that attempt fails, retried
    └── NoRetry                     raised by a handler: fail this request now, without retries
        └── RobotsDisallowedError   robots.txt forbids the URL: the shared client refused to fetch it

Foreign errors (httpx, sqlite3) are mapped where they enter, with `raise ... from exc`. No message ever carries the
API token.
"""

from __future__ import annotations

__all__ = [
    "AlreadyHandledError",
    "ConfigError",
    "DatasetWriteError",
    "HandlerImportError",
    "HeadlockError",
    "InvalidInputError",
    "InvalidItemError",
    "InvalidUrlError",
    "LockLostError",
    "NoRetry",
    "NotFoundError",
    "QueueError",
    "QueueUnavailableError",
    "RateLimitedError",
    "RobotsDisallowedError",
    "RobotsUnavailableError",
    "UnauthorizedError",
]


class HeadlockError(Exception):
    """Base of every error headlock raises on purpose."""


class ConfigError(HeadlockError):
    """Invalid configuration or command-line input."""


class HandlerImportError(ConfigError):
    """A handler path (`module:function`) that cannot be imported or is not an async callable."""


class InvalidUrlError(HeadlockError, ValueError):
    """A URL that is not an absolute http(s) URL."""


class InvalidItemError(HeadlockError, ValueError):
    """A dataset item that is not a dict of JSON values; raised by `ctx.push_data`, so it is the handler's error."""


class DatasetWriteError(HeadlockError):
    """Writing results failed (full disk, I/O error); nothing of the failed write is left behind."""


class QueueError(HeadlockError):
    """A queue operation failed.

    `endpoint` names the operation (e.g. `PUT /requests/{id}/lock` or `lock_head`), `status` the HTTP status when
    there is one, `error_type` the API's `error.type`; `maybe_applied` is true when an attempt got no answer, so the
    call may have taken effect although it failed.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int | None = None,
        error_type: str | None = None,
        maybe_applied: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.error_type = error_type
        self.maybe_applied = maybe_applied
        """An attempt got no answer (timeout, connection lost after sending, 5xx): the call may have taken effect."""
        parts = [p for p in (endpoint, str(status) if status is not None else "", error_type or "") if p]
        super().__init__(f"{' '.join(parts)}: {message}" if parts else message)


class LockLostError(QueueError):
    """The lock is not held by this client (expired and retaken, released, or the request is handled)."""


class AlreadyHandledError(LockLostError):
    """A fenced write found the request handled: after an unanswered attempt of our own, that attempt was applied."""


class NotFoundError(QueueError):
    """The queue or the request does not exist."""


class InvalidInputError(QueueError):
    """The queue refused the arguments or the body."""


class UnauthorizedError(QueueError):
    """The API token is missing or wrong."""


class RateLimitedError(QueueError):
    """The queue kept answering 429."""


class QueueUnavailableError(QueueError):
    """The queue could not be reached or kept failing (network, 5xx, timeouts, locked or full database)."""


class NoRetry(HeadlockError):  # noqa: N818 - a control signal, named for what the handler asks for
    """Raise from a handler to fail the request at once: it is marked handled with its error recorded."""


class RobotsDisallowedError(NoRetry):
    """The host's robots.txt forbids the URL for our User-Agent: the shared client did not fetch it, and the request
    fails at once (`NoRetry: disallowed by robots.txt: <url>`)."""


class RobotsUnavailableError(HeadlockError):
    """The host's robots.txt could not be read (5xx, 429, a timeout, a network error): the standard says wait, so
    the attempt fails and the request is retried per the run's policy."""
