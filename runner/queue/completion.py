"""A capability beside the queue seam: completing a request in one transaction with its results.

A queue that can write into the results sink's database (the postgres queue with the postgres dataset) implements
`AtomicCompletion`; the committer checks it with `isinstance` and `completes_into` once, when it is made, and then
calls `complete` instead of adding the links, pushing the items and marking the request handled one after another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from runner.models import Request, RequestDraft
from runner.results.protocol import ResultsSink

__all__ = ["AtomicCompletion", "Completion"]


@dataclass(frozen=True, slots=True)
class Completion:
    """What a committed completion wrote."""

    links: Mapping[str, str] = field(default_factory=dict)
    """uniqueKey -> request id of every link sent (new or already in the queue)."""
    new: frozenset[str] = frozenset()
    """The uniqueKeys of the links that were new to the queue (a link two completes sent counts for the first)."""
    items: int = 0
    """How many items were stored."""


@runtime_checkable
class AtomicCompletion(Protocol):
    """A queue that commits a request's new links, its items and its handled mark together, or none of them."""

    def completes_into(self, sink: ResultsSink) -> bool:
        """Whether `complete` can write items into `sink` (a dataset in this queue's database)."""
        ...

    async def complete(
        self,
        request: Request,
        *,
        client_key: str,
        links: Mapping[bool, Sequence[RequestDraft]],
        items: Sequence[str],
        dataset: ResultsSink,
    ) -> Completion:
        """Add `links` (by forefront), append `items` to `dataset` and store `request` (with `handled_at` set) in
        one transaction, fenced on the lease: applied only while `client_key` holds the request's lock (an expired
        lock nobody retook counts), else nothing of it is.

        Raises:
            LockLostError: the lease was lost (nothing was written).
            NotFoundError: no such request (nothing was written).
            InvalidInputError: `request` has no `handled_at`, a link is not a valid request, `dataset` is not one
                of this queue's (see `completes_into`), or the database refused the data (nothing was written).
            QueueUnavailableError: the database failed; with `maybe_applied` the commit may have happened (all of
                it or nothing).
        """
        ...
