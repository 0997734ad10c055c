"""An Actor run's life on the platform, around `runner.run`: events, saved counters, status messages, the deadline.

- `aborting`: the graceful stop, exactly as SIGTERM (`Stopper.stop`).
- `migrating`: save the counters, then stop at once (`Stopper.stop_now`): prefetched and in-flight requests are
  given back without counting as an attempt, every lock is released, the results are flushed; the resumed run
  (same run id) picks the requests up.
- `persistState`: save the counters to the run's key-value store (`HEADLOCK_STATE`), so a resumed run continues
  its totals.
- `systemInfo` and the rest: ignored.

The run's status message follows the progress reports (at most every `status_every` seconds); the last one, at the
end, says how the run ended and where the results are. A run with a deadline (`ACTOR_TIMEOUT_AT`) stops gracefully
early enough for its shutdown to end before the platform kills it. No platform call here can fail the run: a failed
status or state write is logged and the run goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from runner.actor.events import PlatformEvent, listen_events
from runner.actor.input import ActorInput, parse_input
from runner.api.resources import ActorRun, KeyValueStore
from runner.errors import ConfigError, QueueError
from runner.runtime import RunSummary
from runner.settings import ActorSettings
from runner.shutdown import STOP_MARGIN, Stopper
from runner.stats import RunStats

__all__ = ["STATE_KEY", "ActorPlatform", "read_input"]

log = structlog.get_logger("headlock.actor")

STATE_KEY = "HEADLOCK_STATE"
"""The record of the run's key-value store that holds its counters (JSON: `runId`, `stats`, `savedAt`)."""
_COUNTERS = tuple(f.name for f in fields(RunStats) if f.name != "started_at")
_DEADLINE_MARGIN = 5.0
"""Seconds before the platform's deadline by which the shutdown must be over."""


async def read_input(store: KeyValueStore, key: str) -> ActorInput | None:
    """The run's input record, or None when there is none.

    Raises:
        ConfigError: the record is not a JSON object of the documented shape.
        QueueError: the store could not be read.
    """
    record = await store.get_record(key)
    if record is None:
        log.info("actor.input.missing", key=key)
        return None
    body, content_type = record
    return parse_input(body, content_type, key=key)


