"""A/B: one benchmark on another commit and on this checkout, alternating, in one run.

    python -m tests.bench.ab --base REV [--pairs 4] [--line NAME] [--metric KEY] -- MODULE [ARGS...]
    python -m tests.bench.ab --base 21be3fc --metric cpu_us_per_request -- tests.bench.overhead --backend embedded
    python -m tests.bench.ab --base 21be3fc --line crawl/headlock --metric cpu_ms_per_page_median \
        -- tests.bench.crawl --rounds 1

The base commit is checked out in a temporary worktree; each pair runs `python -m MODULE ARGS` there and then here
(the order alternates: ABBA...), each with its own tree on `PYTHONPATH`, and reads `KEY` from the benchmark's last
JSON line (or its line whose `benchmark` is `NAME`). It prints every figure and the median of the per-pair ratios
(this checkout / base): for a cost such as CPU per request, above 1 means slower. On a shared machine single runs
vary by 10-20 %; the pairs, run back to back, are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.bench._common import REPO


def figure(tree: Path, module: list[str], *, line: str | None, metric: str) -> float:
    """Run the benchmark in `tree` and return `metric` from its output."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-m", *module], cwd=tree, env=env, capture_output=True, text=True, check=True, timeout=1800
    )
    rows = [json.loads(text) for text in done.stdout.splitlines() if text.startswith("{")]
    if line is not None:
        rows = [row for row in rows if row.get("benchmark") == line]
    return float(rows[-1][metric])


def main() -> None:
    """Check out the base, run the pairs, print the figures and the median ratio as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--line", help="the `benchmark` name of the output line to read (default: the last line)")
    parser.add_argument("--metric", default="cpu_us_per_request")
    parser.add_argument("module", nargs=argparse.REMAINDER, help="-- MODULE [ARGS...]")
    args = parser.parse_args()
    module = [part for part in args.module if part != "--"]
    with tempfile.TemporaryDirectory(prefix="headlock-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.base], cwd=REPO, check=True)
        try:
            results: dict[str, list[float]] = {"base": [], "head": []}
            for pair in range(args.pairs):
                order = [("base", base), ("head", REPO)] if pair % 2 == 0 else [("head", REPO), ("base", base)]
                for name, tree in order:
                    results[name].append(figure(tree, module, line=args.line, metric=args.metric))
                    print(f"pair {pair + 1} {name}: {results[name][-1]}", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    ratios = [head / base_ for head, base_ in zip(results["head"], results["base"], strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "ab",
                "module": module,
                "metric": args.metric,
                "base": args.base,
                "base_figures": results["base"],
                "head_figures": results["head"],
                "ratios_head_over_base": [round(r, 3) for r in ratios],
                "median_ratio": round(statistics.median(ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
