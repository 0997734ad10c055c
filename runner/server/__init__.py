"""The local request-queue API server (`headlock serve`): Apify API v2 endpoints over the embedded store, or over
a PostgreSQL database shared by several servers (`--store postgresql://...`).

Needs the `server` extra (starlette, uvicorn), and the `postgres` extra for a database; import this package only
when serving.
"""

from runner.server.app import create_app, serve

__all__ = ["create_app", "serve"]
