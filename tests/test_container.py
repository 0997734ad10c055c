"""The container image without Docker: install as the Dockerfile does, run its entry command as a non-root user.

The Dockerfile is read, not copied: its `COPY` sources, `ENV`, `ENTRYPOINT`/`CMD` and `HEALTHCHECK` are what this
test uses, so the two cannot drift apart. Installing needs the package index (as the image build does).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner.results.jsonl import read_items
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
INSTALL_TIMEOUT = 900


@dataclass(frozen=True)
class Image:
    """What the Dockerfile describes, installed under `root` (world-readable, unlike pytest's temp dirs)."""

    root: Path
    bin: Path
    env: dict[str, str]
    command: list[str]
    healthcheck: list[str]


def dockerfile() -> tuple[list[str], dict[str, str], list[str], list[str]]:
    """The Dockerfile's project COPY sources (after the lock), ENV, ENTRYPOINT + CMD and HEALTHCHECK command."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    sources: list[str] = []
    env: dict[str, str] = {}
    entry: list[str] = []
    cmd: list[str] = []
    health: list[str] = []
    for line in instructions:
        keyword, _, rest = line.partition(" ")
        if keyword == "COPY":
            sources += [s.rstrip("/") for s in shlex.split(rest)[:-1] if not s.startswith("--")]
        elif keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[arg-type]
        elif keyword == "ENTRYPOINT":
            entry = json.loads(rest)
        elif keyword == "CMD":
            cmd = json.loads(rest)
        elif keyword == "HEALTHCHECK":
            health = json.loads(rest.split(" CMD ", 1)[1])
    return sources, env, entry + cmd, health


def pip(python: Path, *args: str) -> None:
    """Run pip in the image's environment; fail the test with pip's output if it fails."""
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"pip install {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def drop() -> dict[str, Any]:
    """Popen arguments that run a child as a non-root user: uid/gid nobody when we are root, nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    drop: dict[str, Any] = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    try:
        probe = subprocess.run(["id", "-u"], capture_output=True, text=True, timeout=10, check=False, **drop)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"running as root and cannot switch a child to uid {NOBODY}: {exc}")
    if probe.returncode != 0 or probe.stdout.strip() != str(NOBODY):
        pytest.skip(f"running as root and cannot switch a child to uid {NOBODY}: {probe.stderr.strip()}")
    return drop


def interpreter(drop: dict[str, Any]) -> str:
    """A Python >= 3.11 the child's user can run (the image's is /usr/local/bin/python; ours may sit under /root)."""
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/local/bin/python3", "/usr/bin/python3"]
    check = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"
    for candidate in filter(None, candidates):
        try:
            probe = subprocess.run([candidate, "-c", check], capture_output=True, timeout=30, check=False, **drop)
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python >= 3.11 with venv that uid {os.geteuid() if not drop else NOBODY} may run: {candidates}")


@pytest.fixture(scope="module")
def image(drop: dict[str, Any]) -> Iterator[Image]:
    """A fresh venv with requirements.lock, then the project with --no-deps, from the files the Dockerfile copies."""
    sources, env, command, healthcheck = dockerfile()
    python_for_image = interpreter(drop)
    assert command[:2] == ["headlock", "run"]
    assert healthcheck[:2] == ["headlock", "health"]
    root = Path(tempfile.mkdtemp(prefix="headlock-image-"))
    try:
        root.chmod(0o755)  # the non-root user must reach the venv
        app = root / "app"
        app.mkdir()
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, app / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, app / source)
        subprocess.run([python_for_image, "-m", "venv", str(root / "venv")], check=True, timeout=120)
        python = root / "venv" / "bin" / "python"
        pip(python, "-r", str(app / "requirements.lock"))
        pip(python, "--no-deps", str(app))
        command = [arg.replace("/app/", f"{app}/") for arg in command]  # the image's /app is `app` here
        yield Image(root=root, bin=root / "venv" / "bin", env=env, command=command, healthcheck=healthcheck)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def metrics(port: int) -> dict[str, float]:
    """Unlabelled samples of /metrics on 127.0.0.1:`port`; empty while nothing answers."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_the_image_command_runs_as_non_root_from_the_environment_only(
    image: Image, drop: dict[str, Any], site: str
) -> None:
    """Env-only config, non-root: `headlock run` crawls a local site, serves /metrics, is healthy, exits 143 on TERM."""
    data = image.root / "data"  # the image's /data
    scratch = image.root / "tmp"  # the image's /tmp
    for path in (data, scratch):
        path.mkdir()
        if drop:
            os.chown(path, NOBODY, NOBODY)
    port = free_port()
    env = {
        "PATH": f"{image.bin}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "LANG": "C.UTF-8",
        **image.env,
        "HEADLOCK_STORAGE_DIR": str(data),
        "HEADLOCK_HEALTH_FILE": str(scratch / "headlock.health"),
        "HEADLOCK_METRICS_HOST": "127.0.0.1",  # the image listens on every interface; the test needs loopback only
        "HEADLOCK_METRICS_PORT": str(port),
        "HEADLOCK_HANDLER": "handlers.fetch:handle",
        "HEADLOCK_WORKERS__CONCURRENCY": "3",
        "HEADLOCK_WORKERS__KEEP_ALIVE": "true",
        "HEADLOCK_PROGRESS_EVERY": "0.2",
        "HEADLOCK_LOG_FORMAT": "json",
    }

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(image.bin / args[0]), *args[1:]],
            cwd=data,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            **drop,
        )

    urls = [f"{site}/page/{i}" for i in range(6)]
    enqueued = command("headlock", "enqueue", *urls)
    assert enqueued.returncode == 0, enqueued.stderr
    events = image.root / "events.jsonl"
    with events.open("w") as err:
        proc = subprocess.Popen(
            [str(image.bin / image.command[0]), *image.command[1:]],
            cwd=data,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            **drop,
        )
    try:
        done = {
            "headlock_requests_handled_total": 6,
            "headlock_requests_failed_total": 0,
            "headlock_requests_in_flight": 0,
            "headlock_leases_held": 0,
            "headlock_queue_pending": 0,
        }
        wait_for(lambda: metrics(port).items() >= done.items(), 60, f"{done} on /metrics")
        health = command(*image.healthcheck)
        assert health.returncode == 0, health.stderr
        assert health.stdout.startswith("healthy:")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, events.read_text()[-3000:]

    results = data / "datasets" / "default.jsonl"
    assert sorted(item["url"] for item in read_items(results)) == sorted(urls)
    assert {item["status"] for item in read_items(results)} == {200}
    if drop:
        assert results.stat().st_uid == NOBODY  # written by the non-root child
    status = command("headlock", "status", "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert (counts["total"], counts["handled"], counts["pending"], counts["locked"]) == (6, 6, 0, 0)
    old = time.time() - 60
    os.utime(scratch / "headlock.health", (old, old))
    stale = command(*image.healthcheck)
    assert stale.returncode == 1
    assert stale.stderr.startswith("unhealthy: last heartbeat")
