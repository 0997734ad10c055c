"""`headlock run` as a person sees it, through the real CLI: in a terminal (a pty) for the console, and in JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner.results.jsonl import read_items
from tests.conftest import cli_env, headlock

SHOP = '''\
"""A crawl with a bug: pages whose number ends in 7 have no price."""

import anyio

from handlers.crawl import handle as crawl


async def handle(ctx):
    await anyio.sleep(float(ctx.options.get("sleep", 0)))
    await crawl(ctx)
    if ctx.url.endswith("7"):
        parse_price(ctx.url)


def parse_price(url):
    raise ValueError(f"no price on {url}")


async def fine(ctx):
    await crawl(ctx)


async def options(ctx):
    await ctx.push_data(dict(ctx.options))
'''
RAISE_LINE = SHOP.splitlines().index('    raise ValueError(f"no price on {url}")') + 1
CALL_LINE = SHOP.splitlines().index("        parse_price(ctx.url)") + 1
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PROGRESS = re.compile(r"\d\d:\d\d:\d\d [\d,.M]+ pages \([\d.,]+/min\), [\d,.M]+ items, .*")
FAST = {"HEADLOCK_WORKERS__RETRY_BACKOFF": "0", "HEADLOCK_PROGRESS_EVERY": "0.1"}
"""Retries at once, a progress report every 0.1 s."""


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A directory with the user's handler module `shop` (importable: it is on PYTHONPATH) to run in."""
    (tmp_path / "shop.py").write_text(SHOP)
    return tmp_path


def crawl_args(site: str, *extra: str) -> list[str]:
    """`run` over the 31 pages of depth 0-2 of the site (3 of them fail), two workers, one retry."""
    return [
        "run",
        "--handler",
        "shop:handle",
        "--start-url",
        f"{site}/page/0",
        "--concurrency",
        "2",
        "--max-retries",
        "1",
        "-O",
        "max_depth=2",
        *extra,
    ]


def in_terminal(args: list[str], *, cwd: Path, timeout: float = 60, **env: str) -> tuple[int, str]:
    """Run `python -m runner ARGS` with its stdout and stderr on a pseudo-terminal; its exit code and output."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=cli_env(PYTHONPATH=f"{cli_env()['PYTHONPATH']}{os.pathsep}{cwd}", **env),
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal's last end
                break
            if not chunk:
                break
            out += chunk
        else:
            pytest.fail(f"headlock {' '.join(args)} still ran after {timeout} s:\n{out.decode(errors='replace')}")
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(main)
    return code, ANSI.sub("", out.decode().replace("\r\n", "\n"))


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines of a run."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_console_run_with_failures(shop: Path, site: str) -> None:
    """In a terminal: short progress lines, the client key once, the handler's traceback, the final block; exit 0."""
    code, out = in_terminal(crawl_args(site, "--client-key", "K3yOfThisRun", "-O", "sleep=0.03"), cwd=shop, **FAST)
    assert code == 0, out
    lines = out.splitlines()
    progress = [line for line in lines if PROGRESS.fullmatch(line)]
    assert progress, out
    assert max(len(line) for line in progress) <= 100
    assert any(re.search(r", [\d,]+ pending, \d+%", line) for line in progress), progress
    assert any(", ETA " in line for line in progress), progress
    assert out.count("K3yOfThisRun") == 1
    assert "run.starting" in next(line for line in lines if "K3yOfThisRun" in line)
    # The traceback of each final failure: the user's frames, none of the runtime's above them.
    assert out.count("Traceback (most recent call last):") == 3
    assert out.count(f'  File "{shop / "shop.py"}", line {RAISE_LINE}, in parse_price\n') == 3
    assert out.count(f'  File "{shop / "shop.py"}", line {CALL_LINE}, in handle\n') == 3
    assert "runner/worker.py" not in out
    block = lines[
        next(i for i, line in enumerate(lines) if re.fullmatch(r"\d\d:\d\d:\d\d run finished after \w+", line)) :
    ]
    assert block[1].startswith("  requests  28 handled, 3 failed, 3 retried (")
    assert block[1].endswith(" pages/min)")
    assert block[2:] == [
        f"  items     28 in {Path('storage') / 'datasets' / 'default.jsonl'}",
        "  pending   0",
        "  errors    3x ValueError: no price on <url>",
    ]


