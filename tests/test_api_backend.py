"""`ApiQueue` against a real `headlock serve`, plus single odd replies from an httpx.MockTransport."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.testing import capture_logs

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
from runner.models import QueueCounts, Request, RequestDraft, is_failed
from runner.open import pacing as open_pacing
from runner.queue.admin import QueueAdmin
from runner.queue.api import ApiQueue, ApiRetryPolicy, RateLimits, _RateLimiter
from runner.queue.protocol import RequestQueue
from runner.server import create_app
from runner.settings import Settings
from runner.uniquekey import request_id_for
from tests._server import running_server, serving_app

TOKEN = "tok-0123456789-secret"  # noqa: S105 - a test token
FAST = ApiRetryPolicy(max_retries=3, base_delay=0.001, max_delay=0.005)
GET_REQUEST = "GET /requests/{id} 200"
UNLIMITED = RateLimits(batch=1e6, single=1e6, other=1e6)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Async tests run on asyncio."""
    return "asyncio"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module, requiring TOKEN."""
    with running_server(tmp_path_factory.mktemp("storage"), token=TOKEN) as url:
        yield url


@pytest.fixture
def queue_name() -> str:
    """A fresh queue name."""
    return f"api-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def queue(base_url: str, queue_name: str) -> AsyncIterator[ApiQueue]:
    """An ApiQueue on a new named queue, asking for head items as the platform gives them (no `userData`), so the
    cache and the GET per request are what is tested."""
    async with await ApiQueue.open(
        base_url=base_url, token=TOKEN, name=queue_name, retry=FAST, full_head_items=False
    ) as api:
        yield api


@pytest.fixture
async def other(base_url: str, queue: ApiQueue) -> AsyncIterator[ApiQueue]:
    """A second ApiQueue instance on the same queue (an empty cache), opened by id."""
    async with await ApiQueue.open(
        base_url=base_url, token=TOKEN, queue_id=queue.queue_id, retry=FAST, full_head_items=False
    ) as api:
        yield api


def url(n: int) -> str:
    return f"http://example.com/{n}"


def draft(n: int, **user_data: object) -> RequestDraft:
    return RequestDraft(unique_key=url(n), url=url(n), user_data={"n": n, **user_data}, headers={"X-N": str(n)})


def get_calls(api: ApiQueue) -> int:
    return api.calls[GET_REQUEST]


@asynccontextmanager
async def mock_queue(
    handler: Callable[[httpx.Request], httpx.Response],
    *,
    retry: ApiRetryPolicy = FAST,
    rate_limits: RateLimits = UNLIMITED,
) -> AsyncIterator[ApiQueue]:
    """An ApiQueue whose HTTP answers come from `handler`."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = ApiQueue(
            client, base_url="http://queue.test", queue_id="Q", token=TOKEN, retry=retry, rate_limits=rate_limits
        )
        async with api:
            yield api


def info_body() -> dict[str, object]:
    now = "2026-01-01T00:00:00.000Z"
    return {
        "data": {
            "id": "Q",
            "name": "q",
            "createdAt": now,
            "modifiedAt": now,
            "accessedAt": now,
            "totalRequestCount": 0,
            "handledRequestCount": 0,
            "pendingRequestCount": 0,
            "hadMultipleClients": False,
        }
    }


# -- the contract, as the embedded store keeps it -----------------------------------------------------------


async def test_implements_the_protocol(queue: ApiQueue) -> None:
    """ApiQueue is a RequestQueue."""
    assert isinstance(queue, RequestQueue)


async def test_open_by_name_is_get_or_create(base_url: str, queue: ApiQueue, queue_name: str) -> None:
    """Opening the same name again finds the same queue."""
    async with await ApiQueue.open(base_url=base_url, token=TOKEN, name=queue_name) as again:
        assert again.queue_id == queue.queue_id
        assert again.calls == {"POST /v2/request-queues 200": 1}
    assert queue.calls == {"POST /v2/request-queues 201": 1}


