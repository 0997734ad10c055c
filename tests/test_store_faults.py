"""The embedded store on a full disk: real SQLite files, written by a child process whose file size is capped.

The child (`python -m tests.test_store_faults SCENARIO PATH [ARG]`) lowers its RLIMIT_FSIZE with SIGXFSZ ignored, so
every write past the cap fails with EFBIG as on a full disk; it makes the store calls of the scenario and prints
each call's outcome as JSON. The test then re-opens the file, uncapped, and checks the outcomes against what the
file holds.
"""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner.errors import QueueError
from runner.models import RequestDraft
from runner.queue.sqlite import SqliteQueue
from runner.uniquekey import request_id_for
from tests.conftest import cli_env

Outcome = dict[str, Any]


def url(n: int | str) -> str:
    return f"http://example.com/{n}"


def rid(n: int | str) -> str:
    return request_id_for(url(n))


def draft(n: int | str) -> RequestDraft:
    return RequestDraft(unique_key=url(n), url=url(n))


# -- the child ------------------------------------------------------------------------------------------------------


def _cap_file_size(cap: int) -> None:
    """Writes that would make any file larger than `cap` bytes fail with EFBIG from now on."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _uncap_file_size() -> None:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))


async def _outcome(call: Awaitable[object]) -> Outcome:
    """What a store call did: its result's type, or its error (anything it raises is caught and described)."""
    try:
        result = await call
    except BaseException as exc:  # noqa: BLE001 - the test asserts on whatever escaped
        return {
            "ok": False,
            "error": type(exc).__name__,
            "queue_error": isinstance(exc, QueueError),
            "endpoint": getattr(exc, "endpoint", None),
            "message": str(exc),
        }
    return {"ok": True, "result": type(result).__name__}


async def _group_on_a_full_disk(path: Path, big: int) -> dict[str, Outcome]:
    """Seed a queue, cap the files just above their size, then make five writes that share one group commit,
    the third one `big` bytes; then lift the cap and write once more."""
    queue = SqliteQueue(path)
    outcomes: dict[str, Outcome] = {}
    try:
        await queue.batch_add([draft(n) for n in range(5)], client_key="seed")
        first, second = await queue.get_request(rid(1)), await queue.get_request(rid(2))
        assert first is not None
        assert second is not None
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        _cap_file_size(max(f.stat().st_size for f in files) + 64 * 1024)
        calls = {
            # Alone in the first group; the next five arrive while it is written and go together into the second.
            "warm": queue.batch_add([draft("w")], client_key="a"),
            "handled": queue.update_request(first.model_copy(update={"handled_at": datetime.now(UTC)}), client_key="a"),
            "add": queue.batch_add([draft(10)], client_key="a"),
            "big": queue.update_request(second.model_copy(update={"user_data": {"big": "x" * big}}), client_key="a"),
            "lock": queue.lock_head(limit=1, lock_secs=60, client_key="z"),
            "add2": queue.batch_add([draft(11)], client_key="a"),
        }

        async def run(name: str, call: Awaitable[object]) -> None:
            outcomes[name] = await _outcome(call)

        async with anyio.create_task_group() as tg:
            for name, call in calls.items():
                tg.start_soon(run, name, call)
        _uncap_file_size()
        outcomes["after"] = await _outcome(queue.batch_add([draft(12)], client_key="a"))
    finally:
        await queue.aclose()
    return outcomes


async def _open_on_a_full_disk(path: Path) -> dict[str, Outcome]:
    """Open a new queue with the files capped at 16 KiB and call it; lift the cap and call it again."""
    _cap_file_size(16 * 1024)
    queue = SqliteQueue(path)
    try:
        outcomes = {"first": await _outcome(queue.get_info())}
        _uncap_file_size()
        outcomes["add"] = await _outcome(queue.batch_add([draft(1)], client_key="a"))
    finally:
        await queue.aclose()
    return outcomes


def _child(args: list[str]) -> None:
    scenario, path = args[0], Path(args[1])
    if scenario == "group":
        outcomes = anyio.run(_group_on_a_full_disk, path, int(args[2]))
    else:
        outcomes = anyio.run(_open_on_a_full_disk, path)
    print(json.dumps(outcomes))  # noqa: T201 - the child's answer to the test


def run_child(*args: object) -> dict[str, Outcome]:
    """Run a scenario in a child process; return the outcomes it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_store_faults", *map(str, args)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes: dict[str, Outcome] = json.loads(result.stdout)
    return outcomes


# -- the tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("big", [8 << 20, 512 << 10], ids=["spilled-page-cache", "failed-commit"])
def test_a_group_commit_on_a_full_disk_reports_no_lost_write_as_stored(tmp_path: Path, big: int) -> None:
    """On a full disk no call of a group commit reports a lost write as done; each failure is a QueueError."""
    path = tmp_path / "q.sqlite"
    outcomes = run_child("group", path, big)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

        def present(n: int | str) -> bool:
            return db.execute("SELECT 1 FROM requests WHERE id = ?", (rid(n),)).fetchone() is not None

        in_file = {
            "warm": present("w"),
            "handled": db.execute("SELECT order_no IS NULL FROM requests WHERE id = ?", (rid(1),)).fetchone()[0] == 1,
            "add": present(10),
            "big": db.execute("SELECT length(data) FROM requests WHERE id = ?", (rid(2),)).fetchone()[0] > big,
            "lock": db.execute("SELECT count(*) FROM requests WHERE lock_client = 'z'").fetchone()[0] == 1,
            "add2": present(11),
            "after": present(12),
        }
        rows, total, handled = db.execute(
            "SELECT (SELECT count(*) FROM requests), total, handled FROM queue"
        ).fetchone()
    endpoints = {
        "warm": "batch_add",
        "handled": f"update_request {rid(1)}",
        "add": "batch_add",
        "big": f"update_request {rid(2)}",
        "lock": "lock_head",
        "add2": "batch_add",
    }
    assert set(outcomes) == set(in_file)
    for name, outcome in outcomes.items():
        if outcome["ok"]:
            assert outcome["result"] != "NoneType", f"{name} returned None"
            assert in_file[name], f"{name} reported done, but the file lacks its write"
        else:
            assert outcome["queue_error"], f"{name} raised {outcome['error']}: {outcome['message']}"
            assert outcome["endpoint"] == endpoints[name]
            assert outcome["message"].startswith(endpoints[name])
            assert str(path) in outcome["message"]
    assert not outcomes["big"]["ok"]  # the cap was hit
    assert outcomes["after"]["ok"]
    assert in_file["after"]
    assert rows == total  # counters moved with the rows
    assert handled == in_file["handled"]


def test_opening_on_a_full_disk_raises_queue_unavailable_and_the_next_call_sets_up(tmp_path: Path) -> None:
    """A first call on a full disk raises QueueUnavailableError naming the path; the next one, with room, works."""
    path = tmp_path / "q.sqlite"
    outcomes = run_child("open", path)
    first = outcomes["first"]
    assert (first["ok"], first["error"], first["endpoint"]) == (False, "QueueUnavailableError", "get_info")
    assert str(path) in first["message"]
    assert outcomes["add"] == {"ok": True, "result": "BatchAddResult"}
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT total FROM queue").fetchone() == (1,)


if __name__ == "__main__":
    _child(sys.argv[1:])
