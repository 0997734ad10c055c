"""Dispatch requests to handlers by `userData.label`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from runner.context import Context
from runner.errors import NoRetry

__all__ = ["Handler", "Router"]

Handler = Callable[[Context], Awaitable[None]]
"""What `headlock run --handler module:function` names: `async def handle(ctx: Context) -> None`."""


class Router:
    """A handler that routes on the request's label.

    Usage::

        router = Router()

        @router.route("detail")
        async def detail(ctx: Context) -> None: ...

        @router.default
        async def start(ctx: Context) -> None: ...

    A label with no route and no default fails the request without retries.
    """

    def __init__(self) -> None:
        self._routes: dict[str, Handler] = {}
        self._default: Handler | None = None

    def route(self, label: str) -> Callable[[Handler], Handler]:
        """Register the decorated handler for `label`."""

        def register(handler: Handler) -> Handler:
            if label in self._routes:
                raise ValueError(f"label {label!r} already has a handler")
            self._routes[label] = handler
            return handler

        return register

    def default(self, handler: Handler) -> Handler:
        """Register the handler for requests whose label has no route (or that have none)."""
        self._default = handler
        return handler

    async def __call__(self, ctx: Context) -> None:
        handler = self._routes.get(ctx.label or "", self._default)
        if handler is None:
            raise NoRetry(f"no route for label {ctx.label!r}")
        await handler(ctx)
