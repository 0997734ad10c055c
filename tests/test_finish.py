"""The finish test holds on an eventually consistent queue: a run does not end while its latest adds are unseen."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from runner import Context, JsonlDataset, WorkerSettings, run
from runner.queue.api import ApiQueue
from runner.server.app import create_app
from runner.uniquekey import request_id_for
from tests._server import serving_app

pytestmark = pytest.mark.anyio

VISIBLE_AFTER = 1.0
"""Seconds a new request stays invisible (in the head and by id) on the lagging server."""


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio."""
    return "asyncio"


class LaggingAdds:
    """ASGI layer over `headlock serve`: batch adds are acknowledged at once but applied `delay` s later.

    The acknowledgement is what the platform answers; the request then shows in the head (and by id) only once
    applied, like a new request on the platform's eventually consistent head. A delayed add is applied before the
    first call that arrives after its time.
    """

    def __init__(self, app: Any, *, delay: float) -> None:
        self.app = app
        self.delay = delay
        self.due: list[tuple[float, dict[str, Any], bytes]] = []
        self.acknowledged = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._apply_due()
        if scope["method"] == "POST" and scope["path"].endswith("/requests/batch"):
            body = await _read_body(receive)
            self.due.append((anyio.current_time() + self.delay, scope, body))
            await self._acknowledge(scope, body, send)
            return
        await self.app(scope, receive, send)

    async def _apply_due(self) -> None:
        now = anyio.current_time()
        ready = [item for item in self.due if item[0] <= now]
        self.due = [item for item in self.due if item[0] > now]
        for _, scope, body in ready:
            await self.app(scope, _replay(body), _discard)

    async def _acknowledge(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        headers = dict(scope["headers"])
        raw = gzip.decompress(body) if headers.get(b"content-encoding") == b"gzip" else body
        processed = [
            {
                "requestId": request_id_for(item["uniqueKey"]),
                "uniqueKey": item["uniqueKey"],
                "wasAlreadyPresent": False,
                "wasAlreadyHandled": False,
            }
            for item in json.loads(raw)
        ]
        self.acknowledged += len(processed)
        answer = json.dumps({"data": {"processedRequests": processed, "unprocessedRequests": []}}).encode()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _discard(message: dict[str, Any]) -> None:
    return None


async def test_a_run_waits_for_its_own_adds_the_head_does_not_show_yet(tmp_path: Path) -> None:
    """A link acknowledged but invisible for a while is read back by id, waited for and handled; no early finish."""
    lagging = LaggingAdds(create_app(tmp_path / "server"), delay=VISIBLE_AFTER)
    seen: list[str] = []

    async def handle(ctx: Context) -> None:
        seen.append(ctx.url)
        if ctx.url.endswith("/start"):
            await ctx.enqueue("https://example.com/later")

    async with serving_app(lagging) as url:
        queue = await ApiQueue.open(base_url=url, token=None, name="lagging")
        dataset = await anyio.to_thread.run_sync(JsonlDataset.open, tmp_path, "default")
        try:
            with structlog.testing.capture_logs() as logs, anyio.fail_after(30):
                summary = await run(
                    queue,
                    handle,
                    dataset,
                    workers=WorkerSettings(concurrency=2),
                    start_urls=["https://example.com/start"],
                )
            later = await queue.get_request(request_id_for("https://example.com/later"))
        finally:
            await queue.aclose()
            dataset.close()
    assert lagging.acknowledged == 2  # the start URL and the link: both came in through the lagging path
    assert summary.reason == "finished"
    assert seen == ["https://example.com/start", "https://example.com/later"]
    assert later is not None
    assert later.handled_at is not None
    assert any(e["event"] == "fetch.head_behind" for e in logs)
