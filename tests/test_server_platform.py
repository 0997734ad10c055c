"""`headlock serve` beside the queue: key-value stores, datasets and actor runs, as the official client calls them.

One server over one storage directory, started with default storage ids; the error cases with plain httpx.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import brotli
import httpx
import psycopg
import pytest
from apify_client import ApifyClient
from apify_client.errors import ApifyApiError

from runner.results.jsonl import JsonlDataset, read_items
from runner.server import create_app
from runner.server._runs import RunDefaults
from runner.server._store_postgres import PostgresRegistry
from runner.server._wire import MAX_PAYLOAD_BYTES
from tests._server import running_server, serving_app

if TYPE_CHECKING:
    from tests._postgres import Postgres

DEFAULTS = {"queue": "rq-default", "dataset": "ds-default", "kv": "kv-default"}


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's storage directory."""
    return tmp_path_factory.mktemp("storage")


BOTH_STORES = pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
"""For the tests of request queues: datasets and key-value stores are files under --storage with either store."""


@pytest.fixture(scope="module", params=["sqlite"])
def store(request: pytest.FixtureRequest) -> str | None:
    """The queue store of the module's server: None for the embedded one, else a DSN with a schema of its own."""
    if request.param == "sqlite":
        return None
    postgres: Postgres = request.getfixturevalue("postgres")
    return postgres.fresh_dsn()


@pytest.fixture(scope="module")
def base_url(storage: Path, store: str | None) -> Iterator[str]:
    """One server for the module, with default storage ids."""
    extra = [
        "--default-queue-id",
        DEFAULTS["queue"],
        "--default-dataset-id",
        DEFAULTS["dataset"],
        "--default-kv-store-id",
        DEFAULTS["kv"],
    ]
    with running_server(storage, extra_args=extra, store=store) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    """An HTTP client for the server."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


@pytest.fixture
def client(base_url: str) -> ApifyClient:
    """The official client, without retries (a 5xx fails the test at once)."""
    return ApifyClient("token", api_url=base_url, api_public_url=base_url, max_retries=0)


def _name() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def _error(response: httpx.Response, status: int, error_type: str | None = None) -> str:
    """Check the error envelope; return its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str)
    if error_type is not None:
        assert error["type"] == error_type
    return str(error["message"])


# -- key-value stores ----------------------------------------------------------------------------------------


def test_store_get_or_create_by_name_and_unnamed(client: ApifyClient, http: httpx.Client) -> None:
    """A name gives the same store twice (201 then 200); no name gives a new store each time."""
    name = _name()
    first = http.post("/v2/key-value-stores", params={"name": name})
    again = http.post("/v2/key-value-stores", params={"name": name})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["data"]["id"] == again.json()["data"]["id"]
    assert first.headers["location"].endswith(f"/v2/key-value-stores/{first.json()['data']['id']}")
    named = client.key_value_stores().get_or_create(name=name)
    assert (named.id, named.name) == (first.json()["data"]["id"], name)
    unnamed = {client.key_value_stores().get_or_create().id for _ in range(2)}
    assert len(unnamed) == 2
    assert all(client.key_value_store(store_id).get().name is None for store_id in unnamed)  # type: ignore[union-attr]


def test_store_by_id_name_and_unseen_id(client: ApifyClient, storage: Path) -> None:
    """A store is found by id and by ~name; an unseen id is created on first use; an unknown ~name is not."""
    name = _name()
    created = client.key_value_stores().get_or_create(name=name)
    assert client.key_value_store(created.id).get().name == name  # type: ignore[union-attr]
    assert client.key_value_store(f"~{name}").get().id == created.id  # type: ignore[union-attr]
    unseen = f"u{uuid.uuid4().hex[:16]}"
    got = client.key_value_store(unseen).get()
    assert got is not None
    assert (got.id, got.name) == (unseen, None)
    assert (storage / "key_value_stores" / unseen / "__metadata__.json").is_file()
    assert client.key_value_store(f"~{_name()}").get() is None


