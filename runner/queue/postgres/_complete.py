"""`PostgresQueue.complete`: a request's new links, its items and its handled mark in one transaction, fenced on the
lease (`runner.queue.completion.AtomicCompletion`).

One transaction, in this order: the links (one statement inserting them in id order, with the items beside them),
then the handled marks (`FENCED`, in id order) last: a writer that holds a row's new version never waits for
another afterwards, so two workers cannot deadlock (the other order did, in the prototype). A mark that matches no
live lock of the caller's (the lease was lost) rolls the whole transaction back: none of that request's links or
items stay.

Completes arriving together are group-committed: while one transaction is being written, later ones wait, and the
next goes with all of them (up to `MAX_GROUP`) in one transaction, the same three statements for the group. When a
mark of the group is refused, that complete gets `LockLostError` and the transaction is rolled back and written
again without it: the others still commit together, and the refused one leaves nothing behind. (Savepoints would
need the mark of each complete before the links of the next, the order that deadlocks.) A group with neither links
nor items is its marks alone: one statement in autocommit, as `update_request`'s group commit writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import psycopg

from runner.errors import InvalidInputError, QueueError, QueueUnavailableError
from runner.models import Request, RequestDraft
from runner.queue._rows import _check_client_key, _dump, _prepare
from runner.queue.completion import Completion
from runner.queue.postgres._sql import FENCED, NOW, TICKS
from runner.results.postgres import PostgresDataset
from runner.results.protocol import ResultsSink
from runner.uniquekey import request_id_for

if TYPE_CHECKING:
    from runner.queue.postgres._queue import PostgresQueue

__all__ = ["ADD_LINKS_AND_ITEMS", "MAX_GROUP", "Completions"]

Conn = psycopg.AsyncConnection[Any]

MAX_GROUP = 64
"""Most completes in one transaction (a bound on its length and on the row locks it holds)."""

ADD_LINKS_AND_ITEMS = f"""
WITH t AS MATERIALIZED (SELECT {NOW} AS now_us),
d AS (
    SELECT * FROM unnest(%(ids)b::text[], %(data)b::text[], %(handled)b::boolean[], %(failed)b::boolean[],
                         %(forefront)b::boolean[], %(places)b::integer[])
        AS d(id, data, handled, failed, forefront, place)
),
ins AS (
    INSERT INTO headlock_requests (qid, id, order_no, data, failed)
    SELECT %(q)s, d.id,
        CASE WHEN d.handled THEN NULL
             WHEN d.forefront THEN -(SELECT now_us FROM t) * {TICKS} + least(d.place, {TICKS - 1})
             ELSE (SELECT now_us FROM t) * {TICKS} + least(d.place, {TICKS - 1}) END,
        d.data::json, d.failed
    FROM d ORDER BY d.id
    ON CONFLICT (qid, id) DO NOTHING
    RETURNING id, order_no IS NULL AS handled
),
k AS (
    UPDATE headlock_clients SET total = total + (SELECT count(*) FROM ins),
        handled = handled + (SELECT count(*) FROM ins WHERE handled), modified_at = now()
    WHERE qid = %(q)s AND client_key = %(client)s AND EXISTS (SELECT 1 FROM ins)
),
it AS (
    INSERT INTO headlock_items (did, item)
    SELECT u.did, u.item::json FROM unnest(%(dids)b::integer[], %(items)b::text[]) WITH ORDINALITY AS u(did, item, n)
    ORDER BY u.n
)
SELECT id FROM ins
"""  # noqa: S608 - fixed parts only
"""Insert the new links in id order (counted on the client's row) and append the items in the order given; return
the ids that were new. The arrays go in binary (`%b`): psycopg's text form escapes every quote of every JSON text
with a regex, about 40 µs per request's JSON, against 0.4 µs."""

_Link = tuple[str, str, bool, bool, str, bool]
"""A prepared link: (id, uniqueKey, handled, failed, JSON, forefront)."""


@dataclass(eq=False, slots=True)
class _Completing:
    """One complete waiting for, or written by, a group transaction."""

    request_id: str
    data: str
    failed: bool
    client_key: str
    links: list[_Link]
    did: int
    items: Sequence[str]
    endpoint: str
    taken: bool = False
    error: QueueError | None = None
    result: Completion | None = None


@dataclass(eq=False, slots=True)
class Completions:
    """The completes of one `PostgresQueue` handle and their group commit."""

    queue: PostgresQueue
    _waiting: list[_Completing] = field(default_factory=list)
    _turn: anyio.Lock = field(default_factory=lambda: anyio.Lock(fast_acquire=True))

    def completes_into(self, sink: ResultsSink) -> bool:
        """Whether `sink` is a dataset opened over this queue (its database and connection pool)."""
        return isinstance(sink, PostgresDataset) and sink.queue is self.queue

    async def complete(
        self,
        request: Request,
        *,
        client_key: str,
        links: Mapping[bool, Sequence[RequestDraft]],
        items: Sequence[str],
        dataset: ResultsSink,
    ) -> Completion:
        """`PostgresQueue.complete` (see `runner.queue.completion.AtomicCompletion.complete`)."""
        endpoint = f"complete {request.id}"
        _check_client_key(client_key, endpoint)
        if not isinstance(dataset, PostgresDataset) or not self.completes_into(dataset):
            raise InvalidInputError(f"{dataset!r} is not a dataset of {self.queue!r}", endpoint=endpoint)
        if request.handled_at is None:
            raise InvalidInputError("a completed request needs handledAt", endpoint=endpoint)
        if request.id != request_id_for(request.unique_key):
            raise InvalidInputError(
                "Request ID does not correspond to uniqueKey", endpoint=endpoint, error_type="request-id-invalid"
            )
        prepared: list[_Link] = []
        for forefront, drafts in links.items():
            prepared += [(*_prepare(draft, endpoint), forefront) for draft in drafts]
        op = _Completing(
            request.id,
            _dump(request, endpoint),
            request.is_failed,
            client_key,
            prepared,
            dataset.did,
            items,
            endpoint,
        )
        await self.queue._register(client_key, endpoint)
        await self._group_commit(op)
        assert op.result is not None  # noqa: S101 - written, or its error was raised
        return op.result

    async def _group_commit(self, op: _Completing) -> None:
        """Write `op` with the completes waiting beside it (same client key, distinct requests, up to `MAX_GROUP`):
        while one group is being written, later ones wait for their turn and then go together."""
        self._waiting.append(op)
        try:
            async with self._turn:
                if not op.taken:
                    group = self._take(op)
                    try:
                        await self._write(group)
                    except BaseException:
                        # Cut short (cancelled between two of its transactions): the unwritten must know.
                        unwritten = [other for other in group if other.error is None and other.result is None]
                        self._fail(unwritten, QueueUnavailableError("interrupted before it was written", endpoint=""))
                        raise
        except BaseException:
            if not op.taken:
                self._waiting.remove(op)  # cancelled before it was taken: nothing of it happens
            raise
        if op.error is not None:
            raise op.error

    def _take(self, op: _Completing) -> list[_Completing]:
        """`op` and the waiting completes that can share its transaction, taken off the waiting list."""
        group = [op]
        requests = {op.request_id}
        for other in self._waiting:
            if len(group) >= MAX_GROUP:
                break
            if other is not op and other.client_key == op.client_key and other.request_id not in requests:
                group.append(other)
                requests.add(other.request_id)
        for taken in group:
            taken.taken = True
            self._waiting.remove(taken)
        return group

    async def _write(self, group: list[_Completing]) -> None:
        """Write `group` in one transaction, again without the refused ones while a mark is refused (bounded: each
        round leaves one out at least); give each complete its outcome."""
        for _ in range(len(group) + 1):
            live = [op for op in group if op.error is None and op.result is None]
            if not live:
                return
            try:
                await self._attempt(live)
            except InvalidInputError as exc:
                if len(live) == 1:
                    self._fail(live, exc)
                    return
                # The database refused some item or link: each alone, so only the one at fault fails.
                for single in live:
                    await self._write([single])
                return
            except QueueError as exc:
                self._fail(live, exc)
                return
        raise AssertionError("unreachable: every round refuses one complete at least, or returns")  # pragma: no cover

    async def _attempt(self, ops: list[_Completing]) -> None:
        """One transaction for `ops` on a pooled connection (`_transaction`).

        Raises:
            InvalidInputError: the database refused the data, or a text cannot be sent as UTF-8 (a lone surrogate:
                psycopg refuses it before sending anything).
            QueueError: as any call (`PostgresQueue._run`).
        """
        try:
            await self.queue._run("complete", partial(self._transaction, ops=ops))
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"the data cannot be sent as UTF-8: {exc}", endpoint="complete") from exc

    def _fail(self, ops: list[_Completing], exc: QueueError) -> None:
        message = str(exc).partition(": ")[2] or str(exc)  # without the group's endpoint: each op names its own
        for op in ops:
            op.error = type(exc)(
                message, endpoint=op.endpoint, error_type=exc.error_type, maybe_applied=exc.maybe_applied
            )
            op.error.__cause__ = exc

    async def _transaction(self, conn: Conn, *, ops: list[_Completing]) -> None:
        """One transaction for `ops`: links and items, then the marks; rolled back when a mark is refused (the
        refused ones get their error), else each op gets its result."""
        ops = [op for op in ops if op.error is None]  # a first try may have found refusals before its connection broke
        if not ops:
            return
        links: dict[str, _Link] = {}
        for op in ops:
            for link in op.links:
                links.setdefault(link[0], link)
        dids = [op.did for op in ops for _ in op.items]
        items = [item for op in ops for item in op.items]
        marks = sorted(ops, key=lambda op: op.request_id)
        if not links and not items:
            await self._marks_only(conn, ops, marks)
            return
        rows = list(links.values())
        args = {
            "q": self.queue.qid,
            "client": ops[0].client_key,
            "ids": [r[0] for r in rows],
            "data": [r[4] for r in rows],
            "handled": [r[2] for r in rows],
            "failed": [r[3] for r in rows],
            "forefront": [r[5] for r in rows],
            "places": list(range(len(rows))),
            "dids": dids,
            "items": items,
        }
        async with conn.transaction() as tx:
            # Not prepared, as `PostgresQueue.batch_add`: a generic plan from when the table was small stays bad.
            added = await conn.execute(ADD_LINKS_AND_ITEMS, args, prepare=False)
            new = {row[0] for row in await added.fetchall()}
            refused = await self._mark(conn, ops, marks)
            if refused:
                raise psycopg.Rollback(tx)  # nothing of the group stays; `_write` tries again without them
        if not refused:  # the block ends without an error after a rollback too
            _results(ops, new)

    async def _marks_only(self, conn: Conn, ops: list[_Completing], marks: list[_Completing]) -> None:
        """Completes with neither links nor items: the marks alone, one statement in autocommit. A refused one wrote
        nothing (there was nothing else of it), so the others stand."""
        refused = await self._mark(conn, ops, marks)
        _results([op for op in ops if op not in refused], set())

    async def _mark(self, conn: Conn, ops: list[_Completing], marks: list[_Completing]) -> list[_Completing]:
        """The fenced handled marks of `marks` (in id order); give each refused op its error and return them."""
        queue = self.queue
        fenced = {
            "q": queue.qid,
            "ids": [op.request_id for op in marks],
            "data": [op.data for op in marks],
            "handled": [True] * len(marks),
            "failed": [op.failed for op in marks],
            "clients": [op.client_key for op in marks],
        }
        applied = {row[0] for row in await (await conn.execute(FENCED, fenced)).fetchall()}
        refused = [op for op in ops if op.request_id not in applied]
        if refused:
            states = await queue._diagnose(conn, [op.request_id for op in refused])
            for op in refused:
                op.error = queue._refusal(states.get(op.request_id), op.endpoint)
        return refused


def _results(ops: list[_Completing], new: set[str]) -> None:
    """Each op's `Completion`: a new link counts for the first op that sent it."""
    claimed: set[str] = set()
    for op in ops:
        keys: dict[str, str] = {}
        fresh: set[str] = set()
        for request_id, unique_key, *_ in op.links:
            keys[unique_key] = request_id
            if request_id in new and request_id not in claimed:
                claimed.add(request_id)
                fresh.add(unique_key)
        op.result = Completion(links=keys, new=frozenset(fresh), items=len(op.items))
