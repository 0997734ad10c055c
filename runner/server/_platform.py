"""The Apify API v2 endpoints an Actor calls beside the request queue: key-value stores, datasets, actor runs.

Decisions where the platform leaves room: an id never seen is a storage created on first use; a record body is
stored decompressed (so it is served without `Content-Encoding`); a record, like every body, is at most
`MAX_PAYLOAD_BYTES` after decompression; dataset `format`s other than json, jsonl and csv, and the item options
`unwind`, `flatten`, `view`, `outputFields` and `simplified`, are refused with a 400 rather than ignored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runner.errors import InvalidInputError, NotFoundError
from runner.models import format_api_datetime
from runner.server import _wire as wire
from runner.server._datasets import FORMATS, CsvOptions, Datasets, ItemsQuery, render
from runner.server._kvs import KeyValueStores, validate_key
from runner.server._runs import Runs
from runner.server._storages import Storage, modified_at

__all__ = ["PlatformEndpoints", "platform_routes"]

MAX_KEYS_LIMIT = 1000
"""Most keys one GET keys page lists (the platform's maximum and default)."""
NO_LIMIT = 999_999_999_999
"""The `X-Apify-Pagination-Limit` of an items page asked for without a limit (the platform's value)."""
_UNSUPPORTED_ITEM_OPTIONS = ("unwind", "flatten", "view", "outputFields", "simplified")


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(f"Invalid input: {message}", status=400)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _creation_body(request: Request) -> None:
    """Check the optional body of a get-or-create (`{"schema": ...}` from the official client): a JSON object."""
    body = await wire.read_body(request)
    if body.strip() and not isinstance(wire.parse_json(body), dict):
        raise _invalid("the body of a create call must be a JSON object")


def _created(data: dict[str, Any], created: bool, location: str) -> Response:
    """201 with `Location` for a new storage, 200 for an existing one."""
    if not created:
        return wire.data_response(data)
    return wire.data_response(data, 201, {"Location": location})


class PlatformEndpoints:
    """The route handlers over the app's key-value stores, datasets and runs."""

    def __init__(self, stores: KeyValueStores, datasets: Datasets, runs: Runs) -> None:
        self._stores = stores
        self._datasets = datasets
        self._runs = runs

    # -- key-value stores ----------------------------------------------------------------------------------

    async def _store_object(self, storage: Storage, base: str) -> dict[str, Any]:
        changed: datetime = await anyio.to_thread.run_sync(modified_at, self._stores.path(storage))
        url = f"{base}/v2/key-value-stores/{storage.id}"
        return {
            "id": storage.id,
            "name": storage.name,
            "userId": "local",
            "createdAt": format_api_datetime(storage.created_at),
            "modifiedAt": format_api_datetime(changed),
            "accessedAt": format_api_datetime(changed),
            "actId": None,
            "actRunId": None,
            "consoleUrl": url,
            "keysPublicUrl": f"{url}/keys",
            "recordsPublicUrl": f"{url}/records",
        }

    async def _store(self, request: Request) -> Storage:
        return await self._stores.resolve(request.path_params["store_id"])

    async def create_store(self, request: Request) -> Response:
        """POST /v2/key-value-stores[?name=]: get-or-create; without a name always a new store."""
        await _creation_body(request)
        storage, created = await self._stores.get_or_create(request.query_params.get("name") or None)
        base = _base_url(request)
        data = await self._store_object(storage, base)
        return _created(data, created, f"{base}/v2/key-value-stores/{storage.id}")

    async def get_store(self, request: Request) -> Response:
        """GET /v2/key-value-stores/S: an unseen id is created."""
        return wire.data_response(await self._store_object(await self._store(request), _base_url(request)))

    async def delete_store(self, request: Request) -> Response:
        """DELETE /v2/key-value-stores/S: 204, 404 when unknown."""
        await self._stores.delete(request.path_params["store_id"])
        return wire.data_response(None)

    async def list_keys(self, request: Request) -> Response:
        """GET keys: `exclusiveStartKey`, `limit` (1-1000, default 1000), `prefix`; keys in byte order."""
        limit = wire.limit(request, default=MAX_KEYS_LIMIT, maximum=MAX_KEYS_LIMIT, zero_is_default=True)
        after = request.query_params.get("exclusiveStartKey") or None
        if request.query_params.get("collection"):
            raise _invalid("collection needs a key-value store schema, which headlock serve does not keep")
        storage = await self._store(request)
        keys, truncated = await self._stores.list_keys(
            storage, after=after, limit=limit, prefix=request.query_params.get("prefix") or None
        )
        records = f"{_base_url(request)}/v2/key-value-stores/{storage.id}/records"
        items = [
            {"key": key, "size": size, "recordPublicUrl": f"{records}/{quote(key, safe='')}"} for key, size in keys
        ]
        return wire.data_response(
            {
                "items": items,
                "count": len(items),
                "limit": limit,
                "exclusiveStartKey": after,
                "isTruncated": truncated,
                "nextExclusiveStartKey": items[-1]["key"] if truncated and items else None,
            }
        )

    async def get_record(self, request: Request) -> Response:
        """GET (and HEAD) records/KEY: the stored bytes with their content type; 404 `record-not-found`."""
        key = validate_key(request.path_params["key"])
        storage = await self._store(request)
        record = await self._stores.get_record(storage, key)
        if record is None:
            raise NotFoundError("Record was not found", error_type="record-not-found")
        headers = {"Content-Type": record.content_type}
        if wire.flag(request, "attachment"):
            headers["Content-Disposition"] = f'attachment; filename="{key}"'
        # No media_type: Starlette would add a charset to a text type stored without one.
        return Response(record.value, headers=headers)

    async def put_record(self, request: Request) -> Response:
        """PUT (or POST) records/KEY: store the (decompressed) body and its `Content-Type`; 201."""
        key = validate_key(request.path_params["key"])
        content_type = request.headers.get("content-type") or "application/octet-stream"
        storage = await self._store(request)
        body = await wire.read_body(request)
        await self._stores.set_record(storage, key, body, content_type)
        location = f"{_base_url(request)}/v2/key-value-stores/{storage.id}/records/{quote(key, safe='')}"
        return JSONResponse({}, status_code=201, headers={"Location": location})

    async def delete_record(self, request: Request) -> Response:
        """DELETE records/KEY: 204, 404 `record-not-found` when there is none."""
        key = validate_key(request.path_params["key"])
        if not await self._stores.delete_record(await self._store(request), key):
            raise NotFoundError("Record was not found", error_type="record-not-found")
        return wire.data_response(None)

    # -- datasets ------------------------------------------------------------------------------------------

    async def _dataset_object(self, storage: Storage, base: str) -> dict[str, Any]:
        count, clean = await self._datasets.counts(storage)
        changed: datetime = await anyio.to_thread.run_sync(modified_at, self._datasets.path(storage))
        url = f"{base}/v2/datasets/{storage.id}"
        return {
            "id": storage.id,
            "name": storage.name,
            "userId": "local",
            "createdAt": format_api_datetime(storage.created_at),
            "modifiedAt": format_api_datetime(changed),
            "accessedAt": format_api_datetime(changed),
            "itemCount": count,
            "cleanItemCount": clean,
            "actId": None,
            "actRunId": None,
            "consoleUrl": url,
            "itemsPublicUrl": f"{url}/items",
        }

    async def _dataset(self, request: Request) -> Storage:
        return await self._datasets.resolve(request.path_params["dataset_id"])

    async def create_dataset(self, request: Request) -> Response:
        """POST /v2/datasets[?name=]: get-or-create; without a name always a new dataset."""
        await _creation_body(request)
        storage, created = await self._datasets.get_or_create(request.query_params.get("name") or None)
        base = _base_url(request)
        data = await self._dataset_object(storage, base)
        return _created(data, created, f"{base}/v2/datasets/{storage.id}")

    async def get_dataset(self, request: Request) -> Response:
        """GET /v2/datasets/D: an unseen id is created."""
        return wire.data_response(await self._dataset_object(await self._dataset(request), _base_url(request)))

    async def delete_dataset(self, request: Request) -> Response:
        """DELETE /v2/datasets/D: 204, 404 when unknown."""
        await self._datasets.delete(request.path_params["dataset_id"])
        return wire.data_response(None)

    async def push_items(self, request: Request) -> Response:
        """POST items: one object or an array of objects, appended in one write; 201.

        Each item is bounded by the body's limit (`MAX_PAYLOAD_BYTES` after decompression), the platform's
        per-item limit too.
        """
        storage = await self._dataset(request)
        body = await wire.read_json(request)
        items = [body] if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise _invalid(f"the body must be a JSON object or an array of objects, got {type(body).__name__}")
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise _invalid(f"item {position} must be a JSON object, got {type(item).__name__}")
        await self._datasets.push(storage, items)
        return JSONResponse(
            {}, status_code=201, headers={"Location": f"{_base_url(request)}/v2/datasets/{storage.id}/items"}
        )

    async def list_items(self, request: Request) -> Response:
        """GET (and HEAD) items: `offset`, `limit`, `desc`, `clean`, `skipHidden`, `skipEmpty`, `fields`, `omit`,
        `format` (json, jsonl, csv; csv also `delimiter`, `bom`, `skipHeaderRow`), `attachment`; pagination headers.

        Pages are cut in stored rows before `clean` drops any: a page may hold fewer items than its `limit`.
        """
        params = request.query_params
        item_format = (params.get("format") or "json").lower()
        if item_format not in FORMATS:
            raise _invalid(f"format {item_format!r} is not served by headlock serve (use one of {sorted(FORMATS)})")
        unsupported = [name for name in _UNSUPPORTED_ITEM_OPTIONS if params.get(name)]
        if unsupported:
            raise _invalid(f"{', '.join(unsupported)} is not supported by headlock serve")
        clean = wire.flag(request, "clean")
        limit = wire.limit(request, default=0, maximum=NO_LIMIT, zero_is_default=True) or None
        query = ItemsQuery(
            offset=wire.offset(request),
            limit=limit,
            desc=wire.flag(request, "desc"),
            skip_hidden=clean or wire.flag(request, "skipHidden"),
            skip_empty=clean or wire.flag(request, "skipEmpty"),
            fields=tuple(wire.text_list(request, "fields")),
            omit=tuple(wire.text_list(request, "omit")),
        )
        delimiter = params.get("delimiter") or ","
        if len(delimiter) != 1:
            raise _invalid(f"delimiter must be one character, got {delimiter!r}")
        csv_options = CsvOptions(
            delimiter=delimiter,
            bom=wire.flag(request, "bom") if "bom" in params else True,
            header=not wire.flag(request, "skipHeaderRow"),
        )
        page = await self._datasets.page(await self._dataset(request), query)
        headers = {
            "Content-Type": FORMATS[item_format],
            "X-Apify-Pagination-Offset": str(query.offset),
            "X-Apify-Pagination-Limit": str(NO_LIMIT if limit is None else limit),
            "X-Apify-Pagination-Count": str(len(page.rows)),
            "X-Apify-Pagination-Total": str(page.total),
            "X-Apify-Pagination-Desc": "true" if query.desc else "false",
        }
        if wire.flag(request, "attachment"):
            headers["Content-Disposition"] = f'attachment; filename="items.{item_format}"'
        return StreamingResponse(render(page, query, item_format, csv_options), headers=headers)

    # -- actor runs ----------------------------------------------------------------------------------------

    async def get_run(self, request: Request) -> Response:
        """GET /v2/actor-runs/R: a RUNNING run over the server's default storages, for any id."""
        return wire.data_response(self._runs.get(request.path_params["run_id"]))

    async def update_run(self, request: Request) -> Response:
        """PUT /v2/actor-runs/R: set `statusMessage` / `isStatusMessageTerminal`; GET then gives them back."""
        body = await wire.read_json(request)
        return wire.data_response(self._runs.update(request.path_params["run_id"], body))


def platform_routes(endpoints: PlatformEndpoints) -> list[Route]:
    """The routes of `endpoints`; a record key may hold any character, so it takes the rest of the path."""
    s = "/v2/key-value-stores/{store_id}"
    d = "/v2/datasets/{dataset_id}"
    record = s + "/records/{key:path}"
    handlers: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
        ("/v2/key-value-stores", endpoints.create_store, ["POST"]),
        (s, endpoints.get_store, ["GET"]),
        (s, endpoints.delete_store, ["DELETE"]),
        (s + "/keys", endpoints.list_keys, ["GET"]),
        (record, endpoints.get_record, ["GET"]),
        (record, endpoints.put_record, ["PUT", "POST"]),
        (record, endpoints.delete_record, ["DELETE"]),
        ("/v2/datasets", endpoints.create_dataset, ["POST"]),
        (d, endpoints.get_dataset, ["GET"]),
        (d, endpoints.delete_dataset, ["DELETE"]),
        (d + "/items", endpoints.push_items, ["POST"]),
        (d + "/items", endpoints.list_items, ["GET"]),
        ("/v2/actor-runs/{run_id}", endpoints.get_run, ["GET"]),
        ("/v2/actor-runs/{run_id}", endpoints.update_run, ["PUT"]),
    ]
    return [Route(path, handler, methods=methods) for path, handler, methods in handlers]