def test_records_of_each_kind_keep_value_and_content_type(client: ApifyClient) -> None:
    """JSON, text and binary records come back as stored, with their content types."""
    store = client.key_value_store(client.key_value_stores().get_or_create(name=_name()).id)
    store.set_record("INPUT", {"start": ["http://example.com"], "n": 1})
    store.set_record("note.txt", "héllo wörld", content_type="text/plain")
    payload = bytes(range(256)) * 10
    store.set_record("blob", payload, content_type="image/png")
    assert store.get_record("INPUT") == {
        "key": "INPUT",
        "value": {"start": ["http://example.com"], "n": 1},
        "content_type": "application/json; charset=utf-8",
    }
    text = store.get_record("note.txt")
    assert text is not None
    assert (text["value"], text["content_type"]) == ("héllo wörld", "text/plain")
    blob = store.get_record_as_bytes("blob")
    assert blob is not None
    assert (blob["value"], blob["content_type"]) == (payload, "image/png")
    assert store.get_record("missing") is None


def test_a_record_is_a_file_with_a_crawlee_style_sidecar(client: ApifyClient, storage: Path) -> None:
    """`key_value_stores/<name>/<key>` holds the bytes, `<key>.__metadata__.json` the content type."""
    name = _name()
    store = client.key_value_store(client.key_value_stores().get_or_create(name=name).id)
    store.set_record("OUTPUT", "done", content_type="text/plain; charset=utf-8")
    directory = storage / "key_value_stores" / name
    assert (directory / "OUTPUT").read_bytes() == b"done"
    sidecar = json.loads((directory / "OUTPUT.__metadata__.json").read_text())
    assert sidecar == {"key": "OUTPUT", "content_type": "text/plain; charset=utf-8", "size": 4}


def test_compressed_record_bodies_are_stored_decompressed(client: ApifyClient, http: httpx.Client) -> None:
    """gzip and br uploads are stored as their plain bytes (the client also gzips big bodies itself)."""
    store_id = client.key_value_stores().get_or_create(name=_name()).id
    plain = b"x" * 5000
    for key, encoding, body in (("g", "gzip", gzip.compress(plain)), ("b", "br", brotli.compress(plain))):
        headers = {"Content-Type": "application/octet-stream", "Content-Encoding": encoding}
        response = http.put(f"/v2/key-value-stores/{store_id}/records/{key}", content=body, headers=headers)
        assert response.status_code == 201, response.text
        assert http.get(f"/v2/key-value-stores/{store_id}/records/{key}").content == plain
    big = {"text": "y" * 4000}
    client.key_value_store(store_id).set_record("big", big)  # sent gzip-compressed by the client
    assert client.key_value_store(store_id).get_record("big")["value"] == big  # type: ignore[index]


def test_record_exists_head_attachment_and_delete(client: ApifyClient, http: httpx.Client) -> None:
    """record_exists is True then False; attachment=true changes no byte; delete then 404 record-not-found."""
    store_id = client.key_value_stores().get_or_create(name=_name()).id
    store = client.key_value_store(store_id)
    store.set_record("page.html", "<p>hi</p>", content_type="text/html")
    assert store.record_exists("page.html")
    plain = http.get(f"/v2/key-value-stores/{store_id}/records/page.html")
    attached = http.get(f"/v2/key-value-stores/{store_id}/records/page.html", params={"attachment": "true"})
    assert plain.content == attached.content == b"<p>hi</p>"
    assert plain.headers["content-type"] == "text/html"
    store.delete_record("page.html")
    assert not store.record_exists("page.html")
    assert store.get_record("page.html") is None
    _error(http.delete(f"/v2/key-value-stores/{store_id}/records/page.html"), 404, "record-not-found")
    _error(http.get(f"/v2/key-value-stores/{store_id}/records/page.html"), 404, "record-not-found")


