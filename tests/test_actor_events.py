"""The platform events listener against a real websocket server on 127.0.0.1 (tests/_events.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from structlog.testing import capture_logs

from runner.actor.events import EXCERPT, PlatformEvent, Reconnect, listen_events, socket_name
from runner.errors import ConfigError
from tests._events import event_server
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

FAST = Reconnect(initial=0.05, maximum=0.4, healthy_after=10.0, open_timeout=2.0)
"""Delays short enough for tests; `healthy_after` long enough that no test connection counts as healthy."""


@asynccontextmanager
async def listening(
    url: str, *, buffer: int = 100, reconnect: Reconnect = FAST
) -> AsyncIterator[tuple[MemoryObjectReceiveStream[PlatformEvent], bool]]:
    """Run `listen_events(url)` in a task group; yield its receive stream and whether the first connect succeeded."""
    send, receive = anyio.create_memory_object_stream[PlatformEvent](buffer)
    async with anyio.create_task_group() as group, receive:
        with anyio.fail_after(5):
            connected = await group.start(listen, url, send, reconnect)
        yield receive, connected
        group.cancel_scope.cancel()


async def listen(
    url: str, send: MemoryObjectSendStream[PlatformEvent], reconnect: Reconnect, *, task_status: TaskStatus[bool]
) -> None:
    """`listen_events` with positional options, for `group.start`."""
    await listen_events(url, send, reconnect=reconnect, task_status=task_status)


async def wait_for_a_blocked_sender(receive: MemoryObjectReceiveStream[PlatformEvent]) -> None:
    """Poll (5 s at most) until the listener waits for room in the buffer: all messages before it were handled."""
    with anyio.fail_after(5):
        # anyio has no event for "a sender waits": polling the stream's statistics, bounded by the deadline.
        while receive.statistics().tasks_waiting_send == 0:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def next_event(receive: MemoryObjectReceiveStream[PlatformEvent]) -> PlatformEvent:
    """The next event, failing after 5 s."""
    with anyio.fail_after(5):
        return await receive.receive()


def events_named(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured log entries of event `name`."""
    return [entry for entry in logs if entry["event"] == name]


async def test_events_arrive_in_order_with_their_data() -> None:
    """Every event the server sends arrives once, in order, with its name, data and createdAt."""
    async with event_server() as server, listening(server.url) as (receive, connected):
        assert connected
        await server.wait_connected(1)
        names = ["systemInfo", "persistState", "migrating", "aborting"] * 5
        for i, name in enumerate(names):
            await server.send(name, {"i": i, "isMigrating": name == "migrating"})
        got = [await next_event(receive) for _ in names]
    assert [event.name for event in got] == names
    assert [event.data["i"] for event in got] == list(range(len(names)))
    assert got[2].data["isMigrating"] is True
    assert all(event.created_at and event.created_at.endswith("Z") for event in got)


async def test_an_event_without_data_gets_an_empty_mapping() -> None:
    """A message with no `data` or `data: null` (as `aborting` may come) is an event with empty, read-only data."""
    async with event_server() as server, listening(server.url) as (receive, _):
        await server.wait_connected(1)
        await server.send_raw('{"name": "aborting"}')
        await server.send("migrating", None)
        aborting, migrating = await next_event(receive), await next_event(receive)
    assert (aborting.name, dict(aborting.data), aborting.created_at) == ("aborting", {}, None)
    assert (migrating.name, dict(migrating.data)) == ("migrating", {})
    with pytest.raises(TypeError):
        aborting.data["x"] = 1  # type: ignore[index]


async def test_malformed_messages_are_skipped_and_later_events_arrive() -> None:
    """Messages that are not JSON objects with a string name and object data are logged and skipped, not fatal."""
    bad: list[str | bytes] = [
        "not json at all",
        "[1, 2, 3]",
        '{"name": 5}',
        '{"name": ""}',
        '{"data": {}}',
        '{"name": "migrating", "data": [1]}',
        "[" * 100_000,  # deeper than the JSON parser recurses
        b"\xff\xfe not utf-8",
        "x" * 50_000,
    ]
    with capture_logs() as logs:
        async with event_server() as server, listening(server.url) as (receive, _):
            await server.wait_connected(1)
            for message in bad:
                await server.send_raw(message)
            await server.send("aborting", {"ok": True})
            event = await next_event(receive)
            assert server.connections == 1
    assert (event.name, dict(event.data)) == ("aborting", {"ok": True})
    malformed = events_named(logs, "actor.events.malformed")
    assert len(malformed) == len(bad)
    assert all(len(entry["excerpt"]) <= EXCERPT + 10 for entry in malformed)  # repr of bytes adds b'...'
    assert malformed[-1]["size"] == 50_000
    assert not events_named(logs, "actor.events.disconnected")


