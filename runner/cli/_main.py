"""The entry point: parse, load settings, configure logging, dispatch to the command's module."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

import anyio
import anyio.to_thread
import structlog

from runner.cli import enqueue, export, health, queue, run, serve, trim
from runner.cli._args import common_parser, overrides
from runner.cli._common import EXIT_FATAL, EXIT_USAGE, headlock_error
from runner.cli.run import failure_summary, write_summary
from runner.errors import ConfigError, InvalidUrlError
from runner.logs import configure_logging
from runner.settings import load_settings

log = structlog.get_logger("headlock.cli")

COMMAND_MODULES = (run, enqueue, export, queue, health, serve, trim)
"""Each adds its commands' parsers (`add_parsers`), naming the function that runs them (`command`)."""


def build_parser() -> argparse.ArgumentParser:
    """The `headlock` parser: every command module's subcommands."""
    parser = argparse.ArgumentParser(
        prog="headlock", description="A worker-pool crawler runtime for request queues with locks."
    )
    parser.add_argument("--version", action="version", version=f"headlock {version()}")
    commands = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    common = common_parser()
    for module in COMMAND_MODULES:
        module.add_parsers(commands, common)
    return parser


def version() -> str:
    """The installed package's version (its metadata), or `unknown` when headlock runs from a tree not installed."""
    try:
        return importlib.metadata.version("headlock")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `headlock` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.needs_settings:
        code: int = args.command(args)
        return code
    try:
        settings = load_settings(args.config, **overrides(args))
    except ConfigError as exc:
        print(f"headlock: error: {exc}", file=sys.stderr)  # noqa: T201 - before logging is configured
        if getattr(args, "summary", None) is not None:
            write_summary(args.summary, failure_summary(exc, client_key=None))
        return EXIT_USAGE
    token = settings.api.token.get_secret_value() if settings.api.token else ""
    configure_logging(fmt=settings.log_format, level=settings.log_level, secrets=[token])
    try:
        code = anyio.run(args.command, settings, args)
    except Exception as exc:
        error = headlock_error(exc)
        if error is None:
            raise
        if isinstance(error, ConfigError | InvalidUrlError):
            log.error("config.invalid", error=str(error))
            return EXIT_USAGE
        log.error("run.fatal", error=str(error), error_type=type(error).__name__)
        return EXIT_FATAL
    return code
