"""The `RequestQueue` over HTTP: the Apify API v2 request-queue endpoints (the platform or `headlock serve`).

The transport (rate limiting, per-attempt timeouts, retries of 429, 5xx and network errors, the mapping to
`runner.errors`) is `runner.api.client.ApiClient`, shared with the other resources; this module names the queue's
endpoints and adds the request cache that makes `lock_head` return complete requests.

Retries can be ambiguous (`runner.api.client`'s docstring): an error raised after an attempt that may have been
applied carries `maybe_applied=True`. The endpoints where it matters act on it: head/lock reports
`may_have_orphans`, a batch add counts its own first attempt's requests as new, a delete-lock answered "not locked"
after one is done.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar, Unpack, cast

import anyio
import httpx
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from runner.api.client import (
    GZIP_MIN_BYTES,
    Answer,
    ApiClient,
    ApiClientOptions,
    ApiRetryPolicy,
    Body,
    CallTimeouts,
    Endpoint,
    RateClass,
    RateLimiter,
    RateLimits,
    Tier,
    error_payload,
    validation_reason,
)
from runner.errors import ConfigError, InvalidInputError, NotFoundError, QueueError, QueueUnavailableError
from runner.models import (
    BatchAddResult,
    LockedHead,
    QueueCounts,
    QueueInfo,
    Request,
    RequestDraft,
    RequestRegistration,
    format_api_datetime,
    is_failed,
    parse_datetime,
    utc_now,
    with_failed_mark,
)
from runner.queue.admin import MAX_LIST_LIMIT, MAX_REQUEUE_BATCH, RequestPage, RequeueResult, can_requeue
from runner.queue.protocol import MAX_BATCH

__all__ = ["GZIP_MIN_BYTES", "ApiQueue", "ApiQueueOptions", "ApiRetryPolicy", "CallTimeouts", "RateLimits"]

M = TypeVar("M", bound=BaseModel)
_Body = Request | Sequence[RequestDraft] | dict[str, Any] | None
"""What a call can carry: a request, drafts, or a raw JSON object (an unreadable request written back as read)."""

_RateLimiter = RateLimiter  # its tests import it from here

_log = structlog.get_logger("headlock.queue.api")

_DEFAULT_CACHE_SIZE = 50_000
_DEFAULT_FETCH_CONCURRENCY = 16


_CLIENT_OPTIONS = ApiClientOptions.__optional_keys__


class ApiQueueOptions(ApiClientOptions, total=False):
    """Optional settings of `ApiQueue`: those of its `ApiClient`, and the queue's own two."""

    cache_size: int
    """How many complete requests (added or updated by this instance) to keep for `lock_head`; default 50 000."""
    fetch_concurrency: int
    """How many GETs `lock_head` runs at once for requests not in the cache; default 16."""
    full_head_items: bool
    """Ask head/lock for complete items (`headlockItems=full`, which `headlock serve` honours: no GET per request).
    Unset: asked of any server but the platform's, whose items lack `userData` (each is then fetched)."""


# -- endpoints and wire shapes ------------------------------------------------------------------------------


def _queue_endpoint(
    method: str, template: str, rate: RateClass, tier: Tier, *, lock_op: bool = False, collection: bool = False
) -> Endpoint:
    """An endpoint under `/v2/request-queues/{queueId}` (`template` "" for the queue itself)."""
    item = "request" if "{id}" in template else ""
    return Endpoint(method, "request-queues", template, rate, tier, item=item, lock_op=lock_op, collection=collection)


_GET_OR_CREATE = _queue_endpoint("POST", "", "other", "short", collection=True)
_GET_QUEUE = _queue_endpoint("GET", "", "other", "short")
_LOCK_HEAD = _queue_endpoint("POST", "/head/lock", "batch", "medium")
_BATCH_ADD = _queue_endpoint("POST", "/requests/batch", "batch", "medium")
_UNLOCK = _queue_endpoint("POST", "/requests/unlock", "other", "long")
_GET_REQUEST = _queue_endpoint("GET", "/requests/{id}", "single", "short")
_UPDATE_REQUEST = _queue_endpoint("PUT", "/requests/{id}", "single", "medium")
_PROLONG_LOCK = _queue_endpoint("PUT", "/requests/{id}/lock", "single", "medium", lock_op=True)
_DELETE_LOCK = _queue_endpoint("DELETE", "/requests/{id}/lock", "single", "short", lock_op=True)
_LIST_REQUESTS = _queue_endpoint("GET", "/requests", "other", "long")
_DELETE_QUEUE = _queue_endpoint("DELETE", "", "other", "short")

