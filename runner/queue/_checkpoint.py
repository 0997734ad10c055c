"""WAL checkpoints for the embedded store, in their own thread, so that queue calls do not wait for them.

By default SQLite checkpoints inside the COMMIT that pushes the WAL past 1000 pages: that one call then copies
every page changed since the last checkpoint into the database file and syncs it. On a big queue those pages are
spread over a large file, and the call that happens to pay is a lock-head or a handled mark (the scale benchmark
measured it as the lock-head p99 at 1M pending: 2.8-3.0× that at 1k). The store turns SQLite's automatic
checkpoints off and asks this object for one every `every` commits instead. The copying runs while writes go on;
only the last few frames are copied while this store's writes wait (about a millisecond), because SQLite starts
the WAL over only when a write begins with every frame copied.

`python -m tests.bench.overhead --backend embedded` reports the largest WAL: 13 MB over 20,000 requests, 15 MB with
`--processes 3` on one file (SQLite's own checkpoints kept it near 4 MB).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import structlog

__all__ = ["CHECKPOINT_EVERY", "Checkpointer"]

CHECKPOINT_EVERY = 100
"""Commits between checkpoints. A store commit of one write adds about 7 pages to the WAL, so this is close to
SQLite's own 1000-page default; group commits under load are larger."""

_CATCH_UP_PASSES = 4
"""Most passes while writes go on, each copying what was written during the one before."""
_FEW_FRAMES = 16
"""A pass that copied this few frames is close enough: the rest is copied while writes wait."""

_log = structlog.get_logger("headlock.queue.sqlite")


class Checkpointer:
    """Checkpoints one database file from a daemon thread with its own connection, started on the first need.

    `committed()` is called by the store's writer after each write transaction; `close()` stops the thread. A store that
    commits fewer than `every` times (a CLI `status`, a short test) never starts one.
    """

    def __init__(self, path: Path, *, every: int = CHECKPOINT_EVERY) -> None:
        self._path = path
        self._every = every
        self._commits = 0
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.writing = threading.Lock()
        """Held by the store around each write transaction."""

    def committed(self) -> None:
        """Count one commit; wake the thread (starting it if needed) every `every` commits."""
        self._commits += 1
        if self._commits < self._every or self._closing:
            return
        self._commits = 0
        if self._thread is None or not self._thread.is_alive():  # not started yet, or it could not connect
            self._thread = threading.Thread(target=self._loop, name=f"checkpoint {self._path.name}", daemon=True)
            self._thread.start()
        self._wake.set()

    def close(self) -> None:
        """Stop the thread after any checkpoint it is running. Blocking; idempotent."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            _log.warning("queue.checkpoint_failed", path=str(self._path), error=str(exc))
            return
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._closing:
                    return
                try:
                    self._checkpoint(db)
                except Exception as exc:  # noqa: BLE001 - the thread must outlive a failed checkpoint
                    _log.warning("queue.checkpoint_failed", path=str(self._path), error=str(exc))
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        # PASSIVE: copy what no reader still needs, never wait. A failure (a full disk, say) leaves the pages in
        # the WAL, where readers still find them; the next checkpoint tries again.
        copied = 0
        for _ in range(_CATCH_UP_PASSES):
            _, _, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if done - copied <= _FEW_FRAMES:
                break
            copied = done
        # Writes went on during the passes above: copy their last few frames between two of this store's writes,
        # so its next write starts the WAL over. Without this the WAL grows for as long as writes never pause.
        with self.writing:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
