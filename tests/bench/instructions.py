"""Benchmark: the crawl's CPU cost per page in instructions (callgrind), headlock beside the bare loop, unmoved by load.

    python -m tests.bench.instructions [--pages 1000,3000] [--crawlers headlock,bare] [--base REV] [--gc-threshold N]

Wall and CPU time on a shared machine move by 10-20 % from run to run; the number of instructions a crawl executes
does not. Each crawler of the peer benchmark (`tests.bench._peer_headlock`: `headlock` is `run()` with the default
engine on the embedded store, `bare` the anyio loop on the same client) crawls the benchmark site
(`tests.bench._site`) of each size under `valgrind --tool=callgrind`, and the figure is the difference between the
two sizes over the difference in pages: the instructions one more page costs, start-up and imports cancelled out.
`bookkeeping` is headlock's figure minus the bare loop's: what the runtime adds to a page (the queue, the leases,
the commit, the dataset). With `--base REV` the same runs are made in a temporary worktree of that commit too, and
the ratios this checkout / base are printed. Each slope is also split by thread (`per_page_by_thread`: `loop`,
the main thread, and `threads`, all others), and `bookkeeping_in_threads` is the part of the bookkeeping that runs
in the store's own threads (its SQLite statements, the parse of a locked row), beside the event loop. With
`--gc-threshold N` every crawl runs with the collector's youngest threshold at N (`_peer_headlock --gc-threshold`:
the bare loop too; by default headlock's own setting, 5,000, and Python's 700 for the bare loop); a base before that
option existed refuses it.

Needs valgrind. Each run is about 40 times slower than native: the default sizes take about 5 minutes per crawler
and tree. They were 600 and 1,200 pages until December 2026's seventh session, whose repeated runs of the same code
moved by up to 45k instructions a page on that slope and by about 7k on this one (the group commit's batches, hence
the statements a page costs, follow the threads' timing under callgrind).
Output: JSON lines (`tests.bench._common.emit`), `instructions/<crawler>` per crawler and tree, then
`instructions/compare`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.bench._common import REPO, child_server, emit, machine

_SUMMARY = re.compile(rb"^summary: (\d+)$", re.MULTILINE)


def instructions(tree: Path, crawler: str, url: str, extra: Sequence[str] = ()) -> dict[str, int]:
    """Instructions (`Ir`) of one crawl of `url` by `crawler`, run from `tree` under callgrind: `total`, `loop` (the
    main thread: the event loop and everything on it) and `threads` (all others: the store's thread and its
    checkpoints)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("instructions: valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="headlock-bench-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        command = [valgrind, "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}"]
        command += [sys.executable, "-m", "tests.bench._peer_headlock", "--url", url, "--crawler", crawler, *extra]
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, timeout=3600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{crawler} in {tree} failed ({done.returncode}): {done.stderr[-2000:]!r}")
        by_thread: dict[int, int] = {}
        for part in Path(tmp).glob("callgrind.out-*"):  # one file a thread, `-01` the main one
            found = _SUMMARY.search(part.read_bytes())
            if found is None:
                raise RuntimeError(f"no callgrind summary in {part}")
            by_thread[int(part.name.rsplit("-", 1)[1])] = int(found.group(1))
        if 1 not in by_thread:
            raise RuntimeError(f"no callgrind output of the main thread in {tmp}")
        loop = by_thread.pop(1)
        threads = sum(by_thread.values())
        return {"total": loop + threads, "loop": loop, "threads": threads}


def per_page(tree: Path, crawler: str, sites: dict[int, str], extra: Sequence[str] = ()) -> dict[str, Any]:
    """The instructions of each size and one page's (the slope between the smallest and the largest size), in all
    and split by thread (`instructions`); `extra`: more arguments of `_peer_headlock`."""
    runs = {pages: instructions(tree, crawler, url, extra) for pages, url in sites.items()}
    totals = {pages: run["total"] for pages, run in runs.items()}
    split = {part: slope({pages: run[part] for pages, run in runs.items()}) for part in ("loop", "threads")}
    return {"totals": totals, "per_page": slope(totals), "per_page_by_thread": split}


def slope(totals: dict[int, int]) -> int:
    """The instructions one more page costs: between the smallest and the largest site of `totals` (by pages)."""
    small, large = min(totals), max(totals)
    return round((totals[large] - totals[small]) / (large - small))


@contextmanager
def benchmark_sites(sizes: list[int]) -> Iterator[dict[int, str]]:
    """The benchmark site of each size (`tests.bench._site`, one CPU), for the block: its start URL by size."""
    with ExitStack() as stack:
        children = [
            stack.enter_context(child_server(["-m", "tests.bench._site", "--pages", str(p), "--cpu", "1"]))
            for p in sizes
        ]
        yield {p: f"{child.url}/page/0" for p, child in zip(sizes, children, strict=True)}


def main() -> None:
    """Parse the arguments, run the crawls, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default="1000,3000", help="two (or more) site sizes, comma-separated")
    parser.add_argument("--crawlers", default="headlock,bare")
    parser.add_argument("--base", default=None, help="also measure this commit, in a temporary worktree")
    parser.add_argument("--gc-threshold", type=int, default=None, help="the collector's threshold for every crawl")
    args = parser.parse_args()
    extra = [] if args.gc_threshold is None else ["--gc-threshold", str(args.gc_threshold)]
    sizes = sorted({int(p) for p in args.pages.split(",")})
    crawlers = args.crawlers.split(",")
    if len(sizes) < 2:
        parser.error("--pages needs two sizes")
    trees: dict[str, Path] = {"head": REPO}
    worktree: Path | None = None
    if args.base:
        worktree = Path(tempfile.mkdtemp(prefix="headlock-bench-base-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.base], cwd=REPO, check=True)
        trees["base"] = worktree
    results: dict[str, dict[str, int]] = {name: {} for name in trees}
    threads: dict[str, dict[str, int]] = {name: {} for name in trees}
    try:
        with benchmark_sites(sizes) as sites:
            for crawler in crawlers:
                for name, tree in trees.items():
                    figure = per_page(tree, crawler, sites, extra)
                    results[name][crawler] = figure["per_page"]
                    threads[name][crawler] = figure["per_page_by_thread"]["threads"]
                    emit({"benchmark": f"instructions/{crawler}", "tree": name, **figure})
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=False)
    summary: dict[str, Any] = {"benchmark": "instructions/compare", "pages": sizes, "per_page": results}
    summary["gc_threshold"] = args.gc_threshold
    for name, figures in results.items():
        if "headlock" in figures and "bare" in figures:
            summary.setdefault("bookkeeping_per_page", {})[name] = figures["headlock"] - figures["bare"]
            # The store's threads are all headlock's: the bare loop ran none (`threads` 0).
            in_threads = threads[name]["headlock"] - threads[name]["bare"]
            summary.setdefault("bookkeeping_in_threads", {})[name] = in_threads
    if "base" in results:
        summary["head_over_base"] = {
            crawler: round(results["head"][crawler] / results["base"][crawler], 3)
            for crawler in crawlers
            if results["base"].get(crawler)
        }
    emit(summary, machine())


if __name__ == "__main__":
    main()
