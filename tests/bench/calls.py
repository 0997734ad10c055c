"""Function calls per page of one headlock crawl, by package: a cost that does not move with the machine's load.

    python -m tests.bench.calls [--pages 2000]                 # this checkout
    python -m tests.bench.calls --base 21be3fc [--pages 2000]  # a base commit beside this checkout

Wall time and CPU time on a shared machine vary by 10-25 % between back-to-back runs; how many Python functions a
crawl calls (cProfile's counts, generator resumptions included) varies by about 1 %. The crawl is
`tests.bench.crawl.headlock_crawl` (the embedded store, `handlers.crawl`, 50 workers) against the local site in a
child process. With `--base`, the base commit is checked out in a temporary worktree and the same measurement runs
there (this file, importing that tree's code); the output compares the two per package (`head / base`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
PACKAGES = ("runner", "handlers", "httpx", "httpcore", "anyio", "h11", "selectolax", "asyncio")


def _package(path: str) -> str:
    """The package a profiled function's file belongs to (the stdlib's asyncio, or `other`)."""
    parts = Path(path).parts
    for name in PACKAGES:
        if name in parts:
            return name
    return "other"


def measure(pages: int) -> dict[str, object]:
    """Profile one crawl of `pages` pages with the code importable here; calls per page by package."""
    import anyio  # noqa: PLC0415 - imported from the tree under measurement

    from tests.bench._common import child_server, quiet_logs  # noqa: PLC0415
    from tests.bench.crawl import headlock_crawl  # noqa: PLC0415

    quiet_logs()
    with child_server(["-m", "tests.bench._site", "--pages", str(pages)]) as site:
        start = f"{site.url}/page/0"
        profile = cProfile.Profile()
        profile.enable()
        crawled, _, _ = anyio.run(lambda: headlock_crawl(start, concurrency=50, max_depth=10_000))
        profile.disable()
    calls: Counter[str] = Counter()
    for (file, _line, _name), (_cc, ncalls, *_rest) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        calls[_package(file)] += ncalls
    per_page = {name: round(count / crawled, 2) for name, count in sorted(calls.items())}
    return {"pages": crawled, "calls_per_page": round(sum(calls.values()) / crawled, 1), "by_package": per_page}


def _measure_in(tree: Path, pages: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, str(HERE), "--measure", "--pages", str(pages)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Measure here (and in the base commit), print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--base", help="a commit to compare against")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.pages)))
        return
    head = _measure_in(REPO, args.pages)
    if args.base is None:
        print(json.dumps({"benchmark": "calls", **head}))
        return
    with tempfile.TemporaryDirectory(prefix="headlock-calls-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base_tree), args.base], cwd=REPO, check=True)
        try:
            base = _measure_in(base_tree, args.pages)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    head_by, base_by = head["by_package"], base["by_package"]
    assert isinstance(head_by, dict)
    assert isinstance(base_by, dict)
    ratios = {name: round(head_by.get(name, 0) / base_by[name], 3) for name in sorted(base_by) if base_by[name]}
    total = float(str(head["calls_per_page"])) / float(str(base["calls_per_page"]))
    print(
        json.dumps(
            {
                "benchmark": "calls/compare",
                "base_commit": args.base,
                "head_vs_base": round(total, 3),
                "by_package_head_vs_base": ratios,
                "head": head,
                "base": base,
            }
        )
    )


if __name__ == "__main__":
    main()
