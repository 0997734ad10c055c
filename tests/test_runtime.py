"""The runtime end to end, in process, on a real SQLite store and a real local site."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import structlog

from handlers import crawl, fetch
from runner import (
    ConfigError,
    Context,
    InvalidUrlError,
    JsonlDataset,
    NoRetry,
    Request,
    RequestDraft,
    Router,
    SqliteQueue,
    Stopper,
    WorkerSettings,
    request_id_for,
    run,
)
from runner.commit import Committer, RetryPolicy
from runner.context import make_draft
from runner.leases import Leases
from runner.metrics import Metrics
from runner.models import utc_now
from runner.results.jsonl import read_items
from runner.stats import RunStats
from tests.conftest import seed

pytestmark = pytest.mark.anyio


def fast(**overrides: object) -> WorkerSettings:
    """Worker settings for tests: no retry backoff, short grace."""
    base: dict[str, object] = {"concurrency": 8, "retry_backoff": 0.0, "grace": 5.0, "handler_timeout": 10.0}
    return WorkerSettings.model_validate(base | overrides)


async def stored_items(dataset: JsonlDataset) -> list[dict[str, Any]]:
    """The dataset's items, read in a worker thread (a file read blocks the event loop)."""
    return await anyio.to_thread.run_sync(read_items, dataset.path)


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_crawl_handles_every_page_exactly_once(
    queue: SqliteQueue, dataset: JsonlDataset, site: str, transport: str
) -> None:
    """A crawl of the 300-page site handles each page once and stores one item per page, on either HTTP engine."""
    with anyio.fail_after(60):
        summary = await run(
            queue,
            crawl.handle,
            dataset,
            workers=fast(concurrency=20, http_transport=transport),
            options={"max_depth": 10},
            start_urls=[f"{site}/page/0"],
        )
    items = await stored_items(dataset)
    urls = Counter(item["url"] for item in items)
    assert len(urls) == 300
    assert max(urls.values()) == 1
    assert {item["status"] for item in items} == {200}
    info = await queue.get_info()
    assert (info.total_request_count, info.handled_request_count, info.pending_request_count) == (300, 300, 0)
    assert summary.reason == "finished"
    assert summary.stats["handled"] == 300
    assert await queue.locks() == []


