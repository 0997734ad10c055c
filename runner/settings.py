"""Settings, lowest rank first: `DATABASE_URL`, a TOML file, the Apify platform's variables (`runner.actor.env`), the
Actor's input record (`runner.actor.input`), `HEADLOCK_...` environment variables, then CLI flags (flags win).

`DATABASE_URL` (the variable hosting platforms set for an app's database) gives `queue.dsn`, and nothing else: it
is read only when nothing else sets the DSN, and it does not choose the backend (`queue.backend = "postgres"` does).
"""

from __future__ import annotations

import os
import secrets
import string
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from runner.actor.env import actor_env_settings
from runner.errors import ConfigError
from runner.gcpolicy import DEFAULT_GC_THRESHOLD
from runner.politeness.agent import default_user_agent
from runner.queue.protocol import MAX_CLIENT_KEY, MAX_LOCK_LIMIT
from runner.uniquekey import KeyConvention

__all__ = [
    "ActorSettings",
    "ApiSettings",
    "HostPoliteness",
    "PolitenessSettings",
    "QueueSettings",
    "Settings",
    "StartRequest",
    "WorkerSettings",
    "database_url_settings",
    "load_settings",
    "random_client_key",
]


def random_client_key() -> str:
    """A fresh random client key (17 alphanumerics, as Crawlee makes them)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(17))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QueueSettings(_Section):
    """Which queue to consume."""

    backend: Literal["embedded", "apify", "postgres"] = "embedded"
    name: str = Field(
        "default",
        description="Queue name (a file under storage_dir for the embedded backend, a queue row for postgres).",
    )
    dsn: SecretStr | None = Field(
        None,
        description="The postgres backend's database: a libpq connection string or a postgresql:// URL (also read from "
        "DATABASE_URL). Never shown: not in logs, errors or reprs.",
    )
    id: str | None = Field(None, description="API queue id; when unset the API queue is got or created by name.")
    unique_keys: KeyConvention = Field(
        "headlock",
        description="How a URL's default uniqueKey is made: headlock's, crawlee-python's or Crawlee JS's (match the "
        "other clients of a shared queue).",
    )


class ApiSettings(_Section):
    """The request-queue API (the Apify platform or `headlock serve`)."""

    base_url: str = "https://api.apify.com"
    token: SecretStr | None = None
    timeout: float = Field(30.0, gt=0)
    max_retries: int = Field(6, ge=0)
    pacing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Client-side pacing to the platform's per-queue limits: auto (on for the platform's API, a host "
        "under apify.com; off for headlock serve and other servers), on, off.",
    )


class WorkerSettings(_Section):
    """The worker pool."""

    concurrency: int = Field(10, ge=1, le=10_000)
    prefetch: int = Field(25, ge=0, description="Requests locked ahead of free workers.")
    batch: int = Field(MAX_LOCK_LIMIT, ge=1, le=MAX_LOCK_LIMIT, description="Most requests locked per call.")
    lock_secs: float = Field(60.0, gt=0)
    handler_timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    retry_backoff: float = Field(1.0, ge=0, description="Base delay before a failed request is retried.")
    grace: float = Field(30.0, ge=0, description="Seconds in-flight handlers get to finish on shutdown.")
    keep_alive: bool = False
    max_requests: int | None = Field(None, ge=1, description="Stop after this many finished requests.")
    client_key: str | None = Field(None, description="Stable worker identity; random when unset.")
    http_transport: Literal["httpx", "aiohttp"] = Field(
        "aiohttp",
        description="The handlers' HTTP engine under the same httpx API: aiohttp's through httpx-aiohttp (the "
        "default, about twice the crawl speed), or httpx's own.",
    )
    gc_threshold: int = Field(
        DEFAULT_GC_THRESHOLD,
        ge=0,
        description="The cyclic garbage collector's youngest threshold during the run, if above Python's (700): "
        "fewer collections (`runner.gcpolicy`); 0 leaves the collector as it is.",
    )

    @field_validator("client_key")
    @classmethod
    def _client_key(cls, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value) <= MAX_CLIENT_KEY:
            raise ValueError(f"must be 1-{MAX_CLIENT_KEY} characters long, got {len(value)}")
        return value


class HostPoliteness(_Section):
    """One host's own limits (an entry of `politeness.hosts`); unset keys take the section's."""

    per_host_concurrency: int | None = Field(None, ge=1, le=10_000)
    per_host_delay: float | None = Field(None, ge=0, le=3600)


class PolitenessSettings(_Section):
    """How the handlers' shared client treats each host (scheme, host and port): `runner.politeness`."""

    per_host_concurrency: int = Field(8, ge=1, le=10_000, description="Most requests in flight to one host.")
    per_host_delay: float = Field(
        0.0, ge=0, le=3600, description="Least seconds between two request starts to one host (0: none)."
    )
    adaptive: bool = Field(
        False,
        description="AutoThrottle: each host's delay follows its latency / adaptive_target, between per_host_delay "
        "and max_delay (an error answer never lowers it).",
    )
    adaptive_target: float = Field(
        2.0, gt=0, le=10_000, description="Adaptive mode: the requests to aim at in flight to one host."
    )
    max_delay: float = Field(
        60.0, gt=0, le=3600, description="Most seconds of an adaptive delay, a Crawl-delay or a backoff step."
    )
    max_retry_after: float = Field(
        600.0, gt=0, le=86_400, description="Longest Retry-After honoured (a longer one is cut to this)."
    )
    max_hosts: int = Field(10_000, ge=1, description="Hosts whose state is kept (least recently used forgotten).")
    hosts: dict[str, HostPoliteness] = Field(
        default_factory=dict,
        description="Limits of their own for some hosts, by origin: "
        '`hosts."https://example.com" = {per_host_concurrency = 1, per_host_delay = 0.5}`.',
    )
    robots_txt: bool | None = Field(
        None,
        description="Obey robots.txt: true for every request of the shared client, false for none; unset, for "
        "the requests that ask (the ready crawl handler's do).",
    )
    robots_timeout: float = Field(10.0, gt=0, description="Seconds for one robots.txt fetch (redirects included).")
    robots_cache_secs: float = Field(
        86_400.0, gt=0, description="How long a fetched robots.txt is kept (24 h, as Google does)."
    )
    user_agent: str = Field(
        default_factory=default_user_agent,
        min_length=1,
        description="User-Agent of every request of the shared client, and the name robots.txt rules are matched to.",
    )

    @field_validator("hosts")
    @classmethod
    def _origins(cls, value: dict[str, HostPoliteness]) -> dict[str, HostPoliteness]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path not in {"", "/"}:
                raise ValueError(f"keys must be origins such as 'https://example.com' or 'http://h:8080', got {url!r}")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError as exc:
                raise ValueError(f"bad port in {url!r}") from exc
        return value

    @field_validator("user_agent")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("must be one line (no CR, LF or NUL)")
        return value


