"""Shared fixtures: the anyio backend, a local test site, a way to run the real `headlock` CLI, and polling."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from handlers.demo_site import serve_site

ROOT = Path(__file__).resolve().parent.parent


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


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout importable, no inherited HEADLOCK_/APIFY_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADLOCK_", "APIFY_"))}
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
