"""The first hour of a new user, through the real CLI: handlers next to the config, the demo site started twice,
URL files with comments, the platform without a token, Ctrl-C in a library script, read-only storage, and the
Docker build context."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from runner import SqliteQueue, request_id_for
from runner.context import make_draft
from tests._server import running_server
from tests.conftest import ROOT, cli_env, free_port, headlock, reaped, wait_for

JSON_LOGS = ("--log-format", "json")


def headlock_as_script(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the CLI as the `headlock` console script runs: the current directory NOT on sys.path (`python -P`)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "runner", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line(stderr: str) -> str:
    """The only line of `stderr` (fails if there are more)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


ITEM_HANDLER = """
async def handle(ctx):
    await ctx.push_data({"url": ctx.url, "from": __name__})
"""


# -- handlers in the current directory ----------------------------------------------------------------------


def test_a_handler_module_in_the_current_directory_is_found(tmp_path: Path) -> None:
    """`--handler mymodule:handle` imports ./mymodule.py although the script's sys.path does not hold the current
    directory (as `python -m` and uvicorn find it)."""
    (tmp_path / "mymodule.py").write_text(ITEM_HANDLER)
    crawl = headlock_as_script(
        "run", "--handler", "mymodule:handle", "--start-url", "https://a.example/", *JSON_LOGS, cwd=tmp_path
    )
    assert crawl.returncode == 0, crawl.stderr
    items = (tmp_path / "storage/datasets/default.jsonl").read_text().splitlines()
    assert [json.loads(line)["from"] for line in items] == ["mymodule"]


