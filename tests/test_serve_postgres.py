"""`headlock serve --store postgresql://...`: replicas on one database share its queues, and the DSN's password is
never shown.

The API itself runs on both stores in tests/test_server*.py; here is what only the PostgreSQL store has.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from structlog.testing import capture_logs

from runner.errors import QueueUnavailableError
from runner.queue.postgres._served import QueueDatabase
from runner.results.jsonl import read_items
from runner.server import create_app
from runner.server._command import STORE_HELP
from tests._postgres import LOGIN_ROLE, SECRET_PASSWORD, Postgres
from tests._server import REPO, running_server, serving_app
from tests.conftest import cli_env, headlock, reaped, start_headlock, wait_for
from tests.test_cli import attempting_pids, attempts, logged, write_urls


def as_url(dsn: str, **replace: str) -> str:
    """`dsn` (key=value pairs) as a postgresql:// URL, with `replace`'s parameters instead of its own."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()} | replace
    user, password, dbname = params.pop("user", ""), params.pop("password", None), params.pop("dbname", "")
    auth = quote(user, safe="") + ("" if password is None else ":" + quote(password, safe="")) + "@"
    query = "&".join(f"{key}={quote(value, safe='')}" for key, value in sorted(params.items()))
    return f"postgresql://{auth}/{quote(dbname, safe='')}?{query}"


def forms(secret: str) -> list[str]:
    """`secret` as it could appear in text: raw and URL-encoded."""
    return [secret, quote(secret, safe=""), quote(secret)]


def shows(text: str, secret: str) -> bool:
    return any(form in text for form in forms(secret))


def secret_dsn(postgres: Postgres) -> str:
    """A DSN of a fresh schema that logs in as the password role, with its password."""
    return make_conninfo(postgres.fresh_dsn(), user=LOGIN_ROLE, password=SECRET_PASSWORD)


# -- replicas -------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_replicas_serve_the_queue_as_it_is_now(tmp_path: Path, postgres_dsn: str) -> None:
    """Two servers on one database: a queue made, filled, locked, deleted or re-made on one is so on the other."""
    apps = [create_app(tmp_path / name, queue_dsn=postgres_dsn) for name in ("a", "b")]
    async with (
        serving_app(apps[0]) as base_a,
        serving_app(apps[1]) as base_b,
        httpx.AsyncClient(base_url=base_a, timeout=10) as a,
        httpx.AsyncClient(base_url=base_b, timeout=10) as b,
    ):
        made = await a.post("/v2/request-queues", params={"name": "shared"})
        assert made.status_code == 201
        queue_id = made.json()["data"]["id"]
        assert (await b.get("/v2/request-queues/shared")).json()["data"]["id"] == queue_id
        assert (await a.get("/v2/request-queues/shared")).json()["data"]["id"] == queue_id
        added = await b.post(
            f"/v2/request-queues/{queue_id}/requests", json={"url": "http://e.com/1", "uniqueKey": "1"}
        )
        assert added.status_code == 201
        locked = await a.post(f"/v2/request-queues/{queue_id}/head/lock", params={"lockSecs": 60, "clientKey": "a"})
        assert [i["uniqueKey"] for i in locked.json()["data"]["items"]] == ["1"]
        other = (await b.post(f"/v2/request-queues/{queue_id}/head/lock", params={"lockSecs": 60})).json()["data"]
        assert (other["items"], other["queueHasLockedRequests"]) == ([], True)
        # Deleted on b: a, which has served the queue, no longer does, and stores nothing in it.
        assert (await b.delete(f"/v2/request-queues/{queue_id}")).status_code == 204
        for ref in (queue_id, "shared"):
            assert (await a.get(f"/v2/request-queues/{ref}")).status_code == 404
            late = await a.post(f"/v2/request-queues/{ref}/requests", json={"url": "http://e.com/3", "uniqueKey": "3"})
            assert late.status_code == 404
        # Made again under the same name on b: a serves the new queue, not the one it knew.
        again = (await b.post("/v2/request-queues", params={"name": "shared"})).json()["data"]["id"]
        await b.post(f"/v2/request-queues/{again}/requests", json={"url": "http://e.com/2", "uniqueKey": "2"})
        info = (await a.get("/v2/request-queues/shared")).json()["data"]
        assert (info["id"], info["totalRequestCount"]) == (again, 1)
        assert again != queue_id
        # Both asked at once for a new name: one of them made it, both answer with it.
        answers: list[httpx.Response] = []

        async def make(client: httpx.AsyncClient) -> None:
            answers.append(await client.post("/v2/request-queues", params={"name": "raced"}))

        async with anyio.create_task_group() as group:
            group.start_soon(make, a)
            group.start_soon(make, b)
        assert sorted(r.status_code for r in answers) == [200, 201]
        assert len({r.json()["data"]["id"] for r in answers}) == 1


