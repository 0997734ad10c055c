"""The API results sink: items POSTed to a dataset of the Apify API (the platform or `headlock serve`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict

from runner.api.client import ApiClient, Body, Endpoint
from runner.errors import ConfigError, DatasetWriteError, NotFoundError, QueueError, QueueUnavailableError

__all__ = ["MAX_PAYLOAD_BYTES", "PAGE_ITEMS", "ApiDataset"]

MAX_PAYLOAD_BYTES = 9_437_184
"""The platform's request limit (`MAX_PAYLOAD_SIZE_BYTES`, 9 MiB), on the uncompressed JSON body of one push."""

_GET_OR_CREATE = Endpoint("POST", "datasets", "", "other", "short", collection=True)
_GET_DATASET = Endpoint("GET", "datasets", "", "other", "short")
_PUSH_ITEMS = Endpoint("POST", "datasets", "/items", "single", "medium")
_LIST_ITEMS = Endpoint("GET", "datasets", "/items", "other", "medium")

PAGE_ITEMS = 1000
"""Items asked for per `GET /v2/datasets/{id}/items` call by `ApiDataset.pages`."""

_log = structlog.get_logger("headlock.results.apify")


class _DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str


class _Progress:
    """How far one `push_lines` got: the items stored for sure, and in how many requests."""

    __slots__ = ("requests", "stored")

    def __init__(self) -> None:
        self.stored = 0
        self.requests = 0


