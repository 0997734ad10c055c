"""The guards' mutation check: remove each safety check in turn and show that a test fails without it.

    python -m tests.mutation            # every mutant (about ten minutes on 2 cores)
    python -m tests.mutation --list     # their names
    python -m tests.mutation fence-committer heartbeat-bound   # some of them

Each mutant replaces one exact snippet of one module (the guard) with a version that skips it, in a copy of the
checkout (the working tree is never touched), then runs the tests named for it. The mutant is "killed" when they
fail. Exit code 0 when every mutant is killed, 1 when one survives (its guard is untested), 2 when a snippet is no
longer found (the guard moved: update the mutant) or its tests could not run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULTS = "tests/test_faults.py"
ACTOR_E2E = "tests/test_actor_e2e.py"
PG_RELIABILITY = "tests/test_reliability_postgres.py"
POLITE = "tests/test_politeness.py"
POLITE_HOSTS = "tests/test_politeness_hosts.py"


@dataclass(frozen=True)
class Mutant:
    """One guard removed: `original` in `path` becomes `mutated`; `tests` must then fail."""

    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "platform-head-items-fetched",
        "runner/queue/api.py",
        "self._full_head = not api.on_platform if full_head_items is None else full_head_items",
        "self._full_head = True if full_head_items is None else full_head_items",
        ("tests/test_api_backend.py::test_whole_head_items_are_asked_of_any_server_but_the_platform",),
    ),
    Mutant(
        "serve-flush-before-close",
        "runner/server/_protocol.py",
        "    def close(self) -> None:\n        self._flush()\n",
        "    def close(self) -> None:\n",
        ("tests/test_server.py::test_a_response_before_a_close_is_sent_whole",),
    ),
    Mutant(
        "aiohttp-disconnect-maybe-applied",
        "runner/http.py",
        "and not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):",
        ":",
        ("tests/test_http.py::test_a_connection_closed_after_the_request_is_a_read_error_not_connect",),
    ),
    Mutant(
        "api-no-silent-resend",
        "runner/api/client.py",
        "limits, resend_on_stale=False)\n",
        "limits, resend_on_stale=True)\n",
        ("tests/test_api_faults.py::test_delete_lock_whose_answer_was_lost_is_done",),
    ),
    Mutant(
        "commit-waits-out-outage",
        "runner/commit.py",
        "            if not lease.valid(anyio.current_time() + delay):\n",
        "            if True:\n",
        (f"{PG_RELIABILITY}::test_commits_wait_out_an_outage_under_their_locks_and_nothing_runs_twice",),
    ),
    Mutant(
        "commit-unanswered-applied",
        "runner/commit.py",
        "                    if unanswered:\n                        raise _Applied from None\n",
        "",
        (f"{PG_RELIABILITY}::test_a_complete_whose_answer_is_lost_counts_as_handled_once",),
    ),
    Mutant(
        "worker-expired",
        "runner/worker.py",
        "    return lease.lost or now >= lease.expires_at\n",
        "    return lease.lost\n",
        (f"{FAULTS}::test_a_handler_blocking_the_event_loop_ends_after_max_retries_and_says_so",),
    ),
    Mutant(
        # The worker asks for an unrecorded attempt's note whenever there are notes (not only never).
        "worker-takes-expired-note",
        "runner/worker.py",
        "        unrecorded = committer.take_expired(lease.request.id) if committer.expired else None\n",
        "        unrecorded = None\n",
        (f"{FAULTS}::test_a_handler_blocking_the_event_loop_ends_after_max_retries_and_says_so",),
    ),
    Mutant(
        "worker-lost",
        "runner/worker.py",
        "        if lease.lost and not lease.expired:\n",
        "        if False:\n",
        (f"{FAULTS}::test_a_lease_the_queue_refuses_is_dropped_not_recorded_as_an_attempt",),
    ),
    Mutant(
        "worker-start-unproved",
        "runner/worker.py",
        "        if not lease.valid(started):\n",
        "        if False:\n",
        (f"{FAULTS}::test_a_lease_that_ran_out_while_buffered_is_not_run",),
    ),
    Mutant(
        "fence-committer",
        "runner/commit.py",
        "        if not self.leases.holds(lease, self.clock()):\n",
        "        if False:\n",
        (f"{FAULTS}::test_nothing_is_committed_under_a_lease_whose_lock_ran_out",),
    ),
    Mutant(
        # The fence's check of the lock's time, not only of the registration.
        "fence-lease-expiry",
        "runner/leases.py",
        "        return self._held.get(lease.request.id) is lease and not lease.lost and now < lease.expires_at\n",
        "        return self._held.get(lease.request.id) is lease and not lease.lost\n",
        (f"{FAULTS}::test_nothing_is_committed_under_a_lease_whose_lock_ran_out",),
    ),
    Mutant(
        "fence-store",
        "runner/queue/sqlite.py",
        "        if fenced:\n            _check_holder(row, client_key, fenced)\n",
        "",
        (f"{FAULTS}::test_a_lost_leases_late_failure_is_not_written_over_the_new_holders_outcome",),
    ),
    Mutant(
        "fence-store-handled-mark",
        "runner/queue/sqlite.py",
        '_HELD_BY = " AND lock_client = ? AND order_no IS NOT NULL AND lock_expires IS NOT NULL"\n',
        '_HELD_BY = " AND ? IS NOT NULL"\n',
        (
            "tests/test_store.py::test_mark_handled_is_fenced_on_the_lock",
            "tests/test_store.py::test_handled_marks_committed_together_each_get_their_own_outcome",
        ),
    ),
    Mutant(
        # A forefront request's lock sits below the head's range: the live-lock readers must look there too.
        "store-live-forefront-locks",
        "runner/queue/sqlite.py",
        '_LIVE_LOCK = "(order_no > ? OR order_no < -?) AND lock_expires > ?"\n',
        '_LIVE_LOCK = "(order_no > ? OR 0 > ?) AND lock_expires > ?"\n',
        ("tests/test_store.py::test_every_reader_of_live_locks_finds_forefront_and_plain_ones",),
    ),
    Mutant(
        # A store write whose caller is cancelled while its batch is in the thread ends before the caller goes on.
        "store-thread-cancel-waits",
        "runner/queue/_thread.py",
        "            elif not call.done:  # in the thread: wait for its end, as `StoreThread.run` does\n",
        "            elif False:\n",
        ("tests/test_store.py::test_a_call_cancelled_while_it_runs_in_the_store_thread_waits_for_its_end",),
    ),
    Mutant(
        # The same for the store's plain calls (opening, reads).
        "store-thread-call-cancel-waits",
        "runner/queue/_thread.py",
        "            if not job.done:",
        "            if False:",
        ("tests/test_store.py::test_a_first_call_cancelled_while_the_store_opens_waits_for_the_open_to_end",),
    ),
    Mutant(
        # orjson writes a link's JSON only when it writes it as pydantic does (strings in userData).
        "plain-json-strings-only",
        "runner/queue/_rows.py",
        "    if user_data and not all(type(value) is str for value in user_data.values()):\n        return None\n",
        "",
        ("tests/test_store.py::test_a_links_stored_json_is_pydantics_whoever_writes_it",),
    ),
    Mutant(
        # Marks committed together: a new link two of them name is new to the first only (counted once).
        "batched-links-first-claims",
        "runner/queue/sqlite.py",
        "                        stored.add(request_id)  # a later mark naming it finds it there\n",
        "                        pass\n",
        ("tests/test_store.py::test_links_of_marks_committed_together_are_stored_once_each_and_reported_to_the_first",),
    ),
    Mutant(
        # The unique key's port shortcut takes only a host or a host and digits (no user info, no brackets).
        "uniquekey-plain-port",
        "runner/uniquekey.py",
        '_PLAIN_PORT = re.compile(r"[^:@\\[\\]]*(?::[0-9]{1,5})?").fullmatch\n',
        '_PLAIN_PORT = re.compile(r".*?(?::[0-9]{1,5})?").fullmatch\n',
        ("tests/test_uniquekey.py::test_the_headlock_conventions_shortcuts_give_the_standard_librarys_answer",),
    ),
    Mutant(
        # A link whose plain netloc names no host (`http://:80/x`) is refused.
        "uniquekey-has-host",
        "runner/uniquekey.py",
        '    return netloc[:1] not in ("", ":")\n',
        "    return True\n",
        ("tests/test_runtime.py::test_enqueue_refuses_non_http_urls",),
    ),
    Mutant(
        # A store write cancelled before its batch went to the thread is never written.
        "store-batch-cancel-drops",
        "runner/queue/_thread.py",
        "                self._pending.remove(call)\n",
        "                pass\n",
        ("tests/test_store.py::test_a_write_cancelled_before_its_batch_goes_to_the_thread_is_never_written",),
    ),
    Mutant(
        # The end of a batch gives the thread the writes that came meanwhile (nobody else would).
        "store-batch-next-given",
        "runner/queue/_thread.py",
        "        if self._pending:\n            self._give(loop)\n",
        "",
        ("tests/test_store.py::test_a_write_cancelled_before_its_batch_goes_to_the_thread_is_never_written",),
    ),
    Mutant(
        # The links going with the handled mark are checked before the items are stored (a refused link fails the
        # attempt with nothing of it written, so its retry does not store the items twice).
        "commit-links-checked-before-items",
        "runner/commit.py",
        "                # Raises InvalidInputError before anything is written, as the add of such a link would.\n",
        "                self._write(lease, items, self._write_now)  # type: ignore[arg-type]\n",
        ("tests/test_faults.py::test_a_commit_the_queue_refuses_is_recorded_and_retried_per_policy",),
    ),
    Mutant(
        # A group-committed call cancelled before its batch was taken is never written (the store, shared adds).
        "groupcommit-cancel-drops",
        "runner/groupcommit.py",
        "                self._pending.remove(call)\n",
        "                pass\n",
        ("tests/test_groupcommit.py::test_a_call_cancelled_before_its_batch_is_taken_is_never_written",),
    ),
    Mutant(
        # A caller cancelled while it waited for the batch being written: the end of that batch must not fail on
        # its cancelled future (the writer's caller would get the error, the others would hang).
        "groupcommit-skip-cancelled-waiter",
        "runner/groupcommit.py",
        "                        if not waiter.done():  # done: cancelled with its caller\n",
        "                        if True:\n",
        ("tests/test_groupcommit.py::test_a_call_cancelled_before_its_batch_is_taken_is_never_written",),
    ),
    Mutant(
        # A worker cancelled after the fetcher handed it a lease, before it ran, passes the lease on.
        "handoff-put-back",
        "runner/handoff.py",
        "                self._offer(item, back=True)  # type: ignore[arg-type]\n",
        "                pass\n",
        ("tests/test_handoff.py::test_an_item_handed_to_a_consumer_cancelled_before_it_ran_goes_to_the_next",),
    ),
    Mutant(
        # A JSON log line goes out in one write: processes sharing a stream (run --processes N) never cut lines.
        "log-line-one-write",
        "runner/logs.py",
        "        logger_factory=structlog.WriteLoggerFactory(out),\n",
        "        logger_factory=structlog.PrintLoggerFactory(out),\n",
        ("tests/test_logs.py::test_json_lines_of_processes_sharing_one_stream_never_cut_into_each_other",),
    ),
    Mutant(
        # orjson writes NaN and infinities as null: such a line must go to the standard encoder, which refuses them.
        "item-null-rechecked",
        "runner/results/items.py",
        '    if data is not None and b"null" not in data:\n',
        "    if data is not None:\n",
        (f"{FAULTS}::test_an_item_json_cannot_represent_is_the_handlers_error",),
    ),
    Mutant(
        # The timer an earlier attempt armed fires during a later one: it must check the deadline it serves now.
        "deadline-checked-at-fire",
        "runner/deadline.py",
        "        if self._loop.time() >= self._at:\n",
        "        if True:\n",
        ("tests/test_deadline.py::test_the_timer_of_an_earlier_scope_does_not_cut_a_later_one_short",),
    ),
    Mutant(
        # A commit's deadline earlier than the armed timer (shutdown's cut) must re-arm it.
        "deadline-rearmed-earlier",
        "runner/deadline.py",
        "        if timer is None or self._timer_at > at:\n",
        "        if timer is None:\n",
        ("tests/test_deadline.py::test_an_earlier_deadline_rearms_the_timer",),
    ),
    Mutant(
        # The fences read the loop's own clock: `time.monotonic` only where that is what the loop's `time` is.
        "clock-loop-own-time",
        "runner/clock.py",
        "            return time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time\n",
        "            return time.monotonic\n",
        ("tests/test_clock.py::test_a_loop_with_its_own_time_is_read_through_it",),
    ),
    Mutant(
        # A worker cancelled while it waited is no longer handed leases (they would go nowhere).
        "handoff-forget-cancelled",
        "runner/handoff.py",
        "            if not waiter.done():  # done: cancelled with its consumer\n",
        "            if True:\n",
        ("tests/test_handoff.py::test_a_consumer_cancelled_while_waiting_is_not_handed_anything",),
    ),
    Mutant(
        # Handled marks committed together: when one misses, the group is undone and each goes alone.
        "store-mark-group-miss",
        "runner/queue/sqlite.py",
        "        if marked != len(marks):  # a miss, or one request marked twice\n",
        "        if False:\n",
        ("tests/test_store.py::test_handled_marks_committed_together_each_get_their_own_outcome",),
    ),
    Mutant(
        # The handler's scope, shielded for the commit, takes the commit's deadline (a stalled mark lets go).
        "commit-deadline",
        "runner/worker.py",
        "                deadline.watch(scope, min(now + COMMIT_TIMEOUT, committer.stop_deadline))\n",
        "",
        (f"{FAULTS}::test_a_commit_that_outlives_its_timeout_lets_go_of_the_lease",),
    ),
    Mutant(
        # The worker's attempts share one cancel scope: a lease lost after its handler ended lets go of it.
        "worker-scope-let-go",
        "runner/worker.py",
        "            lease.scope = None  # a loss from now on must not cancel the scope the next attempt runs in\n",
        "",
        (f"{FAULTS}::test_a_lease_lost_while_its_failure_is_recorded_does_not_cancel_the_next_handler",),
    ),
    Mutant(
        # An attempt its scope cut ends outside that scope, under its request's log context again.
        "worker-cut-log-context",
        "runner/worker.py",
        "bound = log_context.bind(lease.request)",
        'bound = log_context.bind(Request(id="", unique_key="", url=""))',
        ("tests/test_runtime.py::test_a_timed_out_attempt_is_recorded_under_its_request_and_attempt",),
    ),
    Mutant(
        # A scope cancelled under a handler that raised something else is not used for the next attempt.
        "worker-scope-retired",
        "runner/worker.py",
        "        if scope.cancel_called:  # its timer fired or its lease was lost, but no cancellation reached it\n",
        "        if False:\n",
        (f"{FAULTS}::test_a_handler_that_turns_its_timeout_into_an_error_leaves_the_next_one_uncancelled",),
    ),
    Mutant(
        # A write the disk refused half-way is cut back off: the dataset holds whole lines only.
        "dataset-cut-back",
        "runner/results/jsonl.py",
        "                if written:\n                    self._cut_back(written)\n",
        "",
        (f"{FAULTS}::test_a_full_disk_fails_the_attempt_and_never_leaves_a_partial_line",),
    ),
    Mutant(
        # The commit lets go of its lease whatever happens (here: the `finally` of `succeed`, the path a commit
        # timeout interrupts).
        "commit-lets-go",
        "runner/commit.py",
        "            await self._abandon(lease, exc)\n            return False\n"
        "        finally:\n            self.leases.remove(lease)\n        self.stats.handled += 1\n",
        "            await self._abandon(lease, exc)\n            return False\n"
        "        self.leases.remove(lease)\n        self.stats.handled += 1\n",
        (f"{FAULTS}::test_a_commit_that_outlives_its_timeout_lets_go_of_the_lease",),
    ),
    Mutant(
        "heartbeat-bound",
        "runner/heartbeat.py",
        "                with anyio.fail_after(max(lease.expires_at - started, 0)):\n",
        "                with anyio.fail_after(None):\n",
        (f"{FAULTS}::test_one_stalled_prolong_does_not_hold_back_the_others",),
    ),
    Mutant(
        "heartbeat-failing-prolongs",
        "runner/heartbeat.py",
        "            except TimeoutError:\n                _lose(",
        "            except TimeoutError:\n                return\n                _lose(",
        (f"{FAULTS}::test_a_lease_whose_prolongs_keep_failing_is_lost_when_its_lock_runs_out",),
    ),
    Mutant(
        "heartbeat-waits-for-each-beat",
        "runner/heartbeat.py",
        "                    beats.start_soon(partial(prolong, lease=lease, limiter=limiter))\n",
        "                    await prolong(lease=lease, limiter=limiter)\n",
        (f"{FAULTS}::test_one_stalled_prolong_does_not_hold_back_the_others",),
    ),
    Mutant(
        "give-back-waits-for-prolong",
        "runner/commit.py",
        "            await lease.prolonging.wait()",
        "            pass",
        (f"{FAULTS}::test_a_prolong_in_flight_cannot_stretch_a_short_retry_backoff",),
    ),
    Mutant(
        "retry-backoff",
        "runner/commit.py",
        "        if delay > 0:\n",
        "        if False:\n",
        (f"{FAULTS}::test_a_retry_waits_for_its_backoff",),
    ),
    Mutant(
        "retry-after",
        "runner/api/client.py",
        "        if requested is not None:\n            return min(requested, self.max_retry_after)\n",
        "",
        (
            "tests/test_api_backend.py::test_429_honours_retry_after",
            "tests/test_api_faults.py::test_retry_after_spaces_the_next_attempt",
        ),
    ),
    Mutant(
        "api-backoff",
        "runner/api/client.py",
        "        delay = self.base_delay * 2.0**attempt * random.uniform(1, 2)\n",
        "        delay = self.base_delay * random.uniform(1, 2)\n",
        ("tests/test_api_faults.py::test_backoff_delays_grow_exponentially",),
    ),
    Mutant(
        "give-back-forefront",
        "runner/shutdown.py",
        "        await committer.queue.delete_lock(request_id, client_key=committer.client_key, forefront=True)\n",
        "        await committer.queue.delete_lock(request_id, client_key=committer.client_key, forefront=False)\n",
        (f"{FAULTS}::test_requests_given_back_on_shutdown_keep_their_place_at_the_front",),
    ),
    Mutant(
        "give-back-stale-lease",
        "runner/leases.py",
        "        if stale is not None:\n",
        "        if False:\n",
        (f"{FAULTS}::test_a_request_handed_out_again_replaces_its_stale_lease_and_cancels_its_handler",),
    ),
    Mutant(
        "lease-dated-from-attempt",
        "runner/fetcher.py",
        "    expires_at = (head.locked_at if head.locked_at is not None else started) + lock_secs\n",
        "    expires_at = started + lock_secs\n",
        (f"{FAULTS}::test_a_lock_taken_after_retries_is_dated_from_the_attempt_that_took_it",),
    ),
    Mutant(
        "orphans-freed",
        "runner/fetcher.py",
        "                if await _free_orphans(queue, client_key):\n",
        "                if False:\n",
        (f"{FAULTS}::test_locks_taken_by_a_call_whose_answer_was_lost_do_not_hold_up_the_end",),
    ),
    Mutant(
        "unknown-queue-fatal",
        "runner/fetcher.py",
        "            except (UnauthorizedError, InvalidInputError, NotFoundError):\n",
        "            except (UnauthorizedError, InvalidInputError):\n",
        (f"{FAULTS}::test_a_wrong_queue_id_stops_the_run_instead_of_retrying_forever",),
    ),
    Mutant(
        "shutdown-bounded",
        "runner/shutdown.py",
        "                lease.commit_scope.deadline = min(lease.commit_scope.deadline, cut)\n",
        "                pass\n",
        (f"{FAULTS}::test_shutdown_ends_within_grace_plus_ten_seconds_whatever_stalls",),
    ),
    Mutant(
        "finish-confirms-adds",
        "runner/fetcher.py",
        "    behind = 0.0 if recent is None else await unconfirmed_adds(queue, recent)\n",
        "    behind = 0.0\n",
        ("tests/test_finish.py::test_a_run_waits_for_its_own_adds_the_head_does_not_show_yet",),
    ),
    Mutant(
        "migrating-no-grace",
        "runner/shutdown.py",
        '        self.forced.set()\n        log.warning("shutdown.immediate", reason=reason)\n',
        '        log.warning("shutdown.immediate", reason=reason)\n',
        (f"{ACTOR_E2E}::test_migrating_gives_everything_back_at_once_and_the_resumed_run_continues",),
    ),
    Mutant(
        "migrating-never-exits-0",
        "runner/cli/run.py",
        "        if migrated and not received:\n",
        "        if False:\n",
        (f"{ACTOR_E2E}::test_migrating_gives_everything_back_at_once_and_the_resumed_run_continues",),
    ),
    Mutant(
        "resumed-totals",
        "runner/actor/platform.py",
        '        if not isinstance(saved, dict) or saved.get("runId") != self._settings.run_id:\n',
        "        if True:\n",
        (f"{ACTOR_E2E}::test_migrating_gives_everything_back_at_once_and_the_resumed_run_continues",),
    ),
    Mutant(
        "export-no-device-rename",
        "runner/cli/export.py",
        "        if self._destination.exists() and not self._destination.is_file():\n",
        "        if False:\n",
        ("tests/test_export.py::test_a_fifo_or_device_as_output_is_written_to_not_replaced",),
    ),
    Mutant(
        "polite-retry-after",
        "runner/politeness/hosts.py",
        "            wait = step if asked is None else max(asked, step)\n",
        "            wait = step\n",
        (
            f"{POLITE}::test_a_429_with_retry_after_blocks_its_host_only",
            f"{POLITE_HOSTS}::test_retry_after_is_honoured_up_to_its_cap",
        ),
    ),
    Mutant(
        "polite-backoff-grows",
        "runner/politeness/hosts.py",
        "            step = min(_FIRST_STEP * 2 ** (host.level - 1), self._max_delay)\n",
        "            step = _FIRST_STEP\n",
        (f"{POLITE_HOSTS}::test_backoff_grows_on_repeats_and_recovers_step_by_step",),
    ),
    Mutant(
        "polite-slot-limit",
        "runner/politeness/hosts.py",
        "        if host.active < host.limit and not host.waiters:\n",
        "        if not host.waiters:\n",
        (f"{POLITE}::test_no_host_sees_more_than_per_host_concurrency_in_flight",),
    ),
    Mutant(
        "polite-delay",
        "runner/politeness/hosts.py",
        "        host.not_before = now + host.delay if host.delay else 0.0\n",
        "        host.not_before = 0.0\n",
        (f"{POLITE}::test_starts_to_one_host_are_per_host_delay_apart",),
    ),
    Mutant(
        "robots-disallow",
        "runner/politeness/robots.py",
        "        if not entry.rules.can_fetch(url, self._agent):\n",
        "        if False:\n",
        ("tests/test_robots.py::test_disallowed_pages_fail_unfetched_and_the_rest_are_crawled",),
    ),
    Mutant(
        "polite-no-starvation",
        "runner/worker.py",
        "claimed, defer_s = hosts.admit(request.url) if hosts is not None else (None, 0.0)",
        "claimed, defer_s = None, 0.0",
        (f"{POLITE}::test_a_hard_throttled_host_does_not_starve_the_others",),
    ),
    Mutant(
        "gc-threshold-put-back",
        "runner/gcpolicy.py",
        "        if gc.get_threshold() == ours:\n            gc.set_threshold(*before)\n",
        "        pass\n",
        ("tests/test_gcpolicy.py::test_a_run_crawls_with_its_threshold_and_gives_the_process_its_own_back",),
    ),
    Mutant(
        "gc-threshold-only-if-unchanged",
        "runner/gcpolicy.py",
        "        if gc.get_threshold() == ours:\n",
        "        if True:\n",
        ("tests/test_gcpolicy.py::test_a_change_made_in_the_block_is_kept",),
    ),
    Mutant(
        "gc-threshold-never-lowered",
        "runner/gcpolicy.py",
        "    if threshold <= before[0] or not gc.isenabled():\n",
        "    if threshold == 0 or not gc.isenabled():\n",
        ("tests/test_gcpolicy.py::test_nested_blocks_leave_the_outer_ones_threshold_until_it_ends",),
    ),
]


def _copy_checkout(into: Path) -> None:
    """Copy the project's sources (not the venv, git data or caches) to `into`."""
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "storage", ".pytest_cache", ".*_cache")
    shutil.copytree(ROOT, into, ignore=ignore, dirs_exist_ok=True)


