"""Never lose a request, never leave a lock: crashes, restarts, slow handlers and stops, with real processes."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests._server import read_listening_url, running_server
from tests.conftest import cli_env, free_port, headlock, reaped, run_config, start_headlock, wait_for
from tests.test_cli import attempts, logged, progressed, queue_state, write_urls

pytestmark = pytest.mark.slow


def pids(log: Path) -> dict[str, list[int]]:
    """Request id -> the pids that attempted it, in order."""
    result: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        request_id, pid = line.split()
        result.setdefault(request_id, []).append(int(pid))
    return result


@contextlib.contextmanager
def backend(kind: str, tmp_path: Path) -> Iterator[tuple[str | None, Path]]:
    """Yield (API base URL or None, the storage dir holding the queue file) for the embedded store or serve."""
    if kind == "embedded":
        yield None, tmp_path / "storage"
    else:
        with running_server(tmp_path / "server") as url:
            yield url, tmp_path / "server"


@pytest.mark.parametrize("kind", ["embedded", "serve"])
def test_kill_9_loses_nothing_and_only_the_dead_workers_requests_run_twice(tmp_path: Path, kind: str) -> None:
    """One of three workers is SIGKILLed mid-crawl: everything ends handled, repeats are its in-flight ones only."""
    count = 120
    with backend(kind, tmp_path) as (api, storage):
        _kill_one_of_three(tmp_path, api, storage, count)


def _kill_one_of_three(tmp_path: Path, api: str | None, storage: Path, count: int) -> None:
    log = tmp_path / "attempts.log"
    cfg = run_config(
        tmp_path / "c.toml", "slow", log, api=api, concurrency=4, prefetch=4, lock_secs=2, options={"sleep": 0.3}
    )
    urls = write_urls(tmp_path / "u.txt", count)
    added = headlock("enqueue", "--config", str(cfg), "--file", str(urls), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    procs = [start_headlock("run", "--config", str(cfg), cwd=tmp_path) for _ in range(3)]
    victim = procs[0]
    with reaped(*procs):
        wait_for(lambda: log.exists() and str(victim.pid) in log.read_text(), 20, "the victim to start handlers")
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=10)
        for proc in procs[1:]:
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-2000:]
    attempted = pids(log)
    assert len(attempted) == count
    repeated = {rid: who for rid, who in attempted.items() if len(who) > 1}
    assert all(who[0] == victim.pid and victim.pid not in who[1:] for who in repeated.values()), repeated
    assert len(repeated) <= 4  # at most the victim's in-flight requests
    assert queue_state(storage) == (count, count, [])


def test_restart_with_the_same_client_key_frees_its_stale_locks_at_once(tmp_path: Path) -> None:
    """A worker killed with 60 s locks and restarted under its key releases them at start instead of waiting."""
    count = 20
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    cfg = run_config(
        tmp_path / "c.toml", "slow", log, concurrency=2, lock_secs=60, client_key="worker-1", options={"sleep": 30}
    )
    first = start_headlock("run", "--config", str(cfg), cwd=tmp_path)
    with reaped(first):
        wait_for(lambda: sum(attempts(log).values()) >= 2, 20, "two handlers to start")
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
    _, _, locks = queue_state(tmp_path / "storage")
    assert len(locks) == count  # 2 in flight + prefetched, all locked for 60 s by the dead worker
    first_expiry = min(expires for _, _, expires in locks)
    cfg = run_config(tmp_path / "c.toml", "noop", log, concurrency=4, lock_secs=60, client_key="worker-1")
    result = headlock("run", "--config", str(cfg), "--log-format", "json", cwd=tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert datetime.now(UTC) < first_expiry  # done before any stale lock ran out: freed at start, not waited out
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(e["event"] == "run.released_stale_locks" and e["count"] == count for e in events)
    assert queue_state(tmp_path / "storage") == (count, count, [])


def test_graceful_stop_with_50_in_flight_and_25_prefetched(tmp_path: Path) -> None:
    """SIGTERM with 50 handlers running and 25 prefetched: those 25 go back at once, the 50 finish, exit 143."""
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", 200)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    gate = tmp_path / "gate"
    grace = 30.0
    cfg = run_config(
        tmp_path / "c.toml", "gated", log, concurrency=50, prefetch=25, grace=grace, options={"gate": str(gate)}
    )
    summary = tmp_path / "summary.json"
    events = tmp_path / "events.jsonl"
    proc = start_headlock(
        "run",
        "--config",
        str(cfg),
        "--summary",
        str(summary),
        "--log-format",
        "json",
        cwd=tmp_path,
        stderr=events,
        HEADLOCK_PROGRESS_EVERY="0.2",
    )
    with reaped(proc):
        # Handlers wait at the gate, so none finishes before the signal: 50 in flight and 25 prefetched, exactly.
        wait_for(lambda: progressed(events, in_flight=50, prefetched=25), 30, "50 handlers running and 25 prefetched")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: logged(events, "shutdown.draining"), 10, "the drain to start")
        [draining] = logged(events, "shutdown.draining")
        assert (draining["given_back"], draining["in_flight"]) == (25, 50)
        _, locks_mid = queue_state(tmp_path / "storage")[1:]
        assert len(locks_mid) == 50  # the prefetched 25 were released while the 50 still run
        gate.touch()
        released = time.monotonic()
        proc.communicate(timeout=grace + 10)
    assert proc.returncode == 143, events.read_text()[-2000:]
    # The drain ends when the last handler does, not at the grace deadline; half the grace is a generous bound.
    assert time.monotonic() - released < grace / 2
    result = json.loads(summary.read_text())
    assert (result["handled"], result["given_back"]) == (50, 25)
    assert sum(attempts(log).values()) == 50  # nothing started after the signal
    assert queue_state(tmp_path / "storage") == (200, 50, [])


def test_slow_handlers_with_short_locks_are_never_processed_twice(tmp_path: Path) -> None:
    """Lock 2 s, handlers of 5-10 s, three workers: the heartbeat holds every lock; nothing runs twice."""
    count = 9
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    cfg = run_config(
        tmp_path / "c.toml",
        "slow",
        log,
        concurrency=3,
        prefetch=1,
        lock_secs=2,
        handler_timeout=30,
        options={"sleep": 5, "sleep_jitter": 5},
    )
    procs = [start_headlock("run", "--config", str(cfg), cwd=tmp_path) for _ in range(3)]
    with reaped(*procs):
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-2000:]
    seen = attempts(log)
    assert len(seen) == count
    assert max(seen.values()) == 1
    assert queue_state(tmp_path / "storage") == (count, count, [])


def start_server(storage: Path, port: int) -> subprocess.Popen[bytes]:
    """`headlock serve` on a fixed port; returns once it prints its address (at most START_TIMEOUT s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "serve", "--port", str(port), "--storage", str(storage)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        read_listening_url(proc)
    except RuntimeError:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return proc


def test_queue_server_down_for_10_seconds_the_run_still_completes(tmp_path: Path) -> None:
    """The API server stops for 10 s mid-run and comes back: the worker retries, finishes, nothing lost or doubled."""
    count = 60
    port = free_port()
    server = start_server(tmp_path / "server", port)
    worker: subprocess.Popen[str] | subprocess.Popen[bytes] = server  # replaced once the worker starts; cleaned up
    log = tmp_path / "attempts.log"
    cfg = run_config(
        tmp_path / "c.toml", "slow", log, api=f"http://127.0.0.1:{port}", concurrency=4, options={"sleep": 0.2}
    )
    try:
        added = headlock(
            "enqueue", "--config", str(cfg), "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path
        )
        assert added.returncode == 0, added.stderr
        events = tmp_path / "events.jsonl"
        worker = start_headlock("run", "--config", str(cfg), "--log-format", "json", cwd=tmp_path, stderr=events)
        wait_for(lambda: sum(attempts(log).values()) >= 8, 20, "the worker to get going")
        server.terminate()
        server.communicate(timeout=10)
        outage_ends = time.monotonic() + 10  # the scenario itself: the queue is away for ten seconds
        wait_for(
            lambda: "queue.api.retry" in events.read_text() or worker.poll() is not None, 10, "the worker to retry"
        )
        assert worker.poll() is None, "the worker must not give up while the queue is away"
        time.sleep(max(0.0, outage_ends - time.monotonic()))
        assert worker.poll() is None
        server = start_server(tmp_path / "server", port)
        worker.communicate(timeout=90)
        assert worker.returncode == 0, events.read_text()[-3000:]
    finally:
        for proc in (server, worker):
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
    seen = attempts(log)
    assert len(seen) == count
    assert max(seen.values()) == 1
    assert queue_state(tmp_path / "server") == (count, count, [])


def _limit_file_size(limit: int) -> None:
    """In the child: writes past `limit` bytes fail with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_gives_a_clear_error_and_no_corrupted_queue(tmp_path: Path) -> None:
    """An enqueue that runs out of disk fails with one clear line; the queue file stays consistent."""
    assert headlock("enqueue", "https://a.example/first", cwd=tmp_path).returncode == 0
    urls = write_urls(tmp_path / "u.txt", 20_000, prefix="https://a.example/" + "x" * 200 + "/")
    db = tmp_path / "storage/request_queues/default.sqlite"
    limit = db.stat().st_size + 256 * 1024
    result = subprocess.run(
        [sys.executable, "-m", "runner", "enqueue", "--file", str(urls), "--log-format", "json"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: _limit_file_size(limit),
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = json.loads(result.stderr.strip().splitlines()[-1])
    assert last["event"] == "run.fatal"
    assert last["error_type"] == "QueueUnavailableError"
    assert "full" in last["error"] or "I/O" in last["error"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        total = conn.execute("SELECT total FROM queue").fetchone()[0]
    assert rows == total  # counters and rows moved together: whole batches, or nothing
    status = headlock("status", "--json", cwd=tmp_path)
    assert status.returncode == 0
    assert json.loads(status.stdout)["total"] == total


def test_the_token_never_appears_in_output(tmp_path: Path) -> None:
    """A wrong token fails with a clear 401 naming the endpoint; neither token shows in any output."""
    right, wrong = "right-token-5f1c9e", "wrong-token-77ab21"
    with running_server(tmp_path / "server", token=right) as url:
        refused = headlock(
            "run",
            "--backend",
            "apify",
            "--api-base-url",
            url,
            "--handler",
            "tests.sample_handlers:noop",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            cwd=tmp_path,
            HEADLOCK_API__TOKEN=wrong,
        )
        assert refused.returncode == 1
        assert "401" in refused.stderr
        assert "UnauthorizedError" in refused.stderr
        accepted = headlock(
            "run",
            "--backend",
            "apify",
            "--api-base-url",
            url,
            "--handler",
            "tests.sample_handlers:noop",
            "--start-url",
            "https://a.example/",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            cwd=tmp_path,
            APIFY_TOKEN=right,
        )
        assert accepted.returncode == 0, accepted.stderr[-2000:]
    for result in (refused, accepted):
        for text in (result.stdout, result.stderr):
            assert right not in text
            assert wrong not in text