_SCAN_PAGES = 10
"""Most pages of `MAX_LIST_LIMIT` one count in `counts` reads (100 000 requests): beyond, the counts are not exact."""
_REQUEUE_CONCURRENCY = 8


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


def _complete_items(items: list[Any]) -> dict[str, dict[str, Any]]:
    """The head/lock answer's items that came complete (with `userData`, as `headlock serve` sends them when asked),
    by id, without the lock's own field (`items` as validated by `_LockedHeadData`: a list)."""
    complete: dict[str, dict[str, Any]] = {}
    for item in items:
        if isinstance(item, dict) and "userData" in item and isinstance(item.get("id"), str):
            complete[item["id"]] = {k: v for k, v in item.items() if k != "lockExpiresAt"}
    return complete


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _lock_gone(response: httpx.Response) -> bool:
    """Whether an error answer of a lock operation says the lock is not (or no longer) there."""
    return response.status_code in (403, 404, 409) or error_payload(response)[0] == "request-handled-or-locked"


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


def _marked_user_data(user_data: Any) -> dict[str, Any]:
    """A quarantined request's `userData` with the failed marker; one that is not an object (or null) is kept
    under `__headlock.unreadableUserData`, since the marker needs an object."""
    if user_data is None or isinstance(user_data, dict):
        return with_failed_mark(user_data)
    return with_failed_mark({"__headlock": {"unreadableUserData": user_data}})


def _kept(item: dict[str, Any], *, unhandled: bool, failed: bool, handled: bool) -> bool:
    """Whether a listed request is of the states asked (`unhandled`: pending or locked)."""
    if item.get("handledAt") is None:
        return unhandled
    return failed if is_failed(item) else handled


class _Fetched(NamedTuple):
    """What `_complete` made of a head: the complete requests, and what became of the others."""

    items: list[Request]
    quarantined: int
    """Unreadable requests ended as failed."""
    stranded: bool
    """Some requests this call locked are in neither `items` nor `quarantined`, and their locks could not be
    released (a failed quarantine or release): they stay locked by this client key until they expire."""


# -- the queue ----------------------------------------------------------------------------------------------


