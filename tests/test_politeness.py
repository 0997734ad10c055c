"""Per-host politeness of the shared client, end to end: `run()` with the ready crawl handler on a real SQLite queue
against a local multi-host site (tests/_politesite.py) that records what each host saw."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from handlers import crawl
from runner import Handler, JsonlDataset, SqliteQueue, Stopper, WorkerSettings, run
from runner.politeness import default_user_agent
from runner.results.jsonl import read_items
from runner.runtime import RunSummary
from runner.settings import PolitenessSettings
from tests._politesite import HostLog, HostSpec, Reply, Site, open_site

pytestmark = pytest.mark.anyio

ENGINES = ["aiohttp", "httpx"]
progress: list[Mapping[str, Any]] = []
"""The last crawl's progress reports."""


def workers(**overrides: Any) -> WorkerSettings:
    """Worker settings for these crawls: small retry backoff, short grace."""
    base: dict[str, Any] = {"concurrency": 8, "retry_backoff": 0.1, "grace": 5.0, "handler_timeout": 20.0}
    return WorkerSettings.model_validate(base | overrides)


async def crawl_site(
    storage: Path,
    site: Site,
    hosts: list[str],
    *,
    cfg: WorkerSettings,
    politeness: PolitenessSettings,
    handler: Handler = crawl.handle,
    start_urls: list[str] | None = None,
    **extra: Any,
) -> tuple[RunSummary, list[dict[str, Any]], SqliteQueue]:
    """Crawl the hosts' `/page/0` (or `start_urls`) with `handler` (`handlers.crawl`, one level deep); `extra` goes
    to `run()`. Return the summary, the items and the (open) queue."""
    queue = await anyio.to_thread.run_sync(SqliteQueue.open, storage, "default")
    dataset = await anyio.to_thread.run_sync(JsonlDataset.open, storage, "default")
    progress.clear()
    options: dict[str, Any] = {"options": {"max_depth": 1}, "progress_every": 0.2, "progress_hook": progress.append}
    try:
        summary = await run(
            queue,
            handler,
            dataset,
            workers=cfg,
            start_urls=start_urls or [f"{site.url(name)}/page/0" for name in hosts],
            politeness=politeness,
            **(options | extra),
        )
    finally:
        dataset.close()
    items = await anyio.to_thread.run_sync(read_items, dataset.path)
    return summary, items, queue


def assert_each_page_once(items: list[dict[str, Any]], site: Site, hosts: list[str]) -> None:
    """Every page of `hosts` stored exactly once, with status 200."""
    urls = Counter(item["url"] for item in items)
    assert set(urls) == {url for name in hosts for url in site.page_urls(name)}
    assert max(urls.values()) == 1
    assert {item["status"] for item in items} == {200}


@pytest.mark.parametrize("engine", ENGINES)
async def test_no_host_sees_more_than_per_host_concurrency_in_flight(storage: Path, engine: str) -> None:
    """With per_host_concurrency = 2 and 10 workers, neither of two hosts ever has more than 2 requests in flight."""
    specs = {"a": HostSpec(pages=24, latency=0.03), "b": HostSpec(pages=24, latency=0.03)}
    async with open_site(specs) as site:
        with anyio.fail_after(60):
            summary, items, queue = await crawl_site(
                storage,
                site,
                ["a", "b"],
                cfg=workers(concurrency=10, http_transport=engine),
                politeness=PolitenessSettings(per_host_concurrency=2),
            )
        await queue.aclose()
    assert_each_page_once(items, site, ["a", "b"])
    assert site.log("a").max_in_flight == 2
    assert site.log("b").max_in_flight == 2
    assert summary.stats["handled"] == 48


async def test_starts_to_one_host_are_per_host_delay_apart(storage: Path) -> None:
    """With per_host_delay = 0.2, no two page requests arrive at one host closer than 0.2 s (less 10 ms of loopback
    and scheduling jitter between sending and arrival), while two hosts are crawled side by side."""
    specs = {"a": HostSpec(pages=6), "b": HostSpec(pages=6)}
    async with open_site(specs) as site:
        with anyio.fail_after(60):
            _, items, queue = await crawl_site(
                storage, site, ["a", "b"], cfg=workers(), politeness=PolitenessSettings(per_host_delay=0.2)
            )
        await queue.aclose()
    assert_each_page_once(items, site, ["a", "b"])
    for name in ("a", "b"):
        assert site.log(name).min_gap() >= 0.19, site.log(name).starts()
    # Side by side: the hosts' crawls overlap instead of one waiting for the other's delays.
    a, b = site.log("a").starts(), site.log("b").starts()
    assert max(a[0], b[0]) < min(a[-1], b[-1])


class TooManyOnce:
    """429 with Retry-After: 2 for the first request to page 1 (remembering when it answered); else the default."""

    def __init__(self) -> None:
        self.answered_at: float | None = None

    def __call__(self, path: str, log: HostLog) -> Reply | None:
        if path == "/page/1" and self.answered_at is None:
            self.answered_at = anyio.current_time()
            return 429, {"Retry-After": "2"}, b"slow down"
        return None


