"""The bookkeeping after an attempt: commit results and mark handled, or record the error and give it back."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from runner.backoff import retry_delay
from runner.dataset import Dataset
from runner.errors import QueueError
from runner.leases import Lease, Leases
from runner.models import RequestDraft, utc_now
from runner.queue.protocol import MAX_BATCH, RequestQueue
from runner.stats import RunStats

__all__ = ["Committer", "RetryPolicy", "SeenKeys", "add_requests"]

log = structlog.get_logger("headlock.commit")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed requests are retried."""

    max_retries: int = 3
    backoff: float = 1.0

    def gives_up(self, retry_count: int, *, no_retry: bool) -> bool:
        """True when a request that has now failed `retry_count` times must not be retried."""
        return no_retry or retry_count > self.max_retries


class SeenKeys:
    """A bounded set of unique keys this process already added, so links seen again cost no queue call."""

    def __init__(self, size: int = 100_000) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        """Remember `key`, forgetting the oldest beyond the bound."""
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)


async def add_requests(
    queue: RequestQueue,
    drafts: Sequence[RequestDraft],
    *,
    client_key: str,
    forefront: bool = False,
    seen: SeenKeys | None = None,
) -> int:
    """Add `drafts` in batches of 25, skipping keys in `seen` and remembering the added ones; return how many were new.

    Raises:
        QueueError: a batch failed, or the queue left items unprocessed after its retries.
    """
    fresh = [d for d in drafts if seen is None or d.unique_key not in seen]
    added = 0
    for start in range(0, len(fresh), MAX_BATCH):
        chunk = fresh[start : start + MAX_BATCH]
        result = await queue.batch_add(chunk, client_key=client_key, forefront=forefront)
        if result.unprocessed_requests:
            raise QueueError(f"{len(result.unprocessed_requests)} requests left unprocessed", endpoint="batch_add")
        for item in result.processed_requests:
            if seen is not None:
                seen.add(item.unique_key)
            added += not item.was_already_present
    return added


class Committer:
    """Applies the outcome of attempts to the queue, the dataset and the lease registry."""

    def __init__(
        self,
        queue: RequestQueue,
        leases: Leases,
        dataset: Dataset,
        stats: RunStats,
        *,
        client_key: str,
        policy: RetryPolicy,
        seen: SeenKeys | None = None,
    ) -> None:
        self.queue = queue
        self.leases = leases
        self.dataset = dataset
        self.stats = stats
        self.client_key = client_key
        self.policy = policy
        self.seen = seen or SeenKeys()

    async def add(self, drafts: Sequence[RequestDraft], *, forefront: bool = False) -> int:
        """Add `drafts` (see `add_requests`), skipping keys this process added before; return how many were new."""
        added = await add_requests(self.queue, drafts, client_key=self.client_key, forefront=forefront, seen=self.seen)
        self.stats.enqueued += added
        return added

    async def succeed(
        self,
        lease: Lease,
        enqueues: Mapping[bool, Sequence[RequestDraft]],
        items: Sequence[Mapping[str, Any]],
    ) -> bool:
        """Add what the attempt enqueued, store its items, mark the request handled. False if a call failed."""
        request = lease.request
        self.seen.add(request.unique_key)  # it is in the queue (we hold it): pages linking to themselves cost nothing
        try:
            for forefront, drafts in enqueues.items():
                await self.add(drafts, forefront=forefront)
            self.stats.items += self.dataset.push(items)
            await self.queue.update_request(
                request.model_copy(update={"handled_at": utc_now()}), client_key=self.client_key
            )
        except QueueError as exc:
            await self._abandon(lease, exc)
            return False
        self.leases.remove(lease)
        self.stats.handled += 1
        return True

    async def fail(self, lease: Lease, error: str, *, permanent: bool = False) -> None:
        """Record `error` on the request; give it back for a retry, or mark it handled as failed."""
        request = lease.request
        retry_count = request.retry_count + 1
        gives_up = permanent or self.policy.gives_up(retry_count, no_retry=bool(request.no_retry))
        update: dict[str, Any] = {
            "retry_count": retry_count,
            "error_messages": [*request.error_messages, error],
        }
        if gives_up:
            update["handled_at"] = utc_now()
        try:
            await self.queue.update_request(request.model_copy(update=update), client_key=self.client_key)
            if not gives_up:
                await self._give_back(lease, retry_count)
        except QueueError as exc:
            await self._abandon(lease, exc)
            return
        self.leases.remove(lease)
        if gives_up:
            self.stats.failed += 1
            log.warning("request.failed", retry_count=retry_count, error=error, final=True)
        else:
            self.stats.retried += 1
            log.info("request.retry", retry_count=retry_count, error=error)

    async def _give_back(self, lease: Lease, retry_count: int) -> None:
        # The lock doubles as the retry backoff: prolonged by the delay and then left to expire, the request comes
        # back to everyone after it, and a crash meanwhile loses nothing. Shutdown's unlock_requests frees it early.
        delay = retry_delay(retry_count, base=self.policy.backoff)
        if delay > 0:
            await self.queue.prolong_lock(lease.request.id, lock_secs=delay, client_key=self.client_key)
        else:
            await self.queue.delete_lock(lease.request.id, client_key=self.client_key)

    async def _abandon(self, lease: Lease, exc: QueueError) -> None:
        """A commit call failed for good: drop the lease and let the lock lapse, so another attempt happens."""
        log.error("request.commit_failed", error=str(exc))
        self.leases.remove(lease)
        # If this fails too, the lock expires on its own.
        with anyio.move_on_after(5), contextlib.suppress(QueueError):
            await self.queue.delete_lock(lease.request.id, client_key=self.client_key)
