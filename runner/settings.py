"""Settings: a TOML file, then `HEADLOCK_...` environment variables, then CLI flags (flags win).

On the Apify platform the standard variables (`APIFY_TOKEN`, `APIFY_API_BASE_URL`, `APIFY_DEFAULT_REQUEST_QUEUE_ID`,
`APIFY_ACTOR_RUN_ID`) are read too, below `HEADLOCK_...` ones.
"""

from __future__ import annotations

import os
import secrets
import string
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from runner.errors import ConfigError
from runner.queue.protocol import MAX_CLIENT_KEY, MAX_LOCK_LIMIT

__all__ = ["ApiSettings", "QueueSettings", "Settings", "WorkerSettings", "load_settings", "random_client_key"]


def random_client_key() -> str:
    """A fresh random client key (17 alphanumerics, as Crawlee makes them)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(17))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QueueSettings(_Section):
    """Which queue to consume."""

    backend: Literal["embedded", "apify"] = "embedded"
    name: str = Field("default", description="Queue name (a file under storage_dir for the embedded backend).")
    id: str | None = Field(None, description="API queue id; when unset the API queue is got or created by name.")


class ApiSettings(_Section):
    """The request-queue API (the Apify platform or `headlock serve`)."""

    base_url: str = "https://api.apify.com"
    token: SecretStr | None = None
    timeout: float = Field(30.0, gt=0)
    max_retries: int = Field(6, ge=0)


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
        "httpx",
        description="The handlers' HTTP engine under the same httpx API: httpx's own, or aiohttp's through "
        "httpx-aiohttp (the `aiohttp` extra), about twice the crawl speed.",
    )

    @field_validator("client_key")
    @classmethod
    def _client_key(cls, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value) <= MAX_CLIENT_KEY:
            raise ValueError(f"must be 1-{MAX_CLIENT_KEY} characters long, got {len(value)}")
        return value


class Settings(BaseSettings):
    """Everything `headlock run` needs, built once in the CLI and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="HEADLOCK_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    handler: str | None = Field(None, description="The handler as module:function.")
    handler_options: dict[str, Any] = Field(default_factory=dict, description="Given to handlers as ctx.options.")
    start_urls: list[str] = Field(default_factory=list, description="Enqueued at start (deduplicated).")
    storage_dir: Path = Path("storage")
    dataset: str = "default"
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    progress_every: float = Field(5.0, gt=0)
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
        """Flags (init) > HEADLOCK_ env > Apify env > TOML file."""
        return (
            init_settings,
            env_settings,
            _ApifyEnvSource(settings_cls),
            TomlConfigSettingsSource(settings_cls),
        )


class _ApifyEnvSource(PydanticBaseSettingsSource):
    """The Apify platform's standard variables, so a container Actor needs no config file."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = os.environ
        api: dict[str, Any] = {}
        queue: dict[str, Any] = {}
        workers: dict[str, Any] = {}
        if env.get("APIFY_TOKEN"):
            api["token"] = env["APIFY_TOKEN"]
        if env.get("APIFY_API_BASE_URL"):
            api["base_url"] = env["APIFY_API_BASE_URL"]
        if env.get("APIFY_DEFAULT_REQUEST_QUEUE_ID"):
            queue["id"] = env["APIFY_DEFAULT_REQUEST_QUEUE_ID"]
            queue["backend"] = "apify"
        if env.get("APIFY_ACTOR_RUN_ID"):
            workers["client_key"] = env["APIFY_ACTOR_RUN_ID"][:MAX_CLIENT_KEY]
        sections = {"api": api, "queue": queue, "workers": workers}
        return {key: value for key, value in sections.items() if value}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from `config_file`, the environment and `overrides` (nested dicts for sections).

    Raises:
        ConfigError: a missing or malformed file, an unknown key or a value out of range; the message names the key
            and the rule.
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

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
        secret = "token" in key
        shown = "" if secret or isinstance(value, dict) or error["type"] == "missing" else f" (got {value!r})"
        lines.append(f"{key}: {rule}{shown}")
    where = f" in {source}" if source else ""
    return f"invalid configuration{where}: " + "; ".join(lines)