def test_list_keys_pages_in_key_order(client: ApifyClient, http: httpx.Client) -> None:
    """list_keys pages by exclusiveStartKey and limit, in key order, with sizes; iterate_keys sees all; prefix."""
    store_id = client.key_value_stores().get_or_create(name=_name()).id
    store = client.key_value_store(store_id)
    keys = [f"k-{n:02d}" for n in range(7)] + ["other"]
    for key in keys:
        store.set_record(key, key, content_type="text/plain")
    first = store.list_keys(limit=3)
    assert [item.key for item in first.items] == keys[:3]
    assert (first.count, first.limit, first.is_truncated, first.next_exclusive_start_key) == (3, 3, True, "k-02")
    assert [item.size for item in first.items] == [4, 4, 4]
    rest = store.list_keys(exclusive_start_key="k-05")
    assert [item.key for item in rest.items] == ["k-06", "other"]
    assert not rest.is_truncated
    assert rest.next_exclusive_start_key is None
    assert [item.key for item in store.iterate_keys(chunk_size=2)] == sorted(keys)
    assert [item.key for item in store.list_keys(prefix="oth").items] == ["other"]
    url = str(first.items[0].record_public_url)
    assert httpx.get(url).content == b"k-00"
    _error(http.get(f"/v2/key-value-stores/{store_id}/keys", params={"limit": 1001}), 400, "invalid-input")


def test_delete_store(client: ApifyClient, http: httpx.Client, storage: Path) -> None:
    """DELETE removes the store and its records (204); a second DELETE, and its ~name, are 404s."""
    name = _name()
    store_id = client.key_value_stores().get_or_create(name=name).id
    client.key_value_store(store_id).set_record("a", "b")
    assert http.delete(f"/v2/key-value-stores/{store_id}").status_code == 204
    assert not (storage / "key_value_stores" / name).exists()
    assert client.key_value_store(f"~{name}").get() is None
    _error(http.delete(f"/v2/key-value-stores/{store_id}"), 404, "record-not-found")
    client.key_value_store(store_id).delete()  # the client swallows the 404


@pytest.mark.parametrize(
    "key",
    [
        "a" * 257,
        "sp%20ace",
        "sl%2Fash",
        "%2E%2E",
        "%2E",
        "x.__metadata__.json",
        "__metadata__.json",
        "b%C3%A4d",
        "q%3F",
    ],
)
def test_bad_record_keys_are_a_400(client: ApifyClient, http: httpx.Client, key: str) -> None:
    """Keys outside 1-256 of a-zA-Z0-9!-_.'(), dot segments and metadata names: 400 on PUT, GET and DELETE."""
    store_id = client.key_value_stores().get_or_create(name="bad-keys").id
    url = f"/v2/key-value-stores/{store_id}/records/{key}"
    for response in (http.put(url, content=b"v"), http.get(url), http.delete(url)):
        assert "record key" in _error(response, 400, "invalid-input")


def test_the_longest_key_and_every_allowed_character_work(client: ApifyClient) -> None:
    """A 256-character key and one of every allowed punctuation character are valid."""
    store = client.key_value_store(client.key_value_stores().get_or_create(name=_name()).id)
    long_keys = ["k" * 256, "k" * 255 + "z", "k" * 201]  # same prefix: their file names differ by the hash
    for key in [*long_keys, "a!-_.'()Z9", "k" * 200]:
        store.set_record(key, key[-5:], content_type="text/plain")
        assert store.get_record(key)["value"] == key[-5:]  # type: ignore[index]
    assert [item.key for item in store.iterate_keys(chunk_size=2)] == sorted([*long_keys, "a!-_.'()Z9", "k" * 200])
    store.delete_record("k" * 256)
    assert store.get_record("k" * 256) is None
    assert store.get_record("k" * 255 + "z") is not None


def test_an_oversized_record_is_a_413(client: ApifyClient, http: httpx.Client) -> None:
    """A record body over the payload limit is refused with 413 request-too-large."""
    store_id = client.key_value_stores().get_or_create(name=_name()).id
    response = http.put(f"/v2/key-value-stores/{store_id}/records/big", content=b"x" * (MAX_PAYLOAD_BYTES + 1))
    _error(response, 413, "request-too-large")


# -- datasets ------------------------------------------------------------------------------------------------


