"""The API backend end to end: `headlock run` processes over HTTP against `headlock serve`, with and without faults."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.results.jsonl import read_items
from runner.server import create_app
from tests._server import running_server, serving_app
from tests.conftest import cli_env, headlock, start_headlock
from tests.test_cli import queue_state, read_queue_state

pytestmark = pytest.mark.slow


def api_config(path: Path, base_url: str, **extra: str) -> Path:
    """A run config for the crawl handler against the API at `base_url`."""
    lines = [
        'handler = "handlers.crawl:handle"',
        "handler_options = { max_depth = 10 }",
        "[queue]",
        'backend = "apify"',
        'name = "crawl"',
        "[api]",
        f'base_url = "{base_url}"',
        *extra.get("api", "").splitlines(),
        "[workers]",
        "concurrency = 8",
        *extra.get("workers", "").splitlines(),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_four_processes_crawl_over_http_each_page_once(tmp_path: Path, site: str) -> None:
    """Four `headlock run` processes share one queue through `headlock serve`: 300 pages, each handled once."""
    server_storage = tmp_path / "server"
    with running_server(server_storage) as base_url:
        cfg = api_config(tmp_path / "c.toml", base_url)
        added = headlock("enqueue", "--config", str(cfg), f"{site}/page/0", cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        procs = [start_headlock("run", "--config", str(cfg), cwd=tmp_path) for _ in range(4)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
        status = headlock("status", "--config", str(cfg), "--json", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
    # On the API backend the items go to the server's dataset (the same JSONL layout, on its side).
    urls = Counter(item["url"] for item in read_items(server_storage / "datasets/default.jsonl"))
    assert len(urls) == 300
    assert max(urls.values()) == 1
    total, handled, locks = queue_state(server_storage, "crawl")
    assert (total, handled, locks) == (300, 300, [])


class Faults:
    """Test-only ASGI middleware: a share of queue calls answers 500 or 429, or stalls past the client timeout."""

    def __init__(self, app: ASGIApp, *, rate: float, stall: float, seed: int = 7) -> None:
        self.app = app
        self.rate = rate
        self.stall = stall
        self.random = random.Random(seed)
        self.injected: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v2/request-queues/"):
            await self.app(scope, receive, send)
            return
        roll = self.random.random()
        if roll >= self.rate:
            await self.app(scope, receive, send)
            return
        kind = ("500", "429", "stall")[int(roll / self.rate * 3)]
        self.injected[kind] += 1
        if kind == "stall":
            # The call takes effect, but its answer arrives after the client gave up: the client must retry safely.
            async def late_send(message: dict[str, object]) -> None:  # type: ignore[misc]
                if message["type"] == "http.response.start":
                    await anyio.sleep(self.stall)
                await send(message)  # type: ignore[arg-type]

            await self.app(scope, receive, late_send)
            return
        status = int(kind)
        body = b'{"error":{"type":"injected","message":"fault injected by the test"}}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 429:
            headers.append((b"retry-after", b"0"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.mark.anyio
async def test_crawl_completes_despite_20_percent_faulty_queue_calls(tmp_path: Path, site: str) -> None:
    """With 20 % of queue calls failing (500, 429, stalls), a 2-process crawl completes: nothing lost, none twice."""
    server_storage = tmp_path / "server"
    faults: list[Faults] = []

    def keep(app: ASGIApp, **kwargs: float) -> Faults:
        faults.append(Faults(app, **kwargs))
        return faults[-1]

    app = create_app(server_storage, middleware=[Middleware(keep, rate=0.2, stall=1.5)])  # type: ignore[arg-type]
    async with serving_app(app) as base_url:
        settings = {"api": "timeout = 0.75\nmax_retries = 10", "workers": "lock_secs = 15"}
        cfg = await anyio.to_thread.run_sync(partial(api_config, tmp_path / "c.toml", base_url, **settings))
        add = await anyio.run_process(
            [sys.executable, "-m", "runner", "enqueue", "--config", str(cfg), f"{site}/page/0"],
            cwd=tmp_path,
            env=cli_env(),
            check=False,
        )
        assert add.returncode == 0, add.stderr.decode()[-2000:]
        with anyio.fail_after(150):
            async with anyio.create_task_group() as tg:
                results: list[subprocess.CompletedProcess[bytes]] = []

                async def worker() -> None:
                    command = [sys.executable, "-m", "runner", "run", "--config", str(cfg)]
                    results.append(await anyio.run_process(command, cwd=tmp_path, env=cli_env(), check=False))

                for _ in range(2):
                    tg.start_soon(worker)
    for result in results:
        assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert sum(faults[0].injected.values()) >= 20
    assert set(faults[0].injected) == {"500", "429", "stall"}
    items = await anyio.to_thread.run_sync(read_items, server_storage / "datasets/default.jsonl")
    urls = Counter(item["url"] for item in items)
    assert len(urls) == 300
    twice = [url for url, n in urls.items() if n > 1]
    context = [line for r in results for line in r.stderr.decode().splitlines() if any(u in line for u in twice)]
    assert not twice, "\n".join(context[-40:])
    total, handled, locks = await read_queue_state(server_storage, "crawl")
    assert (total, handled) == (300, 300)
    assert locks == []
