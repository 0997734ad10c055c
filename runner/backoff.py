"""Exponential backoff with jitter."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["Backoff", "retry_after_secs", "retry_delay"]


@dataclass(slots=True)
class Backoff:
    """Delays that double from `initial` to `maximum`, each drawn from [d/2, d] so clients do not align."""

    initial: float
    maximum: float
    _current: float = field(default=0.0, init=False)

    def next(self) -> float:
        """The next delay in seconds."""
        self._current = self.initial if self._current == 0 else min(self._current * 2, self.maximum)
        return self._current * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Start again from `initial`."""
        self._current = 0.0


def retry_delay(retry_count: int, *, base: float, maximum: float = 60.0) -> float:
    """Delay before attempt `retry_count + 1` of a failed request: base * 2^(n-1), capped, jittered ±25 %."""
    if base <= 0 or retry_count <= 0:
        return 0.0
    delay: float = min(base * 2 ** (retry_count - 1), maximum)
    return delay * random.uniform(0.75, 1.25)


def retry_after_secs(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks for: a number, or an HTTP date (past: 0); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
