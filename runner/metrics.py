"""Prometheus metrics, opt-in: one object made by the caller (the CLI) and passed down explicitly.

`Metrics()` is the disabled instance: every hook is an empty method, so code that is not measured pays a call and
nothing else. `PrometheusMetrics()` records into its own `CollectorRegistry` (never the global one) and `serve()`s
it with prometheus-client's HTTP server (the `metrics` extra).

Threads: the event loop is the only writer of what the hooks touch. Run counters (handled, failed, retried, lease
prolongs and losses, ...) are not incremented here at all: the scrape reads the run's `RunStats` and `leases`
(`len(leases)`, `leases.in_flight`), plain ints whose reads are atomic, so the summary and the metrics can never
disagree and the hot path pays nothing. Only the queue-call counter and histogram are prometheus-client objects
(labelled, thread-safe).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, ClassVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from runner.leases import Leases
    from runner.politeness import Hosts
    from runner.stats import RunStats

__all__ = ["QUEUE_CALL_BUCKETS", "HealthCheck", "Metrics", "PrometheusMetrics"]

HealthCheck = Callable[[], tuple[bool, str]]
"""Whether the process is healthy, and one line saying why (`runner.health.check_health`)."""

QUEUE_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: sub-millisecond embedded-store operations up to slow, retried API calls."""

_RUN_COUNTERS = {
    # RunStats field: (metric name without _total, help)
    "handled": ("headlock_requests_handled", "Requests this process marked handled (succeeded)."),
    "failed": ("headlock_requests_failed", "Requests this process marked handled as failed (retries exhausted)."),
    "retried": ("headlock_requests_retried", "Failed attempts given back to the queue for a retry."),
    "prolonged": ("headlock_lease_prolongs", "Locks the heartbeat prolonged."),
    "lost": ("headlock_leases_lost", "Leases lost (lock expired or taken) before their request was finished."),
    "given_back": ("headlock_requests_given_back", "Prefetched or held requests given back unprocessed on stop."),
    "enqueued": ("headlock_requests_enqueued", "New requests added to the queue (start URLs and handler enqueues)."),
    "items": ("headlock_items_pushed", "Items pushed to the dataset."),
}


class Metrics:
    """The metrics hooks the runtime calls. This class is the disabled instance: every hook does nothing."""

    enabled: ClassVar[bool] = False

    def track(self, stats: RunStats, leases: Leases) -> None:
        """Report this run's counters and held leases from now on (`run()` calls it at start)."""

    def track_hosts(self, hosts: Hosts) -> None:
        """Report the shared client's per-host state from now on (`runner.politeness.Hosts.statistics`)."""

    def queue_call(self, backend: str, endpoint: str, status: str, seconds: float) -> None:
        """One queue call: an HTTP attempt (`api`) or an embedded-store operation (`embedded`)."""

    def queue_pending(self, count: int | None) -> None:
        """The queue's pending count as the progress reporter last read it (None: the read failed)."""

    @contextlib.contextmanager
    def serve(self, host: str, port: int, *, health: HealthCheck | None = None) -> Iterator[str | None]:
        """Serve `/metrics` on `host:port` while the block runs; yields the URL (None here: nothing to serve)."""
        yield None


