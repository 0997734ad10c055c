"""Request ids and default unique keys, as the platform and the Crawlee libraries derive them (API contract §7).

A request's default `uniqueKey` is its URL normalized by a *convention*; workers sharing one queue must use the same
one, or they crawl the URLs the conventions disagree on twice:

- `"headlock"` (`normalize_parts`): scheme and host lower-cased, default port, fragment and `utm_*` parameters
  dropped, the query sorted by key (stable), one trailing `/` dropped. Path and query keep their case.
- `"crawlee-python"`: crawlee-python's `compute_unique_key` for a GET request (its `normalize_url`, over yarl): also
  lower-cases the whole key (path, query and percent-escapes; after sorting, so `Q` sorts before `b`), resolves
  `.`/`..`, converts IDN hosts to punycode, sorts repeated keys by value and keeps `/?` when the path is the root.
- `"crawlee-js"`: Crawlee JS's `Request` (`normalizeUrl` of `@apify/utilities`, over WHATWG `URL`): like headlock,
  but it also resolves `.`/`..`, converts IDN hosts to punycode, drops the user info and percent-encodes the path
  and the query as browsers do.

Every convention drops the fragment (the libraries' `keepUrlFragment` is off by default). The libraries key a request
by its normalized URL whatever its method, headers and payload unless `useExtendedUniqueKey` is set, so these
conventions hold for every request headlock adds. Where a library cannot parse a URL its key is the URL itself; here
it is the URL as split (scheme lower-cased, an empty `?` or `#` dropped).
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Callable
from ipaddress import IPv6Address, ip_address
from typing import Literal, get_args
from urllib.parse import SplitResult, parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

import idna  # a dependency of httpx and anyio, imported by them already

from runner.errors import ConfigError

__all__ = [
    "KeyConvention",
    "KeyMemo",
    "UniqueKeyFunction",
    "has_host",
    "normalize_parts",
    "normalize_url",
    "request_id_for",
    "unique_key_function",
]

KeyConvention = Literal["headlock", "crawlee-python", "crawlee-js"]
"""How a request's default `uniqueKey` is derived from its URL."""
UniqueKeyFunction = Callable[[SplitResult], str]
"""The default `uniqueKey` of an absolute http(s) URL already split (and checked) by the caller."""

REQUEST_ID_LENGTH = 15


class KeyMemo:
    """The `uniqueKey` of each URL text met before in this run, so a link seen again is not split and normalized
    again (most links a crawl finds are); bounded, the oldest forgotten first. One per run: one key convention."""

    __slots__ = ("_keys", "_size", "get")

    def __init__(self, size: int = 100_000) -> None:
        self._keys: dict[str, str] = {}
        self._size = size
        self.get: Callable[[str], str | None] = self._keys.get
        """The key remembered for exactly this text, if any: the dict's own `get` (asked for every link a crawl
        finds, it costs no Python call)."""

    def put(self, url: str, key: str) -> None:
        """Remember `key` for the text `url`."""
        keys = self._keys
        keys[url] = key
        if len(keys) > self._size:
            del keys[next(iter(keys))]


_DEFAULT_PORTS = {"http": 80, "https": 443}
_PATH_SAFE = "/%:@!$&'()*+,;=~"
"""What `quote` leaves as it is in a path besides letters, digits and `_.-~` (the headlock convention)."""
_SAFE_PATH = re.compile(r"[A-Za-z0-9_.\-~/%:@!$&'()*+,;=]*").fullmatch
"""A path `quote(path, safe=_PATH_SAFE)` returns unchanged."""
_PLAIN_PORT = re.compile(r"[^:@\[\]]*(?::[0-9]{1,5})?").fullmatch
"""A netloc that is a host, or a host and a port of ASCII digits."""


def request_id_for(unique_key: str) -> str:
    """Return the platform's request id for `unique_key`: base64(sha256) without `+/=`, first 15 chars."""
    # bytes.translate deletes in C: a fifth of the cost of str.translate with a dict, on every request stored.
    digest = base64.b64encode(hashlib.sha256(unique_key.encode()).digest())
    return digest.translate(None, b"+/=")[:REQUEST_ID_LENGTH].decode()


