"""Resolve a handler named as `module:function`."""

from __future__ import annotations

import importlib
import inspect
from typing import cast

from runner.errors import HandlerImportError
from runner.router import Handler

__all__ = ["load_handler"]


def load_handler(path: str) -> Handler:
    """Import `module:attribute` and check it is an async callable (a coroutine function or a `Router`).

    Raises:
        HandlerImportError: the path is malformed, does not import, or names something else.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerImportError(f"handler must be written module:function, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerImportError(f"handler {path!r}: cannot import module {module_name!r}: {exc}") from exc
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerImportError(f"handler {path!r}: module {module_name!r} has no {attribute!r}") from None
    call = getattr(target, "__call__", None)  # noqa: B004 - we need the bound __call__ of instances
    if not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)):
        raise HandlerImportError(f"handler {path!r} is not an async function (async def handle(ctx))")
    return cast(Handler, target)
