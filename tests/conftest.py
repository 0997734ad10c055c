"""Shared fixtures: the anyio backend, a blocking-call detector, a local test site, the real CLI, and polling."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import pytest
from blockbuster import BlockBuster, BlockBusterFunction

from handlers.demo_site import serve_site
from runner import JsonlDataset, RequestDraft, SqliteQueue
from runner.queue.protocol import RequestQueue

if TYPE_CHECKING:
    from tests._postgres import Postgres

ROOT = Path(__file__).resolve().parent.parent

_SCANNED = ["runner", "handlers", "tests"]
"""A blocking call is reported when one of these packages is on its stack: our code, or a test calling a library."""

_ALSO_WATCHED = ["os.utime", "fcntl.flock"]
"""Calls blockbuster does not patch that our loop code makes: the health beat's utime, the dataset's file lock."""

_Allowance = tuple[Iterable[str], str, Iterable[str]]
"""(blocking calls, file, functions): the calls may block while one of the functions of that file is on the stack."""

_ON_THE_LOOP_BY_DESIGN: list[_Allowance] = [
    # One write() to an O_APPEND descriptor: it lands in the page cache in microseconds, cheaper than a thread hop
    # (JsonlDataset's docstring). `push` and the committer's `push_lines` both write through `write_lines`.
    (["os.write"], "runner/results/jsonl.py", ["push", "write_lines"]),
    # One utime() per liveness beat, at most every LIVENESS_EVERY seconds: cheaper than a thread hop
    # (runner/heartbeat.py `_touch_health`, runner/health.py's docstring).
    (["os.utime"], "runner/health.py", ["touch"]),
    # The exclusive flock around that write: held for the microseconds of one write by whoever holds it (another
    # process appending to the same dataset), so waiting for it costs no more than the write itself.
    (["fcntl.flock"], "runner/results/jsonl.py", ["write_lines"]),
    # The first run on the aiohttp engine imports httpx-aiohttp (the import reads package metadata): once per
    # process, like any import.
    (
        ["os.listdir", "os.stat", "io.TextIOWrapper.read", "io.BufferedReader.read"],
        "runner/runtime.py",
        ["default_http_client"],
    ),
]

_MAKES_A_DIRECTORY = ["os.mkdir", "os.stat"]  # Path.mkdir(parents=True, exist_ok=True)
_READS_A_FILE = ["os.stat", "io.TextIOWrapper.read", "io.BufferedReader.read"]
_WRITES_A_FILE = ["io.TextIOWrapper.write", "io.BufferedWriter.write"]

# TEMPORARY. Blocking calls on the event loop in runner/ and handlers/, allowed only until they are fixed; each one
# that runs is listed at the end of the session ("blocking calls on the event loop, allowed until fixed"). Remove an
# entry when its fix lands: the tests that reach the call then fail if it still blocks.
_PENDING_RUNTIME_FIXES: list[_Allowance] = []

# TEMPORARY. The same for test code in files other people own (the fix: read, write or stat files off the loop with
# `anyio.to_thread.run_sync` or `anyio.Path`, or before the loop starts). Also listed at the end of the session.
_PENDING_TEST_FIXES: list[_Allowance] = []

_PENDING_HITS = pytest.StashKey[dict[tuple[str, str, str], Counter[str]]]()
"""(call, file, function) of a pending allowance -> how often each test made that call."""


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[BlockBuster]:
    """Fail a test whose event loop blocks: file, socket, sqlite, lock or sleep calls with our code on the stack.

    Autouse, as in anyio's own suite; it acts only while an event loop runs in the calling thread, so it covers
    async tests and fixtures and the `anyio.run` of sync tests, and never what runs in a worker thread.
    """
    hits = request.config.stash.setdefault(_PENDING_HITS, {})
    detector = BlockBuster(_SCANNED)
    for name in _ALSO_WATCHED:
        detector.functions[name] = BlockBusterFunction(None, name, scanned_modules=_SCANNED)
    for calls, file, functions in _ON_THE_LOOP_BY_DESIGN:
        for name in calls:
            detector.functions[name].can_block_in(file, set(functions))
    pending: dict[str, list[tuple[str, str]]] = {}
    for calls, file, functions in (*_PENDING_RUNTIME_FIXES, *_PENDING_TEST_FIXES):
        for name in calls:
            pending.setdefault(name, []).extend((file, function) for function in functions)
    for name, places in pending.items():
        watched = detector.functions[name]
        watched.can_block_predicate = _AllowedForNow(
            name, watched, watched.can_block_predicate, places, hits, request.node.nodeid
        )
    detector.activate()  # after the changes above: activation captures the allowances
    try:
        yield detector
    finally:
        detector.deactivate()


@dataclass(frozen=True)
class _AllowedForNow:
    """A blockbuster predicate: is the call let through by blockbuster itself, or only by a pending allowance?

    The latter is noted in `hits` for the session summary.
    """

    name: str
    watched: BlockBusterFunction
    allowed: Callable[..., bool]
    places: list[tuple[str, str]]
    hits: dict[tuple[str, str, str], Counter[str]]
    test: str

    def __call__(self, *args: object, **kwargs: object) -> bool:
        if self.allowed(*args, **kwargs):
            return True
        pending: tuple[str, str] | None = None
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if any(
                code.co_name in names and code.co_filename.endswith(file)
                for file, names in self.watched.can_block_functions
            ):
                return True  # allowed anyway (blockbuster's own list, or on the loop by design): nothing to report
            if pending is None:
                pending = next(
                    (p for p in self.places if code.co_name == p[1] and code.co_filename.endswith(p[0])), None
                )
            frame = frame.f_back
        if pending is None:
            return False
        self.hits.setdefault((self.name, *pending), Counter())[self.test] += 1
        return True


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """List the blocking calls the pending allowances let through in this session, with the tests that made them."""
    hits = config.stash.get(_PENDING_HITS, {})
    if not hits:
        return
    terminalreporter.section("blocking calls on the event loop, allowed until fixed")
    for (name, file, function), tests in sorted(hits.items()):
        first = ", ".join(list(tests)[:2]) + (", ..." if len(tests) > 2 else "")
        terminalreporter.write_line(f"{name} in {file} {function}(): {sum(tests.values())} calls, {len(tests)} tests")
        terminalreporter.write_line(f"    {first}")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run async tests on asyncio (the backend the CLI uses)."""
    return "asyncio"


