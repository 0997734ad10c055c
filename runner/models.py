"""Typed shapes of the request-queue API (camelCase on the wire, snake_case in Python).

Every model accepts and keeps unknown fields (`extra="allow"`), as the official clients do, so a request read from
one backend and written back to it loses nothing.

Requests are read leniently where the API allows more than headlock's model (contract §3.2): `userData` and
`errorMessages` may be null (read as `{}` and `[]`), header values may be any JSON value (read as strings: JSON text
for numbers and booleans, null values dropped), and `payload` may be an object, which is kept as it is (a PUT
writes it back unchanged; handlers that send it must encode it themselves).

**Failed requests.** A request that failed for good (its retries exhausted, `NoRetry`, or stored unreadable) is
handled (`handledAt` set) *and* marked in `userData.__crawlee.state` with `6`, crawlee's `RequestState.ERROR`: the
state crawlee-python and Crawlee JS themselves give a request they give up on before marking it handled. The marker
lives in `userData`, which the platform and every client keep whole when they write a request back (crawlee-python
drops unknown top-level fields, and unknown keys inside `__crawlee`, but keeps `__crawlee.state`), so a queue shared
with crawlee reads the same way from both sides, and crawlee's own failures count as failed here too. The errors
stay in `errorMessages`, one per failed attempt. A handled request without the marker ended well. `requeued()`
returns a failed (or handled) request to pending with a fresh retry budget and without the marker, keeping its
errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, field_serializer, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import CoreSchema, core_schema

__all__ = [
    "CRAWLEE_DATA",
    "FAILED_STATE",
    "AddedRequest",
    "BatchAddResult",
    "LockedHead",
    "QueueCounts",
    "QueueInfo",
    "Request",
    "RequestDraft",
    "RequestRegistration",
    "UnprocessedRequest",
    "format_api_datetime",
    "has_failed_mark",
    "is_failed",
    "parse_datetime",
    "utc_now",
    "with_failed_mark",
    "without_failed_mark",
]

CRAWLEE_DATA = "__crawlee"
"""The `userData` key crawlee keeps its own state under."""
FAILED_STATE = 6
"""crawlee's `RequestState.ERROR`: in `userData.__crawlee.state` of a handled request, it failed for good."""


def utc_now() -> datetime:
    """Return an aware UTC timestamp."""
    return datetime.now(UTC)


def parse_datetime(value: Any) -> Any:
    """Accept ISO-8601 (`...T...Z`) and Python's `str(datetime)` form, as the official clients send both."""
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        parsed = datetime.fromisoformat(text)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return value


class _OrElse:
    """Pydantic marker: the field's own schema first; only what fails it goes through `fallback`, then `convert`.

    A union tried left to right, so a value of the declared type costs no Python call (a `BeforeValidator` would
    cost one on every request read or built); a value that fits neither gets the one error `message`.
    """

    def __init__(self, fallback: CoreSchema, convert: Callable[[Any], Any], message: str) -> None:
        self._fallback = fallback
        self._convert = convert
        self._message = message

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        lenient = core_schema.no_info_after_validator_function(self._convert, self._fallback)
        return core_schema.union_schema(
            [handler(source), lenient],
            mode="left_to_right",
            custom_error_type="lenient_type",
            custom_error_message=self._message,
        )


def _header_text(headers: dict[str, Any]) -> dict[str, str]:
    """Header values as strings: JSON text for non-strings (`5`, `true`), null values dropped."""
    return {
        name: value if isinstance(value, str) else json.dumps(value, default=str)
        for name, value in headers.items()
        if value is not None
    }


_NULL = core_schema.none_schema()
_UserData = Annotated[dict[str, Any], _OrElse(_NULL, lambda _: {}, "Input should be an object or null")]
_ErrorMessages = Annotated[list[str], _OrElse(_NULL, lambda _: [], "Input should be a list of strings or null")]
_Headers = Annotated[
    dict[str, str] | None,
    _OrElse(
        core_schema.dict_schema(core_schema.str_schema(), core_schema.any_schema()),
        _header_text,
        "Input should be an object or null",
    ),
]
_Payload = str | dict[str, Any] | None
"""A string, or an object (the API allows one: e.g. a JS client's serialized Buffer); kept as it is."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        ser_json_timedelta="float",
    )

    def to_api(self) -> dict[str, Any]:
        """Dump as the API's camelCase JSON object, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def has_failed_mark(user_data: Any) -> bool:
    """Whether `user_data` (a request's `userData`, any JSON value) carries the failed marker."""
    if not isinstance(user_data, dict):
        return False
    crawlee = user_data.get(CRAWLEE_DATA)
    return isinstance(crawlee, dict) and crawlee.get("state") == FAILED_STATE


def with_failed_mark(user_data: Any) -> dict[str, Any]:
    """A copy of `user_data` with the failed marker; a `userData` that is not an object becomes `{}` first."""
    data = dict(user_data) if isinstance(user_data, dict) else {}
    crawlee = data.get(CRAWLEE_DATA)
    data[CRAWLEE_DATA] = {**(crawlee if isinstance(crawlee, dict) else {}), "state": FAILED_STATE}
    return data