def test_a_missing_handler_module_says_where_it_was_looked_for(tmp_path: Path) -> None:
    """A module that is nowhere: exit 2, one line naming it and the current directory searched first."""
    result = headlock_as_script("run", "--handler", "nothere:handle", *JSON_LOGS, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "cannot import module 'nothere'" in line
    assert f"searched {tmp_path.resolve()} first" in line


@pytest.mark.parametrize(
    ("files", "handler"),
    [
        ({"handlers/mine.py": ITEM_HANDLER}, "handlers.mine:handle"),  # a directory without __init__.py loses
        ({"handlers.py": ITEM_HANDLER}, "handlers.crawl:handle"),  # the user's file hides our package
    ],
    ids=["user-dir-shadowed-by-ours", "ours-shadowed-by-user-file"],
)
def test_a_clash_with_headlocks_own_handlers_package_is_explained(
    tmp_path: Path, files: dict[str, str], handler: str
) -> None:
    """The user's `handlers` and headlock's: the error names both, says which was imported and how to rename."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = headlock_as_script("run", "--handler", handler, *JSON_LOGS, cwd=tmp_path)
    assert result.returncode == 2
    error = json.loads(one_line(result.stderr))["error"]
    assert "headlock's own 'handlers'" in error
    assert str((ROOT / "handlers" / "__init__.py").resolve()) in error
    assert str(tmp_path.resolve()) in error
    assert "Rename yours (e.g. my_handlers.py" in error


def test_the_users_handlers_module_wins_in_the_current_directory(tmp_path: Path) -> None:
    """A ./handlers.py with the function asked for is imported (the current directory comes first)."""
    (tmp_path / "handlers.py").write_text(ITEM_HANDLER)
    crawl = headlock_as_script(
        "run", "--handler", "handlers:handle", "--start-url", "https://a.example/", *JSON_LOGS, cwd=tmp_path
    )
    assert crawl.returncode == 0, crawl.stderr
    items = [json.loads(line) for line in (tmp_path / "storage/datasets/default.jsonl").read_text().splitlines()]
    assert [item.get("from") for item in items] == ["handlers"]


# -- the demo site ------------------------------------------------------------------------------------------


def demo_site(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m handlers.demo_site ARGS` to completion (a background site's child outlives it)."""
    return subprocess.run(
        [sys.executable, "-m", "handlers.demo_site", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def listening(port: int) -> bool:
    """Whether a TCP socket listens on `port` (IPv4 or IPv6), from /proc/net/tcp{,6} (state 0A is LISTEN)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return True
    return False


def stop_pid(pid: int) -> None:
    """Stop a background demo site and wait (bounded) until its port is free."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_for(lambda: not _alive(pid), 10, f"demo site {pid} to stop")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


@pytest.fixture
def background_pids() -> Iterator[list[int]]:
    """PIDs of background demo sites a test started; stopped at the end whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        stop_pid(pid)


@pytest.mark.slow
def test_the_demo_site_started_twice_says_it_runs_already(tmp_path: Path, background_pids: list[int]) -> None:
    """The first `--background` start prints its URL, PID and how to stop it and returns; the second finds the
    first one's site on the port, says so with its PID, and exits 0; the site answers throughout."""
    port = free_port()
    first = demo_site("--background", "--port", str(port), "--pages", "20", "--lifetime", "60", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    pid = int(re.search(r"pid (\d+)", first.stdout).group(1))  # type: ignore[union-attr]
    background_pids.append(pid)
    assert f"http://127.0.0.1:{port}/page/0 (20 pages)" in first.stdout
    assert f"stop it with: kill {pid}" in first.stdout

    second = demo_site("--background", "--port", str(port), "--pages", "20", cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    assert f"already running at http://127.0.0.1:{port}/page/0" in second.stdout
    assert f"pid {pid}; stop it with: kill {pid}" in second.stdout
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /page/0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    assert listening(port)
    stop_pid(pid)
    # Stopped as it said: no socket listens on the port any more. Read from the kernel's table: a connect to a free
    # port of the ephemeral range can connect to itself, and a bind can be refused by the closed connection's
    # leftovers (FIN_WAIT), so neither tells a listener apart.
    wait_for(lambda: not listening(port), 10, f"port {port} to stop listening")


def test_the_demo_site_refuses_a_port_held_by_something_else(tmp_path: Path) -> None:
    """A port held by a listener that is no demo site: one line on stderr, exit 1."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = demo_site("--background", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken by something else" in one_line(result.stderr)
    assert result.stdout == ""


def test_the_demo_sites_default_port_is_the_documented_one(tmp_path: Path) -> None:
    """The default port is 8765, the one config/local.toml's start URL and the README use."""
    from handlers.demo_site import DEFAULT_PORT  # noqa: PLC0415 - the constant under test

    assert DEFAULT_PORT == 8765
    assert "127.0.0.1:8765" in (ROOT / "config" / "local.toml").read_text()
    assert "default 8765" in demo_site("--help", cwd=tmp_path).stdout


# -- enqueue --file -----------------------------------------------------------------------------------------


def test_enqueue_file_skips_blank_lines_comments_and_a_bom(tmp_path: Path) -> None:
    """Blank lines, whole-line and trailing `#` comments and a UTF-8 BOM are skipped; a URL's own `#` stays."""
    (tmp_path / "urls.txt").write_bytes(
        "\ufeff# my start pages\n\nhttps://a.example/one  # the first\n"
        "   # indented comment\nhttps://a.example/two#section\n\thttps://a.example/three\t# tabbed\n".encode()
    )
    result = headlock("enqueue", "--file", "urls.txt", *JSON_LOGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stderr.strip().splitlines()[-1])
    assert (done["given"], done["added"]) == (3, 3)
    urls = ["https://a.example/one", "https://a.example/two#section", "https://a.example/three"]
    assert anyio.run(stored_urls, tmp_path / "storage", urls) == urls


async def stored_urls(storage: Path, urls: list[str]) -> list[str | None]:
    """The URL stored for each of `urls`' requests (looked up by its request id), None where there is none."""
    queue = SqliteQueue.open(storage, "default")
    try:
        found = [await queue.get_request(request_id_for(make_draft(url).unique_key)) for url in urls]
        assert (await queue.get_info()).total_request_count == len(urls)
    finally:
        await queue.aclose()
    return [request.url if request else None for request in found]


def test_enqueue_file_names_the_bad_line_and_adds_nothing(tmp_path: Path) -> None:
    """A bad line: `urls.txt:N: not an absolute http(s) URL: ...`, exit 2, nothing enqueued (no queue made)."""
    lines = ["https://a.example/1", "# fine", "", "https://a.example/2", "ftp://a.example/3", "https://a.example/4"]
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    result = headlock("enqueue", "--file", "urls.txt", *JSON_LOGS, cwd=tmp_path)
    assert result.returncode == 2
    error = json.loads(one_line(result.stderr))["error"]
    assert error == "urls.txt:5: not an absolute http(s) URL: 'ftp://a.example/3'"
    assert not (tmp_path / "storage").exists()


def test_enqueue_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    """A missing URL file: one line naming it, exit 2, no traceback."""
    result = headlock("enqueue", "--file", "nope.txt", *JSON_LOGS, cwd=tmp_path)
    assert result.returncode == 2
    assert "enqueue --file: no such file: nope.txt" in one_line(result.stderr)


def test_enqueue_of_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    """Bytes that are not UTF-8: one line naming the file and line, exit 2."""
    (tmp_path / "urls.txt").write_bytes(b"https://a.example/1\nhttps://a.example/\xff\n")
    result = headlock("enqueue", "--file", "urls.txt", *JSON_LOGS, cwd=tmp_path)
    assert result.returncode == 2
    assert "urls.txt:2: not UTF-8 text" in one_line(result.stderr)


def test_enqueue_from_stdin_takes_the_same_rules(tmp_path: Path) -> None:
    """`--file -` reads standard input with the same comment rules; a bad line is `<stdin>:N`."""
    done = subprocess.run(
        [sys.executable, "-m", "runner", "enqueue", "--file", "-", *JSON_LOGS],
        input="https://a.example/1 # one\n\nnot a url\n",
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "<stdin>:3: not an absolute http(s) URL: 'not a url'" in done.stderr


# -- the API backend without a token ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["enqueue", "https://a.example/"], ["export"], ["run", "--handler", "tests.sample_handlers:noop"]],
    ids=["enqueue", "export", "run"],
)
def test_the_platform_without_a_token_is_refused_at_once(tmp_path: Path, command: list[str]) -> None:
    """`--backend apify` against the platform's API with no token: exit 2 within seconds (no retries of an
    unreachable host), one line naming `api.token` and where to set it."""
    started = time.monotonic()
    result = headlock(*command, "--backend", "apify", *JSON_LOGS, cwd=tmp_path, timeout=20)
    assert time.monotonic() - started < 10
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "api.token: required for https://api.apify.com" in line
    assert "APIFY_TOKEN" in line


@pytest.mark.slow
def test_a_server_without_a_token_takes_calls_and_one_with_a_token_refuses_at_once(tmp_path: Path) -> None:
    """`headlock serve` without `--token` takes calls without one; with `--token`, a client without it fails at
    once with the 401 (exit 1, one line), not after retries."""
    api = ["--backend", "apify", *JSON_LOGS]
    with running_server(tmp_path / "open") as url:
        added = headlock("enqueue", "https://a.example/", *api, "--api-base-url", url, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
    with running_server(tmp_path / "closed", token="s3cret") as url:  # noqa: S106 - a test server's token
        started = time.monotonic()
        refused = headlock("enqueue", "https://a.example/", *api, "--api-base-url", url, cwd=tmp_path)
        assert time.monotonic() - started < 10
    assert refused.returncode == 1
    assert " 401 " in one_line(refused.stderr)


# -- Ctrl-C in a library script -----------------------------------------------------------------------------

LIBRARY_SCRIPT = """
import json
import sys
from pathlib import Path

import anyio

from runner import Context, JsonlDataset, SqliteQueue, WorkerSettings, run, stop_on_signals

storage, started, nap = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])


async def handle(ctx: Context) -> None:
    started.write_text(ctx.url)
    await anyio.sleep(nap)
    await ctx.push_data({"url": ctx.url})


async def main() -> None:
    queue = SqliteQueue.open(storage, "default")
    try:
        async with stop_on_signals() as stopper:
            summary = await run(
                queue,
                handle,
                JsonlDataset.open(storage, "default"),
                workers=WorkerSettings(concurrency=1, prefetch=0, grace=20),
                start_urls=[f"https://a.example/{i}" for i in range(3)],
                stopper=stopper,
            )
    finally:
        await queue.aclose()
    print(json.dumps(summary.as_dict()))


anyio.run(main)
"""


def start_library_script(tmp_path: Path, nap: float) -> tuple[subprocess.Popen[str], Path]:
    """Start the library script; return it and the file its first handler writes when it starts."""
    script = tmp_path / "crawl.py"
    script.write_text(LIBRARY_SCRIPT)
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "storage"), str(started), str(nap)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, started


def read_until(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    """Read the child's stdout (structlog's default output: a library script configures no logging) until a line
    holds `text`; return what was read."""
    assert proc.stdout is not None
    read = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while text not in read:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(timeout=left):
                pytest.fail(f"no {text!r} within {timeout} s; read {read!r}")
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"the script ended before {text!r}; read {read!r}")
            read += line
    return read


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_library_script_gracefully(tmp_path: Path, signum: signal.Signals) -> None:
    """Under `stop_on_signals`, a signal mid-crawl lets the in-flight handler finish, leaves the rest pending and
    unlocked, and `run` returns its summary: no KeyboardInterrupt traceback, exit 0."""
    proc, started = start_library_script(tmp_path, nap=1.0)
    with reaped(proc):
        wait_for(started.exists, 30, "the first handler to start")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["reason"] == signum.name
    assert summary["handled"] == 1  # the one in flight finished within the grace
    assert len((tmp_path / "storage/datasets/default.jsonl").read_text().splitlines()) == 1
    status = json.loads(headlock("status", "--json", cwd=tmp_path).stdout)
    assert (status["pending"], status["locked"]) == (2, 0)


@pytest.mark.slow
def test_a_second_signal_cuts_the_grace_short_in_a_library_script(tmp_path: Path) -> None:
    """A second Ctrl-C skips the rest of the 20 s grace: the script ends within seconds, locks released."""
    proc, started = start_library_script(tmp_path, nap=60.0)
    with reaped(proc):
        wait_for(started.exists, 30, "the first handler to start")
        proc.send_signal(signal.SIGINT)
        before = read_until(proc, "shutdown.draining", timeout=30)  # the first one was taken: send the second
        proc.send_signal(signal.SIGINT)
        second = time.monotonic()
        out, err = proc.communicate(timeout=30)
        out = before + out
    assert time.monotonic() - second < 15
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["reason"] == "SIGINT"
    status = json.loads(headlock("status", "--json", cwd=tmp_path).stdout)
    assert status["locked"] == 0


# -- read-only storage --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_only_prefix(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A command prefix that runs the rest with the directory `$RO` read-only.

    As root (whom permissions do not stop) a read-only bind mount in a mount namespace of the child's own
    (`unshare --mount`); otherwise `chmod` suffices and the prefix is empty (the test chmods).
    """
    if os.geteuid() != 0:
        return []
    probe_dir = tmp_path_factory.mktemp("ro-probe")
    prefix = [
        "unshare",
        "--mount",
        "sh",
        "-c",
        'mount --bind "$RO" "$RO" && mount -o remount,bind,ro "$RO" && exec "$@"',
        "sh",
    ]
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only directory")
    probe = subprocess.run(
        [*prefix, "touch", str(probe_dir / "x")],
        env={**os.environ, "RO": str(probe_dir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode == 0 or "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()}")
    return prefix


def _chmod_tree(root: Path, *, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod((0o755 if writable else 0o555) if path.is_dir() else (0o644 if writable else 0o444))


def headlock_read_only(prefix: list[str], read_only: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m runner ARGS` with the tree at `read_only` not writable for it."""
    if not prefix:
        _chmod_tree(read_only, writable=False)
    try:
        return subprocess.run(
            [*prefix, sys.executable, "-m", "runner", *args],
            cwd=cwd,
            env=cli_env(RO=str(read_only)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if not prefix:
            _chmod_tree(read_only, writable=True)


@pytest.mark.parametrize("existing", [False, True], ids=["new-storage", "existing-storage"])
@pytest.mark.parametrize(
    "command",
    [["run", "--handler", "tests.sample_handlers:noop"], ["enqueue", "https://a.example/"]],
    ids=["run", "enqueue"],
)
def test_a_read_only_storage_is_one_line_naming_the_path(
    tmp_path: Path, read_only_prefix: list[str], command: list[str], existing: bool
) -> None:
    """`run` and `enqueue` with a storage directory that cannot be written: exit 2 at once, one line naming the
    directory or file, not an exception group; a storage that holds a queue already is refused too."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if existing:
        made = headlock("enqueue", "--storage-dir", "ro/storage", "https://a.example/0", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    started = time.monotonic()
    result = headlock_read_only(
        read_only_prefix, read_only, *command, "--storage-dir", "ro/storage", *JSON_LOGS, cwd=tmp_path
    )
    assert time.monotonic() - started < 20
    assert result.returncode == 2, result.stderr
    error = json.loads(one_line(result.stderr))["error"]
    assert error.startswith("storage is not writable: ro")
    assert "Read-only file system" in error or "Permission denied" in error


def test_a_read_only_datasets_directory_is_one_line_for_run(tmp_path: Path, read_only_prefix: list[str]) -> None:
    """A writable queue but a read-only datasets directory: `run` stops at open, one line naming the dataset."""
    storage = tmp_path / "storage"
    (storage / "datasets").mkdir(parents=True)
    assert headlock("enqueue", "https://a.example/0", cwd=tmp_path).returncode == 0
    result = headlock_read_only(
        read_only_prefix,
        storage / "datasets",
        "run",
        "--handler",
        "tests.sample_handlers:noop",
        *JSON_LOGS,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    error = json.loads(one_line(result.stderr))["error"]
    assert error.startswith(f"storage is not writable: {Path('storage/datasets/default.jsonl')}")


def test_export_reads_a_read_only_storage_and_names_a_read_only_output(
    tmp_path: Path, read_only_prefix: list[str]
) -> None:
    """Exporting needs no write to the storage: it works read-only; `-o` into a read-only directory is one line,
    exit 2."""
    storage = tmp_path / "ro" / "storage"
    (storage / "datasets").mkdir(parents=True)
    (storage / "datasets" / "default.jsonl").write_text('{"a": 1}\n')
    read_only = tmp_path / "ro"
    exported = headlock_read_only(read_only_prefix, read_only, "export", "--storage-dir", str(storage), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == '{"a": 1}\n'
    refused = headlock_read_only(
        read_only_prefix, read_only, "export", "--storage-dir", str(storage), "-o", "ro/out.csv", *JSON_LOGS,
        cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2
    error = json.loads(one_line(refused.stderr))["error"]
    assert error.startswith("export: cannot write ro/out.csv:")


# -- the Docker build context -------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated relative paths (Docker's patternmatcher rules:
    `*` and `?` within one segment, `**` across segments, `[...]` classes)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def build_context(root: Path) -> list[Path]:
    """The files `docker build root` would send, per root/.dockerignore (a path is left out when it or one of
    its parent directories matches; the last matching pattern wins, `!` re-includes)."""
    rules = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            cleaned = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            rules.append((negated, _pattern_regex(cleaned)))

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for negated, regex in rules:
            if any(regex.match(candidate) for candidate in candidates):
                verdict = not negated
        return verdict

    kept = []
    for directory, dirs, files in os.walk(root):
        here = Path(directory).relative_to(root)
        dirs[:] = [d for d in dirs if not (excluded((here / d).as_posix()) and not _has_exception(rules))]
        kept += [here / f for f in files if not excluded((here / f).as_posix())]
    return kept


def _has_exception(rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    return any(negated for negated, _ in rules)


def test_the_build_context_leaves_out_environments_state_and_caches(tmp_path: Path) -> None:
    """With the project's .dockerignore, a checkout's virtualenv, storage, git data, caches and test output are not
    sent to the daemon; the files the Dockerfile copies are."""
    shutil.copy(ROOT / ".dockerignore", tmp_path / ".dockerignore")
    left_out = [
        ".venv/lib/python3.11/site-packages/big.py",
        ".git/objects/pack/pack.pack",
        "storage/request_queues/default.sqlite",
        "storage/datasets/default.jsonl",
        "runner/__pycache__/open.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/0.1/x",
        "headlock.egg-info/PKG-INFO",
        "tests/sdk_actor/storage/key_value_stores/default/INPUT.json",
        "tests/test_x.py",
        ".env",
    ]
    kept = [
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "Dockerfile",
        "runner/open.py",
        "runner/queue/sqlite.py",
        "handlers/crawl.py",
        "config/actor.toml",
    ]
    for name in left_out + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    sent = {path.as_posix() for path in build_context(tmp_path)}
    assert sent == {*kept, ".dockerignore"}


def test_the_checkouts_build_context_is_small_and_holds_what_the_dockerfile_copies() -> None:
    """This checkout's build context: every file under the Dockerfile's COPY sources is in it (less bytecode), and
    it is under 2 MB whatever lies around (the .venv alone is hundreds of MB)."""
    sent = build_context(ROOT)
    names = {path.as_posix() for path in sent}
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    sources = [source.rstrip("/") for line in copied for source in line.split()]
    assert sources
    for source in sources:
        path = ROOT / source
        expected = (
            [p.relative_to(ROOT).as_posix() for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            if path.is_dir()
            else [source]
        )
        missing = [name for name in expected if name not in names]
        assert not missing, f"{source}: {missing[:5]}"
    sizes = sorted(((ROOT / path).stat().st_size, path.as_posix()) for path in sent)
    assert sum(size for size, _ in sizes) < 2_000_000, f"largest files in the build context: {sizes[-5:]}"
