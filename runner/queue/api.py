"""The `RequestQueue` over HTTP: the Apify API v2 request-queue endpoints (the platform or `headlock serve`).

Layers, each with one job: `_call` sends one request with rate limiting, per-attempt timeouts and retries (429,
5xx, network errors); `_check`/`_fetch` map the answer to `runner.errors` at this boundary and parse it; the
Protocol methods on top add the request cache that makes `lock_head` return complete requests.

Retries can be ambiguous. An attempt that failed before anything was sent (connect error, pool timeout) or was
refused with 429 was not applied; one that timed out or lost its connection after sending, or got a 5xx, may have
been. `_call` reports whether any attempt before its answer was ambiguous, and every error it raises after one
carries `maybe_applied=True`. The endpoints where it matters act on it: head/lock reports `may_have_orphans`, a batch
add counts its own first attempt's requests as new, a delete-lock answered "not locked" after one is done.
"""

from __future__ import annotations

import dataclasses
import email.utils
import gzip
import json
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, NamedTuple, NoReturn, Self, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import anyio
import httpx
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from runner.errors import (
    ConfigError,
    InvalidInputError,
    LockLostError,
    NotFoundError,
    QueueError,
    QueueUnavailableError,
    RateLimitedError,
    UnauthorizedError,
)
from runner.metrics import Metrics
from runner.models import (
    BatchAddResult,
    LockedHead,
    QueueInfo,
    Request,
    RequestDraft,
    RequestRegistration,
    parse_datetime,
)
from runner.queue.protocol import MAX_BATCH

__all__ = ["ApiQueue", "ApiQueueOptions", "ApiRetryPolicy", "CallTimeouts", "RateLimits"]

M = TypeVar("M", bound=BaseModel)
_Body = Request | Sequence[RequestDraft] | dict[str, Any] | None
"""What a call can carry: a request, drafts, or a raw JSON object (an unreadable request written back as read)."""

_log = structlog.get_logger("headlock.queue.api")

GZIP_MIN_BYTES = 1024
"""Bodies of this size or more are sent gzipped (as the official v3 client does)."""

_Tier = Literal["short", "medium", "long"]
_RateClass = Literal["batch", "single", "other"]


