"""The local request-queue API server (`headlock serve`): Apify API v2 endpoints over the embedded store.

Needs the `server` extra (starlette, uvicorn); import this package only when serving.
"""

from runner.server.app import create_app, serve

__all__ = ["create_app", "serve"]
