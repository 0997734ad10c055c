"""Fault tests of `headlock serve`: hostile or malformed input answers 4xx and leaves the server's state bounded."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.uniquekey import request_id_for
from tests._server import running_server

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module, over a fresh storage directory."""
    with running_server(tmp_path_factory.mktemp("storage")) as url:
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


def had_multiple_clients(http: httpx.Client, queue: str) -> bool:
    return bool(http.get(f"{queue}/head").json()["data"]["hadMultipleClients"])


# -- calls without clientKey --------------------------------------------------------------------------------


def test_keyless_calls_keep_the_client_registry_bounded(tmp_path: Path) -> None:
    """2,000 calls without clientKey, on every endpoint that takes one, leave a fixed handful of client rows."""
    with running_server(tmp_path) as base, httpx.Client(base_url=base, timeout=30) as http:
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
        for rounds in (1000, 1000):
            for n in range(rounds):
                assert calls[n % len(calls)](n).status_code < 300
            with closing(sqlite3.connect(tmp_path / "request_queues" / "keyless.sqlite")) as db:
                counts.append(db.execute("SELECT count(*) FROM clients").fetchone()[0])
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