@pytest.mark.slow
def test_json_logs_carry_tracebacks_and_the_summary(shop: Path, site: str, tmp_path: Path) -> None:
    """JSON lines: each traceback in one field (retries at debug level), the client key on every line, the summary's
    top errors and where the items are; with --fail-on-error the exit code is 3, in the summary file too."""
    summary = tmp_path / "summary.json"
    args = [*crawl_args(site), "--log-level", "debug", "--summary", str(summary), "--fail-on-error"]
    done = headlock(*args, cwd=shop, PYTHONPATH=f"{cli_env()['PYTHONPATH']}{os.pathsep}{shop}", **FAST)
    assert done.returncode == 3, done.stderr
    logged = events(done.stderr)
    keys = {e.get("client_key") for e in logged if e["event"] in {"run.starting", "run.progress", "request.failed"}}
    assert len(keys) == 1
    assert None not in keys
    errors = [e for e in logged if e["event"] == "handler.error"]
    assert sorted((e["level"], e["final"]) for e in errors) == [("debug", False)] * 3 + [("warning", True)] * 3
    for event in errors:
        assert event["traceback"].startswith("Traceback (most recent call last):\n")
        assert f'File "{shop / "shop.py"}", line {RAISE_LINE}, in parse_price' in event["traceback"]
        assert event["traceback"].rstrip().endswith(event["error"])
        assert "\n" not in event["error"]
    finished = next(e for e in logged if e["event"] == "run.finished")
    written = json.loads(summary.read_text())
    for result in (finished, written):
        assert result["failed_top"] == [{"count": 3, "error": "ValueError: no price on <url>"}]
        assert result["results"] == str(Path("storage") / "datasets" / "default.jsonl")
        assert (result["handled"], result["failed"], result["retried"], result["pending"]) == (28, 3, 3, 0)
    assert written["exit_code"] == 3


@pytest.mark.slow
def test_fail_on_error_from_the_config_file(shop: Path, site: str) -> None:
    """`fail_on_error = true`: exit 3 after a run with failed requests, 0 after one without."""
    config = shop / "run.toml"
    config.write_text("fail_on_error = true\n")
    env = {"PYTHONPATH": f"{cli_env()['PYTHONPATH']}{os.pathsep}{shop}", **FAST}
    failing = headlock(*crawl_args(site, "--config", str(config), "--storage-dir", "one"), cwd=shop, **env)
    assert failing.returncode == 3, failing.stderr
    args = crawl_args(site, "--config", str(config), "--storage-dir", "two")
    args[args.index("shop:handle")] = "shop:fine"
    fine = headlock(*args, cwd=shop, **env)
    assert fine.returncode == 0, fine.stderr


@pytest.mark.slow
def test_handler_options_from_the_command_line(shop: Path, site: str) -> None:
    """`-O KEY=VALUE` sets handler options as TOML values or bare words, over the file's and the environment's."""
    config = shop / "run.toml"
    config.write_text('[handler_options]\nkeep = "file"\nmax_depth = 5\nmode = "slow"\n')
    done = headlock(
        "run",
        "--config",
        str(config),
        "--handler",
        "shop:options",
        "--start-url",
        f"{site}/page/0",
        *("-O", "max_depth=2", "-O", "same_host=false", "-O", 'name="x y"', "-O", "mode=fast", "-O", "ratio=0.5"),
        cwd=shop,
        PYTHONPATH=f"{cli_env()['PYTHONPATH']}{os.pathsep}{shop}",
        HEADLOCK_HANDLER_OPTIONS='{"from_env": 1, "ratio": 2}',
    )
    assert done.returncode == 0, done.stderr
    [item] = read_items(shop / "storage" / "datasets" / "default.jsonl")
    assert item == {
        "keep": "file",
        "from_env": 1,
        "max_depth": 2,
        "same_host": False,
        "name": "x y",
        "mode": "fast",
        "ratio": 0.5,
    }


@pytest.mark.parametrize(("option", "named"), [("novalue", "'novalue'"), ('title="open', "title:")])
def test_a_bad_option_is_a_usage_error_naming_it(tmp_path: Path, option: str, named: str) -> None:
    """A malformed `-O` exits 2 before anything runs, naming the option."""
    done = headlock("run", "--handler", "handlers.crawl:handle", "-O", "ok=1", "-O", option, cwd=tmp_path)
    assert done.returncode == 2
    assert "-O/--option" in done.stderr
    assert named in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "storage").exists()


def test_version() -> None:
    """`headlock --version` prints the installed package's version and exits 0."""
    done = headlock("--version", cwd=Path.cwd())
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"headlock {importlib.metadata.version('headlock')}\n"