class ActorPlatform:
    """The platform side of one run: its store, its run object, its events and its deadline."""

    def __init__(
        self,
        settings: ActorSettings,
        *,
        stopper: Stopper,
        grace: float,
        store: KeyValueStore | None = None,
        run: ActorRun | None = None,
    ) -> None:
        self._settings = settings
        self._stopper = stopper
        self._grace = grace
        self._store = store
        self._run = run
        self._stats: RunStats | None = None
        self._progress: Mapping[str, Any] | None = None
        self._progress_changed = anyio.Event()
        self.migrated = False
        """Set by a `migrating` event: the process is about to be moved (the run is not over)."""

    async def restore_stats(self) -> RunStats:
        """Counters to start from: the saved ones of this run's earlier life (same run id), else zeros."""
        stats = RunStats()
        if self._store is None or self._settings.run_id is None:
            return stats
        try:
            saved = await self._store.get_json(STATE_KEY)
        except (QueueError, ConfigError) as exc:  # unreadable: start from zeros rather than not at all
            log.warning("actor.state.read_failed", error=str(exc))
            return stats
        if not isinstance(saved, dict) or saved.get("runId") != self._settings.run_id:
            return stats
        counters = saved.get("stats")
        if isinstance(counters, dict):
            for name in _COUNTERS:
                value = counters.get(name)
                if isinstance(value, int) and value >= 0:
                    setattr(stats, name, value)
        log.info("actor.state.restored", **{name: getattr(stats, name) for name in ("handled", "failed", "items")})
        return stats

    def on_progress(self, progress: Mapping[str, Any]) -> None:
        """The progress reporter's hook: the next status message shows these counts."""
        self._progress = progress
        self._progress_changed.set()

    async def serve(self, stats: RunStats, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen to the platform's events, keep the status message current and watch the deadline, until cancelled."""
        self._stats = stats
        async with anyio.create_task_group() as tg:
            if self._settings.events_url:
                send, receive = anyio.create_memory_object_stream[PlatformEvent](16)
                started = await tg.start(listen_events, self._settings.events_url, send)
                log.info("actor.events.listening", connected=started)
                tg.start_soon(self._dispatch, receive)
            if self._run is not None:
                tg.start_soon(self._publish_status)
            if self._settings.timeout_at is not None:
                tg.start_soon(self._stop_before, self._settings.timeout_at)
            task_status.started()
            await anyio.sleep_forever()

    async def finish(self, summary: RunSummary, *, results: str) -> None:
        """Save the counters and set the last status message (terminal unless the run is being moved)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self.save_state()
            stats = summary.stats
            if self.migrated:
                message = f"Migrating: {stats['handled']} handled so far, in-flight requests given back"
            else:
                message = (
                    f"{summary.reason}: {stats['handled']} handled, {stats['failed']} failed, "
                    f"{stats['items']} items in {results}"
                )
            await self._set_status(message, terminal=not self.migrated)

    async def save_state(self) -> None:
        """Write the counters to `HEADLOCK_STATE` (the `persistState` event does, and so does `finish`)."""
        if self._store is None or self._stats is None:
            return
        stats = self._stats
        state = {
            "runId": self._settings.run_id,
            "stats": {name: getattr(stats, name) for name in _COUNTERS},
            "savedAt": datetime.now(UTC).isoformat(),
        }
        try:
            await self._store.set_record(STATE_KEY, state)
        except QueueError as exc:
            log.warning("actor.state.save_failed", error=str(exc))
            return
        log.debug("actor.state.saved", handled=stats.handled)

    async def _dispatch(self, receive: Any) -> None:
        async with receive:
            async for event in receive:
                await self._on_event(event)

    async def _on_event(self, event: PlatformEvent) -> None:
        if event.name == "aborting":
            log.info("actor.aborting")
            self._stopper.stop("aborting")
        elif event.name == "migrating":
            log.warning("actor.migrating", data=dict(event.data))
            self.migrated = True
            self._stopper.stop_now("migrating")
            await self.save_state()
        elif event.name == "persistState":
            await self.save_state()
        else:
            log.debug("actor.event", name=event.name)

    async def _publish_status(self) -> None:
        """Set the status message from the latest progress, at most every `status_every` seconds."""
        while True:
            await self._progress_changed.wait()
            self._progress_changed = anyio.Event()
            if self._progress is not None:
                await self._set_status(status_message(self._progress))
            await anyio.sleep(self._settings.status_every)

    async def _set_status(self, message: str, *, terminal: bool = False) -> None:
        if self._run is None:
            return
        try:
            await self._run.set_status_message(message, terminal=terminal)
        except QueueError as exc:
            log.warning("actor.status_failed", error=str(exc))

    async def _stop_before(self, deadline: datetime) -> None:
        """Stop gracefully when only the shutdown's own time is left before `deadline`."""
        if deadline.tzinfo is None:
            deadline = deadline.replace(tzinfo=UTC)  # the platform's times are UTC
        left = (deadline - datetime.now(UTC)).total_seconds() - (self._grace + STOP_MARGIN + _DEADLINE_MARGIN)
        await anyio.sleep(max(0.0, left) if math.isfinite(left) else 0.0)
        log.warning("actor.timeout_near", timeout_at=deadline.isoformat())
        self._stopper.stop("timeout")


def status_message(progress: Mapping[str, Any]) -> str:
    """One line with the counts of `run.progress`."""
    pending = progress.get("pending")
    parts = [
        f"{progress.get('handled', 0)} handled",
        f"{progress.get('failed', 0)} failed",
        f"{progress.get('retried', 0)} retried",
        f"{progress.get('in_flight', 0)} in flight",
        f"{'?' if pending is None else pending} pending",
        f"{progress.get('rate', 0)}/s",
    ]
    return "Crawling: " + ", ".join(parts)