def run_mutant(mutant: Mutant, *, timeout: float = 240) -> tuple[str, float]:
    """Apply `mutant` to a fresh copy and run its tests: `killed`, `SURVIVED` or `missing`, and the seconds taken."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"headlock-mutant-{mutant.name}-") as tmp:
        copy = Path(tmp)
        _copy_checkout(copy)
        target = copy / mutant.path
        source = target.read_text()
        if source.count(mutant.original) != 1:
            return "missing", time.monotonic() - started
        target.write_text(source.replace(mutant.original, mutant.mutated))
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--timeout", "90"]
        try:
            result = subprocess.run(
                [*command, *mutant.tests], cwd=copy, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return "killed", time.monotonic() - started  # hung without the guard: that is a failure too
        # pytest exits 1 when tests failed; anything else (a collection error, a crash) says nothing of the guard.
        outcome = {0: "SURVIVED", 1: "killed"}.get(result.returncode, "error")
        return outcome, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """Run the chosen mutants (all by default) and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:32} {mutant.path}")
        return 0
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if unknown := set(args.names) - {m.name for m in MUTANTS}:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    outcomes = []
    for mutant in chosen:
        outcome, took = run_mutant(mutant)
        outcomes.append(outcome)
        print(f"{outcome:9} {mutant.name:32} {took:6.1f} s  {mutant.path}", flush=True)
    if "missing" in outcomes or "error" in outcomes:
        return 2
    return 1 if "SURVIVED" in outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
