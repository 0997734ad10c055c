"""Metrics, liveness and the run summary: in process, and through the real CLI in subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runner import (
    Context,
    JsonlDataset,
    Metrics,
    NoRetry,
    PrometheusMetrics,
    SqliteQueue,
    WorkerSettings,
    run,
)
from runner.health import DEFAULT_MAX_AGE, LIVENESS_EVERY, check_health, liveness_interval
from runner.heartbeat import keep_alive
from runner.leases import Leases
from runner.queue.api import ApiQueue, ApiRetryPolicy
from runner.stats import RunStats
from tests.conftest import free_port, headlock, start_headlock, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The sample `name{labels}`, or None."""
    return found.get((name, frozenset(labels.items())))


API_TOKEN = {"HEADLOCK_API__TOKEN": "test"}
"""A token for the API backend (the servers in these tests never check it)."""


# -- the metrics object -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_run_reports_its_counters_and_store_calls(storage: Path) -> None:
    """After a run, the registry's counters equal the summary's and every store operation is counted and timed."""
    metrics = PrometheusMetrics()
    queue = SqliteQueue.open(storage, "default", metrics=metrics)
    dataset = await anyio.to_thread.run_sync(JsonlDataset.open, storage, "default")  # it makes datasets/
    tries: dict[str, int] = {}

    async def handle(ctx: Context) -> None:
        tries[ctx.url] = tries.get(ctx.url, 0) + 1
        if ctx.url.endswith("/gone"):
            raise NoRetry("gone")
        if ctx.url.endswith("/flaky") and tries[ctx.url] == 1:
            raise RuntimeError("once")
        await ctx.push_data({"url": ctx.url})

    urls = [f"https://a.example/{i}" for i in range(5)] + ["https://a.example/gone", "https://a.example/flaky"]
    try:
        with anyio.fail_after(20):
            summary = await run(
                queue,
                handle,
                dataset,
                workers=WorkerSettings(concurrency=4, retry_backoff=0.0),
                start_urls=urls,
                metrics=metrics,
            )
    finally:
        dataset.close()
        await queue.aclose()
    found = samples((await anyio.to_thread.run_sync(generate_latest, metrics.registry)).decode())  # reads /proc
    assert (summary.stats["handled"], summary.stats["failed"], summary.stats["retried"]) == (6, 1, 1)
    assert value(found, "headlock_requests_handled_total") == 6
    assert value(found, "headlock_requests_failed_total") == 1
    assert value(found, "headlock_requests_retried_total") == 1
    assert value(found, "headlock_requests_enqueued_total") == 7
    assert value(found, "headlock_items_pushed_total") == 6
    assert value(found, "headlock_requests_in_flight") == 0
    assert value(found, "headlock_leases_held") == 0
    updates = value(found, "headlock_queue_calls_total", backend="embedded", endpoint="update_request", status="ok")
    assert updates == 2  # 1 failed + 1 retry recorded
    marks = value(found, "headlock_queue_calls_total", backend="embedded", endpoint="mark_handled", status="ok")
    assert marks == 6  # the handled marks
    for endpoint, count in (("update_request", 2), ("mark_handled", 6)):
        timed = value(found, "headlock_queue_call_duration_seconds_count", backend="embedded", endpoint=endpoint)
        assert timed == count
    assert (value(found, "headlock_queue_calls_total", backend="embedded", endpoint="lock_head", status="ok") or 0) >= 1
    assert value(found, "process_cpu_seconds_total") is not None


@pytest.mark.anyio
async def test_metrics_objects_keep_separate_registries_and_counters_never_go_back() -> None:
    """Two instances do not share a registry; tracking a new run adds to, never resets, the counters."""
    first, second = PrometheusMetrics(), PrometheusMetrics()
    assert first.registry is not second.registry
    earlier, later = RunStats(handled=3, prolonged=2), RunStats(handled=1)
    first.track(earlier, Leases())
    first.track(later, Leases())
    found = samples((await anyio.to_thread.run_sync(generate_latest, first.registry)).decode())  # reads /proc
    assert value(found, "headlock_requests_handled_total") == 4
    assert value(found, "headlock_lease_prolongs_total") == 2
    other = samples((await anyio.to_thread.run_sync(generate_latest, second.registry)).decode())
    assert value(other, "headlock_requests_handled_total") == 0


@pytest.mark.anyio
async def test_the_disabled_instance_does_nothing() -> None:
    """`Metrics()` accepts every hook and serves nothing."""
    metrics = Metrics()
    assert not metrics.enabled
    metrics.track(RunStats(), Leases())
    metrics.queue_call("api", "POST /head/lock", "201", 0.01)
    metrics.queue_pending(3)
    with metrics.serve("127.0.0.1", 1) as url:
        assert url is None


