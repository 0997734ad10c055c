"""Regenerate `generated.json`: the default uniqueKey that crawlee-python and Crawlee JS give each URL in `URLS`.

The libraries run outside the repo (tests need neither). From the repo root:

    python3 -m venv /tmp/crawlee-venv && /tmp/crawlee-venv/bin/pip install crawlee==1.11.0
    mkdir -p /tmp/crawlee-js && (cd /tmp/crawlee-js && npm init -y && npm install @crawlee/core@3.18.1)
    .venv/bin/python tests/data/uniquekeys/generate.py \
        --python /tmp/crawlee-venv/bin/python --node-modules /tmp/crawlee-js/node_modules

Each library computes the key as its `Request` does for a GET request built from the URL alone:
crawlee-python `Request.from_url(url).unique_key`, Crawlee JS `new Request({ url }).uniqueKey`. The `headlock` column
is what headlock's default convention gave at generation time (a snapshot, not a published behaviour).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from runner.uniquekey import normalize_url

OUT = Path(__file__).with_name("generated.json")

# (what the URL exercises, the URL as a crawl would enqueue it)
URLS: list[tuple[str, str]] = [
    ("case in scheme, host, path and query", "HTTP://www.EXAMPLE.com/Some/Path/?Query=Value"),
    ("trailing slash", "https://example.com/a/b/"),
    ("root path with a query", "https://example.com/?b=2&a=1"),
    ("no path, with a query", "https://example.com?b=2&a=1"),
    ("root path only", "https://example.com/"),
    ("two trailing slashes", "https://example.com/a//"),
    ("double slash in the path", "https://example.com//a"),
    ("default http port", "http://example.com:80/a"),
    ("default https port", "https://example.com:443/a"),
    ("non-default port", "https://example.com:8443/a"),
    ("http's default port on https", "https://example.com:80/a"),
    ("default port with leading zeros", "http://example.com:0080/a"),
    ("empty port", "http://example.com:/a"),
    ("port out of range", "http://example.com:65536/a"),
    ("fragment", "https://example.com/a#section"),
    ("hash-bang fragment", "https://example.com/#!/route?x=1"),
    ("utm parameters", "https://example.com/a?utm_source=x&utm_medium=y&id=5"),
    ("only utm parameters", "https://example.com/a?utm_campaign=z"),
    ("upper-case UTM parameter", "https://example.com/a?UTM_source=x&id=5"),
    ("repeated keys", "https://example.com/a?tag=b&tag=a&x=1"),
    ("repeated keys after another key", "https://example.com/a?b=2&a=3&a=1"),
    ("empty values and a key without =", "https://example.com/a?empty=&flag&x=1"),
    ("empty pairs", "https://example.com/a?&&x=1&"),
    ("empty query", "https://example.com/a?"),
    ("empty key", "https://example.com/a?=v"),
    ("= in a value", "https://example.com/?a=b=c"),
    ("case of keys in sort order", "https://example.com/?b=1&B=2&a=3"),
    ("non-ASCII keys in sort order (UTF-16 vs code points)", "https://example.com/?é=1&z=2&😀=3&ﬁ=4"),
    ("encoded slash and space in the path", "https://example.com/a%2Fb/c%20d"),
    ("lower-case percent-escapes", "https://example.com/%7euser/%e2%82%ac?q=%7e%2b"),
    ("escaped unreserved characters in the path", "https://example.com/%41%42c"),
    ("+ and %20 in the query", "https://example.com/s?q=a+b&r=a%20b"),
    ("+ in the path", "https://example.com/a+b"),
    ("raw spaces", "https://example.com/a b?q=c d"),
    ("non-ASCII path and query", "https://example.com/café/naïve?q=ü"),
    ("emoji in the path", "https://example.com/😀"),
    ("encoded # in a value", "https://example.com/?a=%23b"),
    ("encoded = in a key", "https://example.com/?a%3Db=c"),
    ("* ~ ! ' ( ) in the query", "https://example.com/a?x=*~&y=!'()"),
    ("; in the query", "https://example.com/a?a=1;b=2"),
    ("; path parameters", "https://example.com/a;jsessionid=ABC/b"),
    ("@ and : in the path", "https://example.com/maps/@39.1,39.5,4z/x:y"),
    ("invalid percent-escapes", "https://example.com/a%zz?b=%zz"),
    ("escapes that are not UTF-8", "https://example.com/a%FF?b=%FF"),
    ("[ ] | ^ in the path", "https://example.com/a[1]|b^c"),
    ("quotes in the path", 'https://example.com/it\'s/"q"'),
    ("braces and backtick in the path", "https://example.com/{a}/`b`"),
    ("backslashes", "https://example.com\\a\\b"),
    ("backslash after a mixed-case host", "https://Example.com\\A"),
    ("IDN host", "https://bücher.example/katalog"),
    ("upper-case IDN host", "https://MÜNCHEN.de/"),
    ("punycode host", "https://xn--bcher-kva.example/katalog"),
    ("ß in the host", "https://straße.de/"),
    ("symbol host", "https://☃.net/"),
    ("percent-encoded host", "https://ex%41mple.com/"),
    ("xn-- label that is no punycode", "https://xn--a.com/"),
    ("full-width digits in the host", "https://１２３.com/"),
    ("NFKC of the netloc makes a % appear", "https://u%20x@１２３.com/"),
    ("a host IDNA maps to a %", "https://a﹪b.com/"),
    ("space in the host", "https://exa mple.com/"),
    ("trailing dot in the host", "https://example.com./a"),
    ("dot segments", "https://example.com/a/./b/../c"),
    ("dot segments and a raw space", "https://example.com/a b/./c"),
    ("dot segment at the end", "https://example.com/a/b/.."),
    ("encoded dot segments", "https://example.com/a/%2e%2E/b"),
    ("encoded dot segment at the end", "https://example.com/a/b/%2e%2e"),
    ("dot segment after an empty segment", "https://example.com/a//."),
    ("dot-file segment before a dot segment", "https://example.com/a/.well-known/../b"),
    ("user info", "https://User:Pass@Example.com/a"),
    ("password-only user info", "https://:secret@example.com/a"),
    ("user name without a password", "https://User@Example.com/a"),
    ("IPv4 host and port", "http://192.168.0.1:8080/a"),
    ("hex IPv4 host", "http://0x7f.0.0.1/"),
    ("octal IPv4 host", "http://0177.0.0.1/"),
    ("hex last label in an IPv4 host", "http://127.0.0.0x1/"),
    ("short IPv4 host", "http://127.1/"),
    ("IPv6 host", "http://[2001:DB8::1]/a"),
    ("IPv6 host, default port", "http://[2001:db8:0:0:1:0:0:1]:80/"),
    ("IPv4-mapped IPv6 host", "http://[::ffff:1.2.3.4]/"),
    ("IPv6 host with two zero runs", "http://[1:0:0:2:0:0:0:3]/"),
    ("surrounding whitespace", "  https://example.com/a  "),
    ("tab and newline inside", "https://exam\tple.com/a\nb"),
]

_PYTHON = """
import json, sys
from importlib.metadata import version
from crawlee import Request
keys = []
for url in json.load(sys.stdin):
    try:
        keys.append(Request.from_url(url).unique_key)
    except Exception as exc:
        keys.append({"error": f"{type(exc).__name__}: {exc}"})
