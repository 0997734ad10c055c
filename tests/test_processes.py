"""`headlock run --processes N`: N real worker processes on one embedded queue, supervised as one run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from runner.cli._group import _touch_if_fresh, child_argv, child_client_key, combine_summaries, group_exit_code
from runner.queue.protocol import MAX_CLIENT_KEY
from tests.conftest import cli_env, free_port, headlock, reaped, run_config, start_headlock, wait_for
from tests.test_cli import attempting_pids, attempts, logged, queue_state, write_urls


def _enqueue(tmp_path: Path, count: int) -> None:
    result = headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_child_argv_drops_the_options_the_parent_owns_in_any_spelling() -> None:
    """--processes, --summary, --health-file, --metrics-port and --client-key go, as `--x v`, `--x=v` or a prefix."""
    argv = shlex.split(
        "run -c c.toml --processes 2 --summary=s.json --health h --metrics-port 9000 --client-key k "
        "--start-url https://a.example/ -O x=1 --concurrency 3"
    )
    assert child_argv(argv) == shlex.split("run -c c.toml --start-url https://a.example/ -O x=1 --concurrency 3")


def test_child_client_keys_are_distinct_and_within_the_limit() -> None:
    """A stable key K gives K-1, K-2, ...; a key at the limit is cut so K-i stays within it; no key stays random."""
    assert [child_client_key("worker", i) for i in (1, 2)] == ["worker-1", "worker-2"]
    long = "k" * MAX_CLIENT_KEY
    keys = [child_client_key(long, i) for i in (1, 2, 10)]
    assert all(key is not None and len(key) == MAX_CLIENT_KEY for key in keys)
    assert len(set(keys)) == 3
    assert child_client_key(None, 1) is None


@pytest.mark.parametrize(
    ("codes", "signals", "expected"),
    [
        ([0, 0], [], 0),
        ([0, 3], [], 3),
        ([3, 2], [], 2),
        ([2, 1], [], 1),
        ([1, 137, 3], [], 137),
        ([143, 143], [signal.SIGTERM], 143),
        ([137, 0], [signal.SIGINT], 130),
    ],
)
def test_the_group_exit_code_is_the_worst_childs_or_the_signals(
    codes: list[int], signals: list[int], expected: int
) -> None:
    """A signal to the parent gives 128+n; else killed > fatal > usage > failed requests > 0."""
    assert group_exit_code(codes, signals) == expected


def test_combined_summary_adds_up_and_merges_the_top_errors() -> None:
    """Counters are summed, top errors merged by message, pending is the last child's, children listed."""
    children = [
        {"reason": "finished", "handled": 3, "failed": 1, "items": 3, "released": 0, "pending": 5, "exit_code": 0,
         "failed_top": [{"count": 1, "error": "E"}], "results": "r.jsonl", "client_key": "a", "pid": 1},
        {"reason": "died", "exit_code": 137, "pid": 2},
        {"reason": "finished", "handled": 4, "failed": 2, "items": 4, "released": 1, "pending": 0, "exit_code": 0,
         "failed_top": [{"count": 2, "error": "E"}, {"count": 1, "error": "F"}], "results": "r.jsonl",
         "client_key": "b", "pid": 3},
    ]  # fmt: skip
    summary = combine_summaries(children, last=2, duration=2.0, signal_name=None)
    assert (summary["handled"], summary["failed"], summary["items"], summary["released"]) == (7, 3, 7, 1)
    assert summary["failed_top"] == [{"count": 3, "error": "E"}, {"count": 1, "error": "F"}]
    assert (summary["reason"], summary["pending"], summary["results"]) == ("died", 0, "r.jsonl")
    assert [c["exit_code"] for c in summary["children"]] == [0, 137, 0]
    assert summary["pages_per_min"] == 210.0