class ActorSettings(_Section):
    """The Apify Actor run this process is part of (set from the platform's variables, see `runner.actor.env`)."""

    run_id: str | None = Field(None, description="The run; stable across a migration.")
    key_value_store_id: str | None = Field(None, description="The run's default key-value store (input, state).")
    input_key: str = Field("INPUT", min_length=1, description="The input record's key in that store.")
    events_url: str | None = Field(None, description="The platform's events websocket.")
    timeout_at: datetime | None = Field(None, description="When the platform ends the run; we stop before it.")
    web_server_port: int | None = Field(
        None, ge=1, le=65535, description="The port the platform routes to the container: metrics and health."
    )
    is_at_home: bool = Field(False, description="Running on the Apify platform.")
    status_every: float = Field(5.0, gt=0, description="Least seconds between two status-message updates.")


class StartRequest(BaseModel):
    """A start request in the platform's request-list form (`startUrls` items), or a TOML table."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)

    url: str
    method: str = "GET"
    headers: dict[str, str] | None = None
    user_data: dict[str, Any] | None = None
    payload: str | None = None
    unique_key: str | None = None
    label: str | None = None


class Settings(BaseSettings):
    """Everything `headlock run` needs, built once in the CLI and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="HEADLOCK_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    handler: str | None = Field(None, description="The handler as module:function.")
    handler_options: dict[str, Any] = Field(default_factory=dict, description="Given to handlers as ctx.options.")
    start_urls: list[str | StartRequest] = Field(
        default_factory=list, description="Enqueued at start (deduplicated): URLs or request tables."
    )
    storage_dir: Path = Path("storage")
    dataset: str = Field("default", min_length=1, description="Results: the file's or the API dataset's name.")
    dataset_id: str | None = Field(None, description="Results on the API backend: this dataset (the run's default).")
    results_backend: Literal["auto", "jsonl", "apify", "postgres"] = Field(
        "auto", description="Where results go; auto: a local file on the embedded queue, the API's dataset on apify."
    )
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    progress_every: float = Field(5.0, gt=0)
    fail_on_error: bool = Field(
        False, description="`headlock run` exits 3 (not 0) when requests failed for good (see runner.cli.run)."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics on this port; 0 or unset: off."
    )
    metrics_host: str = Field("127.0.0.1", min_length=1, description="Metrics address; 0.0.0.0 in a container.")
    health_file: Path | None = Field(
        None, description="Touched by the heartbeat, read by `headlock health`; default <storage_dir>/headlock.health."
    )
    queue: QueueSettings = Field(default_factory=QueueSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    politeness: PolitenessSettings = Field(default_factory=PolitenessSettings)
    actor: ActorSettings = Field(default_factory=ActorSettings)

    def results_on_api(self) -> bool:
        """Whether results go to an API dataset rather than a local file."""
        if self.results_backend == "auto":
            return self.queue.backend == "apify"
        return self.results_backend == "apify"

    def health_path(self) -> Path:
        """The liveness file: `health_file`, or `headlock.health` in the storage directory."""
        return self.health_file or self.storage_dir / "headlock.health"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init) > HEADLOCK_ env > Apify env > TOML file > DATABASE_URL (`load_settings` adds the Actor's
        input)."""
        return (
            init_settings,
            env_settings,
            _DictSource(settings_cls, actor_env_settings(os.environ)),
            TomlConfigSettingsSource(settings_cls),
            _DictSource(settings_cls, database_url_settings(os.environ)),
        )


def database_url_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """`queue.dsn` from `DATABASE_URL`, when it is set and not blank."""
    url = env.get("DATABASE_URL", "").strip()
    return {"queue": {"dsn": url}} if url else {}


class _DictSource(PydanticBaseSettingsSource):
    """Settings given as nested dicts (the platform's variables, the Actor's input)."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._values


