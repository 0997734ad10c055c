"""Per-host state of the handlers' shared client: slots, the gap between starts, the adaptive delay, the backoff
after a 429 or 503, and the workers' claims (`admit`), in a bounded LRU of hosts.

A host is its scheme, host and port (`HostKey`). A request starts when its host has a free slot
(`per_host_concurrency`), its delay since the host's last start has passed and no backoff blocks the host; else it
waits in line (first come, first served; cancellable, taking nothing while it waits). Everything runs on the event
loop, nothing here starts a task, and the fast path (a free slot, no delay, no backoff) is a dict lookup and two
integer updates.

Backoff: a 429 or 503 blocks its host for Retry-After (seconds or an HTTP date, at most `max_retry_after`) or for
a step that doubles with each repeat (1 s, 2 s, 4 s, ... up to `max_delay`), whichever is longer; meanwhile the
host's concurrency is halved per level (at least 1). Each later success takes one level back. Answers to requests
sent before the block began do not raise it again (a burst of 429s is one event).
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

import anyio
import httpx
import structlog

from runner.backoff import retry_after_secs

if TYPE_CHECKING:
    from runner.settings import PolitenessSettings

__all__ = ["HostKey", "HostLimits", "HostState", "Hosts", "HostsStatistics", "host_key", "origin"]

log = structlog.get_logger("headlock.politeness")

HostKey = tuple[str, str, int]
"""(scheme, host, port), the port always given."""

_DEFAULT_PORTS = {"http": 80, "https": 443}
BACKOFF_STATUSES = frozenset({429, 503})
_FIRST_STEP = 1.0
"""Seconds of the first backoff step without a Retry-After; it doubles with each level."""
_MAX_LEVEL = 16
MAX_WAIT = 0.25
"""Seconds a worker may expect to wait for its request's host (others ahead, a delay); a longer wait is not sat out:
the request is given back to the queue until about its turn, and the worker takes the next one."""
MIN_DEFER = 0.25
"""Shortest give-back: a request deferred sooner would cost a queue call for no gain."""
MAX_DEFER = 300.0
"""Longest give-back (a lock prolonged further may be refused)."""
_DEFERRALS = 10_000
"""Most give-back ends remembered for the fetcher (`next_deferral_end`)."""


_ORIGIN_TEXT = re.compile(r"[^:/?#]*://[^/?#]*").match
"""The `scheme://netloc` start of a URL text (`Hosts._key_of`'s memo key)."""


def host_key(url: httpx.URL) -> HostKey:
    """The host of an httpx URL."""
    scheme = url.scheme
    return (scheme, url.host, url.port or _DEFAULT_PORTS.get(scheme, 0))


def _text_key(url: str) -> HostKey | None:
    """The host of a URL string; None when it has none. (An IDNA host may key differently from `host_key`'s:
    then a worker's claim and the client's slots are counted apart, never wrongly together.)"""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if not host:
        return None
    scheme = parts.scheme.lower()
    return (scheme, host, port or _DEFAULT_PORTS.get(scheme, 0))


def origin(key: HostKey) -> str:
    """`scheme://host:port` of `key` (for logs, metrics and robots.txt)."""
    scheme, host, port = key
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


class HostLimits(NamedTuple):
    """A host's configured limits (`politeness.per_host_*`, or its entry in `politeness.hosts`)."""

    concurrency: int
    delay: float


class _Waiter:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()


class HostState:
    """One host's state; `Hosts` owns every transition."""

    __slots__ = (
        "active",
        "adaptive_delay",
        "blocked_until",
        "claims",
        "crawl_delay",
        "defer_next",
        "delay",
        "epoch",
        "key",
        "latency",
        "level",
        "limit",
        "limits",
        "not_before",
        "waiters",
    )

    def __init__(self, key: HostKey, limits: HostLimits) -> None:
        self.key = key
        self.limits = limits
        self.active = 0
        """Requests of the shared client in flight to the host."""
        self.limit = limits.concurrency
        """Its concurrency now: the configured one, halved per backoff level."""
        self.delay = limits.delay
        """Least seconds between two starts now: the configured delay, the Crawl-delay, the adaptive delay."""
        self.crawl_delay = 0.0
        self.adaptive_delay = limits.delay
        self.not_before = 0.0
        """No start before this (`anyio.current_time()`): the delay since the last start, or a backoff; 0: none."""
        self.blocked_until = 0.0
        """The end of a backoff; 0: none."""
        self.level = 0
        self.epoch = 0
        """Counts backoffs: an answer to a request started under an older epoch does not escalate or recover."""
        self.latency = 0.0
        """Seconds to the answer's headers, a moving average."""
        self.waiters: deque[_Waiter] = deque()
        self.claims = 0
        """Workers holding a request for this host (`Hosts.admit`)."""
        self.defer_next = 0.0
        """When the last request given back for this host is due back."""

    def idle(self, now: float) -> bool:
        """Nothing in flight, waiting or claimed, and no backoff running or left to recover: safe to forget."""
        return not (self.active or self.claims or self.waiters or self.level or self.blocked_until > now)


class HostsStatistics(NamedTuple):
    """A snapshot of the hosts' state and counters since the start."""

    hosts: int
    """Hosts tracked."""
    throttled: int
    """Hosts in a backoff now."""
    waiting: int
    """Requests waiting for a slot or a delay."""
    backoffs: int
    """429/503 answers that began or extended a backoff."""
    deferred: int
    """Requests given back unstarted because their host was busy."""
    robots_disallowed: int
    """Requests refused by robots.txt."""


class Hosts:
    """The per-host registry (see the module docstring). Also counts what `RobotsCache` refuses."""

    def __init__(self, settings: PolitenessSettings, overrides: Mapping[HostKey, HostLimits] | None = None) -> None:
        self._default = HostLimits(settings.per_host_concurrency, settings.per_host_delay)
        self._overrides = dict(overrides or {})
        self._adaptive = settings.adaptive
        self._target = settings.adaptive_target
        self._max_delay = settings.max_delay
        self._max_retry_after = settings.max_retry_after
        self._size = settings.max_hosts
        self._hosts: OrderedDict[HostKey, HostState] = OrderedDict()
        self._blocked: dict[HostKey, float] = {}
        self._deferral_ends: list[float] = []  # a heap
        self._keys: dict[str, HostKey | None] = {}
        self.backoffs = 0
        self.deferred = 0
        self.robots_disallowed = 0
        self.latest = HostsStatistics(0, 0, 0, 0, 0, 0)
        """The last `statistics()`, for readers on another thread (the metrics scrape)."""

    def get(self, key: HostKey) -> HostState:
        """The state of `key`, made now if new; marks it most recently used."""
        hosts = self._hosts
        host = hosts.get(key)
        if host is None:
            host = hosts[key] = HostState(key, self._overrides.get(key, self._default))
            if len(hosts) > self._size:
                self._evict()
        else:
            hosts.move_to_end(key)
        return host

    def __len__(self) -> int:
        return len(self._hosts)

    def _evict(self) -> None:
        """Forget the least recently used idle hosts beyond `max_hosts`; busy ones are kept (moved to the end)."""
        now = anyio.current_time()
        hosts = self._hosts
        for _ in range(min(len(hosts), 64)):
            if len(hosts) <= self._size:
                return
            key, host = next(iter(hosts.items()))
            if host.idle(now):
                del hosts[key]
                self._blocked.pop(key, None)
            else:
                hosts.move_to_end(key)

    # The shared client's side: slots, delays, backoff.

    def try_start(self, host: HostState) -> bool:
        """Take a slot of `host` now if it may start at once (nobody ahead, a slot free, no delay or backoff due)."""
        if host.active < host.limit and not host.waiters:
            if not host.not_before and not host.delay:
                host.active += 1
                return True
            now = anyio.current_time()
            if now >= host.not_before:
                self._start(host, now)
                return True
        return False

    def _start(self, host: HostState, now: float) -> None:
        host.active += 1
        host.not_before = now + host.delay if host.delay else 0.0

    async def wait_turn(self, host: HostState) -> None:
        """Wait in line for a slot of `host` and take it. Cancelled, it takes nothing and passes its turn on."""
        waiter = _Waiter()
        line = host.waiters
        line.append(waiter)
        started = False
        try:
            while True:
                if line[0] is waiter and host.active < host.limit:
                    now = anyio.current_time()
                    if now >= host.not_before:
                        line.popleft()
                        started = True
                        self._start(host, now)
                        self._wake(host)  # a slot may be left for the next one, or it sits out the delay
                        return
                    await anyio.sleep(host.not_before - now)
                    continue
                await waiter.event.wait()
                waiter.event = anyio.Event()
        finally:
            if not started:
                first = line[0] is waiter
                line.remove(waiter)
                if first:
                    self._wake(host)

    @staticmethod
    def _wake(host: HostState) -> None:
        if host.waiters:
            host.waiters[0].event.set()

    def release(self, host: HostState) -> None:
        """Give back the slot a request took (`try_start` or `wait_turn`)."""
        host.active -= 1
        if host.waiters:
            host.waiters[0].event.set()

    def observe(
        self, host: HostState, status: int | None, *, epoch: int, latency: float, retry_after: str | None = None
    ) -> None:
        """Learn from an answer (`status` None: the request failed): back off on 429/503, recover on a success,
        follow the latency. `epoch` is `host.epoch` when the request started."""
        if status in BACKOFF_STATUSES:
            self._back_off(host, status, retry_after, escalate=epoch == host.epoch)
        elif host.level and status is not None and status < 400 and epoch == host.epoch:
            self._recover(host)
        if status is not None:
            host.latency = latency if not host.latency else host.latency * 0.7 + latency * 0.3
            if self._adaptive:
                self._adapt(host, latency, ok=status < 400)

    def _back_off(self, host: HostState, status: int | None, retry_after: str | None, *, escalate: bool) -> None:
        now = anyio.current_time()
        asked = retry_after_secs(retry_after)
        if asked is not None:
            asked = min(asked, self._max_retry_after)
        if escalate:
            host.level = min(host.level + 1, _MAX_LEVEL)
            host.epoch += 1
            host.limit = max(1, host.limits.concurrency >> host.level)
            step = min(_FIRST_STEP * 2 ** (host.level - 1), self._max_delay)
            wait = step if asked is None else max(asked, step)
        elif asked is None:
            return  # one more answer of the burst that began this backoff
        else:
            wait = asked
        until = now + wait
        if until <= host.blocked_until:
            return
        host.blocked_until = until
        host.not_before = max(host.not_before, until)
        self._blocked[host.key] = until
        self.backoffs += 1
        (log.warning if escalate else log.debug)(
            "politeness.host_backoff",
            host=origin(host.key),
            status=status,
            retry_after_s=asked,
            wait_s=round(wait, 3),
            level=host.level,
            concurrency=host.limit,
        )

    def _recover(self, host: HostState) -> None:
        host.level -= 1
        host.limit = max(1, host.limits.concurrency >> host.level)
        if host.waiters:
            host.waiters[0].event.set()
        if not host.level:
            log.info("politeness.host_recovered", host=origin(host.key), concurrency=host.limit)

    def _adapt(self, host: HostState, latency: float, *, ok: bool) -> None:
        """Scrapy's AutoThrottle: halfway towards latency / target; an error answer never lowers the delay."""
        wanted = (host.adaptive_delay + latency / self._target) / 2
        if not ok:
            wanted = max(wanted, host.adaptive_delay)
        host.adaptive_delay = min(max(wanted, host.limits.delay), self._max_delay)
        self._set_delay(host)

    def set_crawl_delay(self, host: HostState, seconds: float) -> None:
        """A robots.txt Crawl-delay for `host` (at most `max_delay`)."""
        host.crawl_delay = min(max(seconds, 0.0), self._max_delay)
        self._set_delay(host)

    def _set_delay(self, host: HostState) -> None:
        delay = max(host.limits.delay, host.crawl_delay, host.adaptive_delay if self._adaptive else 0.0)
        if delay and delay != host.delay and host.not_before:
            host.not_before += delay - host.delay  # the next start keeps its distance from the last one
        host.delay = delay

    # The workers' side: at most a host's concurrency of workers sit on its requests (non-starvation).

    def admit(self, url: str) -> tuple[HostState | None, float]:
        """Whether a worker may take on a request for `url` now: (its host, claimed, 0.0), to `leave` when done; or
        (None, seconds) to give the request back for that long, because its host is in a backoff or the requests
        ahead of it there (the workers' claims beyond its slots, its delay) would hold it more than `MAX_WAIT`."""
        key = self._key_of(url)
        if key is None:
            return None, 0.0
        host = self.get(key)
        if host.claims >= host.limit or host.blocked_until or host.delay:
            wait = self._deferral(host, anyio.current_time())
            if wait:
                self.deferred += 1
                return None, wait
        host.claims += 1
        return host, 0.0

    def _key_of(self, url: str) -> HostKey | None:
        """`_text_key` of `url`, remembered by its `scheme://netloc` text (a worker asks for every request)."""
        found = _ORIGIN_TEXT(url)
        if found is None:
            return None
        prefix = found.group()
        keys = self._keys
        if prefix in keys:
            return keys[prefix]
        if len(keys) >= self._size:
            keys.clear()
        key = keys[prefix] = _text_key(prefix)
        return key

    def _deferral(self, host: HostState, now: float) -> float:
        """How long to give a request for `host` back for; 0: its wait is short, sit it out. Successive give-backs
        are spaced by the host's pace, so each comes back about when it can start."""
        if host.blocked_until <= now:
            if host.blocked_until:
                host.blocked_until = 0.0
                self._blocked.pop(host.key, None)
            pace = host.latency / host.limit
            ahead = host.claims - host.limit + 1
            wait = max(host.not_before - now, 0.0) + max(ahead * pace, host.claims * host.delay)
            if wait <= MAX_WAIT:
                return 0.0
        interval = max(host.delay, host.latency / host.limit, 0.01)
        start = max(now + MAX_WAIT, host.blocked_until, host.defer_next)
        host.defer_next = start + interval
        wait = min(max(start - now, MIN_DEFER), MAX_DEFER)
        if len(self._deferral_ends) < _DEFERRALS:
            heapq.heappush(self._deferral_ends, now + wait)
        return wait

    @staticmethod
    def leave(host: HostState) -> None:
        """A worker's claim (`admit`) ends."""
        host.claims -= 1

    def next_deferral_end(self) -> float | None:
        """When the soonest request given back for a busy host is due back, if any (for the fetcher's wait)."""
        now = anyio.current_time()
        ends = self._deferral_ends
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        return ends[0] if ends else None

    def deferred_until(self) -> float:
        """When the last give-back's lock ends (0: none): those locks are ours on purpose until then."""
        ends = self._deferral_ends
        # The queue dates the lock from the prolong's arrival, a little after `now` was read here.
        return max(ends) + 1 if ends else 0.0

    def statistics(self) -> HostsStatistics:
        """Counts now (see `HostsStatistics`); also kept as `latest`. On the event loop only."""
        now = anyio.current_time()
        blocked = self._blocked
        for key in [key for key, until in blocked.items() if until <= now]:
            del blocked[key]
        waiting = sum(len(host.waiters) for host in self._hosts.values() if host.waiters)
        self.latest = HostsStatistics(
            len(self._hosts), len(blocked), waiting, self.backoffs, self.deferred, self.robots_disallowed
        )
        return self.latest
