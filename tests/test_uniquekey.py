"""Default unique keys under each convention, checked against the conventions' own published behaviour.

The vectors live in tests/data/uniquekeys/: the libraries' own unit-test vectors (ported, with their source) and the
keys crawlee-python and Crawlee JS computed for a list of tricky URLs (generate.py there regenerates them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog

from runner import Context, InvalidUrlError, JsonlDataset, Request, RequestDraft, SqliteQueue
from runner.commit import Committer, RetryPolicy
from runner.context import make_draft
from runner.errors import ConfigError
from runner.handoff import Handoff
from runner.leases import Lease, Leases
from runner.stats import RunStats
from runner.uniquekey import KeyConvention, normalize_parts, normalize_url, request_id_for, unique_key_function
from runner.worker import Worker

DATA = Path(__file__).parent / "data" / "uniquekeys"
LIBRARIES: tuple[KeyConvention, ...] = ("crawlee-python", "crawlee-js")


def _load(name: str) -> dict[str, Any]:
    """One data file."""
    document: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return document


PORTED = [_load("crawlee_python_tests.json"), _load("apify_utilities_tests.json")]
GENERATED = _load("generated.json")
CASES: list[dict[str, Any]] = GENERATED["cases"]
# Where the generated key is not what the convention gives here, and why; a test checks each one still holds.
KNOWN_DIVERGENCES: dict[tuple[str, str], tuple[str, str]] = {
    ("crawlee-js", "https://example.com/a/.well-known/../b"): (
        "https://example.com/a/b",
        "Node 20's URL parser (Ada 2.9) leaves the path as is when a dot-file segment comes before the first dot "
        "segment (ada-url/ada#935, fixed in Ada 3.2.3); the WHATWG spec and newer Node resolve it, as here",
    ),
}


@pytest.mark.parametrize(
    ("convention", "url", "key"),
    [(doc["convention"], v["url"], v["key"]) for doc in PORTED for v in doc["vectors"]],
    ids=[f"{doc['convention']}:{v['name']}:{v['url']}" for doc in PORTED for v in doc["vectors"]],
)
def test_the_libraries_own_test_vectors(convention: KeyConvention, url: str, key: str) -> None:
    """Each convention gives the keys its library's own unit tests expect."""
    assert normalize_url(url, convention) == key


GENERATED_KEYS = [
    (convention, case["url"], case[convention])
    for case in CASES
    for convention in LIBRARIES
    if isinstance(case[convention], str) and (convention, case["url"]) not in KNOWN_DIVERGENCES
]


@pytest.mark.parametrize(
    ("convention", "url", "key"),
    GENERATED_KEYS,
    ids=[f"{convention}:{url!r}" for convention, url, _ in GENERATED_KEYS],
)
def test_the_keys_the_libraries_computed(convention: KeyConvention, url: str, key: str) -> None:
    """Each crawlee convention gives the key its library computed for the URL (generated.json)."""
    assert normalize_url(url, convention) == key


def test_the_generated_data_covers_both_libraries() -> None:
    """generated.json has the tricky URLs with a key (or a refusal) from both libraries and their versions."""
    assert len(CASES) >= 40
    assert {"crawlee-python", "crawlee-js"} <= GENERATED["versions"].keys()
    assert all({"url", "kind", "crawlee-python", "crawlee-js", "headlock"} <= case.keys() for case in CASES)
    refused = [case for case in CASES for convention in LIBRARIES if not isinstance(case[convention], str)]
    assert len(refused) <= 5  # a few URLs the library cannot make a request of; the rest are keys


@pytest.mark.parametrize(("convention", "url"), list(KNOWN_DIVERGENCES))
def test_each_known_divergence_still_holds(convention: KeyConvention, url: str) -> None:
    """A listed divergence is still in the data (drop it when a regeneration no longer shows it)."""
    ours, _why = KNOWN_DIVERGENCES[convention, url]
    (case,) = [case for case in CASES if case["url"] == url]
    assert normalize_url(url, convention) == ours != case[convention]


@pytest.mark.parametrize("url", [case["url"] for case in CASES if any(not isinstance(case[c], str) for c in LIBRARIES)])
def test_a_url_a_library_cannot_request_still_gets_a_key(url: str) -> None:
    """A URL crawlee-python refuses to make a Request of still gets a key under every convention, no error."""
    for convention in ("headlock", *LIBRARIES):
        assert isinstance(normalize_url(url, convention), str)


@pytest.mark.parametrize("case", CASES, ids=[case["url"] for case in CASES])
def test_the_headlock_convention_is_unchanged(case: dict[str, Any]) -> None:
    """The default convention still gives what it gave when the data was generated."""
    assert normalize_url(case["url"]) == normalize_url(case["url"], "headlock") == case["headlock"]


def test_the_conventions_disagree_where_the_notes_say() -> None:
    """crawlee-python lower-cases path and query and keeps `/?`; Crawlee JS keeps their case, as headlock does."""
    url = "https://Example.com/A/./B/?Q=1&b=2&b=1"
    assert normalize_url(url, "headlock") == "https://example.com/A/./B?Q=1&b=2&b=1"
    assert normalize_url(url, "crawlee-js") == "https://example.com/A/B?Q=1&b=2&b=1"
    # It sorts before it lower-cases: `Q` comes before `b`.
    assert normalize_url(url, "crawlee-python") == "https://example.com/a/b?q=1&b=1&b=2"
    assert normalize_url("https://example.com/?b=1", "crawlee-python") == "https://example.com/?b=1"