# -- configuration value objects ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiRetryPolicy:
    """When and how long to retry 429, 5xx and network errors.

    The delay after failed attempt k (0-based) is `base_delay * 2**k * U(1, 2)`, capped near `max_delay`; a
    `Retry-After` header replaces it (capped at `max_retry_after`). `unprocessed_retries` is how often a batch add
    resends the items the API reported as unprocessed.
    """

    max_retries: int = 6
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    unprocessed_retries: int = 3

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based)."""
        requested = _parse_retry_after(retry_after)
        if requested is not None:
            return min(requested, self.max_retry_after)
        delay = self.base_delay * 2.0**attempt * random.uniform(1, 2)
        # Jitter the cap too, so clients that all reached it do not retry in lockstep.
        return min(delay, self.max_delay * random.uniform(0.75, 1))


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass(frozen=True, slots=True)
class CallTimeouts:
    """Per-attempt timeouts in seconds by tier (as the official client's); each retry doubles it, up to `long`."""

    short: float = 5.0
    medium: float = 30.0
    long: float = 360.0

    @classmethod
    def uniform(cls, seconds: float) -> CallTimeouts:
        """Every call starts at `seconds`; retries double it up to the larger of `seconds` and 360 s."""
        return cls(short=seconds, medium=seconds, long=max(seconds, cls().long))

    def for_attempt(self, tier: _Tier, attempt: int) -> httpx.Timeout:
        """The timeout of attempt `attempt` (0-based) of a call in `tier`."""
        base = {"short": self.short, "medium": self.medium, "long": self.long}[tier]
        return httpx.Timeout(min(base * 2.0**attempt, max(self.long, base)))


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Client-side calls per second by endpoint class (the platform's per-queue limits, contract §6)."""

    batch: float = 40.0
    """head/lock and batch add."""
    single: float = 400.0
    """get/update one request, prolong and delete a lock."""
    other: float = 60.0
    """everything else."""


class ApiQueueOptions(TypedDict, total=False):
    """Optional settings of `ApiQueue`."""

    retry: ApiRetryPolicy
    max_retries: int
    """Shortcut: replaces `retry.max_retries`."""
    timeouts: CallTimeouts
    timeout: float
    """Shortcut: `CallTimeouts.uniform(timeout)` when `timeouts` is not given."""
    rate_limits: RateLimits
    cache_size: int
    """How many complete requests (added or updated by this instance) to keep for `lock_head`; default 50 000."""
    fetch_concurrency: int
    """How many GETs `lock_head` runs at once for requests not in the cache; default 16."""
    metrics: Metrics
    """Where each HTTP attempt is reported (endpoint, status, duration); disabled by default."""


class _RateLimiter:
    """A GCRA limiter: `rate` calls per second with bursts of up to `burst`; waits by sleeping, never spins."""

    def __init__(self, rate: float, burst: int) -> None:
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._tat = -math.inf  # theoretical arrival time of the next call

    def reserve(self, now: float) -> float:
        """Take the next slot; return how long to wait for it."""
        tat = max(self._tat, now)
        self._tat = tat + self._interval
        return max(0.0, tat - self._tolerance - now)

    async def acquire(self) -> None:
        """Wait for the next slot."""
        wait = self.reserve(anyio.current_time())
        if wait > 0:
            await anyio.sleep(wait)


# -- endpoints and wire shapes ------------------------------------------------------------------------------


class _Endpoint(NamedTuple):
    method: str
    template: str  # under /v2/request-queues/{queueId}; "" for the queue itself
    rate: _RateClass
    tier: _Tier
    lock_op: bool = False
    collection: bool = False

    @property
    def label(self) -> str:
        """How errors name the endpoint, e.g. `PUT /v2/request-queues/{queueId}/requests/{id}/lock`."""
        if self.collection:
            return f"{self.method} /v2/request-queues"
        return f"{self.method} /v2/request-queues/{{queueId}}{self.template}"

    @property
    def route(self) -> str:
        """The short name in `ApiQueue.calls` and metrics, e.g. `POST /head/lock`."""
        path = "/v2/request-queues" if self.collection else self.template or "/"
        return f"{self.method} {path}"

    def counter(self, status: str) -> str:
        """The key in `ApiQueue.calls`, e.g. `POST /head/lock 201`."""
        return f"{self.route} {status}"


_GET_OR_CREATE = _Endpoint("POST", "", "other", "short", collection=True)
_GET_QUEUE = _Endpoint("GET", "", "other", "short")
_LOCK_HEAD = _Endpoint("POST", "/head/lock", "batch", "medium")
_BATCH_ADD = _Endpoint("POST", "/requests/batch", "batch", "medium")
_UNLOCK = _Endpoint("POST", "/requests/unlock", "other", "long")
_GET_REQUEST = _Endpoint("GET", "/requests/{id}", "single", "short")
_UPDATE_REQUEST = _Endpoint("PUT", "/requests/{id}", "single", "medium")
_PROLONG_LOCK = _Endpoint("PUT", "/requests/{id}/lock", "single", "medium", lock_op=True)
_DELETE_LOCK = _Endpoint("DELETE", "/requests/{id}/lock", "single", "short", lock_op=True)


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class _HeadItem(_Wire):
    id: str
    unique_key: str
    url: str
    method: str = "GET"
    retry_count: int = 0


class _LockedHeadData(_Wire):
    items: list[_HeadItem]
    lock_secs: float
    queue_has_locked_requests: bool = False
    had_multiple_clients: bool = False


class _LockInfo(_Wire):
    lock_expires_at: datetime

    _parse = field_validator("lock_expires_at", mode="before")(parse_datetime)


class _UnlockResult(_Wire):
    unlocked_count: int


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _error_payload(response: httpx.Response) -> tuple[str | None, str]:
    """`error.type` and `error.message` of an error answer, or the start of its body when it has none."""
    try:
        error = response.json().get("error")
        return str(error["type"]), str(error.get("message", ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, f"unexpected answer: {response.text[:200]!r}"


_STATUS_ERRORS: dict[int, type[QueueError]] = {
    400: InvalidInputError,
    401: UnauthorizedError,
    403: UnauthorizedError,
    404: NotFoundError,
    413: InvalidInputError,
    415: InvalidInputError,
    429: RateLimitedError,
}


def _error_class(endpoint: _Endpoint, status: int, error_type: str | None) -> type[QueueError]:
    if error_type == "request-handled-or-locked" or (endpoint.lock_op and status in (403, 409)):
        return LockLostError
    if status >= 500:
        return QueueUnavailableError
    return _STATUS_ERRORS.get(status, QueueError)


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _lock_gone(response: httpx.Response) -> bool:
    """Whether an error answer of a lock operation says the lock is not (or no longer) there."""
    return response.status_code in (403, 404, 409) or _error_payload(response)[0] == "request-handled-or-locked"


def _claim_present(result: BatchAddResult) -> BatchAddResult:
    """`result` with the items reported present and unhandled reported new (after an ambiguous attempt)."""
    return result.model_copy(
        update={
            "processed_requests": [
                item.model_copy(update={"was_already_present": False})
                if item.was_already_present and not item.was_already_handled
                else item
                for item in result.processed_requests
            ]
        }
    )


def _validation_reason(exc: ValidationError) -> str:
    """The first problem of a validation error, as `where: what`."""
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def _api_time(value: datetime) -> str:
    """A timestamp as the API writes it: ISO-8601 UTC with milliseconds and `Z`."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Transport errors a retry cannot fix.
_PERMANENT = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
# Transport errors raised before any byte of the request reached the server: the attempt was certainly not applied.
# Every other one (read/write timeouts and errors, a connection closed before the answer) may have been.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, *_PERMANENT)


class _Answer(NamedTuple):
    """The answer `_call` returns: the response of its last attempt, when that attempt started, and whether an
    earlier attempt may have been applied."""

    response: httpx.Response
    sent_at: float
    """`anyio.current_time()` when the attempt that got `response` started (after the rate limiter's wait)."""
    ambiguous: bool
    """An earlier attempt got no answer after sending, or a 5xx: the call may have taken effect before this one."""


class _Fetched(NamedTuple):
    """What `_complete` made of a head: the complete requests, and what became of the others."""

    items: list[Request]
    quarantined: int
    """Unreadable requests ended as failed."""
    stranded: bool
    """Some requests this call locked are in neither `items` nor `quarantined`, and their locks could not be
    released (a failed quarantine or release): they stay locked by this client key until they expire."""


# -- the queue ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Secret:
    """The API token: only ever put in the `Authorization` header."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "'***'"


class ApiQueue:
    """A `RequestQueue` served over the request-queue API.

    `lock_head` returns complete requests although the API's head items lack `userData`, `headers` and
    `payload`: requests this instance added or updated come from a bounded cache (unless the head's `retryCount`
    shows another client has retried one since), the others are fetched with GET (concurrently). `calls` counts
    every HTTP attempt as `"METHOD path-template status"` (status `error` for a network failure). The token goes
    in the `Authorization` header only, never in URLs, logs, errors or `repr`.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        base_url: str,
        queue_id: str,
        token: str | None,
        **options: Unpack[ApiQueueOptions],
    ) -> None:
        """Use `queue_id` (an id or `~name`) at `base_url` (e.g. `https://api.apify.com`; `/v2` is added).

        A `client` given here is used as is and not closed by `aclose`. See `ApiQueueOptions` for the rest.
        """
        base = base_url.rstrip("/")
        self._base = base if base.endswith("/v2") else f"{base}/v2"
        self._queue_id = queue_id
        self._token = _Secret(token) if token else None
        self._owns_client = client is None
        # Keep-alive as large as the pool: connections beyond the keep-alive bound are closed after each call and
        # reopened on the next one, which costs more than the calls themselves on a busy worker.
        self._client = client or httpx.AsyncClient(
            headers={"Accept": "application/json"},
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )
        self._closed = False
        retry = options.get("retry") or ApiRetryPolicy()
        if (max_retries := options.get("max_retries")) is not None:
            retry = dataclasses.replace(retry, max_retries=max_retries)
        self._retry = retry
        timeout = options.get("timeout")
        self._timeouts = options.get("timeouts") or (CallTimeouts.uniform(timeout) if timeout else CallTimeouts())
        limits = options.get("rate_limits") or RateLimits()
        self._limiters = {
            name: _RateLimiter(rate, burst=max(1, int(rate / 10)))
            for name, rate in (("batch", limits.batch), ("single", limits.single), ("other", limits.other))
        }
        self._cache: OrderedDict[str, Request] = OrderedDict()
        self._cache_size = options.get("cache_size", 50_000)
        self._fetch_concurrency = options.get("fetch_concurrency", 16)
        self.calls: Counter[str] = Counter()
        self._metrics = options.get("metrics") or Metrics()

    @classmethod
    async def open(
        cls,
        *,
        base_url: str,
        token: str | None,
        queue_id: str | None = None,
        name: str | None = None,
        client: httpx.AsyncClient | None = None,
        **options: Unpack[ApiQueueOptions],
    ) -> ApiQueue:
        """Open a queue by `queue_id` (checked with `GET /v2/request-queues/{id}`), or by `name`, creating it when
        missing (`POST /v2/request-queues?name=`). Either way `queue_id` is then the queue's id.

        Raises:
            ConfigError: not exactly one of `queue_id` and `name` is given.
            NotFoundError: there is no queue `queue_id`.
            QueueError: the get or get-or-create call failed.
        """
        if (queue_id is None) == (name is None):
            raise ConfigError("give exactly one of queue_id and name")
        queue = cls(client, base_url=base_url, queue_id=queue_id or "", token=token, **options)
        try:
            if name is not None:
                info = await queue._fetch(_GET_OR_CREATE, QueueInfo, params={"name": name})
            else:
                info = await queue._fetch(_GET_QUEUE, QueueInfo)
        except NotFoundError as exc:
            with anyio.CancelScope(shield=True):
                await queue.aclose()
            raise NotFoundError(
                f"no request queue {queue_id or name!r} at {queue._base}",
                endpoint=exc.endpoint,
                status=exc.status,
                error_type=exc.error_type,
            ) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await queue.aclose()
            raise
        queue._queue_id = info.id
        return queue

    @property
    def queue_id(self) -> str:
        """The queue's id (or the `~name` it was constructed with, when not opened with `open`)."""
        return self._queue_id

    def __repr__(self) -> str:
        token = "'***'" if self._token else "None"
        return f"ApiQueue(base_url={self._base!r}, queue_id={self._queue_id!r}, token={token})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- transport ------------------------------------------------------------------------------------------

    def _url(self, endpoint: _Endpoint, request_id: str | None) -> str:
        if endpoint.collection:
            return f"{self._base}/request-queues"
        path = endpoint.template.format(id=quote(request_id or "", safe=""))
        return f"{self._base}/request-queues/{quote(self._queue_id, safe='~')}{path}"

    def _encode(self, endpoint: _Endpoint, body: _Body) -> tuple[dict[str, str], bytes | None]:
        """Headers and content of a call; bodies of 1 KiB or more gzipped. A dict is sent as it is.

        Raises:
            InvalidInputError: the body cannot be written as JSON (e.g. an arbitrary object in `userData`).
        """
        headers = {"Authorization": f"Bearer {self._token.value}"} if self._token else {}
        if body is None:
            return headers, None
        try:
            data: object
            if isinstance(body, Request):
                data = body.to_api()
            elif isinstance(body, dict):
                data = body
            else:
                data = [draft.to_api() for draft in body]
            content = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"the body cannot be sent as JSON: {exc}", endpoint=endpoint.label) from exc
        headers["Content-Type"] = "application/json"
        if len(content) >= GZIP_MIN_BYTES:
            content = gzip.compress(content, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return headers, content

    def _scrub(self, text: str) -> str:
        """Remove the token from text that came from elsewhere (an error body could echo it)."""
        return text.replace(self._token.value, "***") if self._token else text

    async def _call(
        self,
        endpoint: _Endpoint,
        *,
        request_id: str | None = None,
        params: dict[str, str | int] | None = None,
        body: _Body = None,
    ) -> _Answer:
        """Send one API call, retrying 429, 5xx and network errors; return the first other answer.

        Raises (each with `maybe_applied=True` when an attempt may have been applied, see the module docstring):
            RateLimitedError: 429 on every attempt.
            QueueUnavailableError: 5xx or network errors on every attempt.
        """
        url = self._url(endpoint, request_id)
        headers, content = self._encode(endpoint, body)
        attempts = self._retry.max_retries + 1
        ambiguous = False
        for attempt in range(attempts):
            await self._limiters[endpoint.rate].acquire()
            started = anyio.current_time()
            try:
                response = await self._client.request(
                    endpoint.method,
                    url,
                    params=params,
                    content=content,
                    headers=headers,
                    timeout=self._timeouts.for_attempt(endpoint.tier, attempt),
                )
            except httpx.RequestError as exc:
                self._count(endpoint, "error", started)
                ambiguous = ambiguous or not isinstance(exc, _UNSENT)
                if isinstance(exc, _PERMANENT) or attempt + 1 == attempts:
                    self._give_up(endpoint, exc, attempt + 1, request_id, maybe_applied=ambiguous)
                reason, retry_after = f"{type(exc).__name__}: {self._scrub(str(exc))}", None
            else:
                self._count(endpoint, str(response.status_code), started)
                if not _retryable(response.status_code):
                    return _Answer(response, started, ambiguous)
                ambiguous = ambiguous or response.status_code >= 500
                if attempt + 1 == attempts:
                    self._check(endpoint, response, request_id, attempts=attempts, maybe_applied=ambiguous)
                reason, retry_after = f"HTTP {response.status_code}", response.headers.get("retry-after")
            delay = self._retry.delay(attempt, retry_after)
            _log.warning(
                "queue.api.retry",
                endpoint=endpoint.label,
                attempt=attempt + 1,
                delay=round(delay, 3),
                reason=reason,
                maybe_applied=ambiguous,
            )
            await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises

    def _count(self, endpoint: _Endpoint, status: str, started: float) -> None:
        """Count one HTTP attempt in `calls` and in the metrics."""
        self.calls[endpoint.counter(status)] += 1
        self._metrics.queue_call("api", endpoint.route, status, anyio.current_time() - started)

    def _give_up(
        self,
        endpoint: _Endpoint,
        exc: httpx.RequestError,
        attempts: int,
        request_id: str | None,
        *,
        maybe_applied: bool,
    ) -> NoReturn:
        where = f" (request {request_id})" if request_id else ""
        message = f"no answer after {attempts} attempt(s){where}: {type(exc).__name__}: {self._scrub(str(exc))}"
        raise QueueUnavailableError(message, endpoint=endpoint.label, maybe_applied=maybe_applied) from exc

    def _check(
        self,
        endpoint: _Endpoint,
        response: httpx.Response,
        request_id: str | None,
        *,
        attempts: int = 1,
        maybe_applied: bool = False,
    ) -> None:
        """Raise the `runner.errors` type for a non-2xx answer."""
        if response.is_success:
            return
        status = response.status_code
        error_type, message = _error_payload(response)
        where = f" (request {request_id})" if request_id else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        raise _error_class(endpoint, status, error_type)(
            self._scrub(f"{message}{where}{tries}"),
            endpoint=endpoint.label,
            status=status,
            error_type=error_type,
            maybe_applied=maybe_applied,
        )

    def _data(self, endpoint: _Endpoint, response: httpx.Response) -> dict[str, Any]:
        """The `data` object of a 2xx answer.

        Raises:
            QueueUnavailableError: the answer is not JSON or has no `data` object (`maybe_applied` unless a GET:
                the call was answered with success).
        """
        try:
            payload = response.json()
        except ValueError as exc:
            raise QueueUnavailableError(
                f"malformed JSON in the answer: {response.text[:100]!r}",
                endpoint=endpoint.label,
                status=response.status_code,
                maybe_applied=endpoint.method != "GET",
            ) from exc
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict):
            raise QueueUnavailableError(
                "the answer has no `data` object",
                endpoint=endpoint.label,
                status=response.status_code,
                maybe_applied=endpoint.method != "GET",
            )
        return data

    def _parse(self, endpoint: _Endpoint, response: httpx.Response, model: type[M]) -> M:
        """The `data` of a 2xx answer as `model`.

        Raises:
            QueueUnavailableError: the answer is not JSON or not the documented shape (`maybe_applied` as `_data`).
        """
        try:
            return model.model_validate(self._data(endpoint, response))
        except ValidationError as exc:
            raise QueueUnavailableError(
                f"unexpected answer shape: {_validation_reason(exc)}",
                endpoint=endpoint.label,
                status=response.status_code,
                maybe_applied=endpoint.method != "GET",
            ) from None

    async def _fetch(
        self,
        endpoint: _Endpoint,
        model: type[M],
        *,
        request_id: str | None = None,
        params: dict[str, str | int] | None = None,
        body: _Body = None,
    ) -> M:
        answer = await self._call(endpoint, request_id=request_id, params=params, body=body)
        self._check(endpoint, answer.response, request_id, maybe_applied=answer.ambiguous)
        return self._parse(endpoint, answer.response, model)

    # -- the request cache ----------------------------------------------------------------------------------

    def _remember(self, request: Request) -> None:
        self._cache[request.id] = request
        self._cache.move_to_end(request.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _remember_added(self, drafts: Sequence[RequestDraft], result: BatchAddResult) -> None:
        """Cache what the queue now stores for each draft it newly added (as the server builds it)."""
        by_key = {draft.unique_key: draft for draft in drafts}
        for added in result.processed_requests:
            draft = by_key.get(added.unique_key)
            if draft is None or added.was_already_present:
                continue  # an existing request may differ from our draft
            stored = {"id": added.request_id, "retryCount": 0, **draft.to_api()}
            if stored.get("handledAt") is not None:
                continue  # it will not come out of the head
            stored["id"] = added.request_id
            try:
                self._remember(Request.model_validate(stored))
            except ValidationError:
                continue

    async def _complete(self, items: Sequence[_HeadItem], *, client_key: str) -> _Fetched:
        """Full requests for the head items this call locked: from the cache, else fetched concurrently (one GET
        each).

        A cached copy whose `retryCount` differs from the head's is stale (another client has retried the request,
        and may have recorded errors since): it is fetched instead. A request whose GET answer cannot be read as a
        `Request` is quarantined (`_quarantine`). One whose GET fails (after the retries) is released at the front
        of the queue for a later call, and the others are returned.

        Raises:
            QueueError: the first failed GET, when no request is left to return (the locks released first;
                `maybe_applied` when some could not be).
        """
        found: dict[str, Request | None] = {}
        missing: list[str] = []
        for item in items:
            cached = self._cache.get(item.id)
            if cached is not None and cached.retry_count == item.retry_count:
                self._cache.move_to_end(item.id)
                found[item.id] = cached.model_copy(deep=True)
            else:
                self._cache.pop(item.id, None)
                missing.append(item.id)
        unreadable, failures = await self._get_all(missing, found)
        stranded = False
        quarantined = 0
        for request_id, (raw, reason) in unreadable.items():
            if await self._quarantine(request_id, raw, reason, client_key=client_key):
                quarantined += 1
            else:
                stranded = True
        complete = []
        for item in items:
            if item.id in failures or item.id in unreadable:
                continue
            request = found.get(item.id)
            if request is None:
                _log.warning("queue.api.head_item_missing", request_id=item.id)  # deleted since the lock
                continue
            complete.append(request)
        if failures:
            stranded = not await self._release(failures, client_key=client_key) or stranded
            if not complete:
                first = next(iter(failures.values()))
                first.maybe_applied = stranded  # this call's locks may still be held
                raise first
        return _Fetched(complete, quarantined, stranded)

    async def _get_all(
        self, request_ids: Sequence[str], found: dict[str, Request | None]
    ) -> tuple[dict[str, tuple[dict[str, Any], str]], dict[str, QueueError]]:
        """GET `request_ids` concurrently into `found` (None: deleted); return the unreadable ones (`(raw object,
        reason)` by id) and the failed ones (error by id)."""
        unreadable: dict[str, tuple[dict[str, Any], str]] = {}
        failures: dict[str, QueueError] = {}
        if not request_ids:
            return unreadable, failures
        limiter = anyio.CapacityLimiter(self._fetch_concurrency)

        async def get(request_id: str) -> None:
            async with limiter:
                try:
                    raw = await self._get_raw(request_id)
                except QueueError as exc:
                    failures[request_id] = exc
                    return
            try:
                found[request_id] = None if raw is None else Request.model_validate(raw)
            except ValidationError as exc:
                unreadable[request_id] = (raw or {}, _validation_reason(exc))

        async with anyio.create_task_group() as group:
            for request_id in request_ids:
                group.start_soon(get, request_id)
        return unreadable, failures

    async def _get_raw(self, request_id: str) -> dict[str, Any] | None:
        """The stored request as the server sent it, None on 404.

        Raises:
            QueueError: the call failed, or its answer is not JSON with a `data` object.
        """
        answer = await self._call(_GET_REQUEST, request_id=request_id)
        if answer.response.status_code == 404:
            return None
        self._check(_GET_REQUEST, answer.response, request_id, maybe_applied=answer.ambiguous)
        return self._data(_GET_REQUEST, answer.response)

    async def _quarantine(self, request_id: str, raw: dict[str, Any], reason: str, *, client_key: str) -> bool:
        """End an unreadable request as failed under the lock just taken; return whether the server took it.

        The server's object is written back as it was read, plus `handledAt` and an error message appended to
        `errorMessages`, so nothing of it is lost and it leaves the head for good instead of coming back each
        time its lock lapses. When that PUT fails too, the lock is left to lapse.
        """
        message = f"quarantined: unreadable request: {reason}"
        errors = raw.get("errorMessages")
        kept = list(errors) if isinstance(errors, list) else [] if errors is None else [errors]
        body = {**raw, "handledAt": _api_time(datetime.now(UTC)), "errorMessages": [*kept, message]}
        body.setdefault("id", request_id)
        params: dict[str, str | int] = {"clientKey": client_key, "forefront": _bool(False)}
        try:
            answer = await self._call(_UPDATE_REQUEST, request_id=request_id, params=params, body=body)
            self._check(_UPDATE_REQUEST, answer.response, request_id, maybe_applied=answer.ambiguous)
        except QueueError as exc:
            _log.error("queue.request_quarantine_failed", request_id=request_id, reason=reason, error=str(exc))
            return False
        self._cache.pop(request_id, None)
        _log.warning("queue.request_quarantined", request_id=request_id, reason=reason)
        return True

    async def _release(self, failures: dict[str, QueueError], *, client_key: str) -> bool:
        """Give back, at the front of the queue, requests whose GET failed; return whether every lock went."""
        released = True

        async def release(request_id: str, error: QueueError) -> None:
            nonlocal released
            _log.warning("queue.api.head_item_unavailable", request_id=request_id, error=str(error))
            try:
                await self.delete_lock(request_id, client_key=client_key, forefront=True)
            except QueueError as exc:
                _log.warning("queue.api.head_item_release_failed", request_id=request_id, error=str(exc))
                released = False

        async with anyio.create_task_group() as group:
            for request_id, error in failures.items():
                group.start_soon(release, request_id, error)
        return released

    # -- the Protocol ---------------------------------------------------------------------------------------

    async def lock_head(self, *, limit: int, lock_secs: float, client_key: str) -> LockedHead:
        """Lock up to `limit` (≤ 25) requests and return them complete.

        `locked_at` is when the attempt that took the locks started. After an ambiguous attempt (module docstring)
        `may_have_orphans` is set: that attempt may have locked requests the answer does not list. A request that
        cannot be read is quarantined (`quarantined`); one that cannot be fetched is released (see `_complete`).

        Raises:
            QueueError: the call failed (`maybe_applied` after an ambiguous attempt), or no request could be fetched.
        """
        params: dict[str, str | int] = {"lockSecs": _number(lock_secs), "limit": limit, "clientKey": client_key}
        answer = await self._call(_LOCK_HEAD, params=params)
        self._check(_LOCK_HEAD, answer.response, None, maybe_applied=answer.ambiguous)
        head = self._parse(_LOCK_HEAD, answer.response, _LockedHeadData)
        fetched = await self._complete(head.items, client_key=client_key)
        return LockedHead(
            items=fetched.items,
            lock_secs=head.lock_secs,
            queue_has_locked_requests=head.queue_has_locked_requests,
            had_multiple_clients=head.had_multiple_clients,
            locked_at=answer.sent_at,
            may_have_orphans=answer.ambiguous or fetched.stranded,
            quarantined=fetched.quarantined,
        )

    async def prolong_lock(
        self, request_id: str, *, lock_secs: float, client_key: str, forefront: bool = False
    ) -> datetime:
        """Extend this client's lock to now + `lock_secs`; return the new expiry.

        The expiry is the server's clock. A caller dating it on its own clock should take the time before this
        call: the attempt that succeeded may have been sent later (after retries), so that is early, never late.

        Raises:
            LockLostError: another client holds the lock, or the request is handled.
        """
        params: dict[str, str | int] = {
            "lockSecs": _number(lock_secs),
            "clientKey": client_key,
            "forefront": _bool(forefront),
        }
        info = await self._fetch(_PROLONG_LOCK, _LockInfo, request_id=request_id, params=params)
        return info.lock_expires_at

    async def delete_lock(self, request_id: str, *, client_key: str, forefront: bool = False) -> None:
        """Release this client's lock; the request goes to the head (`forefront`) or the end.

        After an ambiguous attempt, an answer that the lock is not there (403, 404, 409) means that attempt released
        it: the call is done.

        Raises:
            LockLostError: another client holds the lock, or the request is handled.
        """
        params: dict[str, str | int] = {"clientKey": client_key, "forefront": _bool(forefront)}
        answer = await self._call(_DELETE_LOCK, request_id=request_id, params=params)
        if answer.ambiguous and not answer.response.is_success and _lock_gone(answer.response):
            _log.info("queue.api.lock_already_released", request_id=request_id, status=answer.response.status_code)
            return
        self._check(_DELETE_LOCK, answer.response, request_id, maybe_applied=answer.ambiguous)

    async def unlock_requests(self, *, client_key: str) -> int:
        """Release every lock `client_key` holds; return how many."""
        result = await self._fetch(_UNLOCK, _UnlockResult, params={"clientKey": client_key})
        return result.unlocked_count

    async def update_request(
        self, request: Request, *, client_key: str, forefront: bool = False, lock_required: bool = False
    ) -> RequestRegistration:
        """Replace the stored request (see the Protocol); a pending one is cached as sent.

        `lock_required` is not checked here: the API has no fenced write (the runtime checks its lease first).
        """
        params: dict[str, str | int] = {"clientKey": client_key, "forefront": _bool(forefront)}
        registration = await self._fetch(
            _UPDATE_REQUEST, RequestRegistration, request_id=request.id, params=params, body=request
        )
        if request.handled_at is None:
            self._remember(request.model_copy(deep=True))
        else:
            self._cache.pop(request.id, None)
        return registration

    async def batch_add(
        self, requests: Sequence[RequestDraft], *, client_key: str, forefront: bool = False
    ) -> BatchAddResult:
        """Add up to 25 requests; items the API reports unprocessed are resent with backoff a few times.

        After an ambiguous attempt (module docstring) the items reported `wasAlreadyPresent` and not handled may be
        that attempt's own: they are reported new (`was_already_present=False`) and cached like new ones. A request
        that really was there before is then counted as new (a rare overcount, never an undercount).

        Raises:
            InvalidInputError: more than 25 requests (no call is made).
        """
        if len(requests) > MAX_BATCH:
            raise InvalidInputError(
                f"a batch holds at most {MAX_BATCH} requests, got {len(requests)}", endpoint=_BATCH_ADD.label
            )
        params: dict[str, str | int] = {"clientKey": client_key, "forefront": _bool(forefront)}
        pending = list(requests)
        processed = []
        result = BatchAddResult()
        ambiguous = False
        for attempt in range(self._retry.unprocessed_retries + 1):
            if not pending:
                break
            answer = await self._call(_BATCH_ADD, params=params, body=pending)
            self._check(_BATCH_ADD, answer.response, None, maybe_applied=answer.ambiguous)
            result = self._parse(_BATCH_ADD, answer.response, BatchAddResult)
            ambiguous = ambiguous or answer.ambiguous
            if ambiguous:
                result = _claim_present(result)
            processed.extend(result.processed_requests)
            self._remember_added(pending, result)
            unprocessed = {item.unique_key for item in result.unprocessed_requests}
            pending = [draft for draft in pending if draft.unique_key in unprocessed]
            if pending and attempt < self._retry.unprocessed_retries:
                delay = self._retry.delay(attempt)
                _log.warning("queue.api.unprocessed", count=len(pending), attempt=attempt + 1, delay=round(delay, 3))
                await anyio.sleep(delay)
        return BatchAddResult(processed_requests=processed, unprocessed_requests=result.unprocessed_requests)

    async def get_request(self, request_id: str) -> Request | None:
        """Return the stored request, or None on 404."""
        answer = await self._call(_GET_REQUEST, request_id=request_id)
        if answer.response.status_code == 404:
            return None
        self._check(_GET_REQUEST, answer.response, request_id, maybe_applied=answer.ambiguous)
        return self._parse(_GET_REQUEST, answer.response, Request)

    async def get_info(self) -> QueueInfo:
        """Return the queue's metadata and counters.

        Raises:
            NotFoundError: the queue does not exist.
        """
        return await self._fetch(_GET_QUEUE, QueueInfo)

    async def aclose(self) -> None:
        """Close the HTTP client if this queue created it. Idempotent."""
        if self._owns_client and not self._closed:
            self._closed = True
            await self._client.aclose()
