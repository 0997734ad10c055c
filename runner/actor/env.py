"""The Apify platform's environment variables, as settings: a container Actor needs no config file.

The current `ACTOR_*` names and their deprecated `APIFY_*` forms are both read; when both are set the current one
wins. They rank below `HEADLOCK_*` variables and flags, and above the config file (see `runner.settings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runner.queue.protocol import MAX_CLIENT_KEY

__all__ = ["ACTOR_VARIABLES", "actor_env_settings"]

ACTOR_VARIABLES: dict[str, tuple[str, ...]] = {
    "token": ("APIFY_TOKEN",),
    "base_url": ("APIFY_API_BASE_URL", "APIFY_API_PUBLIC_BASE_URL"),
    "queue_id": ("ACTOR_DEFAULT_REQUEST_QUEUE_ID", "APIFY_DEFAULT_REQUEST_QUEUE_ID"),
    "dataset_id": ("ACTOR_DEFAULT_DATASET_ID", "APIFY_DEFAULT_DATASET_ID"),
    "key_value_store_id": ("ACTOR_DEFAULT_KEY_VALUE_STORE_ID", "APIFY_DEFAULT_KEY_VALUE_STORE_ID"),
    "input_key": ("ACTOR_INPUT_KEY", "APIFY_INPUT_KEY"),
    "run_id": ("ACTOR_RUN_ID", "APIFY_ACTOR_RUN_ID"),
    "web_server_port": ("ACTOR_WEB_SERVER_PORT", "APIFY_CONTAINER_PORT"),
    "timeout_at": ("ACTOR_TIMEOUT_AT", "APIFY_TIMEOUT_AT"),
    "events_url": ("ACTOR_EVENTS_WEBSOCKET_URL", "APIFY_ACTOR_EVENTS_WS_URL"),
    "is_at_home": ("APIFY_IS_AT_HOME",),
}
"""What each setting is read from, current name first (the platform's documented variables)."""


def _read(env: Mapping[str, str], what: str) -> str | None:
    """The first non-empty variable of `what`'s names."""
    for name in ACTOR_VARIABLES[what]:
        if value := env.get(name, "").strip():
            return value
    return None


def actor_env_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings (nested dicts, as `Settings` takes them) from the platform's variables in `env`.

    A default request queue id selects the API backend; a run id is the client key (cut to the API's 32
    characters: it is stable across a migration, so the resumed run frees its earlier life's locks at once).
    """
    api: dict[str, Any] = {}
    queue: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    actor: dict[str, Any] = {}
    top: dict[str, Any] = {}
    if token := _read(env, "token"):
        api["token"] = token
    if base_url := _read(env, "base_url"):
        api["base_url"] = base_url
    if queue_id := _read(env, "queue_id"):
        queue["id"] = queue_id
        queue["backend"] = "apify"
    if dataset_id := _read(env, "dataset_id"):
        top["dataset_id"] = dataset_id
    if run_id := _read(env, "run_id"):
        actor["run_id"] = run_id
        workers["client_key"] = run_id[:MAX_CLIENT_KEY]
    if port := _read(env, "web_server_port"):
        actor["web_server_port"] = port
    for what, key in (
        ("key_value_store_id", "key_value_store_id"),
        ("input_key", "input_key"),
        ("timeout_at", "timeout_at"),
        ("events_url", "events_url"),
    ):
        if value := _read(env, what):
            actor[key] = value
    if (at_home := _read(env, "is_at_home")) is not None:
        actor["is_at_home"] = at_home.lower() in {"1", "true", "yes"}
    sections = {"api": api, "queue": queue, "workers": workers, "actor": actor}
    return top | {key: value for key, value in sections.items() if value}
