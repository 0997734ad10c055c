"""Wire details of the emulated API: query parameters, request bodies, envelopes and the error-to-status map."""

from __future__ import annotations

import importlib
import json
import math
import operator
import re
import zlib
from collections.abc import Callable, Mapping
from itertools import accumulate, repeat
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runner.errors import (
    InvalidInputError,
    LockLostError,
    NotFoundError,
    QueueError,
    QueueUnavailableError,
    RateLimitedError,
    UnauthorizedError,
)
from runner.queue.protocol import MAX_CLIENT_KEY

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_LOCK_SECS",
    "MAX_PAYLOAD_BYTES",
    "RATE_LIMITS",
    "client_key",
    "data_response",
    "error_body",
    "error_response",
    "flag",
    "is_storage_name",
    "limit",
    "lock_secs",
    "offset",
    "parse_json",
    "rate_limit_for",
    "read_body",
    "read_json",
    "storage_name",
    "text_list",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

MAX_PAYLOAD_BYTES = 9_437_184
"""The platform's `MAX_PAYLOAD_SIZE_BYTES`; applied to the raw and to the decompressed body."""
MAX_JSON_DEPTH = 100
"""Deepest nesting of arrays and objects a body may have: far more than requests need, and well within what the store
can write and read back (its serializer stops at about 255 levels). Deeper bodies get a 400 that says so."""
MAX_LOCK_SECS = 10 * 365 * 24 * 3600.0
"""Longest lock granted (the store's bound). The platform documents none; this keeps expiries in SQLite's integers."""

# Status and `error.type` for each error class, the most specific class first. An error raised with its own
# `status`/`error_type` (413, 415, invalid-client-key, request-id-invalid) keeps them.
_STATUS: tuple[tuple[type[QueueError], int, str], ...] = (
    (LockLostError, 403, "request-handled-or-locked"),
    (NotFoundError, 404, "record-not-found"),
    (InvalidInputError, 400, "invalid-input"),
    (UnauthorizedError, 401, "invalid-token"),
    (RateLimitedError, 429, "rate-limit-exceeded"),
    (QueueUnavailableError, 503, "service-unavailable"),
)

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


def _bare_message(exc: QueueError) -> str:
    """The message without the `endpoint status type: ` prefix `QueueError` puts in front of it."""
    text = str(exc)
    parts = [p for p in (exc.endpoint, str(exc.status) if exc.status is not None else "", exc.error_type or "") if p]
    prefix = f"{' '.join(parts)}: "
    return text.removeprefix(prefix) if parts else text


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The API's error envelope."""
    return {"error": {"type": error_type, "message": message}}


def error_response(exc: QueueError) -> JSONResponse:
    """Map a `QueueError` to its HTTP answer (the one place where statuses are decided)."""
    status, error_type = 500, "internal-error"
    for cls, cls_status, cls_type in _STATUS:
        if isinstance(exc, cls):
            status, error_type = cls_status, cls_type
            break
    return JSONResponse(error_body(exc.error_type or error_type, _bare_message(exc)), status_code=exc.status or status)


def data_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """The API's success envelope; None gives an empty 204."""
    if data is None:
        return Response(status_code=204, headers=headers)
    return JSONResponse({"data": data}, status_code=status, headers=headers)


def model_response(model: BaseModel) -> Response:
    """`data_response(model.to_api())` serialized by pydantic in one step, without a Python dict and `json.dumps`
    (the hot answers: a request, a registration)."""
    body = model.model_dump_json(by_alias=True, exclude_none=True).encode()
    return Response(b'{"data":' + body + b"}", media_type="application/json")


def _invalid(message: str, error_type: str = "invalid-input") -> InvalidInputError:
    return InvalidInputError(message, status=400, error_type=error_type)


# -- query parameters ---------------------------------------------------------------------------------------


def flag(request: Request, name: str) -> bool:
    """A boolean query parameter: `true`/`false`/`1`/`0` (what the v3 and the v2/JS clients send)."""
    value = request.query_params.get(name)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _invalid(f"Invalid input: {name} must be true, false, 1 or 0, got {value!r}")