versions = {name: version(name) for name in ("crawlee", "yarl", "idna")}
versions["python"] = sys.version.split()[0]
json.dump({"versions": versions, "keys": keys}, sys.stdout)
"""

_NODE = """
const fs = require('fs');
const path = require('path');
const { Request } = require('@crawlee/core');
const urls = JSON.parse(fs.readFileSync(0, 'utf8'));
const keys = urls.map((url) => {
    try {
        return new Request({ url }).uniqueKey;
    } catch (err) {
        return { error: String(err && err.message) };
    }
});
const versions = { node: process.version };
for (const name of ['@crawlee/core', '@apify/utilities']) {
    const manifest = path.join(process.env.NODE_PATH, name, 'package.json');
    versions[name] = JSON.parse(fs.readFileSync(manifest, 'utf8')).version;
}
process.stdout.write(JSON.stringify({ versions, keys }));
"""


def _run(command: list[str], urls: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run one library's snippet on `urls` (JSON on stdin) and return what it printed (JSON)."""
    done = subprocess.run(command, input=json.dumps(urls), capture_output=True, text=True, check=True, env=env)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def main() -> None:
    """Run both libraries on `URLS` and write `generated.json`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", required=True, help="a Python with crawlee installed")
    parser.add_argument("--node-modules", required=True, help="a node_modules folder with @crawlee/core")
    parser.add_argument("--node", default="node")
    args = parser.parse_args()
    urls = [url for _, url in URLS]
    python = _run([args.python, "-c", _PYTHON], urls)
    node = _run([args.node, "-e", _NODE], urls, env={"NODE_PATH": str(Path(args.node_modules).resolve())})
    cases = [
        {"kind": kind, "url": url, "crawlee-python": py_key, "crawlee-js": js_key, "headlock": normalize_url(url)}
        for (kind, url), py_key, js_key in zip(URLS, python["keys"], node["keys"], strict=True)  # type: ignore[call-overload]
    ]
    document = {
        "about": (
            "Default uniqueKeys of GET requests built from each URL alone, by crawlee-python (Request.from_url) "
            "and Crawlee JS (new Request({url})). Regenerate with generate.py beside this file (its docstring)."
        ),
        "versions": {"crawlee-python": python["versions"], "crawlee-js": node["versions"]},
        "cases": cases,
    }
    OUT.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
