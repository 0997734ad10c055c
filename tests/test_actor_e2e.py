"""`headlock run` as an Apify Actor, end to end: configured only by the platform's variables, against a real
`headlock serve` standing in for the platform, with the run's events served by the test over a real websocket.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from tests._events import EventServer, event_server
from tests._server import running_server
from tests.conftest import ROOT, cli_env, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

QUEUE, DATASET, STORE, RUN = "runQueue1", "runDataset1", "runStore1", "run-e2e-0123456789abcdefghijklmnop"
WAIT = 60.0


@pytest.fixture
def anyio_backend() -> str:
    """The events websocket needs asyncio."""
    return "asyncio"


@pytest.fixture
def platform(tmp_path: Path) -> Any:
    """`headlock serve` with the run's default storages."""
    args = ["--default-queue-id", QUEUE, "--default-dataset-id", DATASET, "--default-kv-store-id", STORE]
    with running_server(tmp_path / "platform", extra_args=args) as url:
        yield url


async def put_input(api: httpx.AsyncClient, data: dict[str, Any]) -> None:
    """Store the run's INPUT record, as the platform does before the run starts."""
    response = await api.put(
        f"/v2/key-value-stores/{STORE}/records/INPUT",
        content=json.dumps(data),
        headers={"Content-Type": "application/json"},
    )
    assert response.is_success, response.text


async def poll(check: Callable[[], Any], what: str, within: float = WAIT) -> Any:
    """Call async `check` every 0.1 s until it returns something truthy; fail after `within` seconds."""
    with anyio.move_on_after(within):
        while not (result := await check()):  # noqa: ASYNC110 - another process's state: no event to wait on
            await anyio.sleep(0.1)
        return result
    pytest.fail(f"not within {within} s: {what}")


async def requests_of(api: httpx.AsyncClient, *, locked: bool = False) -> list[dict[str, Any]]:
    """Every request of the run's queue (the list endpoint), or only the locked ones."""
    params: dict[str, Any] = {"limit": 10_000, **({"filter": "locked"} if locked else {})}
    answer = await api.get(f"/v2/request-queues/{QUEUE}/requests", params=params)
    answer.raise_for_status()
    return list(answer.json()["data"]["items"])