async def test_open_by_id_checks_the_queue_with_one_get(base_url: str, queue: ApiQueue, queue_name: str) -> None:
    """Opening by id (or `~name`) makes one GET of the queue, and queue_id is then its id."""
    for ref in (queue.queue_id, f"~{queue_name}"):
        async with await ApiQueue.open(base_url=base_url, token=TOKEN, queue_id=ref) as again:
            assert again.queue_id == queue.queue_id
            assert again.calls == {"GET / 200": 1}


async def test_open_by_unknown_id_raises_not_found(base_url: str) -> None:
    """Opening an id the server does not know raises NotFoundError naming the endpoint and the id."""
    with pytest.raises(NotFoundError) as missing:
        await ApiQueue.open(base_url=base_url, token=TOKEN, queue_id="NoSuchQueue123456", retry=FAST)
    assert missing.value.endpoint == "GET /v2/request-queues/{queueId}"
    assert (missing.value.status, missing.value.error_type) == (404, "record-not-found")
    assert "NoSuchQueue123456" in str(missing.value)


async def test_open_needs_exactly_one_of_id_and_name(base_url: str) -> None:
    """open() refuses neither or both of queue_id and name."""
    with pytest.raises(ConfigError):
        await ApiQueue.open(base_url=base_url, token=TOKEN)
    with pytest.raises(ConfigError):
        await ApiQueue.open(base_url=base_url, token=TOKEN, queue_id="x", name="y")


async def test_lock_head_returns_own_requests_from_cache(queue: ApiQueue) -> None:
    """Requests this instance added come back complete (userData, headers) without a GET."""
    await queue.batch_add([draft(1), draft(2)], client_key="a")
    head = await queue.lock_head(limit=5, lock_secs=60, client_key="a")
    assert [(r.url, r.user_data, r.headers) for r in head.items] == [
        (url(1), {"n": 1}, {"X-N": "1"}),
        (url(2), {"n": 2}, {"X-N": "2"}),
    ]
    assert head.lock_secs == 60
    assert head.queue_has_locked_requests is True
    assert get_calls(queue) == 0
    assert queue.calls["POST /head/lock 201"] == 1


async def test_lock_head_fetches_requests_added_elsewhere(queue: ApiQueue, other: ApiQueue) -> None:
    """Requests another instance added are fetched with GET, one each, and come back complete."""
    await other.batch_add([draft(n) for n in range(1, 4)], client_key="b")
    head = await queue.lock_head(limit=5, lock_secs=60, client_key="a")
    assert [r.user_data for r in head.items] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert head.had_multiple_clients is True
    assert get_calls(queue) == 3


async def test_stale_cached_copy_is_fetched_and_own_update_is_cached(queue: ApiQueue, other: ApiQueue) -> None:
    """A cached copy whose retryCount differs from the head's is fetched again; an own update is cached as sent."""
    (added,) = (await queue.batch_add([draft(1)], client_key="a")).processed_requests
    (locked,) = (await other.lock_head(limit=1, lock_secs=60, client_key="b")).items
    retried = locked.model_copy(update={"retry_count": 2, "user_data": {"n": 1, "seen": True}})
    await other.update_request(retried, client_key="b")
    await other.delete_lock(added.request_id, client_key="b")
    (again,) = (await queue.lock_head(limit=1, lock_secs=60, client_key="a")).items
    assert (again.retry_count, again.user_data) == (2, {"n": 1, "seen": True})
    assert get_calls(queue) == 1
    await queue.update_request(again.model_copy(update={"user_data": {"n": 1, "mine": 1}}), client_key="a")
    await queue.delete_lock(added.request_id, client_key="a")
    (third,) = (await queue.lock_head(limit=1, lock_secs=60, client_key="a")).items
    assert third.user_data == {"n": 1, "mine": 1}
    assert get_calls(queue) == 1


