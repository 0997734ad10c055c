"""The `headlock` command line: run, enqueue, status, unlock, health, serve.

One module per command (`run`, `queue` for enqueue/status/unlock, `health`, `serve`); `_args` builds the parser and
turns the flags given into settings overrides, `_main` dispatches.
"""

from runner.cli._main import main

__all__ = ["main"]