def unique_key_function(convention: KeyConvention) -> UniqueKeyFunction:
    """The function that gives a URL's default `uniqueKey` under `convention`.

    Raises:
        ConfigError: an unknown convention.
    """
    try:
        return _CONVENTIONS[convention]
    except KeyError:
        allowed = ", ".join(get_args(KeyConvention))
        raise ConfigError(
            f"unknown uniqueKey convention {convention!r} (queue.unique_keys): must be one of {allowed}"
        ) from None


def normalize_url(url: str, convention: KeyConvention = "headlock") -> str:
    """Return the default unique key of `url` (stripped first) under `convention` (see the module docstring).

    Defined for absolute http(s) URLs, which is what `make_draft` and `Context.enqueue` accept.

    Raises:
        ConfigError: an unknown convention.
        ValueError: a URL that cannot be split (e.g. an unclosed `[`).
    """
    return unique_key_function(convention)(urlsplit(url.strip()))


def has_host(parts: SplitResult) -> bool:
    """Whether `parts` name a host (`parts.hostname`), read from a plain `host[:digits]` netloc directly."""
    netloc = parts.netloc
    if _PLAIN_PORT(netloc) is None:
        return bool(parts.hostname)
    return netloc[:1] not in ("", ":")


def normalize_parts(parts: SplitResult) -> str:
    """The headlock convention: `normalize_url` of a URL already split (by a caller that checked its parts).

    Runs on every link a crawl finds: keep it lean.
    """
    scheme = parts.scheme.lower()
    netloc = parts.netloc.lower()
    if _PLAIN_PORT(netloc) is None:  # user info, brackets, several colons: the standard library decides
        try:
            port = parts.port
        except ValueError:
            port = None
    else:  # `host` or `host:digits`: what `SplitResult.port` finds there, without its parse of the netloc
        text = netloc.partition(":")[2]
        port = int(text) if text and int(text) <= 65535 else None
    if port is not None and port == _DEFAULT_PORTS.get(scheme):
        netloc = netloc.rsplit(":", 1)[0]
    query = ""
    if parts.query:  # most links have none: skip the parse
        pairs = (pair for pair in parse_qsl(parts.query, keep_blank_values=True) if not pair[0].startswith("utm_"))
        query = urlencode(sorted(pairs, key=lambda pair: pair[0]))
    path = parts.path
    if _SAFE_PATH(path) is None:  # most paths have nothing to escape: `quote` would return them as they are
        path = quote(path, safe=_PATH_SAFE)
    path = path[:-1] if path.endswith("/") else path
    if not netloc:  # not a URL `make_draft` accepts: as the standard library puts it together
        return urlunsplit((scheme, netloc, path, query, ""))
    # `urlunsplit` of these parts, which have a scheme and a netloc (`make_draft` checked the host).
    url = f"{scheme}://{netloc}{path if not path or path[0] == '/' else '/' + path}"
    return f"{url}?{query}" if query else url


# -- crawlee-python ----------------------------------------------------------------------------------------------
# crawlee-python 1.11.0 (`crawlee/_utils/requests.py`): `str(URL(url).with_query(sorted(pairs without utm_))
# .with_path(path.removesuffix("/"))).lower()`, and the URL itself when yarl raises. What follows ports the parts of
# yarl 1.25 that this touches: its quoters (`_quoting_py.py`), dot-segment removal (`_path.py`), netloc splitting
# and host encoding (`_parse.py`, `_url.py`).

_YARL_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_YARL_ALLOWED = _YARL_UNRESERVED + "!$'()*,"
_YARL_QS = "+&=;"
_YARL_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
_YARL_REQUIRES_HOST = frozenset(_YARL_DEFAULT_PORTS)
# Hosts yarl refuses rather than let IDNA delete these code points silently (its `_DEFAULT_IGNORABLE_RE`).
_YARL_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f-\u1160\u17b4-\u17b5\u1806\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
_ESCAPE_RUNS = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def _percent_encode(text: str, *, errors: str = "strict") -> str:
    """`text` as `%XX` escapes of its UTF-8 bytes."""
    return "".join(f"%{byte:02X}" for byte in text.encode("utf-8", errors))