def client_key(request: Request) -> str | None:
    """The `clientKey` parameter, None when absent."""
    value = request.query_params.get("clientKey")
    if value is not None and not 1 <= len(value) <= MAX_CLIENT_KEY:
        raise _invalid(
            f"clientKey must be a string between 1 and {MAX_CLIENT_KEY} characters long", "invalid-client-key"
        )
    return value


def lock_secs(request: Request) -> float:
    """The required `lockSecs` parameter: a positive number of seconds."""
    value = request.query_params.get("lockSecs")
    if value is None:
        raise _invalid("Invalid input: lockSecs is required")
    try:
        seconds = float(value)
    except ValueError:
        raise _invalid(f"Invalid input: lockSecs must be a number, got {value!r}") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_LOCK_SECS:
        raise _invalid(f"Invalid input: lockSecs must be > 0 and <= {MAX_LOCK_SECS:.0f}, got {value!r}")
    return seconds


def limit(request: Request, *, default: int, maximum: int, zero_is_default: bool = False) -> int:
    """The `limit` parameter: a whole number in 1..maximum (over the maximum is refused, not clamped).

    With `zero_is_default`, `limit=0` means "no limit given": the official client's iterators send it so when the
    caller set no page size.
    """
    value = request.query_params.get("limit")
    if value is None:
        return default
    number = _whole_number(value, "limit")
    if zero_is_default and number == 0:
        return default
    if not 1 <= number <= maximum:
        raise _invalid(f"Invalid input: limit must be a whole number from 1 to {maximum}, got {value!r}")
    return number


def offset(request: Request) -> int:
    """The `offset` parameter: a whole number >= 0, 0 when absent."""
    value = request.query_params.get("offset")
    if value is None:
        return 0
    number = _whole_number(value, "offset")
    if number < 0:
        raise _invalid(f"Invalid input: offset must be a whole number >= 0, got {value!r}")
    return number


_MAX_WHOLE = 2**53
"""Largest whole number a query parameter may hold (what a JSON double represents exactly)."""