async def items_of(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every item of the run's default dataset."""
    answer = await api.get(f"/v2/datasets/{DATASET}/items", params={"format": "json"})
    answer.raise_for_status()
    return list(answer.json())


@asynccontextmanager
async def actor(tmp_path: Path, platform: str, events: EventServer, **env: str) -> AsyncIterator[Any]:
    """`python -m runner run --config config/actor.toml` (the image's command) with the platform's variables only."""
    variables = cli_env(
        APIFY_API_BASE_URL=platform,
        APIFY_TOKEN="not-checked-by-this-server",  # noqa: S106 - a placeholder the server ignores
        APIFY_IS_AT_HOME="1",
        ACTOR_DEFAULT_REQUEST_QUEUE_ID=QUEUE,
        ACTOR_DEFAULT_DATASET_ID=DATASET,
        ACTOR_DEFAULT_KEY_VALUE_STORE_ID=STORE,
        ACTOR_RUN_ID=RUN,
        ACTOR_EVENTS_WEBSOCKET_URL=f"{events.url}/{RUN}",
        HEADLOCK_STORAGE_DIR=str(tmp_path / "container"),
        HEADLOCK_PROGRESS_EVERY="0.2",
        **env,
    )
    log = await anyio.to_thread.run_sync(lambda: (tmp_path / "actor.log").open("ab"))
    command = [sys.executable, "-m", "runner", "run", "--config", str(ROOT / "config" / "actor.toml")]
    try:
        async with await anyio.open_process(command, env=variables, cwd=tmp_path, stdout=log, stderr=log) as proc:
            try:
                yield proc
            finally:
                if proc.returncode is None:
                    proc.kill()
    finally:
        await anyio.to_thread.run_sync(log.close)


async def log_events(tmp_path: Path) -> list[dict[str, Any]]:
    """The Actor's JSON log lines."""
    text = await anyio.Path(tmp_path / "actor.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_an_actor_run_reads_its_input_and_leaves_its_items_in_the_runs_dataset(
    tmp_path: Path, platform: str, site: str
) -> None:
    """INPUT's startUrls, handlerOptions and maxConcurrency drive the crawl; items land in the default dataset (no
    local file), the status message ends terminal with the counts, the counters are saved, no lock is left."""
    async with httpx.AsyncClient(base_url=platform, timeout=10) as api, event_server() as events:
        await put_input(
            api,
            {
                "startUrls": [{"url": f"{site}/page/0"}, f"{site}/page/1"],
                "handlerOptions": {"max_depth": 1},
                "maxConcurrency": 4,
                "proxyConfiguration": {"useApifyProxy": False},
            },
        )
        async with actor(tmp_path, platform, events) as proc:
            await events.wait_connected(1)
            with anyio.fail_after(WAIT):
                await proc.wait()
        logs = await log_events(tmp_path)
        assert proc.returncode == 0, logs[-5:]
        requests = await requests_of(api)
        items = await items_of(api)
        run = (await api.get(f"/v2/actor-runs/{RUN}")).json()["data"]
        state = (await api.get(f"/v2/key-value-stores/{STORE}/records/HEADLOCK_STATE")).json()
    assert len(requests) > 2  # the start pages and their links, one hop deep
    assert all(r.get("handledAt") for r in requests)
    assert sorted(item["url"] for item in items) == sorted(r["url"] for r in requests)
    assert not await anyio.Path(tmp_path / "container" / "datasets").exists()  # nothing on the container's disk
    counts = f"{len(requests)} handled, 0 failed, {len(items)} items in dataset"
    assert run["statusMessage"].startswith(f"finished: {counts}")
    assert run["isStatusMessageTerminal"] is True
    assert state["runId"] == RUN
    assert state["stats"]["handled"] == len(requests)
    started = next(e for e in logs if e["event"] == "run.starting")
    assert started["concurrency"] == 4
    assert any(e["event"] == "actor.input.ignored" and e["fields"] == ["proxyConfiguration"] for e in logs)


async def test_aborting_is_the_graceful_stop(tmp_path: Path, platform: str, site: str) -> None:
    """`aborting` stops as SIGTERM does: in-flight handlers get their grace and finish, the rest is given back,
    no lock is left, and the process exits 0 (the platform then marks the run aborted)."""
    gate = tmp_path / "gate"
    urls = [f"{site}/page/{i}" for i in range(6)]
    async with httpx.AsyncClient(base_url=platform, timeout=10) as api, event_server() as events:
        await put_input(api, {"startUrls": urls, "handlerOptions": {"gate": str(gate)}, "maxConcurrency": 2})
        port = free_port()
        env = {
            "HEADLOCK_HANDLER": "tests.sample_handlers:gated",
            "HEADLOCK_WORKERS__GRACE": "30",
            "ACTOR_WEB_SERVER_PORT": str(port),
        }
        async with actor(tmp_path, platform, events, **env) as proc:
            await events.wait_connected(1)

            async def two_locked() -> bool:
                return len(await requests_of(api, locked=True)) >= 2

            await poll(two_locked, "two requests in flight")
            # The platform's web server port serves the metrics and a health probe.
            web = f"http://127.0.0.1:{port}"
            metrics = await poll(lambda: _get(f"{web}/metrics"), "metrics on the web server port")
            assert "headlock_requests_in_flight 2.0" in metrics.text
            health = await _get(f"{web}/health")
            assert health is not None
            assert health.status_code == 200
            assert health.text.startswith("healthy: last heartbeat")
            await events.send("aborting")
            await poll(lambda: _after_stop_requested(tmp_path), "the stop request")
            await anyio.Path(gate).touch()  # the in-flight handlers finish within their grace
            with anyio.fail_after(WAIT):
                await proc.wait()
        requests = await requests_of(api)
        locked = await requests_of(api, locked=True)
        run = (await api.get(f"/v2/actor-runs/{RUN}")).json()["data"]
    assert proc.returncode == 0
    handled = [r for r in requests if r.get("handledAt")]
    assert 2 <= len(handled) < len(urls)  # the in-flight ones finished; the rest stays for the next run
    assert locked == []
    assert run["statusMessage"].startswith("aborting:")


async def _get(url: str) -> httpx.Response | None:
    """GET `url`; None while nothing answers there."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.get(url)
    except httpx.TransportError:
        return None


async def _after_stop_requested(tmp_path: Path) -> bool:
    return any(e["event"] == "shutdown.requested" for e in await log_events(tmp_path))


async def test_migrating_gives_everything_back_at_once_and_the_resumed_run_continues(
    tmp_path: Path, platform: str, site: str
) -> None:
    """`migrating`: in-flight handlers are cut at once (no grace), every request goes back unattempted, locks are
    released, the counters saved; the process then waits to be stopped (never exit 0), and the resumed run (same run
    id) handles the rest and continues the totals."""
    gate = tmp_path / "gate"
    urls = [f"{site}/page/{i}" for i in range(6)]
    async with httpx.AsyncClient(base_url=platform, timeout=10) as api, event_server() as events:
        await put_input(api, {"startUrls": urls[:1], "handlerOptions": {"gate": str(gate)}, "maxConcurrency": 3})
        env = {"HEADLOCK_HANDLER": "tests.sample_handlers:gated", "HEADLOCK_WORKERS__GRACE": "60"}
        # Kept alive while its queue is empty, so the test can add work to it after its first request.
        async with actor(tmp_path, platform, events, HEADLOCK_WORKERS__KEEP_ALIVE="true", **env) as proc:
            await events.wait_connected(1)
            await poll(lambda: _handled_count(api, 0), "the queue to exist")
            # One request handled before the move, so the resumed run has totals to continue.
            await anyio.Path(gate).touch()
            await poll(lambda: _handled_count(api, 1), "the first request handled")
            await anyio.Path(gate).unlink()
            await _add(api, urls[1:])

            async def three_locked() -> bool:
                return len(await requests_of(api, locked=True)) >= 3

            await poll(three_locked, "three requests in flight")
            moved_at = anyio.current_time()
            await events.send("migrating", {"timeRemainingSecs": 30})

            async def all_released() -> bool:
                return not await requests_of(api, locked=True)

            await poll(all_released, "every lock released", within=15)
            released_in = anyio.current_time() - moved_at
            await poll(lambda: _logged(tmp_path, "actor.migrated_waiting"), "the process waiting to be moved")
            assert proc.returncode is None  # it does not exit 0 on its own: the platform would end the run
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(WAIT):
                await proc.wait()
        assert proc.returncode == 128 + signal.SIGTERM
        assert released_in < 15  # not the 60 s grace
        requests = {r["url"]: r for r in await requests_of(api)}
        assert [u for u in urls[1:] if requests[u].get("handledAt")] == []
        assert {requests[u]["retryCount"] for u in urls[1:]} == {0}  # given back, not counted as an attempt
        state = (await api.get(f"/v2/key-value-stores/{STORE}/records/HEADLOCK_STATE")).json()
        assert state["stats"]["handled"] == 1

        await anyio.Path(gate).touch()
        async with actor(tmp_path, platform, events, **env) as resumed:
            with anyio.fail_after(WAIT):
                await resumed.wait()
        assert resumed.returncode == 0
        requests = {r["url"]: r for r in await requests_of(api)}
        state = (await api.get(f"/v2/key-value-stores/{STORE}/records/HEADLOCK_STATE")).json()
    assert all(r.get("handledAt") for r in requests.values())
    assert state["stats"]["handled"] == len(urls)  # 1 before the move + 5 after: the totals continued
    finished = [e for e in await log_events(tmp_path) if e["event"] == "run.finished"]
    assert finished[-1]["handled"] == len(urls)


async def _handled_count(api: httpx.AsyncClient, n: int) -> bool:
    answer = await api.get(f"/v2/request-queues/{QUEUE}")
    return answer.is_success and answer.json()["data"]["handledRequestCount"] >= n


async def _add(api: httpx.AsyncClient, urls: list[str]) -> None:
    body = [{"url": url, "uniqueKey": url} for url in urls]
    answer = await api.post(f"/v2/request-queues/{QUEUE}/requests/batch", json=body)
    assert answer.is_success, answer.text
    assert len(answer.json()["data"]["processedRequests"]) == len(urls)


async def _logged(tmp_path: Path, event: str) -> bool:
    return any(e["event"] == event for e in await log_events(tmp_path))


def test_the_actor_files_describe_the_image() -> None:
    """`.actor/actor.json` points at the Dockerfile and at input and dataset schemas that exist and parse, and the
    input schema lists exactly the fields headlock reads."""
    actor_dir = ROOT / ".actor"
    definition = json.loads((actor_dir / "actor.json").read_text())
    assert definition["actorSpecification"] == 1
    assert (actor_dir / definition["dockerfile"]).resolve() == ROOT / "Dockerfile"
    schema = json.loads((actor_dir / definition["input"]).read_text())
    assert set(schema["properties"]) == {"startUrls", "maxRequestsPerCrawl", "maxConcurrency", "handlerOptions"}
    dataset = json.loads((actor_dir / definition["storages"]["dataset"]).read_text())
    assert dataset["actorSpecification"] == 1
    assert (actor_dir / definition["dockerContextDir"]).resolve() == ROOT
