"""What a run tells people: the progress fields and line, the final block, the error tally, the handler's traceback."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from runner import Context, JsonlDataset, NoRetry, Router, SqliteQueue, WorkerSettings, run
from runner.cli._args import handler_option, overrides
from runner.leases import Leases
from runner.logs import ConsoleLines, duration, progress_line, summary_block
from runner.models import utc_now
from runner.progress import report_progress
from runner.stats import ErrorTally, RunStats, error_group
from tests.conftest import seed

PROGRESS_LINE = re.compile(
    r"[\d,]+ pages \([\d.,]+/min\), [\d,]+ items, [\d,]+ failed, [\d,]+ running"
    r"(, [\d,]+ pending)?(, \d+%)?(, ETA \w+)?"
)
PLATFORM_FIELDS = {"handled", "failed", "retried", "rate", "in_flight", "prefetched", "pending"}
"""What runner/actor/platform.py's status message reads from the progress hook."""


class Reports:
    """A progress hook that keeps the reports and wakes a waiter at each."""

    def __init__(self) -> None:
        self.fields: list[Mapping[str, Any]] = []
        self._new = anyio.Event()

    def __call__(self, fields: Mapping[str, Any]) -> None:
        self.fields.append(fields)
        self._new.set()
        self._new = anyio.Event()

    async def wait_for(self, count: int) -> None:
        """Return once `count` reports came."""
        while len(self.fields) < count:
            await self._new.wait()


def fast(**overrides: object) -> WorkerSettings:
    """Worker settings for tests: no retry backoff, short grace."""
    return WorkerSettings.model_validate({"concurrency": 4, "retry_backoff": 0.0, "grace": 5.0} | overrides)


# --- the progress reporter -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_progress_fields_rate_over_the_interval_percent_and_eta(queue: SqliteQueue) -> None:
    """Reports carry the platform's fields, pages/min over the last interval (not since the start, nor counting an
    earlier life of the run), the queue's percentage and an ETA."""
    await seed(queue, [f"https://a.example/{i}" for i in range(10)])
    locked = await queue.lock_head(limit=4, lock_secs=60, client_key="other")
    for request in locked.items:  # 4 of 10 handled elsewhere: the queue is 40 % done
        await queue.update_request(request.model_copy(update={"handled_at": utc_now()}), client_key="other")
    stats, reports = RunStats(), Reports()
    stats.handled, stats.items = 30, 7  # resumed counters of an earlier life of the run
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: report_progress(queue, Leases(), stats, every=0.1, hook=reports))
            with anyio.fail_after(5):
                await reports.wait_for(1)
                stats.handled, stats.failed = 33, 1  # 3 pages and a failure in the next interval
                await reports.wait_for(3)  # and nothing in the one after
            tg.cancel_scope.cancel()
    first, second, third = reports.fields[:3]
    assert first.keys() >= PLATFORM_FIELDS
    logged = next(e for e in logs if e["event"] == "run.progress")
    assert logged == {**first, "event": "run.progress", "log_level": "info"}
    assert (first["handled"], first["items"], first["pages_per_min"], first["eta_s"]) == (30, 7, 0, None)
    assert (first["pending"], first["total"], first["percent"]) == (6, 10, 40.0)
    assert (second["handled"], second["failed"], second["pending"]) == (33, 1, 6)
    # 3 pages in one interval of at least 0.1 s: at most 1,800 per minute (the run's 33 are not counted).
    assert 0 < second["pages_per_min"] <= 1800
    # 6 pending, 4 finished in the interval (3 pages and a failure).
    interval = 3 * 60 / second["pages_per_min"]
    assert second["eta_s"] == pytest.approx(6 / (4 / interval), abs=1)
    assert (third["pages_per_min"], third["eta_s"]) == (0, None)  # the last interval's rate, not the run's


@pytest.mark.anyio
async def test_progress_of_an_empty_queue_has_no_percent_or_eta(queue: SqliteQueue) -> None:
    """An empty queue: nothing pending, and neither a percentage nor an ETA (nothing to divide by)."""
    reports = Reports()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: report_progress(queue, Leases(), RunStats(), every=0.05, hook=reports))
        with anyio.fail_after(5):
            await reports.wait_for(2)
        tg.cancel_scope.cancel()
    fields = reports.fields[1]
    assert (fields["pending"], fields["total"], fields["percent"], fields["eta_s"]) == (0, 0, None, None)
    assert fields["pages_per_min"] == 0
    assert PROGRESS_LINE.fullmatch(progress_line(fields))
    assert progress_line(fields).endswith("0 running, 0 pending")


