"""`headlock health`: whether a running `headlock run` beat recently."""

from __future__ import annotations

import argparse
import sys

from runner.cli._args import overrides
from runner.cli._common import EXIT_FATAL, EXIT_OK
from runner.errors import ConfigError
from runner.health import check_health
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