async def test_another_clients_error_messages_survive_a_cached_copy(queue: ApiQueue, other: ApiQueue) -> None:
    """A request this client added and another failed comes back with the other's error message (item 13)."""
    (added,) = (await queue.batch_add([draft(1)], client_key="a")).processed_requests
    (locked,) = (await other.lock_head(limit=1, lock_secs=60, client_key="b")).items
    failed = locked.model_copy(update={"retry_count": 1, "error_messages": ["b: HTTP 500"]})
    await other.update_request(failed, client_key="b")
    await other.delete_lock(added.request_id, client_key="b")
    (mine,) = (await queue.lock_head(limit=1, lock_secs=60, client_key="a")).items
    assert (mine.retry_count, mine.error_messages) == (1, ["b: HTTP 500"])
    own_failure = mine.model_copy(
        update={
            "retry_count": 2,
            "error_messages": [*mine.error_messages, "a: timeout"],
            "handled_at": datetime.now(UTC),
        }
    )
    await queue.update_request(own_failure, client_key="a")
    stored = await other.get_request(added.request_id)
    assert stored is not None
    assert stored.error_messages == ["b: HTTP 500", "a: timeout"]


async def test_prolong_returns_new_expiry(queue: ApiQueue) -> None:
    """prolong_lock returns an aware datetime about lock_secs from now."""
    await queue.batch_add([draft(1)], client_key="a")
    (request,) = (await queue.lock_head(limit=1, lock_secs=10, client_key="a")).items
    expires = await queue.prolong_lock(request.id, lock_secs=300, client_key="a")
    now = datetime.now(UTC)
    assert now + timedelta(seconds=290) < expires < now + timedelta(seconds=310)


async def test_lock_ops_of_another_client_raise_lock_lost(queue: ApiQueue, other: ApiQueue) -> None:
    """Prolonging or releasing another client's lock raises LockLostError naming the endpoint and status."""
    await queue.batch_add([draft(1)], client_key="a")
    (request,) = (await queue.lock_head(limit=1, lock_secs=60, client_key="a")).items
    with pytest.raises(LockLostError) as lost:
        await other.prolong_lock(request.id, lock_secs=60, client_key="b")
    assert lost.value.endpoint == "PUT /v2/request-queues/{queueId}/requests/{id}/lock"
    assert (lost.value.status, lost.value.error_type) == (403, "request-handled-or-locked")
    with pytest.raises(LockLostError) as lost:
        await other.delete_lock(request.id, client_key="b")
    assert lost.value.endpoint == "DELETE /v2/request-queues/{queueId}/requests/{id}/lock"


async def test_update_handled_releases_and_counts(queue: ApiQueue) -> None:
    """Marking a request handled counts it, frees it from the head, and ends its lock."""
    await queue.batch_add([draft(1), draft(2)], client_key="a")
    first, _ = (await queue.lock_head(limit=2, lock_secs=60, client_key="a")).items
    registration = await queue.update_request(
        first.model_copy(update={"handled_at": datetime.now(UTC)}), client_key="a"
    )
    assert (registration.request_id, registration.was_already_present, registration.was_already_handled) == (
        first.id,
        True,
        False,
    )
    info = await queue.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (2, 1, 1)
    with pytest.raises(LockLostError):
        await queue.prolong_lock(first.id, lock_secs=60, client_key="a")
    stored = await queue.get_request(first.id)
    assert stored is not None
    assert stored.handled_at is not None


async def test_batch_add_dedups(queue: ApiQueue) -> None:
    """A uniqueKey already in the queue is reported wasAlreadyPresent and not counted twice."""
    first = await queue.batch_add([draft(1)], client_key="a")
    second = await queue.batch_add([draft(1), draft(2)], client_key="a", forefront=True)
    assert [p.was_already_present for p in first.processed_requests] == [False]
    assert [(p.request_id, p.was_already_present) for p in second.processed_requests] == [
        (request_id_for(url(1)), True),
        (request_id_for(url(2)), False),
    ]
    assert second.unprocessed_requests == []
    assert (await queue.get_info()).total_request_count == 2


async def test_big_batch_is_sent_gzipped_and_stored(queue: ApiQueue) -> None:
    """A batch over 1 KiB (sent gzipped) round-trips intact."""
    await queue.batch_add([draft(n, pad="x" * 2000) for n in range(25)], client_key="a")
    stored = await queue.get_request(request_id_for(url(24)))
    assert stored is not None
    assert stored.user_data == {"n": 24, "pad": "x" * 2000}