def test_progress_line_is_short_with_large_numbers() -> None:
    """The console's progress line stays within about 100 characters for a crawl of millions of pages."""
    fields = {
        "handled": 1_234_567,
        "pages_per_min": 12_345.6,
        "items": 1_234_000,
        "failed": 12_345,
        "in_flight": 200,
        "pending": 9_876_543,
        "percent": 11.1,
        "eta_s": 48_000,
    }
    line = progress_line(fields)
    assert line == "1.23M pages (12,346/min), 1.23M items, 12,345 failed, 200 running, 9.88M pending, 11%, ETA 13h20m"
    assert len("12:00:00 " + line) <= 110  # the extreme case: about 100
    small = "12:00:00 " + progress_line(
        {**fields, "handled": 4134, "items": 4117, "failed": 3, "in_flight": 50, "pending": 2500, "eta_s": 245}
    )
    assert len(small) <= 100


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (785, "13m05s"), (3600, "1h00m"), (90061, "25h01m")]
)
def test_durations_have_two_units_at_most(seconds: float, shown: str) -> None:
    """Durations read as 45s, 13m05s, 2h05m."""
    assert duration(seconds) == shown


# --- the console renderer --------------------------------------------------------------------------------------


def test_console_shows_the_client_key_on_run_starting_only() -> None:
    """The client key is bound for the run; the console shows it on `run.starting` and nowhere else."""
    render = ConsoleLines(colors=False)
    start = render(None, "info", {"event": "run.starting", "client_key": "k3y", "timestamp": "12:00:00"})
    other = render(None, "info", {"event": "request.retry", "client_key": "k3y", "timestamp": "12:00:01"})
    progress = render(None, "info", {"event": "run.progress", "client_key": "k3y", "timestamp": "12:00:02"})
    assert "client_key=k3y" in start
    assert "k3y" not in other
    assert "k3y" not in progress
    assert progress.startswith("12:00:02 ? pages")


def test_console_puts_a_traceback_below_its_line() -> None:
    """A `traceback` field is printed as it is, below the event's line, not as an escaped key=value."""
    trace = 'Traceback (most recent call last):\n  File "shop.py", line 3, in handle\nValueError: x\n'
    text = ConsoleLines(colors=False)(
        None, "warning", {"event": "handler.error", "error": "ValueError: x", "traceback": trace, "timestamp": "t"}
    )
    first, *rest = text.split("\n")
    assert "handler.error" in first
    assert "traceback" not in first
    assert rest == trace.rstrip("\n").split("\n")


def test_summary_block() -> None:
    """`run.finished` on the console: duration, counts and rate, where the items are, pending, the top errors."""
    fields = {
        "reason": "finished",
        "released": 0,
        "duration_s": 85.2,
        "handled": 1200,
        "failed": 30,
        "retried": 45,
        "pages_per_min": 845.1,
        "items": 1180,
        "results": "storage/datasets/default.jsonl",
        "pending": 0,
        "failed_top": [{"count": 25, "error": "ValueError: no price on <url>"}, {"count": 5, "error": "timed out"}],
    }
    assert summary_block(fields).split("\n") == [
        "run finished after 1m25s",
        "  requests  1,200 handled, 30 failed, 45 retried (845 pages/min)",
        "  items     1,180 in storage/datasets/default.jsonl",
        "  pending   0",
        "  errors    25x ValueError: no price on <url>",
        "             5x timed out",
    ]
    stopped = summary_block({**fields, "reason": "SIGINT", "released": 12, "pending": None, "failed_top": []})
    assert stopped.split("\n")[0] == "run stopped (SIGINT) after 1m25s, 12 locks released"
    assert "  pending   ?" in stopped
    assert "errors" not in stopped


# --- the error tally ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "group"),
    [
        ("ValueError: no price on https://shop.example/p/17?x=1", "ValueError: no price on <url>"),
        ("KeyError: 'price'", "KeyError: 'price'"),
        (
            "HTTPStatusError: Client error '404 Not Found' for url 'http://h:8/a'\nFor more information check: x",
            "HTTPStatusError: Client error '404 Not Found' for url '<url>'",
        ),
        ("handler timed out after 60 s", "handler timed out after <n> s"),
        ("ValueError: no price on page 17", "ValueError: no price on page <n>"),
        ("item 123456 has no id 5f3c2a9e0b1d4e7f", "item <n> has no id <n>"),
        ("version 1.2345 of 2024", "version <n> of <n>"),
        ("upstream answered 503 after 2 tries", "upstream answered 503 after <n> tries"),
    ],
)
def test_error_groups(message: str, group: str) -> None:
    """One error on many pages is one group: first line, URLs, numbers and ids replaced; HTTP statuses stay."""
    assert error_group(message) == group


def test_tally_counts_groups_most_common_first_and_is_bounded() -> None:
    """Top errors are counted by group, most common first; past the limit new groups count as other errors."""
    tally = ErrorTally(limit=3)
    for i in range(5):
        tally.add(f"ValueError: no price on https://a.example/{i}")
    tally.add("KeyError: 'a'")
    tally.add("KeyError: 'b'")
    tally.add("KeyError: 'c'")
    tally.add("KeyError: 'd'")
    assert tally.top(2) == [
        {"count": 5, "error": "ValueError: no price on <url>"},
        {"count": 2, "error": ErrorTally.OTHER},
    ]
    assert len(tally) == 9


# --- the handler's traceback and the summary, from a real run --------------------------------------------------


def _parse_price(text: str) -> float:
    return float(text.removeprefix("$"))