@pytest.fixture(scope="session")
def site() -> Iterator[str]:
    """Base URL of a 300-page test site on 127.0.0.1."""
    with serve_site(300) as url:
        yield url


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """A fresh storage directory."""
    return tmp_path / "storage"


@pytest.fixture
async def queue(storage: Path) -> AsyncIterator[SqliteQueue]:
    """An embedded queue in a fresh storage dir (a module's own `queue` fixture, of another backend, overrides it)."""
    q = SqliteQueue.open(storage, "default")
    yield q
    await q.aclose()


@pytest.fixture
def dataset(storage: Path) -> Iterator[JsonlDataset]:
    """The default dataset in the fresh storage dir."""
    ds = JsonlDataset.open(storage, "default")
    yield ds
    ds.close()


async def seed(queue: RequestQueue, urls: list[str]) -> None:
    """Add `urls` to `queue` as plain GET requests (their URL their unique key), in batches of 25."""
    for start in range(0, len(urls), 25):
        drafts = [RequestDraft(unique_key=u, url=u) for u in urls[start : start + 25]]
        await queue.batch_add(drafts, client_key="seeder")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout importable, no inherited HEADLOCK_, APIFY_ or ACTOR_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADLOCK_", "APIFY_", "ACTOR_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def headlock(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m runner ARGS` to completion; JSON logs on stderr."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_headlock(*args: str, cwd: Path, stderr: Path | None = None, **env: str) -> subprocess.Popen[str]:
    """Start `python -m runner ARGS` in the background (stdout piped; stderr piped or written to a file)."""
    with open(stderr, "w") if stderr else contextlib.nullcontext(subprocess.PIPE) as err:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", *args],
            cwd=cwd,
            env=cli_env(**env),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def run_config(path: Path, handler: str, attempts_file: Path, api: str | None = None, **workers: object) -> Path:
    """Write a run config with `tests.sample_handlers:<handler>` and the given worker settings.

    With `api` (a base URL) the queue is the `default` queue of that API server instead of the embedded one.
    """
    options = workers.pop("options", {})
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"attempts_file": str(attempts_file), **options}.items())
    lines = [f'handler = "tests.sample_handlers:{handler}"', f"handler_options = {{ {opts} }}"]
    if api is not None:
        lines += ["[queue]", 'backend = "apify"', "[api]", f'base_url = "{api}"']
    lines += ["[workers]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in workers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """On the way out (a failed assert included), kill whichever of `procs` still runs and collect its exit."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate()` every 50 ms until true, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for the session (`tests/_postgres.py`), stopped at the end; it fails, never skips."""
    from tests._postgres import ClusterError, start  # noqa: PLC0415 - only Postgres tests need psycopg

    try:
        server = start()
    except ClusterError as exc:
        pytest.fail(f"PostgreSQL test server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres: Postgres) -> str:
    """A DSN of the session's server whose search_path is a fresh schema of this test's own."""
    return postgres.fresh_dsn()
