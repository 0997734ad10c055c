"""Resolve a handler named as `module:function`, finding modules in the current directory as `python -m` does."""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import sys
from pathlib import Path
from typing import cast

from runner.errors import HandlerImportError
from runner.router import Handler

__all__ = ["load_handler"]


def load_handler(path: str, *, directory: Path | None = None) -> Handler:
    """Import `module:attribute` and check it is an async callable (a coroutine function or a `Router`).

    `directory` (the current directory by default) is put first on `sys.path` before the import and left there, as
    `python -m` and uvicorn do: a handler module next to the user's config is found, and so are the modules it
    imports later. A module of the same name earlier in the import system (headlock's own `handlers` package, one
    imported already) wins over it; the error then names both files and how to rename.

    Raises:
        HandlerImportError: the path is malformed, does not import, or names something else.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerImportError(f"handler must be written module:function, got {path!r}")
    here = str((directory or Path.cwd()).resolve())
    if not sys.path or _resolved(sys.path[0]) != here:
        sys.path.insert(0, here)
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        shadow = _shadowing(module_name, here)
        hint = f"; {shadow}" if shadow else f" (searched {here} first, then sys.path)"
        raise HandlerImportError(f"handler {path!r}: cannot import module {module_name!r}: {exc}{hint}") from exc
    except SyntaxError as exc:
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else module_name
        raise HandlerImportError(f"handler {path!r}: {where}: invalid syntax: {exc.msg}") from exc
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            shadow = _shadowing(module_name, here)
            hint = f"; {shadow}" if shadow else ""
            raise HandlerImportError(
                f"handler {path!r}: module {module_name!r} ({_origin(module)}) has no {attribute!r}{hint}"
            ) from None
    call = getattr(target, "__call__", None)  # noqa: B004 - we need the bound __call__ of instances
    if not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)):
        raise HandlerImportError(f"handler {path!r} is not an async function (async def handle(ctx))")
    return cast(Handler, target)


def _resolved(entry: str) -> str:
    """A `sys.path` entry as an absolute path (`''` is the current directory)."""
    try:
        return str(Path(entry or os.curdir).resolve())
    except OSError:
        return entry


def _origin(module: object) -> str:
    """Where a module was loaded from, for messages."""
    file = getattr(module, "__file__", None)
    return str(file) if file else "a namespace package"


def _shadowing(module_name: str, here: str) -> str | None:
    """Explain a clash of the top-level name of `module_name` between `here` and the rest of `sys.path`, if any.

    The usual one: the user's `handlers.py` (or `handlers/`) in the current directory and headlock's own
    `handlers` package; whichever was imported, the other one's names are missing.
    """
    top = module_name.partition(".")[0]
    local = importlib.machinery.PathFinder.find_spec(top, [here])
    if local is None:
        return None
    if local.origin is not None:
        mine = Path(local.origin).resolve()
    elif local.submodule_search_locations:  # a directory without __init__.py: any regular package wins over it
        mine = Path(next(iter(local.submodule_search_locations))).resolve()
    else:
        return None
    other: Path | None = None
    for entry in sys.path:
        resolved = _resolved(entry)
        if resolved == here:
            continue
        spec = importlib.machinery.PathFinder.find_spec(top, [resolved])
        if spec is not None and spec.origin is not None and Path(spec.origin).resolve() != mine:
            other = Path(spec.origin).resolve()
            break
    if other is None:
        return None
    ours = Path(__file__).resolve().parent.parent  # headlock's packages sit side by side
    theirs = "headlock's own" if other.is_relative_to(ours / top) or other == ours / f"{top}.py" else "another"
    imported = sys.modules.get(top)
    used = (
        Path(_origin(imported)).resolve()
        if imported is not None and _origin(imported) != "a namespace package"
        else None
    )
    return (
        f"two modules are named {top!r}: {mine} (in the current directory{', imported' if used == mine else ''})"
        f" and {theirs} {top!r} package at {other}{' (imported)' if used == other else ''}. Rename yours (e.g."
        f" my_{top}.py, then --handler my_{top}:...) or put it in a package of your own (myproject/{top}.py, then"
        f" --handler myproject.{top}:...)"
    )
