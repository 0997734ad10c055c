"""`ApiDataset`, the API results sink, against a real `headlock serve` and its app behind injected faults."""

from __future__ import annotations

import gzip
import json
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.testing import capture_logs

from runner.api.client import ApiClient, ApiRetryPolicy, CallTimeouts
from runner.errors import ConfigError, DatasetWriteError, NotFoundError, UnauthorizedError
from runner.results.apify import MAX_PAYLOAD_BYTES, ApiDataset
from runner.results.items import encode_item
from runner.results.protocol import ResultsSink
from runner.server import create_app
from tests._faults import FaultPlan, Rule, faulty_server
from tests._server import running_server, serving_app

TOKEN = "tok-dataset-0123456789-secret"  # noqa: S105 - a test token
FAST = ApiRetryPolicy(max_retries=3, base_delay=0.001, max_delay=0.005)
PUSH = "POST /v2/datasets/{datasetId}/items"
ITEMS = r"^/v2/datasets/[^/]+/items$"

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
async def dataset(api: ApiClient) -> ApiDataset:
    """A new named dataset on that server."""
    return await ApiDataset.open(api, name=f"results-{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def faulty(tmp_path: Path) -> AsyncIterator[tuple[ApiClient, FaultPlan]]:
    """A client of `headlock serve`'s app behind a fault plan (no token), and the plan."""
    async with faulty_server(tmp_path) as (url, plan), ApiClient(base_url=url, token=None, retry=FAST) as client:
        yield client, plan


def lines(count: int, *, pad: int = 0, start: int = 0) -> list[str]:
    """`count` item lines numbered from `start`, each with `pad` bytes of padding."""
    return [encode_item({"n": n, "pad": "x" * pad}) for n in range(start, start + count)]


async def stored(api: ApiClient, dataset_id: str) -> list[dict[str, Any]]:
    """Every item of the dataset, as the server serves them (a plain client, as another reader would)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.get(f"{api.base_url}/datasets/{dataset_id}/items", headers=headers)
    answer.raise_for_status()
    items: list[dict[str, Any]] = answer.json()
    return items


def sized(count: int, length: int) -> list[str]:
    """`count` numbered item lines of exactly `length` bytes each."""
    fixed = len(encode_item({"n": 0, "pad": ""})) - 1  # the line's text around the number and the padding
    return [encode_item({"n": n, "pad": "x" * (length - fixed - len(str(n)))}) for n in range(count)]


def numbers(items: list[dict[str, Any]]) -> list[int]:
    return [item["n"] for item in items]


# -- the sink against headlock serve ------------------------------------------------------------------------


async def test_implements_the_results_sink(dataset: ApiDataset) -> None:
    """ApiDataset is a ResultsSink."""
    assert isinstance(dataset, ResultsSink)


async def test_items_land_in_the_dataset_in_order(api: ApiClient, dataset: ApiDataset) -> None:
    """Pushes are appended in order, each item as it was pushed; an empty push makes no call."""
    assert await dataset.push_lines(lines(3)) == 3
    assert await dataset.push_lines([]) == 0
    assert await dataset.push_lines(lines(2, start=3)) == 2
    items = await stored(api, dataset.id)
    assert numbers(items) == [0, 1, 2, 3, 4]
    assert items[0] == {"n": 0, "pad": ""}
    assert api.calls[f"{PUSH} 201"] == 2


async def test_open_by_name_gets_or_creates_and_by_id_checks(api: ApiClient) -> None:
    """open(name=) creates the dataset once and finds it after; open(dataset_id=) checks the id with a GET."""
    name = f"named-{uuid.uuid4().hex[:12]}"
    first = await ApiDataset.open(api, name=name)
    again = await ApiDataset.open(api, name=name)
    by_id = await ApiDataset.open(api, dataset_id=first.id)
    assert first.id == again.id == by_id.id
    assert api.calls == {"POST /v2/datasets 201": 1, "POST /v2/datasets 200": 1, "GET /v2/datasets/{datasetId} 200": 1}
    with pytest.raises(ConfigError):
        await ApiDataset.open(api)
    with pytest.raises(ConfigError):
        await ApiDataset.open(api, dataset_id="a", name="b")


async def test_location_names_the_dataset_and_its_items_url(base_url: str, dataset: ApiDataset) -> None:
    """location is the dataset's id and items URL, without the token."""
    assert dataset.location == f"dataset {dataset.id} at {base_url}/v2/datasets/{dataset.id}/items"
    assert TOKEN not in dataset.location
    assert TOKEN not in repr(dataset)


async def test_a_20_mb_push_arrives_whole_and_in_order_in_several_posts(api: ApiClient, dataset: ApiDataset) -> None:
    """~20 MB of items in one push go out in requests under the 9 MiB limit and are all stored, in order."""
    size = 10_000
    batch = sized(2_000, size)
    assert {len(line.encode()) for line in batch} == {size}
    per_request = (MAX_PAYLOAD_BYTES - 2 + 1) // (size + 1)  # `[` `]`, and a comma after all but the last
    assert await dataset.push_lines(batch) == 2_000
    posts = api.calls[f"{PUSH} 201"]
    assert posts == math.ceil(2_000 / per_request) > 1
    items = await stored(api, dataset.id)
    assert numbers(items) == list(range(2_000))
    assert [item["pad"] for item in items] == [json.loads(line)["pad"] for line in batch]


async def test_requests_are_cut_at_max_payload_bytes(api: ApiClient, dataset: ApiDataset) -> None:
    """With a 1000-byte limit, 50 lines of 100 bytes go in POSTs of at most 9 lines (9*101+1 bytes), in order."""
    small = ApiDataset(api, dataset.id, max_payload_bytes=1000)
    batch = sized(50, 100)
    assert {len(line) for line in batch} == {100}
    assert await small.push_lines(batch) == 50
    assert api.calls[f"{PUSH} 201"] == math.ceil(50 / 9)
    assert numbers(await stored(api, dataset.id)) == list(range(50))


async def test_an_item_over_the_limit_fails_before_anything_is_sent(api: ApiClient, dataset: ApiDataset) -> None:
    """One item larger than the request limit fails the whole push with its size and the limit; nothing is sent."""
    small = ApiDataset(api, dataset.id, max_payload_bytes=1000)
    batch = [*lines(3), encode_item({"n": 3, "pad": "x" * 2000}), *lines(2, start=4)]
    with pytest.raises(DatasetWriteError) as refused:
        await small.push_lines(batch)
    message = str(refused.value)
    assert "item 3" in message
    assert f"{len(batch[3])} bytes" in message
    assert "1000-byte request limit" in message
    assert PUSH in message
    assert api.calls[f"{PUSH} 201"] == 0
    assert await stored(api, dataset.id) == []


async def test_a_wrong_token_fails_and_never_shows_the_token(base_url: str, dataset: ApiDataset) -> None:
    """A push with a wrong token is a DatasetWriteError naming endpoint and 401; no token in errors, logs, reprs."""
    wrong = "tok-wrong-9876543210-secret"
    with capture_logs() as logs:
        async with ApiClient(base_url=base_url, token=wrong, retry=FAST) as bad:
            sink = ApiDataset(bad, dataset.id)
            with pytest.raises(DatasetWriteError) as denied:
                await sink.push_lines(lines(1))
            shown = [repr(bad), repr(sink), sink.location]
            with pytest.raises(UnauthorizedError) as unopened:
                await ApiDataset.open(bad, name="never")
    assert f"{PUSH} 401" in str(denied.value)
    assert isinstance(denied.value.__cause__, UnauthorizedError)
    assert bad.calls == {f"{PUSH} 401": 1, "POST /v2/datasets 401": 1}  # a 4xx is not retried
    for text in (str(denied.value), str(unopened.value), repr(logs), *shown):
        assert wrong not in text
        assert TOKEN not in text


# -- on the wire: one array of the lines as pushed, gzipped --------------------------------------------------


class RecordPushes:
    """Test middleware: keep the headers and raw body of every items POST, then pass it on."""

    def __init__(self, app: ASGIApp, *, seen: list[tuple[dict[bytes, bytes], bytes]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/items"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        for _ in range(100_000):  # bounded: a body arrives in at most that many messages here
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self.seen.append((dict(scope["headers"]), body))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def test_the_body_is_the_lines_joined_as_pushed_and_gzipped(tmp_path: Path) -> None:
    """Lines are sent byte for byte (no re-encoding) in one JSON array, gzipped from 1 KiB."""
    seen: list[tuple[dict[bytes, bytes], bytes]] = []
    app = create_app(tmp_path, middleware=[Middleware(RecordPushes, seen=seen)])
    odd = ['{"b": 2,  "a": "é"}', '{"z":[1, 2 ]}']  # spacing and order a re-encoding would change
    big = lines(20, pad=100)
    async with serving_app(app) as url, ApiClient(base_url=url, token=None, retry=FAST) as api:
        sink = await ApiDataset.open(api, name="wire")
        await sink.push_lines(odd)
        await sink.push_lines(big)
        items = await stored(api, sink.id)
    (small_headers, small_body), (big_headers, big_body) = seen
    assert small_body == ("[" + ",".join(odd) + "]").encode()
    assert b"content-encoding" not in small_headers
    assert big_headers[b"content-encoding"] == b"gzip"
    assert gzip.decompress(big_body) == ("[" + ",".join(big) + "]").encode()
    assert items[:2] == [{"b": 2, "a": "é"}, {"z": [1, 2]}]


# -- faults: retried answers, lost answers, refusals ---------------------------------------------------------


async def test_a_429_with_retry_after_is_waited_out(faulty: tuple[ApiClient, FaultPlan]) -> None:
    """A 429 with Retry-After: 0.5 delays the retry by half a second (the policy's own delay is ~1 ms); stored once."""
    api, plan = faulty
    sink = await ApiDataset.open(api, name="limited")
    plan.add(Rule("POST", ITEMS, answer=429, retry_after="0.5"))
    assert await sink.push_lines(lines(3)) == 3
    first, second = [c.at for c in plan.calls if c.method == "POST" and c.path.endswith("/items")]
    assert second - first >= 0.5
    assert api.calls == {"POST /v2/datasets 201": 1, f"{PUSH} 429": 1, f"{PUSH} 201": 1}
    assert numbers(await stored(api, sink.id)) == [0, 1, 2]


async def test_a_500_then_success_stores_the_items_once(faulty: tuple[ApiClient, FaultPlan]) -> None:
    """A 500 the server never saw, then a 201: the items are stored once, and no duplicate is reported."""
    api, plan = faulty
    sink = await ApiDataset.open(api, name="flaky")
    plan.add(Rule("POST", ITEMS, answer=500))
    with capture_logs() as logs:
        assert await sink.push_lines(lines(3)) == 3
    assert api.calls[f"{PUSH} 500"] == 1
    assert api.calls[f"{PUSH} 201"] == 1
    assert numbers(await stored(api, sink.id)) == [0, 1, 2]
    assert "dataset.api.retry" in [e["event"] for e in logs]
    # A 5xx may have been applied, so the success after it is reported as a possible duplicate (it was not here).
    assert [e["items"] for e in logs if e["event"] == "dataset.push_maybe_duplicated"] == [3]


@pytest.mark.parametrize("fault", ["error_after", "stall_after"])
async def test_a_lost_answer_is_retried_and_reported_as_a_possible_duplicate(tmp_path: Path, fault: str) -> None:
    """A push applied but not acknowledged (a 500 after storing, or an answer held past the timeout) is retried:
    the items are then stored twice, and the push says so in its log."""
    timeouts = CallTimeouts(short=5.0, medium=0.3, long=5.0)
    async with (
        faulty_server(tmp_path) as (url, plan),
        ApiClient(base_url=url, token=None, retry=FAST, timeouts=timeouts) as api,
    ):
        sink = await ApiDataset.open(api, name="lost")
        if fault == "error_after":
            plan.add(Rule("POST", ITEMS, error_after=True))
        else:
            plan.add(Rule("POST", ITEMS, stall_after=30.0))
        with capture_logs() as logs:
            assert await sink.push_lines(lines(2)) == 2
        items = await stored(api, sink.id)
    assert numbers(items) == [0, 1, 0, 1]
    failed = f"{PUSH} {'500' if fault == 'error_after' else 'error'}"
    assert api.calls[failed] == 1
    assert api.calls[f"{PUSH} 201"] == 1
    duplicated = [e for e in logs if e["event"] == "dataset.push_maybe_duplicated"]
    assert [(e["dataset_id"], e["items"]) for e in duplicated] == [(sink.id, 2)]
    retries = [e for e in logs if e["event"] == "dataset.api.retry"]
    assert [e["maybe_applied"] for e in retries] == [True]


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_a_4xx_fails_at_once_naming_endpoint_and_status(faulty: tuple[ApiClient, FaultPlan], status: int) -> None:
    """A 4xx answer is not retried: DatasetWriteError names the endpoint and status, and nothing was stored."""
    api, plan = faulty
    sink = await ApiDataset.open(api, name=f"refused-{status}")
    plan.add(Rule("POST", ITEMS, answer=status))
    with pytest.raises(DatasetWriteError) as refused:
        await sink.push_lines(lines(2))
    message = str(refused.value)
    assert f"{PUSH} {status} injected" in message
    assert f"dataset {sink.id}" in message
    assert "0 of 2 items were stored before it" in message
    assert "may have been stored" not in message
    assert refused.value.__cause__ is not None
    assert api.calls[f"{PUSH} {status}"] == 1
    assert await stored(api, sink.id) == []


class FailPushesFrom:
    """Test middleware: answer `status` to the items POSTs from the `nth` one (1-based) on."""

    def __init__(self, app: ASGIApp, *, nth: int, status: int) -> None:
        self.app = app
        self.nth = nth
        self.status = status
        self.seen = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/items"):
            self.seen += 1
            if self.seen >= self.nth:
                body = {"error": {"type": "injected", "message": f"injected {self.status}"}}
                await JSONResponse(body, status_code=self.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@asynccontextmanager
async def failing_from(tmp_path: Path, *, nth: int, status: int) -> AsyncIterator[ApiClient]:
    """A client of `headlock serve`'s app whose items POSTs fail from the `nth` on."""
    app = create_app(tmp_path, middleware=[Middleware(FailPushesFrom, nth=nth, status=status)])
    async with serving_app(app) as url, ApiClient(base_url=url, token=None, retry=FAST) as api:
        yield api


@pytest.mark.parametrize(("status", "maybe"), [(400, False), (503, True)])
async def test_a_failed_second_request_says_how_many_items_were_stored(
    tmp_path: Path, status: int, maybe: bool
) -> None:
    """Request 2 of 3 fails (a 400, or 503s after every retry): the error says 9 of 25 items were stored, and
    whether the failed request's may have been; request 3 is never sent."""
    async with failing_from(tmp_path, nth=2, status=status) as api:
        sink = await ApiDataset.open(api, name="partial")
        small = ApiDataset(api, sink.id, max_payload_bytes=1000)
        batch = sized(25, 100)
        with pytest.raises(DatasetWriteError) as failed:
            await small.push_lines(batch)
        items = await stored(api, sink.id)
    message = str(failed.value)
    assert f"{PUSH} {status}" in message
    assert "9 of 25 items were stored before it, in 1 request(s)" in message
    assert ("the failed request's items may have been stored" in message) is maybe
    assert numbers(items) == list(range(9))
    assert api.calls[f"{PUSH} 201"] == 1
    assert api.calls[f"{PUSH} {status}"] == (FAST.max_retries + 1 if maybe else 1)


async def test_a_413_is_split_in_halves_stored_in_order(faulty: tuple[ApiClient, FaultPlan]) -> None:
    """A request refused as too large (a platform with a lower limit) is sent again as two halves, in order."""
    api, plan = faulty
    sink = await ApiDataset.open(api, name="split")
    plan.add(Rule("POST", ITEMS, answer=413))
    with capture_logs() as logs:
        assert await sink.push_lines(lines(5)) == 5
    assert numbers(await stored(api, sink.id)) == [0, 1, 2, 3, 4]
    assert api.calls[f"{PUSH} 413"] == 1
    assert api.calls[f"{PUSH} 201"] == 2
    assert [e["items"] for e in logs if e["event"] == "dataset.push_split"] == [5]


async def test_a_413_for_one_item_fails(faulty: tuple[ApiClient, FaultPlan]) -> None:
    """A single item refused as too large cannot be split: DatasetWriteError naming 413."""
    api, plan = faulty
    sink = await ApiDataset.open(api, name="too-big")
    plan.add(Rule("POST", ITEMS, answer=413))
    with pytest.raises(DatasetWriteError) as refused:
        await sink.push_lines(lines(1))
    assert f"{PUSH} 413" in str(refused.value)


async def test_open_names_a_dataset_that_does_not_exist(faulty: tuple[ApiClient, FaultPlan]) -> None:
    """open(dataset_id=) of a dataset the API does not have raises NotFoundError naming the id."""
    api, plan = faulty
    plan.add(Rule("GET", r"^/v2/datasets/[^/]+$", answer=404))
    with pytest.raises(NotFoundError) as missing:
        await ApiDataset.open(api, dataset_id="NoSuchDataset1")
    assert "NoSuchDataset1" in str(missing.value)
    assert missing.value.endpoint == "GET /v2/datasets/{datasetId}"


async def test_a_closed_sink_refuses_pushes(dataset: ApiDataset, api: ApiClient) -> None:
    """After aclose (idempotent) a push fails with DatasetWriteError and makes no call; the client stays open."""
    await dataset.aclose()
    await dataset.aclose()
    with pytest.raises(DatasetWriteError):
        await dataset.push_lines(lines(1))
    assert api.calls[f"{PUSH} 201"] == 0
    again = await ApiDataset.open(api, dataset_id=dataset.id)
    assert await again.push_lines(lines(1)) == 1
