"""robots.txt through the shared client: rules, Crawl-delay, 4xx and 5xx answers, redirects, truncation, the switch."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from handlers import fetch
from runner import request_id_for
from runner.politeness import MAX_ROBOTS_BYTES
from runner.settings import PolitenessSettings
from tests._politesite import HostLog, HostSpec, Reply, open_site
from tests.test_politeness import assert_each_page_once, crawl_site, workers

pytestmark = pytest.mark.anyio


def robots(text: str, status: int = 200) -> Reply:
    """A robots.txt answer."""
    return status, {"Content-Type": "text/plain"}, text.encode()


async def test_disallowed_pages_fail_unfetched_and_the_rest_are_crawled(storage: Path) -> None:
    """Pages robots.txt disallows for our User-Agent end failed as NoRetry "disallowed by robots.txt", without a
    request; a rule for another agent does not apply to us."""
    rules = "User-agent: otherbot\nDisallow: /\n\nUser-agent: headlock\nDisallow: /page/3\nDisallow: /page/4\n"
    async with open_site({"a": HostSpec(pages=6, robots=robots(rules))}) as site:
        with anyio.fail_after(30):
            summary, items, queue = await crawl_site(
                storage, site, ["a"], cfg=workers(), politeness=PolitenessSettings()
            )
        refused = await queue.get_request(request_id_for(f"{site.url('a')}/page/3"))
        await queue.aclose()
    assert summary.stats["failed"] == 2
    assert summary.stats["retried"] == 0
    assert {item["url"].rsplit("/", 1)[1] for item in items} == {"0", "1", "2", "5"}
    paths = site.log("a").paths()
    assert "/page/3" not in paths
    assert "/page/4" not in paths
    assert paths.count("/robots.txt") == 1  # fetched once for the host, then cached
    assert refused is not None
    assert refused.retry_count == 1
    assert refused.error_messages == [f"NoRetry: disallowed by robots.txt: {site.url('a')}/page/3"]


async def test_crawl_delay_paces_the_host(storage: Path) -> None:
    """A Crawl-delay of 0.3 s for every agent spaces the page requests to that host by 0.3 s."""
    async with open_site({"a": HostSpec(pages=4, robots=robots("User-agent: *\nCrawl-delay: 0.3\n"))}) as site:
        with anyio.fail_after(30):
            _, items, queue = await crawl_site(storage, site, ["a"], cfg=workers(), politeness=PolitenessSettings())
        await queue.aclose()
    assert_each_page_once(items, site, ["a"])
    assert site.log("a").min_gap() >= 0.29


async def test_a_404_robots_txt_allows_everything(storage: Path) -> None:
    """No robots.txt (404) means no rules: every page is crawled."""
    async with open_site({"a": HostSpec(pages=5, robots=robots("nothing here", status=404))}) as site:
        with anyio.fail_after(30):
            summary, items, queue = await crawl_site(
                storage, site, ["a"], cfg=workers(), politeness=PolitenessSettings()
            )
        await queue.aclose()
    assert_each_page_once(items, site, ["a"])
    assert summary.stats["failed"] == summary.stats["retried"] == 0


async def test_a_503_robots_txt_means_retry_later(storage: Path) -> None:
    """A 503 robots.txt fails the attempt with an error saying so (not fetching the page); the request is retried
    per policy, robots.txt is asked again, and the crawl completes."""
    spec = HostSpec(pages=3, robots=robots("busy", status=503))
    async with open_site({"a": spec}) as site:
        async with anyio.create_task_group() as tg:

            async def heal() -> None:
                # The page request fails on the 503; the next attempt (>= 1.1 s later) must find robots.txt healed.
                with anyio.fail_after(10):
                    await site.log("a").wait_until(lambda: "/robots.txt" in site.log("a").paths())
                spec.robots = robots("User-agent: *\nAllow: /\n")

            tg.start_soon(heal)
            with anyio.fail_after(30):
                summary, items, queue = await crawl_site(
                    storage, site, ["a"], cfg=workers(retry_backoff=1.5), politeness=PolitenessSettings()
                )
        start = await queue.get_request(request_id_for(f"{site.url('a')}/page/0"))
        await queue.aclose()
    assert_each_page_once(items, site, ["a"])
    assert summary.stats["retried"] == 1
    assert start is not None
    assert start.retry_count == 1
    (error,) = start.error_messages
    assert "robots.txt" in error
    assert "HTTP 503" in error
    assert "retry later" in error
    assert site.log("a").paths()[:2] == ["/robots.txt", "/robots.txt"]  # the page was not fetched on the 503


async def test_robots_txt_redirects_are_followed(storage: Path) -> None:
    """A robots.txt that redirects is read where it points to."""

    def moved(path: str, log: HostLog) -> Reply | None:
        return robots("User-agent: *\nDisallow: /page/2\n") if path == "/real-robots.txt" else None

    spec = HostSpec(pages=3, robots=(301, {"Location": "/real-robots.txt"}, b""), respond=moved)
    async with open_site({"a": spec}) as site:
        with anyio.fail_after(30):
            summary, _, queue = await crawl_site(storage, site, ["a"], cfg=workers(), politeness=PolitenessSettings())
        await queue.aclose()
    assert summary.stats["failed"] == 1
    assert "/page/2" not in site.log("a").paths()
    assert "/real-robots.txt" in site.log("a").paths()


@pytest.mark.parametrize(("rule_first", "failed"), [(True, 1), (False, 0)])
async def test_an_over_long_robots_txt_is_read_to_its_limit(storage: Path, rule_first: bool, failed: int) -> None:
    """Of a robots.txt longer than MAX_ROBOTS_BYTES, a rule within the limit applies and one beyond it does not."""
    padding = "# " + "x" * (MAX_ROBOTS_BYTES + 10_000) + "\n"
    rule = "Disallow: /page/1\n"
    text = "User-agent: *\n" + (rule + padding if rule_first else padding + rule)
    async with open_site({"a": HostSpec(pages=2, robots=robots(text))}) as site:
        with anyio.fail_after(30):
            summary, _, queue = await crawl_site(storage, site, ["a"], cfg=workers(), politeness=PolitenessSettings())
        await queue.aclose()
    assert summary.stats["failed"] == failed


async def test_robots_txt_true_applies_to_every_handler_and_false_to_none(storage: Path) -> None:
    """`robots_txt = true` makes handlers.fetch (which does not ask) obey robots.txt; `false` stops handlers.crawl
    (which asks) from reading it."""
    disallow_all = robots("User-agent: *\nDisallow: /\n")
    async with open_site({"a": HostSpec(pages=2, robots=disallow_all)}) as site:
        url = f"{site.url('a')}/page/1"
        with anyio.fail_after(30):
            summary, _, queue = await crawl_site(
                storage,
                site,
                ["a"],
                cfg=workers(),
                politeness=PolitenessSettings(robots_txt=True),
                handler=fetch.handle,
                start_urls=[url],
            )
        await queue.aclose()
        assert summary.stats["failed"] == 1
        assert site.log("a").paths() == ["/robots.txt"]

        site.log("a").hits.clear()
        with anyio.fail_after(30):
            summary, _, queue = await crawl_site(
                storage / "off", site, ["a"], cfg=workers(), politeness=PolitenessSettings(robots_txt=False)
            )
        await queue.aclose()
    assert summary.stats["failed"] == 0
    assert "/robots.txt" not in site.log("a").paths()
