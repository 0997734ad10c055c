"""The Apify Actor environment: what headlock reads and listens to when it runs as an Actor on the platform.

Each role is its own module (the platform's events websocket is `runner.actor.events`); nothing is re-exported here.
"""

from __future__ import annotations

__all__: list[str] = []
