"""`configure_logging`: records of libraries that log with `logging` come out in our format, secrets scrubbed."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from runner.logs import configure_logging
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put the root logger's handlers and level, and structlog's configuration, back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_a_librarys_warning_is_one_json_line_with_its_logger_and_no_secret(restored_logging: None) -> None:
    """psycopg's pool warns through `logging` when the database goes away: in a JSON log that is one JSON object
    (not a bare text line a log shipper cannot parse), naming its logger, with secrets scrubbed; its info is not
    shown, and configuring again replaces the handler instead of doubling every line."""
    stream = io.StringIO()
    configure_logging(fmt="json", secrets=["hunter2"], stream=io.StringIO())
    configure_logging(fmt="json", secrets=["hunter2"], stream=stream)
    pool = logging.getLogger("psycopg.pool")
    pool.warning("error connecting in %r: password hunter2 refused", "headlock")
    pool.info("connection added to the pool")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "error connecting in 'headlock': password *** refused"
    assert (record["level"], record["logger"]) == ("warning", "psycopg.pool")
    assert "timestamp" in record


def test_a_librarys_error_on_the_console_is_a_line_of_ours(restored_logging: None) -> None:
    """The console format renders it like our own events (a level and the text, no JSON)."""
    stream = io.StringIO()
    configure_logging(fmt="console", stream=stream)
    logging.getLogger("httpx").error("boom")
    text = stream.getvalue()
    assert "boom" in text
    assert "error" in text
    assert not text.lstrip().startswith("{")


_CHILD = """
import sys, time
from pathlib import Path
import structlog
from runner.logs import configure_logging
configure_logging(fmt="json")
log = structlog.get_logger("headlock.test")
lines, who, ready, go = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:  # both start writing at once
    time.sleep(0.001)
for n in range(lines):
    log.info("test.line", n=n, who=who)
"""


def test_json_lines_of_processes_sharing_one_stream_never_cut_into_each_other(tmp_path: Path) -> None:
    """`run --processes N` children (and a container's processes) share one stderr: each JSON line must go out in
    one write, or two processes' lines interleave (print wrote the text and its newline apart: hundreds of broken
    lines in 6,000 here). The two start writing together, once both are ready."""
    lines_each = 3_000
    out, go = tmp_path / "err.jsonl", tmp_path / "go"
    ready = [tmp_path / f"ready-{who}" for who in ("a", "b")]
    with out.open("w") as err:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(lines_each), who, str(flag), str(go)], stderr=err, cwd=ROOT
            )
            for who, flag in zip(("a", "b"), ready, strict=True)
        ]
        wait_for(lambda: all(flag.exists() for flag in ready), 30, "both children ready")
        go.touch()
        for child in children:
            assert child.wait(timeout=60) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * lines_each
    for who in ("a", "b"):
        assert [r["n"] for r in records if r["who"] == who] == list(range(lines_each))
