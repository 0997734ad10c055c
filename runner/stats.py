"""Run counters and the final summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

__all__ = ["RunStats"]


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
        """Counters as a plain dict, with the duration and rate."""
        data = asdict(self)
        started = data.pop("started_at")
        data["duration_s"] = round(anyio.current_time() - started, 3)
        data["rate"] = round(self.rate(), 1)
        return data
