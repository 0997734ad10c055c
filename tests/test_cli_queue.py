"""`headlock status`, `requests`, `requeue` and `purge` through the real CLI: output, exit codes, what they leave."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from runner.models import Request, RequestDraft, with_failed_mark
from runner.queue.sqlite import SqliteQueue, queue_path
from runner.uniquekey import request_id_for
from tests._server import running_server
from tests.conftest import ROOT, cli_env, headlock

LONG_ERROR = "ValueError: " + "the price cell is empty " * 20 + "\nTraceback line two"


def url(n: int) -> str:
    return f"http://example.com/{'deep/' * 12}{n}"


def build_queue(
    storage: Path,
    *,
    failed: Sequence[int] = (),
    ok: Sequence[int] = (),
    pending: Sequence[int] = (),
    locked: int = 0,
) -> None:
    """An embedded `default` queue: requests ended as failed (two errors each), ended well, and pending, of which
    the first `locked` are locked for an hour."""

    async def build() -> None:
        store = SqliteQueue(queue_path(storage, "default"))
        try:
            drafts = [
                RequestDraft(unique_key=url(n), url=url(n), user_data={"label": "a-rather-long-label"})
                for n in (*failed, *ok, *pending)
            ]
            await store.get_info()  # the file, even when empty
            await store.batch_add(drafts, client_key="builder")
            for n in (*failed, *ok):
                request = await store.get_request(request_id_for(url(n)))
                assert isinstance(request, Request)
                update: dict[str, object] = {"handled_at": datetime.now(UTC)}
                if n in failed:
                    update |= {
                        "retry_count": 2,
                        "error_messages": ["ValueError: first try", LONG_ERROR],
                        "user_data": with_failed_mark(request.user_data),
                    }
                await store.update_request(request.model_copy(update=update), client_key="builder")
            if locked:
                await store.lock_head(limit=locked, lock_secs=3600, client_key="builder")
        finally:
            await store.aclose()

    anyio.run(build)


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


# -- a queue that does not exist --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["status"], ["status", "--json"], ["requests"], ["requeue", "--failed"], ["purge", "--yes"]],
    ids=" ".join,
)
def test_a_queue_that_does_not_exist_is_said_so_and_not_created(tmp_path: Path, command: list[str]) -> None:
    """Every queue command on a missing queue: one line naming it on stderr, exit 1, no file or directory made."""
    done = headlock(*command, "--queue", "nope", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert lines(done.stderr) == [
        "headlock: error: no queue 'nope': storage/request_queues/nope.sqlite does not exist (nothing was created)"
    ]
    assert not (tmp_path / "storage").exists()


@pytest.mark.slow
def test_a_queue_that_does_not_exist_on_the_api_is_not_created(tmp_path: Path) -> None:
    """status --queue NAME against `headlock serve`: exit 1 naming the queue and the server; the server has no
    such queue afterwards (a GET of ~NAME, not a get-or-create)."""
    with running_server(tmp_path / "server") as api:
        for _ in range(2):
            done = headlock("status", "--backend", "apify", "--api-base-url", api, "--queue", "nope", cwd=tmp_path)
            assert done.returncode == 1, done.stderr
            assert lines(done.stderr) == [f"headlock: error: no queue 'nope' at {api} (nothing was created)"]
    assert not list((tmp_path / "server").glob("request_queues/nope*"))


# -- status -----------------------------------------------------------------------------------------------------


def test_status_counts_failed_apart_from_handled(tmp_path: Path) -> None:
    """Two failed, one ended well, one pending: the table and the JSON say so, with a hint to see the failed."""
    build_queue(tmp_path / "storage", failed=[1, 2], ok=[3], pending=[4])
    done = headlock("status", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = lines(done.stdout)
    assert [line.split() for line in table[:6]] == [
        ["queue", "default"],
        ["total", "4"],
        ["handled", "1"],
        ["failed", "2"],
        ["pending", "1"],
        ["locked", "0"],
    ]
    assert table[-1] == "see them: headlock requests --failed; run them again: headlock requeue --failed"
    report = json.loads(headlock("status", "--json", cwd=tmp_path).stdout)
    assert {k: report[k] for k in ("total", "handled", "failed", "pending", "locked", "exact")} == {
        "total": 4,
        "handled": 1,
        "failed": 2,
        "pending": 1,
        "locked": 0,
        "exact": True,
    }


# -- requests ---------------------------------------------------------------------------------------------------


def test_the_requests_table_fits_120_columns_and_the_json_has_every_error(tmp_path: Path) -> None:
    """Long URLs, labels and a multi-line last error are cut to fit 120 columns; JSON lines carry all errors."""
    build_queue(tmp_path / "storage", failed=[1, 2], ok=[3])
    done = headlock("requests", "--failed", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = lines(done.stdout)
    assert len(table) == 3
    assert max(len(line) for line in table) == 120
    assert sorted(line[:69] for line in table[1:]) == [  # URLs cut in the middle: their ends tell them apart
        f"failed        2 a-rather-lo… http://example.com/d…ep/deep/deep/deep/{n}" for n in (1, 2)
    ]
    assert all("ValueError: the price cell is empty the price" in line and line.endswith("…") for line in table[1:])
    records = [json.loads(line) for line in lines(headlock("requests", "--failed", "--json", cwd=tmp_path).stdout)]
    assert sorted(r["url"] for r in records) == [url(1), url(2)]
    assert all(r["errorMessages"] == ["ValueError: first try", LONG_ERROR] for r in records)
    assert all((r["state"], r["label"], r["retryCount"]) == ("failed", "a-rather-long-label", 2) for r in records)


def test_requests_lists_every_state_and_says_when_it_stops_at_the_limit(tmp_path: Path) -> None:
    """Without a filter each request shows its state; --limit cuts the list and says so on stderr."""
    build_queue(tmp_path / "storage", failed=[1], ok=[2], pending=[3, 4], locked=1)
    records = [json.loads(line) for line in lines(headlock("requests", "--json", cwd=tmp_path).stdout)]
    assert sorted((r["url"], r["state"]) for r in records) == [
        (url(1), "failed"),
        (url(2), "handled"),
        (url(3), "locked"),
        (url(4), "pending"),
    ]
    cut = headlock("requests", "--limit", "2", cwd=tmp_path)
    assert len(lines(cut.stdout)) == 1 + 2
    assert lines(cut.stderr)[-1] == "showing the first 2: --limit N for more"
    build_queue(tmp_path / "empty")
    empty = headlock("requests", "--locked", "--storage-dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert (empty.returncode, empty.stdout, lines(empty.stderr)) == (0, "", ["no locked requests in the queue"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["requests", "--limit", "0"], "--limit: must be a whole number of at least 1"),
        (["requests", "--failed", "--pending"], "not allowed with argument"),
        (["requeue"], "one of the arguments --failed --url is required"),
        (["requeue", "--failed", "--url", "http://example.com/"], "not allowed with argument"),
    ],
)
def test_bad_usage_is_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    """Conflicting or missing flags are argparse errors: exit 2, the rule on stderr, no storage touched."""
    done = headlock(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert needle in done.stderr
    assert not (tmp_path / "storage").exists()


# -- requeue --url ----------------------------------------------------------------------------------------------


def test_requeue_by_url_requeues_the_handled_leaves_the_pending_and_names_the_missing(tmp_path: Path) -> None:
    """A failed and an ended URL are requeued, a pending one is left, one not in the queue is named (exit 1); a
    dry run beforehand changes nothing; an invalid URL is a usage error (exit 2)."""
    build_queue(tmp_path / "storage", failed=[1], ok=[2], pending=[3])
    args = ["requeue", "--url", url(1), url(2), url(3), "http://example.com/missing"]
    dry = headlock(*args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 1
    assert lines(dry.stdout)[0] == "would requeue 2 requests (dry run: nothing changed)"
    assert json.loads(headlock("status", "--json", cwd=tmp_path).stdout)["pending"] == 1
    done = headlock(*args, cwd=tmp_path)
    assert done.returncode == 1
    assert lines(done.stdout) == [
        "requeued 2 requests: pending again with a fresh retry budget, error messages kept",
        "left 1 request as it is: not handled (pending or locked)",
    ]
    assert lines(done.stderr)[0] == "headlock: error: not in the queue: http://example.com/missing"
    counts = json.loads(headlock("status", "--json", cwd=tmp_path).stdout)
    assert (counts["handled"], counts["failed"], counts["pending"]) == (0, 0, 3)
    bad = headlock("requeue", "--url", "not-a-url", cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr


# -- purge ------------------------------------------------------------------------------------------------------


def storage_files(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "storage").rglob("*") if p.is_file())


def with_dataset(tmp_path: Path) -> None:
    build_queue(tmp_path / "storage", ok=[1])
    (tmp_path / "storage" / "datasets").mkdir()
    (tmp_path / "storage" / "datasets" / "default.jsonl").write_text('{"a": 1}\n')


def test_purge_off_a_terminal_needs_yes(tmp_path: Path) -> None:
    """Without --yes and with stdin not a terminal: exit 2, one line naming what it would delete, nothing deleted."""
    with_dataset(tmp_path)
    before = storage_files(tmp_path)
    done = headlock("purge", "--dataset", cwd=tmp_path)
    assert done.returncode == 2
    assert lines(done.stderr) == [
        "headlock: error: purge deletes queue 'default' (storage/request_queues/default.sqlite, 1 request) and"
        " dataset 'default' (storage/datasets/default.jsonl) for good: pass --yes (stdin is not a terminal to ask on)"
    ]
    assert storage_files(tmp_path) == before


def test_purge_yes_deletes_the_queue_files_and_with_dataset_the_results(tmp_path: Path) -> None:
    """--yes deletes the queue file with its -wal/-shm; the dataset only with --dataset."""
    with_dataset(tmp_path)
    done = headlock("purge", "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout) == ["deleted queue 'default' (storage/request_queues/default.sqlite, 1 request)"]
    assert storage_files(tmp_path) == ["storage/datasets/default.jsonl"]
    only_dataset = headlock("purge", "--dataset", "--yes", cwd=tmp_path)  # the queue is gone: the dataset goes
    assert only_dataset.returncode == 0, only_dataset.stderr
    assert lines(only_dataset.stdout) == ["deleted dataset 'default' (storage/datasets/default.jsonl)"]
    assert storage_files(tmp_path) == []
    nothing = headlock("purge", "--dataset", "--yes", cwd=tmp_path)
    assert nothing.returncode == 1


def purge_on_a_terminal(cwd: Path, answer: bytes) -> tuple[int, str]:
    """Run `headlock purge` with a pty as stdin (and stdout), answer its prompt; return the exit code and output."""
    main, child = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "purge"],
            cwd=cwd,
            env=cli_env(PYTHONPATH=str(ROOT)),
            stdin=child,
            stdout=child,
            stderr=child,
        )
        os.close(child)
        output = b""
        deadline = time.monotonic() + 30
        while b"[y/N]" not in output and time.monotonic() < deadline:
            if select.select([main], [], [], 1)[0]:
                output += os.read(main, 4096)
        os.write(main, answer)
        code = proc.wait(timeout=30)
        while select.select([main], [], [], 0.2)[0]:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the child side is closed: all read
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(main)
    return code, output.decode()


@pytest.mark.parametrize(("answer", "code", "kept"), [(b"n\n", 1, True), (b"y\n", 0, False)])
def test_purge_asks_on_a_terminal(tmp_path: Path, answer: bytes, code: int, kept: bool) -> None:
    """On a terminal, purge asks naming the queue; "n" deletes nothing (exit 1), "y" deletes it (exit 0)."""
    build_queue(tmp_path / "storage", ok=[1])
    exit_code, output = purge_on_a_terminal(tmp_path, answer)
    assert "Delete queue 'default' (storage/request_queues/default.sqlite, 1 request)? This cannot be undone." in output
    assert exit_code == code, output
    assert (tmp_path / "storage" / "request_queues" / "default.sqlite").exists() == kept


@pytest.mark.slow
def test_purge_on_the_api_deletes_the_queue_and_the_dataset(tmp_path: Path) -> None:
    """Against `headlock serve`: DELETE of the queue and of its dataset; the server's files are gone."""
    server = tmp_path / "server"
    with running_server(server) as api:
        flags = ["--backend", "apify", "--api-base-url", api, "--queue", "crawl"]
        assert headlock("enqueue", *flags, "http://example.com/1", cwd=tmp_path).returncode == 0
        (server / "datasets").mkdir(exist_ok=True)
        (server / "datasets" / "default.jsonl").write_text('{"a": 1}\n')
        done = headlock("purge", *flags, "--dataset", "--yes", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert lines(done.stdout) == [
            f"deleted queue 'crawl' (at {api}, 1 request)",
            f"deleted dataset 'default' at {api}",
        ]
        assert not list(server.glob("request_queues/crawl*"))
        assert not (server / "datasets" / "default.jsonl").exists()
        again = headlock("status", *flags, cwd=tmp_path)
        assert again.returncode == 1