def test_dataset_get_or_create_get_and_delete(client: ApifyClient, http: httpx.Client, storage: Path) -> None:
    """Named get-or-create is idempotent; an unseen id is created; DELETE removes the file; ~name then 404s."""
    name = _name()
    first = http.post("/v2/datasets", params={"name": name})
    assert first.status_code == 201
    dataset = client.datasets().get_or_create(name=name)
    assert dataset.id == first.json()["data"]["id"]
    assert (dataset.item_count, dataset.clean_item_count) == (0, 0)
    assert (storage / "datasets" / f"{name}.jsonl").is_file()
    unseen = f"u{uuid.uuid4().hex[:16]}"
    assert client.dataset(unseen).get().id == unseen  # type: ignore[union-attr]
    client.dataset(dataset.id).delete()
    assert not (storage / "datasets" / f"{name}.jsonl").exists()
    assert client.dataset(f"~{name}").get() is None
    _error(http.delete(f"/v2/datasets/{dataset.id}"), 404, "record-not-found")


def test_push_and_list_items_with_offset_limit_desc(client: ApifyClient) -> None:
    """Items pushed one and many at a time list in order; offset, limit, desc and the page fields."""
    dataset = client.dataset(client.datasets().get_or_create(name=_name()).id)
    dataset.push_items({"n": 0})
    dataset.push_items([{"n": n} for n in range(1, 10)])
    page = dataset.list_items(offset=2, limit=3)
    assert page.items == [{"n": 2}, {"n": 3}, {"n": 4}]
    assert (page.total, page.offset, page.count, page.limit, page.desc) == (10, 2, 3, 3, False)
    newest = dataset.list_items(limit=2, desc=True, offset=1)
    assert newest.items == [{"n": 8}, {"n": 7}]
    assert newest.desc
    assert dataset.list_items(offset=50).items == []
    assert [item["n"] for item in dataset.iterate_items(chunk_size=3)] == list(range(10))
    assert dataset.get().item_count == 10  # type: ignore[union-attr]


def test_clean_fields_and_omit(client: ApifyClient) -> None:
    """clean drops hidden fields and then empty items (after the page is cut); fields picks, omit drops."""
    dataset = client.dataset(client.datasets().get_or_create(name=_name()).id)
    dataset.push_items([{"a": 1, "#debug": "x", "b": 2}, {"#only": "hidden"}, {}, {"a": 3}])
    info = dataset.get()
    assert (info.item_count, info.clean_item_count) == (4, 2)  # type: ignore[union-attr]
    clean = dataset.list_items(clean=True)
    assert clean.items == [{"a": 1, "b": 2}, {"a": 3}]
    assert clean.count == 4  # rows scanned
    assert dataset.list_items(fields=["b", "a"], limit=1).items == [{"b": 2, "a": 1}]
    assert dataset.list_items(omit=["a", "#debug"], limit=1).items == [{"b": 2}]
    assert dataset.list_items(skip_empty=True).items == [{"a": 1, "#debug": "x", "b": 2}, {"#only": "hidden"}, {"a": 3}]


def test_items_as_bytes_in_each_format(client: ApifyClient) -> None:
    """json, jsonl and csv (flattened columns, BOM by default, delimiter, no header) as the platform serves them."""
    dataset = client.dataset(client.datasets().get_or_create(name=_name()).id)
    dataset.push_items([{"url": "http://a", "meta": {"depth": 1, "tags": ["x", "y"]}}, {"url": "http://b", "ok": True}])
    as_json = dataset.get_items_as_bytes(item_format="json")
    assert json.loads(as_json) == dataset.list_items().items
    as_jsonl = dataset.get_items_as_bytes(item_format="jsonl", desc=True)
    assert [json.loads(line) for line in as_jsonl.splitlines()] == dataset.list_items(desc=True).items
    as_csv = dataset.get_items_as_bytes(item_format="csv").decode("utf-8")
    assert as_csv.splitlines() == [
        "\ufeffurl,meta/depth,meta/tags/0,meta/tags/1,ok",
        "http://a,1,x,y,",
        "http://b,,,,true",
    ]
    bare = dataset.get_items_as_bytes(item_format="csv", bom=False, delimiter=";", skip_header_row=True, limit=1)
    assert bare.decode() == "http://a;1;x;y\r\n"
    assert dataset.get_items_as_bytes(item_format="json", offset=5) == b"[]\n"


