"""The per-host state on its own: backoff levels and recovery, Retry-After, the LRU bound, cancellation of a wait,
and the `[politeness]` settings' errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import anyio.to_thread
import httpx
import pytest
from prometheus_client import generate_latest

from runner import ConfigError, load_settings
from runner.backoff import retry_after_secs
from runner.metrics import PrometheusMetrics
from runner.politeness import HostKey, Hosts, PoliteTransport, host_key
from runner.settings import PolitenessSettings
from tests._politesite import HostSpec, open_site

pytestmark = pytest.mark.anyio

KEY: HostKey = ("http", "example.com", 80)


def blocked_for(hosts: Hosts, key: HostKey) -> float:
    """Seconds left of `key`'s backoff."""
    return hosts.get(key).blocked_until - anyio.current_time()


async def test_backoff_grows_on_repeats_and_recovers_step_by_step() -> None:
    """Each 503 in a row doubles the block (1 s, 2 s) and halves the concurrency (8, 4, 2); an answer to a request
    sent before the block does not escalate; each later success takes one level back."""
    hosts = Hosts(PolitenessSettings(per_host_concurrency=8))
    host = hosts.get(KEY)
    sent_before = host.epoch
    hosts.observe(host, 503, epoch=host.epoch, latency=0.01)
    assert 0.9 < blocked_for(hosts, KEY) <= 1.0
    assert (host.level, host.limit) == (1, 4)
    hosts.observe(host, 503, epoch=sent_before, latency=0.01)  # in flight when the first one came: one event
    assert (host.level, host.limit) == (1, 4)
    hosts.observe(host, 503, epoch=host.epoch, latency=0.01)
    assert 1.9 < blocked_for(hosts, KEY) <= 2.0
    assert (host.level, host.limit) == (2, 2)
    assert hosts.statistics().throttled == 1
    assert hosts.backoffs == 2
    hosts.observe(host, 200, epoch=host.epoch, latency=0.01)
    assert (host.level, host.limit) == (1, 4)
    hosts.observe(host, 200, epoch=host.epoch, latency=0.01)
    assert (host.level, host.limit) == (0, 8)


async def test_adaptive_delay_follows_latency_within_its_bounds() -> None:
    """Adaptive mode moves a host's delay halfway to latency / adaptive_target at each answer, never below
    per_host_delay nor above max_delay, and an error answer never lowers it."""
    hosts = Hosts(PolitenessSettings(adaptive=True, adaptive_target=2.0, per_host_delay=0.05, max_delay=1.0))
    host = hosts.get(KEY)
    for _ in range(20):
        hosts.observe(host, 200, epoch=host.epoch, latency=0.4)
    assert host.delay == pytest.approx(0.2, rel=0.01)
    hosts.observe(host, 500, epoch=host.epoch, latency=0.0)
    assert host.delay == pytest.approx(0.2, rel=0.01)  # a fast error says nothing about the host's capacity
    for _ in range(20):
        hosts.observe(host, 200, epoch=host.epoch, latency=0.0)
    assert host.delay == pytest.approx(0.05)  # the configured delay is the floor
    for _ in range(20):
        hosts.observe(host, 200, epoch=host.epoch, latency=30.0)
    assert host.delay == 1.0  # max_delay is the ceiling
    fixed = Hosts(PolitenessSettings(per_host_delay=0.05))
    steady = fixed.get(KEY)
    fixed.observe(steady, 200, epoch=steady.epoch, latency=0.4)
    assert steady.delay == 0.05  # not adaptive: latency changes nothing


async def test_retry_after_is_honoured_up_to_its_cap() -> None:
    """A Retry-After longer than the step is the block; one beyond max_retry_after is cut to it."""
    hosts = Hosts(PolitenessSettings(max_retry_after=30))
    host = hosts.get(KEY)
    hosts.observe(host, 429, epoch=host.epoch, latency=0.01, retry_after="7")
    assert 6.9 < blocked_for(hosts, KEY) <= 7.0
    other = hosts.get(("https", "example.com", 443))
    hosts.observe(other, 429, epoch=other.epoch, latency=0.01, retry_after="3600")
    assert 29.9 < blocked_for(hosts, other.key) <= 30.0