class PrometheusMetrics(Metrics):
    """Metrics recorded into a registry of its own (`self.registry`), served by `serve()`.

    Raises:
        ImportError: prometheus-client is not installed (`pip install 'headlock[metrics]'`).
    """

    enabled: ClassVar[bool] = True

    def __init__(self) -> None:
        # Imported here: the extra is optional and the disabled path must not need it.
        from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: PLC0415
        from prometheus_client.process_collector import ProcessCollector  # noqa: PLC0415

        self.registry: CollectorRegistry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_RunCollector(self))
        self._calls = Counter(
            "headlock_queue_calls",
            "Queue calls: HTTP attempts (backend api, status = HTTP status or `error`) or embedded-store operations "
            "(backend embedded, status `ok` or the error type).",
            ["backend", "endpoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "headlock_queue_call_duration_seconds",
            "Duration of one queue call (one HTTP attempt, or one store operation including its commit).",
            ["backend", "endpoint"],
            buckets=QUEUE_CALL_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        # Plain values the event loop writes and the scrape thread reads (see the module docstring).
        self.pending: int | None = None
        self.runs: tuple[dict[str, int], RunStats | None, Leases | None] = ({}, None, None)
        self.hosts: Hosts | None = None

    def track(self, stats: RunStats, leases: Leases) -> None:
        """Report `stats` and `leases` from now on; counters carry on from earlier runs, never going back."""
        base, previous, _ = self.runs
        if previous is not None:
            base = {field: base.get(field, 0) + getattr(previous, field) for field in _RUN_COUNTERS}
        self.runs = (base, stats, leases)  # one assignment: a scrape sees the old triple or the new one

    def track_hosts(self, hosts: Hosts) -> None:
        """Report `hosts` from now on (the latest run's; its counters start at zero)."""
        self.hosts = hosts

    def queue_call(self, backend: str, endpoint: str, status: str, seconds: float) -> None:
        """Count the call and observe its duration."""
        key = (backend, endpoint, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds keys: once per label set, not per call
            children = self._children[key] = (
                self._calls.labels(backend, endpoint, status),
                self._latency.labels(backend, endpoint),
            )
        children[0].inc()
        children[1].observe(seconds)

    def queue_pending(self, count: int | None) -> None:
        """Keep the last pending count read; a failed read keeps the previous one."""
        if count is not None:
            self.pending = count

    @contextlib.contextmanager
    def serve(self, host: str, port: int, *, health: HealthCheck | None = None) -> Iterator[str | None]:
        """Serve the registry at `/metrics` (and any other path but `/health`) in a daemon thread; yields
        `http://host:port/metrics`. With `health`, `/health` answers 200 or 503 with its one line (for a platform
        that probes a port, such as the Apify Actor's web server port).

        Port 0 binds a free port (the yielded URL names it).

        Raises:
            OSError: the address cannot be bound.
        """
        from prometheus_client import make_wsgi_app  # noqa: PLC0415

        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if health is not None and environ.get("PATH_INFO") == "/health":
                healthy, line = health()
                status = "200 OK" if healthy else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
                return [line.encode() + b"\n"]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        server_class = _MetricsServer6 if ":" in host else _MetricsServer
        server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="headlock-metrics", daemon=True)
        thread.start()
        try:
            bound = server.server_address[1]
            shown = f"[{host}]" if ":" in host else host
            yield f"http://{shown}:{bound}/metrics"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, none left behind at exit."""

    daemon_threads = True


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: stderr carries the run's structured events."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        return


class _RunCollector:
    """Collects the run's counters and gauges at scrape time from the values `PrometheusMetrics` holds."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

        base, stats, leases = self._metrics.runs
        for field, (name, doc) in _RUN_COUNTERS.items():
            value = base.get(field, 0) + (getattr(stats, field) if stats is not None else 0)
            yield CounterMetricFamily(name, doc, value=value)
        in_flight = leases.in_flight if leases is not None else 0
        yield GaugeMetricFamily("headlock_requests_in_flight", "Requests whose handler is running.", value=in_flight)
        held = len(leases) if leases is not None else 0
        yield GaugeMetricFamily("headlock_leases_held", "Locks held: in flight and prefetched.", value=held)
        yield from _host_metrics(self._metrics.hosts)
        pending = self._metrics.pending
        if pending is not None:  # unknown until the progress reporter's first read
            yield GaugeMetricFamily(
                "headlock_queue_pending", "Requests pending in the queue (every progress_every seconds).", value=pending
            )


def _host_metrics(hosts: Hosts | None) -> Iterator[Metric]:
    """The shared client's per-host gauges and counters (none before a run tracks its hosts)."""
    if hosts is None:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

    # The snapshot the progress reporter took last, on the event loop (one attribute read, never half updated).
    stats = hosts.latest
    yield GaugeMetricFamily("headlock_hosts_tracked", "Hosts whose politeness state is kept.", value=stats.hosts)
    yield GaugeMetricFamily("headlock_hosts_throttled", "Hosts in a 429/503 backoff now.", value=stats.throttled)
    yield GaugeMetricFamily(
        "headlock_host_waiting", "Requests waiting for their host's slot or delay.", value=stats.waiting
    )
    yield CounterMetricFamily(
        "headlock_host_backoffs", "429/503 answers that began or extended a host's backoff.", value=stats.backoffs
    )
    yield CounterMetricFamily(
        "headlock_requests_deferred", "Requests given back unstarted because their host was busy.", value=stats.deferred
    )
    yield CounterMetricFamily(
        "headlock_robots_disallowed", "Requests robots.txt forbade (not fetched).", value=stats.robots_disallowed
    )