@pytest.mark.anyio
async def test_api_queue_reports_every_http_attempt_by_endpoint_and_status() -> None:
    """A 503 then a 201 on head/lock: two attempts counted with their statuses, both timed under one endpoint."""
    answers = iter([httpx.Response(503), httpx.Response(201, json={"data": {"items": [], "lockSecs": 60}})])

    def reply(request: httpx.Request) -> httpx.Response:
        return next(answers)

    metrics = PrometheusMetrics()
    async with httpx.AsyncClient(transport=httpx.MockTransport(reply)) as client:
        api = ApiQueue(
            client,
            base_url="http://queue.test",
            queue_id="Q",
            token=None,
            retry=ApiRetryPolicy(base_delay=0.0),
            metrics=metrics,
        )
        head = await api.lock_head(limit=5, lock_secs=60, client_key="k")
    assert head.items == []
    found = samples((await anyio.to_thread.run_sync(generate_latest, metrics.registry)).decode())  # reads /proc
    for status in ("503", "201"):
        assert value(found, "headlock_queue_calls_total", backend="api", endpoint="POST /head/lock", status=status) == 1
    assert value(found, "headlock_queue_call_duration_seconds_count", backend="api", endpoint="POST /head/lock") == 2
    assert api.calls == {"POST /head/lock 503": 1, "POST /head/lock 201": 1}


@pytest.mark.anyio
async def test_serve_answers_get_metrics_on_loopback() -> None:
    """`serve()` on port 0 yields the bound URL; GET on it returns the exposition; the server stops on exit."""
    metrics = PrometheusMetrics()
    metrics.queue_pending(7)
    stack = contextlib.ExitStack()  # started and stopped off the loop: the server's shutdown waits for its poll
    url = await anyio.to_thread.run_sync(stack.enter_context, metrics.serve("127.0.0.1", 0))
    try:
        assert url is not None
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
    finally:
        await anyio.to_thread.run_sync(stack.close)
    assert response.status_code == 200
    assert value(samples(response.text), "headlock_queue_pending") == 7
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url, timeout=2)


# -- liveness -----------------------------------------------------------------------------------------------


def test_the_liveness_beat_is_capped_whatever_the_lock_duration() -> None:
    """The beat is lock_secs/4 for short locks, at most LIVENESS_EVERY for long ones; max-age is three beats."""
    assert liveness_interval(2.0) == 0.5
    assert liveness_interval(3600.0) == LIVENESS_EVERY
    assert DEFAULT_MAX_AGE == 3 * LIVENESS_EVERY


@pytest.mark.anyio
async def test_heartbeat_touches_the_health_file_with_nothing_to_prolong(tmp_path: Path) -> None:
    """With no lease held, the heartbeat still touches the health file on every beat (re-creating it if removed)."""
    health = tmp_path / "deep" / "headlock.health"
    seen = anyio.Path(health)  # looked at from the loop: stat and unlink in a worker thread
    queue = SqliteQueue.open(tmp_path / "storage", "default")
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(
                    lambda task_status: keep_alive(
                        queue,
                        Leases(),
                        RunStats(),
                        client_key="k",
                        lock_secs=0.4,
                        health_file=health,
                        task_status=task_status,
                    )
                )
                assert await seen.exists()  # touched before the heartbeat reports started
                for _ in range(3):
                    await seen.unlink()
                    while not await seen.exists():  # noqa: ASYNC110 - a file appearing has no event to wait on
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
    finally:
        await queue.aclose()
    assert (await anyio.to_thread.run_sync(check_health, health))[0]