def _whole_number(value: str, name: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise _invalid(f"Invalid input: {name} must be a number, got {value!r}") from None
    if not number.is_integer() or abs(number) > _MAX_WHOLE:
        raise _invalid(f"Invalid input: {name} must be a whole number, got {value!r}")
    return int(number)


def text_list(request: Request, name: str) -> list[str]:
    """A comma-joined list parameter (`fields=a,b`), empty entries dropped; [] when absent."""
    value = request.query_params.get(name)
    return [] if value is None else [part.strip() for part in value.split(",") if part.strip()]


_STORAGE_NAME = re.compile(r"[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]{0,61}[a-zA-Z0-9]")
"""A storage name the platform accepts (DNS-safe, at most 63 characters), matched with `fullmatch`."""


def is_storage_name(name: str) -> bool:
    """Whether `name` is a valid storage name (and so a file name this server may use)."""
    return _STORAGE_NAME.fullmatch(name) is not None


def storage_name(name: str, what: str) -> str:
    """Return `name` if it is a valid name for a `what` (dataset, key-value store), else raise a 400."""
    if not _STORAGE_NAME.fullmatch(name):
        raise _invalid(
            f"Invalid input: {what} name {name!r} must be 1-63 letters, digits or '-', not starting or ending with '-'"
        )
    return name


RATE_LIMITS = (40, 60, 400)
"""Every value `rate_limit_for` answers."""


def rate_limit_for(method: str, path: str) -> int:
    """The per-resource rate limit of the endpoint at `path`, for the `X-RateLimit-Limit` header (contract §6).

    Request queues as the contract has them; pushing dataset items 400 a second (the platform's dataset docs);
    everything else 60, the platform's default per resource.
    """
    parts = path.strip("/").split("/")
    resource, sub = parts[1:2], parts[3:]  # v2/{resource}/{id}/{sub...}
    if resource == ["datasets"]:
        return 400 if sub == ["items"] and method == "POST" else 60
    if resource != ["request-queues"]:
        return 60
    if sub in (["head", "lock"], ["requests", "batch"]):
        return 40
    if sub[:1] == ["requests"] and (len(sub) >= 2 or method == "POST") and sub[1:2] != ["unlock"]:
        return 400
    return 60


# -- bodies -------------------------------------------------------------------------------------------------


def _too_large(actual: str) -> InvalidInputError:
    return InvalidInputError(
        f"The POST payload is too large (limit: {MAX_PAYLOAD_BYTES} bytes, actual length: {actual} bytes).",
        status=413,
        error_type="request-too-large",
    )


class _CorruptBodyError(Exception):
    """A compressed body that does not decompress (the decoder library's own error, with its message)."""


_STEP = 64 * 1024
"""Output asked of a decoder per call (brotli may hand back up to one internal block, 32 KiB, more)."""


def _inflate(data: bytes, wbits: int) -> bytes:
    """Decompress zlib/gzip data (every gzip member) in steps, stopping once the output passes the payload limit.

    One call with a cap would hold the capped output twice (zlib's blocks, then the joined result).
    """
    parts: list[bytes] = []
    size = 0
    decompressor = zlib.decompressobj(wbits)
    # Every round produces output (at most MAX_PAYLOAD_BYTES + 1 in all), starts the next gzip member on input
    # the last one did not use, or stops.
    while True:
        try:
            part = decompressor.decompress(data, _STEP)
        except zlib.error as exc:
            raise _CorruptBodyError(str(exc)) from exc
        parts.append(part)
        size += len(part)
        if size > MAX_PAYLOAD_BYTES:
            raise _too_large(f"more than {MAX_PAYLOAD_BYTES}")
        if decompressor.eof:
            data = decompressor.unused_data
            if not data:
                return b"".join(parts)
            decompressor = zlib.decompressobj(wbits)
            continue
        data = decompressor.unconsumed_tail
        if not part and not data:
            raise _CorruptBodyError("truncated compressed data")


def _deflate(data: bytes) -> bytes:
    # HTTP "deflate" is zlib-wrapped, but some clients send raw deflate; accept both.
    try:
        return _inflate(data, zlib.MAX_WBITS)
    except _CorruptBodyError:
        return _inflate(data, -zlib.MAX_WBITS)


def _unbrotli(brotli: Any, data: bytes) -> bytes:
    """Decompress brotli data in steps, stopping as soon as the output passes the payload limit."""
    decompressor = brotli.Decompressor()
    parts: list[bytes] = []
    size = 0
    try:
        # The decoder keeps the input it has not decoded yet; later calls take no input and go on from there.
        part = decompressor.process(data, output_buffer_limit=_STEP)
        # Every round adds output or stops, so there are at most MAX_PAYLOAD_BYTES + 1 of them.
        while part:
            parts.append(part)
            size += len(part)
            if size > MAX_PAYLOAD_BYTES:
                raise _too_large(f"more than {MAX_PAYLOAD_BYTES}")
            if decompressor.is_finished():
                break
            part = decompressor.process(b"", output_buffer_limit=_STEP)
    except brotli.error as exc:
        raise _CorruptBodyError(str(exc)) from exc
    if not decompressor.is_finished():
        raise _CorruptBodyError("truncated compressed data")
    return b"".join(parts)


def _bounded_brotli() -> Any | None:
    """The brotli module if it is installed and can bound its output (`output_buffer_limit`, brotli >= 1.2)."""
    try:
        brotli: Any = importlib.import_module("brotli")
        brotli.Decompressor().process(b"", output_buffer_limit=1)
    except (ImportError, TypeError, AttributeError):
        # Without a bound, a small body could decompress to gigabytes before its size is known: refuse br (415).
        return None
    return brotli


def _decoders() -> dict[str, Callable[[bytes], bytes]]:
    decoders: dict[str, Callable[[bytes], bytes]] = {
        "gzip": lambda data: _inflate(data, 16 + zlib.MAX_WBITS),
        "x-gzip": lambda data: _inflate(data, 16 + zlib.MAX_WBITS),
        "deflate": _deflate,
    }
    brotli = _bounded_brotli()
    if brotli is not None:
        decoders["br"] = lambda data: _unbrotli(brotli, data)
    return decoders


_DECODERS = _decoders()


def _decode(data: bytes, content_encoding: str | None) -> bytes:
    """Undo each `Content-Encoding`; each decoder stops once its output passes the payload limit (413)."""
    encodings = [e.strip().lower() for e in (content_encoding or "").split(",") if e.strip()]
    for encoding in reversed(encodings):  # the last encoding applied is undone first
        if encoding == "identity":
            continue
        decoder = _DECODERS.get(encoding)
        if decoder is None:
            raise InvalidInputError(
                f"Content-Encoding {encoding!r} is not supported (supported: {', '.join(sorted(_DECODERS))})",
                status=415,
                error_type="unsupported-content-encoding",
            )
        try:
            data = decoder(data)
        except _CorruptBodyError as exc:
            raise _invalid(f"Invalid input: the {encoding} body cannot be decompressed ({exc})") from exc
    return data


async def read_json(request: Request) -> Any:
    """Read, decompress and parse the JSON body, within the payload limit.

    Raises:
        InvalidInputError: 413 request-too-large, 415 unsupported-content-encoding, 400 invalid-input.
    """
    return parse_json(await read_body(request))


async def read_body(request: Request) -> bytes:
    """Read and decompress the body (`Content-Encoding`), within the payload limit, raw and decompressed.

    Raises:
        InvalidInputError: 413 request-too-large, 415 unsupported-content-encoding, 400 invalid-input (a body that
            does not decompress).
    """
    chunks: list[bytes] = []
    size = 0
    # Read the whole body even when it is too large: answering before the client finished sending makes it see
    # a broken connection instead of the 413.
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_PAYLOAD_BYTES:
            chunks.append(chunk)
    if size > MAX_PAYLOAD_BYTES:
        raise _too_large(str(size))
    return _decode(b"".join(chunks), request.headers.get("content-encoding"))


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _too_deep() -> InvalidInputError:
    return _invalid(
        f"Invalid input: the request body is too deeply nested (over {MAX_JSON_DEPTH} levels of arrays and objects)"
    )


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, which is valid JSON (0 for a bare scalar)."""
    # On valid JSON the string pattern matches each string whole, so what is left are the brackets outside them.
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii").translate(_BRACKET_STEPS)
    # An opening bracket is a step of +1, a closing one of -1 (shifted by one: bytes are unsigned); all in C.
    return max(accumulate(map(operator.sub, brackets, repeat(1))), default=0)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text} is out of range")
    return number


def parse_json(body: bytes) -> Any:
    """Parse a JSON body (UTF-8, -16 or -32) into values the store can keep and give back unchanged.

    Refused: invalid JSON or Unicode (a lone surrogate too, raw or `\\u`-escaped), `NaN` and `Infinity`, numbers
    out of range (a float that overflows, an integer of more than 4300 digits), nesting over `MAX_JSON_DEPTH`.

    Raises:
        InvalidInputError: 400 invalid-input, saying which of these it is.
    """
    try:
        text = body.decode(json.detect_encoding(body))
    except UnicodeDecodeError as exc:
        raise _invalid(f"Invalid input: the request body is not valid JSON ({exc})") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        # The parser recurses per level: about a thousand levels exhaust the interpreter's recursion limit.
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, NaN, an overflowing float, an integer over 4300 digits
        raise _invalid(f"Invalid input: the request body is not valid JSON ({exc})") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(text):  # rare: only then is it worth checking every string
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise _invalid("Invalid input: the request body escapes a lone surrogate (\\ud800-\\udfff)") from None
    return value


def validate(model: type[M], value: Any, what: str) -> M:
    """Validate `value` as `model`, turning a pydantic error into a 400 that says what is wrong."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg']}" for err in exc.errors()[:3]
        )
        raise _invalid(f"Invalid input: {what}: {problems}") from None
