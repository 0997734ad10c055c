"""`ApiQueue` under faults: a real `headlock serve` behind a fault-injecting proxy (`tests._proxy`).

Lost answers (forwarded, then the connection dropped), stalls, 5xx and 429 with `Retry-After`, rewritten answers,
and requests in the shapes the API allows but headlock's model did not.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from runner.errors import LockLostError, QueueUnavailableError, RateLimitedError
from runner.models import Request, RequestDraft
from runner.queue.api import ApiQueue, ApiRetryPolicy
from runner.uniquekey import request_id_for
from tests._proxy import FaultProxy, ForwardThenDrop, Respond, Rewrite, Stall, fault_proxy
from tests._server import running_server
from tests.conftest import free_port

FAST = ApiRetryPolicy(max_retries=3, base_delay=0.001, max_delay=0.005)
HEAD_LOCK = r"/head/lock$"
BATCH = r"/requests/batch$"
LOCK = r"/requests/[^/]+/lock$"
ONE_REQUEST = r"/requests/[^/]+$"
QUEUE = r"^/v2/request-queues/[^/]+$"
GET_REQUEST = "GET /requests/{id} 200"

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Async tests run on asyncio."""
    return "asyncio"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `headlock serve` for the module."""
    with running_server(tmp_path_factory.mktemp("storage")) as url:
        yield url


@pytest.fixture
async def proxy(base_url: str) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the server, with no rules yet."""
    async with fault_proxy(base_url) as running:
        yield running


@pytest.fixture
async def direct(base_url: str) -> AsyncIterator[ApiQueue]:
    """An ApiQueue on a new queue, straight to the server (to set up and to check)."""
    name = f"faults-{uuid.uuid4().hex[:12]}"
    async with await ApiQueue.open(base_url=base_url, token=None, name=name, retry=FAST) as api:
        yield api


@pytest.fixture
async def queue(proxy: FaultProxy, direct: ApiQueue) -> AsyncIterator[ApiQueue]:
    """An ApiQueue on the same queue through the proxy (its own, empty cache), with head items as the platform gives
    them (each request then fetched by GET: the faults of that path are tested too)."""
    async with await ApiQueue.open(
        base_url=proxy.url, token=None, queue_id=direct.queue_id, retry=FAST, full_head_items=False
    ) as api:
        yield api


def url(n: int) -> str:
    return f"http://example.com/{n}"


def draft(n: int) -> RequestDraft:
    return RequestDraft(unique_key=url(n), url=url(n), user_data={"n": n})


async def raw_add(base_url: str, queue_id: str, requests: list[dict[str, Any]]) -> httpx.Response:
    """Add requests as plain JSON, the way another API client would."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post(
            f"/v2/request-queues/{queue_id}/requests/batch", params={"clientKey": "other"}, json=requests
        )


async def raw_get(base_url: str, queue_id: str, request_id: str) -> dict[str, Any]:
    """The stored request as the server sends it."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        answer = await client.get(f"/v2/request-queues/{queue_id}/requests/{request_id}")
    data: dict[str, Any] = answer.json()["data"]
    return data


def handled(request: Request) -> Request:
    return request.model_copy(update={"handled_at": datetime.now(UTC)})


# -- 1. requests the API allows, and one that cannot be read -------------------------------------------------


