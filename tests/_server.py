"""Start the API server on an ephemeral port for tests: as `python -m runner.server`, or in-process."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import uvicorn
from starlette.types import ASGIApp

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def read_listening_url(proc: subprocess.Popen[bytes]) -> str:
    """The URL in the child's first stdout line (`listening on URL`), waiting at most START_TIMEOUT seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=START_TIMEOUT):
            raise RuntimeError(f"the server printed nothing within {START_TIMEOUT} s")
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("listening on "):
        raise RuntimeError(f"the server did not start (exit code {proc.poll()}): {line!r}")
    return line.removeprefix("listening on ")


@contextmanager
def running_server(
    storage: Path,
    *,
    token: str | None = None,
    extra_args: Sequence[str] = (),
    store: str | None = None,
    env: Mapping[str, str] | None = None,
    stderr: Path | None = None,
) -> Iterator[str]:
    """Run the API server over `storage` on 127.0.0.1; yield its base URL; stop it with SIGTERM on exit.

    `extra_args` are more `serve` options (e.g. `--default-queue-id`); `store` is its `--store` (a PostgreSQL DSN:
    the queues in that database); `env` adds to its environment; `stderr` is a file for its log (else inherited).
    """
    command = [sys.executable, "-m", "runner.server", "--host", "127.0.0.1", "--port", "0", "--storage", str(storage)]
    if token is not None:
        command += ["--token", token]
    if store is not None:
        command += ["--store", store]
    command += extra_args
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    with (
        open(stderr, "wb") if stderr is not None else contextlib.nullcontext(None) as err,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=child_env, cwd=REPO) as proc,
    ):
        try:
            yield read_listening_url(proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@asynccontextmanager
async def serving_app(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` with uvicorn in this event loop on 127.0.0.1 (for apps built with test middleware)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY, as serve
    sock.bind(("127.0.0.1", 0))
    # Listening before the server task starts: clients that connect early wait in the backlog.
    sock.listen()
    # A bounded shutdown: connections still open STOP_TIMEOUT s after the block ends are dropped, not waited for.
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=int(STOP_TIMEOUT)
    )
    server = uvicorn.Server(config)
    with sock:
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve, [sock])
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True
