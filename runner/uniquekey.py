"""Request ids and default unique keys, as the platform derives them (API contract §7)."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["normalize_url", "request_id_for"]

REQUEST_ID_LENGTH = 15


def request_id_for(unique_key: str) -> str:
    """Return the platform's request id for `unique_key`: base64(sha256) without `+/=`, first 15 chars."""
    digest = base64.b64encode(hashlib.sha256(unique_key.encode()).digest()).decode()
    return digest.translate({ord("+"): None, ord("/"): None, ord("="): None})[:REQUEST_ID_LENGTH]


def normalize_url(url: str) -> str:
    """Return the default unique key of `url`.

    Lower-cases scheme and host, drops the fragment and `utm_*` parameters, sorts the query and drops one trailing
    `/` from the path. Path and query keep their case (as Crawlee JS does).
    """
    parts = urlsplit(url.strip())
    query = sorted(
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.startswith("utm_")
    )
    path = parts.path[:-1] if parts.path.endswith("/") else parts.path
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, urlencode(query), ""))