def test_a_local_runs_results_read_through_serve_and_back(client: ApifyClient, storage: Path) -> None:
    """Lines a local run appends to datasets/<name>.jsonl are served; items pushed through serve land in that file."""
    name = _name()
    local = JsonlDataset.open(storage, name)
    try:
        local.write_lines([json.dumps({"from": "run", "n": n}) for n in range(3)])
        dataset = client.dataset(name)  # the file's name, as an id the server then knows it by
        assert dataset.list_items().items == [{"from": "run", "n": n} for n in range(3)]
        dataset.push_items([{"from": "serve"}])
        local.write_lines([json.dumps({"from": "run", "n": 3})])  # appended after the server indexed the file
        assert [item.get("n") for item in dataset.list_items(offset=3).items] == [None, 3]
        assert dataset.get().item_count == 5  # type: ignore[union-attr]
    finally:
        local.close()
    assert read_items(storage / "datasets" / f"{name}.jsonl")[3] == {"from": "serve"}
    assert client.dataset(f"~{name}").get().name == name  # type: ignore[union-attr]


def test_a_replaced_dataset_file_is_indexed_again(client: ApifyClient, storage: Path) -> None:
    """A dataset file rewritten shorter (a person cleaned it up) is read from the start again, not by stale offsets."""
    name = _name()
    dataset = client.dataset(client.datasets().get_or_create(name=name).id)
    dataset.push_items([{"old": n} for n in range(5)])
    assert dataset.get().item_count == 5  # type: ignore[union-attr]
    path = storage / "datasets" / f"{name}.jsonl"
    replacement = path.with_name("replacement.tmp")
    replacement.write_text('{"new": 1}\n')
    replacement.replace(path)
    assert dataset.list_items().items == [{"new": 1}]


def test_a_dataset_deleted_behind_the_servers_back_is_not_served_from_memory(
    client: ApifyClient, storage: Path
) -> None:
    """Files removed by hand: the id is then unseen, so it is a new empty dataset with metadata on disk again."""
    name = _name()
    dataset = client.dataset(client.datasets().get_or_create(name=name).id)
    dataset.push_items([{"n": 1}])
    for path in (storage / "datasets").glob(f"{name}.*"):
        path.unlink()
    again = dataset.get()
    assert again is not None
    assert (again.item_count, again.name) == (0, None)
    assert (storage / "datasets" / f"{again.id}.__metadata__.json").is_file()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"42", "object or an array"),
        (b'"text"', "object or an array"),
        (b'[{"a": 1}, 2]', "item 1"),
        (b'[{"a": 1}, [1]]', "item 1"),
        (b"{not json", "not valid JSON"),
        (b"[NaN]", "not valid JSON"),
    ],
)
def test_bad_item_bodies_are_a_400(client: ApifyClient, http: httpx.Client, body: bytes, needle: str) -> None:
    """Anything but an object or an array of objects (and invalid JSON) is refused whole with a 400."""
    dataset_id = client.datasets().get_or_create(name=_name()).id
    response = http.post(f"/v2/datasets/{dataset_id}/items", content=body, headers={"Content-Type": "application/json"})
    assert needle in _error(response, 400, "invalid-input")
    assert client.dataset(dataset_id).get().item_count == 0  # type: ignore[union-attr]


