"""The handlers' shared client: `httpx.AsyncClient` with two per-response costs cut where the result is the same.

httpx reads every response for cookies through `http.cookiejar` (it wraps the response and its request first) and
finds a charset with the email parser; on a crawl that is about a tenth of a page's CPU. `LeanCookies` reads only
responses that set a cookie, and the default engine (`runner.http.AiohttpEngine`) sets the encoding of a plain
`type/subtype; charset=x` Content-Type itself (`plain_charset`). Nothing here imports an engine.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

import httpx
from httpx._types import CookieTypes

__all__ = ["HandlerClient", "LeanCookies", "plain_charset"]

_PLAIN_CHARSET = re.compile(r"[\w.+-]+/[\w.+-]+[ \t]*;[ \t]*charset=([\w.:-]+)[ \t]*", re.IGNORECASE)
"""A Content-Type of one type, one subtype and one unquoted charset parameter (what nearly every server sends)."""


def plain_charset(response: httpx.Response) -> None:
    """Set `response.encoding` from a plain `type/subtype; charset=x` Content-Type, as httpx would find it, without
    its email parser (about 30 µs a page of `response.text`); any other form is left to httpx."""
    content_type = response.headers.get("content-type")
    if content_type is not None and (found := _PLAIN_CHARSET.fullmatch(content_type)) is not None:
        try:
            codecs.lookup(found.group(1))
        except LookupError:
            return  # httpx falls back to the client's default for an unknown charset
        response.encoding = found.group(1).lower()  # as the email parser gives it


class LeanCookies(httpx.Cookies):
    """httpx's cookie store, which reads a response only when it sets a cookie: httpx wraps every response and its
    request for `http.cookiejar` first, about 50 µs a page, to find no `Set-Cookie` in most of them."""

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


class HandlerClient(httpx.AsyncClient):
    """`httpx.AsyncClient` with `LeanCookies` as its cookie store (the handlers' shared client): same API, same
    cookies kept and sent."""

    def __init__(self, *, cookies: CookieTypes | None = None, **kwargs: Any) -> None:
        super().__init__(cookies=cookies, **kwargs)
        self._lean_cookies = LeanCookies(cookies)

    @property
    def cookies(self) -> httpx.Cookies:
        """The cookies kept from responses, sent with every request (as httpx's own)."""
        return self._lean_cookies

    @cookies.setter
    def cookies(self, cookies: CookieTypes) -> None:
        self._lean_cookies = LeanCookies(cookies)
