"""The shared `ApiClient` and the resource clients on it (key-value store, actor run), against `headlock serve`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.testing import capture_logs

from runner.api import ActorRun, ApiClient, ApiRetryPolicy, KeyValueStore, RateLimits
from runner.errors import ConfigError, InvalidInputError, NotFoundError, UnauthorizedError
from runner.models import RequestDraft
from runner.queue.api import ApiQueue
from runner.results.apify import ApiDataset
from runner.results.items import encode_item
from runner.server import create_app
from tests._faults import FaultPlan, Rule, faulty_server
from tests._server import running_server, serving_app

TOKEN = "tok-resources-0123456789-secret"  # noqa: S105 - a test token
FAST = ApiRetryPolicy(max_retries=3, base_delay=0.001, max_delay=0.005)
RECORD = "/v2/key-value-stores/{storeId}/records/{key}"

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Async tests run on asyncio (uvicorn's loop)."""
    return "asyncio"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `headlock serve` for the module, requiring TOKEN."""
    with running_server(tmp_path_factory.mktemp("storage"), token=TOKEN) as url:
        yield url


@pytest.fixture
async def api(base_url: str) -> AsyncIterator[ApiClient]:
    """A client of that server."""
    async with ApiClient(base_url=base_url, token=TOKEN, retry=FAST) as client:
        yield client


@pytest.fixture
async def store(api: ApiClient) -> KeyValueStore:
    """A new named key-value store."""
    return await KeyValueStore.open(api, name=f"kvs-{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def faulty(tmp_path: Path) -> AsyncIterator[tuple[ApiClient, FaultPlan]]:
    """A client of `headlock serve`'s app behind a fault plan (no token), and the plan."""
    async with faulty_server(tmp_path) as (url, plan), ApiClient(base_url=url, token=None, retry=FAST) as client:
        yield client, plan


# -- key-value stores ---------------------------------------------------------------------------------------


async def test_open_store_by_name_gets_or_creates_and_by_id_checks(api: ApiClient) -> None:
    """KeyValueStore.open(name=) creates once and finds it after; open(store_id=) checks the id with a GET."""
    name = f"named-{uuid.uuid4().hex[:12]}"
    first = await KeyValueStore.open(api, name=name)
    again = await KeyValueStore.open(api, name=name)
    by_id = await KeyValueStore.open(api, store_id=first.id)
    assert first.id == again.id == by_id.id
    assert api.calls == {
        "POST /v2/key-value-stores 201": 1,
        "POST /v2/key-value-stores 200": 1,
        "GET /v2/key-value-stores/{storeId} 200": 1,
    }
    with pytest.raises(ConfigError):
        await KeyValueStore.open(api)


async def test_a_json_record_round_trips(api: ApiClient, store: KeyValueStore) -> None:
    """A JSON-able value is stored as JSON and read back by get_json; get_record gives its bytes and type."""
    value = {"startUrls": [{"url": "https://example.com"}], "maxRequests": 10, "note": "é"}
    await store.set_record("INPUT", value)
    assert await store.get_json("INPUT") == value
    record = await store.get_record("INPUT")
    assert record is not None
    assert record[1] == "application/json; charset=utf-8"
    assert api.calls[f"PUT {RECORD} 201"] == 1
    assert api.calls[f"GET {RECORD} 200"] == 2


async def test_bytes_keep_their_content_type_and_large_text_reads_back_whole(store: KeyValueStore) -> None:
    """Bytes are stored as given with their type; a text record over 1 KiB (gzipped on the way) reads back whole."""
    png = bytes(range(256)) * 8
    await store.set_record("shot.png", png, "image/png")
    assert await store.get_record("shot.png") == (png, "image/png")
    text = ("line of text\n" * 500).encode()
    await store.set_record("log.txt", text, "text/plain; charset=utf-8")
    assert await store.get_record("log.txt") == (text, "text/plain; charset=utf-8")
    await store.set_record("raw", b"\x00\x01")
    assert await store.get_record("raw") == (b"\x00\x01", "application/octet-stream")


