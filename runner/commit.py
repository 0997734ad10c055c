"""The bookkeeping after an attempt: commit results and mark handled, or record the error and give it back."""

from __future__ import annotations

import contextlib
import heapq
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, KeysView, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
import structlog

from runner.backoff import Backoff, retry_delay
from runner.clock import loop_clock
from runner.errors import (
    AlreadyHandledError,
    DatasetWriteError,
    InvalidInputError,
    LockLostError,
    QueueError,
    QueueUnavailableError,
    RateLimitedError,
)
from runner.finish import RecentAdds
from runner.groupcommit import Batched, GroupCommit
from runner.leases import Lease, Leases
from runner.models import (
    CRAWLEE_DATA,
    Request,
    RequestDraft,
    has_failed_mark,
    utc_now,
    with_failed_mark,
    without_failed_mark,
)
from runner.queue.completion import AtomicCompletion, Completion
from runner.queue.protocol import MAX_BATCH, ConsistentHead, HandledMark, PreparedLinks, RequestQueue
from runner.results.protocol import ResultsSink, WritesNow
from runner.stats import RunStats
from runner.uniquekey import KeyMemo

__all__ = ["Committer", "RetryPolicy", "SeenKeys", "add_requests"]

log = structlog.get_logger("headlock.commit")

T = TypeVar("T")


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

    def keys(self) -> KeysView[str]:
        """The keys, live: a membership test on it costs no Python call (the hot path tests every link)."""
        return self._keys.keys()

    def add(self, key: str) -> None:
        """Remember `key`, forgetting the oldest beyond the bound."""
        keys = self._keys
        if key in keys:
            keys.move_to_end(key)
            return
        keys[key] = None
        if len(keys) > self._size:
            keys.popitem(last=False)


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
    return len(await _send(queue, drafts, client_key=client_key, forefront=forefront, seen=seen))


async def _send(
    queue: RequestQueue,
    drafts: Sequence[RequestDraft],
    *,
    client_key: str,
    forefront: bool,
    seen: SeenKeys | None,
    recent: RecentAdds | None = None,
) -> set[str]:
    """`add_requests`, returning the unique keys that were new to the queue (their ids go to `recent`)."""
    fresh = [d for d in drafts if seen is None or d.unique_key not in seen]
    new: set[str] = set()
    for start in range(0, len(fresh), MAX_BATCH):
        chunk = fresh[start : start + MAX_BATCH]
        result = await queue.batch_add(chunk, client_key=client_key, forefront=forefront)
        if result.unprocessed_requests:
            raise QueueError(f"{len(result.unprocessed_requests)} requests left unprocessed", endpoint="batch_add")
        for item in result.processed_requests:
            if seen is not None:
                seen.add(item.unique_key)
            if not item.was_already_present:
                new.add(item.unique_key)
                if recent is not None:
                    recent.add(item.request_id)
    return new


class _PendingAdd(Batched):
    """One caller's drafts waiting for, or sent in, a shared batch."""

    __slots__ = ("added", "drafts", "error")

    def __init__(self, drafts: Sequence[RequestDraft]) -> None:
        self.drafts = drafts
        self.added = 0
        self.error: QueueError | None = None


_NOTES = 10_000
"""Most attempts remembered as ended without a record (see `Committer.note_expired`)."""
_MAX_ERROR = 2_000
"""Longest error message recorded on a request (a traceback-sized message would bloat every later write)."""


class _Gone(Exception):  # noqa: N818 - internal control flow, never leaves the committer
    """The lease can no longer be proved ours: commit nothing more under it."""


class _Applied(Exception):  # noqa: N818 - internal control flow, never leaves the committer
    """A write that got no answer was applied: its retry found the request handled while the lease held."""


def _handled(lease: Lease) -> Request:
    """The leased request as it is stored once handled (a failed marker left by a re-run by hand cleared)."""
    request = lease.request
    done: dict[str, Any] = {"handled_at": utc_now()}
    if has_failed_mark(request.user_data):  # a request re-run by hand without its marker cleared
        done["user_data"] = without_failed_mark(request.user_data)
    return request.model_copy(update=done)