class ApiQueue:
    """A `RequestQueue` served over the request-queue API.

    `lock_head` returns complete requests although the API's head items lack `userData`, `headers` and
    `payload`: requests this instance added or updated come from a bounded cache (unless the head's `retryCount`
    shows another client has retried one since), the others are fetched with GET (concurrently). `calls` is the
    `ApiClient`'s count of HTTP attempts as `"METHOD path-template status"` (status `error` for a network failure;
    over a shared client it counts the other resources' calls too, under their own keys). The token goes in the
    `Authorization` header only, never in URLs, logs, errors or `repr`.

    Made with the constructor (or `open`), the queue has an `ApiClient` of its own and closes it in `aclose`;
    made with `over` (or `open_over`), it uses a shared one and leaves it open.
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
        cache_size = options.get("cache_size", _DEFAULT_CACHE_SIZE)
        fetch_concurrency = options.get("fetch_concurrency", _DEFAULT_FETCH_CONCURRENCY)
        transport = cast("ApiClientOptions", {k: v for k, v in options.items() if k in _CLIENT_OPTIONS})
        api = ApiClient(client, base_url=base_url, token=token, **transport)
        self._setup(
            api,
            owns_api=True,
            queue_id=queue_id,
            cache_size=cache_size,
            fetch_concurrency=fetch_concurrency,
            full_head_items=options.get("full_head_items"),
        )

    def _setup(
        self,
        api: ApiClient,
        *,
        owns_api: bool,
        queue_id: str,
        cache_size: int,
        fetch_concurrency: int,
        full_head_items: bool | None,
    ) -> None:
        self._api = api
        self._owns_api = owns_api
        self._queue_id = queue_id
        self._cache: OrderedDict[str, Request] = OrderedDict()
        self._cache_size = cache_size
        self._fetch_concurrency = fetch_concurrency
        self._full_head = not api.on_platform if full_head_items is None else full_head_items

    @classmethod
    def over(
        cls,
        api: ApiClient,
        *,
        queue_id: str,
        cache_size: int = _DEFAULT_CACHE_SIZE,
        fetch_concurrency: int = _DEFAULT_FETCH_CONCURRENCY,
        full_head_items: bool | None = None,
    ) -> ApiQueue:
        """Use `queue_id` (an id or `~name`) through a shared `api`, which `aclose` leaves open.

        The transport settings (retries, timeouts, rate limits, metrics) are `api`'s.
        """
        queue = cls.__new__(cls)
        queue._setup(
            api,
            owns_api=False,
            queue_id=queue_id,
            cache_size=cache_size,
            fetch_concurrency=fetch_concurrency,
            full_head_items=full_head_items,
        )
        return queue

    @classmethod
    async def open(
        cls,
        *,
        base_url: str,
        token: str | None,
        queue_id: str | None = None,
        name: str | None = None,
        client: httpx.AsyncClient | None = None,
        create: bool = True,
        **options: Unpack[ApiQueueOptions],
    ) -> ApiQueue:
        """Open a queue by `queue_id` (checked with `GET /v2/request-queues/{id}`), or by `name`, creating it when
        missing (`POST /v2/request-queues?name=`) unless `create` is False (then `GET /v2/request-queues/~name`).
        Either way `queue_id` is then the queue's id.

        Raises:
            ConfigError: not exactly one of `queue_id` and `name` is given.
            NotFoundError: there is no queue `queue_id` (or `name`, when not `create`).
            QueueError: the get or get-or-create call failed.
        """
        if (queue_id is None) == (name is None):
            raise ConfigError("give exactly one of queue_id and name")
        queue = cls(client, base_url=base_url, queue_id=queue_id or "", token=token, **options)
        return await queue._resolve(name, create=create)

    @classmethod
    async def open_over(
        cls,
        api: ApiClient,
        *,
        queue_id: str | None = None,
        name: str | None = None,
        cache_size: int = _DEFAULT_CACHE_SIZE,
        fetch_concurrency: int = _DEFAULT_FETCH_CONCURRENCY,
        create: bool = True,
    ) -> ApiQueue:
        """`open` through a shared `api` (see `over`): by `queue_id`, or by `name` (got or created, or only got when
        not `create`).

        Raises:
            ConfigError: not exactly one of `queue_id` and `name` is given.
            NotFoundError: there is no queue `queue_id` (or `name`, when not `create`).
            QueueError: the get or get-or-create call failed.
        """
        if (queue_id is None) == (name is None):
            raise ConfigError("give exactly one of queue_id and name")
        queue = cls.over(api, queue_id=queue_id or "", cache_size=cache_size, fetch_concurrency=fetch_concurrency)
        return await queue._resolve(name, create=create)

    async def _resolve(self, name: str | None, *, create: bool = True) -> Self:
        """Check the queue (or get or create it by `name`) and take its id; close this queue if that fails."""
        try:
            if name is not None and not create:
                self._queue_id = f"~{name}"
                info = await self._fetch(_GET_QUEUE, QueueInfo)
            elif name is not None:
                info = await self._fetch(_GET_OR_CREATE, QueueInfo, params={"name": name})
            else:
                info = await self._fetch(_GET_QUEUE, QueueInfo)
        except NotFoundError as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise NotFoundError(
                f"no request queue {self._queue_id or name!r} at {self._api.base_url}",
                endpoint=exc.endpoint,
                status=exc.status,
                error_type=exc.error_type,
            ) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        self._queue_id = info.id
        return self

    @property
    def queue_id(self) -> str:
        """The queue's id (or the `~name` it was constructed with, when not opened with `open`)."""
        return self._queue_id

    @property
    def api(self) -> ApiClient:
        """The transport this queue calls through (its own, or the shared one it was given)."""
        return self._api

    @property
    def calls(self) -> Counter[str]:
        """Every HTTP attempt of the `ApiClient`, by `"route status"` (see the class docstring)."""
        return self._api.calls

    def __repr__(self) -> str:
        token = "'***'" if self._api.has_token else "None"
        return f"ApiQueue(base_url={self._api.base_url!r}, queue_id={self._queue_id!r}, token={token})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- transport (runner.api.client), with the queue's id and bodies ---------------------------------------

    def _body(self, endpoint: Endpoint, body: _Body) -> Body | None:
        """A call's JSON body: a request or drafts in the API's shape; a dict is sent as it is.

        Raises:
            InvalidInputError: the body cannot be written as JSON (e.g. an arbitrary object in `userData`).
        """
        if body is None:
            return None
        data: object
        try:
            if isinstance(body, Request):
                data = body.to_api()
            elif isinstance(body, dict):
                data = body
            else:
                data = [draft.to_api() for draft in body]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"the body cannot be sent as JSON: {exc}", endpoint=endpoint.label) from exc
        return Body.encode_json(endpoint, data)

    async def _call(
        self,
        endpoint: Endpoint,
        *,
        request_id: str | None = None,
        params: dict[str, str | int] | None = None,
        body: _Body = None,
    ) -> Answer:
        """`ApiClient.call` on this queue (see its Raises)."""
        return await self._api.call(
            endpoint, resource_id=self._queue_id, item_id=request_id, params=params, body=self._body(endpoint, body)
        )

    def _check(
        self, endpoint: Endpoint, response: httpx.Response, request_id: str | None, *, maybe_applied: bool = False
    ) -> None:
        """Raise the `runner.errors` type for a non-2xx answer."""
        self._api.check(endpoint, response, request_id, maybe_applied=maybe_applied)

    def _data(self, endpoint: Endpoint, response: httpx.Response) -> dict[str, Any]:
        return self._api.data(endpoint, response)

    def _parse(self, endpoint: Endpoint, response: httpx.Response, model: type[M]) -> M:
        return self._api.parse(endpoint, response, model)

    async def _fetch(
        self,
        endpoint: Endpoint,
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

    async def _complete(
        self, items: Sequence[_HeadItem], *, client_key: str, given: Mapping[str, dict[str, Any]]
    ) -> _Fetched:
        """Full requests for the head items this call locked: as the answer gave them complete (`given`, by id),
        else from the cache, else fetched concurrently (one GET each).

        A cached copy whose `retryCount` differs from the head's is stale (another client has retried the request,
        and may have recorded errors since): it is fetched instead. A request whose GET answer cannot be read as a
        `Request` is quarantined (`_quarantine`). One whose GET fails (after the retries) is released at the front
        of the queue for a later call, and the others are returned.

        Raises:
            QueueError: the first failed GET, when no request is left to return (the locks released first;
                `maybe_applied` when some could not be).
        """
        found, missing, unreadable = self._known(items, given)
        fetched_unreadable, failures = await self._get_all(missing, found)
        unreadable.update(fetched_unreadable)
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

    def _known(
        self, items: Sequence[_HeadItem], given: Mapping[str, dict[str, Any]]
    ) -> tuple[dict[str, Request | None], list[str], dict[str, tuple[dict[str, Any], str]]]:
        """The head items known without a GET (given complete, or a fresh cached copy), the ids to fetch, and the
        given ones that cannot be read (`(raw object, reason)` by id)."""
        found: dict[str, Request | None] = {}
        missing: list[str] = []
        unreadable: dict[str, tuple[dict[str, Any], str]] = {}
        for item in items:
            if (raw := given.get(item.id)) is not None:
                try:
                    found[item.id] = Request.model_validate(raw)
                except ValidationError as exc:
                    unreadable[item.id] = (raw, validation_reason(exc))
                continue
            cached = self._cache.get(item.id)
            if cached is not None and cached.retry_count == item.retry_count:
                self._cache.move_to_end(item.id)
                found[item.id] = cached.model_copy(deep=True)
            else:
                self._cache.pop(item.id, None)
                missing.append(item.id)
        return found, missing, unreadable

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
                unreadable[request_id] = (raw or {}, validation_reason(exc))

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

        The server's object is written back as it was read, plus `handledAt`, an error message appended to
        `errorMessages` and the failed marker in `userData` (`runner.models`), so nothing of it is lost and it
        leaves the head for good instead of coming back each time its lock lapses. A `userData` that is not an
        object moves to `userData.__headlock.unreadableUserData`. When that PUT fails too, the lock is left to
        lapse.
        """
        message = f"quarantined: unreadable request: {reason}"
        errors = raw.get("errorMessages")
        kept = list(errors) if isinstance(errors, list) else [] if errors is None else [errors]
        body = {
            **raw,
            "handledAt": format_api_datetime(utc_now()),
            "errorMessages": [*kept, message],
            "userData": _marked_user_data(raw.get("userData")),
        }
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
        if self._full_head:
            params["headlockItems"] = "full"
        answer = await self._call(_LOCK_HEAD, params=params)
        self._check(_LOCK_HEAD, answer.response, None, maybe_applied=answer.ambiguous)
        data = self._api.data(_LOCK_HEAD, answer.response)
        head = self._api.parse(_LOCK_HEAD, answer.response, _LockedHeadData, data)
        given = _complete_items(data["items"]) if self._full_head else {}
        fetched = await self._complete(head.items, client_key=client_key, given=given)
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
        for attempt in range(self._api.retry.unprocessed_retries + 1):
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
            if pending and attempt < self._api.retry.unprocessed_retries:
                delay = self._api.retry.delay(attempt)
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

    # -- the queue by hand (`runner.queue.admin.QueueAdmin`) ------------------------------------------------

    async def counts(self) -> QueueCounts:
        """Handled, failed, pending and locked requests: the totals from the queue's info, the locked ones counted
        over `filter=locked` pages, the failed ones over every page (their marker is in `userData`, which the API
        cannot filter on), each at most `_SCAN_PAGES` pages: beyond, `exact` is False and those are lower bounds.
        Who holds the locks is not known (`locks_by_client` None).
        """
        info = await self.get_info()
        locked, locked_exact = await self._count(locked=True)
        failed, failed_exact = (0, True)
        if info.handled_request_count:
            failed, failed_exact = await self._count(failed=True)
        handled = info.handled_request_count
        return QueueCounts(
            total=info.total_request_count,
            handled=max(handled - failed, 0),
            failed=failed,
            pending=max(info.total_request_count - handled - locked, 0),
            locked=locked,
            exact=locked_exact and failed_exact,
        )

    async def _count(self, *, locked: bool = False, failed: bool = False) -> tuple[int, bool]:
        """How many requests `list_requests` gives for the state, over at most `_SCAN_PAGES` pages; and whether
        that was all of them."""
        count = 0
        after: str | None = None
        for _ in range(_SCAN_PAGES):
            page = await self.list_requests(after=after, limit=MAX_LIST_LIMIT, locked=locked, failed=failed)
            count += len(page.items)
            after = page.next_after
            if after is None:
                return count, True
        return count, False

    async def list_requests(
        self,
        *,
        after: str | None = None,
        limit: int,
        locked: bool = False,
        pending: bool = False,
        failed: bool = False,
        handled: bool = False,
    ) -> RequestPage:
        """One page of `GET requests` (see `QueueAdmin.list_requests`); `after` is the cursor of the page before.

        The API filters `locked` and `pending` itself. `failed` and `handled` are told apart here, by `handledAt`
        and the failed marker, from unfiltered pages: such a page may hold fewer items than `limit`. The items carry
        no lock state, so those two go with both `locked` and `pending` (every unhandled request) or alone.

        Raises:
            InvalidInputError: `limit` is not 1-`MAX_LIST_LIMIT`, or `failed`/`handled` with only one of `locked`
                and `pending` (no call is made).
            QueueUnavailableError: the answer has no list of request objects.
        """
        label = _LIST_REQUESTS.label
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidInputError(f"limit must be 1-{MAX_LIST_LIMIT}, got {limit}", endpoint=label)
        by_handled = failed or handled
        if by_handled and locked != pending:
            raise InvalidInputError(
                "the API lists failed or handled requests alone or with both locked and pending (its items have no"
                " lock state to tell those two apart)",
                endpoint=label,
            )
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["cursor"] = after
        server_side = [] if by_handled else [name for name, on in (("locked", locked), ("pending", pending)) if on]
        if server_side:
            params["filter"] = ",".join(server_side)
        answer = await self._call(_LIST_REQUESTS, params=params)
        self._check(_LIST_REQUESTS, answer.response, None, maybe_applied=answer.ambiguous)
        data = self._data(_LIST_REQUESTS, answer.response)
        items, cursor = data.get("items"), data.get("nextCursor")
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise QueueUnavailableError("the answer has no list of request objects (`items`)", endpoint=label)
        # No item, no next page: a server that always sends a cursor cannot keep a scan going for ever.
        next_after = cursor if isinstance(cursor, str) and cursor and items else None
        if by_handled:
            items = [item for item in items if _kept(item, unhandled=locked, failed=failed, handled=handled)]
        return RequestPage(items=items, next_after=next_after)

    async def requeue(self, request_ids: Sequence[str], *, client_key: str) -> RequeueResult:
        """Return the handled requests among `request_ids` to pending (see `QueueAdmin.requeue`): a GET of each,
        then a PUT of the handled ones as `Request.requeued` makes them, a few at a time.

        Not atomic: a request handled by another client between the GET and the PUT is overwritten as pending
        (it runs once more). After a failure, some of them may have been requeued: calling again is safe.

        Raises:
            InvalidInputError: more than `MAX_REQUEUE_BATCH` ids.
            QueueError: the first GET or PUT that failed (after the others ended).
        """
        if len(request_ids) > MAX_REQUEUE_BATCH:
            raise InvalidInputError(
                f"requeue takes at most {MAX_REQUEUE_BATCH} requests a call, got {len(request_ids)}",
                endpoint=_UPDATE_REQUEST.label,
            )
        outcomes: dict[str, str] = {}
        errors: list[QueueError] = []
        limiter = anyio.CapacityLimiter(_REQUEUE_CONCURRENCY)

        async def one(request_id: str) -> None:
            async with limiter:
                try:
                    outcomes[request_id] = await self._requeue_one(request_id, client_key=client_key)
                except QueueError as exc:
                    errors.append(exc)

        async with anyio.create_task_group() as group:
            for request_id in dict.fromkeys(request_ids):
                group.start_soon(one, request_id)
        if errors:
            raise errors[0]
        result = RequeueResult()
        for request_id in dict.fromkeys(request_ids):
            getattr(result, outcomes[request_id]).append(request_id)
        return result

    async def _requeue_one(self, request_id: str, *, client_key: str) -> str:
        """Requeue one request; return which `RequeueResult` list it goes in."""
        raw = await self._get_raw(request_id)
        if raw is None:
            return "missing"
        if raw.get("handledAt") is None:
            return "not_handled"
        try:
            request = Request.model_validate(raw)
        except ValidationError:
            return "unreadable"
        if not can_requeue(request):
            return "unreadable"
        await self.update_request(request.requeued(), client_key=client_key)
        return "requeued"

    async def drop(self) -> None:
        """Delete the queue (`DELETE /v2/request-queues/{id}`), then close this queue.

        Raises:
            NotFoundError: there is no such queue.
        """
        try:
            answer = await self._call(_DELETE_QUEUE)
            self._check(_DELETE_QUEUE, answer.response, None, maybe_applied=answer.ambiguous)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the `ApiClient` if this queue made it (not one given to `over`). Idempotent."""
        if self._owns_api:
            await self._api.aclose()
