"""An ordinary Apify SDK Actor, run by tests/test_sdk_actor.py against `headlock serve` (never imported by headlock).

It is configured only by the Actor environment (`APIFY_IS_AT_HOME`, `APIFY_API_BASE_URL`, `ACTOR_*`), reads its
input from the default key-value store, crawls the site with crawlee's `HttpCrawler` over the default request
queue, pushes one item per page to the default dataset and sets status messages on its run. The queue is used in
the SDK's `shared` mode (several Actors consume it), or in `single` mode with the argument `single`.

Input: `startUrl`; `peers`, the run ids of the other Actors, whose first status message ("ready") each Actor waits
for (at most `readyTimeoutSecs`) so that all start crawling together; `pageDelaySecs`, a pause in each page's
handler (so that one Actor cannot crawl the whole site before the others' first look at the queue).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from datetime import timedelta
from urllib.parse import urljoin

from apify import Actor
from apify.storage_clients import ApifyStorageClient, SmartApifyStorageClient
from crawlee import ConcurrencySettings, service_locator
from crawlee.crawlers import HttpCrawler, HttpCrawlingContext

LINK = re.compile(r'href="(/page/\d+/?)"')


async def wait_for_peers(peers: list[str]) -> None:
    """Poll the peers' runs until each has set a status message ("ready" or any later one; the caller bounds it)."""
    waiting = set(peers)
    while waiting:
        for run_id in sorted(waiting):
            run = await Actor.apify_client.run(run_id).get()
            if run is not None and run.status_message is not None:
                waiting.discard(run_id)
        if waiting:
            await asyncio.sleep(0.1)


async def main() -> None:
    access = "single" if sys.argv[1:] == ["single"] else "shared"
    service_locator.set_storage_client(
        SmartApifyStorageClient(cloud_storage_client=ApifyStorageClient(request_queue_access=access))
    )
    async with Actor:
        actor_input = await Actor.get_input() or {}
        run_id = os.environ["ACTOR_RUN_ID"]
        queue = await Actor.open_request_queue()
        await Actor.set_status_message("ready")
        async with asyncio.timeout(actor_input.get("readyTimeoutSecs", 30)):
            await wait_for_peers(actor_input.get("peers", []))
        await Actor.set_status_message("crawling")

        crawler = HttpCrawler(
            request_manager=queue,
            concurrency_settings=ConcurrencySettings(min_concurrency=2, desired_concurrency=2, max_concurrency=4),
            request_handler_timeout=timedelta(seconds=30),
        )
        handled = 0

        @crawler.router.default_handler
        async def handle(context: HttpCrawlingContext) -> None:
            nonlocal handled
            html = (await context.http_response.read()).decode()
            await asyncio.sleep(actor_input.get("pageDelaySecs", 0))
            await context.push_data({"url": context.request.url, "run": run_id})
            await context.add_requests([urljoin(context.request.url, link) for link in LINK.findall(html)])
            handled += 1

        await crawler.run([actor_input["startUrl"]])
        await Actor.set_status_message(f"handled {handled} pages", is_terminal=True)


if __name__ == "__main__":
    asyncio.run(main())