def _yarl_quoter(safe: str, protected: str = "", *, qs: bool = False, requote: bool) -> Callable[[str], str]:
    """yarl's `_Quoter`: `%XX` escapes are upper-cased, and decoded when they stand for a safe, unprotected
    character (`requote`); any other `%` becomes `%25`; characters outside the safe set are UTF-8 escaped."""
    allowed = safe + _YARL_ALLOWED + ("" if qs else _YARL_QS) + protected
    unsafe = f"[^{re.escape(allowed)}]"
    pattern = re.compile(f"%[0-9A-Fa-f]{{2}}|{unsafe}" if requote else unsafe)

    def replace(match: re.Match[str]) -> str:
        text = match.group()
        if len(text) == 3:  # an escape (only requoting matches three characters)
            char = chr(int(text[1:], 16))
            return char if char in allowed and char not in protected else text.upper()
        if qs and text == " ":
            return "+"
        return _percent_encode(text, errors="ignore")  # yarl drops what UTF-8 cannot encode (lone surrogates)

    def quoter(text: str) -> str:
        return pattern.sub(replace, text)

    return quoter


_PATH_REQUOTE = _yarl_quoter("@:", "/+", requote=True)
_PATH_QUOTE = _yarl_quoter("@:", "/+", requote=False)
_QUERY_REQUOTE = _yarl_quoter("?/:@", "=+&;", qs=True, requote=True)
_QUERY_PART_QUOTE = _yarl_quoter("?/:@", qs=True, requote=False)
_USER_REQUOTE = _yarl_quoter("", requote=True)


def _yarl_unquote(text: str, *, plus: bool = False) -> str:
    """yarl's `_Unquoter`: escapes decoded as UTF-8; with `plus` (`UNQUOTER_PLUS`) `+` is a space and invalid
    UTF-8 becomes U+FFFD, else (`UNQUOTER`) invalid escapes are kept as they are."""
    if plus:
        text = text.replace("+", " ")
    if "%" not in text:
        return text

    def decode(match: re.Match[str]) -> str:
        run = match.group()
        data = bytes.fromhex(run.replace("%", ""))
        if plus:
            return data.decode("utf-8", "replace")
        out, at = [], 0  # `at`: the byte of `data` that `char` starts at; each byte is three characters of `run`
        for char in data.decode("utf-8", "surrogateescape"):
            if "\udc80" <= char <= "\udcff":  # a byte that is not valid UTF-8 here: its escape stays
                out.append(run[3 * at : 3 * at + 3])
                at += 1
            else:
                out.append(char)
                at += len(char.encode())
        return "".join(out)

    return _ESCAPE_RUNS.sub(decode, text)


def _yarl_normalize_path(path: str) -> str:
    """yarl's `normalize_path`: `.` and `..` segments removed (RFC 3986 §5.2.4), a final one leaves a `/`."""
    prefix = ""
    if path.startswith("/"):
        prefix, path = "/", path[1:]
    segments = path.split("/")
    resolved: list[str] = []
    for segment in segments:
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment != ".":
            resolved.append(segment)
    if segments[-1] in {".", ".."}:
        resolved.append("")
    return prefix + "/".join(resolved)


def _yarl_host(host: str) -> str:
    """yarl's `_encode_host` (without validation, as `URL(str)` calls it).

    Raises:
        ValueError: a host with a default-ignorable code point, or one IDNA cannot encode.
    """
    if host and (host[-1].isdigit() or ":" in host):
        separator = "%25" if "%25" in host else "%"
        raw_ip, sep, zone = host.partition(separator)
        try:
            ip = ip_address(raw_ip)
        except ValueError:
            pass
        else:
            address = ip.compressed
            if ip.version == 6:
                return f"[{address}{sep}{zone}]"
            return f"{address}{sep}{zone}"
    if host.isascii():
        return host.lower()
    if _YARL_IGNORABLE.search(host):
        raise ValueError(f"host {host!r} has a default-ignorable code point")
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except UnicodeError:
        return host.encode("idna").decode("ascii")


