"""Run counters, the tally of errors that failed requests for good, and the final summary's figures."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

__all__ = ["ErrorTally", "RunStats", "error_group"]


@dataclass(slots=True)
class RunStats:
    """Counters kept by the workers and the heartbeat; read by the progress reporter and the summary."""

    started_at: float = field(default_factory=anyio.current_time)
    handled: int = 0
    failed: int = 0
    retried: int = 0
    lost: int = 0
    given_back: int = 0
    enqueued: int = 0
    items: int = 0
    prolonged: int = 0
    quarantined: int = 0
    """Requests the queue could not read, ended as failed by the backend (not counted in `failed`)."""

    @property
    def finished(self) -> int:
        """Requests this process finished for good (handled or failed)."""
        return self.handled + self.failed

    def rate(self) -> float:
        """Finished requests per second since the start."""
        elapsed = anyio.current_time() - self.started_at
        return self.finished / elapsed if elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Counters as a plain dict, with the duration, the rate (finished per second) and handled pages per minute."""
        data = asdict(self)
        started = data.pop("started_at")
        elapsed = anyio.current_time() - started
        data["duration_s"] = round(elapsed, 3)
        data["rate"] = round(self.rate(), 1)
        data["pages_per_min"] = round(self.handled * 60 / elapsed, 1) if elapsed > 0 else 0.0
        return data


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
_HTTP_STATUS = re.compile(r"[1-5]\d\d")
_HEX_ID = re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{12,}\b")
_MAX_GROUP = 200
"""Longest group name kept (a message longer than this is cut)."""


def error_group(message: str) -> str:
    """The group an error message counts in: its first line, URLs as `<url>`, ids and numbers as `<n>`.

    So one error on many pages groups together (`ValueError: no price on page <n>`, `... on <url>`), while the
    number that tells HTTP errors apart stays (a three-digit status, 100-599). Simpler than Crawlee's
    `ErrorTracker`, which merges messages differing in fewer than half their words; ours is predictable and needs
    no earlier message.
    """
    line = message.split("\n", 1)[0].strip()
    line = _URL.sub("<url>", line)
    line = _HEX_ID.sub("<n>", line)
    line = _NUMBER.sub(_number, line)
    return line if len(line) <= _MAX_GROUP else line[: _MAX_GROUP - 3] + "..."


def _number(match: re.Match[str]) -> str:
    text = match.group()
    return text if _HTTP_STATUS.fullmatch(text) else "<n>"


class ErrorTally:
    """How often each error group (see `error_group`) ended a request as failed, bounded in memory.

    Past `limit` distinct groups, new ones count as `(other errors)`: a handler whose messages never repeat cannot
    grow the tally without bound.
    """

    OTHER = "(other errors)"

    def __init__(self, limit: int = 1000) -> None:
        self._counts: Counter[str] = Counter()
        self._limit = limit

    def __len__(self) -> int:
        return sum(self._counts.values())

    def add(self, message: str) -> None:
        """Count one failure with `message`."""
        group = error_group(message)
        if group not in self._counts and len(self._counts) >= self._limit:
            group = self.OTHER
        self._counts[group] += 1

    def top(self, n: int = 5) -> list[dict[str, Any]]:
        """The `n` most common groups, most common first (ties: first seen first), as `{"count", "error"}`."""
        return [{"count": count, "error": group} for group, count in self._counts.most_common(n)]