async def test_batch_over_25_is_refused_without_a_call(queue: ApiQueue) -> None:
    """More than 25 drafts raise InvalidInputError before anything is sent."""
    calls = sum(queue.calls.values())
    with pytest.raises(InvalidInputError):
        await queue.batch_add([draft(n) for n in range(26)], client_key="a")
    assert sum(queue.calls.values()) == calls


async def test_unserializable_body_is_invalid_input_without_a_call(queue: ApiQueue) -> None:
    """A draft whose userData cannot be JSON raises InvalidInputError before anything is sent."""
    calls = sum(queue.calls.values())
    with pytest.raises(InvalidInputError) as invalid:
        await queue.batch_add([draft(1, thing=object())], client_key="a")
    assert invalid.value.endpoint == "POST /v2/request-queues/{queueId}/requests/batch"
    assert sum(queue.calls.values()) == calls


async def test_unlock_requests_returns_count(queue: ApiQueue, other: ApiQueue) -> None:
    """unlock_requests releases this client's locks and returns how many; others can then lock them."""
    await queue.batch_add([draft(n) for n in range(3)], client_key="a")
    await queue.lock_head(limit=3, lock_secs=60, client_key="a")
    assert (await other.lock_head(limit=3, lock_secs=60, client_key="b")).items == []
    assert await queue.unlock_requests(client_key="a") == 3
    assert len((await other.lock_head(limit=3, lock_secs=60, client_key="b")).items) == 3


async def test_get_request_unknown_is_none(queue: ApiQueue) -> None:
    """get_request returns None on 404."""
    assert await queue.get_request("noSuchRequest12") is None
    assert queue.calls["GET /requests/{id} 404"] == 1


async def test_unknown_queue_raises_not_found(base_url: str) -> None:
    """get_info on an unknown queue raises NotFoundError naming the endpoint."""
    async with ApiQueue(base_url=base_url, queue_id="NoSuchQueue123456", token=TOKEN) as api:
        with pytest.raises(NotFoundError) as missing:
            await api.get_info()
    assert missing.value.endpoint == "GET /v2/request-queues/{queueId}"
    assert missing.value.error_type == "record-not-found"


async def test_bad_arguments_raise_invalid_input(queue: ApiQueue) -> None:
    """limit over 25 and a 33-character client key come back as InvalidInputError."""
    with pytest.raises(InvalidInputError) as invalid:
        await queue.lock_head(limit=26, lock_secs=60, client_key="a")
    assert invalid.value.status == 400
    with pytest.raises(InvalidInputError) as invalid:
        await queue.lock_head(limit=1, lock_secs=60, client_key="k" * 33)
    assert invalid.value.error_type == "invalid-client-key"


# -- the token ----------------------------------------------------------------------------------------------


async def test_wrong_token_raises_unauthorized_without_leaking(base_url: str) -> None:
    """A wrong token raises UnauthorizedError; neither repr, the error nor the logs show the token."""
    wrong = "wrong-token-abcdef-987"
    with capture_logs() as logs:
        async with ApiQueue(base_url=base_url, queue_id="whatever", token=wrong, retry=FAST) as api:
            assert wrong not in repr(api)
            assert "***" in repr(api)
            with pytest.raises(UnauthorizedError) as denied:
                await api.get_info()
    assert denied.value.status == 401
    assert wrong not in str(denied.value)
    assert wrong not in repr(logs)