def _yarl_split_netloc(netloc: str) -> tuple[str | None, str | None, str | None, int | None]:
    """yarl's `split_netloc`: (user, password, host, port), after its `split_url` checks of the netloc.

    Raises:
        ValueError: a backslash, delimiters that NFKC makes appear, a port that is no integer in 0-65535.
    """
    if "\\" in netloc:
        raise ValueError("backslash in the authority")
    if not netloc.isascii():
        # As yarl's `_check_netloc`: IDNA's NFKC must not make delimiters (or a `%`) appear.
        plain = netloc.replace("@", "").replace(":", "").replace("#", "").replace("?", "")
        normalized = unicodedata.normalize("NFKC", plain)
        if normalized != plain and any(char in normalized for char in "/?#@:%"):
            raise ValueError("netloc with delimiters under NFKC")
    if not (":" in netloc or "@" in netloc or "[" in netloc):
        return None, None, netloc, None
    user = password = None
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at:
        user, has_password, password = userinfo.partition(":")
        password = password if has_password else None
    if hostinfo.startswith("["):
        host, _, port_text = hostinfo[1:].partition("]")
        port_text = port_text.partition(":")[2]
    else:
        host, _, port_text = hostinfo.partition(":")
    port = None
    if port_text:
        port = int(port_text)  # as lenient as yarl: " 8_0" is 80
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
    return user or None, password, host or None, port


def _yarl_netloc(netloc: str, scheme: str) -> str:
    """The netloc as `str(yarl.URL)` renders it: user info requoted, host encoded, a default port dropped.

    Raises:
        ValueError: what makes yarl refuse the URL (see `_yarl_split_netloc`; no host).
    """
    user, password, host, port = _yarl_split_netloc(netloc)
    if host is None:
        if scheme in _YARL_REQUIRES_HOST:
            raise ValueError("no host")
        host = ""
    rendered = _yarl_host(host)
    if port is not None and port != _YARL_DEFAULT_PORTS.get(scheme):
        rendered = f"{rendered}:{port}"
    if password is not None:
        return f"{_USER_REQUOTE(user) if user else ''}:{_USER_REQUOTE(password) if password else ''}@{rendered}"
    return f"{_USER_REQUOTE(user)}@{rendered}" if user else rendered


def _crawlee_python_key(parts: SplitResult) -> str:
    """The crawlee-python convention (see the module docstring); the URL itself where yarl refuses it."""
    scheme = parts.scheme
    try:
        netloc = _yarl_netloc(parts.netloc, scheme)
    except ValueError:
        return urlunsplit(parts)  # crawlee-python logs "Failed to normalize URL" and keys by the URL
    path = parts.path
    if path:
        path = _PATH_REQUOTE(path)
        if netloc and "." in path:
            path = _yarl_normalize_path(path)
    path = (_yarl_unquote(path) if path else "/" if netloc else "").removesuffix("/")
    path = _PATH_QUOTE(path)
    if netloc and "." in path:
        path = _yarl_normalize_path(path)
    if path and not path.startswith("/"):
        path = "/" + path
    query = ""
    if parts.query:
        pairs = []
        for field in _QUERY_REQUOTE(parts.query).split("&"):
            if field:
                name, _, value = field.partition("=")
                if not (name := _yarl_unquote(name, plus=True)).startswith("utm_"):
                    pairs.append((name, _yarl_unquote(value, plus=True)))
        query = "&".join(f"{_QUERY_PART_QUOTE(name)}={_QUERY_PART_QUOTE(value)}" for name, value in sorted(pairs))
    if query:
        return f"{scheme}://{netloc}{path or '/'}?{query}".lower()
    return f"{scheme}://{netloc}{path}".lower()


# -- Crawlee JS ---------------------------------------------------------------------------------------------------
# Crawlee JS 3.18 (`packages/core/src/request.ts`): `normalizeUrl(url, keepUrlFragment) || url`, where
# `@apify/utilities` 2.35 `normalizeUrl` is `${protocol}//${host}${pathname without one final /}?${searchParams
# sorted, without utm_*}` of a WHATWG `URL` (as Node 20 parses it), and null when `new URL` throws. What follows is
# that parser for http(s) URLs, as the spec has it. Not ported: IDNA's CheckBidi and CheckJoiners rules (a host they
# reject gets a punycode key here and the URL itself there), and a bug of Node 20's parser (Ada 2.9, ada-url/ada#935,
# fixed in Ada 3.2.3): in a path with nothing to escape, no `%` and no `\`, whose first `/.` starts a segment that is
# no dot segment (`/a/.b/../c`), the dot segments stay.