@pytest.mark.slow
def test_two_replicas_one_queue_each_page_handled_once(tmp_path: Path, postgres_dsn: str) -> None:
    """A worker on each of two serve replicas, one queue in PostgreSQL: every request handled once, by both."""
    count = 60
    log = tmp_path / "attempts.log"
    url = as_url(postgres_dsn)
    with (
        running_server(tmp_path / "a", store=url) as base_a,
        running_server(tmp_path / "b", store="postgres", env={"DATABASE_URL": postgres_dsn}) as base_b,
    ):
        # Each worker takes one request at a time, and both are polling the empty queue before the work comes:
        # neither can take it all before the other starts.
        common = ["run", "--backend", "apify", "--handler", "tests.sample_handlers:slow", "--keep-alive"]
        common += ["--concurrency", "2", "-O", f'attempts_file="{log}"', "-O", "sleep=0.05", "--log-format", "json"]
        one_at_a_time = {"HEADLOCK_WORKERS__PREFETCH": "0", "HEADLOCK_WORKERS__BATCH": "1"}
        logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
        workers = [
            start_headlock(*common, "--api-base-url", base, cwd=tmp_path, stderr=err, **one_at_a_time)
            for base, err in zip((base_a, base_b), logs, strict=True)
        ]
        with reaped(*workers):
            wait_for(lambda: all(logged(err, "run.starting") for err in logs), 60, "both workers to start")
            urls = write_urls(tmp_path / "urls.txt", count)
            added = headlock(
                "enqueue", "--backend", "apify", "--api-base-url", base_a, "--file", str(urls), cwd=tmp_path
            )
            assert added.returncode == 0, added.stderr

            def handled() -> bool:
                info = httpx.get(f"{base_b}/v2/request-queues/default", timeout=10).json()["data"]
                return bool(info["handledRequestCount"] == count)

            wait_for(handled, 90, "every request handled")
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker, err in zip(workers, logs, strict=True):
                worker.wait(timeout=30)
                assert worker.returncode == 128 + signal.SIGTERM, err.read_text()[-3000:]
        info = httpx.get(f"{base_a}/v2/request-queues/default", timeout=10).json()["data"]
    assert (info["totalRequestCount"], info["handledRequestCount"], info["pendingRequestCount"]) == (count, count, 0)
    tries = attempts(log)
    assert (len(tries), max(tries.values())) == (count, 1)
    assert len(attempting_pids(log)) == 2
    # Datasets stay with each server: each worker's items are in its replica's storage, none in both.
    items = [Counter(i["url"] for i in read_items(tmp_path / name / "datasets/default.jsonl")) for name in "ab"]
    assert all(items)
    assert (len(items[0] + items[1]), max((items[0] + items[1]).values())) == (count, 1)


# -- the password ---------------------------------------------------------------------------------------------


