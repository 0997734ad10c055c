"""Benchmark: headlock against its peers, crawlee-python and Scrapy, on one crawl of the same local site, interleaved.

    python -m tests.bench.peers [--pages 2000] [--concurrency 50] [--rounds 3] [--quick] [--venv DIR]
                                [--only headlock,crawlee-memory,...] [--python python3.11] [--timeout 600]

The peers live in a venv of their own (`--venv`, default `~/.cache/headlock/peers-venv`), made once with
`python3.11 -m venv` and filled from `tests/bench/peers-requirements.txt` (reused while it holds those versions).
The site (`tests.bench._site`: `/page/0` .. `/page/N-1`, a 5-ary tree of links) runs in a child pinned to CPU 1.

Each round runs every crawler once, in an order that rotates from round to round, each as a fresh subprocess pinned
to CPU 0 (before it starts, so all its threads stay there), all with the same concurrency and the same crawl: start
at `/page/0`, find the links of each page with one regex (`href="([^"]+)"`), resolve them against the page URL, keep
the same-host ones (fragment and trailing `/` dropped: the pages link to `#top` and to `/page/N/`), let the crawler's
own dedup enqueue each URL once, store one `{url, title}` item per page the crawler's natural way:

- `headlock`: `runner.run()` with default `WorkerSettings(concurrency=N)` (the default HTTP engine), N requests in
  flight to the one host (`PolitenessSettings(per_host_concurrency=N)`, as Scrapy's per-domain limit is set), the
  embedded SQLite queue and a JSONL dataset in a temporary directory, `ctx.http.get`, `ctx.push_data`, `ctx.enqueue`;
- `headlock-httpx`: the same with `WorkerSettings(http_transport="httpx")`;
- `crawlee-memory`: crawlee-python's `HttpCrawler` (its default HTTP client, impit), `MemoryStorageClient`,
  `ConcurrencySettings(min=max=desired=N)`, `context.add_requests`, `context.push_data`;
- `crawlee-fs`: the same on crawlee's default `FileSystemStorageClient` (`CRAWLEE_STORAGE_DIR` a temporary dir);
- `scrapy`: a Spider with `CONCURRENT_REQUESTS(_PER_DOMAIN)=N`, no robots.txt, delay, AutoThrottle or telnet, the
  default scheduler and dupefilter, items to a JSONL feed export in a temporary directory;
- `bare`: N anyio worker tasks on one memory stream, a set for dedup, a list for the items, on the `httpx.AsyncClient`
  `runner.runtime.default_http_client(WorkerSettings(concurrency=N))` builds (headlock's default engine).

The crawl scripts are `_peer_headlock.py` (headlock's venv) and `_peer_crawlee.py`, `_peer_scrapy.py` (the peers'
venv, run with `python -I`: standard library and the peer only). Each prints one JSON line: `seconds` and `cpu_s`
(`time.process_time()`, all threads) cover the crawl loop alone (headlock's `run()`, crawlee's `crawler.run()`,
Scrapy's `spider_opened` to `spider_closed`, the bare task group), after imports and setup. Every run must fetch each
of the `--pages` pages exactly once and store as many items, or the benchmark stops with an error. Peak RSS is the
child's own `ru_maxrss`, from `wait4`.

Output (JSON lines, `tests.bench._common.emit`): one `peers/<crawler>` line each (median pages/s, every run, CPU ms
per page, peak RSS), then `peers/compare`: per round, each crawler's pages/s divided by crawlee-memory's in that
round (ratios within one round cancel the drift of a shared machine's load), their medians, headlock / bare the same
way, and the README's targets with `target_met`: headlock / crawlee-memory >= 1.2, headlock / bare >= 0.8 (medians
of the per-round ratios). `cpu_vs_crawlee_memory_median` is crawlee-memory's CPU per page over each crawler's, per
round, median (above 1: less CPU a page than crawlee): CPU varies less than wall time with others' load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

from runner import WorkerSettings
from tests.bench._common import REPO, child_server, emit, machine, median

BENCH = Path(__file__).resolve().parent
REQUIREMENTS = BENCH / "peers-requirements.txt"
DEFAULT_VENV = Path("~/.cache/headlock/peers-venv").expanduser()
CRAWLERS = ("headlock", "headlock-httpx", "crawlee-memory", "crawlee-fs", "scrapy", "bare")
HEADLOCK_SIDE = frozenset({"headlock", "headlock-httpx", "bare"})  # run by _peer_headlock.py in headlock's venv
BASELINE = "crawlee-memory"
BASELINE_KEY = BASELINE.replace("-", "_")
TARGETS = {"headlock_vs_crawlee_memory": ("headlock", BASELINE, 1.2), "headlock_vs_bare": ("headlock", "bare", 0.8)}
PEER_PACKAGES = ("crawlee", "impit", "scrapy", "twisted")
HEADLOCK_PACKAGES = ("httpx", "httpcore", "aiohttp", "httpx-aiohttp", "anyio")
POLL = 0.05


@dataclass(frozen=True, slots=True)
class Run:
    """One crawl: the record its child printed, and the child's peak RSS and whole-process CPU from `wait4`."""

    record: dict[str, Any]
    peak_rss_mb: float
    process_cpu_s: float

    @property
    def pages_per_s(self) -> float:
        """Pages fetched per second of the crawl loop."""
        return float(self.record["pages"]) / float(self.record["seconds"])

    @property
    def cpu_ms_per_page(self) -> float:
        """CPU milliseconds (all threads) per page, over the crawl loop."""
        return float(self.record["cpu_s"]) * 1000 / float(self.record["pages"])