async def test_head_with_odd_and_unreadable_requests_is_done_in_one_lock(
    base_url: str, proxy: FaultProxy, direct: ApiQueue, queue: ApiQueue
) -> None:
    """A head of an object payload, non-string headers, null userData and an unreadable request: 3 items, 1
    quarantined (ended as failed, as stored plus the reason), all in one lock_head call."""
    shapes: list[dict[str, Any]] = [
        {"uniqueKey": url(1), "url": url(1), "method": "POST", "payload": {"query": "q", "page": 2}},
        {"uniqueKey": url(2), "url": url(2), "headers": {"X-Count": 5, "X-Debug": True, "X-Gone": None}},
        {"uniqueKey": url(3), "url": url(3), "userData": None, "errorMessages": None},
        {"uniqueKey": url(4), "url": url(4), "userData": {"keep": "me"}, "custom": [1, 2]},
    ]
    added = await raw_add(base_url, direct.queue_id, shapes)
    assert added.status_code == 201, added.text
    assert all(not p["wasAlreadyPresent"] for p in added.json()["data"]["processedRequests"])
    unreadable = request_id_for(url(4))

    def damage(body: dict[str, Any]) -> dict[str, Any]:
        return {"data": {**body["data"], "errorMessages": "boom"}}  # a string where the model has a list

    proxy.add("GET", f"/requests/{unreadable}$", Rewrite(damage))
    with capture_logs() as logs:
        head = await queue.lock_head(limit=4, lock_secs=60, client_key="a")
    assert [r.url for r in head.items] == [url(1), url(2), url(3)]
    first, second, third = head.items
    assert (first.method, first.payload) == ("POST", {"query": "q", "page": 2})
    assert second.headers == {"X-Count": "5", "X-Debug": "true"}
    assert (third.user_data, third.error_messages) == ({}, [])
    assert head.quarantined == 1
    assert not head.may_have_orphans
    assert [e["request_id"] for e in logs if e["event"] == "queue.request_quarantined"] == [unreadable]
    stored = await raw_get(base_url, direct.queue_id, unreadable)
    assert stored["handledAt"]
    assert stored["errorMessages"] == [
        "boom",
        "quarantined: unreadable request: errorMessages: Input should be a list of strings or null",
    ]
    assert (stored["userData"], stored["custom"]) == ({"keep": "me", "__crawlee": {"state": 6}}, [1, 2])  # failed
    for request in head.items:
        await queue.update_request(handled(request), client_key="a")
    info = await direct.get_info()
    assert (info.handled_request_count, info.pending_request_count) == (4, 0)
    assert (await raw_get(base_url, direct.queue_id, request_id_for(url(1))))["payload"] == {"query": "q", "page": 2}


async def test_odd_request_shapes_in_one_reply_are_read() -> None:
    """A GET answer with null userData/errorMessages, non-string headers and an object payload is read; unknown
    fields and the payload go back unchanged."""
    body = {
        "id": "abc",
        "uniqueKey": url(1),
        "url": url(1),
        "userData": None,
        "errorMessages": None,
        "headers": {"Accept": "text/html", "X-N": 1.5, "X-Flags": ["a"], "X-Null": None},
        "payload": {"type": "Buffer", "data": [104, 105]},
        "lockByClient": "someone",
    }

    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": body})

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client,
        ApiQueue(client, base_url="http://queue.test", queue_id="Q", token=None, retry=FAST) as api,
    ):
        request = await api.get_request("abc")
    assert request is not None
    assert (request.user_data, request.error_messages) == ({}, [])
    assert request.headers == {"Accept": "text/html", "X-N": "1.5", "X-Flags": '["a"]'}
    wire = request.to_api()
    assert (wire["payload"], wire["lockByClient"]) == (body["payload"], "someone")


