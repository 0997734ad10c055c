"""Per-host politeness of the handlers' shared client: slots, delays, backoff on 429/503, robots.txt, User-Agent.

`hosts` holds each host's state, `transport` the httpx transport wrapper that applies it to every request, `robots`
the robots.txt cache, `agent` the default User-Agent. `polite_transport` wires them for a `PolitenessSettings`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from runner.politeness.agent import PROJECT_URL, default_user_agent
from runner.politeness.hosts import HostKey, HostLimits, Hosts, HostsStatistics, HostState, host_key, origin
from runner.politeness.robots import MAX_ROBOTS_BYTES, RobotsCache
from runner.politeness.transport import ROBOTS_EXTENSION, PoliteTransport

if TYPE_CHECKING:
    from runner.settings import PolitenessSettings

__all__ = [
    "MAX_ROBOTS_BYTES",
    "PROJECT_URL",
    "ROBOTS_EXTENSION",
    "HostKey",
    "HostLimits",
    "HostState",
    "Hosts",
    "HostsStatistics",
    "PoliteTransport",
    "RobotsCache",
    "default_user_agent",
    "host_key",
    "hosts_for",
    "origin",
    "polite_transport",
]


def hosts_for(settings: PolitenessSettings) -> Hosts:
    """The host registry `settings` describe, with the limits of `politeness.hosts` for the hosts it names."""
    overrides = {
        host_key(httpx.URL(url)): HostLimits(
            limits.per_host_concurrency or settings.per_host_concurrency,
            settings.per_host_delay if limits.per_host_delay is None else limits.per_host_delay,
        )
        for url, limits in settings.hosts.items()
    }
    return Hosts(settings, overrides)


def polite_transport(
    inner: httpx.AsyncBaseTransport, settings: PolitenessSettings, hosts: Hosts | None = None
) -> PoliteTransport:
    """`inner` wrapped in per-host politeness (`hosts`, fresh from `settings` by default), robots.txt as
    `settings.robots_txt` says, fetched through `inner` itself."""
    hosts = hosts or hosts_for(settings)
    robots = None if settings.robots_txt is False else RobotsCache(inner, hosts, settings)
    return PoliteTransport(inner, hosts, robots=robots, robots_all=bool(settings.robots_txt))