def load_settings(
    config_file: Path | None = None, *, actor_input: dict[str, Any] | None = None, **overrides: Any
) -> Settings:
    """Build settings from `config_file`, the environment, `actor_input` (settings the Actor's input sets, see
    `runner.actor.input`) and `overrides` (nested dicts for sections).

    Raises:
        ConfigError: a missing or malformed file, an unknown key or a value out of range; the message names the key
            and the rule.
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            """The class's sources with the Actor's input between the HEADLOCK_ variables and the platform's."""
            init, env, *lower = super().settings_customise_sources(
                settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
            )
            return (init, env, _DictSource(settings_cls, actor_input or {}), *lower)

    try:
        return _FileSettings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file}: malformed TOML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, config_file)) from exc


def describe_validation_error(exc: ValidationError, source: Path | None = None) -> str:
    """One line per problem: `key: rule (got value)`."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(root)"
        rule = error["msg"]
        if error["type"] == "extra_forbidden":
            rule = "unknown key"
        value = error.get("input")
        secret = "token" in key or "dsn" in key
        shown = "" if secret or isinstance(value, dict) or error["type"] == "missing" else f" (got {value!r})"
        lines.append(f"{key}: {rule}{shown}")
    where = f" in {source}" if source else ""
    return f"invalid configuration{where}: " + "; ".join(lines)
