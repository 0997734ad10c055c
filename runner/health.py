"""Liveness: the heartbeat touches a file on every beat; `headlock health` says whether it is fresh.

The file's modification time is the timestamp (a touch is one `utime` call, atomic, and leaves nothing half
written for the checker to read). The beat is at most `LIVENESS_EVERY` seconds apart whatever `lock_secs` is, so a
fixed `DEFAULT_MAX_AGE` of three beats tells a live process from a stuck or dead one without knowing its settings.
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["DEFAULT_MAX_AGE", "LIVENESS_EVERY", "check_health", "liveness_interval", "touch"]

LIVENESS_EVERY = 5.0
"""Longest interval between two liveness beats, in seconds."""

DEFAULT_MAX_AGE = 3 * LIVENESS_EVERY
"""`headlock health` calls a file older than this (three beats) stale."""


def liveness_interval(lock_secs: float) -> float:
    """Seconds between liveness beats: the heartbeat's own interval (`lock_secs / 4`), capped at `LIVENESS_EVERY`."""
    return min(lock_secs / 4, LIVENESS_EVERY)


def touch(path: Path) -> None:
    """Set `path`'s modification time to now, creating it (and its directory) if needed.

    Raises:
        OSError: the file cannot be written.
    """
    try:
        path.touch()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def check_health(path: Path, *, max_age: float = DEFAULT_MAX_AGE, now: float | None = None) -> tuple[bool, str]:
    """Whether `path` was touched less than `max_age` seconds ago, and one line saying why."""
    try:
        touched = path.stat().st_mtime
    except FileNotFoundError:
        return False, f"unhealthy: no heartbeat file at {path} (not started yet, or another health_file)"
    except OSError as exc:
        return False, f"unhealthy: cannot read {path}: {exc.strerror or exc}"
    age = (time.time() if now is None else now) - touched
    if age < max_age:
        return True, f"healthy: last heartbeat {max(age, 0.0):.1f} s ago ({path})"
    return False, f"unhealthy: last heartbeat {age:.1f} s ago, more than {max_age:g} s ({path})"