async def test_failing_twice_then_succeeding_is_handled_with_its_errors(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A handler that fails twice then succeeds ends handled, with retryCount 2 and both errors kept."""
    attempts: Counter[str] = Counter()

    async def flaky(ctx: Context) -> None:
        attempts[ctx.url] += 1
        if attempts[ctx.url] <= 2:
            raise RuntimeError(f"boom {attempts[ctx.url]}")
        await ctx.push_data({"url": ctx.url})

    await seed(queue, ["https://a.example/1"])
    with anyio.fail_after(20):
        summary = await run(queue, flaky, dataset, workers=fast())
    request = await queue.get_request(ONLY_ID)
    assert request is not None
    assert request.handled_at is not None
    assert request.retry_count == 2
    assert request.error_messages == ["RuntimeError: boom 1", "RuntimeError: boom 2"]
    assert summary.stats["handled"] == 1
    assert summary.stats["retried"] == 2
    assert len(await stored_items(dataset)) == 1


ONLY_ID = request_id_for("https://a.example/1")


async def test_always_failing_ends_handled_as_failed(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """After max_retries the request is marked handled as failed and keeps every error message."""

    async def broken(ctx: Context) -> None:
        raise ValueError("nope")

    await seed(queue, ["https://a.example/1"])
    with anyio.fail_after(20):
        summary = await run(queue, broken, dataset, workers=fast(max_retries=2))
    request = await queue.get_request(ONLY_ID)
    assert request is not None
    assert request.handled_at is not None
    assert request.retry_count == 3
    assert request.error_messages == ["ValueError: nope"] * 3
    assert summary.stats["failed"] == 1
    assert await stored_items(dataset) == []


async def test_no_retry_fails_at_once(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """A handler raising NoRetry fails the request on its first attempt."""

    async def refuse(ctx: Context) -> None:
        raise NoRetry("not for us")

    await seed(queue, ["https://a.example/1"])
    with anyio.fail_after(20):
        summary = await run(queue, refuse, dataset, workers=fast())
    request = await queue.get_request(ONLY_ID)
    assert request is not None
    assert request.error_messages == ["NoRetry: not for us"]
    assert summary.stats["failed"] == 1
    assert summary.stats["retried"] == 0


async def test_retry_backoff_holds_the_lock_and_the_run_waits_for_it(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """A retried request stays locked during its backoff, and the run does not finish before it is retried."""
    attempts: Counter[str] = Counter()

    async def once_failing(ctx: Context) -> None:
        attempts[ctx.url] += 1
        if attempts[ctx.url] == 1:
            raise RuntimeError("first")

    await seed(queue, ["https://a.example/1"])
    with anyio.fail_after(20):
        summary = await run(queue, once_failing, dataset, workers=fast(retry_backoff=0.5))
    assert attempts["https://a.example/1"] == 2
    assert summary.stats["handled"] == 1


async def test_timeouts_garbage_and_errors_do_not_stop_the_pool(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """A hanging handler times out and is retried; one returning garbage still counts as handled.

    A TimeoutError the handler raises itself is recorded as that error, not as the runtime's handler timeout.
    """

    async def misbehave(ctx: Context) -> object:
        if ctx.url.endswith("/hang") and ctx.retry_count == 0:
            await anyio.sleep(60)
        if ctx.url.endswith("/garbage"):
            return {"not": "None"}
        if ctx.url.endswith("/error"):
            raise KeyError("missing")
        if ctx.url.endswith("/own-timeout") and ctx.retry_count == 0:
            raise TimeoutError("upstream took too long")  # the handler's own timeout, not the runtime's
        return None

    await seed(queue, [f"https://a.example/{n}" for n in ("hang", "garbage", "error", "fine", "own-timeout")])
    with structlog.testing.capture_logs() as logs, anyio.fail_after(30):
        summary = await run(
            queue,
            misbehave,
            dataset,
            workers=fast(handler_timeout=0.5, max_retries=1),  # type: ignore[arg-type]
        )
    assert summary.stats["handled"] == 4  # hang and own-timeout (second attempts), garbage, fine
    assert summary.stats["failed"] == 1  # error, after one retry
    hang = await queue.get_request(request_id_for("https://a.example/hang"))
    assert hang is not None
    assert hang.error_messages == ["handler timed out after 0.5 s"]
    own = await queue.get_request(request_id_for("https://a.example/own-timeout"))
    assert own is not None
    assert own.error_messages == ["TimeoutError: upstream took too long"]
    assert any(e["event"] == "handler.returned_value" for e in logs)


async def test_enqueues_and_items_of_a_failed_attempt_are_not_committed(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """Results and links of a failed attempt are dropped; only the successful attempt's are committed."""

    async def handler(ctx: Context) -> None:
        if ctx.url.endswith("/start"):
            await ctx.enqueue(f"https://a.example/from-attempt-{ctx.retry_count}")
            await ctx.push_data({"attempt": ctx.retry_count})
            if ctx.retry_count == 0:
                raise RuntimeError("first attempt fails after enqueueing")

    await seed(queue, ["https://a.example/start"])
    with anyio.fail_after(20):
        await run(queue, handler, dataset, workers=fast())
    info = await queue.get_info()
    assert info.total_request_count == 2
    assert await stored_items(dataset) == [{"attempt": 1}]
    assert await queue.get_request(request_id_for("https://a.example/from-attempt-0")) is None
    assert await queue.get_request(request_id_for("https://a.example/from-attempt-1")) is not None


async def test_a_handler_enqueueing_ten_thousand_links(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """10,000 links from one handler are added in batches and then all handled."""

    async def fan_out(ctx: Context) -> None:
        if ctx.url.endswith("/root"):
            await ctx.enqueue([f"https://a.example/leaf/{i}" for i in range(10_000)])

    await seed(queue, ["https://a.example/root"])
    with anyio.fail_after(120):
        summary = await run(queue, fan_out, dataset, workers=fast(concurrency=50))
    info = await queue.get_info()
    assert (info.total_request_count, info.handled_request_count) == (10_001, 10_001)
    assert summary.stats["enqueued"] == 10_000


async def test_lost_lease_cancels_the_handler_and_the_new_holder_wins(
    storage: Path, queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A lock taken away behind the worker's back cancels its handler; it is not marked; the new holder's stands."""
    started = anyio.Event()
    finished_normally = []

    async def blocking(ctx: Context) -> None:
        started.set()
        await anyio.sleep(30)
        finished_normally.append(ctx.url)

    await seed(queue, ["https://a.example/1"])
    thief = SqliteQueue.open(storage, "default")
    stopper = Stopper()

    async def steal() -> None:
        await started.wait()
        # Behind the worker's back: its locks are released (as a restart with its key would) and retaken.
        await thief.unlock_requests(client_key="victim")
        head = await thief.lock_head(limit=1, lock_secs=30, client_key="thief")
        assert [r.url for r in head.items] == ["https://a.example/1"]
        await thief.update_request(
            head.items[0].model_copy(update={"handled_at": utc_now()}),
            client_key="thief",
        )

    with structlog.testing.capture_logs() as logs, anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(steal)
            summary = await run(
                queue, blocking, dataset, workers=fast(client_key="victim", lock_secs=1.0), stopper=stopper
            )
    await thief.aclose()
    assert finished_normally == []
    assert any(e["event"] == "lease.lost" for e in logs)
    assert summary.stats["lost"] == 1
    assert summary.stats["handled"] == 0
    info = await queue.get_info()
    assert info.handled_request_count == 1


async def test_graceful_stop_gives_back_prefetched_and_finishes_in_flight(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """On stop, prefetched requests are released at once, in-flight ones finish, and no lock is left."""
    in_flight = 0
    all_started = anyio.Event()
    release = anyio.Event()

    async def handler(ctx: Context) -> None:
        nonlocal in_flight
        in_flight += 1
        if in_flight == 4:
            all_started.set()
        await release.wait()
        await ctx.push_data({"url": ctx.url})

    await seed(queue, [f"https://a.example/{i}" for i in range(40)])
    stopper = Stopper()

    async def stop_when_busy() -> None:
        await all_started.wait()
        stopper.stop("test")
        release.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_when_busy)
            summary = await run(queue, handler, dataset, workers=fast(concurrency=4, prefetch=10), stopper=stopper)
    assert summary.reason == "test"
    assert summary.stats["handled"] == 4
    assert summary.stats["given_back"] == 10
    assert await queue.locks() == []
    assert (await queue.get_info()).handled_request_count == 4


async def test_router_dispatches_on_label(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """The router calls the handler of each request's label and fails unknown labels without retrying."""
    router = Router()
    seen: list[tuple[str, str | None]] = []

    @router.route("detail")
    async def detail(ctx: Context) -> None:
        seen.append(("detail", ctx.label))

    await queue.batch_add(
        [
            RequestDraft(unique_key="d", url="https://a.example/d", user_data={"label": "detail"}),
            RequestDraft(unique_key="x", url="https://a.example/x", user_data={"label": "unknown"}),
        ],
        client_key="seeder",
    )
    with anyio.fail_after(20):
        summary = await run(queue, router, dataset, workers=fast())
    assert seen == [("detail", "detail")]
    assert summary.stats["failed"] == 1


async def test_enqueue_refuses_non_http_urls(queue: SqliteQueue) -> None:
    """ctx.enqueue raises InvalidUrlError for relative, file:// and ftp:// URLs, and http(s) URLs with no host."""
    ctx = Context(
        Request(id="x", unique_key="x", url="https://a.example/"),
        http=httpx.AsyncClient(),
        log=structlog.get_logger(),
        options={},
    )
    for bad in ("/relative", "file:///etc/passwd", "ftp://a.example/f", "not a url", "http://:80/x", "http://u@/x"):
        with pytest.raises(InvalidUrlError):
            await ctx.enqueue(bad)
    await ctx.http.aclose()


async def test_enqueue_counts_known_links_but_sends_only_new_ones() -> None:
    """Links already in the queue (`known`) are counted as enqueued here but carry no draft; bad URLs still raise."""
    ctx = Context(
        Request(id="x", unique_key="x", url="https://a.example/"),
        http=httpx.AsyncClient(),
        log=structlog.get_logger(),
        options={},
        known={"https://a.example/old", "not-a-url"},
    )
    try:
        links = ["https://A.example/old/", "https://a.example/new#top", "https://a.example/new"]
        assert await ctx.enqueue(links, label="detail") == 2
        pending = ctx.pending_enqueues()
        assert list(pending) == [False]
        assert [(d.unique_key, d.user_data) for d in pending[False]] == [("https://a.example/new", {"label": "detail"})]
        with pytest.raises(InvalidUrlError):
            await ctx.enqueue("not-a-url")  # even when its key is known
    finally:
        await ctx.http.aclose()


async def test_fetch_handler_refuses_non_http_urls_without_retrying(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """file:// and ftp:// requests already in the queue fail at once with a clear error, without retries."""
    await queue.batch_add(
        [RequestDraft(unique_key=u, url=u) for u in ("file:///etc/passwd", "ftp://a.example/f")],
        client_key="seeder",
    )
    with anyio.fail_after(20):
        summary = await run(queue, fetch.handle, dataset, workers=fast())
    assert summary.stats["failed"] == 2
    assert summary.stats["retried"] == 0
    stored = await queue.get_request(request_id_for("file:///etc/passwd"))
    assert stored is not None
    assert stored.error_messages == ["NoRetry: unsupported URL scheme 'file': only http and https are fetched"]
    assert await stored_items(dataset) == []


class CountingMetrics(Metrics):
    """A metrics observer that counts store operations by endpoint."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def queue_call(self, backend: str, endpoint: str, status: str, seconds: float) -> None:
        self.calls[endpoint] += 1


async def test_adds_of_concurrent_commits_share_batches(storage: Path, dataset: JsonlDataset) -> None:
    """Ten requests committing links at once need 3 batch calls, not 10; shared links count once."""
    metrics = CountingMetrics()
    queue = SqliteQueue.open(storage, "shared", metrics=metrics)
    committer = Committer(queue, Leases(), dataset, RunStats(), client_key="k", policy=RetryPolicy())
    added: list[int] = []

    async def commit(page: int) -> None:
        links = [f"https://a.example/{page}/{i}" for i in range(3)] + [
            "https://a.example/home",
            "https://a.example/about",
        ]
        added.append(await committer.add([make_draft(url) for url in links]))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for page in range(10):
                tg.start_soon(commit, page)
    await queue.aclose()
    assert sum(added) == 32  # 30 page links + home + about, each counted once
    check = SqliteQueue.open(storage, "shared")
    assert (await check.get_info()).total_request_count == 32
    await check.aclose()
    batch_calls = sum(n for endpoint, n in metrics.calls.items() if "batch" in endpoint)
    assert batch_calls <= 3  # the first caller alone, then the nine that waited (27 fresh links: two chunks of 25)


async def test_waiting_on_leases_with_a_condition_wakes_at_the_first_removal_that_meets_it() -> None:
    """`wait_changed(until=...)` sleeps through removals that leave the condition false (the fetcher's wake-ups)."""
    leases = Leases()
    held = [leases.add(Request(id=f"r{i}", unique_key=f"k{i}", url="https://a.example/"), 1e9) for i in range(3)]
    checks: list[int] = []
    woken = anyio.Event()

    def at_most_one() -> bool:
        checks.append(len(leases))
        return len(leases) <= 1

    async def wait() -> None:
        await leases.wait_changed(until=at_most_one)
        woken.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            leases.remove(held[0])
            await anyio.wait_all_tasks_blocked()
            assert not woken.is_set()
            leases.remove(held[1])
            await woken.wait()
    assert checks == [2, 1]
    leases.remove(held[2])  # nobody waits any more: nothing to check
    assert checks == [2, 1]


async def test_aiohttp_transport_without_its_extra_is_a_config_error_before_anything_is_locked(
    queue: SqliteQueue, dataset: JsonlDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`http_transport = "aiohttp"` with httpx-aiohttp missing (a broken install) names the setting, what to install
    and the other engine."""
    await seed(queue, ["https://a.example/1"])
    monkeypatch.setitem(sys.modules, "httpx_aiohttp", None)  # what a missing package looks like to `import`
    monkeypatch.delitem(sys.modules, "runner.http", raising=False)  # imported afresh, so it meets the missing one
    with pytest.raises(ConfigError, match=r"workers\.http_transport.*pip install httpx-aiohttp.*'httpx'"):
        await run(queue, crawl.handle, dataset, workers=fast(http_transport="aiohttp"))
    assert await queue.locks() == []
    assert (await queue.get_info()).pending_request_count == 1


async def test_a_timed_out_attempt_is_recorded_under_its_request_and_attempt(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """An attempt its timeout cut ends after the worker's cancel scope (`Worker._end_cut`): what its end logs still
    names the request, its URL and the attempt's number."""
    seen: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(event))
        raise structlog.DropEvent

    async def slow_once(ctx: Context) -> None:
        if ctx.retry_count == 0:
            await anyio.sleep(30)

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, keep])
    try:
        await seed(queue, ["https://a.example/1"])
        with anyio.fail_after(20):
            await run(queue, slow_once, dataset, workers=fast(handler_timeout=0.2))
    finally:
        structlog.reset_defaults()
    retry = [event for event in seen if event["event"] == "request.retry"]
    assert [(e["request_id"], e["url"], e["attempt"], e["error"]) for e in retry] == [
        (ONLY_ID, "https://a.example/1", 1, "handler timed out after 0.2 s"),
    ]


async def test_a_handlers_log_lines_carry_its_request_and_attempt(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """Every event logged during an attempt (the handler's own through `ctx.log`) names the request, its URL and
    the attempt's number; none of it leaks into what is logged after the attempt."""
    seen: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(event))
        raise structlog.DropEvent

    async def flaky(ctx: Context) -> None:
        ctx.log.info("handler.looked", tries=ctx.retry_count)
        if ctx.retry_count == 0:
            raise RuntimeError("once")

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, keep])
    try:
        await seed(queue, ["https://a.example/1"])
        with anyio.fail_after(20):
            await run(queue, flaky, dataset, workers=fast())
        structlog.get_logger("after").info("after.run")
    finally:
        structlog.reset_defaults()
    looked = [event for event in seen if event["event"] == "handler.looked"]
    assert [(e["request_id"], e["url"], e["attempt"], e["tries"]) for e in looked] == [
        (ONLY_ID, "https://a.example/1", 1, 0),
        (ONLY_ID, "https://a.example/1", 2, 1),
    ]
    after = next(event for event in seen if event["event"] == "after.run")
    assert not {"request_id", "url", "attempt"} & after.keys()
