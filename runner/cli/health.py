"""`headlock health`: whether a running `headlock run` beat recently."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.cli._args import overrides, positive_seconds
from runner.cli._common import EXIT_FATAL, EXIT_OK
from runner.errors import ConfigError
from runner.health import DEFAULT_MAX_AGE, check_health
from runner.settings import load_settings


def health_command(args: argparse.Namespace) -> int:
    """Exit 0 if the heartbeat touched the health file less than `--max-age` seconds ago, else 1; one line either way.

    Never 2, even for a bad configuration: Docker reserves that code in health checks.
    """
    try:
        settings = load_settings(args.config, **overrides(args))
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)  # noqa: T201 - the command's output
        return EXIT_FATAL
    healthy, line = check_health(settings.health_path(), max_age=args.max_age)
    print(line, file=sys.stdout if healthy else sys.stderr)
    return EXIT_OK if healthy else EXIT_FATAL


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `health` (it takes no `common` options: it must work without a valid config)."""
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
    health.set_defaults(command=health_command, needs_settings=False)
