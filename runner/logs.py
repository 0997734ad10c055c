"""Structured logging: readable console on a TTY, JSON lines otherwise; secrets scrubbed from every event.

The console shows a few events in a form of their own: `run.progress` as one short line, `run.finished` as a block
(duration, counts, where the items are, the top errors), a `traceback` field below its event's line, and the
client key only on `run.starting` (it is bound for the whole run; JSON lines carry it on every line, for a log
shipper). JSON lines carry every field as it was logged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

__all__ = ["configure_logging", "progress_line", "redactor", "summary_block"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def redactor(secrets: Iterable[str]) -> structlog.types.Processor:
    """A processor that replaces every occurrence of a secret in string values with `***`."""
    hidden = [s for s in secrets if s]

    def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if hidden:
            for key, value in event.items():
                if isinstance(value, str) and any(secret in value for secret in hidden):
                    for secret in hidden:
                        value = value.replace(secret, "***")  # noqa: PLW2901 - scrubbing in place
                    event[key] = value
        return event

    return redact


def configure_logging(
    *,
    fmt: Literal["auto", "console", "json"] = "auto",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the process (the CLI calls this once; library users may skip it)."""
    out = stream or sys.stderr
    json_lines = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # A person reads the console: local wall-clock time is enough there.
        structlog.processors.TimeStamper(fmt="iso", utc=True)
        if json_lines
        else structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
        redactor(secrets),
    ]
    if json_lines:
        # The console renderer formats tracebacks itself (and warns if they arrive pre-formatted).
        processors.insert(3, structlog.processors.format_exc_info)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_lines else ConsoleLines(colors=out.isatty())
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write() a line: `print` (PrintLogger) writes the text and its newline apart, and the lines of several
        # processes on one stream (`run --processes N`, a container's shared stderr) then cut into each other.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(out, [structlog.stdlib.add_logger_name, *processors], renderer, _LEVELS[level])


class _StdlibHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` puts on the root logger (one at a time: configuring again replaces it)."""


def _route_stdlib_logging(
    out: TextIO, chain: list[structlog.types.Processor], renderer: structlog.types.Processor, level: int
) -> None:
    """Render the records of libraries that log with `logging` (psycopg's pool, httpx) like our own events, in
    the same format and stream, secrets scrubbed: a JSON log stays one JSON object a line. Their warnings and
    errors only (their info is per-connection chatter), or fewer when `level` asks."""
    handler = _StdlibHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=chain,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))


class ConsoleLines:
    """structlog's console renderer, with the run's own events in a form for people (see the module docstring)."""

    def __init__(self, *, colors: bool) -> None:
        self._events = structlog.dev.ConsoleRenderer(colors=colors)

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        kind = event.get("event")
        if kind != "run.starting":
            event.pop("client_key", None)  # bound once for the run: shown on its first line only
        trace = event.pop("traceback", None)
        stamp = event.get("timestamp", "")
        if kind == "run.progress":
            text = f"{stamp} {progress_line(event)}"
        elif kind == "run.finished":
            text = f"{stamp} {summary_block(event)}"
        else:
            text = str(self._events(logger, name, event))
        if isinstance(trace, str) and trace:
            text += "\n" + trace.rstrip("\n")
        return text


def progress_line(fields: Mapping[str, Any]) -> str:
    """`run.progress` in one line of about 90 characters.

    E.g. `1,234 pages (312/min), 1,200 items, 3 failed, 10 running, 4,321 pending, 22%, ETA 13m05s`: pages handled
    by this process and their rate over the last interval; pending, the percentage (of the queue's requests,
    handled or failed) and the ETA (pending over this process's rate) when the queue's counts are known. Counts
    from a million on are shortened (`1.23M`).
    """
    parts = [
        f"{_short(fields.get('handled'))} pages ({_per_min(fields.get('pages_per_min'))}/min)",
        f"{_short(fields.get('items'))} items",
        f"{_short(fields.get('failed'))} failed",
        f"{_short(fields.get('in_flight'))} running",
    ]
    pending = fields.get("pending")
    if pending is not None:
        parts.append(f"{_short(pending)} pending")
    percent = fields.get("percent")
    if percent is not None:
        parts.append(f"{percent:.0f}%")
    eta = fields.get("eta_s")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return ", ".join(parts)


def summary_block(fields: Mapping[str, Any]) -> str:
    """`run.finished` as a few lines: how it ended and how long it took, counts, where the items are, top errors."""
    reason = fields.get("reason", "?")
    ended = "finished" if reason == "finished" else f"stopped ({reason})"
    released = fields.get("released") or 0
    head = f"run {ended} after {duration(fields.get('duration_s') or 0)}"
    if released:
        head += f", {_count(released)} locks released"
    lines = [
        head,
        f"  requests  {_count(fields.get('handled'))} handled, {_count(fields.get('failed'))} failed, "
        f"{_count(fields.get('retried'))} retried ({_per_min(fields.get('pages_per_min'))} pages/min)",
    ]
    items = f"  items     {_count(fields.get('items'))}"
    if fields.get("results"):
        items += f" in {fields['results']}"
    lines.append(items)
    pending = fields.get("pending")
    lines.append(f"  pending   {'?' if pending is None else _count(pending)}")
    quarantined = fields.get("quarantined") or 0
    if quarantined:
        lines.append(f"  unreadable requests ended as failed: {_count(quarantined)}")
    top: list[Mapping[str, Any]] = list(fields.get("failed_top") or [])
    if top:
        width = max(len(_count(row.get("count"))) for row in top)
        for i, row in enumerate(top):
            label = "  errors    " if i == 0 else " " * 12
            lines.append(_cut(f"{label}{_count(row.get('count')):>{width}}x {row.get('error', '')}", 110))
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """`45s`, `13m05s`, `2h05m`: two units at most."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _short(value: object) -> str:
    return f"{value / 1e6:.2f}M" if isinstance(value, int) and value >= 1_000_000 else _count(value)


def _per_min(value: object) -> str:
    if not isinstance(value, int | float):
        return "?"
    return f"{value:.1f}" if value < 10 else f"{round(value):,}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
