"""Wire tests of `headlock serve`: the Apify API v2 request-queue endpoints, spoken to with plain httpx."""

from __future__ import annotations

import gzip
import json
import socket
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.testing import capture_logs

from runner.server import create_app
from runner.server._wire import MAX_PAYLOAD_BYTES
from runner.uniquekey import request_id_for
from tests._server import running_server, serving_app

if TYPE_CHECKING:
    from tests._postgres import Postgres

TOKEN = "s3cret-token-for-tests"  # noqa: S105 - a test token
HEAD_ITEM_KEYS = {"id", "uniqueKey", "url", "method", "retryCount"}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Async tests run on asyncio."""
    return "asyncio"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> str | None:
    """The queue store of the module's servers: None for the embedded one, else a DSN with a schema of its own."""
    if request.param == "sqlite":
        return None
    postgres: Postgres = request.getfixturevalue("postgres")
    return postgres.fresh_dsn()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, store: str | None) -> Iterator[str]:
    """One server for the module, over a fresh storage directory (and the module's database, on postgres)."""
    with running_server(tmp_path_factory.mktemp("storage"), store=store) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    """An HTTP client for the server."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


@pytest.fixture
def queue(http: httpx.Client) -> str:
    """The path of a new, empty named queue."""
    response = http.post("/v2/request-queues", params={"name": f"q-{uuid.uuid4().hex[:12]}"})
    assert response.status_code == 201
    return f"/v2/request-queues/{response.json()['data']['id']}"


def url(n: int | str) -> str:
    return f"http://example.com/{n}"


def item(n: int | str, **extra: Any) -> dict[str, Any]:
    return {"uniqueKey": url(n), "url": url(n), "userData": {"n": n}, **extra}


def add(http: httpx.Client, queue: str, *numbers: int) -> list[str]:
    response = http.post(f"{queue}/requests/batch", json=[item(n) for n in numbers], params={"clientKey": "a"})
    assert response.status_code == 201
    return [p["requestId"] for p in response.json()["data"]["processedRequests"]]


def lock(http: httpx.Client, queue: str, client: str = "a", **params: Any) -> httpx.Response:
    return http.post(f"{queue}/head/lock", params={"lockSecs": 60, "clientKey": client, **params})


def error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == error_type
    return str(body["error"]["message"])


# -- queues -------------------------------------------------------------------------------------------------


def test_get_or_create_by_name(http: httpx.Client) -> None:
    """POST ?name= creates with 201 and Location, then answers 200 with the same queue."""
    name = f"named-{uuid.uuid4().hex[:8]}"
    created = http.post("/v2/request-queues", params={"name": name})
    assert created.status_code == 201
    data = created.json()["data"]
    assert data["name"] == name
    assert len(data["id"]) == 17
    assert created.headers["location"].endswith(f"/v2/request-queues/{data['id']}")
    again = http.post("/v2/request-queues", params={"name": name})
    assert again.status_code == 200
    assert again.json()["data"]["id"] == data["id"]
    assert "location" not in again.headers


def test_queue_resolves_by_id_name_and_tilde(http: httpx.Client) -> None:
    """GET queue works with the id, the name, `~name` and `user~name`."""
    name = f"ref-{uuid.uuid4().hex[:8]}"
    queue_id = http.post("/v2/request-queues", params={"name": name}).json()["data"]["id"]
    for ref in (queue_id, name, f"~{name}", f"someone~{name}"):
        response = http.get(f"/v2/request-queues/{ref}")
        assert response.status_code == 200
        data = response.json()["data"]
        assert data["id"] == queue_id
        assert {"createdAt", "modifiedAt", "accessedAt", "totalRequestCount", "hadMultipleClients"} <= set(data)


def test_unnamed_queue_is_created(http: httpx.Client) -> None:
    """POST without a name creates a new queue every time."""
    first = http.post("/v2/request-queues")
    second = http.post("/v2/request-queues")
    assert first.status_code == second.status_code == 201
    assert first.json()["data"]["id"] != second.json()["data"]["id"]


def test_invalid_queue_name_is_400(http: httpx.Client) -> None:
    """A name that is not DNS-safe is refused."""
    error(http.post("/v2/request-queues", params={"name": "bad_name!"}), 400, "invalid-input")


def test_unknown_queue_is_404(http: httpx.Client) -> None:
    """Every per-queue endpoint answers 404 record-not-found for an unknown queue."""
    for method, path in [
        ("GET", ""),
        ("GET", "/head"),
        ("POST", "/head/lock?lockSecs=10"),
        ("POST", "/requests/unlock"),
        ("GET", "/requests/abc"),
    ]:
        message = error(http.request(method, f"/v2/request-queues/NoSuchQueue123456{path}"), 404, "record-not-found")
        assert message == "Request Queue was not found"


def test_queue_files_are_indexed_at_startup(tmp_path: Path, store: str | None) -> None:
    """A restarted server finds queues by id from the files in the storage directory (or from the database)."""
    with running_server(tmp_path, store=store) as base, httpx.Client(base_url=base) as http:
        queue_id = http.post("/v2/request-queues", params={"name": "kept"}).json()["data"]["id"]
        add(http, f"/v2/request-queues/{queue_id}", 1)
    with running_server(tmp_path, store=store) as base, httpx.Client(base_url=base) as http:
        response = http.get(f"/v2/request-queues/{queue_id}")
        assert response.status_code == 200
        assert response.json()["data"]["totalRequestCount"] == 1


# -- adding -------------------------------------------------------------------------------------------------


def test_add_request_derives_id_from_unique_key(http: httpx.Client, queue: str) -> None:
    """POST requests answers 201 with the platform's id and reports duplicates."""
    first = http.post(f"{queue}/requests", json=item(1))
    assert first.status_code == 201
    assert first.json() == {
        "data": {"requestId": request_id_for(url(1)), "wasAlreadyPresent": False, "wasAlreadyHandled": False}
    }
    again = http.post(f"{queue}/requests", json=item(1), params={"forefront": "true"})
    assert again.status_code == 201
    assert again.json()["data"]["wasAlreadyPresent"] is True


