"""The default User-Agent: who we are and where to read about it, as a polite crawler says."""

from __future__ import annotations

import importlib.metadata

__all__ = ["PROJECT_URL", "default_user_agent"]

PROJECT_URL = "https://pypi.org/project/headlock/"
"""Where a site owner who sees our User-Agent reads about headlock."""


def _version() -> str:
    try:
        return importlib.metadata.version("headlock")
    except importlib.metadata.PackageNotFoundError:
        return "0"


_AGENT = f"headlock/{_version()} (+{PROJECT_URL})"
"""Read once, at import: the package metadata is a file read, which must not happen on the event loop."""


def default_user_agent() -> str:
    """`headlock/<version> (+<project URL>)`; the version is `0` when the package metadata is missing."""
    return _AGENT