# --- the peers' venv ---------------------------------------------------------------------------------------------


def pinned_versions() -> dict[str, str]:
    """The `name==version` lines of `peers-requirements.txt`."""
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, _, wanted = spec.partition("==")
            pins[name.strip().lower()] = wanted.strip()
    return pins


def venv_versions(python: Path) -> dict[str, str | None]:
    """The versions of the peers' packages (and Python) installed in the venv of `python`; None where missing."""
    script = (
        "import importlib.metadata as m, json, platform\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        f"print(json.dumps({{'python': platform.python_version(), **{{n: v(n) for n in {list(PEER_PACKAGES)!r}}}}}))"
    )
    done = subprocess.run([str(python), "-I", "-c", script], capture_output=True, text=True, check=True)
    found: dict[str, str | None] = json.loads(done.stdout)
    return found


def ensure_venv(venv: Path, base_python: str) -> tuple[Path, dict[str, str | None]]:
    """The peers' python in `venv`, made with `base_python -m venv` and filled from the pins unless it holds them.

    Raises:
        RuntimeError: `base_python` is not found, or the venv or the install fails.
    """
    python = venv / "bin" / "python"
    if not python.exists():
        found = shutil.which(base_python)
        if found is None:
            raise RuntimeError(f"--python {base_python!r}: not found on PATH (the peers' venv is made with it)")
        print(f"peers: making the venv {venv} with {found}", file=sys.stderr, flush=True)
        subprocess.run([found, "-m", "venv", str(venv)], check=True)
    pins = pinned_versions()
    installed = venv_versions(python)
    if any(installed.get(name) != wanted for name, wanted in pins.items()):
        print(f"peers: installing {REQUIREMENTS.name} into {venv}", file=sys.stderr, flush=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(REQUIREMENTS)]
        subprocess.run(pip, check=True, stdout=sys.stderr)
        installed = venv_versions(python)
        wrong = {name: installed.get(name) for name, wanted in pins.items() if installed.get(name) != wanted}
        if wrong:
            raise RuntimeError(f"the peers' venv {venv} has {wrong} after the install, not the pins {pins}")
    print(f"peers: venv {venv}: {json.dumps(installed)}", file=sys.stderr, flush=True)
    return python, installed


