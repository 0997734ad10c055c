"""The Apify API v2 request-queue endpoints, served over the embedded SQLite store or a PostgreSQL database.

Contract points the platform leaves open are decided here (see `docs` of each handler): lock ops by another client
or on a handled request answer 403 `request-handled-or-locked`; `limit` over the maximum, a batch over 25 and a bad
`lockSecs` answer 400 `invalid-input`; a bad `clientKey` answers 400 `invalid-client-key`; unknown requests answer
404 on GET, DELETE and lock ops, while PUT inserts them.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.errors import HeadlockError, InvalidInputError, NotFoundError, QueueError
from runner.models import BatchAddResult, QueueInfo, RequestDraft, format_api_datetime, utc_now
from runner.models import Request as QueueRequest
from runner.queue.protocol import MAX_BATCH, MAX_LOCK_LIMIT
from runner.server import _requests_list as requests_list
from runner.server import _wire as wire
from runner.server._datasets import Datasets
from runner.server._kvs import KeyValueStores
from runner.server._platform import PlatformEndpoints, platform_routes
from runner.server._protocol import http_protocol
from runner.server._runs import RunDefaults, Runs
from runner.server._store import OpenQueue, QueueRegistry, SqliteRegistry
from runner.uniquekey import request_id_for

__all__ = ["create_app", "serve"]

_log = structlog.get_logger("headlock.server")

MAX_HEAD_LIMIT = 1000
"""Most items GET head returns (the platform's `REQUEST_QUEUE_HEAD_MAX_LIMIT`)."""
DEFAULT_HEAD_LIMIT = 100
# Lock state is the server's: a PUT body echoing what a client last read must not set it (contract §9a).
_SERVER_FIELDS = ("lockExpiresAt", "lockByClient")


def _whole(value: float) -> float | int:
    """`60.0` as `60`: the official client types `lockSecs` as an integer."""
    return int(value) if value.is_integer() else value


def _queue_object(info: QueueInfo, base_url: str, queue_id: str) -> dict[str, Any]:
    data = info.to_api()
    data["id"] = queue_id
    data["name"] = info.name
    data["createdAt"] = format_api_datetime(info.created_at)
    data["modifiedAt"] = format_api_datetime(info.modified_at)
    data["accessedAt"] = format_api_datetime(info.accessed_at)
    data["userId"] = "local"
    data["consoleUrl"] = f"{base_url}/v2/request-queues/{queue_id}"
    return data


def _draft(item: Any) -> RequestDraft:
    """A request to add; an `id` it carries must be the one its `uniqueKey` gives."""
    if not isinstance(item, dict):
        raise InvalidInputError("Invalid input: a request must be a JSON object", status=400)
    fields = dict(item)
    supplied = fields.pop("id", None)
    draft = wire.validate(RequestDraft, fields, "request")
    if supplied is not None and supplied != request_id_for(draft.unique_key):
        raise InvalidInputError(
            "Request ID does not correspond to uniqueKey", status=400, error_type="request-id-invalid"
        )
    return draft


def _deletion(item: Any) -> dict[str, str]:
    """A batch-delete item, `{id}` or `{uniqueKey}` (the id wins when both are given), as the answer lists it.

    Raises:
        InvalidInputError: the item is not an object, has neither field, an id that is not a non-empty string
            (no request has an empty id) or a uniqueKey that is not a string.
    """
    if not isinstance(item, dict) or not ("id" in item or "uniqueKey" in item):
        raise InvalidInputError("Invalid input: each item must be an object with an id or a uniqueKey", status=400)
    request_id, unique_key = item.get("id"), item.get("uniqueKey")
    if "id" in item and not (isinstance(request_id, str) and request_id):
        raise InvalidInputError(f"Invalid input: id must be a non-empty string, got {request_id!r}", status=400)
    if "uniqueKey" in item and not isinstance(unique_key, str):
        raise InvalidInputError(f"Invalid input: uniqueKey must be a string, got {unique_key!r}", status=400)
    deleted: dict[str, str] = {"id": request_id} if isinstance(request_id, str) else {}
    if isinstance(unique_key, str):
        deleted = {"id": deleted.get("id") or request_id_for(unique_key), "uniqueKey": unique_key}
    return deleted


class _Endpoints:
    """The route handlers, sharing the app's queue registry."""

    def __init__(self, registry: QueueRegistry) -> None:
        self._registry = registry

    async def _queue(self, request: Request) -> OpenQueue:
        return await self._registry.resolve(request.path_params["queue_id"])

    @staticmethod
    def _base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def create_queue(self, request: Request) -> Response:
        """POST /v2/request-queues[?name=]: get-or-create; 201 with `Location` when new, 200 when it exists."""
        queue, created = await self._registry.get_or_create(request.query_params.get("name") or None)
        info = await queue.store.get_info()
        base = self._base_url(request)
        queue_id = self._registry.public_id(queue, info.id)
        if not created:
            return wire.data_response(_queue_object(info, base, queue_id))
        location = {"Location": f"{base}/v2/request-queues/{queue_id}"}
        return wire.data_response(_queue_object(info, base, queue_id), 201, location)

    async def get_queue(self, request: Request) -> Response:
        """GET /v2/request-queues/Q."""
        queue = await self._queue(request)
        info = await queue.store.get_info()
        return wire.data_response(
            _queue_object(info, self._base_url(request), self._registry.public_id(queue, info.id))
        )

    async def delete_queue(self, request: Request) -> Response:
        """DELETE /v2/request-queues/Q: 204, 404 when unknown; the queue and every request in it are gone."""
        await self._registry.delete(request.path_params["queue_id"])
        return wire.data_response(None)

    async def list_requests(self, request: Request) -> Response:
        """GET requests: every request (handled ones too) in id order, by pages; see `_requests_list`."""
        query, echo = requests_list.parse_query(request)
        queue = await self._queue(request)
        data = await requests_list.list_requests(queue.store, query)
        return wire.data_response(data | echo)

    async def get_head(self, request: Request) -> Response:
        """GET head: pending requests in order, locked ones included, without `userData`. Read-only."""
        wire.client_key(request)
        limit = wire.limit(request, default=DEFAULT_HEAD_LIMIT, maximum=MAX_HEAD_LIMIT)
        head = await (await self._queue(request)).store.list_head(limit)
        return wire.data_response(
            {
                "limit": limit,
                "queueModifiedAt": format_api_datetime(head.queue_modified_at),
                "hadMultipleClients": head.had_multiple_clients,
                "items": head.items,
            }
        )

    async def lock_head(self, request: Request) -> Response:
        """POST head/lock: 201; items carry `lockExpiresAt` and, as on the platform, no `userData`, unless
        `headlockItems=full` asks for each whole request (headlock's client does: no GET per request)."""
        key = wire.client_key(request)
        limit = wire.limit(request, default=MAX_LOCK_LIMIT, maximum=MAX_LOCK_LIMIT)
        lock_secs = wire.lock_secs(request)
        full = request.query_params.get("headlockItems") == "full"
        queue = await self._queue(request)
        # The store does not return the expiry it set; the time before the call gives one no later than it.
        expires = format_api_datetime(utc_now() + timedelta(seconds=lock_secs))
        with queue.keyless.key(key, locks=True) as client_key:
            head = await queue.store.lock_head(limit=limit, lock_secs=lock_secs, client_key=client_key)
        info = await queue.store.get_info()
        data: dict[str, Any] = {
            "limit": limit,
            "lockSecs": _whole(lock_secs),
            "queueModifiedAt": format_api_datetime(info.modified_at),
            "hadMultipleClients": head.had_multiple_clients,
            "queueHasLockedRequests": head.queue_has_locked_requests,
            "items": [
                {**item.to_api(), "lockExpiresAt": expires}
                if full
                else {
                    "id": item.id,
                    "uniqueKey": item.unique_key,
                    "url": item.url,
                    "method": item.method,
                    "retryCount": item.retry_count,
                    "lockExpiresAt": expires,
                }
                for item in head.items
            ],
        }
        if key is not None:
            data["clientKey"] = key
        return wire.data_response(data, 201)

    async def add_request(self, request: Request) -> Response:
        """POST requests: 201 `{requestId, wasAlreadyPresent, wasAlreadyHandled}`."""
        key = wire.client_key(request)
        forefront = wire.flag(request, "forefront")
        queue = await self._queue(request)
        draft = _draft(await wire.read_json(request))
        with queue.keyless.key(key) as client_key:
            result = await queue.store.batch_add([draft], client_key=client_key, forefront=forefront)
        added = result.processed_requests[0].to_api()
        del added["uniqueKey"]
        return wire.data_response(added, 201)

    async def batch_add(self, request: Request) -> Response:
        """POST requests/batch: 201; more than 25 items is a 400, duplicates in one batch are deduplicated."""
        key = wire.client_key(request)
        forefront = wire.flag(request, "forefront")
        queue = await self._queue(request)
        body = await wire.read_json(request)
        if not isinstance(body, list):
            raise InvalidInputError("Invalid input: the body must be a JSON array of requests", status=400)
        if len(body) > MAX_BATCH:
            raise InvalidInputError(
                f"Invalid input: a batch holds at most {MAX_BATCH} requests, got {len(body)}", status=400
            )
        drafts = [_draft(item) for item in body]
        if not drafts:
            # The store writes (and records a client) for no empty batch: no keyless key must be spent on one.
            result = BatchAddResult()
        else:
            with queue.keyless.key(key) as client_key:
                result = await queue.store.batch_add(drafts, client_key=client_key, forefront=forefront)
        data = result.to_api()
        data.setdefault("processedRequests", [])
        data.setdefault("unprocessedRequests", [])
        return wire.data_response(data, 201)

    async def batch_delete(self, request: Request) -> Response:
        """DELETE requests/batch: 200; items are `{id}` or `{uniqueKey}`; unknown ones count as processed."""
        key = wire.client_key(request)
        queue = await self._queue(request)
        body = await wire.read_json(request)
        if not isinstance(body, list) or len(body) > MAX_BATCH:
            raise InvalidInputError(
                f"Invalid input: the body must be a JSON array of at most {MAX_BATCH} items", status=400
            )
        processed = [_deletion(item) for item in body]
        with queue.keyless.key(key) as client_key:
            await queue.store.delete_requests([p["id"] for p in processed], client_key=client_key)
        return wire.data_response({"processedRequests": processed, "unprocessedRequests": []})

    async def unlock(self, request: Request) -> Response:
        """POST requests/unlock: 200 `{unlockedCount}` for the locks this `clientKey` holds."""
        key = wire.client_key(request)
        queue = await self._queue(request)
        with queue.keyless.key(key) as client_key:
            count = await queue.store.unlock_requests(client_key=client_key)
        return wire.data_response({"unlockedCount": count})

    async def get_request(self, request: Request) -> Response:
        """GET requests/R: the full request, 404 when unknown."""
        queue = await self._queue(request)
        stored = await queue.store.get_request(request.path_params["request_id"])
        if stored is None:
            raise NotFoundError("Request was not found", error_type="record-not-found")
        return wire.model_response(stored)

    async def update_request(self, request: Request) -> Response:
        """PUT requests/R: 200; a full replacement, inserting an unknown request. Not refused under another's lock."""
        key = wire.client_key(request)
        forefront = wire.flag(request, "forefront")
        queue = await self._queue(request)
        body = await wire.read_json(request)
        if not isinstance(body, dict):
            raise InvalidInputError("Invalid input: the body must be a JSON object", status=400)
        request_id = request.path_params["request_id"]
        fields = {k: v for k, v in body.items() if k not in _SERVER_FIELDS}
        if fields.setdefault("id", request_id) != request_id:
            raise InvalidInputError("Invalid input: the body's id differs from the one in the path", status=400)
        stored = wire.validate(QueueRequest, fields, "request")
        with queue.keyless.key(key) as client_key:
            registration = await queue.store.update_request(stored, client_key=client_key, forefront=forefront)
        return wire.model_response(registration)

    async def delete_request(self, request: Request) -> Response:
        """DELETE requests/R: 204, 404 when unknown; a lock on it does not prevent the delete."""
        key = wire.client_key(request)
        queue = await self._queue(request)
        with queue.keyless.key(key) as client_key:
            deleted = await queue.store.delete_requests([request.path_params["request_id"]], client_key=client_key)
        if not deleted:
            raise NotFoundError("Request was not found", error_type="record-not-found")
        return wire.data_response(None)

    async def prolong_lock(self, request: Request) -> Response:
        """PUT requests/R/lock: 200 `{lockExpiresAt}`; the new expiry is now + lockSecs."""
        key = wire.client_key(request)
        lock_secs = wire.lock_secs(request)
        forefront = wire.flag(request, "forefront")
        queue = await self._queue(request)
        with queue.keyless.key(key) as client_key:
            expires = await queue.store.prolong_lock(
                request.path_params["request_id"], lock_secs=lock_secs, client_key=client_key, forefront=forefront
            )
        return wire.data_response({"lockExpiresAt": format_api_datetime(expires)})

    async def delete_lock(self, request: Request) -> Response:
        """DELETE requests/R/lock: 204; the request goes to the head (`forefront`) or the end."""
        key = wire.client_key(request)
        forefront = wire.flag(request, "forefront")
        queue = await self._queue(request)
        with queue.keyless.key(key) as client_key:
            await queue.store.delete_lock(request.path_params["request_id"], client_key=client_key, forefront=forefront)
        return wire.data_response(None)


def _routes(endpoints: _Endpoints) -> list[Route]:
    q = "/v2/request-queues/{queue_id}"
    r = q + "/requests/{request_id}"
    # Fixed segments (batch, unlock) come before `{request_id}`, which would match them too. Routes are tried in
    # order, so a worker's calls (head/lock, then GET and PUT of each request) come first; no other two of these
    # patterns match one path, so the order of those that do (the first full match wins, else the first partial
    # one answers 405 with its `Allow`) is as it was.
    return [
        Route(q + "/head/lock", endpoints.lock_head, methods=["POST"]),
        Route(q + "/requests/batch", endpoints.batch_add, methods=["POST"]),
        Route(q + "/requests/batch", endpoints.batch_delete, methods=["DELETE"]),
        Route(q + "/requests/unlock", endpoints.unlock, methods=["POST"]),
        Route(r, endpoints.get_request, methods=["GET"]),
        Route(r, endpoints.update_request, methods=["PUT"]),
        Route(r, endpoints.delete_request, methods=["DELETE"]),
        Route(r + "/lock", endpoints.prolong_lock, methods=["PUT"]),
        Route(r + "/lock", endpoints.delete_lock, methods=["DELETE"]),
        Route("/v2/request-queues", endpoints.create_queue, methods=["POST"]),
        Route(q, endpoints.get_queue, methods=["GET"]),
        Route(q, endpoints.delete_queue, methods=["DELETE"]),
        Route(q + "/head", endpoints.get_head, methods=["GET"]),
        Route(q + "/requests", endpoints.add_request, methods=["POST"]),
        Route(q + "/requests", endpoints.list_requests, methods=["GET"]),
    ]


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    response = JSONResponse(body, status_code=status)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - a JSONResponse never reads
    return {"type": "http.disconnect"}


_LIMIT_HEADERS = {n: (b"x-ratelimit-limit", str(n).encode()) for n in wire.RATE_LIMITS}


class _RateLimitHeader:
    """Adds `X-RateLimit-Limit` to every answer and turns an unexpected exception into a 500 envelope.

    A client that disconnects while sending its body gets no answer and is logged as such, not as a server error.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rate = wire.rate_limit_for(scope["method"], scope["path"])
        limit = _LIMIT_HEADERS.get(rate) or (b"x-ratelimit-limit", str(rate).encode())
        started = False

        async def send_with_header(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # Appended as it is (what `MutableHeaders` would do, without its per-call wrapper): no answer of
                # this app sets the header itself.
                message["headers"] = [*message.get("headers", ()), limit]
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        except ClientDisconnect:
            # The client left before its body arrived: there is nobody to answer, and it is no fault of the server.
            _log.info("server.client_disconnected", method=scope["method"], path=scope["path"])
        except Exception:
            if started:
                raise
            _log.exception("server.internal_error", method=scope["method"], path=scope["path"])
            await _send_json(send_with_header, 500, wire.error_body("internal-error", "Internal server error"))


class _TokenAuth:
    """Requires the token as `Authorization: Bearer ...` or `?token=`."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._token = token.encode()

    def __repr__(self) -> str:
        return "_TokenAuth(token='***')"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token")
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials:
            given = credentials.strip()
        if given is None:
            await _send_json(send, 401, wire.error_body("token-not-provided", "Authentication token was not provided"))
        elif not hmac.compare_digest(given.encode(), self._token):
            await _send_json(send, 401, wire.error_body("invalid-token", "Authentication token is not valid"))
        else:
            await self.app(scope, receive, send)


async def _queue_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QueueError)  # noqa: S101 - registered for QueueError only
    return wire.error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    error_type = {404: "page-not-found", 405: "method-not-allowed"}.get(exc.status_code, "invalid-request")
    return JSONResponse(wire.error_body(error_type, exc.detail), status_code=exc.status_code, headers=exc.headers)


