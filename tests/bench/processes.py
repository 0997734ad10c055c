"""Benchmark: `headlock run --processes N` scaling with a CPU-bound handler over the embedded store.

    python -m tests.bench.processes [--requests 4000] [--cpu-ms 2] [--rounds 3] [--processes 1,2]

The handler (`burn`, below) spins a pure-Python loop for about `--cpu-ms` ms per request, no HTTP: one process is
bound to one core by the GIL, N processes are not. Each configuration is a fresh queue of `--requests` requests
filled untimed by `headlock enqueue`, then one `headlock run --processes N` timed from its start to its exit (the
children's start-up included, as a user sees it). Rounds interleave the configurations (1, 2, 1, 2, ...), so drift
in the machine's load hits both alike. Prints one JSON line per run, then one with the medians and the ratio of
each N to 1 (handled/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runner import Context
from tests.bench._common import REPO, emit, machine

LOOPS_PER_MS_PROBE = 200_000


def _spin(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


async def burn(ctx: Context) -> None:
    """Spin `options.loops` iterations of a pure-Python loop (CPU only, the event loop blocked meanwhile)."""
    _spin(int(ctx.options.get("loops", 0)))


def loops_for(ms: float) -> int:
    """Loop iterations that take about `ms` milliseconds here (the best of three probes)."""
    best = min(_timed(LOOPS_PER_MS_PROBE) for _ in range(3))
    return max(1, round(LOOPS_PER_MS_PROBE * ms / 1000 / best))


def _timed(loops: int) -> float:
    start = time.perf_counter()
    _spin(loops)
    return time.perf_counter() - start


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADLOCK_", "APIFY_", "ACTOR_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def one_run(processes: int, requests: int, loops: int) -> dict[str, Any]:
    """Fill a fresh queue, run it with `processes` processes; the run's figures."""
    with tempfile.TemporaryDirectory(prefix="headlock-bench-") as tmp:
        work = Path(tmp)
        urls = work / "urls.txt"
        urls.write_text("".join(f"https://bench.example/p{i}\n" for i in range(requests)))
        cli = [sys.executable, "-m", "runner"]
        subprocess.run([*cli, "enqueue", "--file", str(urls)], cwd=work, env=_env(), check=True, capture_output=True)
        summary = work / "summary.json"
        command = [
            *cli, "run", "--handler", "tests.bench.processes:burn", "-O", f"loops={loops}", "--processes",
            str(processes), "--summary", str(summary), "--log-format", "json", "--log-level", "warning",
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, cwd=work, env=_env(), check=False, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
        result = json.loads(summary.read_text())
    if result["handled"] != requests:
        raise RuntimeError(f"handled {result['handled']} of {requests}")
    return {
        "processes": processes,
        "requests": requests,
        "wall_s": round(wall, 3),
        "handled_per_s": round(requests / wall, 1),
        "per_child": [c["handled"] for c in result["children"]] if "children" in result else [requests],
    }


def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--cpu-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (the first is the base)")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    loops = loops_for(args.cpu_ms)
    where = machine()
    rates: dict[int, list[float]] = {n: [] for n in counts}
    for round_no in range(args.rounds):
        order = counts if round_no % 2 == 0 else counts[::-1]
        for n in order:
            record = one_run(n, args.requests, loops)
            rates[n].append(record["handled_per_s"])
            emit({"bench": "processes", "round": round_no, "cpu_ms": args.cpu_ms, "loops": loops, **record}, where)
    base = counts[0]
    ratios = {n: [a / b for a, b in zip(rates[n], rates[base], strict=True)] for n in counts}
    emit(
        {
            "bench": "processes",
            "summary": True,
            "median_handled_per_s": {str(n): statistics.median(r) for n, r in rates.items()},
            "ratio_to_base": {str(n): round(statistics.median(r), 2) for n, r in ratios.items()},
            "ratio_range": {str(n): [round(min(r), 2), round(max(r), 2)] for n, r in ratios.items()},
        },
        where,
    )


if __name__ == "__main__":
    main()
