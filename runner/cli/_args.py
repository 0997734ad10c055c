"""The argument parser, and the flags given as settings overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runner.health import DEFAULT_MAX_AGE


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
    for section, fields in sections.items():
        values = {field: given[flag] for flag, field in fields.items() if flag in given}
        if values:
            result[section] = values
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headlock", description="A worker-pool crawler runtime for request queues with locks."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, help="TOML settings file (see config/local.toml)")
    common.add_argument("--storage-dir", type=Path, help="where embedded queues and datasets live (./storage)")
    common.add_argument("--queue", help="queue name (default: default)")
    common.add_argument("--backend", choices=["embedded", "apify"], help="queue backend (default: embedded)")
    common.add_argument("--queue-id", help="API queue id (apify backend)")
    common.add_argument("--api-base-url", help="API base URL, e.g. http://127.0.0.1:8000 for headlock serve")
    common.add_argument("--log-format", choices=["auto", "console", "json"], help="default: console on a TTY")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    run_cmd = commands.add_parser("run", parents=[common], help="consume the queue with a handler (the main job)")
    run_cmd.add_argument("--handler", help="the handler as module:function, e.g. handlers.crawl:handle")
    run_cmd.add_argument("--concurrency", type=int, help="handler workers (default 10)")
    run_cmd.add_argument("--lock-secs", type=float, help="lock duration in seconds (default 60)")
    run_cmd.add_argument("--handler-timeout", type=float, help="seconds per attempt (default 60)")
    run_cmd.add_argument("--max-retries", type=int, help="retries of a failing request (default 3)")
    run_cmd.add_argument("--client-key", help="stable worker identity, 1-32 chars (default: random)")
    run_cmd.add_argument("--grace", type=float, help="seconds in-flight handlers get on shutdown (default 30)")
    run_cmd.add_argument("--max-requests", type=int, help="stop after this many finished requests")
    run_cmd.add_argument("--keep-alive", action="store_const", const=True, help="keep polling when the queue is empty")
    run_cmd.add_argument("--start-url", action="append", help="enqueue this URL first (repeatable)")
    run_cmd.add_argument("--summary", type=Path, help="write the run summary as JSON to this file, however it ends")
    run_cmd.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    run_cmd.add_argument("--metrics-host", help="address for --metrics-port (default 127.0.0.1)")
    run_cmd.add_argument("--health-file", type=Path, help="touched by the heartbeat (default STORAGE/headlock.health)")

    enqueue = commands.add_parser("enqueue", parents=[common], help="add URLs to the queue")
    enqueue.add_argument("urls", nargs="*", metavar="URL")
    enqueue.add_argument("--file", "-f", type=Path, help="read URLs from a file, one per line ('-' for stdin)")
    enqueue.add_argument("--label", help="userData.label for the router")
    enqueue.add_argument("--forefront", action="store_true", help="add to the head of the queue")
    enqueue.add_argument("--client-key", help=argparse.SUPPRESS)

    status = commands.add_parser("status", parents=[common], help="queue counts and who holds locks")
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")

    unlock = commands.add_parser("unlock", parents=[common], help="release every lock a client key holds")
    unlock.add_argument("--client-key", required=True, help="the client key whose locks to release")

    health = commands.add_parser("health", help="exit 0 if a running `headlock run` beat recently, else 1")
    health.add_argument("--config", "-c", type=Path, help="TOML settings file (for health_file / storage_dir)")
    health.add_argument("--storage-dir", type=Path, help="where the default health file lives (./storage)")
    health.add_argument("--health-file", type=Path, help="the file `headlock run` touches (default: from settings)")
    health.add_argument(
        "--max-age",
        type=positive_seconds,
        default=DEFAULT_MAX_AGE,
        help=f"seconds since the last beat still healthy (default {DEFAULT_MAX_AGE:g}: three beats)",
    )

    serve = commands.add_parser(
        "serve", help="serve the embedded store as the Apify API v2 (request queues, datasets, key-value stores, runs)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    serve.add_argument("--storage", type=Path, default=Path("storage"), help="storage directory")
    serve.add_argument("--token", help="require this API token (Authorization: Bearer)")
    serve.add_argument("--log-format", choices=["auto", "console", "json"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    for option, name in (
        ("--default-queue-id", "request queue"),
        ("--default-dataset-id", "dataset"),
        ("--default-kv-store-id", "key-value store"),
    ):
        serve.add_argument(
            option, default="default", help=f"the {name} every run reports as its default (created on first use)"
        )
    return parser


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value