# --- one crawl ---------------------------------------------------------------------------------------------------


def command(crawler: str, *, url: str, concurrency: int, peers_python: Path) -> list[str]:
    """The command line of one crawl of `crawler` from `url`."""
    common = ["--url", url, "--concurrency", str(concurrency)]
    if crawler in HEADLOCK_SIDE:
        return [sys.executable, "-m", "tests.bench._peer_headlock", "--crawler", crawler, *common]
    if crawler in {"crawlee-memory", "crawlee-fs"}:
        storage = crawler.removeprefix("crawlee-")
        return [str(peers_python), "-I", str(BENCH / "_peer_crawlee.py"), "--storage", storage, *common]
    return [str(peers_python), "-I", str(BENCH / "_peer_scrapy.py"), *common]


def run_crawl(argv: Sequence[str], *, cpu: int | None, timeout: float, env: Mapping[str, str], cwd: Path) -> Run:
    """Run one crawl child pinned to `cpu` in `cwd`, wait for it (at most `timeout` s); return its record and rusage.

    Raises:
        RuntimeError: the child failed, timed out or printed no JSON line.
    """
    pin = None if cpu is None else partial(os.sched_setaffinity, 0, {cpu})
    out_path, err_path = cwd / "stdout", cwd / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        # preexec_fn: this process runs no threads, and the pin must come before the child's first thread.
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd, preexec_fn=pin)  # noqa: PLW1509
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            raise RuntimeError(f"{list(argv)} did not finish within {timeout} s: {_tail(err_path)}")
        time.sleep(POLL)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{list(argv)} failed (exit {code}): {_tail(err_path)}")
    lines = out_path.read_text().strip().splitlines()
    if not lines:
        raise RuntimeError(f"{list(argv)} printed nothing: {_tail(err_path)}")
    return Run(
        record=json.loads(lines[-1]),
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
        process_cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
    )


def _tail(path: Path, size: int = 3000) -> str:
    """The end of a child's stderr."""
    return path.read_text(errors="replace")[-size:]


def check(crawler: str, run: Run, pages: int) -> None:
    """Fail loudly unless the crawl fetched each page exactly once, all 200s, and stored one item each.

    Raises:
        RuntimeError: any count differs.
    """
    got = run.record
    wrong = [
        f"{key}={got.get(key)!r} (expected {want})"
        for key, want in (("pages", pages), ("unique", pages), ("items", pages), ("not_ok", 0))
        if got.get(key) != want
    ] + [f"{key}={got[key]!r} (expected 0)" for key in ("failed", "retried") if got.get(key)]
    if wrong:
        raise RuntimeError(f"{crawler} did not crawl each of the {pages} pages once: {', '.join(wrong)}; {got}")


def bench(
    crawlers: Sequence[str],
    *,
    url: str,
    pages: int,
    concurrency: int,
    rounds: int,
    peers_python: Path,
    cpu: int | None,
    timeout: float,
) -> tuple[dict[str, list[Run]], list[list[str]]]:
    """Run every crawler once per round, the order rotating; return the runs by crawler and each round's order."""
    runs: dict[str, list[Run]] = {crawler: [] for crawler in crawlers}
    orders = []
    base_env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    headlock_env = {**base_env, "PYTHONPATH": str(REPO)}
    for index in range(rounds):
        shift = index % len(crawlers)
        order = [*crawlers[shift:], *crawlers[:shift]]
        orders.append(order)
        for crawler in order:
            # Each child runs in a scratch directory of its own (crawlee's storage goes under it), removed after.
            with tempfile.TemporaryDirectory(prefix=f"headlock-bench-{crawler}-") as tmp:
                work = Path(tmp)
                if crawler in HEADLOCK_SIDE:
                    env = headlock_env
                else:
                    env = {**base_env, "CRAWLEE_STORAGE_DIR": str(work / "storage")}
                argv = command(crawler, url=url, concurrency=concurrency, peers_python=peers_python)
                run = run_crawl(argv, cpu=cpu, timeout=timeout, env=env, cwd=work)
            check(crawler, run, pages)
            runs[crawler].append(run)
            print(
                f"peers: round {index + 1}/{rounds} {crawler}: {run.pages_per_s:.0f} pages/s,"
                f" {run.cpu_ms_per_page:.3f} CPU ms/page",
                file=sys.stderr,
                flush=True,
            )
    return runs, orders