async def test_a_dropped_connection_reconnects_and_later_events_arrive() -> None:
    """After the server cuts the connection, the listener reconnects and receives what is sent afterwards."""
    with capture_logs() as logs:
        async with event_server() as server, listening(server.url) as (receive, _):
            await server.wait_connected(1)
            await server.send("persistState", {"isMigrating": False})
            assert (await next_event(receive)).name == "persistState"
            await server.drop()
            await server.wait_connected(2)
            await server.send("migrating", {"timeRemainingSecs": 30})
            event = await next_event(receive)
    assert (event.name, event.data["timeRemainingSecs"]) == ("migrating", 30)
    [disconnected] = events_named(logs, "actor.events.disconnected")
    assert disconnected["code"] == 1006
    assert len(events_named(logs, "actor.events.connected")) == 2


async def test_a_server_down_at_first_is_connected_to_once_it_comes_up() -> None:
    """The first connect fails (reported as started with False); the listener keeps trying and gets through."""
    port = free_port()
    with capture_logs() as logs:
        async with listening(f"ws://127.0.0.1:{port}") as (receive, connected):
            assert connected is False
            async with event_server(port) as server:
                await server.wait_connected(1)
                await server.send("aborting")
                assert (await next_event(receive)).name == "aborting"
    assert events_named(logs, "actor.events.connect_failed")


async def test_reconnects_back_off_from_a_server_that_hangs_up_at_once() -> None:
    """Connections that are cut right after the handshake are retried with growing delays, not in a tight loop."""
    async with event_server() as server:
        server.hang_up = True
        async with listening(server.url):
            await anyio.sleep(1.0)  # measuring: how many attempts fit in one second
        attempts = server.connections
    # Delays from 0.025-0.05 s doubling to 0.2-0.4 s: at most 8 attempts in 1 s. Without growth (or with a reset on
    # every handshake) 20 or more would fit, without any delay hundreds.
    assert 2 <= attempts <= 10


async def test_the_delays_start_over_after_a_healthy_connection() -> None:
    """Delays grown by connections cut at once shrink back to the first one after a connection that stayed up."""
    reconnect = Reconnect(initial=0.05, maximum=0.4, healthy_after=0.2, open_timeout=2.0)
    with capture_logs() as logs:
        async with event_server() as server, listening(server.url, reconnect=reconnect):
            await server.wait_connected(1)
            server.hang_up = True
            await server.drop()
            with anyio.fail_after(5):
                while server.connections < 5:  # noqa: ASYNC110 - the server's counter, polled under a deadline
                    await anyio.sleep(0.01)
            server.hang_up = False
            await server.wait_connected(server.connections + 1)
            await anyio.sleep(reconnect.healthy_after)  # what is tested: a connection that stays up this long
            await server.drop()
            await server.wait_connected(server.connections + 1)
    delays = [entry["retry_in"] for entry in events_named(logs, "actor.events.disconnected")]
    assert delays[3] > reconnect.initial  # grown while the server hung up at once
    assert delays[-1] <= reconnect.initial  # started over after the healthy connection


async def test_failed_connects_back_off() -> None:
    """Refused connects are retried with growing delays, not in a tight loop."""
    with capture_logs() as logs:
        async with listening(f"ws://127.0.0.1:{free_port()}") as (_, connected):
            assert connected is False
            await anyio.sleep(1.0)  # measuring: how many attempts fit in one second
    failed = events_named(logs, "actor.events.connect_failed")
    assert 2 <= len(failed) <= 10
    delays = [entry["retry_in"] for entry in failed]
    assert delays[3] > delays[0]


async def test_a_policy_violation_close_waits_the_longest_delay() -> None:
    """A close with code 1008 (the platform's unknown run or too many connections) is retried, but only slowly."""
    with capture_logs() as logs:
        async with event_server() as server, listening(server.url):
            await server.wait_connected(1)
            await server.close(1008, "too many connections")
            await server.wait_connected(2)
    [disconnected] = events_named(logs, "actor.events.disconnected")
    assert (disconnected["code"], disconnected["reason"]) == (1008, "too many connections")
    assert disconnected["retry_in"] >= FAST.maximum / 2