def test_add_request_with_wrong_id_is_400(http: httpx.Client, queue: str) -> None:
    """An `id` that does not match the uniqueKey is request-id-invalid."""
    error(http.post(f"{queue}/requests", json=item(1, id="notTheRightId12")), 400, "request-id-invalid")


def test_batch_add_dedups(http: httpx.Client, queue: str) -> None:
    """Batch add answers 201 with processed items; an existing uniqueKey is wasAlreadyPresent."""
    add(http, queue, 1)
    response = http.post(f"{queue}/requests/batch", json=[item(1), item(2)], params={"forefront": "0"})
    assert response.status_code == 201
    data = response.json()["data"]
    assert data["unprocessedRequests"] == []
    assert [(p["uniqueKey"], p["wasAlreadyPresent"]) for p in data["processedRequests"]] == [
        (url(1), True),
        (url(2), False),
    ]
    assert http.get(queue).json()["data"]["totalRequestCount"] == 2


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[{not json", "application/json"),
        (json.dumps({"uniqueKey": "x", "url": "x"}).encode(), "application/json"),
        (json.dumps([{"url": "http://example.com/no-key"}]).encode(), "application/json"),
        (json.dumps([item(n) for n in range(26)]).encode(), "application/json"),
        (json.dumps([item(1, userData="not an object")]).encode(), "application/json"),
    ],
    ids=["malformed-json", "object-not-array", "missing-unique-key", "26-items", "user-data-not-object"],
)
def test_batch_add_refuses_bad_bodies(http: httpx.Client, queue: str, body: bytes, content_type: str) -> None:
    """Malformed JSON, wrong shapes and more than 25 items are 400 invalid-input."""
    response = http.post(f"{queue}/requests/batch", content=body, headers={"Content-Type": content_type})
    error(response, 400, "invalid-input")