# --- the figures -------------------------------------------------------------------------------------------------


def describe(crawler: str, runs: Sequence[Run], peer_versions: Mapping[str, str | None]) -> dict[str, Any]:
    """What ran as `crawler`: its engine, storage and library versions."""
    if crawler in HEADLOCK_SIDE:
        engine = runs[0].record.get("http_transport") if runs else None
        return {
            "http_transport": engine,
            "storage": "list in memory" if crawler == "bare" else "embedded SQLite queue + JSONL dataset",
            "versions": {name: _version(name) for name in HEADLOCK_PACKAGES},
        }
    if crawler.startswith("crawlee"):
        storage = "MemoryStorageClient" if crawler == "crawlee-memory" else "FileSystemStorageClient (default)"
        return {
            "http_client": "crawlee's default (ImpitHttpClient)",
            "storage": storage,
            "versions": {name: peer_versions.get(name) for name in ("python", "crawlee", "impit")},
        }
    return {
        "http_client": "Scrapy's default (Twisted, asyncio reactor)",
        "storage": "JSONL feed export",
        "versions": {name: peer_versions.get(name) for name in ("python", "scrapy", "twisted")},
    }


def _version(name: str) -> str | None:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - not installed, or its metadata unreadable: either way no version to show
        return None


def ratio_summary(runs: Mapping[str, Sequence[Run]], numerator: str, denominator: str) -> list[float] | None:
    """`numerator`'s pages/s over `denominator`'s, round by round; None if either did not run."""
    if numerator not in runs or denominator not in runs:
        return None
    return [
        round(top.pages_per_s / bottom.pages_per_s, 3)
        for top, bottom in zip(runs[numerator], runs[denominator], strict=True)
    ]