def test_item_bodies_over_the_limit_after_decompression_are_a_413(client: ApifyClient, http: httpx.Client) -> None:
    """A gzip body small on the wire but over 9 MiB decompressed is refused (413); a compressed small one is stored."""
    dataset_id = client.datasets().get_or_create(name=_name()).id
    url = f"/v2/datasets/{dataset_id}/items"
    huge = json.dumps([{"pad": "z" * 1000}] * (MAX_PAYLOAD_BYTES // 1000 + 1)).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    _error(http.post(url, content=gzip.compress(huge), headers=headers), 413, "request-too-large")
    ok = http.post(url, content=gzip.compress(b'[{"a": 1}]'), headers=headers)
    assert ok.status_code == 201
    assert client.dataset(dataset_id).list_items().items == [{"a": 1}]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"format": "xlsx"}, "format"),
        ({"unwind": "a"}, "unwind"),
        ({"limit": "-1"}, "limit"),
        ({"offset": "-2"}, "offset"),
        ({"offset": "x"}, "offset"),
        ({"desc": "maybe"}, "desc"),
        ({"format": "csv", "delimiter": ";;"}, "delimiter"),
    ],
)
def test_bad_item_listing_parameters_are_a_400(
    client: ApifyClient, http: httpx.Client, params: dict[str, str], needle: str
) -> None:
    """Unsupported formats and options, and bad offset, limit, booleans or delimiter: 400 naming them."""
    dataset_id = client.datasets().get_or_create(name=_name()).id
    assert needle in _error(http.get(f"/v2/datasets/{dataset_id}/items", params=params), 400, "invalid-input")


# -- actor runs and default storages -------------------------------------------------------------------------


def test_any_run_is_running_over_the_default_storages(client: ApifyClient) -> None:
    """GET of any run id gives a RUNNING run the official model accepts, with the server's default storage ids."""
    run = client.run("someRunId").get()
    assert run is not None
    assert (run.id, run.status) == ("someRunId", "RUNNING")
    assert (run.default_request_queue_id, run.default_dataset_id, run.default_key_value_store_id) == (
        DEFAULTS["queue"],
        DEFAULTS["dataset"],
        DEFAULTS["kv"],
    )


def test_the_status_message_is_kept(client: ApifyClient) -> None:
    """update(status_message, is_status_message_terminal) is answered with the run and read back by GET."""
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    updated = client.run(run_id).update(status_message="Crawled 3 pages", is_status_message_terminal=False)
    assert updated.status_message == "Crawled 3 pages"
    client.run(run_id).update(is_status_message_terminal=True)  # the message stays
    again = client.run(run_id).get()
    assert again is not None
    assert (again.status_message, again.is_status_message_terminal) == ("Crawled 3 pages", True)
    assert client.run("another-run").get().status_message is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"statusMessage": 5}', b'{"isStatusMessageTerminal": "yes"}', b'{"status": "SUCCEEDED"}', b"{bad"],
)
def test_bad_run_updates_are_a_400(http: httpx.Client, body: bytes) -> None:
    """A PUT run body that is not an object of the known fields with their types: 400."""
    response = http.put("/v2/actor-runs/r1", content=body, headers={"Content-Type": "application/json"})
    _error(response, 400, "invalid-input")


def _queue_stored(storage: Path, store: str | None, name: str) -> bool:
    """Whether the store holds the queue `name`: its file, or its row in the database."""
    if store is None:
        return (storage / "request_queues" / f"{name}.sqlite").is_file()
    with psycopg.connect(store) as conn:
        return conn.execute("SELECT 1 FROM headlock_queues WHERE name = %s", (name,)).fetchone() is not None


@BOTH_STORES
def test_default_storages_are_created_on_first_use(client: ApifyClient, storage: Path, store: str | None) -> None:
    """The default queue, dataset and store ids answer at once and report those ids; the queue is in the store."""
    queue = client.request_queue(DEFAULTS["queue"]).get()
    assert queue is not None
    assert queue.id == DEFAULTS["queue"]
    assert _queue_stored(storage, store, DEFAULTS["queue"])
    client.request_queue(DEFAULTS["queue"]).add_request({"url": "http://example.com/", "uniqueKey": "home"})
    assert client.request_queue(DEFAULTS["queue"]).get().total_request_count == 1  # type: ignore[union-attr]
    assert client.dataset(DEFAULTS["dataset"]).get().id == DEFAULTS["dataset"]  # type: ignore[union-attr]
    assert client.key_value_store(DEFAULTS["kv"]).get().id == DEFAULTS["kv"]  # type: ignore[union-attr]
    with pytest.raises(ApifyApiError):  # other unknown queues are still unknown
        client.request_queue("noSuchQueue").list_head()


