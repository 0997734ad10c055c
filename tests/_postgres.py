"""A throwaway PostgreSQL cluster for the tests: `initdb` into a temporary directory, a unix socket only, no fsync.

`HEADLOCK_TEST_POSTGRES_DSN` names a server to use instead (its database must let the tests create schemas). Each
test gets a schema of its own (`Postgres.fresh_dsn`): a DSN whose `search_path` is that schema.

The server runs as an unprivileged user (`initdb` refuses root; as root, `nobody`), listening on no TCP port. Every
wait is bounded; a cluster that cannot start raises `ClusterError` with the server's log, which the fixtures turn
into a failed test (never a skip).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

__all__ = ["DSN_VARIABLE", "LOGIN_ROLE", "SECRET_PASSWORD", "ClusterError", "Postgres", "find_bindir", "start"]

DSN_VARIABLE = "HEADLOCK_TEST_POSTGRES_DSN"
LOGIN_ROLE = "headlock_login"
"""A role that must log in with a password (scram-sha-256), to check that the password is never shown."""
SECRET_PASSWORD = "pw-9d1c!Z@k%q"  # noqa: S105 - a test cluster's throwaway password
_SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "deadlock_timeout": "'50ms'",  # a deadlock (which a test must not cause) is found at once, not after 1 s
}
_WAIT = 30
"""Seconds any step (initdb, start, stop, restart) may take."""


class ClusterError(RuntimeError):
    """The test cluster could not be made, started or stopped (the message carries the server's log tail)."""


def find_bindir() -> Path | None:
    """The directory of the PostgreSQL server programs: `initdb` on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name or 0)
    )
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class Postgres:
    """A server the tests may use: its base DSN, and (for a cluster of our own) how to restart and stop it."""

    dsn: str
    datadir: Path | None = None
    bindir: Path | None = None
    user: str | None = None
    root: Path | None = None
    _schemas: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fresh_dsn(self, prefix: str = "t") -> str:
        """A DSN whose search_path is a new, empty schema (created here)."""
        schema = f"{prefix}_{os.getpid()}_{next(self._schemas)}"
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=_WAIT) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
            conn.execute(f'GRANT ALL ON SCHEMA "{schema}" TO PUBLIC')
        return make_conninfo(self.dsn, options=f"-csearch_path={schema}")

    def secret_dsn(self, password: str = SECRET_PASSWORD) -> str:
        """The DSN of the password role, with `password` (our own cluster only)."""
        return make_conninfo(self.dsn, user=LOGIN_ROLE, password=password)

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run pg_ctl on our own cluster as its user; raise `ClusterError` (with the log's tail) when it fails."""
        if self.datadir is None or self.bindir is None:
            raise ClusterError(f"{DSN_VARIABLE} names a server of someone else's: the tests cannot control it")
        result = _run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args], self.user)
        if result.returncode != 0:
            raise ClusterError(f"pg_ctl {' '.join(args)} failed: {result.stdout}{result.stderr}{self.log_tail()}")
        return result

    def restart(self) -> None:
        """Restart the server (fast shutdown: its connections are cut), waiting until it accepts connections."""
        self.pg_ctl("restart", "-m", "fast", "-w", "-t", str(_WAIT), "-l", str(self._log()))

    def halt(self) -> None:
        """Stop the server (fast shutdown: its connections are cut) until `resume` (our own cluster only)."""
        self.pg_ctl("stop", "-m", "fast", "-w", "-t", str(_WAIT))

    def resume(self) -> None:
        """Start the server `halt` stopped, waiting until it accepts connections."""
        self.pg_ctl("start", "-w", "-t", str(_WAIT), "-l", str(self._log()))

    def stop(self) -> None:
        """Stop the server at once and remove its directory (our own cluster only; idempotent)."""
        if self.datadir is None or self.root is None:
            return
        if (self.datadir / "postmaster.pid").exists():
            with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                self.pg_ctl("stop", "-m", "immediate", "-w", "-t", str(_WAIT))
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _log(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for error messages."""
        if self.root is None:
            return ""
        try:
            text = self._log().read_text(errors="replace")
        except OSError:
            return ""
        return "\nserver log:\n" + "\n".join(text.splitlines()[-lines:])


def _run(args: list[str], user: str | None) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, Any] = {"user": user} if user else {}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=_WAIT + 10, check=False, env=_env(), cwd="/", **kwargs
    )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = env["LANG"] = "C.UTF-8"
    return env


def start() -> Postgres:
    """The server to test against: `HEADLOCK_TEST_POSTGRES_DSN`, or a new cluster of our own, started.

    Raises:
        ClusterError: no server programs, or the cluster cannot be made or started (with the reason and the log).
    """
    given = os.environ.get(DSN_VARIABLE, "").strip()
    if given:
        try:
            with psycopg.connect(given, autocommit=True, connect_timeout=_WAIT) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise ClusterError(f"{DSN_VARIABLE} is set but the server does not answer: {exc}") from None
        return Postgres(dsn=given)
    return start_cluster()


def start_cluster() -> Postgres:
    """A new cluster of our own in a temporary directory, started (see the module docstring).

    Raises:
        ClusterError: no server programs, or initdb or the start failed.
    """
    bindir = find_bindir()
    if bindir is None:
        raise ClusterError(
            "no PostgreSQL server programs (initdb) on PATH or in /usr/lib/postgresql/*/bin:"
            " install them (`apt-get install -y postgresql`; .ci/run does)"
        )
    user = "nobody" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="hl-pg-", dir="/tmp"))  # short: a socket path has at most 107 bytes
    cluster = Postgres(dsn="", datadir=root / "data", bindir=bindir, user=user, root=root)
    try:
        _init(cluster)
    except BaseException as exc:
        tail = cluster.log_tail()
        cluster.stop()
        if isinstance(exc, ClusterError):
            raise
        raise ClusterError(f"cannot start a test cluster: {exc}{tail}") from exc
    return cluster


def _init(cluster: Postgres) -> None:
    """initdb, configure, start, and create the password role."""
    root, datadir, bindir, user = cluster.root, cluster.datadir, cluster.bindir, cluster.user
    assert root is not None
    assert datadir is not None
    assert bindir is not None
    root.chmod(0o755)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    init = _run(
        [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "--no-sync",
         "-E", "UTF8", "--locale=C.UTF-8"],
        user,
    )  # fmt: skip
    if init.returncode != 0:
        hint = "" if Path("/dev/null").is_char_device() else " (/dev/null is not a device on this machine)"
        raise ClusterError(f"initdb failed (exit {init.returncode}){hint}: {init.stdout}{init.stderr}")
    settings = dict(_SETTINGS, unix_socket_directories=f"'{root}'", port="5432")
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write("".join(f"{key} = {value}\n" for key, value in settings.items()))
    (datadir / "pg_hba.conf").write_text(f"local all {LOGIN_ROLE} scram-sha-256\nlocal all all trust\n")
    cluster.pg_ctl("start", "-w", "-t", str(_WAIT), "-l", str(root / "server.log"))
    cluster.dsn = make_conninfo(host=str(root), port="5432", dbname="postgres", user="postgres")
    with psycopg.connect(cluster.dsn, autocommit=True, connect_timeout=_WAIT) as conn:
        conn.execute(f"CREATE ROLE {LOGIN_ROLE} LOGIN PASSWORD '{SECRET_PASSWORD}'")
        conn.execute(f"GRANT CREATE ON DATABASE postgres TO {LOGIN_ROLE}")
