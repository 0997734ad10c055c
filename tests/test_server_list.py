"""`headlock serve`'s GET requests (list requests): pages by cursor, filters, the deprecated exclusiveStartId.

Spoken to with the official `apify-client` (its iterator over several pages) and with plain httpx for the wire
details and the error cases.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest
from apify_client import ApifyClient

from tests._server import running_server

if TYPE_CHECKING:
    from tests._postgres import Postgres


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's storage directory."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> str | None:
    """The queue store of the module's server: None for the embedded one, else a DSN with a schema of its own."""
    if request.param == "sqlite":
        return None
    postgres: Postgres = request.getfixturevalue("postgres")
    return postgres.fresh_dsn()


@pytest.fixture(scope="module")
def base_url(storage: Path, store: str | None) -> Iterator[str]:
    """One server for the module, over a fresh storage directory (and the module's database, on postgres)."""
    with running_server(storage, store=store) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    """An HTTP client for the server."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


@pytest.fixture
def client(base_url: str) -> ApifyClient:
    """The official client, without retries (a 5xx would fail the test at once)."""
    return ApifyClient("token", api_url=base_url, api_public_url=base_url, max_retries=0)


def _queue(client: ApifyClient, count: int) -> tuple[str, list[str]]:
    """A new queue holding `count` requests; its id and the request ids, sorted."""
    queue = client.request_queues().get_or_create(name=f"q-{uuid.uuid4().hex[:12]}")
    requests = [{"url": f"http://example.com/{n}", "uniqueKey": f"key-{n}", "userData": {"n": n}} for n in range(count)]
    added = client.request_queue(queue.id).batch_add_requests(requests)
    return queue.id, sorted(r.request_id for r in added.processed_requests)


def _name(client: ApifyClient, queue_id: str) -> str:
    """The queue's name (its file's stem on the server)."""
    queue = client.request_queue(queue_id).get()
    assert queue is not None
    assert queue.name is not None
    return queue.name


def _list(http: httpx.Client, queue_id: str, **params: Any) -> httpx.Response:
    return http.get(f"/v2/request-queues/{queue_id}/requests", params=params)


def test_the_client_iterates_every_request_once_over_several_pages(client: ApifyClient) -> None:
    """iterate_requests with a page size of 7 yields all 30 requests once, in id order, with their userData."""
    queue_id, ids = _queue(client, 30)
    listed = list(client.request_queue(queue_id).iterate_requests(chunk_size=7))
    assert [r.id for r in listed] == ids
    assert sorted(r.user_data.model_extra["n"] for r in listed if r.user_data and r.user_data.model_extra) == list(
        range(30)
    )


def test_next_cursor_only_on_full_pages(client: ApifyClient, http: httpx.Client) -> None:
    """Pages of 4 over 10 requests: cursors on the two full pages, none on the last (2 items)."""
    queue_id, ids = _queue(client, 10)
    seen: list[str] = []
    cursor = None
    pages = []
    for _ in range(10):  # bounded: 3 pages expected
        params: dict[str, Any] = {"limit": 4} if cursor is None else {"limit": 4, "cursor": cursor}
        data = _list(http, queue_id, **params).json()["data"]
        pages.append(len(data["items"]))
        seen += [item["id"] for item in data["items"]]
        cursor = data.get("nextCursor")
        if cursor is None:
            break
    assert pages == [4, 4, 2]
    assert seen == ids


def test_a_full_last_page_is_followed_by_an_empty_one(client: ApifyClient, http: httpx.Client) -> None:
    """Exactly 4 requests, pages of 4: the full page has a cursor, the page it points to is empty and has none."""
    queue_id, _ = _queue(client, 4)
    first = _list(http, queue_id, limit=4).json()["data"]
    assert len(first["items"]) == 4
    second = _list(http, queue_id, limit=4, cursor=first["nextCursor"]).json()["data"]
    assert second["items"] == []
    assert second.get("nextCursor") is None
    assert second["cursor"] == first["nextCursor"]


def test_the_cursor_is_base64url_json_of_the_last_request_id(client: ApifyClient, http: httpx.Client) -> None:
    """nextCursor decodes to {"requestId": <the page's last id>}, as the platform's examples do."""
    queue_id, ids = _queue(client, 3)
    data = _list(http, queue_id, limit=2).json()["data"]
    cursor = data["nextCursor"]
    assert json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))) == {"requestId": ids[1]}
    assert data["limit"] == 2


def test_handled_requests_are_listed_without_a_filter(client: ApifyClient) -> None:
    """A handled request stays in the listing, with its handledAt."""
    queue_id, ids = _queue(client, 3)
    rq = client.request_queue(queue_id)
    request = rq.get_request(ids[0])
    assert request is not None
    rq.update_request({**request.model_dump(by_alias=True, exclude_none=True), "handledAt": "2026-01-01T00:00:00Z"})
    listed = {r.id: r for r in rq.list_requests().items}
    assert set(listed) == set(ids)
    assert listed[ids[0]].handled_at is not None


def test_filters_select_locked_pending_and_their_union(client: ApifyClient, http: httpx.Client) -> None:
    """One handled, two locked, three pending: locked, pending and locked,pending list just those."""
    queue_id, ids = _queue(client, 6)
    rq = client.request_queue(queue_id, client_key="c1")
    locked = {item.id for item in rq.list_and_lock_head(limit=3, lock_duration=timedelta(minutes=5)).items}
    handled_id = sorted(locked)[0]
    request = rq.get_request(handled_id)
    assert request is not None
    rq.update_request({**request.model_dump(by_alias=True, exclude_none=True), "handledAt": "2026-01-01T00:00:00Z"})
    locked.discard(handled_id)
    pending = set(ids) - locked - {handled_id}

    def listed(value: str) -> set[str]:
        response = _list(http, queue_id, filter=value)
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["data"]["items"]}

    assert listed("locked") == locked
    assert listed("pending") == pending
    assert listed("locked,pending") == listed("pending,locked") == locked | pending
    assert {r.id for r in rq.list_requests(filter=["pending"]).items} == pending


def test_exclusive_start_id_skips_up_to_and_including_it(client: ApifyClient, http: httpx.Client) -> None:
    """exclusiveStartId (deprecated) lists the ids after it and echoes it back."""
    queue_id, ids = _queue(client, 5)
    data = _list(http, queue_id, exclusiveStartId=ids[1]).json()["data"]
    assert [item["id"] for item in data["items"]] == ids[2:]
    assert data["exclusiveStartId"] == ids[1]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"cursor": "not-a-cursor!"}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b'{"other": 1}').decode()}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"[1]").decode()}, "cursor"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "2.5"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"filter": "handled"}, "filter"),
        ({"filter": "locked,bogus"}, "filter"),
        ({"filter": ""}, "filter"),
        ({"exclusiveStartId": "x", "cursor": "eyJyZXF1ZXN0SWQiOiJ4In0"}, "exclusiveStartId"),
        ({"exclusiveStartId": "x", "filter": "pending"}, "exclusiveStartId"),
    ],
)
def test_bad_parameters_are_a_400_naming_them(
    client: ApifyClient, http: httpx.Client, params: dict[str, str], needle: str
) -> None:
    """A bad cursor, limit or filter, or exclusiveStartId with cursor or filter: 400 invalid-input naming it."""
    queue_id, _ = _queue(client, 1)
    response = _list(http, queue_id, **params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid-input"
    assert needle in error["message"]


def test_limit_zero_means_the_default_page(client: ApifyClient, http: httpx.Client) -> None:
    """limit=0, which the client's iterator sends without a page size, lists the default page (1000)."""
    queue_id, ids = _queue(client, 3)
    data = _list(http, queue_id, limit=0).json()["data"]
    assert data["limit"] == 1000
    assert [item["id"] for item in data["items"]] == ids


def test_unknown_queue_and_bad_client_key(http: httpx.Client, client: ApifyClient) -> None:
    """An unknown queue is a 404 record-not-found; a clientKey over 32 characters a 400 invalid-client-key."""
    missing = _list(http, "noSuchQueue12345")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "record-not-found"
    queue_id, _ = _queue(client, 1)
    bad_key = _list(http, queue_id, clientKey="k" * 33)
    assert bad_key.status_code == 400
    assert bad_key.json()["error"]["type"] == "invalid-client-key"


def test_a_failed_request_is_listed_with_its_marker_and_errors(client: ApifyClient) -> None:
    """A request ended with the failed marker lists as stored: handledAt, userData.__crawlee.state 6, errors."""
    queue_id, ids = _queue(client, 2)
    rq = client.request_queue(queue_id)
    request = rq.get_request(ids[0])
    assert request is not None
    body = request.model_dump(by_alias=True, exclude_none=True, mode="json")
    rq.update_request(
        body
        | {"handledAt": "2026-01-01T00:00:00Z", "userData": {"n": 0, "__crawlee": {"state": 6}}, "errorMessages": ["e"]}
    )
    [item] = [item for item in rq.list_requests().items if item.id == ids[0]]
    dumped = item.model_dump(by_alias=True, mode="json")
    assert dumped["userData"]["__crawlee"]["state"] == 6
    assert dumped["errorMessages"] == ["e"]


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # a json column holds no damaged text
def test_an_unreadable_row_lists_what_can_be_read_of_it(client: ApifyClient, http: httpx.Client, storage: Path) -> None:
    """A damaged row (not JSON) lists with its id, the uniqueKey and url read from its text, and the text."""
    queue_id, ids = _queue(client, 1)
    name = _name(client, queue_id)
    text = '{"uniqueKey": "http://example.com/0", "url": "http://example.com/0", "userDa'
    with contextlib.closing(sqlite3.connect(storage / "request_queues" / f"{name}.sqlite")) as db:
        db.execute("UPDATE requests SET data = ? WHERE id = ?", (text, ids[0]))
        db.commit()
    [item] = _list(http, queue_id).json()["data"]["items"]
    assert (item["id"], item["uniqueKey"], item["url"], item["unreadableData"]) == (
        ids[0],
        "http://example.com/0",
        "http://example.com/0",
        text,
    )


def _stored(storage: Path, store: str | None, name: str) -> int:
    """What the store holds of the queue `name`: its files, or its rows (the queue's and its requests')."""
    if store is None:
        return len(list((storage / "request_queues").glob(f"{name}.sqlite*")))
    with psycopg.connect(store) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM headlock_queues WHERE name = %(n)s) + (SELECT count(*) FROM"
            " headlock_requests WHERE qid IN (SELECT qid FROM headlock_queues WHERE name = %(n)s)),"
            " (SELECT count(*) FROM headlock_requests r WHERE NOT EXISTS"
            " (SELECT 1 FROM headlock_queues q WHERE q.qid = r.qid))",
            {"n": name},
        ).fetchone()
    assert row is not None
    assert row[1] == 0  # no request left behind by a deleted queue
    return int(row[0])


def test_delete_queue_removes_it_and_its_files(
    client: ApifyClient, http: httpx.Client, storage: Path, store: str | None
) -> None:
    """DELETE of a queue: 204, its files (or rows) are gone, a GET is then a 404, and so is a second DELETE."""
    queue_id, _ = _queue(client, 3)
    name = _name(client, queue_id)
    assert _stored(storage, store, name) > 0
    client.request_queue(queue_id).delete()
    assert client.request_queue(queue_id).get() is None
    assert _stored(storage, store, name) == 0
    again = http.delete(f"/v2/request-queues/{queue_id}")
    assert again.status_code == 404
    assert again.json()["error"]["type"] == "record-not-found"
    recreated = client.request_queues().get_or_create(name=name)
    assert (recreated.id != queue_id, recreated.total_request_count) == (True, 0)
