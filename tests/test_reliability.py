"""Never lose a request, never leave a lock: crashes, restarts, slow handlers and stops, with real processes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import headlock, start_headlock
from tests.test_cli import attempts, queue_state, wait_for, write_urls

pytestmark = pytest.mark.slow


def config(path: Path, handler: str, attempts_file: Path, **workers: object) -> Path:
    """Write a run config with `tests.sample_handlers:<handler>` and the given worker settings."""
    options = workers.pop("options", {})
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"attempts_file": str(attempts_file), **options}.items())
    lines = [f'handler = "tests.sample_handlers:{handler}"', f"handler_options = {{ {opts} }}", "[workers]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in workers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pids(log: Path) -> dict[str, list[int]]:
    """Request id -> the pids that attempted it, in order."""
    result: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        request_id, pid = line.split()
        result.setdefault(request_id, []).append(int(pid))
    return result


def test_kill_9_loses_nothing_and_only_the_dead_workers_requests_run_twice(tmp_path: Path) -> None:
    """One of three workers is SIGKILLed mid-crawl: everything ends handled, repeats are its in-flight ones only."""
    count = 120
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    cfg = config(tmp_path / "c.toml", "slow", log, concurrency=4, prefetch=4, lock_secs=2, options={"sleep": 0.3})
    procs = [start_headlock("run", "--config", str(cfg), cwd=tmp_path) for _ in range(3)]
    victim = procs[0]
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
    assert queue_state(tmp_path / "storage") == (count, count, [])


def test_restart_with_the_same_client_key_frees_its_stale_locks_at_once(tmp_path: Path) -> None:
    """A worker killed with 60 s locks and restarted under its key releases them at start instead of waiting."""
    count = 20
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    cfg = config(
        tmp_path / "c.toml", "slow", log, concurrency=2, lock_secs=60, client_key="worker-1", options={"sleep": 30}
    )
    first = start_headlock("run", "--config", str(cfg), cwd=tmp_path)
    wait_for(lambda: sum(attempts(log).values()) >= 2, 20, "two handlers to start")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    _, _, locks = queue_state(tmp_path / "storage")
    assert len(locks) == count  # 2 in flight + prefetched, all locked for 60 s by the dead worker
    cfg = config(tmp_path / "c.toml", "noop", log, concurrency=4, lock_secs=60, client_key="worker-1")
    started = time.monotonic()
    result = headlock("run", "--config", str(cfg), "--log-format", "json", cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - started < 20
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(e["event"] == "run.released_stale_locks" and e["count"] == count for e in events)
    assert queue_state(tmp_path / "storage") == (count, count, [])


def test_graceful_stop_with_50_in_flight_and_25_prefetched(tmp_path: Path) -> None:
    """SIGTERM with 50 handlers running and 25 prefetched: those 25 go back at once, the 50 finish, exit 143."""
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", 200)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    grace = 8.0
    cfg = config(tmp_path / "c.toml", "slow", log, concurrency=50, prefetch=25, grace=grace, options={"sleep": 3})
    summary = tmp_path / "summary.json"
    events = tmp_path / "events.jsonl"
    proc = start_headlock(
        "run", "--config", str(cfg), "--summary", str(summary), "--log-format", "json", cwd=tmp_path, stderr=events
    )
    wait_for(lambda: sum(attempts(log).values()) >= 50, 20, "fifty handlers to start")
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: "shutdown.draining" in events.read_text(), 5, "the drain to start")
    draining = next(json.loads(x) for x in events.read_text().splitlines() if "shutdown.draining" in x)
    assert draining["given_back"] == 25
    assert draining["in_flight"] == 50
    _, locks_mid = queue_state(tmp_path / "storage")[1:]
    assert len(locks_mid) == 50  # the prefetched 25 were released while the 50 still run
    proc.communicate(timeout=grace + 5)
    assert proc.returncode == 143
    assert time.monotonic() - sent < grace + 2
    result = json.loads(summary.read_text())
    assert result["handled"] == 50
    assert sum(attempts(log).values()) == 50
    assert queue_state(tmp_path / "storage") == (200, 50, [])


def test_slow_handlers_with_short_locks_are_never_processed_twice(tmp_path: Path) -> None:
    """Lock 2 s, handlers of 5-10 s, three workers: the heartbeat holds every lock; nothing runs twice."""
    count = 9
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    cfg = config(
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
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
    seen = attempts(log)
    assert len(seen) == count
    assert max(seen.values()) == 1
    assert queue_state(tmp_path / "storage") == (count, count, [])
