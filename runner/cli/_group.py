"""`headlock run --processes N`: N `headlock run` children on one queue, supervised as one run.

Each child is `python -m runner` with this process's own `run` command line, minus `--processes` and the options
the parent owns: `--summary`, `--health-file` and `--metrics-port` (each child gets its own summary and health file
in a temporary directory, and port P+i for `--metrics-port P`), and `--client-key` (child i gets `K-i` for a stable
key K, cut to the queue's 32 characters, so a restarted group frees its own stale locks; random keys otherwise).
Children inherit the environment, so any backend the settings name works (embedded store, postgres, `headlock
serve`); runs on the Apify platform are refused (each child would read the Actor's input and serve its events).

The rules a caller cannot guess:

- Signals: SIGINT and SIGTERM are forwarded to every running child, a second one too (a child's second signal skips
  its grace). Children run in their own session, so a Ctrl-C on the terminal reaches them once, through the parent;
  a parent killed with SIGKILL leaves them running to the end of the queue (they are complete workers).
- A child that dies (a non-zero exit no signal of ours asked for, e.g. killed by the kernel's OOM killer) does not
  stop the others: a crawl should finish, and nothing is lost, since the dead child's locks expire after `lock_secs`
  and the others take its requests (a run finishes only when no client holds a lock). The death is logged
  (`group.child_died`) and decides the exit code.
- Exit code: after a signal, 128 + that signal, as for one process; else the worst child's by severity: killed by
  a signal (128+n) > fatal (1, and any unknown code) > bad usage (2) > migrated (75) > failed requests (3,
  `--fail-on-error`) > 0.
- Summary: one `run.finished` event (and `--summary` file) adds the children's up: the counters summed, the top
  errors merged (from each child's top 5), the duration and rates over the group's wall time, `pending` as the
  last child to exit saw it, and per child its client key, pid, reason and exit code (`children`).
- Health: the parent's health file is touched while every running child's is fresh (a child that exited is no
  longer counted: its exit is logged), so `headlock health` on it answers for the group.
- Metrics: children serve theirs on P+1..P+N; the parent serves none.
- `--max-requests` applies to each child.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import Process, TaskStatus

from runner.cli._common import EXIT_FATAL, EXIT_MIGRATED, EXIT_OK, EXIT_USAGE
from runner.cli.run import EXIT_FAILED_REQUESTS, failure_summary, write_summary
from runner.errors import ConfigError
from runner.health import check_health, liveness_interval, touch
from runner.loader import load_handler
from runner.queue.protocol import MAX_CLIENT_KEY
from runner.settings import Settings
from runner.start import start_drafts
from runner.stats import RunStats

__all__ = ["child_argv", "child_client_key", "combine_summaries", "group_exit_code", "run_group"]

log = structlog.get_logger("headlock.group")

PARENT_OPTIONS = ("--processes", "--summary", "--health-file", "--metrics-port", "--client-key")
"""Options of the parent's command line a child does not get as they are (see the module docstring)."""

STOP_TIMEOUT_MARGIN = 10.0
"""A child still running when the parent leaves abnormally gets SIGTERM, then SIGKILL after grace + this."""

_COUNTERS = ("released", *(name for name in RunStats.__dataclass_fields__ if name != "started_at"))
"""The summary's counters that add up across children."""


@dataclass(slots=True)
class Child:
    """One worker process of the group and what is known of it."""

    index: int
    client_key: str | None
    summary: Path
    health: Path
    process: Process | None = None
    exit_code: int | None = None
    result: dict[str, Any] = field(default_factory=dict)


async def run_group(settings: Settings, args: argparse.Namespace, processes: int) -> int:
    """Run `processes` children on the run's queue until all have exited; return the group's exit code.

    With `--summary`, the combined summary is written however the group ends.

    Raises:
        ConfigError: on the Apify platform, a handler or start URL that does not load, or metrics ports past 65535.
    """
    try:
        summary, code = await _supervise(settings, args, processes)
    except BaseException as exc:
        if args.summary is not None:
            failure = failure_summary(exc, client_key=settings.workers.client_key)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(write_summary, args.summary, failure)
        raise
    if args.summary is not None:
        await anyio.to_thread.run_sync(write_summary, args.summary, summary)
    return code


def _check(settings: Settings, processes: int) -> None:
    """Refuse, before any child starts, what would make every child fail the same way."""
    actor = settings.actor
    if actor.is_at_home or actor.run_id or actor.events_url or actor.key_value_store_id or actor.web_server_port:
        raise ConfigError(
            f"--processes: {processes} processes cannot share one Apify Actor run (each would read its input and "
            "serve its events); use --processes 1 on the platform, more with the embedded, postgres or serve backends"
        )
    if not settings.handler:
        raise ConfigError("handler: required (set it in the config file, HEADLOCK_HANDLER or --handler)")
    load_handler(settings.handler)
    start_drafts(settings.start_urls)
    if settings.metrics_port and settings.metrics_port + processes > 65535:
        raise ConfigError(
            f"metrics_port: the children of --processes {processes} serve on {settings.metrics_port + 1}.."
            f"{settings.metrics_port + processes}, past 65535"
        )