class ApiDataset:
    """A `ResultsSink` over one dataset of the API: each push is `POST /v2/datasets/{id}/items` with a JSON array.

    The array is the pushed lines joined as they are (no re-encoding), cut into requests of at most
    `max_payload_bytes` uncompressed (gzipped on the wire), sent one after another in order. A request the API
    refuses as too large (413) is split in two and each half sent, in order. Each request is retried on 429, 5xx
    and network errors by the `ApiClient`'s policy, nothing more.

    When items can be stored twice (at-least-once, the `ResultsSink` contract):
    - an attempt the API applied but whose answer never came (a timeout or a connection lost after the body was
      sent, or a 5xx after storing) is followed by the policy's retry, which stores the same items again. The
      push then succeeds and logs `dataset.push_maybe_duplicated` (or fails with "may have been stored" in its
      message). Attempts refused with 429, attempts never sent (connect errors) and 413 answers store nothing, so
      their retries cannot duplicate;
    - a push that fails after the requests before it were stored: the error says how many items were; the
      attempt fails, and the request's retry pushes all its items again, those included.

    The dataset does not own the `ApiClient`: whoever made it closes it, after this sink.
    """

    def __init__(self, api: ApiClient, dataset_id: str, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        """Push to `dataset_id` as it is (no check that it exists: `open` checks).

        Raises:
            ConfigError: `max_payload_bytes` cannot hold an item (less than 3 bytes).
        """
        if max_payload_bytes < 3:
            raise ConfigError(f"max_payload_bytes must be at least 3 (`[{{}}]`), got {max_payload_bytes}")
        self._api = api
        self._id = dataset_id
        self._max = max_payload_bytes
        self._closed = False

    @classmethod
    async def open(
        cls,
        api: ApiClient,
        *,
        dataset_id: str | None = None,
        name: str | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> ApiDataset:
        """Open a dataset by `dataset_id` (checked with `GET /v2/datasets/{id}`), or by `name`, creating it when
        missing (`POST /v2/datasets?name=`).

        Raises:
            ConfigError: not exactly one of `dataset_id` and `name` is given.
            NotFoundError: there is no dataset `dataset_id`.
            QueueError: the call failed (e.g. UnauthorizedError for a wrong token).
        """
        if (dataset_id is None) == (name is None):
            raise ConfigError("give exactly one of dataset_id and name")
        try:
            if name is not None:
                info = await api.fetch(_GET_OR_CREATE, _DatasetInfo, params={"name": name})
            else:
                info = await api.fetch(_GET_DATASET, _DatasetInfo, resource_id=dataset_id)
        except NotFoundError as exc:
            raise NotFoundError(
                f"no dataset {dataset_id or name!r} at {api.base_url}",
                endpoint=exc.endpoint,
                status=exc.status,
                error_type=exc.error_type,
            ) from exc
        return cls(api, info.id, max_payload_bytes=max_payload_bytes)

    @classmethod
    async def find(cls, api: ApiClient, *, dataset_id: str | None = None, name: str | None = None) -> ApiDataset:
        """Open an existing dataset by `dataset_id` or `name` (`GET /v2/datasets/{id}`, `.../~name`: the token's
        user's dataset of that name), never creating one: for readers.

        Raises:
            ConfigError: not exactly one of `dataset_id` and `name` is given.
            NotFoundError: there is no such dataset.
            QueueError: the call failed (e.g. UnauthorizedError for a wrong token).
        """
        if (dataset_id is None) == (name is None):
            raise ConfigError("give exactly one of dataset_id and name")
        ref = dataset_id if dataset_id is not None else f"~{name}"
        try:
            info = await api.fetch(_GET_DATASET, _DatasetInfo, resource_id=ref)
        except NotFoundError as exc:
            raise NotFoundError(
                f"no dataset {dataset_id or name!r} at {api.base_url}",
                endpoint=exc.endpoint,
                status=exc.status,
                error_type=exc.error_type,
            ) from exc
        return cls(api, info.id)

    @property
    def id(self) -> str:
        """The dataset's id."""
        return self._id

    async def pages(self, *, limit: int = PAGE_ITEMS) -> AsyncIterator[list[dict[str, Any]]]:
        """The items, in order, a page of at most `limit` at a time (`GET /v2/datasets/{id}/items`, `offset` and
        `limit`), as stored (no `clean`, hidden fields kept).

        The items are those there when the first page was read (its `X-Apify-Pagination-Total`): items pushed
        meanwhile are left out, so the pages end. Without that header, pages are read until a short one.

        Raises:
            ConfigError: `limit` is below 1.
            QueueError: a call failed after its retries, or its answer is not a JSON array of objects.
        """
        if limit < 1:
            raise ConfigError(f"limit must be at least 1, got {limit}")
        offset, total = 0, None
        while total is None or offset < total:
            params = {"offset": offset, "limit": limit if total is None else min(limit, total - offset)}
            answer = await self._api.call(_LIST_ITEMS, resource_id=self._id, params=params)
            self._api.check(_LIST_ITEMS, answer.response)
            try:
                payload = answer.response.json()
            except ValueError:
                payload = None
            items = _items_of(payload)
            if items is None:
                raise QueueUnavailableError(
                    f"the answer is not a JSON array of objects: {answer.response.text[:100]!r}",
                    endpoint=_LIST_ITEMS.label,
                    status=answer.response.status_code,
                )
            if total is None:
                header = answer.response.headers.get("x-apify-pagination-total", "")
                total = int(header) if header.isdigit() else (offset + len(items) if len(items) < limit else None)
            if not items:
                return  # fewer than the total said (items deleted meanwhile): nothing more to read
            offset += len(items)
            yield items

    @property
    def location(self) -> str:
        """`dataset <id> at <its items URL>` (no token)."""
        return f"dataset {self._id} at {self._api.url(_PUSH_ITEMS, self._id)}"

    def __repr__(self) -> str:
        return f"ApiDataset({self._id!r} at {self._api.base_url!r})"

    async def push_lines(self, lines: Sequence[str]) -> int:
        """Store `lines` (JSON object texts from `encode_item`) at the end of the dataset, in order; return how many.

        Raises:
            DatasetWriteError: an item alone is over `max_payload_bytes` (nothing is sent), the sink is closed, or
                a request failed after its retries: the message names the endpoint and status, how many items were
                stored before it, and whether the failed request's items may have been stored too.
        """
        if self._closed:
            raise DatasetWriteError(f"{self.location} is closed")
        if not lines:
            return 0
        encoded = [line.encode() for line in lines]
        batches = self._batches(encoded)
        progress = _Progress()
        try:
            for start, end in batches:
                await self._push(encoded[start:end], progress)
        except QueueError as exc:
            maybe = "; the failed request's items may have been stored" if exc.maybe_applied else ""
            raise DatasetWriteError(
                f"cannot push items to dataset {self._id}: {exc}; {progress.stored} of {len(lines)} items were"
                f" stored before it, in {progress.requests} request(s){maybe}"
            ) from exc
        return len(lines)

    def _batches(self, encoded: Sequence[bytes]) -> list[tuple[int, int]]:
        """`(start, end)` ranges of `encoded` whose arrays (`[a,b,...]`) fit in `max_payload_bytes`, in order.

        Raises:
            DatasetWriteError: one item alone does not fit.
        """
        batches: list[tuple[int, int]] = []
        start, size = 0, 2  # the brackets
        for index, line in enumerate(encoded):
            if len(line) + 2 > self._max:
                raise DatasetWriteError(
                    f"cannot push items to dataset {self._id}: item {index} of the push is {len(line)} bytes of JSON,"
                    f" over the {self._max}-byte request limit of {_PUSH_ITEMS.label}; nothing of the push was stored"
                )
            added = len(line) + (1 if index > start else 0)  # its comma
            if size + added > self._max:
                batches.append((start, index))
                start, size, added = index, 2, len(line)
            size += added
        batches.append((start, len(encoded)))
        return batches

    async def _push(self, chunk: Sequence[bytes], progress: _Progress) -> None:
        """POST `chunk` as one array; on a 413 split it in two and push each half, in order.

        Raises:
            QueueError: a request failed (after its retries).
        """
        body = Body(b"[" + b",".join(chunk) + b"]")
        answer = await self._api.call(_PUSH_ITEMS, resource_id=self._id, body=body)
        if answer.response.status_code == 413 and len(chunk) > 1:
            # Nothing of a refused body is stored: smaller requests cannot duplicate it.
            _log.warning("dataset.push_split", dataset_id=self._id, items=len(chunk), bytes=len(body.content))
            half = len(chunk) // 2
            await self._push(chunk[:half], progress)
            await self._push(chunk[half:], progress)
            return
        self._api.check(_PUSH_ITEMS, answer.response, maybe_applied=answer.ambiguous)
        if answer.ambiguous:
            _log.warning("dataset.push_maybe_duplicated", dataset_id=self._id, items=len(chunk))
        progress.stored += len(chunk)
        progress.requests += 1

    async def aclose(self) -> None:
        """Stop taking pushes (the `ApiClient` is not closed: see the class docstring). Idempotent."""
        self._closed = True


def _items_of(payload: object) -> list[dict[str, Any]] | None:
    """`payload` if it is a list of objects, else None."""
    if isinstance(payload, list) and all(isinstance(item, dict) for item in payload):
        return payload
    return None