async def test_token_never_in_errors_or_logs_of_failing_calls() -> None:
    """During retried failures the token is in the Authorization header only: not in URLs, errors or logs."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503, text=f"upstream said: Bearer {TOKEN}")

    with capture_logs() as logs:
        async with mock_queue(handler) as api:
            with pytest.raises(QueueUnavailableError) as failed:
                await api.get_info()
    assert logs
    assert TOKEN not in repr(logs)
    assert TOKEN not in str(failed.value)
    assert all(TOKEN not in str(r.url) for r in seen)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in seen)


# -- retries and malformed answers (httpx.MockTransport) ----------------------------------------------------


async def test_5xx_is_retried_until_success() -> None:
    """Two 500s then a 200 succeed, and every attempt is counted."""
    answers = iter([httpx.Response(500), httpx.Response(500), httpx.Response(200, json=info_body())])
    async with mock_queue(lambda _: next(answers)) as api:
        info = await api.get_info()
    assert info.id == "Q"
    assert api.calls == {"GET / 500": 2, "GET / 200": 1}


async def test_429_honours_retry_after() -> None:
    """A 429 with Retry-After: 0 is retried at once and then succeeds."""
    answers = iter(
        [httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(200, json={"data": {"unlockedCount": 4}})]
    )
    async with mock_queue(lambda _: next(answers), retry=ApiRetryPolicy(max_retries=1, base_delay=30)) as api:
        assert await api.unlock_requests(client_key="a") == 4


async def test_429_after_every_retry_raises_rate_limited() -> None:
    """A queue that keeps answering 429 raises RateLimitedError."""
    body = {"error": {"type": "rate-limit-exceeded", "message": "slow down"}}
    async with mock_queue(lambda _: httpx.Response(429, json=body)) as api:
        with pytest.raises(RateLimitedError) as limited:
            await api.lock_head(limit=1, lock_secs=10, client_key="a")
    assert limited.value.endpoint == "POST /v2/request-queues/{queueId}/head/lock"
    assert api.calls == {"POST /head/lock 429": 4}


async def test_always_503_raises_unavailable_naming_endpoint() -> None:
    """A queue that keeps answering 503 raises QueueUnavailableError naming the endpoint, after every retry."""
    async with mock_queue(lambda _: httpx.Response(503)) as api:
        with pytest.raises(QueueUnavailableError) as unavailable:
            await api.prolong_lock("abc", lock_secs=10, client_key="a")
    assert unavailable.value.endpoint == "PUT /v2/request-queues/{queueId}/requests/{id}/lock"
    assert unavailable.value.status == 503
    assert "after 4 attempts" in str(unavailable.value)
    assert api.calls == {"PUT /requests/{id}/lock 503": 4}


async def test_network_errors_raise_unavailable() -> None:
    """Connection failures are retried, then raise QueueUnavailableError."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with mock_queue(handler) as api:
        with pytest.raises(QueueUnavailableError) as unavailable:
            await api.get_request("abc")
    assert unavailable.value.endpoint == "GET /v2/request-queues/{queueId}/requests/{id}"
    assert api.calls == {"GET /requests/{id} error": 4}


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"nodata": 1}', json.dumps({"data": {"items": "nope", "lockSecs": 1}}).encode()],
    ids=["malformed-json", "no-data", "wrong-shape"],
)
async def test_malformed_success_raises_queue_error(content: bytes) -> None:
    """A 2xx answer that is not JSON or not the documented shape raises a QueueError naming the endpoint."""
    async with mock_queue(lambda _: httpx.Response(201, content=content)) as api:
        with pytest.raises(QueueError) as bad:
            await api.lock_head(limit=1, lock_secs=10, client_key="a")
    assert isinstance(bad.value, QueueUnavailableError)
    assert bad.value.endpoint == "POST /v2/request-queues/{queueId}/head/lock"


