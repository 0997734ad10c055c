"""What the benchmarks share: the machine record, quiet logs, child processes that announce a URL, and statistics."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tests._server import read_listening_url

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = 15.0


def machine() -> dict[str, Any]:
    """Where the figures were measured: platform, CPUs, CPU model, Python, load average (others' work) and code."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "code": code_state(),
    }


def code_state() -> dict[str, Any]:
    """The commit measured and the files of runner/ and handlers/ that differ from it (others may be editing)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=False)
        return done.stdout.strip()

    modified = git("status", "--porcelain", "--", "runner", "handlers").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": sorted(line.split()[-1] for line in modified)}


def emit(record: dict[str, Any], where: dict[str, Any] | None = None) -> None:
    """Print one measured configuration as one JSON line, noting the machine (`where`, else `machine()`)."""
    if "machine" not in record:
        record = {**record, "machine": where or machine()}
    print(json.dumps(record), flush=True)


def quiet_logs() -> None:
    """Drop headlock's info events: they would cost time and drown the figures."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb, 1)


def cpu_seconds() -> float:
    """CPU time this process (all its threads) has used so far, user plus system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MB (Linux only)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024, 1)


@dataclass(slots=True)
class SizeWatch:
    """The largest size a file reached while watched, in MB (0 while it did not exist)."""

    largest_mb: float = 0.0


@contextmanager
def watch_size(path: Path, every: float = 0.02) -> Iterator[SizeWatch]:
    """Sample `path`'s size every `every` seconds in a thread until the block ends (e.g. a SQLite WAL)."""
    watch = SizeWatch()
    done = threading.Event()

    def sample() -> None:
        while True:
            with suppress(FileNotFoundError):
                watch.largest_mb = max(watch.largest_mb, round(path.stat().st_size / 1024 / 1024, 1))
            if done.wait(every):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        done.set()
        thread.join()


def pin_to(cpu: int) -> int | None:
    """Pin this process to `cpu` (modulo the CPUs it may use); return the CPU, or None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[cpu % len(allowed)]
    os.sched_setaffinity(0, {chosen})
    return chosen


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    """The median of `values`."""
    return statistics.median(values)


@dataclass(slots=True)
class Child:
    """A child process that announced its URL; `peak_rss_mb` is known once it has exited."""

    url: str
    pid: int
    peak_rss_mb: float | None = None
    exit_code: int | None = None


@contextmanager
def child_server(args: Sequence[str]) -> Iterator[Child]:
    """Run `python ARGS` from the repository root until the block ends; it must print `listening on URL` first.

    On exit the child gets SIGTERM and is reaped with `wait4`, which gives its own peak RSS (`ru_maxrss`), not the
    largest of all children as `getrusage(RUSAGE_CHILDREN)` would.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        child = Child(url=read_listening_url(proc), pid=proc.pid)
        yield child
    finally:
        proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        status, usage = 0, None
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout is not None:
            proc.stdout.close()
    if usage is not None:
        child.peak_rss_mb = round(usage.ru_maxrss / 1024, 1)
    child.exit_code = proc.returncode


def run_child_json(
    args: Sequence[str], *, timeout: float = 3600, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run `python ARGS` from the repository root and return the JSON object it prints last."""
    return run_children_json([args], timeout=timeout, env=env)[0]


def run_children_json(
    arg_lists: Sequence[Sequence[str]], *, timeout: float = 3600, env: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run `python ARGS` for each of `arg_lists` at the same time, with `env` added to the environment; return the
    JSON object each prints last."""
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True
        )
        for args in arg_lists
    ]
    results: list[dict[str, Any]] = []
    try:
        for args, proc in zip(arg_lists, procs, strict=True):
            stdout, stderr = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"child {list(args)} failed ({proc.returncode}): {stderr[-2000:]}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results
