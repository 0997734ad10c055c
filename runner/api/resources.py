"""The small API clients an Actor run needs besides its queue and dataset: a key-value store and the run itself.

Both call through a shared `runner.api.client.ApiClient` and never close it. Their errors are the `QueueError`
subclasses `ApiClient.check` raises (`endpoint`, `status`, `error_type`, `maybe_applied`), as for every API call.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from runner.api.client import ApiClient, Body, Endpoint, error_payload
from runner.errors import ConfigError, InvalidInputError, NotFoundError

__all__ = ["ActorRun", "KeyValueStore"]

_GET_OR_CREATE_STORE = Endpoint("POST", "key-value-stores", "", "other", "short", collection=True)
_GET_STORE = Endpoint("GET", "key-value-stores", "", "other", "short")
# A record may be served from elsewhere (a redirect to the storage behind the API); httpx drops the
# `Authorization` header when a redirect leaves the API's origin.
_GET_RECORD = Endpoint(
    "GET", "key-value-stores", "/records/{key}", "single", "long", item="record", follow_redirects=True
)
_PUT_RECORD = Endpoint("PUT", "key-value-stores", "/records/{key}", "single", "long", item="record")
_GET_RUN = Endpoint("GET", "actor-runs", "", "other", "short")
_UPDATE_RUN = Endpoint("PUT", "actor-runs", "", "other", "short")

JSON_TYPE = "application/json; charset=utf-8"
_BYTES_TYPE = "application/octet-stream"


class _StoreInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str


def _compressible(content_type: str) -> bool:
    """Whether a record of this type is worth gzipping on the way up (text; not images, archives, ...)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media.endswith(("json", "xml", "javascript", "csv"))


class KeyValueStore:
    """A key-value store of the API: records of bytes with a content type.

    `KeyValueStore(api, store_id)` trusts the id (e.g. the run's default store from the platform's variables);
    `open` checks it, or gets or creates a store by name.
    """

    def __init__(self, api: ApiClient, store_id: str) -> None:
        self._api = api
        self._id = store_id

    @classmethod
    async def open(cls, api: ApiClient, *, store_id: str | None = None, name: str | None = None) -> KeyValueStore:
        """Open a store by `store_id` (checked with `GET /v2/key-value-stores/{id}`), or by `name`, creating it when
        missing (`POST /v2/key-value-stores?name=`).

        Raises:
            ConfigError: not exactly one of `store_id` and `name` is given.
            NotFoundError: there is no store `store_id`.
            QueueError: the call failed.
        """
        if (store_id is None) == (name is None):
            raise ConfigError("give exactly one of store_id and name")
        try:
            if name is not None:
                info = await api.fetch(_GET_OR_CREATE_STORE, _StoreInfo, params={"name": name})
            else:
                info = await api.fetch(_GET_STORE, _StoreInfo, resource_id=store_id)
        except NotFoundError as exc:
            raise NotFoundError(
                f"no key-value store {store_id or name!r} at {api.base_url}",
                endpoint=exc.endpoint,
                status=exc.status,
                error_type=exc.error_type,
            ) from exc
        return cls(api, info.id)

    @property
    def id(self) -> str:
        """The store's id."""
        return self._id

    def __repr__(self) -> str:
        return f"KeyValueStore({self._id!r} at {self._api.base_url!r})"

    async def get_record(self, key: str) -> tuple[bytes, str] | None:
        """The record's bytes and content type; None when there is no such record (404 `record-not-found`).

        Raises:
            QueueError: the call failed (another 404 is a NotFoundError).
        """
        answer = await self._api.call(_GET_RECORD, resource_id=self._id, item_id=key, params={"attachment": "true"})
        response = answer.response
        if response.status_code == 404 and error_payload(response)[0] in ("record-not-found", None):
            return None
        self._api.check(_GET_RECORD, response, key, maybe_applied=answer.ambiguous)
        return response.content, response.headers.get("content-type", _BYTES_TYPE)

    async def get_json(self, key: str) -> Any:
        """The record's value read as JSON; None when there is no such record.

        Raises:
            ConfigError: the record is not JSON (an Actor input or a state record nobody can use).
            QueueError: the call failed.
        """
        record = await self.get_record(key)
        if record is None:
            return None
        content, content_type = record
        try:
            return json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(
                f"record {key!r} of key-value store {self._id} is not JSON ({content_type}, {len(content)} bytes):"
                f" {exc}"
            ) from exc

    async def set_record(self, key: str, value: object, content_type: str | None = None) -> None:
        """Store `value` under `key`: bytes as they are (default type `application/octet-stream`), anything else
        as JSON (default type `application/json; charset=utf-8`; a `str` becomes a JSON string).

        Text records are gzipped on the way up when 1 KiB or more. Retried like every call: a PUT is idempotent.

        Raises:
            InvalidInputError: a value that cannot be written as JSON, or a non-bytes value with a `content_type`
                that is not JSON (encode text yourself: `text.encode()`, `"text/plain; charset=utf-8"`).
            QueueError: the call failed.
        """
        if isinstance(value, bytes | bytearray | memoryview):
            kind = content_type or _BYTES_TYPE
            body = Body(bytes(value), kind, compress=_compressible(kind))
        else:
            kind = content_type or JSON_TYPE
            if "json" not in kind.lower():
                raise InvalidInputError(
                    f"record {key!r}: a {type(value).__name__} value is sent as JSON, not as {kind!r}; pass bytes"
                    " for other content types",
                    endpoint=_PUT_RECORD.label,
                )
            encoded = Body.encode_json(_PUT_RECORD, value)
            body = Body(encoded.content, kind)
        answer = await self._api.call(_PUT_RECORD, resource_id=self._id, item_id=key, body=body)
        self._api.check(_PUT_RECORD, answer.response, key, maybe_applied=answer.ambiguous)


class ActorRun:
    """One Actor run of the API (`/v2/actor-runs/{runId}`): read it, set its status message."""

    def __init__(self, api: ApiClient, run_id: str) -> None:
        self._api = api
        self._id = run_id

    @property
    def id(self) -> str:
        """The run's id."""
        return self._id

    def __repr__(self) -> str:
        return f"ActorRun({self._id!r} at {self._api.base_url!r})"

    async def get(self) -> dict[str, Any]:
        """The run object (`data` of `GET /v2/actor-runs/{runId}`: `status`, `defaultDatasetId`, ...).

        Raises:
            NotFoundError: there is no such run.
            QueueError: the call failed.
        """
        answer = await self._api.call(_GET_RUN, resource_id=self._id)
        self._api.check(_GET_RUN, answer.response, maybe_applied=answer.ambiguous)
        return self._api.data(_GET_RUN, answer.response)

    async def set_status_message(self, message: str, *, terminal: bool = False) -> dict[str, Any]:
        """Set the run's status message (`terminal`: the last one of the run); return the updated run object.

        Raises:
            QueueError: the call failed.
        """
        body = Body.encode_json(_UPDATE_RUN, {"statusMessage": message, "isStatusMessageTerminal": terminal})
        answer = await self._api.call(_UPDATE_RUN, resource_id=self._id, body=body)
        self._api.check(_UPDATE_RUN, answer.response, maybe_applied=answer.ambiguous)
        return self._api.data(_UPDATE_RUN, answer.response)