@pytest.mark.anyio
async def test_a_run_logs_the_handlers_traceback_and_sums_up_its_errors(
    queue: SqliteQueue, dataset: JsonlDataset
) -> None:
    """A final failure logs the handler's own frames (not the worker's or the router's) as a warning, each retry at
    debug level; a NoRetry's only at debug; the summary has the top errors and where the items are."""
    router = Router()

    @router.default
    async def broken(ctx: Context) -> None:
        if ctx.url.endswith("/gone"):
            raise NoRetry("gone")
        _parse_price(f"n/a at {ctx.url}")

    await seed(queue, ["https://a.example/1", "https://a.example/2", "https://a.example/gone"])
    with capture_logs() as logs, anyio.fail_after(20):
        summary = await run(queue, router, dataset, workers=fast(max_retries=1))
    errors = [e for e in logs if e["event"] == "handler.error"]
    final = [e for e in errors if e["log_level"] == "warning"]
    debug = [e for e in errors if e["log_level"] == "debug"]
    assert [e["final"] for e in final] == [True, True]
    assert sorted(e["final"] for e in debug) == [False, False, True]  # two retries, one NoRetry
    for event in final:
        trace = event["traceback"]
        assert trace.startswith("Traceback (most recent call last):\n")
        assert f'File "{__file__}"' in trace
        assert "in broken" in trace
        assert "in _parse_price" in trace
        assert "runner/worker.py" not in trace
        assert "runner/router.py" not in trace
        assert trace.rstrip().endswith(event["error"])  # the error recorded on the request: its last line
    assert summary.failed_top == (
        {"count": 2, "error": "ValueError: could not convert string to float: 'n/a at <url>'"},
        {"count": 1, "error": "NoRetry: gone"},
    )
    assert summary.stats["failed"] == 3
    assert summary.results == dataset.location
    assert summary.pending == 0
    finished = next(e for e in logs if e["event"] == "run.finished")
    assert finished["failed_top"] == list(summary.failed_top)
    assert json.loads(json.dumps(summary.as_dict()))["results"] == dataset.location


@pytest.mark.anyio
async def test_the_tally_counts_final_failures_only(queue: SqliteQueue, dataset: JsonlDataset) -> None:
    """Retries of requests that then succeed count in no top error, even while other requests fail meanwhile."""
    attempts: dict[str, int] = {}

    async def flaky(ctx: Context) -> None:
        attempts[ctx.url] = attempts.get(ctx.url, 0) + 1
        await anyio.sleep(0.01)
        if ctx.url.endswith("bad") or attempts[ctx.url] == 1:
            raise RuntimeError("flaky")

    await seed(queue, [f"https://a.example/{i}" for i in range(12)] + ["https://a.example/bad"])
    with anyio.fail_after(20):
        summary = await run(queue, flaky, dataset, workers=fast(max_retries=1))
    assert (summary.stats["handled"], summary.stats["failed"], summary.stats["retried"]) == (12, 1, 13)
    assert summary.failed_top == ({"count": 1, "error": "RuntimeError: flaky"},)


# --- handler options from the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("max_depth=2", ("max_depth",), 2),
        ("same_host=false", ("same_host",), False),
        ('name="x y"', ("name",), "x y"),
        ("mode=fast", ("mode",), "fast"),
        ("url=http://a.example/x?y=1", ("url",), "http://a.example/x?y=1"),
        ("ratio=0.5", ("ratio",), 0.5),
        ("tags=[1, 2]", ("tags",), [1, 2]),
        ("empty=", ("empty",), ""),
        ("a.b=1", ("a", "b"), 1),
    ],
)
def test_handler_option_values_are_toml_or_bare_words(text: str, key: tuple[str, ...], value: object) -> None:
    """`-O KEY=VALUE`: a TOML value, or a bare word taken as a string; dotted keys nest."""
    assert handler_option(text) == (key, value)


@pytest.mark.parametrize(
    ("text", "named"),
    [("novalue", "'novalue'"), ("=3", "'=3'"), ('s="open', "s:"), ("t=[1,", "t:"), ("a b=1", "'a b=1'")],
)
def test_bad_handler_options_name_themselves(text: str, named: str) -> None:
    """A malformed option is refused with a message naming it."""
    import argparse  # noqa: PLC0415 - only this test needs it

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(named)):
        handler_option(text)


def test_options_nest_and_later_ones_win() -> None:
    """Repeated and dotted options merge into one table; a later option wins."""
    import argparse  # noqa: PLC0415 - only this test needs it

    given = [handler_option(t) for t in ("a=1", "b.c=2", "b.d=3", "a=4", "e=5", "e.f=6")]
    assert overrides(argparse.Namespace(option=given))["handler_options"] == {
        "a": 4,
        "b": {"c": 2, "d": 3},
        "e": {"f": 6},
    }


@pytest.fixture(autouse=True)
def _no_leftover_context() -> Iterator[None]:
    """Runs bind the client key in structlog's context: none is left for the next test."""
    yield
    structlog.contextvars.clear_contextvars()
