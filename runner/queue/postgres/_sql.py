"""The statements of the PostgreSQL queue, and the order-number arithmetic they share (see the package docstring)."""

from __future__ import annotations

__all__ = [
    "AVAILABLE",
    "BATCH_ADD",
    "CLAIM",
    "FENCED",
    "HIGH",
    "LIST_STATES",
    "LOCKED",
    "LOCKED_ROWS",
    "LOW",
    "NOW",
    "QUARANTINE",
    "TICKS",
]

TICKS = 1024
"""Order-number ticks per microsecond: room for the place of each request in a batch (a requeue takes 1000)."""
NOW = "(extract(epoch FROM now()) * 1000000)::bigint"
"""The database's time in microseconds (the transaction's start: one statement, in autocommit)."""
LOW = f"(-{NOW} * {TICKS})"
HIGH = f"({NOW} * {TICKS} + {TICKS - 1})"
AVAILABLE = f"order_no BETWEEN {LOW} AND {HIGH}"
"""Unhandled and not locked (never, released, or expired): the available head."""
LOCKED = f"(order_no > {HIGH} OR order_no < {LOW})"
"""Held by a live lock (two index ranges beside the available head). As a filter only: the planner does not make
index ranges of the OR (it scanned every row of the queue); `LOCKED_ROWS` reads the two ranges."""
LOCKED_ROWS = f"""(
    SELECT id, lock_client, order_no FROM headlock_requests WHERE qid = %(q)s AND order_no > {HIGH}
    UNION ALL SELECT id, lock_client, order_no FROM headlock_requests WHERE qid = %(q)s AND order_no < {LOW}
)"""  # noqa: S608 - fixed parts only
"""The live locks of queue %(q)s, read through the head index's two ranges beside the available head."""

CLAIM = f"""
WITH t AS MATERIALIZED (SELECT {NOW} AS now_us),
c AS MATERIALIZED (
    SELECT id, order_no FROM headlock_requests
    WHERE qid = %(q)s
      AND order_no BETWEEN -(SELECT now_us FROM t) * {TICKS} AND (SELECT now_us FROM t) * {TICKS} + {TICKS - 1}
    ORDER BY order_no LIMIT %(n)s FOR UPDATE SKIP LOCKED
),
p AS (SELECT id, order_no, row_number() OVER (ORDER BY order_no) - 1 AS place FROM c),
u AS (
    UPDATE headlock_requests r
    SET order_no = (CASE WHEN p.order_no < 0 THEN -1 ELSE 1 END) * ((SELECT now_us FROM t) + %(lock_us)s) * {TICKS}
            + p.place,
        lock_client = %(client)s
    FROM p WHERE r.qid = %(q)s AND r.id = p.id
    RETURNING r.id, p.order_no, r.data::text AS data
)
SELECT id, order_no, data, NULL::boolean, NULL::boolean FROM u
UNION ALL
SELECT NULL, NULL, NULL,
    EXISTS (SELECT 1 FROM headlock_requests WHERE qid = %(q)s AND order_no > {HIGH})
        OR EXISTS (SELECT 1 FROM headlock_requests WHERE qid = %(q)s AND order_no < {LOW}),
    (SELECT count(*) FROM (SELECT 1 FROM headlock_clients WHERE qid = %(q)s LIMIT 2) k) > 1
"""  # noqa: S608 - fixed parts only
"""Lock up to n available requests in head order and return them, with "is anything locked" and "several clients"
in a trailing row (the probe reads the snapshot before this statement's own locks: the caller adds them)."""

QUARANTINE = """
WITH u AS (SELECT * FROM unnest(%(ids)b::text[], %(data)b::text[]) AS u(id, data)),
w AS (
    UPDATE headlock_requests r SET order_no = NULL, lock_client = NULL, failed = true, data = u.data::json
    FROM u WHERE r.qid = %(q)s AND r.id = u.id AND r.lock_client = %(client)s AND r.order_no IS NOT NULL
    RETURNING r.id
)
UPDATE headlock_clients SET handled = handled + (SELECT count(*) FROM w), modified_at = now()
WHERE qid = %(q)s AND client_key = %(client)s
"""

FENCED = """
WITH u AS (
    SELECT * FROM unnest(%(ids)b::text[], %(data)b::text[], %(handled)b::boolean[], %(failed)b::boolean[],
                         %(clients)b::text[]) AS u(id, data, handled, failed, client)
),
w AS (
    UPDATE headlock_requests r
    SET order_no = CASE WHEN u.handled THEN NULL ELSE r.order_no END,
        lock_client = CASE WHEN u.handled THEN NULL ELSE r.lock_client END,
        failed = u.failed, data = u.data::json
    FROM u WHERE r.qid = %(q)s AND r.id = u.id AND r.lock_client = u.client AND r.order_no IS NOT NULL
    RETURNING r.id, u.client, u.handled
),
n AS (SELECT client, count(*) AS handled FROM w WHERE handled GROUP BY client),
k AS (
    UPDATE headlock_clients k SET handled = k.handled + n.handled, modified_at = now()
    FROM n WHERE k.qid = %(q)s AND k.client_key = n.client
)
SELECT id FROM w
"""
"""Fenced updates of several requests at once (ids unique): applied only where `lock_client` is the caller's and
the request is unhandled (the lock may have expired if nobody retook it); a handled one leaves the head."""

BATCH_ADD = f"""
WITH t AS MATERIALIZED (SELECT {NOW} AS now_us),
d AS (
    SELECT * FROM unnest(%(ids)b::text[], %(data)b::text[], %(handled)b::boolean[], %(failed)b::boolean[],
                         %(places)b::integer[]) AS d(id, data, handled, failed, place)
),
ins AS (
    INSERT INTO headlock_requests (qid, id, order_no, data, failed)
    SELECT %(q)s, d.id,
        CASE WHEN d.handled THEN NULL
             WHEN %(forefront)s THEN -(SELECT now_us FROM t) * {TICKS} + d.place
             ELSE (SELECT now_us FROM t) * {TICKS} + d.place END,
        d.data::json, d.failed
    FROM d ORDER BY d.id
    ON CONFLICT (qid, id) DO NOTHING
    RETURNING id, order_no IS NULL AS handled
),
k AS (
    UPDATE headlock_clients SET total = total + (SELECT count(*) FROM ins),
        handled = handled + (SELECT count(*) FROM ins WHERE handled), modified_at = now()
    WHERE qid = %(q)s AND client_key = %(client)s AND EXISTS (SELECT 1 FROM ins)
)
SELECT id, true, handled FROM ins
UNION ALL
SELECT r.id, false, r.order_no IS NULL FROM headlock_requests r
WHERE r.qid = %(q)s AND r.id = ANY(%(ids)b::text[]) AND r.id NOT IN (SELECT id FROM ins)
"""  # noqa: S608 - fixed parts only
"""Insert new requests in id order (overlapping batches cannot deadlock), count them on the client's row, and
report the ones already present (from this statement's snapshot)."""

LIST_STATES = (
    f"(order_no IS NOT NULL AND {LOCKED})",
    f"({AVAILABLE})",
    "failed",
    "(order_no IS NULL AND NOT failed)",
)
"""`list_requests`'s states in its argument order: locked, pending, failed, handled."""
