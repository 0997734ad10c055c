"""The options commands share, and the flags given as settings overrides."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags given on the command line, as nested settings (so they win over file and env)."""
    top = {
        "handler": "handler",
        "storage_dir": "storage_dir",
        "log_format": "log_format",
        "log_level": "log_level",
        "metrics_port": "metrics_port",
        "metrics_host": "metrics_host",
        "health_file": "health_file",
        "fail_on_error": "fail_on_error",
    }
    sections = {
        "queue": {"queue": "name", "backend": "backend", "queue_id": "id"},
        "api": {"api_base_url": "base_url"},
        "workers": {
            "concurrency": "concurrency",
            "lock_secs": "lock_secs",
            "client_key": "client_key",
            "keep_alive": "keep_alive",
            "max_requests": "max_requests",
            "grace": "grace",
            "handler_timeout": "handler_timeout",
            "max_retries": "max_retries",
        },
    }
    given = {k: v for k, v in vars(args).items() if v is not None}
    result: dict[str, Any] = {field: given[flag] for flag, field in top.items() if flag in given}
    if given.get("start_url"):
        result["start_urls"] = given["start_url"]
    if given.get("option"):
        result["handler_options"] = _nested(given["option"])
    for section, fields in sections.items():
        values = {field: given[flag] for flag, field in fields.items() if flag in given}
        if values:
            result[section] = values
    return result


_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_NOT_BARE = tuple("\"'[{")
"""A value starting with one of these is meant as TOML: it must parse."""


def handler_option(text: str) -> tuple[tuple[str, ...], Any]:
    """`-O KEY=VALUE`: the key's path (dotted keys are nested tables) and the value.

    VALUE is parsed as a TOML value (`2`, `1.5`, `false`, `"x"`, `[1, 2]`, `{ a = 1 }`, a date); anything else that
    does not start with a quote or a bracket is a bare word, taken as the string it is (`-O mode=fast`).

    Raises:
        argparse.ArgumentTypeError: no `=`, a key that is not a TOML bare key, or a quoted/bracketed value that
            is not valid TOML; the message names the option.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not _KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY=VALUE with KEY made of letters, digits, _ and - (dots for nested tables)"
        )
    if "\n" in raw or "\r" in raw:
        raise argparse.ArgumentTypeError(f"{key}: a value must be one line")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if raw.startswith(_NOT_BARE):
            raise argparse.ArgumentTypeError(f"{key}: {raw!r} is not a TOML value ({exc})") from exc
        value = raw
    return tuple(key.split(".")), value


def _nested(options: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """`-O` options as nested tables, later ones winning (`-O a=1 -O a.b=2` gives `{"a": {"b": 2}}`)."""
    result: dict[str, Any] = {}
    for path, value in options:
        *parents, last = path
        table = result
        for part in parents:
            inner = table.get(part)
            if not isinstance(inner, dict):
                inner = table[part] = {}
            table = inner
        table[last] = value
    return result


def common_parser() -> argparse.ArgumentParser:
    """The options every command but `health` and `serve` takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, help="TOML settings file (see config/local.toml)")
    common.add_argument("--storage-dir", type=Path, help="where embedded queues and datasets live (./storage)")
    common.add_argument("--queue", help="queue name (default: default)")
    common.add_argument(
        "--backend", choices=["embedded", "apify", "postgres"], help="queue backend (default: embedded)"
    )
    common.add_argument("--queue-id", help="API queue id (apify backend)")
    common.add_argument("--api-base-url", help="API base URL, e.g. http://127.0.0.1:8000 for headlock serve")
    common.add_argument("--log-format", choices=["auto", "console", "json"], help="default: console on a TTY")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return common


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value
