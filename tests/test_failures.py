"""Failed requests, first-class: a crawl where some fail, seen (`status`, `requests --failed`), requeued after a fix
and handled by the re-run, through the real CLI on the embedded store and on `headlock serve`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner.models import RequestDraft
from runner.queue.sqlite import SqliteQueue, queue_path
from runner.results.jsonl import read_items
from tests._server import running_server
from tests.conftest import headlock

PAGES = 12
BROKEN = [0, 3, 6, 9]  # the multiples of 3: tests.failing_handlers's default
MAX_RETRIES = 1


def write_config(path: Path, tmp: Path, handler: str, api: str | None) -> Path:
    """A run config for `tests.failing_handlers:<handler>`, fixed once `tmp/fixed` exists; on `api` if given."""
    lines = [
        f'handler = "tests.failing_handlers:{handler}"',
        f'handler_options = {{ fixed = "{tmp / "fixed"}" }}',
        'queue = { name = "crawl" }',
        "[workers]",
        f"max_retries = {MAX_RETRIES}",
        "retry_backoff = 0",
        "concurrency = 4",
    ]
    if api is not None:
        lines[2] = 'queue = { name = "crawl", backend = "apify" }'
        lines += ["[api]", f'base_url = "{api}"']
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def backend(kind: str, tmp: Path) -> Iterator[tuple[str | None, Path]]:
    """(API base URL or None, the storage directory the queue and the results live in)."""
    if kind == "embedded":
        yield None, tmp / "storage"
        return
    with running_server(tmp / "server") as url:
        yield url, tmp / "server"


def cli(*args: str, cwd: Path, config: Path) -> tuple[int, str, str]:
    done = headlock(*args, "--config", str(config), "--log-format", "json", cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def status(cwd: Path, config: Path) -> dict[str, Any]:
    code, out, err = cli("status", "--json", cwd=cwd, config=config)
    assert code == 0, err
    counts: dict[str, Any] = json.loads(out)
    return counts


def urls(site: str) -> list[str]:
    return [f"{site}/page/{n}" for n in range(PAGES)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "api"])
def test_a_crawl_with_failures_is_seen_requeued_and_handled_by_the_rerun(site: str, tmp_path: Path, kind: str) -> None:
    """12 pages, 4 the handler cannot parse: the run exits 0 with 8 handled and 4 failed (each tried 1 + 1 times),
    `requests --failed` lists them with their errors, a dry run changes nothing, `requeue --failed` after the fix
    returns them to pending (retry count 0, errors kept) and the re-run handles them; requeueing again does nothing."""
    with backend(kind, tmp_path) as (api, storage):
        config = write_config(tmp_path / "crawl.toml", tmp_path, "flaky", api)
        (tmp_path / "urls.txt").write_text("\n".join(urls(site)) + "\n")
        assert cli("enqueue", "--file", str(tmp_path / "urls.txt"), cwd=tmp_path, config=config)[0] == 0
        code, _, err = cli("run", cwd=tmp_path, config=config)
        assert code == 0, err[-3000:]
        counts = status(tmp_path, config)
        assert {k: counts[k] for k in ("total", "handled", "failed", "pending", "locked")} == {
            "total": PAGES,
            "handled": PAGES - len(BROKEN),
            "failed": len(BROKEN),
            "pending": 0,
            "locked": 0,
        }
        assert counts["exact"] is True

        code, out, err = cli("requests", "--failed", "--json", cwd=tmp_path, config=config)
        assert code == 0, err
        failed = [json.loads(line) for line in out.splitlines()]
        broken = {f"{site}/page/{n}" for n in BROKEN}
        assert {r["url"] for r in failed} == broken
        for record in failed:
            assert (record["state"], record["retryCount"]) == ("failed", MAX_RETRIES + 1)
            assert record["errorMessages"] == [f"ValueError: no price on {record['url']}"] * (MAX_RETRIES + 1)
        code, table, _ = cli("requests", "--failed", cwd=tmp_path, config=config)
        lines = table.splitlines()
        assert lines[0].split() == ["STATE", "RETRIES", "LABEL", "URL", "LAST", "ERROR"]
        assert len(lines) == 1 + len(BROKEN)
        assert all(line.startswith("failed") and "ValueError: no price on" in line for line in lines[1:])
        assert max(map(len, lines)) <= 120

        code, out, _ = cli("requeue", "--failed", "--dry-run", cwd=tmp_path, config=config)
        assert (code, out.splitlines()[0]) == (0, "would requeue 4 failed requests (dry run: nothing changed)")
        assert status(tmp_path, config)["failed"] == len(BROKEN)

        (tmp_path / "fixed").touch()  # the user fixes the parser
        code, out, err = cli("requeue", "--failed", cwd=tmp_path, config=config)
        assert code == 0, err
        assert out.startswith("requeued 4 failed requests: pending again with a fresh retry budget")
        counts = status(tmp_path, config)
        assert (counts["handled"], counts["failed"], counts["pending"]) == (PAGES - len(BROKEN), 0, len(BROKEN))
        code, out, _ = cli("requests", "--pending", "--json", cwd=tmp_path, config=config)
        pending = [json.loads(line) for line in out.splitlines()]
        assert {r["url"] for r in pending} == broken
        assert all(r["retryCount"] == 0 and len(r["errorMessages"]) == MAX_RETRIES + 1 for r in pending)

        code, _, err = cli("run", cwd=tmp_path, config=config)
        assert code == 0, err[-3000:]
        counts = status(tmp_path, config)
        assert (counts["handled"], counts["failed"], counts["pending"]) == (PAGES, 0, 0)
        assert sorted(item["url"] for item in read_items(storage / "datasets" / "default.jsonl")) == sorted(urls(site))
        code, out, _ = cli("requeue", "--failed", cwd=tmp_path, config=config)
        assert (code, out) == (0, "no failed requests to requeue\n")


@pytest.mark.slow
def test_no_retry_fails_a_request_at_once_and_counts_it_failed(site: str, tmp_path: Path) -> None:
    """A handler raising NoRetry: each broken page is tried once, ends failed with that one error."""
    config = write_config(tmp_path / "crawl.toml", tmp_path, "refuses", None)
    assert cli("enqueue", *urls(site)[:4], cwd=tmp_path, config=config)[0] == 0
    code, _, err = cli("run", cwd=tmp_path, config=config)
    assert code == 0, err[-3000:]
    assert (status(tmp_path, config)["handled"], status(tmp_path, config)["failed"]) == (2, 2)
    _, out, _ = cli("requests", "--failed", "--json", cwd=tmp_path, config=config)
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["url"] for r in records) == [f"{site}/page/0", f"{site}/page/3"]
    assert all(r["retryCount"] == 1 and len(r["errorMessages"]) == 1 for r in records)
    assert all("gone for good" in r["errorMessages"][0] for r in records)


def test_a_marker_left_on_a_pending_request_is_cleared_when_it_succeeds(site: str, tmp_path: Path) -> None:
    """A request put back to pending by hand with the failed marker still in userData, then handled well, counts
    as handled, not failed: the marker is cleared with the handled mark."""
    storage = tmp_path / "storage"

    async def add() -> None:
        store = SqliteQueue(queue_path(storage, "default"))
        try:
            draft = RequestDraft(
                unique_key=f"{site}/page/1", url=f"{site}/page/1", user_data={"__crawlee": {"state": 6}, "k": 1}
            )
            await store.batch_add([draft], client_key="by-hand")
        finally:
            await store.aclose()

    anyio.run(add)
    done = headlock("run", "--handler", "tests.sample_handlers:noop", "--log-format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(headlock("status", "--json", cwd=tmp_path).stdout)
    assert (counts["handled"], counts["failed"]) == (1, 0)
    [record] = [json.loads(line) for line in headlock("requests", "--json", cwd=tmp_path).stdout.splitlines()]
    assert record["state"] == "handled"