class RecordEncodings:
    """Test middleware: note the `Content-Encoding` (or None) of every record PUT, by key."""

    def __init__(self, app: ASGIApp, *, seen: dict[str, str | None]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "PUT" and "/records/" in scope["path"]:
            encoding = dict(scope["headers"]).get(b"content-encoding")
            self.seen[scope["path"].rsplit("/", 1)[1]] = encoding.decode() if encoding else None
        await self.app(scope, receive, send)


async def test_text_records_are_gzipped_from_1_kib_and_other_bytes_never(tmp_path: Path) -> None:
    """JSON and text records of 1 KiB or more go gzipped, smaller ones and binary types (a PNG) as they are."""
    seen: dict[str, str | None] = {}
    app = create_app(tmp_path, middleware=[Middleware(RecordEncodings, seen=seen)])
    async with serving_app(app) as url, ApiClient(base_url=url, token=None, retry=FAST) as api:
        store = await KeyValueStore.open(api, name="wire")
        await store.set_record("big-json", {"text": "x" * 2000})
        await store.set_record("small-json", {"text": "x"})
        await store.set_record("big-text", b"y" * 2000, "text/csv")
        await store.set_record("big-png", bytes(2000), "image/png")
        assert await store.get_json("big-json") == {"text": "x" * 2000}
    assert seen == {"big-json": "gzip", "small-json": None, "big-text": "gzip", "big-png": None}


async def test_a_redirected_record_is_followed_without_the_token() -> None:
    """A record GET answered with a redirect to another origin is followed, and the token is not sent there."""
    arrived: list[str | None] = []

    async def blob(request: StarletteRequest) -> Response:
        arrived.append(request.headers.get("authorization"))
        return Response(b"stored elsewhere", media_type="text/plain")

    async with serving_app(Starlette(routes=[Route("/blob", blob)])) as elsewhere:

        async def record(request: StarletteRequest) -> Response:
            assert request.headers["authorization"] == f"Bearer {TOKEN}"
            return RedirectResponse(f"{elsewhere}/blob", status_code=302)

        api_app = Starlette(routes=[Route("/v2/key-value-stores/S/records/k", record)])
        async with serving_app(api_app) as url, ApiClient(base_url=url, token=TOKEN, retry=FAST) as api:
            assert await KeyValueStore(api, "S").get_record("k") == (b"stored elsewhere", "text/plain; charset=utf-8")
    assert arrived == [None]


async def test_a_missing_record_is_none(store: KeyValueStore) -> None:
    """get_record and get_json of a key that has no record return None (404 record-not-found)."""
    assert await store.get_record("NOPE") is None
    assert await store.get_json("NOPE") is None


async def test_a_key_with_every_allowed_character_round_trips(store: KeyValueStore) -> None:
    """Record keys may hold ! - _ . ' ( ): they are percent-encoded in the path and come back the same."""
    key = "a!b-c_d.e'f(g)"
    await store.set_record(key, [1, 2])
    assert await store.get_json(key) == [1, 2]


async def test_a_record_that_is_not_json_is_a_config_error(store: KeyValueStore) -> None:
    """get_json of a record that is not JSON raises ConfigError naming the key, store and content type."""
    await store.set_record("INPUT", b"not json {", "text/plain")
    with pytest.raises(ConfigError) as bad:
        await store.get_json("INPUT")
    assert "'INPUT'" in str(bad.value)
    assert store.id in str(bad.value)
    assert "text/plain" in str(bad.value)


async def test_values_that_cannot_be_stored_fail_without_a_call(api: ApiClient, store: KeyValueStore) -> None:
    """A str for a non-JSON type, or a value JSON cannot hold, raises InvalidInputError naming the endpoint."""
    before = sum(api.calls.values())
    with pytest.raises(InvalidInputError) as text:
        await store.set_record("note", "hello", "text/plain")
    with pytest.raises(InvalidInputError) as unjsonable:
        await store.set_record("state", {"seen": {1, 2}})
    assert text.value.endpoint == unjsonable.value.endpoint == f"PUT {RECORD}"
    assert "pass bytes" in str(text.value)
    assert sum(api.calls.values()) == before


async def test_a_record_call_is_retried_and_another_404_is_not_found(faulty: tuple[ApiClient, FaultPlan]) -> None:
    """A 503 on a record GET is retried; a 404 that is not record-not-found raises NotFoundError naming the key."""
    api, plan = faulty
    store = await KeyValueStore.open(api, name="faults")
    await store.set_record("k", {"v": 1})
    plan.add(Rule("GET", r"/records/k$", answer=503))
    assert await store.get_json("k") == {"v": 1}
    assert api.calls[f"GET {RECORD} 503"] == 1
    plan.add(Rule("GET", r"/records/k$", answer=404))  # error type "injected"
    with pytest.raises(NotFoundError) as missing:
        await store.get_record("k")
    assert missing.value.endpoint == f"GET {RECORD}"
    assert "(record k)" in str(missing.value)


async def test_open_names_a_store_that_does_not_exist(faulty: tuple[ApiClient, FaultPlan]) -> None:
    """open(store_id=) of a store the API does not have raises NotFoundError naming the id."""
    api, plan = faulty
    plan.add(Rule("GET", r"^/v2/key-value-stores/[^/]+$", answer=404))
    with pytest.raises(NotFoundError) as missing:
        await KeyValueStore.open(api, store_id="NoSuchStore123")
    assert "NoSuchStore123" in str(missing.value)


# -- actor runs ---------------------------------------------------------------------------------------------


async def test_a_runs_status_message_is_set_and_read_back(api: ApiClient) -> None:
    """set_status_message PUTs statusMessage/isStatusMessageTerminal; get returns the run with them."""
    run = ActorRun(api, "RunId123456789")
    got = await run.get()
    assert got["id"] == "RunId123456789"
    updated = await run.set_status_message("Crawled 10 of 20 pages")
    assert updated["statusMessage"] == "Crawled 10 of 20 pages"
    await run.set_status_message("Done: 20 pages", terminal=True)
    final = await run.get()
    assert (final["statusMessage"], final["isStatusMessageTerminal"]) == ("Done: 20 pages", True)
    assert api.calls == {"GET /v2/actor-runs/{runId} 200": 2, "PUT /v2/actor-runs/{runId} 200": 2}


# -- one client for every resource --------------------------------------------------------------------------


async def test_one_client_serves_queue_dataset_store_and_run(api: ApiClient) -> None:
    """Queue, dataset, store and run share one client: one `calls` Counter, the queue's keys as before, and the
    queue opened over it leaves it open when closed."""
    async with await ApiQueue.open_over(api, name=f"shared-{uuid.uuid4().hex[:12]}") as queue:
        await queue.batch_add([RequestDraft(unique_key="u1", url="http://example.com/1")], client_key="a")
        head = await queue.lock_head(limit=1, lock_secs=60, client_key="a")
        assert [r.url for r in head.items] == ["http://example.com/1"]
        assert queue.calls is api.calls
        assert queue.api is api
    dataset = await ApiDataset.open(api, name=f"shared-{uuid.uuid4().hex[:12]}")
    assert await dataset.push_lines([encode_item({"n": 1})]) == 1
    store = await KeyValueStore.open(api, store_id="default")
    await store.set_record("STATE", {"done": 1})
    await ActorRun(api, "run1").set_status_message("ok")
    assert api.calls == {
        "POST /v2/request-queues 201": 1,
        "POST /requests/batch 201": 1,
        "POST /head/lock 201": 1,
        "POST /v2/datasets 201": 1,
        "POST /v2/datasets/{datasetId}/items 201": 1,
        "GET /v2/key-value-stores/{storeId} 200": 1,
        f"PUT {RECORD} 201": 1,
        "PUT /v2/actor-runs/{runId} 200": 1,
    }
    # The queue's aclose left the shared client open: it still calls.
    assert await store.get_json("STATE") == {"done": 1}


async def test_a_queue_over_a_shared_client_that_fails_to_open_leaves_it_open(api: ApiClient) -> None:
    """open_over with bad arguments raises ConfigError; one whose get-or-create fails leaves the client usable."""
    with pytest.raises(ConfigError):
        await ApiQueue.open_over(api)
    with pytest.raises(InvalidInputError):
        await ApiQueue.open_over(api, name="bad name!")
    assert (await ActorRun(api, "r").get())["id"] == "r"


async def test_each_kind_of_resource_has_its_own_rate_limiter(base_url: str) -> None:
    """At 1 call/s per class, a dataset push right after a queue call of the same class does not wait for the
    queue's limiter (a shared one would hold it back a full second)."""
    limits = RateLimits(batch=1e6, single=1.0, other=1e6)
    async with ApiClient(base_url=base_url, token=TOKEN, retry=FAST, rate_limits=limits) as api:
        queue = await ApiQueue.open_over(api, name=f"rates-{uuid.uuid4().hex[:12]}")
        dataset = await ApiDataset.open(api, name=f"rates-{uuid.uuid4().hex[:12]}")
        assert await queue.get_request("nosuchrequest") is None  # a "single" call of the queue
        started = anyio.current_time()
        await dataset.push_lines([encode_item({"n": 1})])  # a "single" call of the dataset
        assert anyio.current_time() - started < 0.5


async def test_a_wrong_token_never_shows_in_errors_logs_or_reprs(base_url: str) -> None:
    """Resource calls with a wrong token raise UnauthorizedError; the token is in no error, log or repr."""
    wrong = "tok-wrong-9876543210-secret"
    with capture_logs() as logs:
        async with ApiClient(base_url=base_url, token=wrong, retry=FAST) as bad:
            with pytest.raises(UnauthorizedError) as store_denied:
                await KeyValueStore.open(bad, name="x")
            run = ActorRun(bad, "r")
            with pytest.raises(UnauthorizedError) as run_denied:
                await run.set_status_message("hi")
            shown = [repr(bad), repr(run), repr(KeyValueStore(bad, "s"))]
    for text in (str(store_denied.value), str(run_denied.value), repr(logs), *shown):
        assert wrong not in text
    assert "***" in repr(bad)