async def test_a_quarantine_the_server_refuses_leaves_that_lock_to_lapse(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """When the quarantine PUT is refused too, the rest is returned and the answer says a lock was stranded."""
    await direct.batch_add([draft(1), draft(2)], client_key="b")
    unreadable = request_id_for(url(2))
    proxy.add("GET", f"/requests/{unreadable}$", Rewrite(lambda body: {"data": {**body["data"], "userData": "x"}}))
    refused = Respond(400, body={"error": {"type": "invalid-input", "message": "refused"}})
    proxy.add("PUT", f"/requests/{unreadable}$", refused, times=None)
    with capture_logs() as logs:
        head = await queue.lock_head(limit=2, lock_secs=60, client_key="a")
    assert [r.url for r in head.items] == [url(1)]
    assert (head.quarantined, head.may_have_orphans) == (0, True)
    assert [e["request_id"] for e in logs if e["event"] == "queue.request_quarantine_failed"] == [unreadable]
    assert await queue.unlock_requests(client_key="a") == 2  # the stranded lock is still ours


async def test_a_failed_get_releases_that_request_and_returns_the_rest(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """A GET that keeps failing (503) quarantines nothing: that request is released, the others are returned."""
    await direct.batch_add([draft(1), draft(2), draft(3)], client_key="b")
    failing = request_id_for(url(2))
    proxy.add("GET", f"/requests/{failing}$", Respond(503), times=None)
    with capture_logs() as logs:
        head = await queue.lock_head(limit=3, lock_secs=60, client_key="a")
    assert [r.url for r in head.items] == [url(1), url(3)]
    assert (head.quarantined, head.may_have_orphans) == (0, False)
    assert not [e for e in logs if e["event"] == "queue.request_quarantined"]
    assert len(proxy.calls("DELETE", f"/requests/{failing}/lock$")) == 1
    (again,) = (await direct.lock_head(limit=3, lock_secs=60, client_key="b")).items
    assert again.id == failing  # released at the front, not left to lapse


async def test_every_get_failing_raises_after_releasing_the_locks(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """When no request of the head can be fetched, lock_head raises, having given every lock back."""
    await direct.batch_add([draft(1), draft(2)], client_key="b")
    proxy.add("GET", ONE_REQUEST, Respond(503), times=None)
    with pytest.raises(QueueUnavailableError) as failed:
        await queue.lock_head(limit=2, lock_secs=60, client_key="a")
    assert failed.value.endpoint == "GET /v2/request-queues/{queueId}/requests/{id}"
    assert failed.value.maybe_applied is False
    assert len((await direct.lock_head(limit=2, lock_secs=60, client_key="b")).items) == 2


# -- 3. locked_at -------------------------------------------------------------------------------------------


async def test_locked_at_is_the_start_of_the_attempt_that_took_the_locks(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """After two 503s with Retry-After: 1, locked_at is the third attempt's start, not the first's."""
    await direct.batch_add([draft(1)], client_key="b")
    proxy.add("POST", HEAD_LOCK, Respond(503, {"Retry-After": "1"}), times=2)
    head = await queue.lock_head(limit=1, lock_secs=60, client_key="a")
    attempts = proxy.calls("POST", HEAD_LOCK)
    assert [a.fault for a in attempts] == ["Respond", "Respond", None]
    assert head.locked_at is not None
    assert attempts[1].at + 1.0 <= head.locked_at <= attempts[2].at
    assert head.may_have_orphans  # a 5xx may have been applied


# -- 4. ambiguous retries -----------------------------------------------------------------------------------


async def test_head_lock_whose_answer_was_lost_may_have_orphans(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """A head/lock applied but not answered, then retried: the answer says it may have orphans, and it does."""
    await direct.batch_add([draft(1), draft(2)], client_key="b")
    proxy.add("POST", HEAD_LOCK, ForwardThenDrop())
    head = await queue.lock_head(limit=1, lock_secs=60, client_key="a")
    assert [r.url for r in head.items] == [url(2)]
    assert head.may_have_orphans
    assert await queue.unlock_requests(client_key="a") == 2  # request 1 was locked by the lost attempt


async def test_head_lock_timing_out_after_sending_may_have_orphans(
    direct: ApiQueue, proxy: FaultProxy, base_url: str
) -> None:
    """A head/lock that timed out after it was sent counts as possibly applied."""
    await direct.batch_add([draft(1), draft(2)], client_key="b")
    proxy.add("POST", HEAD_LOCK, Stall(forward=True))
    async with await ApiQueue.open(
        base_url=proxy.url, token=None, queue_id=direct.queue_id, retry=FAST, timeout=0.5
    ) as api:
        head = await api.lock_head(limit=1, lock_secs=60, client_key="a")
        assert api.calls["POST /head/lock error"] == 1
        assert (len(head.items), head.may_have_orphans) == (1, True)
        assert await api.unlock_requests(client_key="a") == 2  # the timed-out attempt locked the other one


async def test_head_lock_answered_at_once_has_no_orphans(direct: ApiQueue, queue: ApiQueue) -> None:
    """Without a lost attempt, may_have_orphans stays false and locked_at is set."""
    await direct.batch_add([draft(1)], client_key="b")
    head = await queue.lock_head(limit=1, lock_secs=60, client_key="a")
    assert (len(head.items), head.may_have_orphans) == (1, False)
    assert head.locked_at is not None


async def test_head_lock_failing_after_lost_answers_is_maybe_applied(proxy: FaultProxy, queue: ApiQueue) -> None:
    """A head/lock whose every attempt lost its answer raises with maybe_applied."""
    proxy.add("POST", HEAD_LOCK, ForwardThenDrop(), times=None)
    with pytest.raises(QueueUnavailableError) as failed:
        await queue.lock_head(limit=1, lock_secs=60, client_key="a")
    assert failed.value.maybe_applied
    assert len(proxy.calls("POST", HEAD_LOCK)) == 4


async def test_rate_limited_after_a_lost_answer_is_maybe_applied(proxy: FaultProxy, queue: ApiQueue) -> None:
    """A 429 at the end does not hide that an earlier attempt may have been applied."""
    proxy.add("POST", HEAD_LOCK, ForwardThenDrop())
    proxy.add("POST", HEAD_LOCK, Respond(429, {"Retry-After": "0"}), times=None)
    with pytest.raises(RateLimitedError) as limited:
        await queue.lock_head(limit=1, lock_secs=60, client_key="a")
    assert limited.value.maybe_applied


async def test_only_429s_are_not_maybe_applied(proxy: FaultProxy, queue: ApiQueue) -> None:
    """A call refused with 429 on every attempt was never applied."""
    proxy.add("POST", HEAD_LOCK, Respond(429, {"Retry-After": "0"}), times=None)
    with pytest.raises(RateLimitedError) as limited:
        await queue.lock_head(limit=1, lock_secs=60, client_key="a")
    assert not limited.value.maybe_applied


async def test_connect_errors_are_not_maybe_applied() -> None:
    """A call that never reached a server (connection refused) was not applied."""
    api = ApiQueue(base_url=f"http://127.0.0.1:{free_port()}", queue_id="Q", token=None, retry=FAST)
    async with api:
        with pytest.raises(QueueUnavailableError) as failed:
            await api.lock_head(limit=1, lock_secs=60, client_key="a")
    assert not failed.value.maybe_applied
    assert api.calls == {"POST /head/lock error": 4}


async def test_batch_add_whose_answer_was_lost_reports_and_caches_new(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """A batch add applied but not answered, then retried: its requests are reported new and cached."""
    proxy.add("POST", BATCH, ForwardThenDrop())
    result = await queue.batch_add([draft(1), draft(2)], client_key="a")
    assert [(p.unique_key, p.was_already_present) for p in result.processed_requests] == [
        (url(1), False),
        (url(2), False),
    ]
    head = await queue.lock_head(limit=2, lock_secs=60, client_key="a")
    assert [r.user_data for r in head.items] == [{"n": 1}, {"n": 2}]
    assert queue.calls[GET_REQUEST] == 0
    assert (await direct.get_info()).total_request_count == 2


async def test_batch_add_without_lost_answers_reports_present_ones(direct: ApiQueue, queue: ApiQueue) -> None:
    """Without an ambiguous attempt, requests already in the queue are reported present."""
    await direct.batch_add([draft(1)], client_key="b")
    result = await queue.batch_add([draft(1), draft(2)], client_key="a")
    assert [p.was_already_present for p in result.processed_requests] == [True, False]


async def test_delete_lock_whose_answer_was_lost_is_done(direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue) -> None:
    """A delete-lock applied but not answered, then answered 403 "not locked": done, no error."""
    await direct.batch_add([draft(1)], client_key="b")
    (request,) = (await queue.lock_head(limit=1, lock_secs=60, client_key="a")).items
    proxy.add("DELETE", LOCK, ForwardThenDrop())
    with capture_logs() as logs:
        await queue.delete_lock(request.id, client_key="a")
    assert queue.calls["DELETE /requests/{id}/lock 403"] == 1
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert [r.id for r in (await direct.lock_head(limit=1, lock_secs=60, client_key="b")).items] == [request.id]


async def test_delete_lock_of_another_client_still_raises_after_a_refused_attempt(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """A 429 is not ambiguous: a delete-lock then refused with 403 raises LockLostError."""
    await direct.batch_add([draft(1)], client_key="b")
    (request,) = (await direct.lock_head(limit=1, lock_secs=60, client_key="b")).items
    proxy.add("DELETE", LOCK, Respond(429, {"Retry-After": "0"}))
    with pytest.raises(LockLostError) as lost:
        await queue.delete_lock(request.id, client_key="a")
    assert not lost.value.maybe_applied


async def test_prolong_and_update_retried_after_lost_answers(
    direct: ApiQueue, proxy: FaultProxy, queue: ApiQueue
) -> None:
    """Prolong and update are idempotent: a lost answer is retried to success; lost every time, maybe_applied."""
    await direct.batch_add([draft(1)], client_key="b")
    (request,) = (await queue.lock_head(limit=1, lock_secs=60, client_key="a")).items
    proxy.add("PUT", LOCK, ForwardThenDrop())
    assert await queue.prolong_lock(request.id, lock_secs=120, client_key="a") > datetime.now(UTC)
    proxy.add("PUT", LOCK, ForwardThenDrop(), times=None)
    with pytest.raises(QueueUnavailableError) as prolong:
        await queue.prolong_lock(request.id, lock_secs=120, client_key="a")
    assert prolong.value.maybe_applied
    proxy.add("PUT", ONE_REQUEST, ForwardThenDrop(), times=None)
    with pytest.raises(QueueUnavailableError) as update:
        await queue.update_request(handled(request), client_key="a")
    assert update.value.maybe_applied
    stored = await direct.get_request(request.id)
    assert stored is not None
    assert stored.handled_at is not None  # it was applied, only the answers were lost


# -- 6. Retry-After and backoff, measured where the attempts arrive ------------------------------------------


async def test_retry_after_spaces_the_next_attempt(proxy: FaultProxy, queue: ApiQueue) -> None:
    """Answered 429 with Retry-After: 2, the next attempt arrives at least 2 s later (the backoff alone: ms)."""
    proxy.add("GET", QUEUE, Respond(429, {"Retry-After": "2"}))
    await queue.get_info()
    first, second = proxy.calls("GET", QUEUE)[-2:]
    assert first.fault == "Respond"
    assert 2.0 <= second.at - first.at < 10.0


async def test_backoff_delays_grow_exponentially(direct: ApiQueue, proxy: FaultProxy) -> None:
    """Without Retry-After, the gaps between attempts are at least base_delay * 2**k: they double."""
    policy = ApiRetryPolicy(max_retries=4, base_delay=0.05, max_delay=10.0)
    proxy.add("GET", QUEUE, Respond(503), times=4)
    async with ApiQueue(base_url=proxy.url, queue_id=direct.queue_id, token=None, retry=policy) as api:
        await api.get_info()
    arrivals = [s.at for s in proxy.calls("GET", QUEUE)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(gaps) == 4
    for k, gap in enumerate(gaps):
        assert gap >= 0.05 * 2**k, (k, gaps)
