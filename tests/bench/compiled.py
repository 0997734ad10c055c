"""Benchmark (a probe, not a build option): would compiling the hot modules with mypyc cut the crawl's instructions?

    python -m tests.bench.compiled [--pages 600,3000] [--sets sync,all]

Copies this checkout's HEAD (`git archive`) into temporary trees, compiles a set of `runner` modules in each with
mypyc (which `pip install -e '.[dev]'` brings, with mypy), and measures headlock's instructions a page in each as
`tests.bench.instructions` does (callgrind, the slope between two site sizes), beside the uncompiled copy. Sets:
`sync`, the modules whose hot code is plain functions (unique keys, hosts, leases, the context, items, stored rows);
`all`, those and the coroutine-heavy ones (the worker, the commit, the handoff, the deadline, the politeness
transport, the dataset, the store's thread and the store, the fetcher, the group commit).

mypyc refuses three things of the source, patched in the copies only: `__slots__` in a compiled class (its layout
is fixed anyway), a string literal with a surrogate (`"\\udc80"`), and an attribute named `_thread` (its C name
`__thread` is a keyword). Needs valgrind and gcc; about 15 minutes.
Output: JSON lines, `compiled/<set>` per tree, then `compiled/compare`.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from tests.bench._common import REPO, emit, machine
from tests.bench.instructions import benchmark_sites, instructions, slope

SYNC = [
    "runner/uniquekey.py",
    "runner/politeness/hosts.py",
    "runner/leases.py",
    "runner/context.py",
    "runner/results/items.py",
    "runner/queue/_rows.py",
]
ASYNC = [
    "runner/groupcommit.py",
    "runner/worker.py",
    "runner/commit.py",
    "runner/handoff.py",
    "runner/deadline.py",
    "runner/politeness/transport.py",
    "runner/results/jsonl.py",
    "runner/queue/_thread.py",
    "runner/queue/sqlite.py",
    "runner/fetcher.py",
]
SETS = {"sync": SYNC, "all": SYNC + ASYNC}


def copy_head(into: Path) -> None:
    """`git archive HEAD` of the checkout, unpacked into `into`."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def without_slots(source: str) -> str:
    """`source` with every `__slots__ = ...` statement blanked (its lines kept, so tracebacks still match)."""
    lines = source.split("\n")
    dropped: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            dropped.update(range(node.lineno - 1, node.end_lineno or node.lineno))
    return "\n".join("" if index in dropped else line for index, line in enumerate(lines))


def patch_for_mypyc(tree: Path, modules: list[str]) -> None:
    """What mypyc refuses, changed in the copy `tree` (module docstring)."""
    for module in modules:
        path = tree / module
        text = without_slots(path.read_text())
        text = text.replace('"\\udc80" <= char <= "\\udcff"', "chr(0xDC80) <= char <= chr(0xDCFF)")
        text = re.sub(r"(?<!queue)\._thread\b", "._store_thread", text)
        path.write_text(text)


def compile_tree(tree: Path, modules: list[str]) -> None:
    """Patch and compile `modules` in `tree` (the extensions land beside their sources)."""
    mypyc = Path(sys.executable).with_name("mypyc")
    if not mypyc.exists() or shutil.which("gcc") is None:
        raise SystemExit("compiled: needs mypyc (pip install -e '.[dev]') and gcc")
    patch_for_mypyc(tree, modules)
    # The project's own pyproject.toml is for pip; mypyc's setuptools run must not read it.
    (tree / "pyproject.toml").rename(tree / "pyproject.toml.off")
    done = subprocess.run([str(mypyc), *modules], cwd=tree, capture_output=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mypyc failed in {tree}: {done.stdout[-3000:]!r} {done.stderr[-3000:]!r}")


def main() -> None:
    """Make the trees, run the crawls, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default="600,3000", help="two site sizes, comma-separated")
    parser.add_argument("--sets", default="sync,all", help=f"some of {','.join(SETS)}")
    args = parser.parse_args()
    small, large = sorted({int(p) for p in args.pages.split(",")})
    sets = ["python", *args.sets.split(",")]
    root = Path(tempfile.mkdtemp(prefix="headlock-bench-compiled-"))
    try:
        trees = {name: root / name for name in sets}
        for name, tree in trees.items():
            tree.mkdir()
            copy_head(tree)
            if name != "python":
                compile_tree(tree, SETS[name])
        # Two crawls at a time (callgrind uses one core each): the trees' figures come from the same hour.
        with benchmark_sites([small, large]) as urls, concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = {
                name: {pages: pool.submit(instructions, tree, "headlock", url) for pages, url in urls.items()}
                for name, tree in trees.items()
            }
            per_page = {
                name: slope({pages: run.result() for pages, run in sizes.items()}) for name, sizes in runs.items()
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    where = machine()
    for name, figure in per_page.items():
        emit({"benchmark": f"compiled/{name}", "per_page": figure, "modules": SETS.get(name, [])}, where)
    ratios = {name: round(figure / per_page["python"], 3) for name, figure in per_page.items() if name != "python"}
    emit({"benchmark": "compiled/compare", "per_page": per_page, "over_python": ratios, "pages": [small, large]}, where)


if __name__ == "__main__":
    main()