def report(
    runs: Mapping[str, Sequence[Run]],
    orders: Sequence[Sequence[str]],
    *,
    pages: int,
    concurrency: int,
    peer_versions: Mapping[str, str | None],
    where: dict[str, Any],
    extra: Mapping[str, Any],
) -> None:
    """Emit one line per crawler, then the comparison."""
    for crawler, done in runs.items():
        rates = [round(run.pages_per_s, 1) for run in done]
        cpu_ms = [round(run.cpu_ms_per_page, 3) for run in done]
        rss = [run.peak_rss_mb for run in done]
        emit(
            {
                "benchmark": f"peers/{crawler}",
                "pages": pages,
                "concurrency": concurrency,
                "runs": len(done),
                "pages_per_s_median": round(median(rates), 1),
                "pages_per_s_runs": rates,
                "seconds_runs": [round(float(run.record["seconds"]), 3) for run in done],
                "cpu_ms_per_page_median": round(median(cpu_ms), 3),
                "cpu_ms_per_page_runs": cpu_ms,
                "peak_rss_mb_median": median(rss),
                "peak_rss_mb_runs": rss,
                "process_cpu_s_runs": [run.process_cpu_s for run in done],
                **describe(crawler, done, peer_versions),
            },
            where,
        )
    per_round = []
    for index, order in enumerate(orders):
        base = runs[BASELINE][index] if BASELINE in runs else None
        per_round.append(
            {
                "round": index + 1,
                "order": list(order),
                "pages_per_s": {crawler: round(done[index].pages_per_s, 1) for crawler, done in runs.items()},
                "cpu_ms_per_page": {crawler: round(done[index].cpu_ms_per_page, 3) for crawler, done in runs.items()},
                f"vs_{BASELINE_KEY}": None
                if base is None
                else {crawler: round(done[index].pages_per_s / base.pages_per_s, 3) for crawler, done in runs.items()},
            }
        )
    vs_base = {crawler: ratio_summary(runs, crawler, BASELINE) for crawler in runs}
    targets = {}
    for name, (numerator, denominator, target) in TARGETS.items():
        ratios = ratio_summary(runs, numerator, denominator)
        value = None if ratios is None else round(median(ratios), 3)
        targets[name] = {
            "ratio": f"{numerator} / {denominator} pages/s, median of the per-round ratios",
            "target": f">= {target}",
            "per_round": ratios,
            "median": value,
            "target_met": None if value is None else value >= target,
        }
    cpu_vs_base = (
        {
            crawler: round(
                median([b.cpu_ms_per_page / r.cpu_ms_per_page for r, b in zip(done, runs[BASELINE], strict=True)]), 3
            )
            for crawler, done in runs.items()
        }
        if BASELINE in runs
        else None
    )
    emit(
        {
            "benchmark": "peers/compare",
            "pages": pages,
            "concurrency": concurrency,
            "rounds": per_round,
            f"vs_{BASELINE_KEY}_median": {
                crawler: None if ratios is None else round(median(ratios), 3) for crawler, ratios in vs_base.items()
            },
            f"cpu_vs_{BASELINE_KEY}_median": cpu_vs_base,
            "targets": targets,
            **extra,
            "load_avg_1_5_15_end": [round(x, 2) for x in os.getloadavg()],
        },
        where,
    )


def parse_only(value: str) -> list[str]:
    """The crawlers `--only` names, in the benchmark's order.

    Raises:
        argparse.ArgumentTypeError: an unknown name, or none.
    """
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in CRAWLERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown crawler(s) {unknown or [value]}: a comma-separated list of {', '.join(CRAWLERS)}"
        )
    return [crawler for crawler in CRAWLERS if crawler in names]


def main() -> None:
    """Set up the peers' venv, start the site, run the rounds, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pages", type=int, default=None, help="pages of the site (default 2000; --quick 500)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=None, help="runs of each crawler (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 pages, 1 round unless given")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"the peers' venv (default {DEFAULT_VENV})")
    parser.add_argument("--python", default="python3.11", help="the Python that makes the peers' venv")
    parser.add_argument("--only", type=parse_only, default=list(CRAWLERS), help=f"some of {','.join(CRAWLERS)}")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one crawl may take")
    args = parser.parse_args()
    pages = args.pages or (500 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    if pages < 1 or rounds < 1 or args.concurrency < 1:
        parser.error("--pages, --rounds and --concurrency must be at least 1")
    where = machine()
    peers_python, peer_versions = ensure_venv(args.venv.expanduser(), args.python)
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    crawler_cpu = allowed[0] if allowed else None
    with child_server(["-m", "tests.bench._site", "--pages", str(pages), "--cpu", "1"]) as site:
        runs, orders = bench(
            args.only,
            url=f"{site.url}/page/0",
            pages=pages,
            concurrency=args.concurrency,
            rounds=rounds,
            peers_python=peers_python,
            cpu=crawler_cpu,
            timeout=args.timeout,
        )
    extra = {
        "headlock_default_http_transport": WorkerSettings(concurrency=args.concurrency).http_transport,
        "peers_venv": str(args.venv),
        "site_peak_rss_mb": site.peak_rss_mb,
        "pinned": {
            "crawler_cpu": crawler_cpu,
            "site_cpu": allowed[1 % len(allowed)] if allowed else None,
        },
    }
    report(
        runs, orders, pages=pages, concurrency=args.concurrency, peer_versions=peer_versions, where=where, extra=extra
    )


if __name__ == "__main__":
    main()
