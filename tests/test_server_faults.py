"""Fault tests of `headlock serve`: hostile or malformed input answers 4xx and leaves the server's state bounded."""

from __future__ import annotations

import json
import sqlite3
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import psycopg
import pytest
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.testing import capture_logs

from runner.server import create_app
from runner.server._wire import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES
from runner.uniquekey import request_id_for
from tests._server import running_server, serving_app

if TYPE_CHECKING:
    from tests._postgres import Postgres

JSON = {"Content-Type": "application/json"}
BOMB_BYTES = 128 * 1024 * 1024
"""What the compression bombs decompress to: far over the payload limit, and far over what the test lets be held."""


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
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture
def queue(http: httpx.Client) -> str:
    """The path of a new, empty named queue."""
    response = http.post("/v2/request-queues", params={"name": f"q-{uuid.uuid4().hex[:12]}"})
    assert response.status_code == 201
    return f"/v2/request-queues/{response.json()['data']['id']}"


def item(n: int | str, **extra: Any) -> dict[str, Any]:
    return {"uniqueKey": f"http://example.com/{n}", "url": f"http://example.com/{n}", **extra}


def error(response: httpx.Response, status: int = 400, error_type: str = "invalid-input") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    return str(body["error"]["message"])


def nested(depth: int) -> str:
    """A JSON value `depth` levels of objects deep."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def had_multiple_clients(http: httpx.Client, queue: str) -> bool:
    return bool(http.get(f"{queue}/head").json()["data"]["hadMultipleClients"])


# -- calls without clientKey --------------------------------------------------------------------------------


def _client_rows(storage: Path, store: str | None, name: str) -> int:
    """How many clients the queue `name` has recorded (rows of its file's table, or of the database's)."""
    if store is None:
        with closing(sqlite3.connect(storage / "request_queues" / f"{name}.sqlite")) as db:
            return int(db.execute("SELECT count(*) FROM clients").fetchone()[0])
    with psycopg.connect(store) as conn:
        row = conn.execute(
            "SELECT count(*) FROM headlock_clients JOIN headlock_queues USING (qid) WHERE name = %s", (name,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_keyless_calls_keep_the_client_registry_bounded(tmp_path: Path, store: str | None) -> None:
    """Calls without clientKey by the thousand, on every endpoint that takes one, leave a fixed handful of clients."""
    with running_server(tmp_path, store=store) as base, httpx.Client(base_url=base, timeout=30) as http:
        queue = "/v2/request-queues/" + http.post("/v2/request-queues", params={"name": "keyless"}).json()["data"]["id"]
        calls: list[Callable[[int], httpx.Response]] = [
            lambda n: http.post(f"{queue}/requests", json=item(n)),
            lambda n: http.post(f"{queue}/requests/batch", json=[item(f"b{n}")]),
            lambda n: http.post(f"{queue}/head/lock", params={"lockSecs": 60, "limit": 1}),
            lambda n: http.post(f"{queue}/requests/unlock"),
            lambda n: http.put(f"{queue}/requests/{request_id_for(item(n)['uniqueKey'])}", json=item(n)),
            # These two delete what the batch add (4 calls before) and the PUT (2 calls before) stored.
            lambda n: http.request(
                "DELETE", f"{queue}/requests/batch", json=[{"uniqueKey": item(f"b{n - 4}")["uniqueKey"]}]
            ),
            lambda n: http.delete(f"{queue}/requests/{request_id_for(item(n - 2)['uniqueKey'])}"),
        ]
        counts = []
        # The stand-in keys are the registry's, whatever the store; on postgres what is checked is that the
        # database records no more than them, which 30 rounds of every call show in a fifth of the time.
        rounds_each = 1000 if store is None else 210
        for rounds in (rounds_each, rounds_each):
            for n in range(rounds):
                assert calls[n % len(calls)](n).status_code < 300
            counts.append(_client_rows(tmp_path, store, "keyless"))
    assert counts[0] == counts[1] <= 4


def test_keyless_calls_count_as_new_clients(http: httpx.Client, queue: str) -> None:
    """Each call without clientKey is a new client: two set hadMultipleClients, and none owns a lock to release."""
    assert http.post(f"{queue}/requests", json=item(1)).status_code == 201
    assert had_multiple_clients(http, queue) is False
    assert http.post(f"{queue}/requests", json=item(2)).status_code == 201
    assert had_multiple_clients(http, queue) is True
    locked = http.post(f"{queue}/head/lock", params={"lockSecs": 60, "limit": 1}).json()["data"]["items"]
    rid = locked[0]["id"]
    error(http.put(f"{queue}/requests/{rid}/lock", params={"lockSecs": 60}), 403, "request-handled-or-locked")
    error(http.delete(f"{queue}/requests/{rid}/lock"), 403, "request-handled-or-locked")
    assert http.post(f"{queue}/requests/unlock").json()["data"]["unlockedCount"] == 0
    again = http.post(f"{queue}/head/lock", params={"lockSecs": 60}).json()["data"]
    assert [i["id"] for i in again["items"]] == [request_id_for(item(2)["uniqueKey"])]


def test_two_keyless_lockers_are_two_clients(http: httpx.Client, queue: str) -> None:
    """Two head/lock calls without clientKey set hadMultipleClients, also after keyless calls that stored nothing."""
    assert http.post(f"{queue}/requests/batch", json=[]).status_code == 201
    error(http.put(f"{queue}/requests/unknownRequest1/lock", params={"lockSecs": 60}), 404, "record-not-found")
    assert had_multiple_clients(http, queue) is False
    http.post(f"{queue}/head/lock", params={"lockSecs": 60})
    assert had_multiple_clients(http, queue) is False
    http.post(f"{queue}/head/lock", params={"lockSecs": 60})
    assert had_multiple_clients(http, queue) is True


def test_keyless_call_and_keyed_call_are_two_clients(http: httpx.Client, queue: str) -> None:
    """A call with a clientKey and one without are two clients."""
    http.post(f"{queue}/requests", json=item(1), params={"clientKey": "k"})
    assert had_multiple_clients(http, queue) is False
    http.post(f"{queue}/requests", json=item(2))
    assert had_multiple_clients(http, queue) is True


# -- compressed bodies --------------------------------------------------------------------------------------


def _zlib_bomb(wbits: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = b" " * (1 << 20)
    return b"".join([*(compressor.compress(chunk) for _ in range(BOMB_BYTES // len(chunk))), compressor.flush()])


def _brotli_bomb() -> bytes:
    brotli: Any = pytest.importorskip("brotli")
    compressor = brotli.Compressor(quality=1)
    chunk = b" " * (1 << 20)
    parts = [compressor.process(chunk) for _ in range(BOMB_BYTES // len(chunk))]
    return b"".join([*parts, compressor.finish()])


BOMBS: dict[str, Callable[[], bytes]] = {
    "br": _brotli_bomb,
    "gzip": lambda: _zlib_bomb(16 + zlib.MAX_WBITS),
    "deflate": lambda: _zlib_bomb(zlib.MAX_WBITS),
}


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", sorted(BOMBS))
async def test_compression_bomb_is_413_with_bounded_memory(tmp_path: Path, encoding: str) -> None:
    """A small body that decompresses to 128 MiB is 413, and decompression stops at the payload limit."""
    bomb = BOMBS[encoding]()
    assert len(bomb) < 200_000
    async with serving_app(create_app(tmp_path)) as base, httpx.AsyncClient(base_url=base, timeout=60) as http:
        queue_id = (await http.post("/v2/request-queues", params={"name": "bombed"})).json()["data"]["id"]
        tracemalloc.start()
        try:
            response = await http.post(
                f"/v2/request-queues/{queue_id}/requests/batch",
                content=bomb,
                headers={**JSON, "Content-Encoding": encoding},
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert "too large" in error(response, 413, "request-too-large")
    # The cap is the payload limit: at most that much decompressed output is ever held, plus one step's output.
    assert peak < 1.5 * MAX_PAYLOAD_BYTES, f"{peak / 2**20:.0f} MiB held while decompressing"


def test_brotli_bodies_are_accepted(http: httpx.Client, queue: str) -> None:
    """A body with Content-Encoding br is decompressed."""
    brotli: Any = pytest.importorskip("brotli")
    body = brotli.compress(json.dumps([item(1, userData={"pad": "x" * 4000})]).encode())
    response = http.post(f"{queue}/requests/batch", content=body, headers={**JSON, "Content-Encoding": "br"})
    assert response.status_code == 201, response.text
    stored = http.get(f"{queue}/requests/{request_id_for(item(1)['uniqueKey'])}").json()["data"]
    assert stored["userData"] == {"pad": "x" * 4000}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "trailing"])
def test_corrupt_brotli_body_is_400(http: httpx.Client, queue: str, damage: str) -> None:
    """A br body that does not decompress (garbage, cut short, or with bytes after its end) is 400."""
    brotli: Any = pytest.importorskip("brotli")
    good = brotli.compress(json.dumps([item(1)]).encode())
    body = {"garbage": b"\x00\x01garbage", "truncated": good[:-3], "trailing": good + b"xx"}[damage]
    response = http.post(f"{queue}/requests/batch", content=body, headers={**JSON, "Content-Encoding": "br"})
    assert "cannot be decompressed" in error(response, 400)


# -- queue names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["abc\n", "abc\n\n", "\nabc", "ab\nc"])
def test_queue_name_with_a_newline_is_400(http: httpx.Client, name: str) -> None:
    """A queue name with a newline anywhere, a trailing one included, is refused."""
    error(http.post("/v2/request-queues", params={"name": name}))


def test_queue_reference_with_a_trailing_newline_is_404(http: httpx.Client) -> None:
    """A queue looked up by a name with a trailing newline (or a NUL) is not found, not matched to another name."""
    name = f"nl-{uuid.uuid4().hex[:8]}"
    assert http.post("/v2/request-queues", params={"name": name}).status_code == 201
    for ref in (f"{name}%0A", f"~{name}%0A", f"user~{name}%0A", f"{name}%00", f"~{name}%00"):
        error(http.get(f"/v2/request-queues/{ref}"), 404, "record-not-found")


# -- JSON bodies --------------------------------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/requests"),
    ("POST", "/requests/batch"),
    ("PUT", f"/requests/{request_id_for(item(1)['uniqueKey'])}"),
    ("DELETE", "/requests/batch"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[f"{m} {p.split('/')[-1]}" for m, p in ENDPOINTS])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deeply_nested_body_is_400(http: httpx.Client, queue: str, method: str, path: str, depth: int) -> None:
    """A body nested deeper than the limit is 400 invalid-input saying so, on every endpoint that reads one."""
    body = "[" * depth + "]" * depth
    message = error(http.request(method, queue + path, content=body, headers=JSON))
    assert "too deeply nested" in message


def test_nesting_up_to_the_limit_is_stored_and_read_back(http: httpx.Client, queue: str) -> None:
    """A request nested exactly to the limit is added, read back and locked; one level more is refused."""
    body = f'{{"uniqueKey":"deep","url":"http://example.com/deep","userData":{nested(MAX_JSON_DEPTH - 1)}}}'
    assert http.post(f"{queue}/requests", content=body, headers=JSON).status_code == 201
    assert http.get(f"{queue}/requests/{request_id_for('deep')}").status_code == 200
    assert len(http.post(f"{queue}/head/lock", params={"lockSecs": 60}).json()["data"]["items"]) == 1
    deeper = f'{{"uniqueKey":"deeper","url":"http://example.com/d","userData":{nested(MAX_JSON_DEPTH)}}}'
    assert "too deeply nested" in error(http.post(f"{queue}/requests", content=deeper, headers=JSON))
    assert http.get(queue).json()["data"]["totalRequestCount"] == 1


def test_brackets_inside_strings_do_not_count_as_nesting(http: httpx.Client, queue: str) -> None:
    """Brackets and escaped quotes inside JSON strings are text, not nesting."""
    text = '[{"\\"' * 500
    response = http.post(f"{queue}/requests", json=item(1, userData={"text": text, text: 1}))
    assert response.status_code == 201, response.text
    stored = http.get(f"{queue}/requests/{request_id_for(item(1)['uniqueKey'])}").json()["data"]
    assert stored["userData"] == {"text": text, text: 1}


MALFORMED_BODIES: list[tuple[str, str, bytes]] = [
    ("int-over-4300-digits", "/requests", b'{"uniqueKey":"a","url":"a","userData":{"n":' + b"1" * 5000 + b"}}"),
    ("top-level-huge-int", "/requests", b"1" * 5000),
    ("nan", "/requests", b'{"uniqueKey":"a","url":"a","userData":{"n":NaN}}'),
    ("infinity", "/requests", b'{"uniqueKey":"a","url":"a","extra":-Infinity}'),
    ("float-overflow", "/requests", b'{"uniqueKey":"a","url":"a","userData":{"n":1e999}}'),
    ("lone-surrogate-unique-key", "/requests", b'{"uniqueKey":"\\ud800","url":"a"}'),
    ("lone-surrogate-batch", "/requests/batch", b'[{"uniqueKey":"\\udfff","url":"a"}]'),
    ("lone-surrogate-user-data-key", "/requests", b'{"uniqueKey":"a","url":"a","userData":{"\\ud800":1}}'),
    ("surrogate-pair-reversed", "/requests", b'{"uniqueKey":"\\ude00\\ud83d","url":"a"}'),
    ("raw-surrogate-bytes", "/requests", b'{"uniqueKey":"\xed\xa0\x80","url":"a"}'),
    ("not-utf-8", "/requests", b'{"uniqueKey":"\xff","url":"a"}'),
    ("batch-item-not-object", "/requests/batch", b'[{"uniqueKey":"a","url":"a"}, 5]'),
    ("batch-nan-item", "/requests/batch", b"[NaN]"),
    ("retry-count-infinite", "/requests", b'{"uniqueKey":"a","url":"a","retryCount":1e400}'),
    ("handled-at-out-of-range", "/requests", b'{"uniqueKey":"a","url":"a","handledAt":"0001-01-01T00:00:00+14:00"}'),
]


@pytest.mark.parametrize(("path", "body"), [c[1:] for c in MALFORMED_BODIES], ids=[c[0] for c in MALFORMED_BODIES])
def test_malformed_bodies_are_400(http: httpx.Client, queue: str, path: str, body: bytes) -> None:
    """Bodies that are not JSON the store can keep (huge or non-finite numbers, broken Unicode) are 400."""
    error(http.post(queue + path, content=body, headers=JSON))
    assert http.get(queue).json()["data"]["totalRequestCount"] == 0


def test_escaped_surrogate_pairs_are_accepted(http: httpx.Client, queue: str) -> None:
    """An ASCII-escaped character outside the BMP (a valid surrogate pair) is stored as that character."""
    body = b'{"uniqueKey":"http://example.com/\\ud83d\\ude00","url":"http://example.com/x","userData":{"e":"\\ud83d\\ude00"}}'
    assert http.post(f"{queue}/requests", content=body, headers=JSON).status_code == 201
    stored = http.get(f"{queue}/requests/{request_id_for('http://example.com/😀')}").json()["data"]
    assert stored["userData"] == {"e": "😀"}


def test_utf16_body_is_still_accepted(http: httpx.Client, queue: str) -> None:
    """A JSON body in UTF-16 with a BOM, which JSON allows, is read."""
    response = http.post(f"{queue}/requests", content=json.dumps(item(1)).encode("utf-16"), headers=JSON)
    assert response.status_code == 201, response.text


# -- batch delete -------------------------------------------------------------------------------------------

BAD_DELETE_ITEMS: list[tuple[str, Any]] = [
    ("empty-id", [{"id": ""}]),
    ("empty-id-empty-key", [{"id": "", "uniqueKey": ""}]),
    ("null-id", [{"id": None}]),
    ("null-id-with-key", [{"id": None, "uniqueKey": "http://example.com/1"}]),
    ("int-id", [{"id": 5}]),
    ("int-key-with-id", [{"id": "abc", "uniqueKey": 5}]),
    ("list-key", [{"uniqueKey": ["http://example.com/1"]}]),
    ("no-id-or-key", [{}]),
    ("other-fields-only", [{"url": "http://example.com/1"}]),
    ("number-item", [1]),
    ("list-item", [[]]),
    ("null-item", [None]),
    ("second-item-bad", [{"id": "abc"}, {"id": ""}]),
    ("object-not-array", {"id": "abc"}),
    ("26-items", [{"id": f"id{n}"} for n in range(26)]),
]


@pytest.mark.parametrize("body", [c[1] for c in BAD_DELETE_ITEMS], ids=[c[0] for c in BAD_DELETE_ITEMS])
def test_batch_delete_refuses_malformed_items(http: httpx.Client, queue: str, body: Any) -> None:
    """A batch delete with an empty, mistyped or missing id/uniqueKey is 400 and deletes nothing."""
    rid = http.post(f"{queue}/requests", json=item(1), params={"clientKey": "a"}).json()["data"]["requestId"]
    body = json.loads(json.dumps(body).replace('"abc"', json.dumps(rid)))
    error(http.request("DELETE", f"{queue}/requests/batch", json=body))
    assert http.get(f"{queue}/requests/{rid}").status_code == 200


def test_batch_delete_by_empty_unique_key(http: httpx.Client, queue: str) -> None:
    """The empty string is a valid uniqueKey: a request added with it is deleted by it."""
    added = http.post(
        f"{queue}/requests", json={"uniqueKey": "", "url": "http://example.com/"}, params={"clientKey": "a"}
    )
    assert added.status_code == 201
    response = http.request("DELETE", f"{queue}/requests/batch", json=[{"uniqueKey": ""}])
    assert response.status_code == 200
    assert response.json()["data"]["processedRequests"] == [{"id": request_id_for(""), "uniqueKey": ""}]
    assert http.get(queue).json()["data"]["totalRequestCount"] == 0


# -- disconnects --------------------------------------------------------------------------------------------


class Finished:
    """Test middleware: sets `event` when the app is done with a call to a path ending in `suffix`, however it ended."""

    def __init__(self, app: ASGIApp, *, suffix: str, event: anyio.Event) -> None:
        self.app = app
        self.suffix = suffix
        self.event = event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope["path"].endswith(self.suffix):
                self.event.set()


@pytest.mark.anyio
async def test_client_leaving_mid_body_is_not_a_server_error(tmp_path: Path) -> None:
    """A client that disconnects while sending its body is logged as server.client_disconnected, not as a 500."""
    finished = anyio.Event()
    with capture_logs() as logs:
        app = create_app(tmp_path, middleware=[Middleware(Finished, suffix="/requests", event=finished)])
        async with serving_app(app) as base, httpx.AsyncClient(base_url=base) as http:
            queue_id = (await http.post("/v2/request-queues", params={"name": "left"})).json()["data"]["id"]
            stream = await anyio.connect_tcp("127.0.0.1", int(base.rsplit(":", 1)[1]))
            await stream.send(
                f"POST /v2/request-queues/{queue_id}/requests HTTP/1.1\r\nHost: test\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
            )
            await stream.aclose()
            with anyio.fail_after(10):
                await finished.wait()
    assert [e["event"] for e in logs if e["event"].startswith("server.")] == ["server.client_disconnected"]