def _own_command_line(processes: int) -> list[str]:
    """This process's `run` arguments (`sys.argv`), checked to be the command being run.

    Raises:
        ConfigError: `sys.argv` is not this `run --processes` command (the CLI was called in-process with
            arguments of its own): the children could not be started with the same options.
    """
    from runner.cli._main import build_parser  # noqa: PLC0415 - _main imports the command modules

    argv = sys.argv[1:]
    try:
        again = build_parser().parse_args(argv)
    except SystemExit:
        again = None
    if again is None or again.command_name != "run" or again.processes != processes:
        raise ConfigError("--processes: the children re-run this process's command line, which is not this command")
    return argv


def child_argv(argv: Sequence[str]) -> list[str]:
    """`argv` (a `run` command line) without the `PARENT_OPTIONS` and their values, in any spelling argparse takes
    (`--opt v`, `--opt=v`, an unambiguous prefix); the rest in order."""
    strip = argparse.ArgumentParser(add_help=False, allow_abbrev=True)
    for option in PARENT_OPTIONS:
        strip.add_argument(option)
    # Every prefix argparse accepted in the full parser names one option there, so it names the same one (or
    # none) among these: nothing else is taken out.
    _, rest = strip.parse_known_args(list(argv))
    return rest


def child_client_key(key: str | None, index: int) -> str | None:
    """Child `index`'s client key: `key-index`, `key` cut to keep it within the queue's limit; None for None."""
    if key is None:
        return None
    suffix = f"-{index}"
    return key[: MAX_CLIENT_KEY - len(suffix)] + suffix


def group_exit_code(codes: Sequence[int], signals: Sequence[int]) -> int:
    """The group's exit code from its children's (see the module docstring for the rule)."""
    if signals:
        return 128 + signals[0]
    return max(codes, key=_severity, default=EXIT_OK)


def _severity(code: int) -> int:
    if code == EXIT_OK:
        return 0
    if code == EXIT_FAILED_REQUESTS:
        return 1
    if code == EXIT_MIGRATED:
        return 2
    if code == EXIT_USAGE:
        return 3
    if code >= 128:  # 128+n: ended by signal n
        return 5
    return 4  # EXIT_FATAL, and any code nobody planned


async def _supervise(settings: Settings, args: argparse.Namespace, processes: int) -> tuple[dict[str, Any], int]:
    _check(settings, processes)
    argv = child_argv(_own_command_line(processes))
    workdir = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="headlock-group-")))
    children = [
        Child(
            index=i,
            client_key=child_client_key(settings.workers.client_key, i),
            summary=workdir / f"child-{i}.summary.json",
            health=workdir / f"child-{i}.health",
        )
        for i in range(1, processes + 1)
    ]
    started = anyio.current_time()
    received: list[int] = []
    exited: list[Child] = []
    try:
        async with anyio.create_task_group() as tg:
            spawned = anyio.Event()
            await tg.start(_forward_signals, children, received, spawned)
            try:
                for child in children:
                    child.process = await anyio.open_process(
                        [sys.executable, "-m", "runner", *argv, *_own_options(child, settings)],
                        stdin=subprocess.DEVNULL,
                        stdout=None,
                        stderr=None,
                        start_new_session=True,  # a terminal's Ctrl-C reaches a child once: through us
                    )
            finally:
                spawned.set()
            log.info(
                "group.started",
                processes=processes,
                pids=[c.process.pid for c in children if c.process is not None],
                client_keys=[c.client_key for c in children] if settings.workers.client_key else "random",
            )
            tg.start_soon(_beat_health, children, settings.health_path(), liveness_interval(settings.workers.lock_secs))
            async with anyio.create_task_group() as waiting:
                for child in children:
                    waiting.start_soon(_wait, child, received, exited)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop_left(children, settings.workers.grace + STOP_TIMEOUT_MARGIN)
            for child in children:
                child.result = await anyio.to_thread.run_sync(_read_summary, child.summary)
            await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
    codes = [c.exit_code if c.exit_code is not None else EXIT_FATAL for c in children]
    code = group_exit_code(codes, received)
    summary = combine_summaries(
        [_described(c) for c in children],
        last=exited[-1].index - 1 if exited else None,
        duration=anyio.current_time() - started,
        signal_name=signal.Signals(received[0]).name if received else None,
    )
    summary["exit_code"] = code
    log.info("run.finished", **summary)
    return summary, code