def test_the_group_health_file_is_touched_only_while_every_running_child_is_fresh(tmp_path: Path) -> None:
    """The parent's health file is touched when all children's files are fresh, not when one is stale or missing."""
    group, fresh, stale = tmp_path / "group.health", tmp_path / "a.health", tmp_path / "b.health"
    fresh.touch()
    stale.touch()
    os.utime(stale, (time.time() - 60, time.time() - 60))
    _touch_if_fresh(group, [fresh, stale])
    _touch_if_fresh(group, [fresh, tmp_path / "missing.health"])
    assert not group.exists()
    _touch_if_fresh(group, [fresh])
    assert group.exists()


@pytest.mark.slow
def test_two_processes_handle_every_request_once(tmp_path: Path) -> None:
    """--processes 2 over 200 requests: each handled once, both processes work, the one summary adds up, exit 0."""
    _enqueue(tmp_path, 200)
    log, gate = tmp_path / "attempts.log", tmp_path / "gate"
    config = run_config(tmp_path / "c.toml", "gated", log, concurrency=5, prefetch=10, options={"gate": str(gate)})
    summary, events = tmp_path / "summary.json", tmp_path / "events.jsonl"
    proc = start_headlock(
        "run", "--config", str(config), "--processes", "2", "--summary", str(summary), "--log-format", "json",
        "--client-key", "crawler", cwd=tmp_path, stderr=events,
    )  # fmt: skip
    with reaped(proc):
        # Handlers wait at the gate until both processes hold work: neither can take it all first.
        wait_for(lambda: len(attempting_pids(log)) == 2, 30, "both processes to start handlers")
        gate.touch()
        proc.communicate(timeout=60)
    assert proc.returncode == 0, events.read_text()[-3000:]
    counted = attempts(log)
    assert len(counted) == 200
    assert set(counted.values()) == {1}
    result = json.loads(summary.read_text())
    assert (result["reason"], result["handled"], result["items"], result["exit_code"]) == ("finished", 200, 200, 0)
    assert sorted(c["client_key"] for c in result["children"]) == ["crawler-1", "crawler-2"]
    assert {str(c["pid"]) for c in result["children"]} == attempting_pids(log)
    assert sum(c["handled"] for c in result["children"]) == 200
    assert all(c["handled"] > 0 for c in result["children"])
    [finished] = [e for e in logged(events, "run.finished") if e.get("processes") == 2]
    assert finished["handled"] == 200
    assert queue_state(tmp_path / "storage") == (200, 200, [])