async def test_system_info_is_dropped_while_the_reader_lags_but_other_events_wait() -> None:
    """With the buffer full, systemInfo events are dropped (logged at 1, 2, 4...), a migrating event waits for room."""
    with capture_logs() as logs:
        async with event_server() as server, listening(server.url, buffer=1) as (receive, _):
            await server.wait_connected(1)
            for i in range(6):
                await server.send("systemInfo", {"i": i})
            await server.send("migrating")
            await wait_for_a_blocked_sender(receive)  # parked on the migrating event
            got = [await next_event(receive), await next_event(receive)]
    assert [(event.name, event.data.get("i")) for event in got] == [("systemInfo", 0), ("migrating", None)]
    assert [entry["dropped"] for entry in events_named(logs, "actor.events.dropped")] == [1, 2, 4]


async def test_cancellation_stops_it_promptly_and_closes_the_stream() -> None:
    """Cancelling the listener, connected or waiting to reconnect or blocked on a full buffer, ends it within 1 s."""
    slow = Reconnect(initial=30.0, maximum=30.0, open_timeout=2.0)
    async with event_server() as server:
        for case in ("connected", "reconnecting", "blocked"):
            send, receive = anyio.create_memory_object_stream[PlatformEvent](1)
            before = server.connections
            async with anyio.create_task_group() as group:
                await group.start(listen, server.url, send, slow)
                await server.wait_connected(before + 1)
                if case == "reconnecting":
                    await server.drop()  # the next attempt is 15-30 s away
                if case == "blocked":
                    await server.send("aborting")  # fills the buffer
                    await server.send("migrating")  # waits for room
                    await wait_for_a_blocked_sender(receive)
                started = anyio.current_time()
                group.cancel_scope.cancel()
            assert anyio.current_time() - started < 1.0, case
            with receive, anyio.fail_after(1):
                if case == "blocked":
                    assert (await receive.receive()).name == "aborting"
                with pytest.raises(anyio.EndOfStream):
                    await receive.receive()


async def test_it_returns_when_the_reader_closes_its_stream() -> None:
    """With nobody reading any more, the listener logs that it stops and returns instead of reconnecting forever."""
    with capture_logs() as logs:
        async with event_server() as server:
            send, receive = anyio.create_memory_object_stream[PlatformEvent](1)
            with anyio.fail_after(5):
                async with anyio.create_task_group() as group:
                    await group.start(listen, server.url, send, FAST)
                    await server.wait_connected(1)
                    receive.close()
                    await server.send("aborting")
    assert events_named(logs, "actor.events.stopped")


async def test_the_url_path_and_query_never_reach_the_logs() -> None:
    """Only scheme, host and port of the URL are logged: its path and query may hold the run's credentials."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/run-SECRETPATH?token=SECRETTOKEN"
    with capture_logs() as logs:
        async with listening(url) as (receive, _), event_server(port) as server:
            await server.wait_connected(1)
            await server.drop()
            await server.wait_connected(2)
            await server.send("aborting")
            await next_event(receive)
    text = repr(logs)
    assert "SECRET" not in text
    assert {entry["url"] for entry in logs if "url" in entry} == {f"ws://127.0.0.1:{port}"}


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/x?token=SECRET", "ws:///x?token=SECRET", "ws://h:99999/?token=SECRET", "ws://h/#SECRET"]
)
async def test_a_bad_url_is_a_config_error_that_does_not_repeat_it(url: str) -> None:
    """A URL that is not ws(s)://host is refused before any connect, and the error does not quote it."""
    send, receive = anyio.create_memory_object_stream[PlatformEvent](1)
    with receive, pytest.raises(ConfigError, match="ACTOR_EVENTS_WEBSOCKET_URL") as error:
        await listen_events(url, send)
    assert "SECRET" not in str(error.value)
    assert error.value.__cause__ is None
    assert error.value.__suppress_context__


def test_socket_name_keeps_scheme_host_and_port_only() -> None:
    """socket_name drops credentials, path and query, and fills in the default port."""
    assert socket_name("wss://user:pw@Events.Example:4443/a/b?token=t") == "wss://events.example:4443"
    assert socket_name("ws://[::1]/x") == "ws://[::1]:80"


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"initial": 2, "maximum": 1}, {"open_timeout": 0}, {"healthy_after": -1}],
)
def test_reconnect_rejects_delays_that_could_busy_loop(kwargs: dict[str, float]) -> None:
    """A zero first delay (a tight loop), a maximum below it, or a zero connect timeout is a ConfigError."""
    with pytest.raises(ConfigError, match="events reconnect"):
        Reconnect(**kwargs)


async def test_the_server_helper_fails_clearly_when_no_client_comes() -> None:
    """wait_connected fails with a clear message when the connections do not come."""
    async with event_server() as srv:
        with pytest.raises(AssertionError, match="1 connections not seen"):
            await srv.wait_connected(1, within=0.1)