@pytest.mark.slow
async def test_a_429_with_retry_after_blocks_its_host_only(storage: Path) -> None:
    """A host answering 429 with Retry-After: 2 gets no request for 2 s, while another host is crawled at full speed
    meanwhile; the 429'd page is retried and every page ends handled once."""
    throttle = TooManyOnce()
    specs = {
        "slow": HostSpec(pages=8, latency=0.02, respond=throttle),
        "fast": HostSpec(pages=40, latency=0.02),
    }
    async with open_site(specs) as site:
        with anyio.fail_after(60):
            summary, items, queue = await crawl_site(
                storage, site, ["slow", "fast"], cfg=workers(concurrency=4), politeness=PolitenessSettings()
            )
        await queue.aclose()
    assert_each_page_once(items, site, ["slow", "fast"])
    refused_at = throttle.answered_at
    assert refused_at is not None
    after = [at for at in site.log("slow").starts() if at > refused_at]
    assert after, "the throttled host was never asked again"
    assert min(after) - refused_at >= 2.0 - 0.02  # the server's arrival clock vs the client's start clock
    fast = [at for at in site.log("fast").starts() if refused_at < at < refused_at + 2.0]
    assert len(fast) >= 30  # the other host's 39 linked pages, not held up by the throttled one
    assert summary.stats["retried"] == 1
    assert summary.stats["failed"] == 0
    assert max(report["hosts_throttled"] for report in progress) == 1  # the progress line shows it


@pytest.mark.slow
async def test_a_hard_throttled_host_does_not_starve_the_others(storage: Path) -> None:
    """Two workers, one host limited to 1 request every 0.6 s: the other host's 40 pages finish within 1 s of its
    start page instead of waiting behind the throttled host's pages; the throttled host's requests were given back
    (not counted as attempts: no retry), came back, and every page is handled exactly once."""
    specs = {"hard": HostSpec(pages=6), "free": HostSpec(pages=40, latency=0.005)}
    async with open_site(specs) as site:
        politeness = PolitenessSettings(hosts={site.url("hard"): {"per_host_concurrency": 1, "per_host_delay": 0.6}})
        with anyio.fail_after(60):
            summary, items, queue = await crawl_site(
                storage, site, ["hard", "free"], cfg=workers(concurrency=2), politeness=politeness
            )
        info = await queue.get_info()
        await queue.aclose()
    assert_each_page_once(items, site, ["hard", "free"])
    free = site.log("free").starts()
    assert free[-1] - free[0] < 1.0, f"the free host took {free[-1] - free[0]:.2f} s"
    assert site.log("hard").min_gap() >= 0.59
    assert summary.stats["retried"] == 0
    assert summary.stats["failed"] == 0
    assert max(report["deferred"] for report in progress) > 0
    assert (info.handled_request_count, info.pending_request_count) == (46, 0)


async def test_every_request_carries_the_user_agent(storage: Path) -> None:
    """The shared client sends `user_agent` (default `headlock/<version> (+URL)`) on pages and robots.txt alike."""
    specs = {"a": HostSpec(pages=3)}
    async with open_site(specs) as site:
        with anyio.fail_after(30):
            _, _, queue = await crawl_site(storage, site, ["a"], cfg=workers(), politeness=PolitenessSettings())
        await queue.aclose()
    agents = {agent for _, _, agent in site.log("a").hits}
    assert agents == {default_user_agent()}
    assert "/robots.txt" in site.log("a").paths()
    assert default_user_agent().startswith("headlock/")


async def test_a_stop_frees_the_locks_of_requests_given_back(storage: Path) -> None:
    """Stopped while requests given back for a busy host wait out their lock, the run frees those locks too: nothing
    is left locked, nothing was counted as an attempt, and the unhandled pages are pending for the next run."""
    specs = {"hard": HostSpec(pages=6), "free": HostSpec(pages=4)}
    stopper = Stopper()

    def stop_once_deferred(report: Mapping[str, Any]) -> None:
        if report["deferred"]:
            stopper.stop("test")

    async with open_site(specs) as site:
        politeness = PolitenessSettings(hosts={site.url("hard"): {"per_host_concurrency": 1, "per_host_delay": 5}})
        with anyio.fail_after(30):
            summary, _, queue = await crawl_site(
                storage,
                site,
                ["hard", "free"],
                cfg=workers(concurrency=2),
                politeness=politeness,
                stopper=stopper,
                progress_every=0.1,
                progress_hook=stop_once_deferred,
            )
        try:
            info = await queue.get_info()
            assert await queue.locks() == []
        finally:
            await queue.aclose()
    assert summary.reason == "test"
    assert summary.stats["retried"] == summary.stats["failed"] == 0
    assert info.total_request_count == 10
    assert info.pending_request_count == 10 - info.handled_request_count > 0
