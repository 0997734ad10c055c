"""The entry point: parse, load settings, configure logging, dispatch to the command's module."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import anyio
import anyio.to_thread
import structlog

from runner.cli._args import build_parser, overrides
from runner.cli._common import EXIT_FATAL, EXIT_USAGE, headlock_error
from runner.cli.health import health_command
from runner.cli.queue import enqueue_command, status_command, unlock_command
from runner.cli.run import failure_summary, run_command, write_summary
from runner.cli.serve import serve_command
from runner.errors import ConfigError, InvalidUrlError
from runner.logs import configure_logging
from runner.settings import load_settings

log = structlog.get_logger("headlock.cli")

_COMMANDS = {"run": run_command, "enqueue": enqueue_command, "status": status_command, "unlock": unlock_command}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `headlock` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "health":
        return health_command(args)
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
        code: int = anyio.run(_COMMANDS[args.command], settings, args)
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