def test_bad_default_ids_are_refused_at_start(tmp_path: Path) -> None:
    """A default id that cannot name a storage file stops the server before it listens."""
    with (
        pytest.raises(RuntimeError, match="did not start"),
        running_server(tmp_path, extra_args=["--default-dataset-id", "no/slash"]),
    ):
        pass  # pragma: no cover - never reached


def test_every_bad_input_is_a_4xx_envelope(http: httpx.Client, client: ApifyClient) -> None:
    """Bad names, bodies and methods get a 4xx with the error envelope, never a 500."""
    dataset_id = client.datasets().get_or_create(name=_name()).id
    cases = [
        http.post("/v2/datasets", params={"name": "bad_name"}),
        http.post("/v2/key-value-stores", params={"name": "-bad"}),
        http.post("/v2/datasets", content=b"[1]", headers={"Content-Type": "application/json"}),
        http.post("/v2/key-value-stores", content=b"{oops", headers={"Content-Type": "application/json"}),
        http.post(f"/v2/datasets/{dataset_id}/items", content=b"x", headers={"Content-Encoding": "zstd-nope"}),
        http.post(
            f"/v2/datasets/{dataset_id}/items", content=b"\x1f\x8bnot gzip", headers={"Content-Encoding": "gzip"}
        ),
        http.patch(f"/v2/datasets/{dataset_id}"),
        http.get("/v2/datasets/no~such-dataset"),
        http.get("/v2/datasets/has_underscore"),
    ]
    for response in cases:
        assert 400 <= response.status_code < 500, response.text
        assert set(response.json()["error"]) >= {"type", "message"}


@pytest.mark.anyio
@BOTH_STORES
async def test_the_endpoints_never_block_the_event_loop(tmp_path: Path, store: str | None) -> None:
    """Every new endpoint, served in this process under the blocking-call detector, does its file I/O off the loop."""
    app = create_app(tmp_path, defaults=RunDefaults(queue_id="q", dataset_id="d", kv_store_id="k"), queue_dsn=store)
    assert isinstance(app.state.registry, PostgresRegistry) is (store is not None)
    async with serving_app(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        store = (await http.post("/v2/key-value-stores", params={"name": "kv"})).json()["data"]["id"]
        record = f"/v2/key-value-stores/{store}/records/INPUT"
        assert (await http.put(record, json={"a": 1})).status_code == 201
        assert (await http.get(record)).json() == {"a": 1}
        assert (await http.head(record)).status_code == 200
        assert (await http.get(f"/v2/key-value-stores/{store}/keys")).json()["data"]["count"] == 1
        assert (await http.delete(record)).status_code == 204
        assert (await http.get("/v2/key-value-stores/unseen-kv")).status_code == 200
        assert (await http.delete(f"/v2/key-value-stores/{store}")).status_code == 204
        dataset = (await http.post("/v2/datasets", params={"name": "ds"})).json()["data"]["id"]
        assert (await http.post(f"/v2/datasets/{dataset}/items", json=[{"n": 1}, {"n": 2}])).status_code == 201
        for item_format in ("json", "jsonl", "csv"):
            response = await http.get(f"/v2/datasets/{dataset}/items", params={"format": item_format, "desc": 1})
            assert response.status_code == 200
        assert (await http.get(f"/v2/datasets/{dataset}")).json()["data"]["itemCount"] == 2
        assert (await http.delete(f"/v2/datasets/{dataset}")).status_code == 204
        queue = (await http.get("/v2/request-queues/q")).json()["data"]["id"]
        await http.post(f"/v2/request-queues/{queue}/requests", json={"url": "http://a/", "uniqueKey": "a"})
        listed = await http.get(f"/v2/request-queues/{queue}/requests", params={"filter": "pending"})
        assert [item["uniqueKey"] for item in listed.json()["data"]["items"]] == ["a"]
        assert (await http.put("/v2/actor-runs/r", json={"statusMessage": "hi"})).status_code == 200
        assert (await http.get("/v2/actor-runs/r")).json()["data"]["defaultDatasetId"] == "d"