def _serves_metrics(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return b"headlock_requests_handled_total" in answer.read()
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_to_the_parent_drains_every_child_and_leaves_no_lock(tmp_path: Path) -> None:
    """SIGTERM to the parent: both children drain (in-flight finish), exit 143 within grace + 10 s, no lock left;
    meanwhile the group's health file is fresh and each child serves metrics on port P+i."""
    _enqueue(tmp_path, 100)
    log, gate = tmp_path / "attempts.log", tmp_path / "gate"
    grace = 20.0
    config = run_config(
        tmp_path / "c.toml", "gated", log, concurrency=3, prefetch=5, grace=grace, options={"gate": str(gate)}
    )
    summary, events, health = tmp_path / "summary.json", tmp_path / "events.jsonl", tmp_path / "group.health"
    port = free_port()
    proc = start_headlock(
        "run", "--config", str(config), "--processes", "2", "--summary", str(summary), "--log-format", "json",
        "--health-file", str(health), "--metrics-port", str(port), cwd=tmp_path, stderr=events,
    )  # fmt: skip
    with reaped(proc):
        wait_for(lambda: len(attempting_pids(log)) == 2 and sum(attempts(log).values()) == 6, 30, "3 handlers each")
        wait_for(health.exists, 15, "the group's health file")
        assert _serves_metrics(port + 1)
        assert _serves_metrics(port + 2)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        wait_for(lambda: len(logged(events, "shutdown.draining")) == 2, 10, "both children to start draining")
        gate.touch()
        proc.communicate(timeout=grace + 10)
    assert time.monotonic() - sent < grace + 10
    assert proc.returncode == 143, events.read_text()[-3000:]
    result = json.loads(summary.read_text())
    assert (result["reason"], result["exit_code"], result["handled"]) == ("SIGTERM", 143, 6)
    assert [c["exit_code"] for c in result["children"]] == [143, 143]
    assert sum(attempts(log).values()) == 6  # nothing started after the signal
    assert queue_state(tmp_path / "storage") == (100, 6, [])


@pytest.mark.slow
def test_ctrl_c_on_the_terminal_reaches_each_child_once(tmp_path: Path) -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C) stops the children gracefully, not as a second
    signal: their in-flight handlers finish and the group exits 130."""
    _enqueue(tmp_path, 20)
    log, gate = tmp_path / "attempts.log", tmp_path / "gate"
    config = run_config(tmp_path / "c.toml", "gated", log, concurrency=2, prefetch=0, options={"gate": str(gate)})
    summary = tmp_path / "summary.json"
    with (tmp_path / "events.jsonl").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "run", "--config", str(config), "--processes", "2", "--summary",
             str(summary), "--log-format", "json"],
            cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True,
        )  # fmt: skip
    events = tmp_path / "events.jsonl"
    with reaped(proc):
        wait_for(lambda: sum(attempts(log).values()) == 4, 30, "2 handlers each")
        os.killpg(proc.pid, signal.SIGINT)
        wait_for(lambda: len(logged(events, "shutdown.draining")) == 2, 10, "both children to start draining")
        gate.touch()
        proc.communicate(timeout=30)
    assert proc.returncode == 130, events.read_text()[-3000:]
    assert not logged(events, "shutdown.forced")
    assert json.loads(summary.read_text())["handled"] == 4
    assert queue_state(tmp_path / "storage") == (20, 4, [])


@pytest.mark.slow
def test_a_killed_child_loses_nothing_and_the_other_finishes_the_queue(tmp_path: Path) -> None:
    """SIGKILL to one child: the other goes on, takes the dead one's requests once their locks expire, handles
    every request; the group exits 137 (128+9) and names the dead child."""
    _enqueue(tmp_path, 40)
    log, gate = tmp_path / "attempts.log", tmp_path / "gate"
    config = run_config(
        tmp_path / "c.toml", "gated", log, concurrency=3, prefetch=3, lock_secs=2, options={"gate": str(gate)}
    )
    summary, events = tmp_path / "summary.json", tmp_path / "events.jsonl"
    proc = start_headlock(
        "run", "--config", str(config), "--processes", "2", "--summary", str(summary), "--log-format", "json",
        cwd=tmp_path, stderr=events,
    )  # fmt: skip
    with reaped(proc):
        wait_for(lambda: len(attempting_pids(log)) == 2, 30, "both processes to start handlers")
        victim = int(log.read_text().split()[1])
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: logged(events, "group.child_died"), 10, "the death to be seen")
        gate.touch()
        proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL, events.read_text()[-3000:]
    assert queue_state(tmp_path / "storage") == (40, 40, [])
    assert len(attempts(log)) == 40
    result = json.loads(summary.read_text())
    dead = {c["pid"]: c for c in result["children"]}[victim]
    assert (dead["reason"], dead["exit_code"]) == ("died", 137)
    assert result["handled"] == 40
    assert result["exit_code"] == 137


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_a_bad_processes_value_exits_2_naming_the_option(tmp_path: Path, value: str) -> None:
    """--processes takes a positive integer or `auto`; anything else is exit 2 naming --processes."""
    result = headlock("run", "--handler", "tests.sample_handlers:noop", "--processes", value, cwd=tmp_path)
    assert result.returncode == 2
    assert "--processes" in result.stderr
    assert "positive integer or 'auto'" in result.stderr


def test_processes_on_the_apify_platform_is_refused(tmp_path: Path) -> None:
    """On the Apify platform --processes 2 is a config error (exit 2) naming --processes; nothing is started."""
    result = headlock(
        "run", "--handler", "tests.sample_handlers:noop", "--processes", "2", "--log-format", "json",
        cwd=tmp_path, APIFY_IS_AT_HOME="1",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "--processes" in json.loads(line)["error"]
    assert not (tmp_path / "storage").exists()