def create_app(
    storage_dir: Path,
    *,
    token: str | None = None,
    middleware: Sequence[Middleware] = (),
    defaults: RunDefaults | None = None,
    queue_dsn: str | None = None,
) -> Starlette:
    """Build the API app over the storages in `storage_dir` (`request_queues/`, `datasets/`, `key_value_stores/`).

    With `queue_dsn` (a PostgreSQL DSN; the `postgres` extra) the request queues are that database's, shared with
    every other server and worker on it; datasets and key-value stores stay in `storage_dir`. Queue files are
    indexed (or the database connected and its schema migrated) at start-up; a failure there stops the app, and
    `app.state.startup_error` holds it. Queues are opened on first use and all closed at shutdown. `defaults` are
    the storage ids every run reports (`RunDefaults()` when None). `middleware` is placed outermost (inside the
    rate-limit header), for tests that inject faults.
    """
    defaults = defaults or RunDefaults()
    registry: QueueRegistry
    if queue_dsn is None:
        registry = SqliteRegistry(storage_dir, default_id=defaults.queue_id)
    else:
        from runner.server._store_postgres import PostgresRegistry  # noqa: PLC0415 - psycopg is an optional extra

        registry = PostgresRegistry(queue_dsn, default_id=defaults.queue_id)
    stores, datasets = KeyValueStores(storage_dir), Datasets(storage_dir)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await registry.start()
            await stores.index()
            await datasets.index()
        except HeadlockError as exc:
            app.state.startup_error = exc
            with anyio.CancelScope(shield=True):
                await registry.aclose()
            raise
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await registry.aclose()
                await datasets.aclose()

    stack = [Middleware(_RateLimitHeader), *middleware]
    if token is not None:
        stack.append(Middleware(_TokenAuth, token=token))
    platform = PlatformEndpoints(stores, datasets, Runs(defaults))
    app = Starlette(
        routes=[*_routes(_Endpoints(registry)), *platform_routes(platform)],
        middleware=stack,
        exception_handlers={QueueError: _queue_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.startup_error = None
    return app


class _Started:
    """Calls `ready` once the app has started (the queues are indexed, the database connected), and keeps a failed
    start's traceback out of uvicorn's log: `serve` raises the error itself."""

    def __init__(self, app: ASGIApp, *, ready: Callable[[], None]) -> None:
        self.app = app
        self._ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def sent(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                self._ready()

        await self.app(scope, receive, sent)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only for that protocol number, and
    # without it Nagle holds each response body for the client's delayed ACK (~40 ms a call).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening now lets clients connect (and wait in the backlog) as soon as the address is announced.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    host: str,
    port: int,
    storage_dir: Path,
    token: str | None = None,
    *,
    log_level: str = "warning",
    ready: Callable[[str], None] | None = None,
    defaults: RunDefaults | None = None,
    queue_dsn: str | None = None,
) -> None:
    """Serve the API until SIGINT/SIGTERM (blocking). `port` 0 picks a free port; `ready` gets the base URL once
    the app has started (connections made before wait in the backlog). `queue_dsn`: see `create_app`.

    Raises:
        OSError: the address cannot be bound.
        ConfigError: `queue_dsn` does not parse.
        QueueError: the app did not start (the queue files cannot be read, the database cannot be reached).
        RuntimeError: the app did not start for another reason (uvicorn's log says why).
    """
    sock = _bind(host, port)
    with sock:
        bound_port = sock.getsockname()[1]
        url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        app = create_app(storage_dir, token=token, defaults=defaults, queue_dsn=queue_dsn)
        config = uvicorn.Config(
            _Started(app, ready=lambda: None if ready is None else ready(url)),
            log_level=log_level,
            access_log=False,  # the access log would print `?token=` query strings
            lifespan="on",
            server_header=False,
            http=http_protocol(),
        )
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[sock])
        except SystemExit:
            if server.started:
                raise
            # uvicorn exits (3) when the app does not start: the reason is ours to tell, below.
        if not server.started:
            error = app.state.startup_error
            if isinstance(error, HeadlockError):
                raise error
            raise RuntimeError("the server did not start")