def test_a_wrong_password_stops_serve_before_it_listens(tmp_path: Path, postgres: Postgres) -> None:
    """A refused login: exit 1, one line naming the database, no address announced, no password shown."""
    wrong = "wr0ng-Pw%21@x"
    dsn = as_url(make_conninfo(postgres.fresh_dsn(), user=LOGIN_ROLE), password=wrong)
    result = headlock("serve", "--port", "0", "--storage", str(tmp_path), "--store", dsn, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "listening on" not in result.stdout
    assert "headlock: error: serve did not start: open database: cannot connect to postgres" in result.stderr
    assert "password authentication failed" in result.stderr
    assert not shows(result.stdout + result.stderr, wrong)
    assert "Traceback" not in result.stderr


def test_the_password_never_shows_in_logs_or_answers(tmp_path: Path, postgres: Postgres) -> None:
    """At debug level, through errors of every kind and a database that cuts the connections, no password."""
    dsn = secret_dsn(postgres)
    err = tmp_path / "serve.log"
    answers: list[str] = []
    with (
        running_server(tmp_path, store=as_url(dsn), extra_args=["--log-level", "debug"], stderr=err) as base,
        httpx.Client(base_url=base, timeout=10) as http,
    ):
        queue = "/v2/request-queues/" + http.post("/v2/request-queues", params={"name": "pw"}).json()["data"]["id"]
        calls = [
            http.post(f"{queue}/requests", json={"url": "http://e.com/", "uniqueKey": "e"}),
            http.post(f"{queue}/head/lock", params={"lockSecs": 60}),
            http.get(f"{queue}/requests/nope"),
            http.post(f"{queue}/requests", content=b"{", headers={"Content-Type": "application/json"}),
            http.get("/v2/request-queues/missing"),
        ]
        # The database ends the server's sessions: the next calls reconnect (their errors are mapped there).
        with psycopg.connect(postgres.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (LOGIN_ROLE,))
        calls += [http.get(queue), http.delete(queue), http.get(queue)]
        answers = [f"{r.status_code} {r.text}" for r in calls]
    assert [a.split()[0] for a in answers] == ["201", "201", "404", "400", "404", "200", "204", "404"]
    text = err.read_text() + "\n".join(answers)
    assert "server.store_opened" in text  # the log was written, at debug level
    assert not shows(text, SECRET_PASSWORD)


@pytest.mark.anyio
async def test_reprs_events_and_errors_show_no_password(tmp_path: Path, postgres: Postgres) -> None:
    """The registry, a queue, the log events and a refused login's error name the database, never the password."""
    dsn = secret_dsn(postgres)
    app = create_app(tmp_path, queue_dsn=dsn)
    registry = app.state.registry
    with capture_logs() as events:
        async with serving_app(app) as base, httpx.AsyncClient(base_url=base) as http:
            await http.post("/v2/request-queues", params={"name": "shown"})
            queue = await registry.resolve("shown")
            shown = [repr(registry), repr(queue), repr(queue.store), str(queue.store.where)]
    with pytest.raises(QueueUnavailableError) as refused:
        await QueueDatabase.open(make_conninfo(dsn, password=SECRET_PASSWORD + "-not"))
    shown += [str(refused.value), repr(refused.value), repr(events)]
    assert "postgres " in shown[0]
    assert "password authentication failed" in str(refused.value)
    assert not any(shows(text, SECRET_PASSWORD) for text in shown)


# -- the option -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "needle"),
    [
        ("postgresq://u:Hidden-Pw-1@localhost/db", "must be 'embedded', 'postgres' or a PostgreSQL DSN"),
        ("postgresql://u:Hidden-Pw-1@localhost/db?bogus=1", "not a valid PostgreSQL connection string"),
        ("host=localhost password='Hidden-Pw-1", "not a valid PostgreSQL connection string"),
        ("postgres", "set HEADLOCK_QUEUE__DSN or DATABASE_URL"),
    ],
    ids=["not-a-dsn", "bad-url-parameter", "unterminated-quote", "postgres-without-a-dsn"],
)
def test_a_bad_store_is_a_usage_error_that_shows_no_password(tmp_path: Path, store: str, needle: str) -> None:
    """--store that is no store, a DSN that does not parse, or 'postgres' with no DSN set: exit 2, no password."""
    result = headlock("serve", "--port", "0", "--store", store, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Hidden-Pw-1" not in result.stderr
    assert "listening on" not in result.stdout


def test_both_serve_commands_say_where_the_queues_and_the_datasets_are() -> None:
    """`headlock serve --help` and `python -m runner.server --help` explain --store alike: datasets stay local."""
    helps = [
        headlock("serve", "--help", cwd=REPO).stdout,
        subprocess.run(
            [sys.executable, "-m", "runner.server", "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=cli_env(),
            timeout=60,
            check=True,
        ).stdout,
    ]
    for text in helps:  # compared without whitespace: the help is wrapped, at hyphens too
        assert "".join(STORE_HELP.split()) in "".join(text.split())
