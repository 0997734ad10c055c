"""What a handler receives: `async def handle(ctx: Context) -> None`."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
import structlog

from runner.errors import InvalidItemError, InvalidUrlError
from runner.models import Request, RequestDraft
from runner.results.items import encode_item
from runner.uniquekey import KeyMemo, UniqueKeyFunction, has_host, normalize_parts

__all__ = ["Context", "make_draft"]

_SCHEMES = frozenset({"http", "https"})


def make_draft(
    url_or_draft: str | RequestDraft,
    *,
    label: str | None = None,
    user_data: Mapping[str, Any] | None = None,
    unique_key: str | None = None,
    key_function: UniqueKeyFunction = normalize_parts,
) -> RequestDraft:
    """Build a request draft for `url_or_draft`, with `key_function` of the URL as default `uniqueKey`.

    `key_function` is the run's convention (`runner.uniquekey.unique_key_function`); the default is headlock's.

    Raises:
        InvalidUrlError: not an absolute http(s) URL.
    """
    if isinstance(url_or_draft, RequestDraft):
        return url_or_draft
    url, parts = _checked_url(url_or_draft)
    return _draft(url, unique_key or key_function(parts), label, user_data)


def _draft(url: str, unique_key: str, label: str | None, user_data: Mapping[str, Any] | None) -> RequestDraft:
    """The draft of a checked URL; `label` goes into a copy of `user_data`."""
    data: dict[str, Any] = dict(user_data or {})
    if label is not None:
        data["label"] = label
    return _validate_draft({"unique_key": unique_key, "url": url, "user_data": data})


_validate_draft: Callable[[dict[str, Any]], RequestDraft] = RequestDraft.__pydantic_validator__.validate_python
"""`RequestDraft(**fields)` without the Python frame of pydantic's `__init__` (a new link a page comes this way)."""


def _checked_url(url: str) -> tuple[str, SplitResult]:
    """`url` stripped and its parts, if it is an absolute http(s) URL; else `InvalidUrlError`."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed `[`: this error names the URL
        raise InvalidUrlError(f"not an absolute http(s) URL: {url!r} ({exc})") from exc
    if parts.scheme.lower() not in _SCHEMES or not has_host(parts):
        raise InvalidUrlError(f"not an absolute http(s) URL: {url!r}")
    return url, parts


class SharedHttp:
    """The handlers' shared client, built on first use: a run whose handlers make no request never builds it (nor
    imports its engine, aiohttp's: about 0.15 s and 10 MB). `aclose` closes it if it was built."""

    __slots__ = ("_build", "_client")

    def __init__(self, build: Callable[[], httpx.AsyncClient]) -> None:
        self._build = build
        self._client: httpx.AsyncClient | None = None

    def get(self) -> httpx.AsyncClient:
        """The client, built now if this is its first use."""
        if self._client is None:
            self._client = self._build()
        return self._client

    async def aclose(self) -> None:
        """Close the client, if it was built."""
        if self._client is not None:
            await self._client.aclose()


