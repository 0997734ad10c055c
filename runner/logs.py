"""Structured logging: readable console on a TTY, JSON lines otherwise; secrets scrubbed from every event."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog

__all__ = ["configure_logging", "redactor"]

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
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redactor(secrets),
    ]
    if json_lines:
        # The console renderer formats tracebacks itself (and warns if they arrive pre-formatted).
        processors.insert(3, structlog.processors.format_exc_info)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