def test_the_headlock_convention_is_normalize_parts_itself() -> None:
    """unique_key_function("headlock") is the fast path that every found link goes through, not a wrapper."""
    assert unique_key_function("headlock") is normalize_parts


def test_an_unknown_convention_is_a_config_error_naming_the_setting_and_the_choices() -> None:
    """A convention that does not exist is refused with the setting's name and the allowed values."""
    with pytest.raises(ConfigError, match=r"'crawlee' \(queue\.unique_keys\): must be one of headlock, crawlee-py"):
        unique_key_function("crawlee")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown uniqueKey convention"):
        normalize_url("https://example.com", "Crawlee-JS")  # type: ignore[arg-type]


def test_make_draft_keys_by_the_key_function_given() -> None:
    """make_draft's default key is key_function of the URL (headlock's by default); an explicit key wins."""
    crawlee_python = unique_key_function("crawlee-python")
    assert make_draft("https://Example.com/A/").unique_key == "https://example.com/A"
    assert make_draft("https://Example.com/A/", key_function=crawlee_python).unique_key == "https://example.com/a"
    assert make_draft("https://Example.com/A/", unique_key="k", key_function=crawlee_python).unique_key == "k"


def test_a_url_urlsplit_refuses_is_an_invalid_url_error() -> None:
    """A URL that cannot even be split (an unclosed IPv6 bracket) is an InvalidUrlError naming it."""
    with pytest.raises(InvalidUrlError, match=r"'http://\[::1/a'"):
        make_draft("http://[::1/a")


def _context(unique_key: Any = None, known: frozenset[str] = frozenset()) -> tuple[Context, httpx.AsyncClient]:
    """A Context for a made-up request, with `unique_key` as its key function when given."""
    http = httpx.AsyncClient()
    request = Request(id="r", unique_key="https://example.com", url="https://example.com")
    extra = {} if unique_key is None else {"unique_key": unique_key}
    log = structlog.get_logger("test")
    return Context(request, http=http, log=log, options={}, known=known, **extra), http


@pytest.mark.anyio
async def test_enqueue_keys_and_deduplicates_by_the_contexts_convention() -> None:
    """URLs that one key under the context's convention are one request; a key already known is not sent again."""
    urls = ["https://example.com/A", "https://example.com/a/", "https://EXAMPLE.com/Seen?utm_source=x"]
    ctx, http = _context(unique_key_function("crawlee-python"), known=frozenset({"https://example.com/seen"}))
    async with http:
        assert await ctx.enqueue(urls) == 2
        with pytest.raises(InvalidUrlError):
            await ctx.enqueue("http://[::1/a")
    assert ctx.pending_enqueues() == {
        False: [RequestDraft(unique_key="https://example.com/a", url="https://example.com/A", user_data={})]
    }
    ctx, http = _context()  # headlock's: path case matters, so three requests
    async with http:
        assert await ctx.enqueue(urls) == 3


@pytest.fixture
async def queue(storage: Path):  # type: ignore[no-untyped-def]
    """An embedded queue in a fresh storage dir."""
    q = SqliteQueue.open(storage, "default")
    yield q
    await q.aclose()


@pytest.fixture
def dataset(storage: Path):  # type: ignore[no-untyped-def]
    """The default dataset in the fresh storage dir."""
    ds = JsonlDataset.open(storage, "default")
    yield ds
    ds.close()


@pytest.mark.anyio
@pytest.mark.parametrize("convention", ["headlock", "crawlee-python", "crawlee-js"])
async def test_a_worker_enqueues_links_under_its_convention(
    queue: SqliteQueue, dataset: JsonlDataset, convention: KeyConvention
) -> None:
    """The worker hands its key function to each handler's context: the links land in the queue under its keys."""
    link = "https://a.example/Child/./x/?b=2&a=1"

    async def handle(ctx: Context) -> None:
        await ctx.enqueue(link)

    url = "https://a.example/start"
    await queue.batch_add([RequestDraft(unique_key=url, url=url)], client_key="seeder")
    head = await queue.lock_head(limit=1, lock_secs=30, client_key="k")
    leases, stats = Leases(), RunStats()
    committer = Committer(queue, leases, dataset, stats, client_key="k", policy=RetryPolicy())
    handoff = Handoff[Lease]()
    handoff.put(leases.add(head.items[0], anyio.current_time() + 30))
    handoff.end()
    key = normalize_url(link, convention)
    with anyio.fail_after(10):
        async with httpx.AsyncClient() as http:
            await Worker(handle, committer, http, {}, 10.0, unique_key=unique_key_function(convention)).run(handoff)
    added = await queue.get_request(request_id_for(key))
    assert added is not None
    assert (added.unique_key, added.url) == (key, link)


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("http://user:pw@Example.com:80/a", "http://user:pw@example.com/a"),
        ("http://[::1]:80/x/", "http://[::1]/x"),
        ("http://example.com:65536/x", "http://example.com:65536/x"),
        ("http://example.com:443/x", "http://example.com:443/x"),
        ("https://example.com:443/x", "https://example.com/x"),
        ("http://example.com:0080/p", "http://example.com/p"),
        ("http://example.com/a b/ü/%7e", "http://example.com/a%20b/%C3%BC/%7e"),
        ("http://example.com:/x", "http://example.com:/x"),
        ("http://a:b:c/x", "http://a:b:c/x"),
    ],
)
def test_the_headlock_conventions_shortcuts_give_the_standard_librarys_answer(url: str, key: str) -> None:
    """Ports, user info, brackets and paths that the fast paths of `normalize_parts` leave to the standard library
    (or take themselves) come out as `SplitResult.port`, `quote` and `urlunsplit` make them."""
    assert normalize_url(url) == key