def without_failed_mark(user_data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `user_data` without the failed marker (and without `__crawlee` when nothing else is left in it)."""
    if not has_failed_mark(user_data):
        return dict(user_data)
    data = dict(user_data)
    crawlee = {key: value for key, value in data[CRAWLEE_DATA].items() if key != "state"}
    if crawlee:
        data[CRAWLEE_DATA] = crawlee
    else:
        del data[CRAWLEE_DATA]
    return data


def is_failed(body: Any) -> bool:
    """Whether a request as the API's JSON (a dict) is handled and marked failed."""
    return isinstance(body, dict) and body.get("handledAt") is not None and has_failed_mark(body.get("userData"))


def format_api_datetime(value: datetime) -> str:
    """`value` as the API writes times: ISO-8601 in UTC with milliseconds and `Z`."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestDraft(_Model):
    """A request to add: `uniqueKey` and `url` are required, the id is derived from `uniqueKey`."""

    unique_key: str
    url: str
    method: str = "GET"
    user_data: _UserData = Field(default_factory=dict)
    headers: _Headers = None
    payload: _Payload = None
    no_retry: bool | None = None


class Request(_Model):
    """A request as stored in the queue."""

    id: str
    unique_key: str
    url: str
    method: str = "GET"
    retry_count: int = 0
    user_data: _UserData = Field(default_factory=dict)
    headers: _Headers = None
    payload: _Payload = None
    loaded_url: str | None = None
    no_retry: bool | None = None
    error_messages: _ErrorMessages = Field(default_factory=list)
    handled_at: datetime | None = None

    _parse_handled_at = field_validator("handled_at", mode="before")(parse_datetime)

    @property
    def label(self) -> str | None:
        """The routing label (`userData.label`), if any."""
        label = self.user_data.get("label")
        return label if isinstance(label, str) else None

    @property
    def is_failed(self) -> bool:
        """Handled, and marked as failed for good (module docstring); False for a request that ended well."""
        return self.handled_at is not None and has_failed_mark(self.user_data)

    def requeued(self) -> Request:
        """This request pending again with a fresh retry budget: no `handledAt`, `retryCount` 0, no failed marker;
        its `errorMessages` are kept."""
        return self.model_copy(
            update={"handled_at": None, "retry_count": 0, "user_data": without_failed_mark(self.user_data)}
        )

    @field_serializer("handled_at", when_used="json")
    def _serialize_handled_at(self, value: datetime | None) -> str | None:
        """`handledAt` in JSON as the API writes it: ISO-8601 with milliseconds and `Z`."""
        return None if value is None else format_api_datetime(value)


class LockedHead(_Model):
    """The answer of "get head and lock", with full requests.

    Backends whose head items lack `userData`/`headers`/`payload` (the platform's) complete them before returning.
    An empty `items` does not mean the queue is finished: check `queue_has_locked_requests` too.
    """

    items: list[Request]
    lock_secs: float
    queue_has_locked_requests: bool = False
    had_multiple_clients: bool = False
    locked_at: float | None = Field(default=None, exclude=True)
    """`anyio.current_time()` when the call that took these locks was sent (its successful attempt, after any
    retries); the locks expire `lock_secs` after it at the earliest. None: the caller's own start time."""
    may_have_orphans: bool = Field(default=False, exclude=True)
    """An earlier attempt of this call got no answer and may have locked requests that are not in `items` (or the
    backend locked some it could neither return nor release): they stay locked by this client key, untracked, until
    they expire or `unlock_requests` frees them."""
    quarantined: int = Field(default=0, exclude=True)
    """Requests the backend could not read and ended as failed (with an error message) instead of returning them."""


class RequestRegistration(_Model):
    """Result of adding or updating one request."""

    request_id: str
    was_already_present: bool
    was_already_handled: bool


class AddedRequest(RequestRegistration):
    """One processed item of a batch add."""

    unique_key: str


class UnprocessedRequest(_Model):
    """One batch item the queue did not take (rate limit or internal failure); resend it."""

    unique_key: str
    url: str
    method: str | None = None


class BatchAddResult(_Model):
    """Result of a batch add."""

    processed_requests: list[AddedRequest] = Field(default_factory=list)
    unprocessed_requests: list[UnprocessedRequest] = Field(default_factory=list)


class QueueCounts(_Model):
    """What a queue holds, by state: `total` = `handled` + `failed` + `pending` + `locked`.

    `handled` counts the requests that ended well, `failed` those that failed for good (module docstring), `pending`
    the unhandled ones nobody holds, `locked` those held (in flight, or waiting out a retry backoff). `exact` is
    False when a backend could only count part of the queue (the API backend scans a bounded number of requests):
    `failed` and `locked` are then lower bounds. `locks_by_client` is None when the backend cannot tell.
    """

    total: int
    handled: int
    failed: int
    pending: int
    locked: int
    locks_by_client: dict[str, int] | None = None
    exact: bool = True


class QueueInfo(_Model):
    """Queue metadata and counters."""

    id: str
    name: str | None = None
    created_at: datetime
    modified_at: datetime
    accessed_at: datetime
    total_request_count: int
    handled_request_count: int
    pending_request_count: int
    had_multiple_clients: bool

    _parse_dates = field_validator("created_at", "modified_at", "accessed_at", mode="before")(parse_datetime)