def test_gzip_and_deflate_bodies_are_accepted(http: httpx.Client, queue: str) -> None:
    """Bodies with Content-Encoding gzip or deflate are decompressed."""
    compressors: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
    ]
    for n, (encoding, compress) in enumerate(compressors):
        body = compress(json.dumps([item(n, userData={"pad": "x" * 4000})]).encode())
        response = http.post(
            f"{queue}/requests/batch",
            content=body,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert response.status_code == 201, response.text
        stored = http.get(f"{queue}/requests/{request_id_for(url(n))}").json()["data"]
        assert stored["userData"] == {"pad": "x" * 4000}


def test_unknown_content_encoding_is_415(http: httpx.Client, queue: str) -> None:
    """An encoding the server cannot undo is 415 unsupported-content-encoding."""
    response = http.post(
        f"{queue}/requests/batch",
        content=b"xx",
        headers={"Content-Type": "application/json", "Content-Encoding": "zstd-nope"},
    )
    error(response, 415, "unsupported-content-encoding")


def test_body_over_the_limit_is_413(http: httpx.Client, queue: str) -> None:
    """A body over 9437184 bytes is 413 request-too-large, also when it only gets that large decompressed."""
    raw = b"[" + b" " * MAX_PAYLOAD_BYTES + b"]"
    message = error(
        http.post(f"{queue}/requests/batch", content=raw, headers={"Content-Type": "application/json"}),
        413,
        "request-too-large",
    )
    assert f"actual length: {len(raw)} bytes" in message
    bomb = gzip.compress(raw)
    assert len(bomb) < MAX_PAYLOAD_BYTES
    response = http.post(
        f"{queue}/requests/batch",
        content=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    error(response, 413, "request-too-large")


# -- head and locks -----------------------------------------------------------------------------------------


def test_get_head_lists_pending_without_user_data(http: httpx.Client, queue: str) -> None:
    """GET head returns items in order with only id, uniqueKey, url, method, retryCount."""
    add(http, queue, 1, 2, 3)
    response = http.get(f"{queue}/head", params={"limit": 2, "clientKey": "a"})
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["limit"] == 2
    assert data["hadMultipleClients"] is False
    assert data["queueModifiedAt"].endswith("Z")
    assert [i["url"] for i in data["items"]] == [url(1), url(2)]
    assert all(set(i) == HEAD_ITEM_KEYS for i in data["items"])


def test_lock_head_answers_201_with_lock_fields(http: httpx.Client, queue: str) -> None:
    """head/lock locks in order; items carry lockExpiresAt and no userData; the answer echoes its parameters."""
    add(http, queue, 1, 2, 3)
    response = lock(http, queue, limit=2)
    assert response.status_code == 201
    data = response.json()["data"]
    assert data["limit"] == 2
    assert data["lockSecs"] == 60
    assert isinstance(data["lockSecs"], int)
    assert data["clientKey"] == "a"
    assert data["queueHasLockedRequests"] is True
    assert data["hadMultipleClients"] is False
    assert data["queueModifiedAt"].endswith("Z")
    assert [i["url"] for i in data["items"]] == [url(1), url(2)]
    assert all(set(i) == HEAD_ITEM_KEYS | {"lockExpiresAt"} for i in data["items"])
    other = lock(http, queue, "b", lockSecs="30.5")
    assert other.json()["data"]["lockSecs"] == 30.5
    assert [i["url"] for i in other.json()["data"]["items"]] == [url(3)]
    assert other.json()["data"]["hadMultipleClients"] is True


@pytest.mark.parametrize(
    ("params", "error_type"),
    [
        ({"limit": 26}, "invalid-input"),
        ({"limit": "abc"}, "invalid-input"),
        ({"lockSecs": None}, "invalid-input"),
        ({"lockSecs": "abc"}, "invalid-input"),
        ({"lockSecs": 0}, "invalid-input"),
        ({"lockSecs": -5}, "invalid-input"),
        ({"clientKey": "k" * 33}, "invalid-client-key"),
        ({"clientKey": ""}, "invalid-client-key"),
    ],
    ids=[
        "limit-26",
        "limit-nan",
        "lock-secs-missing",
        "lock-secs-nan",
        "lock-secs-0",
        "lock-secs-neg",
        "key-33",
        "key-0",
    ],
)
def test_lock_head_refuses_bad_params(http: httpx.Client, queue: str, params: dict[str, Any], error_type: str) -> None:
    """Bad limit, lockSecs or clientKey on head/lock is a 400."""
    query = {k: v for k, v in {"lockSecs": 60, "clientKey": "a", **params}.items() if v is not None}
    error(http.post(f"{queue}/head/lock", params=query), 400, error_type)


def test_prolong_and_delete_lock(http: httpx.Client, queue: str) -> None:
    """The holder prolongs (200 lockExpiresAt) and deletes (204) its lock; the request is lockable again."""
    (rid,) = add(http, queue, 1)
    first = lock(http, queue).json()["data"]["items"][0]["lockExpiresAt"]
    prolonged = http.put(f"{queue}/requests/{rid}/lock", params={"lockSecs": 120, "clientKey": "a"})
    assert prolonged.status_code == 200
    assert set(prolonged.json()["data"]) == {"lockExpiresAt"}
    assert prolonged.json()["data"]["lockExpiresAt"] > first
    deleted = http.delete(f"{queue}/requests/{rid}/lock", params={"clientKey": "a", "forefront": "true"})
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert [i["id"] for i in lock(http, queue, "b").json()["data"]["items"]] == [rid]


def test_lock_ops_by_another_client_are_403(http: httpx.Client, queue: str) -> None:
    """Prolonging or deleting a lock another client holds is 403 request-handled-or-locked."""
    (rid,) = add(http, queue, 1)
    lock(http, queue, "a")
    error(
        http.put(f"{queue}/requests/{rid}/lock", params={"lockSecs": 60, "clientKey": "b"}),
        403,
        "request-handled-or-locked",
    )
    error(http.delete(f"{queue}/requests/{rid}/lock", params={"clientKey": "b"}), 403, "request-handled-or-locked")
    error(http.put(f"{queue}/requests/{rid}/lock", params={"lockSecs": 60}), 403, "request-handled-or-locked")


def test_lock_ops_on_unknown_request_are_404(http: httpx.Client, queue: str) -> None:
    """Prolonging or deleting the lock of an unknown request is 404 record-not-found."""
    message = error(
        http.put(f"{queue}/requests/unknownRequest1/lock", params={"lockSecs": 60, "clientKey": "a"}),
        404,
        "record-not-found",
    )
    assert message == "Request was not found"
    error(http.delete(f"{queue}/requests/unknownRequest1/lock", params={"clientKey": "a"}), 404, "record-not-found")


def test_prolong_needs_lock_secs(http: httpx.Client, queue: str) -> None:
    """PUT lock without lockSecs is a 400."""
    (rid,) = add(http, queue, 1)
    lock(http, queue)
    error(http.put(f"{queue}/requests/{rid}/lock", params={"clientKey": "a"}), 400, "invalid-input")


@pytest.mark.parametrize(("value", "first"), [("true", 3), ("1", 3), ("false", 1), ("0", 1)])
def test_forefront_accepts_true_false_1_0(http: httpx.Client, queue: str, value: str, first: int) -> None:
    """forefront is read from true/false/1/0: a forefronted request comes out first."""
    add(http, queue, 1, 2)
    response = http.post(f"{queue}/requests", json=item(3), params={"forefront": value})
    assert response.status_code == 201
    assert lock(http, queue, limit=1).json()["data"]["items"][0]["url"] == url(first)


def test_bad_boolean_is_400(http: httpx.Client, queue: str) -> None:
    """A boolean parameter other than true/false/1/0 is a 400."""
    error(http.post(f"{queue}/requests", json=item(1), params={"forefront": "maybe"}), 400, "invalid-input")


def test_unlock_requests_releases_own_locks(http: httpx.Client, queue: str) -> None:
    """unlock answers 200 with the count of this client's locks, leaving other clients' locks alone."""
    add(http, queue, 1, 2, 3)
    lock(http, queue, "a", limit=2)
    lock(http, queue, "b", limit=1)
    response = http.post(f"{queue}/requests/unlock", params={"clientKey": "a"})
    assert response.status_code == 200
    assert response.json() == {"data": {"unlockedCount": 2}}
    assert len(lock(http, queue, "c").json()["data"]["items"]) == 2


# -- single requests ----------------------------------------------------------------------------------------


def test_get_request_returns_the_full_request(http: httpx.Client, queue: str) -> None:
    """GET request returns userData; an unknown id is 404 "Request was not found"."""
    (rid,) = add(http, queue, 1)
    response = http.get(f"{queue}/requests/{rid}")
    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["id"], data["uniqueKey"], data["userData"], data["retryCount"]) == (rid, url(1), {"n": 1}, 0)
    message = error(http.get(f"{queue}/requests/unknownRequest1"), 404, "record-not-found")
    assert message == "Request was not found"


def test_update_request_handled_leaves_head_and_unlocks(http: httpx.Client, queue: str) -> None:
    """PUT with handledAt answers 200, counts the request handled, removes it from the head and its lock."""
    (rid,) = add(http, queue, 1)
    locked = lock(http, queue).json()["data"]["items"][0]
    body = {**http.get(f"{queue}/requests/{rid}").json()["data"], "handledAt": "2026-01-02T03:04:05.678Z"}
    body["lockExpiresAt"] = locked["lockExpiresAt"]  # clients echo it; the server must ignore it
    response = http.put(f"{queue}/requests/{rid}", json=body, params={"clientKey": "a"})
    assert response.status_code == 200
    assert response.json() == {"data": {"requestId": rid, "wasAlreadyPresent": True, "wasAlreadyHandled": False}}
    info = http.get(queue).json()["data"]
    assert (info["totalRequestCount"], info["handledRequestCount"], info["pendingRequestCount"]) == (1, 1, 0)
    assert http.get(f"{queue}/head").json()["data"]["items"] == []
    stored = http.get(f"{queue}/requests/{rid}").json()["data"]
    assert stored["handledAt"] == "2026-01-02T03:04:05.678Z"
    assert "lockExpiresAt" not in stored
    error(
        http.put(f"{queue}/requests/{rid}/lock", params={"lockSecs": 60, "clientKey": "a"}),
        403,
        "request-handled-or-locked",
    )


def test_update_request_refuses_bad_bodies(http: httpx.Client, queue: str) -> None:
    """PUT with malformed JSON, a mismatching id or a wrong uniqueKey is a 400."""
    (rid,) = add(http, queue, 1)
    path = f"{queue}/requests/{rid}"
    error(http.put(path, content=b"{", headers={"Content-Type": "application/json"}), 400, "invalid-input")
    error(http.put(path, json=[1, 2]), 400, "invalid-input")
    error(http.put(path, json={**item(1), "id": "otherRequestId1"}), 400, "invalid-input")
    error(http.put(path, json={**item(2), "id": rid}), 400, "request-id-invalid")


def test_delete_request(http: httpx.Client, queue: str) -> None:
    """DELETE request answers 204 and removes it from counts and the head; a second delete is 404."""
    rid, _ = add(http, queue, 1, 2)
    response = http.delete(f"{queue}/requests/{rid}", params={"clientKey": "a"})
    assert response.status_code == 204
    assert http.get(f"{queue}/requests/{rid}").status_code == 404
    assert http.get(queue).json()["data"]["totalRequestCount"] == 1
    assert [i["url"] for i in http.get(f"{queue}/head").json()["data"]["items"]] == [url(2)]
    error(http.delete(f"{queue}/requests/{rid}"), 404, "record-not-found")


def test_batch_delete(http: httpx.Client, queue: str) -> None:
    """DELETE requests/batch removes items given by id or uniqueKey and answers 200."""
    rid, _, _ = add(http, queue, 1, 2, 3)
    response = http.request("DELETE", f"{queue}/requests/batch", json=[{"id": rid}, {"uniqueKey": url(2)}])
    assert response.status_code == 200
    assert len(response.json()["data"]["processedRequests"]) == 2
    assert http.get(queue).json()["data"]["totalRequestCount"] == 1


# -- cross-cutting ------------------------------------------------------------------------------------------


def test_every_answer_carries_rate_limit_header(http: httpx.Client, queue: str) -> None:
    """X-RateLimit-Limit is on successes and errors, with the endpoint's per-queue limit."""
    (rid,) = add(http, queue, 1)
    assert http.get(queue).headers["x-ratelimit-limit"] == "60"
    assert lock(http, queue).headers["x-ratelimit-limit"] == "40"
    assert http.get(f"{queue}/requests/{rid}").headers["x-ratelimit-limit"] == "400"
    assert http.get(f"{queue}/requests/nope").headers["x-ratelimit-limit"] == "400"
    assert http.post(f"{queue}/head/lock").headers["x-ratelimit-limit"] == "40"
    assert http.get("/v2/nothing-here").headers["x-ratelimit-limit"] == "60"


def test_unknown_route_and_method_use_the_error_envelope(http: httpx.Client, queue: str) -> None:
    """Unknown paths are 404 and wrong methods 405, both in the error envelope."""
    error(http.get("/v2/nothing-here"), 404, "page-not-found")
    error(http.patch(f"{queue}/head"), 405, "method-not-allowed")


def test_token_is_required_when_configured(tmp_path: Path) -> None:
    """With --token, calls without it or with a wrong one are 401; Bearer and ?token= are accepted."""
    with running_server(tmp_path, token=TOKEN) as base, httpx.Client(base_url=base) as http:
        error(http.post("/v2/request-queues", params={"name": "t"}), 401, "token-not-provided")
        response = http.post("/v2/request-queues", params={"name": "t"}, headers={"Authorization": "Bearer wrong"})
        error(response, 401, "invalid-token")
        assert response.headers["x-ratelimit-limit"] == "60"
        error(http.post("/v2/request-queues", params={"name": "t", "token": "wrong"}), 401, "invalid-token")
        created = http.post("/v2/request-queues", params={"name": "t"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert created.status_code == 201
        assert http.get("/v2/request-queues/t", params={"token": TOKEN}).status_code == 200


class Boom:
    """Test middleware: every call fails with an unexpected exception."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raise RuntimeError("injected failure")
        await self.app(scope, receive, send)


@pytest.mark.anyio
async def test_unexpected_errors_are_500_envelopes(tmp_path: Path) -> None:
    """An unexpected exception answers 500 internal-error in the envelope, with the rate-limit header, and is logged."""
    with capture_logs() as logs:
        app = create_app(tmp_path, middleware=[Middleware(Boom)])
        async with serving_app(app) as base, httpx.AsyncClient(base_url=base) as http:
            response = await http.get("/v2/request-queues/any")
    assert error(response, 500, "internal-error") == "Internal server error"
    assert response.headers["x-ratelimit-limit"] == "60"
    assert [e["event"] for e in logs] == ["server.internal_error"]


def _raw_exchange(base_url: str, request: bytes) -> bytes:
    """Send `request` on a new connection and read until the server closes it (bounded by a 10 s timeout)."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        for _ in range(1000):
            chunk = conn.recv(65536)
            if not chunk:
                return answer
            answer += chunk
    raise AssertionError(f"the server did not close the connection: {answer[:200]!r}")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v2/request-queues HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
        (b"GET /v2/request-queues HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", b"400"),
    ],
)
def test_a_response_before_a_close_is_sent_whole(base_url: str, request_bytes: bytes, status: bytes) -> None:
    """`serve` joins a response's writes into one send: a response followed by a close (`Connection: close`, a
    malformed request) still goes out whole before the connection closes."""
    answer = _raw_exchange(base_url, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == status, answer[:300]
    lengths = [
        line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    ]
    if lengths:
        assert len(body) == int(lengths[0])
