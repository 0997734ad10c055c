"""The Actor's input record (the default key-value store's `INPUT`), mapped onto settings.

| input field | setting |
|---|---|
| `startUrls` (strings, or `{url, method, headers, userData, uniqueKey, payload}`) | `start_urls` |
| `maxRequestsPerCrawl` (0: no limit) | `workers.max_requests` |
| `maxConcurrency` | `workers.concurrency` |
| `handlerOptions` (an object) | `handler_options` (merged over the config file's) |

The input ranks below flags and `HEADLOCK_*` variables and above the config file; other fields are ignored (and
logged once), as an Actor ignores input its schema does not describe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import ConfigError
from runner.settings import StartRequest, describe_validation_error

__all__ = ["ActorInput", "input_settings", "parse_input"]

log = structlog.get_logger("headlock.actor")


class ActorInput(BaseModel):
    """The input fields headlock reads; the rest are kept in `model_extra`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    start_urls: list[str | StartRequest] | None = Field(None, alias="startUrls")
    max_requests_per_crawl: int | None = Field(None, alias="maxRequestsPerCrawl", ge=0)
    max_concurrency: int | None = Field(None, alias="maxConcurrency", ge=1, le=10_000)
    handler_options: dict[str, Any] | None = Field(None, alias="handlerOptions")


def parse_input(body: bytes, content_type: str | None, *, key: str = "INPUT") -> ActorInput:
    """Read the input record's body (JSON, as the platform stores it).

    Raises:
        ConfigError: not a JSON object, or a field of the wrong shape; the message names the record and the field.
    """
    if content_type and "json" not in content_type.lower():
        raise ConfigError(f"{key}: the input record must be JSON, got content type {content_type!r}")
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise ConfigError(f"{key}: malformed JSON: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: the input must be a JSON object, got {type(data).__name__}")
    try:
        parsed = ActorInput.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc).replace("invalid configuration", f"invalid {key}")) from exc
    if parsed.model_extra:
        log.info("actor.input.ignored", fields=sorted(parsed.model_extra))
    return parsed


def input_settings(actor_input: ActorInput) -> dict[str, Any]:
    """The settings (nested dicts, as `Settings` takes them) that `actor_input` sets."""
    settings: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    if actor_input.start_urls is not None:
        settings["start_urls"] = actor_input.start_urls
    if actor_input.handler_options is not None:
        settings["handler_options"] = actor_input.handler_options
    if actor_input.max_requests_per_crawl:  # 0 is "no limit", as on the platform's forms
        workers["max_requests"] = actor_input.max_requests_per_crawl
    if actor_input.max_concurrency is not None:
        workers["concurrency"] = actor_input.max_concurrency
    if workers:
        settings["workers"] = workers
    return settings


def describe_input(actor_input: ActorInput) -> Mapping[str, Any]:
    """What the input set, for the `actor.input` log event (no values that could be large)."""
    return {
        "start_urls": len(actor_input.start_urls or ()),
        "max_requests_per_crawl": actor_input.max_requests_per_crawl,
        "max_concurrency": actor_input.max_concurrency,
        "handler_options": sorted(actor_input.handler_options or ()),
    }
