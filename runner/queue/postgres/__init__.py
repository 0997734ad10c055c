"""The PostgreSQL queue: many named queues in one database, shared by workers on any number of machines.

Same semantics as the embedded store (`runner.queue.sqlite`, whose row helpers it shares), laid out for many
writers (schema version 1, in the connection's current schema):

    headlock_schema    the schema version (migrations run under an advisory lock, so any number of workers may
                       open the database at once)
    headlock_queues    one row per queue: qid (internal), id (17 alphanumerics), name, created_at
    headlock_clients   one row per (queue, client key): the counts of what that client added and handled, and when
                       it last wrote. `get_info` sums them: no counter row is shared by every worker, so writers
                       never queue behind one hot row.
    headlock_requests  (qid, id) -> order_no, lock_client, failed, data (the request's JSON)

Ordering follows the platform's model as the embedded store does, with order numbers in ticks of 1/1024 µs: a
pending request has `order_no` = ±(time · 1024 + k), k its place in the batch that wrote it (< 1024), the sign
forefront (< 0) or not; a lock moves it to ±(expiry · 1024). The available head is then the range
[-now · 1024, now · 1024 + 1023] of a partial index over unhandled rows (handled ones have `order_no` NULL): a claim
reads `limit` index entries whatever the queue's size and whatever the fleet holds, a lock expires with no write,
and "is anything locked" is a probe of the two ranges beside it. Every time is the database's `now()`, never a
worker's clock: worker clock steps and skew between machines cannot break a lock.

Every call is one statement in autocommit (or one short transaction), shielded from cancellation and bounded by a
server-side `statement_timeout` (a cancelled caller waits for the statement's outcome instead of abandoning a
connection mid-query). Fenced writes check `lock_client` in the statement itself (`RequestQueue.update_request`):
a write whose lease was retaken matches no row, changes nothing and raises `LockLostError`. Fenced updates arriving
together (the committer's handled marks) are group-committed: one `UPDATE ... FROM unnest(...)` for all of them.
Rows are written in id order within a statement (batch adds sort, marks sort), so overlapping writers cannot
deadlock.

The DSN's password never appears in a message, a log event or a repr.
"""

from runner.queue.postgres._connect import redact
from runner.queue.postgres._queue import PostgresQueue
from runner.queue.postgres._schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "PostgresQueue", "redact"]
