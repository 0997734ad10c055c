"""`configure_logging`: records of libraries that log with `logging` come out in our format, secrets scrubbed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from runner.logs import configure_logging


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