async def test_unprocessed_requests_are_resent() -> None:
    """Batch items the API reports unprocessed are resent, and only they."""
    bodies: list[list[dict[str, object]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        bodies.append(sent)
        first, *rest = sent
        processed = [
            {
                "requestId": request_id_for(first["uniqueKey"]),
                "uniqueKey": first["uniqueKey"],
                "wasAlreadyPresent": False,
                "wasAlreadyHandled": False,
            }
        ]
        unprocessed = [{"uniqueKey": r["uniqueKey"], "url": r["url"]} for r in rest]
        return httpx.Response(201, json={"data": {"processedRequests": processed, "unprocessedRequests": unprocessed}})

    async with mock_queue(handler) as api:
        result = await api.batch_add([draft(1), draft(2), draft(3)], client_key="a")
    assert [len(b) for b in bodies] == [3, 2, 1]
    assert [p.unique_key for p in result.processed_requests] == [url(1), url(2), url(3)]
    assert result.unprocessed_requests == []


def test_rate_limiter_spaces_calls_after_a_burst() -> None:
    """The limiter lets a burst through, then spaces calls by 1/rate."""
    limiter = _RateLimiter(10.0, burst=3)
    assert [limiter.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.reserve(0.0) == pytest.approx(0.1)
    assert limiter.reserve(0.0) == pytest.approx(0.2)
    assert limiter.reserve(10.0) == 0.0


async def test_aclose_leaves_a_given_client_open() -> None:
    """aclose closes only a client the queue created."""
    async with httpx.AsyncClient() as client:
        api = ApiQueue(client, base_url="http://queue.test", queue_id="Q", token=None)
        await api.aclose()
        assert not client.is_closed
    owned = ApiQueue(base_url="http://queue.test", queue_id="Q", token=None)
    await owned.aclose()
    await owned.aclose()


async def test_full_request_round_trip(queue: ApiQueue) -> None:
    """update_request stores every field and get_request returns it."""
    await queue.batch_add([draft(1)], client_key="a")
    request = Request(
        id=request_id_for(url(1)),
        unique_key=url(1),
        url=url(1),
        method="POST",
        payload="body",
        retry_count=1,
        error_messages=["boom"],
        user_data={"label": "DETAIL"},
    )
    await queue.update_request(request, client_key="a")
    stored = await queue.get_request(request.id)
    assert stored is not None
    assert (stored.method, stored.payload, stored.retry_count, stored.error_messages, stored.label) == (
        "POST",
        "body",
        1,
        ["boom"],
        "DETAIL",
    )


class FailHeadLock:
    """Test middleware: the first `count` head/lock calls get a 503."""

    def __init__(self, app: ASGIApp, *, count: int) -> None:
        self.app = app
        self.remaining = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/head/lock") and self.remaining > 0:
            self.remaining -= 1
            body = {"error": {"type": "service-unavailable", "message": "injected"}}
            await JSONResponse(body, status_code=503)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def test_injected_server_faults_are_retried(tmp_path: Path) -> None:
    """With faults injected through create_app's middleware hook, lock_head retries the 503s and succeeds."""
    app = create_app(tmp_path, middleware=[Middleware(FailHeadLock, count=2)])
    async with (
        serving_app(app) as base,
        await ApiQueue.open(base_url=base, token=None, name="faulty", retry=FAST) as api,
    ):
        await api.batch_add([draft(1)], client_key="a")
        head = await api.lock_head(limit=1, lock_secs=60, client_key="a")
    assert [r.user_data for r in head.items] == [{"n": 1}]
    assert api.calls["POST /head/lock 503"] == 2
    assert api.calls["POST /head/lock 201"] == 1


# -- the queue by hand (runner.queue.admin) ---------------------------------------------------------------------

FAILED_MARK = {"__crawlee": {"state": 6}}


async def end(queue: ApiQueue, n: int, *, failed: bool) -> str:
    """End request `n` (added by the test) as handled, with the failed marker when `failed`; return its id."""
    request = await queue.get_request(request_id_for(url(n)))
    assert request is not None
    update: dict[str, object] = {"handled_at": datetime.now(UTC), "error_messages": [f"ValueError: {n}"]}
    if failed:
        update["user_data"] = {**request.user_data, **FAILED_MARK}
    await queue.update_request(request.model_copy(update=update), client_key="a")
    return request.id


async def test_admin_counts_lists_requeues_and_drops_over_the_list_endpoint(base_url: str, queue: ApiQueue) -> None:
    """Five requests: one ended well, one failed, one locked, two pending; counted, listed by state, the failed one
    requeued (marker gone, errors kept), then the queue deleted."""
    assert isinstance(queue, QueueAdmin)
    await queue.batch_add([draft(n) for n in range(5)], client_key="a")
    ok = await end(queue, 0, failed=False)
    failed = await end(queue, 1, failed=True)
    [locked] = [r.id for r in (await queue.lock_head(limit=1, lock_secs=60, client_key="a")).items]
    counts = await queue.counts()
    assert counts == QueueCounts(total=5, handled=1, failed=1, pending=2, locked=1, locks_by_client=None)

    async def listed(**states: bool) -> set[str]:
        return {item["id"] for item in (await queue.list_requests(limit=100, **states)).items}

    everything = await listed()
    assert (await listed(failed=True), await listed(handled=True), await listed(locked=True)) == (
        {failed},
        {ok},
        {locked},
    )
    assert await listed(pending=True) == everything - {ok, failed, locked}
    assert await listed(failed=True, locked=True, pending=True) == everything - {ok}
    with pytest.raises(InvalidInputError, match="alone or with both locked and pending"):
        await queue.list_requests(limit=10, failed=True, locked=True)
    with pytest.raises(InvalidInputError, match="limit"):
        await queue.list_requests(limit=10_001)
    result = await queue.requeue([failed, ok, locked, request_id_for(url(99))], client_key="a")
    assert (result.requeued, result.not_handled, result.missing) == ([failed, ok], [locked], [request_id_for(url(99))])
    again = await queue.get_request(failed)
    assert again is not None
    assert (again.handled_at, again.retry_count, again.error_messages) == (None, 0, ["ValueError: 1"])
    assert again.user_data == {"n": 1}
    assert (await queue.counts()).failed == 0
    queue_id = queue.queue_id
    async with await ApiQueue.open(base_url=base_url, token=TOKEN, queue_id=queue_id, retry=FAST) as doomed:
        await doomed.drop()
    with pytest.raises(NotFoundError):
        await ApiQueue.open(base_url=base_url, token=TOKEN, queue_id=queue_id, retry=FAST)


async def test_open_by_name_without_create_finds_or_refuses(base_url: str, queue: ApiQueue, queue_name: str) -> None:
    """create=False finds an existing queue by name with one GET and creates no missing one."""
    async with await ApiQueue.open(base_url=base_url, token=TOKEN, name=queue_name, create=False) as found:
        assert found.queue_id == queue.queue_id
        assert found.calls == {"GET / 200": 1}
    missing = f"{queue_name}-nope"
    for _ in range(2):  # a first refusal created nothing the second would find
        with pytest.raises(NotFoundError, match=missing):
            await ApiQueue.open(base_url=base_url, token=TOKEN, name=missing, create=False, retry=FAST)


async def test_counts_over_a_queue_bigger_than_the_scan_are_lower_bounds() -> None:
    """A list endpoint that always has a next page is read for a bounded number of pages; `exact` is then False."""
    pages: Counter[str] = Counter()

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/requests"):
            kind = request.url.params.get("filter") or "all"
            pages[kind] += 1
            item = {"id": f"r{pages[kind]}", "uniqueKey": "k", "url": "u"}
            if kind == "all":
                item |= {"handledAt": "2026-01-01T00:00:00.000Z", "userData": FAILED_MARK}
            return httpx.Response(200, json={"data": {"items": [item], "limit": 10_000, "nextCursor": "more"}})
        body = info_body()
        body["data"] |= {"totalRequestCount": 50, "handledRequestCount": 30}  # type: ignore[operator]
        return httpx.Response(200, json=body)

    async with mock_queue(answer) as api:
        counts = await api.counts()
    assert (counts.failed, counts.locked, counts.exact) == (10, 10, False)
    assert (counts.handled, counts.pending) == (20, 10)
    assert pages == {"all": 10, "locked": 10}


async def test_an_empty_page_ends_a_listing_whatever_its_cursor() -> None:
    """A page with no items has no next page, even when the server sends a cursor (no endless scan)."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": {"items": [], "limit": 5, "nextCursor": "again"}})

    async with mock_queue(answer) as api:
        page = await api.list_requests(limit=5, failed=True)
    assert (page.items, page.next_after) == ([], None)


@pytest.mark.parametrize(
    ("user_data", "stored"),
    [
        ({"keep": "me"}, {"keep": "me", **FAILED_MARK}),
        (None, FAILED_MARK),
        ("not an object", {"__headlock": {"unreadableUserData": "not an object"}, **FAILED_MARK}),
    ],
)
async def test_a_quarantined_request_is_marked_failed(user_data: object, stored: dict[str, object]) -> None:
    """The quarantine PUT carries the failed marker; a userData that is no object is kept under `__headlock`."""
    puts: list[dict[str, Any]] = []
    raw = {"id": "R", "uniqueKey": "k", "url": "u", "userData": user_data, "errorMessages": "boom"}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/head/lock"):
            item = {"id": "R", "uniqueKey": "k", "url": "u", "retryCount": 0}
            return httpx.Response(201, json={"data": {"items": [item], "lockSecs": 60}})
        if request.method == "GET":
            return httpx.Response(200, json={"data": raw})
        puts.append(json.loads(request.content))
        return httpx.Response(
            200, json={"data": {"requestId": "R", "wasAlreadyPresent": True, "wasAlreadyHandled": False}}
        )

    async with mock_queue(answer) as api:
        head = await api.lock_head(limit=1, lock_secs=60, client_key="a")
    assert head.quarantined == 1
    [body] = puts
    assert body["userData"] == stored
    assert is_failed(body)


async def test_requeue_leaves_a_request_it_cannot_read() -> None:
    """A handled request whose stored form is no valid request is reported unreadable and not written."""
    puts: list[httpx.Request] = []
    raw = {"id": "R", "uniqueKey": "k", "url": "u", "handledAt": "2026-01-01T00:00:00.000Z", "errorMessages": "boom"}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": raw})
        puts.append(request)
        return httpx.Response(500)

    async with mock_queue(answer) as api:
        result = await api.requeue(["R"], client_key="a")
    assert (result.unreadable, result.requeued, puts) == (["R"], [], [])


@pytest.mark.parametrize(
    ("base_url", "pacing", "paced"),
    [
        ("https://api.apify.com", "auto", True),
        ("https://API.Apify.com/v2", "auto", True),
        ("http://127.0.0.1:8000", "auto", False),
        ("https://apify.com.example.org", "auto", False),
        ("http://127.0.0.1:8000", "on", True),
        ("https://api.apify.com", "off", False),
    ],
)
def test_pacing_follows_the_platform_unless_set(base_url: str, pacing: str, paced: bool) -> None:
    """`api.pacing = "auto"` paces calls to the platform's limits on the platform's API only (a server such as
    `headlock serve` is not slowed to them); `on` and `off` say so for any server."""
    settings = Settings.model_validate({"api": {"base_url": base_url, "pacing": pacing}})
    assert (open_pacing(settings) == RateLimits()) if paced else (open_pacing(settings) is None)


async def test_against_serve_locked_items_come_whole_without_a_get(base_url: str, queue_name: str) -> None:
    """Not on the platform, head/lock asks for whole items (`headlockItems=full`, which serve honours): requests
    another instance added come back complete (userData, headers) with no GET at all."""
    async with await ApiQueue.open(base_url=base_url, token=TOKEN, name=queue_name, retry=FAST) as adder:
        await adder.batch_add([draft(n) for n in range(1, 4)], client_key="b")
        async with await ApiQueue.open(base_url=base_url, token=TOKEN, queue_id=adder.queue_id, retry=FAST) as fresh:
            head = await fresh.lock_head(limit=5, lock_secs=60, client_key="a")
            assert [(r.user_data, r.headers) for r in head.items] == [({"n": n}, {"X-N": str(n)}) for n in (1, 2, 3)]
            assert get_calls(fresh) == 0


@pytest.mark.parametrize(("base", "asked"), [("https://api.apify.com", False), ("http://127.0.0.1:8080", True)])
async def test_whole_head_items_are_asked_of_any_server_but_the_platform(base: str, asked: bool) -> None:
    """The platform's head items lack userData (each is fetched); any other server is asked for whole ones."""
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(201, json={"data": {"items": [], "lockSecs": 60, "queueHasLockedRequests": False}})

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client,
        ApiQueue(client, base_url=base, queue_id="Q", token=TOKEN, retry=FAST) as api,
    ):
        await api.lock_head(limit=5, lock_secs=60, client_key="a")
    assert [("headlockItems" in url.params) for url in seen] == [asked]