_WHATWG_DOUBLE_DOTS = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})
_WHATWG_SINGLE_DOTS = frozenset({".", "%2e"})
# The path percent-encode set as Node 20 has it: C0 controls, space, " # < > ? ` { } and everything above `~`.
_WHATWG_PATH_UNSAFE = re.compile('[\x00-\x20"#<>?`{}\x7f-\U0010ffff]')
_FORBIDDEN_DOMAIN = re.compile("[\x00-\x20#%/:<>?@\\[\\\\\\]^|\x7f]")
# A last label that makes the host an IPv4 address: all digits, or what the IPv4 number parser takes as hex.
_ENDS_IN_NUMBER = re.compile("[0-9]+|0[xX][0-9A-Fa-f]*")
_IPV4_PART = {8: re.compile("[0-7]*"), 10: re.compile("[0-9]*"), 16: re.compile("[0-9A-Fa-f]*")}


def _usv(text: str) -> str:
    """`text` as a JS USVString: lone surrogates replaced by U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _escape_match(match: re.Match[str]) -> str:
    """A matched character as its UTF-8 `%XX` escapes."""
    return _percent_encode(match.group())


def _ipv4_number(text: str) -> int:
    """One part of an IPv4 host: decimal, `0x` hex or `0` octal (WHATWG's IPv4 number parser).

    Raises:
        ValueError: not a number.
    """
    if not text:
        raise ValueError("empty IPv4 part")
    radix = 10
    if text[:2] in {"0x", "0X"}:
        text, radix = text[2:], 16
    elif len(text) >= 2 and text[0] == "0":
        text, radix = text[1:], 8
    if not _IPV4_PART[radix].fullmatch(text):
        raise ValueError("not an IPv4 number")
    return int(text, radix) if text else 0


def _whatwg_ipv4(host: str) -> str | None:
    """The IPv4 address `host` stands for, dotted, or None for a domain (one whose last label is no number).

    Raises:
        ValueError: a host ending in a number that is no IPv4 address.
    """
    labels = host.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()
    if not _ENDS_IN_NUMBER.fullmatch(labels[-1]):
        return None
    if len(labels) > 4:
        raise ValueError("not an IPv4 address")
    numbers = [_ipv4_number(label) for label in labels]
    if any(number > 255 for number in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError("IPv4 part out of range")
    address = numbers[-1] + sum(number << (8 * (3 - index)) for index, number in enumerate(numbers[:-1]))
    return ".".join(str(address >> shift & 255) for shift in (24, 16, 8, 0))


def _whatwg_ipv6(text: str) -> str:
    """An IPv6 literal serialized as WHATWG does: lower-case hex, the first longest run of 2+ zero pieces as `::`.

    Raises:
        ValueError: not an IPv6 address (zone ids are not allowed).
    """
    if "%" in text:
        raise ValueError("IPv6 zone id")
    value = int(IPv6Address(text))
    pieces = [value >> (16 * (7 - index)) & 0xFFFF for index in range(8)]
    best_start, best_length, index = -1, 1, 0
    while index < 8:
        length = 0
        while index + length < 8 and pieces[index + length] == 0:
            length += 1
        if length > best_length:
            best_start, best_length = index, length
        index += length or 1
    hexes = [f"{piece:x}" for piece in pieces]
    if best_start < 0:
        return ":".join(hexes)
    return ":".join(hexes[:best_start]) + "::" + ":".join(hexes[best_start + best_length :])


def _whatwg_label(label: str) -> str:
    """One label of a mapped domain as ASCII.

    Raises:
        ValueError: an `xn--` label that does not decode to a valid label.
    """
    if not label.isascii():
        return "xn--" + label.encode("punycode").decode("ascii")
    if label.startswith("xn--"):
        decoded = label[4:].encode("ascii").decode("punycode")  # UnicodeError is a ValueError
        if not decoded or decoded.isascii() or idna.uts46_remap(decoded, std3_rules=False) != decoded:
            raise ValueError(f"invalid punycode label {label!r}")
    return label


def _whatwg_domain(host: str) -> str:
    """WHATWG's host parser for a special URL: percent-decoded, IDNA-mapped and punycoded, IPv4 normalized.

    Raises:
        ValueError: what makes `new URL` throw (forbidden code points, bad IPv4/IPv6, a host IDNA refuses).
    """
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("unclosed IPv6 literal")
        return f"[{_whatwg_ipv6(host[1:-1])}]"
    if "%" in host:
        host = _percent_decode(host)
    if host.isascii():
        domain = host.lower()
        if "xn--" in domain:
            domain = ".".join(_whatwg_label(label) for label in domain.split("."))
    else:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)  # IDNAError is a ValueError
        domain = ".".join(_whatwg_label(label) for label in mapped.split("."))
    if not domain or _FORBIDDEN_DOMAIN.search(domain):
        raise ValueError(f"forbidden host {domain!r}")
    ipv4 = _whatwg_ipv4(domain)
    return domain if ipv4 is None else ipv4


def _percent_decode(text: str) -> str:
    """WHATWG percent-decode then UTF-8 decode with replacement (a `%` that starts no escape stays)."""

    def decode(match: re.Match[str]) -> str:
        return bytes.fromhex(match.group().replace("%", "")).decode("utf-8", "replace")

    return _ESCAPE_RUNS.sub(decode, text)


def _whatwg_host(netloc: str, scheme: str) -> str:
    """`URL.host` of a special URL's authority: the user info dropped, the port normalized.

    Raises:
        ValueError: a host or port `new URL` refuses.
    """
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = (hostport[: end + 1], hostport[end + 1 :]) if end >= 0 else (hostport, "")
        if rest and not rest.startswith(":"):
            raise ValueError("text after an IPv6 literal")
        port_text = rest[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError("empty host")
    rendered = _whatwg_domain(host)
    if port_text:
        if not port_text.isascii() or not port_text.isdigit():
            raise ValueError(f"port {port_text!r} is not a number")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"port {port} out of range")
        if port != _DEFAULT_PORTS.get(scheme):
            rendered = f"{rendered}:{port}"
    return rendered


def _whatwg_path(path: str) -> str:
    """`URL.pathname` of a special URL: `.`/`..` (also as `%2e`) resolved, the path percent-encode set escaped."""
    if not path.isascii():
        path = _usv(path)
    if "/." not in path and "/%2" not in path:  # no segment can be a dot segment (the path starts with a /)
        return _WHATWG_PATH_UNSAFE.sub(_escape_match, path) or "/"
    segments = path[1:].split("/") if path.startswith("/") else path.split("/")
    resolved: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        folded = segment.lower() if "%" in segment else segment
        if folded in _WHATWG_DOUBLE_DOTS:
            if resolved:
                resolved.pop()
            if index == last:
                resolved.append("")
        elif folded in _WHATWG_SINGLE_DOTS:
            if index == last:
                resolved.append("")
        else:
            resolved.append(_WHATWG_PATH_UNSAFE.sub(_escape_match, segment))
    return "/" + "/".join(resolved)


def _form_encode(text: str) -> str:
    """application/x-www-form-urlencoded, as `URLSearchParams` serializes: only `*-._` and alphanumerics stay."""
    return quote_plus(text, safe="*").replace("~", "%7E")


def _utf16_order(pair: tuple[str, str]) -> bytes:
    """The sort key `URLSearchParams.sort` uses: the name's UTF-16 code units."""
    return pair[0].encode("utf-16-be", "surrogatepass")


def _crawlee_js_key(parts: SplitResult) -> str:
    """The Crawlee JS convention (see the module docstring); the URL itself where `new URL` throws."""
    scheme, netloc, path = parts.scheme, parts.netloc, parts.path
    if "\\" in netloc or "\\" in path:  # a path separator in special URLs, so it may end the authority too
        netloc, slash, rest = (netloc + path).replace("\\", "/").partition("/")
        path = slash + rest
    try:
        host = _whatwg_host(netloc, scheme)
    except ValueError:
        return urlunsplit(parts)  # normalizeUrl returns null and Crawlee keys by the URL
    path = _whatwg_path(path).removesuffix("/")
    query = ""
    if parts.query:
        text = parts.query if parts.query.isascii() else _usv(parts.query)
        pairs = [pair for pair in parse_qsl(text, keep_blank_values=True) if not pair[0].startswith("utm_")]
        query = "&".join(
            f"{_form_encode(name)}={_form_encode(value)}" for name, value in sorted(pairs, key=_utf16_order)
        )
    return f"{scheme}://{host}{path}?{query}" if query else f"{scheme}://{host}{path}"


_CONVENTIONS: dict[str, UniqueKeyFunction] = {
    "headlock": normalize_parts,
    "crawlee-python": _crawlee_python_key,
    "crawlee-js": _crawlee_js_key,
}