async def test_metrics_show_the_hosts_state() -> None:
    """Prometheus metrics carry the hosts tracked and throttled now, and the backoff count, as last reported."""
    hosts = Hosts(PolitenessSettings())
    host = hosts.get(KEY)
    hosts.observe(host, 429, epoch=host.epoch, latency=0.01, retry_after="30")
    hosts.statistics()  # what the progress reporter does every few seconds
    metrics = await anyio.to_thread.run_sync(PrometheusMetrics)  # its process collector reads /proc
    metrics.track_hosts(hosts)
    text = (await anyio.to_thread.run_sync(generate_latest, metrics.registry)).decode()  # reads /proc: a thread
    assert "headlock_hosts_throttled 1.0" in text
    assert "headlock_hosts_tracked 1.0" in text
    assert "headlock_host_backoffs_total 1.0" in text


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After is a number of seconds or an HTTP date (a past one is 0); anything else is ignored."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_secs("120") == 120
    assert retry_after_secs("1.5") == 1.5
    assert retry_after_secs("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30
    assert retry_after_secs("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0
    assert retry_after_secs((now + timedelta(seconds=5)).strftime("%a, %d %b %Y %H:%M:%S GMT"), now=now) == 5
    for junk in (None, "", "soon", "-3", "nan", "inf"):
        assert retry_after_secs(junk, now=now) is None


async def test_the_host_registry_is_bounded_and_keeps_busy_hosts() -> None:
    """Beyond max_hosts the least recently used idle hosts are forgotten; one with a request in flight is kept."""
    hosts = Hosts(PolitenessSettings(max_hosts=3))
    busy = hosts.get(("http", "busy", 80))
    assert hosts.try_start(busy)
    for n in range(10):
        hosts.get(("http", f"h{n}", 80))
    assert len(hosts) == 3
    assert hosts.get(("http", "busy", 80)) is busy


async def test_a_cancelled_wait_for_a_slot_takes_nothing() -> None:
    """A request waiting for its host's only slot, cancelled (a handler timeout), leaves no slot or place in line
    taken: once the slow request ends the host is free, and the next request starts at once."""
    async with open_site({"a": HostSpec(pages=2, latency=0.5)}) as site:
        hosts = Hosts(PolitenessSettings(per_host_concurrency=1))
        transport = PoliteTransport(httpx.AsyncHTTPTransport(), hosts, robots=None)
        url = f"{site.url('a')}/page/1"
        host = hosts.get(host_key(httpx.URL(url)))
        async with httpx.AsyncClient(transport=transport) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.get, url)
                with anyio.fail_after(5):
                    await site.log("a").wait_until(lambda: site.log("a").in_flight > 0)
                with anyio.move_on_after(0.1) as waited:
                    await client.get(url)
                assert waited.cancelled_caught
                assert (host.active, len(host.waiters)) == (1, 0)
            assert host.active == 0
            started = anyio.current_time()
            assert (await client.get(url)).status_code == 200
            assert anyio.current_time() - started < 0.6 + 0.3
    assert site.log("a").max_in_flight == 1


async def test_a_cancelled_wait_for_a_delay_takes_nothing() -> None:
    """A request sitting out its host's delay, cancelled, leaves the line empty: the next request starts when the
    delay ends, not later."""
    async with open_site({"a": HostSpec(pages=2)}) as site:
        hosts = Hosts(PolitenessSettings(per_host_delay=0.3))
        transport = PoliteTransport(httpx.AsyncHTTPTransport(), hosts, robots=None)
        url = f"{site.url('a')}/page/1"
        host = hosts.get(host_key(httpx.URL(url)))
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(url)
            with anyio.move_on_after(0.05) as waited:
                await client.get(url)
            assert waited.cancelled_caught
            assert (host.active, len(host.waiters)) == (0, 0)
            await client.get(url)
    first, second = site.log("a").starts()
    assert 0.29 <= second - first < 0.3 + 0.15


@pytest.mark.parametrize(
    ("section", "key", "rule"),
    [
        ({"per_host_delay": -1}, "politeness.per_host_delay", "greater than or equal to 0"),
        ({"per_host_concurrency": 0}, "politeness.per_host_concurrency", "greater than or equal to 1"),
        ({"max_hosts": 0}, "politeness.max_hosts", "greater than or equal to 1"),
        ({"adaptive_target": 0}, "politeness.adaptive_target", "greater than 0"),
        ({"hosts": {"ftp://x": {}}}, "politeness.hosts", "origins"),
        ({"hosts": {"http://x": {"per_host_delay": -2}}}, "politeness.hosts.http://x.per_host_delay", "0"),
        ({"user_agent": "a\nb"}, "politeness.user_agent", "one line"),
        ({"robot_txt": True}, "politeness.robot_txt", "unknown key"),
    ],
)
def test_bad_politeness_settings_name_the_key_and_the_rule(section: dict[str, object], key: str, rule: str) -> None:
    """A bad `[politeness]` value is a ConfigError naming the key and the rule."""
    with pytest.raises(ConfigError) as caught:
        load_settings(politeness=section)
    assert key in str(caught.value)
    assert rule in str(caught.value)
