"""The real `headlock` CLI in subprocesses: multi-process runs, signals, status/unlock and bad input."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner import SqliteQueue
from runner.results.jsonl import read_items
from tests.conftest import headlock, reaped, run_config, start_headlock, wait_for


def write_urls(path: Path, count: int, prefix: str = "https://a.example/p") -> Path:
    """A URL file with `count` URLs."""
    path.write_text("".join(f"{prefix}{i}\n" for i in range(count)))
    return path


def attempts(path: Path) -> Counter[str]:
    """Request ids recorded by tests.sample_handlers, counted."""
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line)


def attempting_pids(path: Path) -> set[str]:
    """The pids recorded by tests.sample_handlers, one per process that started a handler."""
    if not path.exists():
        return set()
    return {fields[1] for fields in map(str.split, path.read_text().splitlines()) if len(fields) == 2}


def logged(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log events named `event` written to `path` so far (a line still being written is left out)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    found = (json.loads(line) for line in lines if line.endswith("\n") and f'"{event}"' in line)
    return [record for record in found if record.get("event") == event]


def progressed(path: Path, *, in_flight: int, prefetched: int) -> bool:
    """Whether a `run.progress` event in `path` shows exactly `in_flight` handlers running and `prefetched` waiting."""
    return any(e["in_flight"] == in_flight and e["prefetched"] == prefetched for e in logged(path, "run.progress"))


async def read_queue_state(storage: Path, name: str = "default") -> tuple[int, int, list[tuple[str, str, object]]]:
    """(total, handled, locks) of an embedded queue."""
    queue = SqliteQueue.open(storage, name)
    try:
        info = await queue.get_info()
        return info.total_request_count, info.handled_request_count, list(await queue.locks())
    finally:
        await queue.aclose()


def queue_state(storage: Path, name: str = "default") -> tuple[int, int, list[tuple[str, str, object]]]:
    """(total, handled, locks) of an embedded queue, from synchronous code."""
    return anyio.run(read_queue_state, storage, name)


def test_enqueue_status_unlock_round_trip(tmp_path: Path) -> None:
    """URLs are enqueued once (dedup by normalized URL), status reports counts, unlock answers for a key."""
    urls = write_urls(tmp_path / "urls.txt", 5)
    first = headlock("enqueue", "--file", str(urls), "https://A.example/p0/#frag", "--log-format", "json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    done = json.loads(first.stderr.strip().splitlines()[-1])
    assert (done["event"], done["given"], done["added"]) == ("enqueue.done", 6, 5)
    status = headlock("status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) | {"locks_by_client": {}} == {
        "queue": "default",
        "total": 5,
        "handled": 0,
        "failed": 0,
        "pending": 5,
        "had_multiple_clients": False,
        "locked": 0,
        "locks_by_client": {},
        "exact": True,
    }
    unlock = headlock("unlock", "--client-key", "nobody", cwd=tmp_path)
    assert unlock.returncode == 0, unlock.stderr


@pytest.mark.slow
def test_three_processes_on_one_queue_handle_each_request_once(tmp_path: Path) -> None:
    """Three `headlock run` processes sharing one SQLite queue handle every request exactly once."""
    count = 600
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    gate = tmp_path / "gate"
    options = {"gate": str(gate), "sleep": 0.05}
    config = run_config(tmp_path / "c.toml", "gated", log, concurrency=8, batch=5, options=options)
    procs = [start_headlock("run", "--config", str(config), cwd=tmp_path) for _ in range(3)]
    with reaped(*procs):
        # Handlers wait at the gate until every process has started one, so the work is shared however unevenly
        # the three start up (each holds at most 33 of the 600 meanwhile).
        wait_for(lambda: len(attempting_pids(log)) == 3, 30, "each process to start a handler")
        gate.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-2000:]
    seen = attempts(log)
    assert len(seen) == count
    assert max(seen.values()) == 1
    assert len(read_items(tmp_path / "storage/datasets/default.jsonl")) == count
    assert attempting_pids(log) == {str(proc.pid) for proc in procs}
    total, handled, locks = queue_state(tmp_path / "storage")
    assert (total, handled, locks) == (count, count, [])


@pytest.mark.slow
def test_heartbeat_keeps_slow_requests_locked_across_processes(tmp_path: Path) -> None:
    """Lock 2 s, handlers of 7 s, two processes: each request is processed once; the heartbeat prolonged it."""
    count = 4
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", count)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    config = run_config(
        tmp_path / "c.toml",
        "slow",
        log,
        concurrency=2,
        prefetch=0,
        lock_secs=2,
        handler_timeout=30,
        options={"sleep": 7},
    )
    summaries = [tmp_path / f"summary{i}.json" for i in range(2)]
    procs = [start_headlock("run", "--config", str(config), "--summary", str(s), cwd=tmp_path) for s in summaries]
    with reaped(*procs):
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-2000:]
    seen = attempts(log)
    assert len(seen) == count
    assert max(seen.values()) == 1
    results = [json.loads(s.read_text()) for s in summaries]
    assert sum(r["handled"] for r in results) == count
    assert sum(r["lost"] for r in results) == 0
    assert sum(r["prolonged"] for r in results) >= count * 2
    assert queue_state(tmp_path / "storage") == (count, count, [])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_crawl_drains_and_leaves_no_lock(tmp_path: Path, signum: signal.Signals) -> None:
    """A signal mid-crawl: the prefetched are given back, in-flight handlers finish, exit 128+signum, no lock left."""
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", 100)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    gate = tmp_path / "gate"
    grace = 30.0
    config = run_config(
        tmp_path / "c.toml", "gated", log, concurrency=5, prefetch=10, grace=grace, options={"gate": str(gate)}
    )
    summary = tmp_path / "summary.json"
    events = tmp_path / "events.jsonl"
    proc = start_headlock(
        "run",
        "--config",
        str(config),
        "--summary",
        str(summary),
        "--log-format",
        "json",
        cwd=tmp_path,
        stderr=events,
        HEADLOCK_PROGRESS_EVERY="0.2",
    )
    with reaped(proc):
        # Handlers wait at the gate: when the signal comes, exactly 5 run and 10 wait, however fast the machine is.
        wait_for(lambda: progressed(events, in_flight=5, prefetched=10), 30, "5 handlers running and 10 prefetched")
        proc.send_signal(signum)
        wait_for(lambda: logged(events, "shutdown.draining"), 10, "the drain to start")
        gate.touch()
        released = time.monotonic()
        proc.communicate(timeout=grace + 10)
    assert proc.returncode == 128 + signum, events.read_text()[-2000:]
    # The drain ends when the last handler does, not at the grace deadline; half the grace is a generous bound.
    assert time.monotonic() - released < grace / 2
    [draining] = logged(events, "shutdown.draining")
    assert (draining["given_back"], draining["in_flight"]) == (10, 5)
    result = json.loads(summary.read_text())
    assert result["reason"] == signum.name
    assert (result["handled"], result["given_back"]) == (5, 10)  # the in-flight ones finished, the rest went back
    assert sum(attempts(log).values()) == 5  # nothing started after the signal
    assert queue_state(tmp_path / "storage") == (100, 5, [])


@pytest.mark.slow
def test_second_signal_skips_the_grace_period_and_still_unlocks(tmp_path: Path) -> None:
    """A second SIGTERM cancels in-flight handlers at once; their locks are still released."""
    assert headlock("enqueue", "--file", str(write_urls(tmp_path / "u.txt", 10)), cwd=tmp_path).returncode == 0
    log = tmp_path / "attempts.log"
    grace = 60.0
    config = run_config(tmp_path / "c.toml", "slow", log, concurrency=3, grace=grace, options={"sleep": 60})
    events = tmp_path / "events.jsonl"
    proc = start_headlock("run", "--config", str(config), "--log-format", "json", cwd=tmp_path, stderr=events)
    with reaped(proc):
        wait_for(lambda: sum(attempts(log).values()) >= 3, 20, "three handlers to start")
        proc.send_signal(signal.SIGTERM)
        # Signals of one kind coalesce while pending: send the second once the first is being handled.
        wait_for(lambda: logged(events, "shutdown.draining"), 10, "the first signal to be handled")
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.communicate(timeout=grace / 2)
    assert proc.returncode == 143, events.read_text()[-2000:]
    assert logged(events, "shutdown.forced")
    # Without the second signal the run would last the whole grace (the handlers sleep 60 s): a third of it is a
    # generous bound for "at once" on a loaded machine.
    assert time.monotonic() - sent < grace / 3
    assert sum(attempts(log).values()) == 3  # nothing started after the first signal
    assert queue_state(tmp_path / "storage") == (10, 0, [])


@pytest.mark.parametrize(
    ("config", "flags", "expected"),
    [
        ('handler = "x:y\n', [], "malformed TOML"),
        ('handler = "x:y"\nbogus = 1\n', [], "bogus: unknown key"),
        ("[workers]\nbatch = 26\n", [], "workers.batch: Input should be less than or equal to 25"),
        ("[workers]\nlock_secs = 0\n", [], "workers.lock_secs: Input should be greater than 0"),
        ("[workers]\nconcurrency = -1\n", [], "workers.concurrency"),
        ("", ["--client-key", "k" * 40], "workers.client_key: Value error, must be 1-32 characters long, got 40"),
        ("", ["--handler", "no_such_module:handle"], "cannot import module 'no_such_module'"),
        ("", ["--handler", "handlers.fetch"], "handler must be written module:function"),
        ("", ["--handler", "handlers.fetch:missing"], "has no 'missing'"),
        ("", ["--handler", "json:dumps"], "is not an async function"),
        ("", ["--handler", "handlers.fetch:handle", "--start-url", "ftp://a.example/"], "not an absolute http(s) URL"),
        ("", [], "handler: required"),
    ],
)
def test_bad_config_is_a_clear_error_with_exit_2(tmp_path: Path, config: str, flags: list[str], expected: str) -> None:
    """Each bad setting names its key and rule and exits 2, before touching the queue."""
    path = tmp_path / "bad.toml"
    path.write_text(config)
    result = headlock("run", "--config", str(path), "--log-format", "json", *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "storage/request_queues").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://a.example/x", "/relative", "http://"])
def test_enqueue_refuses_invalid_urls_and_adds_nothing(tmp_path: Path, url: str) -> None:
    """An invalid or non-HTTP URL among valid ones is refused with exit 2; nothing at all is enqueued."""
    result = headlock("enqueue", "https://ok.example/", url, "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 2
    assert "not an absolute http(s) URL" in result.stderr
    assert not (tmp_path / "storage/request_queues").exists()


def test_config_file_missing(tmp_path: Path) -> None:
    """A missing config file is named in the error."""
    result = headlock("run", "--config", "nope.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "config file not found: nope.toml" in result.stderr


def test_help_everywhere(tmp_path: Path) -> None:
    """Every command answers --help."""
    for command in ([], ["run"], ["enqueue"], ["status"], ["unlock"], ["serve"]):
        result = headlock(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0
        assert "usage: headlock" in result.stdout


def test_the_unique_key_convention_applies_to_enqueued_urls(tmp_path: Path) -> None:
    """`queue.unique_keys = "crawlee-python"` keys the URLs `headlock enqueue` adds as crawlee-python does
    (the whole URL lower-cased), so a headlock worker and a Python crawlee Actor share one queue without doubles."""
    from runner.uniquekey import normalize_url, request_id_for  # noqa: PLC0415 - only this test needs them

    url = "https://Example.com/Path/A?B=1"
    expected = normalize_url(url, "crawlee-python")
    assert expected != normalize_url(url)  # the conventions really differ on this URL
    done = headlock("enqueue", url, cwd=tmp_path, HEADLOCK_QUEUE__UNIQUE_KEYS="crawlee-python")
    assert done.returncode == 0, done.stderr
    bad = headlock("enqueue", url, cwd=tmp_path, HEADLOCK_QUEUE__UNIQUE_KEYS="scrapy")
    assert bad.returncode == 2
    assert "queue.unique_keys" in bad.stderr

    async def stored() -> tuple[str | None, int]:
        queue = await anyio.to_thread.run_sync(SqliteQueue.open, tmp_path / "storage", "default")
        try:
            request = await queue.get_request(request_id_for(expected))
            return (None if request is None else request.unique_key), (await queue.get_info()).total_request_count
        finally:
            await queue.aclose()

    assert anyio.run(stored) == (expected, 1)


def test_headlock_serve_takes_the_runs_default_storages(tmp_path: Path) -> None:
    """`headlock serve --default-dataset-id ...` (the CLI, not only `python -m runner.server`) reports the given
    default storages on every run; a default id that is no valid name is exit 2 naming the flag."""
    import subprocess  # noqa: PLC0415 - only this test starts the server by hand
    import sys  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    from tests._server import read_listening_url  # noqa: PLC0415
    from tests.conftest import cli_env  # noqa: PLC0415

    command = [sys.executable, "-m", "runner", "serve", "--port", "0", "--storage", str(tmp_path / "s")]
    ids = ["--default-queue-id", "q1", "--default-dataset-id", "d1", "--default-kv-store-id", "k1"]
    with subprocess.Popen([*command, *ids], stdout=subprocess.PIPE, env=cli_env(), cwd=tmp_path) as proc:
        try:
            url = read_listening_url(proc)
            run = httpx.get(f"{url}/v2/actor-runs/any-run", timeout=10).json()["data"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert (run["defaultRequestQueueId"], run["defaultDatasetId"], run["defaultKeyValueStoreId"]) == ("q1", "d1", "k1")
    bad = headlock("serve", "--port", "0", "--default-dataset-id", "no/slash", cwd=tmp_path)
    assert bad.returncode == 2
    assert "--default-dataset-id" in bad.stderr