class Context:
    """One attempt at one request.

    `enqueue` and `push_data` are buffered and committed only when the handler returns normally: a failed attempt
    leaves no results and no new requests behind.
    """

    __slots__ = (
        "_enqueued", "_http", "_items", "_known", "_memo", "_new", "_unique_key", "log", "options", "request", "url",
    )  # fmt: skip

    url: str
    """The request URL (a plain attribute: handlers read it several times a page)."""

    def __init__(
        self,
        request: Request,
        *,
        http: httpx.AsyncClient | SharedHttp,
        log: structlog.typing.FilteringBoundLogger,
        options: Mapping[str, Any],
        known: Container[str] = frozenset(),
        unique_key: UniqueKeyFunction = normalize_parts,
        key_memo: KeyMemo | None = None,
    ) -> None:
        """`known`: unique keys already in the queue (the runtime passes those this process added).

        `unique_key`: the default `uniqueKey` of an enqueued URL, the run's convention (headlock's by default);
        `key_memo` remembers it for URL texts met before (the runtime shares one per run).
        """
        self.request = request
        self.url = request.url
        self._http = http
        self.log = log
        self.options = options
        self._known = known
        self._unique_key = unique_key
        self._memo = key_memo
        # None marks a request already in the queue: counted by `enqueue`, but with nothing to send.
        self._enqueued: dict[bool, dict[str, RequestDraft | None]] = {False: {}, True: {}}
        self._items: list[str] = []
        self._new = 0
        """Drafts buffered in `_enqueued` (its other entries are None: known already)."""

    @property
    def http(self) -> httpx.AsyncClient:
        """The run's shared `httpx.AsyncClient` (redirects followed, the configured engine; built on first use)."""
        http = self._http
        return http if isinstance(http, httpx.AsyncClient) else http.get()

    @property
    def label(self) -> str | None:
        """`userData.label`, used by `Router`."""
        return self.request.label

    @property
    def user_data(self) -> dict[str, Any]:
        """The request's `userData`."""
        return self.request.user_data

    @property
    def retry_count(self) -> int:
        """How many attempts failed before this one."""
        return self.request.retry_count

    async def enqueue(
        self,
        requests: str | RequestDraft | Iterable[str | RequestDraft],
        *,
        label: str | None = None,
        user_data: Mapping[str, Any] | None = None,
        forefront: bool = False,
    ) -> int:
        """Add requests (URLs or drafts) to the queue once this attempt succeeds; return how many were new here.

        `label` and `user_data` apply to plain URLs. Duplicates within the attempt are dropped.

        Raises:
            InvalidUrlError: a URL that is not absolute http(s).
        """
        if type(requests) is list:  # the usual: not copied (nothing awaits while it is read)
            items: list[str | RequestDraft] = requests
        else:  # `isinstance` of a pydantic model class goes through ABCMeta: not for the usual list
            items = [requests] if isinstance(requests, str | RequestDraft) else list(requests)
        bucket, unique_key, known, memo = self._enqueued[forefront], self._unique_key, self._known, self._memo
        before = len(bucket)
        for item in items:
            if isinstance(item, str):
                # Most links a crawl finds are in the queue already: those need no draft, and a text met before no
                # parsing either.
                key = memo.get(item) if memo is not None else None
                if key is not None and (key in bucket or key in known):
                    bucket.setdefault(key, None)
                    continue
                url, parts = _checked_url(item)
                key = unique_key(parts)
                if memo is not None:
                    memo.put(item, key)
                if key in bucket:
                    continue
                if key in known:
                    bucket[key] = None
                    continue
                draft = _draft(url, key, label, user_data)
            else:
                draft = item
            if bucket.setdefault(draft.unique_key, draft) is draft:
                self._new += 1
        return len(bucket) - before

    async def push_data(self, item: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Store a result item (a dict) or a list of them once this attempt succeeds.

        Items are checked here, so a bad one fails this attempt as the handler's error (recorded, retried).

        Raises:
            InvalidItemError: not a dict or a list of dicts, or a value JSON cannot represent (NaN, bytes, sets,
                tuple keys, a cycle); nothing of this call is kept then.
        """
        if type(item) is dict or isinstance(item, Mapping):  # a dict needs no ABC check
            self._items.append(encode_item(item))
            return
        if isinstance(item, str | bytes) or not isinstance(item, Iterable):
            raise InvalidItemError(f"push_data takes a dict or a list of dicts, got {type(item).__name__}")
        self._items.extend([encode_item(one) for one in item])

    def pending_enqueues(self) -> dict[bool, list[RequestDraft]]:
        """Buffered requests by `forefront` flag (for the worker's commit); empty when all were known already."""
        if not self._new:
            return {}
        pending = {flag: [d for d in bucket.values() if d is not None] for flag, bucket in self._enqueued.items()}
        return {flag: drafts for flag, drafts in pending.items() if drafts}

    def pending_items(self) -> list[str]:
        """Buffered result items as dataset lines (for the worker's commit)."""
        return self._items