class Committer:
    """Applies the outcome of attempts to the queue, the dataset and the lease registry.

    Every call made under a lease is fenced: it is sent only while the lease is valid (not lost, its lock not run
    out by our early reckoning), and the embedded and postgres stores check the lock owner in the same statement.
    Whatever happens (an error, a timeout, cancellation), the lease leaves the registry when the commit ends.
    """

    def __init__(
        self,
        queue: RequestQueue,
        leases: Leases,
        dataset: ResultsSink,
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
        self.clock = loop_clock()
        """The event loop's clock (`anyio.current_time`), for the fences: made inside the run's loop."""
        self.key_memo = KeyMemo()
        """The uniqueKeys of URL texts handlers enqueued (`Context`'s `key_memo`)."""
        self.known = self.seen.keys()
        """`seen`'s keys, live (the contexts' `known`): taken once, not at every attempt."""
        self.recent = None if isinstance(queue, ConsistentHead) else RecentAdds()
        """What this process added lately, read back before the run may call the queue finished; None for a queue
        whose head shows every add at once (`ConsistentHead`): nothing needs reading back there."""
        self.stop_deadline = math.inf
        """Set by shutdown: commits started from now on end by then (their shielded scope's deadline)."""
        self.backoff_until = 0.0
        """When the last retry backoff given here ends (`anyio.current_time()`): its lock is ours until then."""
        self._backoff_ends: list[float] = []  # a heap
        self._adds = {
            forefront: GroupCommit[_PendingAdd](partial(self._send_shared, forefront=forefront))
            for forefront in (False, True)
        }
        self.expired: OrderedDict[str, str] = OrderedDict()
        """Attempts here whose lock ran out before they were recorded (`note_expired`), by request id: empty on the
        usual run, when the worker does not call `take_expired` at all."""
        self._completion = queue if isinstance(queue, AtomicCompletion) and queue.completes_into(dataset) else None
        """The queue, when it commits links, items and the handled mark together into this dataset."""
        self._marker = queue if isinstance(queue, HandledMark) else None
        """The queue, when it marks a request handled from its id (no whole request written back)."""
        self._write_now = dataset.write_lines if isinstance(dataset, WritesNow) else None
        """The dataset's `write_lines`, when it stores lines without waiting (`WritesNow`: the local file)."""

    def note_expired(self, request_id: str, error: str) -> None:
        """Remember an attempt whose lock ran out before it could be recorded: the next holder here records it."""
        self.expired[request_id] = error
        self.expired.move_to_end(request_id)
        if len(self.expired) > _NOTES:
            self.expired.popitem(last=False)

    def take_expired(self, request_id: str) -> str | None:
        """The unrecorded attempt's error for `request_id`, forgetting it; None when there is none."""
        return self.expired.pop(request_id, None) if self.expired else None

    async def add(self, drafts: Sequence[RequestDraft], *, forefront: bool = False) -> int:
        """Add `drafts` (see `add_requests`), skipping keys this process added before; return how many were new.

        Adds from requests committing at the same time share batches of 25: while one batch is being sent, later
        callers wait and then go out together, so a crawl spends far fewer calls than one per page.

        Raises:
            QueueError: the batch carrying these drafts failed (every caller in it gets the error).
        """
        # Most links a crawl finds are known already: those need no turn in a shared batch (`_send` skips them too).
        seen = self.seen.keys()
        drafts = [d for d in drafts if d.unique_key not in seen]
        if not drafts:
            return 0
        op = _PendingAdd(drafts)
        await self._adds[forefront].submit(op)  # cancelled before it was sent, nothing of it happened
        if op.error is not None:
            raise op.error
        self.stats.enqueued += op.added
        return op.added

    async def _send_shared(self, batch: list[_PendingAdd], *, forefront: bool) -> None:
        merged: dict[str, RequestDraft] = {}
        for op in batch:
            for draft in op.drafts:
                merged.setdefault(draft.unique_key, draft)
        try:
            new = await _send(
                self.queue,
                list(merged.values()),
                client_key=self.client_key,
                forefront=forefront,
                seen=self.seen,
                recent=self.recent,
            )
        except BaseException as exc:
            # Every caller in the batch must learn it failed, or it would mark its request handled without its links.
            error = exc if isinstance(exc, QueueError) else QueueError("batch add interrupted", endpoint="batch_add")
            for op in batch:
                op.error = error
            raise
        for op in batch:
            mine = {draft.unique_key for draft in op.drafts} & new
            new -= mine  # a link two requests found counts once
            op.added = len(mine)

    async def succeed(
        self, lease: Lease, enqueues: Mapping[bool, Sequence[RequestDraft]], items: Sequence[str]
    ) -> bool:
        """Add what the attempt enqueued, store its items (dataset lines), mark the request handled.

        On a queue that completes into the dataset (`AtomicCompletion`: the postgres queue and dataset) the three
        go in one transaction fenced on the lease, so a lost lease or a crash stores none of it; elsewhere they
        go one after another (a crash between them may store the items again when the request is retried).

        False if it could not: a refused add or item is recorded as a failed attempt; a transient queue error
        abandons the attempt (the lock lapses, another attempt follows); a lease lost meanwhile stores nothing more
        (another worker may hold the request by then: its items would be stored twice).
        """
        request = lease.request
        self.seen.add(request.unique_key)  # it is in the queue (we hold it): pages linking to themselves cost nothing
        marker = self._marker
        try:
            if self._completion is not None:
                await self._complete(self._completion, lease, enqueues, items)
            elif marker is None or (CRAWLEE_DATA in request.user_data and has_failed_mark(request.user_data)):
                await self._commit_in_steps(lease, enqueues, items)
            else:
                # Raises InvalidInputError before anything is written, as the add of such a link would.
                links = self._prepared(marker, enqueues) if enqueues else ()
                write_now = self._write_now
                if write_now is None:
                    await self._push(lease, items, "the request was being committed")
                else:
                    self._write(lease, items, write_now)
                await self._mark(marker, lease, links)
        except _Applied:
            pass  # handled by our own earlier, unanswered attempt
        except _Gone:
            return False
        except (InvalidInputError, DatasetWriteError) as exc:
            # Retrying the commit cannot help (a link with no JSON form), or the disk refused the items: either
            # way the attempt failed, and it is recorded like a handler error, so max_retries applies.
            await self.fail(lease, f"commit failed: {exc}")
            return False
        except LockLostError as exc:
            self._drop(lease, f"the queue refused the handled mark: {exc}")
            return False
        except QueueError as exc:
            await self._abandon(lease, exc)
            return False
        finally:
            self.leases.remove(lease)
        self.stats.handled += 1
        return True

    def _prepared(self, marker: HandledMark, enqueues: Mapping[bool, Sequence[RequestDraft]]) -> PreparedLinks:
        """The links of `enqueues` not known here, checked and serialized for `marker.mark_handled`.

        Raises:
            InvalidInputError: a link is not a valid request (before anything is written).
        """
        known = self.known
        return marker.prepare_links(
            {
                ff: fresh
                for ff, drafts in enqueues.items()
                if (fresh := [d for d in drafts if d.unique_key not in known])
            }
        )

    def _write(self, lease: Lease, items: Sequence[str], write_now: Callable[[Sequence[str]], int]) -> None:
        """`_push` through the dataset's `write_lines` (`WritesNow`): nothing runs between the fence and the write,
        so no fence after it either."""
        self._fence(lease, "the request was being committed")
        if items:
            self.stats.items += write_now(items)

    async def _mark(self, marker: HandledMark, lease: Lease, links: PreparedLinks) -> None:
        """The handled mark with its links (`HandledMark`), waiting out a queue that is away while the lease holds."""
        request_id = lease.request.id
        try:  # the first try here, not through `_patiently`: one coroutine frame fewer on the usual path
            done = await marker.mark_handled(request_id, client_key=self.client_key, links=links)
        except (QueueUnavailableError, RateLimitedError) as exc:
            complete = partial(marker.mark_handled, request_id, client_key=self.client_key, links=links)
            done = await self._patiently(lease, "marking it handled", complete, failed=exc)
        if done.links:
            self._learn(done)

    async def _commit_in_steps(
        self, lease: Lease, enqueues: Mapping[bool, Sequence[RequestDraft]], items: Sequence[str]
    ) -> None:
        """Links, then items, then the fenced handled mark, each its own call (`succeed`, on a queue that does not
        mark handled by id, or for a request that carries a failed marker: its whole request is written back)."""
        for forefront, drafts in enqueues.items():
            await self._patiently(lease, "adding its links", partial(self.add, drafts, forefront=forefront))
        await self._push(lease, items, "the request's links were being added")
        mark = partial(self.queue.update_request, _handled(lease), client_key=self.client_key, lock_required=True)
        await self._patiently(lease, "marking it handled", mark)

    async def _push(self, lease: Lease, items: Sequence[str], doing: str) -> None:
        """Store the attempt's items, fenced before (while `doing`) and after: nothing more is written under a lease
        lost meanwhile."""
        # Checked after the adds (awaited) and before anything else is written, and again after a push of
        # items (a sink over the API awaits; the local file does not, but one more check costs nothing).
        self._fence(lease, doing)
        if items:
            stored = await self.dataset.push_lines(items)  # not `+= await`: that reads the count before
            self.stats.items += stored
            self._fence(lease, "the request's items were being stored")

    def _learn(self, done: Completion) -> None:
        """Remember the links a completion or a handled mark stored: `seen` (all), recent adds, the count (new)."""
        for unique_key, request_id in done.links.items():
            self.seen.add(unique_key)
            if unique_key in done.new and self.recent is not None:
                self.recent.add(request_id)
        self.stats.enqueued += len(done.new)

    async def _complete(
        self,
        completion: AtomicCompletion,
        lease: Lease,
        enqueues: Mapping[bool, Sequence[RequestDraft]],
        items: Sequence[str],
    ) -> None:
        """Links, items and the handled mark in one transaction (`succeed`); the bookkeeping once it committed."""
        # Keys this process added before are in the queue for sure (`seen` learns only committed links).
        links = {
            forefront: [d for d in drafts if d.unique_key not in self.seen] for forefront, drafts in enqueues.items()
        }
        self._fence(lease, "the request was being completed")
        complete = partial(
            completion.complete, _handled(lease), client_key=self.client_key, links=links, items=items,
            dataset=self.dataset,
        )  # fmt: skip
        try:
            done = await self._patiently(lease, "completing it", complete)
        except _Applied:
            self.stats.items += len(items)  # in the applied transaction, with the mark
            raise
        self._learn(done)
        self.stats.items += done.items

    async def fail(self, lease: Lease, error: str, *, permanent: bool = False) -> None:
        """Record `error` on the request; give it back for a retry, or mark it handled as failed (`handledAt` and
        the failed marker in `userData`, see `runner.models`)."""
        request = lease.request
        retry_count = request.retry_count + 1
        gives_up = permanent or self.policy.gives_up(retry_count, no_retry=bool(request.no_retry))
        if len(error) > _MAX_ERROR:
            error = error[: _MAX_ERROR - 3] + "..."
        update: dict[str, Any] = {
            "retry_count": retry_count,
            "error_messages": [*request.error_messages, error],
        }
        if gives_up:
            update["handled_at"] = utc_now()
            update["user_data"] = with_failed_mark(request.user_data)
        record = partial(
            self.queue.update_request, request.model_copy(update=update), client_key=self.client_key,
            lock_required=True,
        )  # fmt: skip
        try:
            self._fence(lease, "its failure was being recorded")
            await self._patiently(lease, "recording its failure", record)
            if not gives_up:
                await self._give_back(lease, retry_count)
        except _Applied:
            pass  # marked failed by our own earlier, unanswered attempt
        except _Gone:
            return
        except LockLostError as exc:
            self._drop(lease, f"the queue refused the failure record: {exc}")
            return
        except QueueError as exc:
            await self._abandon(lease, exc)
            return
        finally:
            self.leases.remove(lease)
        if gives_up:
            self.stats.failed += 1
            log.warning("request.failed", retry_count=retry_count, error=error, final=True)
        else:
            self.stats.retried += 1
            log.info("request.retry", retry_count=retry_count, error=error)

    async def _patiently(
        self,
        lease: Lease,
        doing: str,
        call: Callable[[], Awaitable[T]],
        *,
        failed: QueueUnavailableError | RateLimitedError | None = None,
    ) -> T:
        """`call()`, tried again while the queue is unavailable (a database restart, an outage, 429s) and the lease
        holds: giving the request back instead would run it twice once the queue is back. `failed`: the error of a
        first try the caller made itself (the next try follows its backoff).

        Raises:
            _Applied: an earlier attempt got no answer and a later one found the request handled: ours was applied
                (nobody else could mark it while our lease held).
            _Gone: the lease was lost while waiting.
            QueueError: a refusal, or still unavailable when the lease would run out before the next try.
        """
        backoff: Backoff | None = None
        unanswered = False
        while True:
            if failed is None:
                try:
                    return await call()
                except AlreadyHandledError:
                    if unanswered:
                        raise _Applied from None
                    raise
                except (QueueUnavailableError, RateLimitedError) as exc:
                    failed = exc
            unanswered = unanswered or failed.maybe_applied
            backoff = backoff or Backoff(initial=0.25, maximum=5.0)
            delay = backoff.next()
            if not lease.valid(anyio.current_time() + delay):
                raise failed
            log.warning(
                "request.commit_waiting", request_id=lease.request.id, doing=doing, error=str(failed),
                retry_in_s=round(delay, 2),
            )  # fmt: skip
            failed = None
            await anyio.sleep(delay)
            self._fence(lease, doing)

    def _fence(self, lease: Lease, doing: str) -> None:
        """Raise `_Gone` (after dropping the lease) unless the lease is still provably ours."""
        if not self.leases.holds(lease, self.clock()):
            self._drop(lease, f"lock lost while {doing}")
            raise _Gone

    def _drop(self, lease: Lease, reason: str) -> None:
        self.stats.lost += 1
        log.warning("lease.dropped", reason=reason)
        if self.leases.get(lease.request.id) is lease:
            self.leases.lose(lease, reason)

    async def _give_back(self, lease: Lease, retry_count: int) -> None:
        # The lock doubles as the retry backoff: prolonged by the delay and then left to expire, the request comes
        # back to everyone after it, and a crash meanwhile loses nothing. Shutdown's unlock_requests frees it early.
        lease.closing = True  # no new prolong from the heartbeat ...
        if lease.prolonging is not None:
            await lease.prolonging.wait()  # ... and one in flight lands first, so it cannot stretch the backoff
        self._fence(lease, "it was being given back")
        delay = retry_delay(retry_count, base=self.policy.backoff)
        if delay > 0:
            sent = anyio.current_time()
            await self.queue.prolong_lock(lease.request.id, lock_secs=delay, client_key=self.client_key)
            self.backoff_until = max(self.backoff_until, sent + delay * 1.05 + 1)
            heapq.heappush(self._backoff_ends, sent + delay)
        else:
            await self.queue.delete_lock(lease.request.id, client_key=self.client_key)

    def next_backoff_end(self) -> float | None:
        """When the soonest retry backoff still running ends (its request comes back to the head), if any."""
        now = anyio.current_time()
        while self._backoff_ends and self._backoff_ends[0] <= now:
            heapq.heappop(self._backoff_ends)
        return self._backoff_ends[0] if self._backoff_ends else None

    async def _abandon(self, lease: Lease, exc: QueueError) -> None:
        """A commit call failed for good: drop the lease and let the lock lapse, so another attempt happens."""
        log.error("request.commit_failed", error=str(exc))
        self.leases.remove(lease)
        # If this fails too, the lock expires on its own.
        with anyio.move_on_after(5), contextlib.suppress(QueueError):
            await self.queue.delete_lock(lease.request.id, client_key=self.client_key)
