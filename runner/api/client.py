"""The HTTP transport of every Apify API v2 resource headlock uses: request queues, datasets, key-value stores, runs.

Layers, each with one job: `ApiClient.call` sends one request with rate limiting, per-attempt timeouts and retries
(429, 5xx, network errors); `check`/`data`/`parse`/`fetch` map the answer to `runner.errors` at this boundary and
parse it. The resource clients on top (`runner.queue.api.ApiQueue`, `runner.results.apify.ApiDataset`,
`runner.api.resources`) name their endpoints with `Endpoint` and add what is theirs (the queue's request cache, the
dataset's batching).

Retries can be ambiguous. An attempt that failed before anything was sent (connect error, pool timeout) or was
refused with 429 was not applied; one that timed out or lost its connection after sending, or got a 5xx, may have
been. `call` reports whether any attempt before its answer was ambiguous (`Answer.ambiguous`), and every error it
raises after one carries `maybe_applied=True`; each endpoint acts on it as its semantics require.

One `ApiClient` is one connection pool: a process makes one and hands it to every resource client (`ApiQueue.over`,
`ApiDataset.open`, `KeyValueStore.open`, `ActorRun`). Whoever made it closes it (`aclose`, or `async with`), after
the resource clients that use it; they never close a client they were given.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple, NoReturn, Self, TypedDict, TypeVar, Unpack
from urllib.parse import quote, urlsplit

import anyio
import httpx
import structlog
from pydantic import BaseModel, ValidationError

from runner.backoff import retry_after_secs
from runner.errors import (
    InvalidInputError,
    LockLostError,
    NotFoundError,
    QueueError,
    QueueUnavailableError,
    RateLimitedError,
    UnauthorizedError,
)
from runner.http import AiohttpEngine, Engine, transport_for
from runner.metrics import Metrics

__all__ = [
    "GZIP_MIN_BYTES",
    "Answer",
    "ApiClient",
    "ApiClientOptions",
    "ApiRetryPolicy",
    "Body",
    "CallTimeouts",
    "Endpoint",
    "RateLimiter",
    "RateLimits",
    "Resource",
    "platform_limits",
]

M = TypeVar("M", bound=BaseModel)

_log = structlog.get_logger("headlock.api")

GZIP_MIN_BYTES = 1024
"""Bodies of this size or more are sent gzipped (as the official v3 client does)."""

_GZIP_IN_THREAD_BYTES = 256 * 1024
"""Bodies of this size or more are gzipped in a worker thread: a 9 MB dataset batch takes tens of milliseconds."""

Tier = Literal["short", "medium", "long"]
RateClass = Literal["batch", "single", "other"]
Resource = Literal["request-queues", "datasets", "key-value-stores", "actor-runs"]

_ID_NAMES: dict[Resource, str] = {
    "request-queues": "queueId",
    "datasets": "datasetId",
    "key-value-stores": "storeId",
    "actor-runs": "runId",
}
"""How endpoint labels name the id of each resource, as the API reference does."""


_EVENT_PREFIX: dict[Resource, str] = {
    "request-queues": "queue.api",
    "datasets": "dataset.api",
    "key-value-stores": "kvs.api",
    "actor-runs": "run.api",
}
"""Log events of each resource's calls: `queue.api.retry` as before, `dataset.api.retry`, ..."""


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
        requested = retry_after_secs(retry_after)
        if requested is not None:
            return min(requested, self.max_retry_after)
        delay = self.base_delay * 2.0**attempt * random.uniform(1, 2)
        # Jitter the cap too, so clients that all reached it do not retry in lockstep.
        return min(delay, self.max_delay * random.uniform(0.75, 1))


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

    def for_attempt(self, tier: Tier, attempt: int) -> httpx.Timeout:
        """The timeout of attempt `attempt` (0-based) of a call in `tier`."""
        base = {"short": self.short, "medium": self.medium, "long": self.long}[tier]
        return httpx.Timeout(min(base * 2.0**attempt, max(self.long, base)))


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Client-side calls per second by endpoint class (the platform's per-resource limits, contract §6).

    Each kind of resource (queues, datasets, stores, runs) has its own limiter per class: a shared client does not
    slow the queue's calls down with the dataset's.
    """

    batch: float = 40.0
    """head/lock and batch add."""
    single: float = 400.0
    """get/update one request, prolong and delete a lock; push dataset items; get/put a store record."""
    other: float = 60.0
    """everything else."""


def platform_limits(base_url: str) -> RateLimits | None:
    """The platform's limits for its own API (a host under `apify.com`), None for any other server."""
    host = (urlsplit(base_url).hostname or "").lower()
    return RateLimits() if host == "apify.com" or host.endswith(".apify.com") else None


class ApiClientOptions(TypedDict, total=False):
    """Optional settings of `ApiClient`."""

    retry: ApiRetryPolicy
    max_retries: int
    """Shortcut: replaces `retry.max_retries`."""
    timeouts: CallTimeouts
    timeout: float
    """Shortcut: `CallTimeouts.uniform(timeout)` when `timeouts` is not given."""
    rate_limits: RateLimits | None
    """Client-side pacing; None: none. Unset: the platform's limits on the platform's API (`*.apify.com`), none
    elsewhere (`headlock serve` and other servers pace nobody)."""
    http_transport: Engine
    """The engine of the client `ApiClient` makes (not of one it is given): aiohttp's (the default) or httpx's."""
    metrics: Metrics
    """Where each HTTP attempt is reported (endpoint, status, duration); disabled by default."""


class RateLimiter:
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


# -- endpoints, bodies, answers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One API endpoint: `method` on `template` under one `resource` (`/v2/<resource>/<id>`).

    `template` is the path under the resource (`""` for the resource itself) with at most one placeholder, filled
    with the call's `item_id` (a request id, a record key) and named by `item` in error messages. `collection` is the
    resource collection itself (`POST /v2/datasets?name=`).
    """

    method: str
    resource: Resource
    template: str
    rate: RateClass
    tier: Tier
    item: str = ""
    """What the placeholder is, for messages: `request`, `record`."""
    lock_op: bool = False
    """A lock operation of the queue: a 403 or 409 means the lock is lost."""
    collection: bool = False
    follow_redirects: bool = False
    """Follow a redirect (else the httpx client's default: off for the client `ApiClient` makes)."""

    @property
    def label(self) -> str:
        """How errors name the endpoint, e.g. `PUT /v2/request-queues/{queueId}/requests/{id}/lock`."""
        if self.collection:
            return f"{self.method} /v2/{self.resource}"
        return f"{self.method} /v2/{self.resource}/{{{_ID_NAMES[self.resource]}}}{self.template}"

    @property
    def route(self) -> str:
        """The short name in `ApiClient.calls` and metrics: the label, except for the queue's own endpoints.

        Those are relative to the queue (`POST /head/lock`, `GET /` for the queue itself), as they were before the
        other resources shared this client: tests and benchmarks read them.
        """
        if self.resource == "request-queues" and not self.collection:
            return f"{self.method} {self.template or '/'}"
        return self.label

    def counter(self, status: str) -> str:
        """The key in `ApiClient.calls`, e.g. `POST /head/lock 201`."""
        return f"{self.route} {status}"

    def path(self, resource_id: str | None, item_id: str | None) -> str:
        """The URL path under `/v2` with the ids filled in (percent-encoded; `~` kept, as in `user~name`)."""
        if self.collection:
            return f"/{self.resource}"
        head, _, rest = self.template.partition("{")
        tail = rest.partition("}")[2] if rest else ""
        item = quote(item_id or "", safe="") if rest else ""
        return f"/{self.resource}/{quote(resource_id or '', safe='~')}{head}{item}{tail}"


@dataclass(frozen=True, slots=True)
class Body:
    """A request body ready to send: its bytes (uncompressed) and content type.

    `compress`: gzip it when it is `GZIP_MIN_BYTES` or more (off for data that is compressed already).
    """

    content: bytes = field(repr=False)
    content_type: str = "application/json"
    compress: bool = True

    @classmethod
    def encode_json(cls, endpoint: Endpoint, data: object) -> Body:
        """`data` as compact JSON (UTF-8, no NaN).

        Raises:
            InvalidInputError: `data` cannot be written as JSON (e.g. an arbitrary object in `userData`).
        """
        try:
            content = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidInputError(f"the body cannot be sent as JSON: {exc}", endpoint=endpoint.label) from exc
        return cls(content)


class Answer(NamedTuple):
    """The answer `ApiClient.call` returns: the response of its last attempt, when that attempt started, and whether
    an earlier attempt may have been applied."""

    response: httpx.Response
    sent_at: float
    """`anyio.current_time()` when the attempt that got `response` started (after the rate limiter's wait)."""
    ambiguous: bool
    """An earlier attempt got no answer after sending, or a 5xx: the call may have taken effect before this one."""


def error_payload(response: httpx.Response) -> tuple[str | None, str]:
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


def _error_class(endpoint: Endpoint, status: int, error_type: str | None) -> type[QueueError]:
    if error_type == "request-handled-or-locked" or (endpoint.lock_op and status in (403, 409)):
        return LockLostError
    if status >= 500:
        return QueueUnavailableError
    return _STATUS_ERRORS.get(status, QueueError)


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def validation_reason(exc: ValidationError) -> str:
    """The first problem of a validation error, as `where: what`."""
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


# Transport errors a retry cannot fix.
_PERMANENT = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
# Transport errors raised before any byte of the request reached the server: the attempt was certainly not applied.
# Every other one (read/write timeouts and errors, a connection closed before the answer) may have been.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, *_PERMANENT)


@dataclass(slots=True)
class _Secret:
    """The API token: only ever put in the `Authorization` header."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "'***'"


# -- the client ---------------------------------------------------------------------------------------------


class ApiClient:
    """One connection pool to the API at `base_url`, with the retry policy, timeouts and rate limits of every call.

    `calls` counts every HTTP attempt as `"route status"` (`Endpoint.counter`; status `error` for a network
    failure), whichever resource client made it. The token goes in the `Authorization` header only, never in URLs,
    logs, errors or `repr`.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        base_url: str,
        token: str | None,
        **options: Unpack[ApiClientOptions],
    ) -> None:
        """Call the API at `base_url` (e.g. `https://api.apify.com`; `/v2` is added).

        A `client` given here is used as is and not closed by `aclose`. See `ApiClientOptions` for the rest.
        """
        base = base_url.rstrip("/")
        self._base = base if base.endswith("/v2") else f"{base}/v2"
        self._token = _Secret(token) if token else None
        self._owns_client = client is None
        # Keep-alive as large as the pool: connections beyond the keep-alive bound are closed after each call and
        # reopened on the next one, which costs more than the calls themselves on a busy worker.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        # Every attempt is ours to count: a lost answer must be known as one (`Answer.ambiguous`).
        transport = transport_for(options.get("http_transport", "aiohttp"), limits, resend_on_stale=False)
        self._client = client or httpx.AsyncClient(
            headers={"Accept": "application/json"}, limits=limits, transport=transport
        )
        self._engine = transport if client is None and isinstance(transport, AiohttpEngine) else None
        """Our own client's aiohttp engine: calls go to it straight (`AiohttpEngine.exchange`), with the headers
        the client would add, and skip httpx's client layers (about a third of a call's CPU on the worker)."""
        self._headers = dict(self._client.headers)
        self._closed = False
        retry = options.get("retry") or ApiRetryPolicy()
        if (max_retries := options.get("max_retries")) is not None:
            retry = dataclasses.replace(retry, max_retries=max_retries)
        self.retry = retry
        """The retry policy (resource clients read `unprocessed_retries` and `delay` from it)."""
        timeout = options.get("timeout")
        self._timeouts = options.get("timeouts") or (CallTimeouts.uniform(timeout) if timeout else CallTimeouts())
        rates = options["rate_limits"] if "rate_limits" in options else platform_limits(base)
        self._rates: dict[RateClass, float] | None = (
            None if rates is None else {"batch": rates.batch, "single": rates.single, "other": rates.other}
        )
        self._limiters: dict[tuple[Resource, RateClass], RateLimiter] = {}
        self.calls: Counter[str] = Counter()
        self._metrics = options.get("metrics") or Metrics()

    @property
    def base_url(self) -> str:
        """The API root, ending in `/v2`."""
        return self._base

    @property
    def on_platform(self) -> bool:
        """Whether this is the platform's own API (a host under `apify.com`)."""
        return platform_limits(self._base) is not None

    @property
    def has_token(self) -> bool:
        """Whether calls carry a token (never the token itself)."""
        return self._token is not None

    def url(self, endpoint: Endpoint, resource_id: str | None = None, item_id: str | None = None) -> str:
        """The URL of a call (no token in it)."""
        return f"{self._base}{endpoint.path(resource_id, item_id)}"

    def __repr__(self) -> str:
        token = "'***'" if self._token else "None"
        return f"ApiClient(base_url={self._base!r}, token={token})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this one created it. Idempotent."""
        if self._owns_client and not self._closed:
            self._closed = True
            await self._client.aclose()

    def scrub(self, text: str) -> str:
        """Remove the token from text that came from elsewhere (an error body could echo it)."""
        return text.replace(self._token.value, "***") if self._token else text

    def _limiter(self, endpoint: Endpoint) -> RateLimiter | None:
        if self._rates is None:
            return None
        key = (endpoint.resource, endpoint.rate)
        limiter = self._limiters.get(key)
        if limiter is None:
            rate = self._rates[endpoint.rate]
            limiter = self._limiters[key] = RateLimiter(rate, burst=max(1, int(rate / 10)))
        return limiter

    async def _encode(self, body: Body | None) -> tuple[dict[str, str], bytes | None]:
        """Headers and content of a call; bodies of `GZIP_MIN_BYTES` or more gzipped (large ones in a thread)."""
        headers = {"Authorization": f"Bearer {self._token.value}"} if self._token else {}
        if body is None:
            return headers, None
        headers["Content-Type"] = body.content_type
        content = body.content
        if body.compress and len(content) >= GZIP_MIN_BYTES:
            if len(content) >= _GZIP_IN_THREAD_BYTES:
                content = await anyio.to_thread.run_sync(gzip.compress, content, 5)
            else:
                content = gzip.compress(content, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return headers, content

    async def call(
        self,
        endpoint: Endpoint,
        *,
        resource_id: str | None = None,
        item_id: str | None = None,
        params: Mapping[str, str | int] | None = None,
        body: Body | None = None,
    ) -> Answer:
        """Send one API call, retrying 429, 5xx and network errors; return the first other answer.

        `resource_id` is the queue, dataset, store or run (`None` for a collection), `item_id` fills the
        endpoint's placeholder.

        Raises (each with `maybe_applied=True` when an attempt may have been applied, see the module docstring):
            RateLimitedError: 429 on every attempt.
            QueueUnavailableError: 5xx or network errors on every attempt.
        """
        url = self.url(endpoint, resource_id, item_id)
        headers, content = await self._encode(body)
        attempts = self.retry.max_retries + 1
        limiter = self._limiter(endpoint)
        ambiguous = False
        for attempt in range(attempts):
            if limiter is not None:
                await limiter.acquire()
            started = anyio.current_time()
            try:
                response = await self._send(
                    endpoint, url, params=params, content=content, headers=headers, attempt=attempt
                )
            except httpx.RequestError as exc:
                self._count(endpoint, "error", started)
                ambiguous = ambiguous or not isinstance(exc, _UNSENT)
                if isinstance(exc, _PERMANENT) or attempt + 1 == attempts:
                    self._give_up(endpoint, exc, attempt + 1, item_id, maybe_applied=ambiguous)
                reason, retry_after = f"{type(exc).__name__}: {self.scrub(str(exc))}", None
            else:
                self._count(endpoint, str(response.status_code), started)
                if not _retryable(response.status_code):
                    return Answer(response, started, ambiguous)
                ambiguous = ambiguous or response.status_code >= 500
                if attempt + 1 == attempts:
                    self.check(endpoint, response, item_id, attempts=attempts, maybe_applied=ambiguous)
                reason, retry_after = f"HTTP {response.status_code}", response.headers.get("retry-after")
            delay = self.retry.delay(attempt, retry_after)
            _log.warning(
                f"{_EVENT_PREFIX[endpoint.resource]}.retry",
                endpoint=endpoint.label,
                attempt=attempt + 1,
                delay=round(delay, 3),
                reason=reason,
                maybe_applied=ambiguous,
            )
            await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises

    async def _send(
        self,
        endpoint: Endpoint,
        url: str,
        *,
        params: Mapping[str, str | int] | None,
        content: bytes | None,
        headers: dict[str, str],
        attempt: int,
    ) -> httpx.Response:
        """One attempt: straight on our own aiohttp engine unless the endpoint follows redirects, else through the
        httpx client."""
        timeout = self._timeouts.for_attempt(endpoint.tier, attempt)
        if self._engine is not None and not endpoint.follow_redirects:
            return await self._engine.exchange(
                endpoint.method, url, params=params, headers={**self._headers, **headers}, content=content,
                timeouts=timeout,
            )  # fmt: skip
        return await self._client.request(
            endpoint.method,
            url,
            params=params,
            content=content,
            headers=headers,
            timeout=timeout,
            follow_redirects=True if endpoint.follow_redirects else httpx.USE_CLIENT_DEFAULT,
        )

    def _count(self, endpoint: Endpoint, status: str, started: float) -> None:
        """Count one HTTP attempt in `calls` and in the metrics."""
        self.calls[endpoint.counter(status)] += 1
        self._metrics.queue_call("api", endpoint.route, status, anyio.current_time() - started)

    def _give_up(
        self,
        endpoint: Endpoint,
        exc: httpx.RequestError,
        attempts: int,
        item_id: str | None,
        *,
        maybe_applied: bool,
    ) -> NoReturn:
        where = f" ({endpoint.item} {item_id})" if item_id else ""
        message = f"no answer after {attempts} attempt(s){where}: {type(exc).__name__}: {self.scrub(str(exc))}"
        raise QueueUnavailableError(message, endpoint=endpoint.label, maybe_applied=maybe_applied) from exc

    def check(
        self,
        endpoint: Endpoint,
        response: httpx.Response,
        item_id: str | None = None,
        *,
        attempts: int = 1,
        maybe_applied: bool = False,
    ) -> None:
        """Raise the `runner.errors` type for a non-2xx answer (`QueueError` subclasses, whatever the resource)."""
        if response.is_success:
            return
        status = response.status_code
        error_type, message = error_payload(response)
        where = f" ({endpoint.item} {item_id})" if item_id else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        raise _error_class(endpoint, status, error_type)(
            self.scrub(f"{message}{where}{tries}"),
            endpoint=endpoint.label,
            status=status,
            error_type=error_type,
            maybe_applied=maybe_applied,
        )

    def data(self, endpoint: Endpoint, response: httpx.Response) -> dict[str, Any]:
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

    def parse(
        self, endpoint: Endpoint, response: httpx.Response, model: type[M], data: dict[str, Any] | None = None
    ) -> M:
        """The `data` of a 2xx answer as `model` (`data`: that object, when the caller has read it already).

        Raises:
            QueueUnavailableError: the answer is not JSON or not the documented shape (`maybe_applied` as `data`).
        """
        try:
            return model.model_validate(self.data(endpoint, response) if data is None else data)
        except ValidationError as exc:
            raise QueueUnavailableError(
                f"unexpected answer shape: {validation_reason(exc)}",
                endpoint=endpoint.label,
                status=response.status_code,
                maybe_applied=endpoint.method != "GET",
            ) from None

    async def fetch(
        self,
        endpoint: Endpoint,
        model: type[M],
        *,
        resource_id: str | None = None,
        item_id: str | None = None,
        params: Mapping[str, str | int] | None = None,
        body: Body | None = None,
    ) -> M:
        """`call`, `check` and `parse`: the answer's `data` as `model`, or the error."""
        answer = await self.call(endpoint, resource_id=resource_id, item_id=item_id, params=params, body=body)
        self.check(endpoint, answer.response, item_id, maybe_applied=answer.ambiguous)
        return self.parse(endpoint, answer.response, model)