def test_health_is_fresh_then_stale_then_missing(tmp_path: Path) -> None:
    """`headlock health`: exit 0 on a fresh file, 1 with one line on a stale or missing one (never 2)."""
    health = tmp_path / "h"
    health.touch()
    fresh = headlock("health", cwd=tmp_path, HEADLOCK_HEALTH_FILE=str(health))
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.startswith("healthy: last heartbeat")
    old = time.time() - 60
    os.utime(health, (old, old))
    stale = headlock("health", "--health-file", str(health), "--max-age", "30", cwd=tmp_path)
    assert stale.returncode == 1
    age = re.match(r"unhealthy: last heartbeat (\d+\.\d) s ago", stale.stderr)
    assert age is not None, stale.stderr
    assert 60 <= float(age.group(1)) < 60 + 30  # however long the CLI took to start
    assert "more than 30 s" in stale.stderr
    assert len(stale.stderr.strip().splitlines()) == 1
    missing = headlock("health", "--storage-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("unhealthy: no heartbeat file at ")
    assert str(tmp_path / "nowhere" / "headlock.health") in missing.stderr


# -- the CLI: metrics endpoint, summary on every way out ----------------------------------------------------


@pytest.fixture
def queued(tmp_path: Path, site: str) -> list[str]:
    """Four URLs of the test site, enqueued in tmp_path/storage."""
    urls = [f"{site}/page/{i}" for i in range(4)]
    assert headlock("enqueue", *urls, cwd=tmp_path).returncode == 0
    return urls


def test_metrics_endpoint_while_running_then_sigterm_writes_the_summary(tmp_path: Path, queued: list[str]) -> None:
    """`run --keep-alive --metrics-port N`: /metrics counts the handled requests; SIGTERM exits 143 with a summary."""
    port = free_port()
    summary = tmp_path / "out" / "summary.json"
    proc = start_headlock(
        "run",
        "--handler",
        "handlers.fetch:handle",
        "--keep-alive",
        "--metrics-port",
        str(port),
        "--summary",
        str(summary),
        "--log-format",
        "json",
        cwd=tmp_path,
        stderr=tmp_path / "events.jsonl",
        HEADLOCK_PROGRESS_EVERY="0.1",
    )
    found: Samples = {}

    def scraped_all() -> bool:
        nonlocal found
        try:
            found = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
        except httpx.TransportError:
            return False
        settled = ("headlock_requests_in_flight", "headlock_leases_held", "headlock_queue_pending")
        return value(found, "headlock_requests_handled_total") == 4 and all(value(found, n) == 0 for n in settled)

    try:
        wait_for(scraped_all, 30, "four handled requests, nothing held or pending, on /metrics")
        assert value(found, "headlock_requests_failed_total") == 0
        assert value(found, "headlock_queue_calls_total", backend="embedded", endpoint="mark_handled", status="ok")
        health = headlock("health", cwd=tmp_path)
        assert health.returncode == 0, health.stderr
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, (tmp_path / "events.jsonl").read_text()[-2000:]
    result = json.loads(summary.read_text())
    assert (result["reason"], result["exit_code"], result["handled"]) == ("SIGTERM", 143, 4)
    assert "metrics.serving" in (tmp_path / "events.jsonl").read_text()


def test_a_fatal_queue_error_still_writes_the_summary(tmp_path: Path) -> None:
    """An API nobody answers: exit 1, and the summary says `fatal` with the error naming the endpoint."""
    summary = tmp_path / "summary.json"
    result = headlock(
        "run",
        "--handler",
        "handlers.fetch:handle",
        "--backend",
        "apify",
        "--api-base-url",
        f"http://127.0.0.1:{free_port()}",
        "--summary",
        str(summary),
        "--log-format",
        "json",
        cwd=tmp_path,
        **API_TOKEN,
        HEADLOCK_API__MAX_RETRIES="0",
    )
    assert result.returncode == 1, result.stderr
    written = json.loads(summary.read_text())
    assert written["reason"] == "fatal"
    assert written["exit_code"] == 1
    assert written["error_type"] == "QueueUnavailableError"
    assert "POST /v2/request-queues" in written["error"]


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (["--handler", "no_such_module:handle"], {}, "cannot import module 'no_such_module'"),
        (["--handler", "handlers.fetch:handle"], {"HEADLOCK_WORKERS__BATCH": "26"}, "workers.batch"),
    ],
)
def test_invalid_config_writes_the_summary_too(
    tmp_path: Path, flags: list[str], env: dict[str, str], expected: str
) -> None:
    """A bad handler or setting: exit 2, and the summary says `invalid_config` with the error."""
    summary = tmp_path / "summary.json"
    result = headlock("run", *flags, "--summary", str(summary), "--log-format", "json", cwd=tmp_path, **env)
    assert result.returncode == 2, result.stderr
    written = json.loads(summary.read_text())
    assert (written["reason"], written["exit_code"]) == ("invalid_config", 2)
    assert expected in written["error"]


def test_a_busy_metrics_port_is_a_config_error(tmp_path: Path) -> None:
    """A metrics port already taken: exit 2 naming the address, before the queue is touched."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = headlock(
            "run",
            "--handler",
            "handlers.fetch:handle",
            "--metrics-port",
            str(port),
            "--log-format",
            "json",
            cwd=tmp_path,
        )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "storage/request_queues").exists()


def test_sigterm_while_the_queue_is_still_being_opened(tmp_path: Path) -> None:
    """A SIGTERM while the API does not answer yet ends the run at once: exit 143, summary reason SIGTERM."""
    summary = tmp_path / "summary.json"
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(20)
        proc = start_headlock(
            "run",
            "--handler",
            "handlers.fetch:handle",
            "--backend",
            "apify",
            "--api-base-url",
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            "--summary",
            str(summary),
            cwd=tmp_path,
            stderr=tmp_path / "events.log",
            **API_TOKEN,
        )
        try:
            connection, _ = silent.accept()  # the process is inside open_queue, its signal task running
            with connection:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 143, (tmp_path / "events.log").read_text()[-2000:]
    written = json.loads(summary.read_text())
    assert (written["reason"], written["exit_code"], written["handled"]) == ("SIGTERM", 143, 0)
