"""An unchanged Apify SDK Actor against `headlock serve`: two of them crawl a local site over one shared queue.

The SDK (`tests/sdk_actor/requirements.txt`) is not installed into headlock's venv: the test builds a venv of its
own once, in a cache directory named by the pinned versions and Python's, under a file lock so that concurrent
test runs wait for one build instead of racing (`sdk_python`). The Actors are configured only by the Actor
environment variables, as on the platform.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from apify_client import ApifyClient

from handlers.demo_site import serve_site
from tests._server import running_server

ROOT = Path(__file__).resolve().parents[1]
ACTOR = ROOT / "tests" / "sdk_actor" / "main.py"
REQUIREMENTS = ROOT / "tests" / "sdk_actor" / "requirements.txt"
TOKEN = "sdk-test-token"  # noqa: S105 - a test token
PAGES = 60
PAGE_DELAY = 0.05
"""Each page's pause in the Actor (60 pages at 4 at a time: at least 0.75 s for one Actor alone)."""
"""The site's pages, every one reachable from /page/0."""
RUNS = ("run-a", "run-b")
ACTOR_TIMEOUT = 180.0
BUILD_TIMEOUT = 900.0
IDS = {"queue": "sdk-queue", "dataset": "sdk-dataset", "kv": "sdk-store"}


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headlock-tests"


def _venv_name() -> str:
    """`sdk-apify-4.1.0-crawlee-1.11.0-py3.11-<hash of the pins>`: a new pin or Python is a new venv."""
    pins = [line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and line[0] != "#"]
    versions = "-".join(pin.replace("==", "-") for pin in pins)
    digest = hashlib.sha256(f"{REQUIREMENTS.read_text()}{sys.version}".encode()).hexdigest()[:10]
    return f"sdk-{versions}-py{sys.version_info.major}.{sys.version_info.minor}-{digest}"


def sdk_python() -> Path:
    """The Python of the SDK's venv, built on first use (a build that died half-way is redone)."""
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / _venv_name()
    complete = venv / ".complete"
    with (root / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building the same venv: wait for it, then reuse it
        if not complete.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=BUILD_TIMEOUT)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
            subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True, timeout=BUILD_TIMEOUT)
            complete.write_text(REQUIREMENTS.read_text())
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's storage directory."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def base_url(storage: Path) -> Iterator[str]:
    """`headlock serve` with a token and the runs' default storage ids."""
    extra = ["--default-queue-id", IDS["queue"], "--default-dataset-id", IDS["dataset"]]
    extra += ["--default-kv-store-id", IDS["kv"]]
    with running_server(storage, token=TOKEN, extra_args=extra) as url:
        yield url


def _actor_env(base_url: str, run_id: str, local_storage: Path) -> dict[str, str]:
    """What the platform gives a run: no inherited APIFY_/ACTOR_/CRAWLEE_ setting, the API and the storages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIFY_", "ACTOR_", "CRAWLEE_", "HEADLOCK_"))}
    env.pop("PYTHONPATH", None)
    env.update(
        APIFY_IS_AT_HOME="1",
        APIFY_TOKEN=TOKEN,
        APIFY_API_BASE_URL=base_url,
        APIFY_API_PUBLIC_BASE_URL=base_url,
        ACTOR_RUN_ID=run_id,
        ACTOR_DEFAULT_REQUEST_QUEUE_ID=IDS["queue"],
        ACTOR_DEFAULT_DATASET_ID=IDS["dataset"],
        ACTOR_DEFAULT_KEY_VALUE_STORE_ID=IDS["kv"],
        CRAWLEE_STORAGE_DIR=str(local_storage),  # anything the SDK keeps locally stays in the test's directory
    )
    return env


def _run_actors(
    base_url: str, tmp_path: Path, runs: tuple[str, ...], site: str, *args: str
) -> tuple[dict[str, int], str]:
    """Run one Actor process per run id (input: the site and the peers) to its end; exit codes and log tails."""
    python = sdk_python()
    client = ApifyClient(TOKEN, api_url=base_url, api_public_url=base_url, max_retries=0)
    client.key_value_store(IDS["kv"]).set_record(
        "INPUT",
        {"startUrl": f"{site}/page/0", "peers": list(runs), "readyTimeoutSecs": 60, "pageDelaySecs": PAGE_DELAY},
    )
    logs = {run_id: tmp_path / f"{run_id}.log" for run_id in runs}
    processes = {}
    try:
        for run_id in runs:
            with logs[run_id].open("wb") as log:
                env = _actor_env(base_url, run_id, tmp_path / f"local-{run_id}")
                processes[run_id] = subprocess.Popen(
                    [str(python), str(ACTOR), *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
                )
        codes = {run_id: process.wait(timeout=ACTOR_TIMEOUT) for run_id, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes, "\n".join(f"--- {run_id}\n{log.read_text()[-3000:]}" for run_id, log in logs.items())


def _check_crawl(client: ApifyClient, site: str, queue_id: str, dataset_id: str, tails: str) -> Counter[str]:
    """Every page of the site is a handled request of the queue and one item of the dataset; items by run."""
    pages = {f"{site}/page/{n}" for n in range(PAGES)}
    requests = list(client.request_queue(queue_id).iterate_requests(chunk_size=15))
    assert sorted(r.url for r in requests) == sorted(pages), tails
    assert all(r.handled_at is not None for r in requests)
    items = list(client.dataset(dataset_id).iterate_items())
    assert Counter(item["url"] for item in items) == dict.fromkeys(pages, 1), tails  # none lost, none twice
    return Counter(item["run"] for item in items)


@pytest.mark.slow
def test_two_sdk_actors_share_one_queue_and_handle_every_page_once(
    base_url: str, storage: Path, tmp_path: Path
) -> None:
    """Two SDK Actors over one queue: each of the 60 pages handled exactly once, by one of them, both working."""
    client = ApifyClient(TOKEN, api_url=base_url, api_public_url=base_url, max_retries=0)
    with serve_site(PAGES) as site:
        codes, tails = _run_actors(base_url, tmp_path, RUNS, site)
    assert codes == dict.fromkeys(RUNS, 0), tails
    by_run = _check_crawl(client, site, IDS["queue"], IDS["dataset"], tails)
    assert set(by_run) == set(RUNS), by_run  # both Actors took part
    for run_id in RUNS:
        run = client.run(run_id).get()
        assert run is not None
        assert (run.status_message, run.is_status_message_terminal) == (f"handled {by_run[run_id]} pages", True)
    assert (storage / "datasets" / f"{IDS['dataset']}.jsonl").read_text().count("\n") == PAGES


@pytest.mark.slow
def test_an_sdk_actor_in_single_mode_lists_the_queue_and_crawls_it(tmp_path: Path) -> None:
    """One SDK Actor in `single` mode (it lists the queue's requests and reads the head unlocked) crawls all pages."""
    extra = ["--default-queue-id", IDS["queue"], "--default-dataset-id", IDS["dataset"]]
    extra += ["--default-kv-store-id", IDS["kv"]]
    with running_server(tmp_path / "storage", token=TOKEN, extra_args=extra) as url, serve_site(PAGES) as site:
        codes, tails = _run_actors(url, tmp_path, ("solo",), site, "single")
        assert codes == {"solo": 0}, tails
        client = ApifyClient(TOKEN, api_url=url, api_public_url=url, max_retries=0)
        assert _check_crawl(client, site, IDS["queue"], IDS["dataset"], tails) == {"solo": PAGES}