def _own_options(child: Child, settings: Settings) -> list[str]:
    """The options the parent sets for `child`."""
    options = ["--summary", str(child.summary), "--health-file", str(child.health)]
    if settings.metrics_port:
        options += ["--metrics-port", str(settings.metrics_port + child.index)]
    if child.client_key is not None:
        options += ["--client-key", child.client_key]
    return options


async def _forward_signals(
    children: Sequence[Child],
    received: list[int],
    spawned: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Forward each SIGINT/SIGTERM to every running child (signals that come while they start wait for them)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        await spawned.wait()
        async for signum in signals:
            received.append(signum)
            running = [c.process for c in children if c.process is not None and c.process.returncode is None]
            log.info("group.signal", signal=signal.Signals(signum).name, forwarded_to=[p.pid for p in running])
            for process in running:
                process.send_signal(signum)


async def _wait(child: Child, received: Sequence[int], exited: list[Child]) -> None:
    """Wait for `child` to exit; note its exit code (128+n when killed by signal n) and log it."""
    assert child.process is not None  # noqa: S101 - started before any wait
    raw = await child.process.wait()
    child.exit_code = 128 - raw if raw < 0 else raw
    exited.append(child)
    fields = {"child": child.index, "pid": child.process.pid, "exit_code": child.exit_code}
    if child.exit_code in (EXIT_OK, EXIT_FAILED_REQUESTS) or received:
        log.info("group.child_exited", **fields)
    else:
        # The others go on: the dead child's locks expire and they take its requests (module docstring).
        log.error("group.child_died", **fields)


async def _beat_health(children: Sequence[Child], path: Path, every: float) -> None:
    """Touch `path` every `every` seconds while every running child's health file is fresh."""
    while True:
        running = [c.health for c in children if c.exit_code is None]
        await anyio.to_thread.run_sync(_touch_if_fresh, path, running)
        await anyio.sleep(every)


def _touch_if_fresh(path: Path, children: Sequence[Path]) -> None:
    if children and all(check_health(child)[0] for child in children):
        try:
            touch(path)
        except OSError as exc:
            log.warning("health.touch_failed", path=str(path), error=str(exc))


async def _stop_left(children: Sequence[Child], wait: float) -> None:
    """SIGTERM the children still running (the parent is leaving abnormally), SIGKILL them after `wait` seconds."""
    left = [c.process for c in children if c.process is not None and c.process.returncode is None]
    if not left:
        return
    log.warning("group.stopping_children", pids=[p.pid for p in left])
    for process in left:
        process.terminate()
    with anyio.move_on_after(wait):
        for process in left:
            await process.wait()
    for process in left:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _read_summary(path: Path) -> dict[str, Any]:
    """A child's summary file, or {} when it wrote none (killed) or an unreadable one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _described(child: Child) -> dict[str, Any]:
    """`child`'s summary with its identity and exit code (a child that wrote none: reason `died`)."""
    pid = child.process.pid if child.process is not None else None
    return {"reason": "died", **child.result, "pid": pid, "exit_code": child.exit_code}


def combine_summaries(
    children: Sequence[Mapping[str, Any]], *, last: int | None, duration: float, signal_name: str | None
) -> dict[str, Any]:
    """One summary for the group from its children's (`children[last]` exited last; see the module docstring).

    `reason` is the signal's name after a signal, else the reason of the child with the worst exit code.
    """
    totals = {name: sum(int(c.get(name) or 0) for c in children) for name in _COUNTERS}
    errors: Counter[str] = Counter()
    for child in children:
        for row in child.get("failed_top") or []:
            errors[str(row.get("error"))] += int(row.get("count") or 0)
    codes = [EXIT_FATAL if c.get("exit_code") is None else int(c["exit_code"]) for c in children]
    worst = codes.index(max(codes, key=_severity)) if codes else None
    locations = list(dict.fromkeys(str(c["results"]) for c in children if c.get("results")))
    finished = totals["handled"] + totals["failed"]
    return {
        "reason": signal_name or (children[worst].get("reason", "died") if worst is not None else "finished"),
        "processes": len(children),
        **totals,
        "duration_s": round(duration, 3),
        "rate": round(finished / duration, 1) if duration > 0 else 0.0,
        "pages_per_min": round(totals["handled"] * 60 / duration, 1) if duration > 0 else 0.0,
        "results": ", ".join(locations) if locations else None,
        "pending": children[last].get("pending") if last is not None else None,
        "failed_top": [{"count": n, "error": e} for e, n in errors.most_common(5)],
        "children": [
            {k: c.get(k) for k in ("client_key", "pid", "reason", "exit_code", "handled", "failed", "results")}
            for c in children
        ],
    }
