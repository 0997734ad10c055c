"""The Actor's environment and input as settings: names, precedence, the request-list form, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from runner.actor.env import ACTOR_VARIABLES
from runner.actor.input import input_settings, parse_input
from runner.errors import ConfigError
from runner.settings import StartRequest, load_settings
from runner.start import start_drafts


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No platform or HEADLOCK_ variable of the test runner's shell leaks in."""
    for names in ACTOR_VARIABLES.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    for name in ("HEADLOCK_WORKERS__CONCURRENCY", "HEADLOCK_DATASET_ID", "HEADLOCK_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)


PLATFORM = {
    "APIFY_TOKEN": "tok-secret",
    "APIFY_API_BASE_URL": "http://127.0.0.1:1",
    "ACTOR_DEFAULT_REQUEST_QUEUE_ID": "queue1",
    "ACTOR_DEFAULT_DATASET_ID": "data1",
    "ACTOR_DEFAULT_KEY_VALUE_STORE_ID": "store1",
    "ACTOR_INPUT_KEY": "MY_INPUT",
    "ACTOR_RUN_ID": "run-0123456789abcdefghijklmnopqrstuvwxyz",
    "ACTOR_WEB_SERVER_PORT": "4321",
    "ACTOR_TIMEOUT_AT": "2026-12-01T12:00:00.000Z",
    "ACTOR_EVENTS_WEBSOCKET_URL": "ws://127.0.0.1:2/events",
    "APIFY_IS_AT_HOME": "1",
}


def test_the_platforms_current_variables_configure_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ACTOR_* variable lands in its setting: queue, dataset, store, input key, run, port, deadline, events."""
    for name, value in PLATFORM.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.queue.backend == "apify"
    assert settings.queue.id == "queue1"
    assert settings.dataset_id == "data1"
    assert settings.results_on_api()
    assert settings.actor.key_value_store_id == "store1"
    assert settings.actor.input_key == "MY_INPUT"
    assert settings.actor.run_id == PLATFORM["ACTOR_RUN_ID"]
    assert settings.workers.client_key == PLATFORM["ACTOR_RUN_ID"][:32]
    assert settings.actor.web_server_port == 4321
    assert settings.actor.timeout_at is not None
    assert settings.actor.timeout_at.isoformat() == "2026-12-01T12:00:00+00:00"
    assert settings.actor.events_url == "ws://127.0.0.1:2/events"
    assert settings.actor.is_at_home
    assert settings.api.token is not None
    assert "tok-secret" not in repr(settings)


def test_deprecated_apify_names_are_read_and_the_current_ones_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """APIFY_DEFAULT_* forms work alone; with both set, the ACTOR_* value is used."""
    monkeypatch.setenv("APIFY_DEFAULT_REQUEST_QUEUE_ID", "old-queue")
    monkeypatch.setenv("APIFY_DEFAULT_DATASET_ID", "old-data")
    monkeypatch.setenv("APIFY_DEFAULT_KEY_VALUE_STORE_ID", "old-store")
    monkeypatch.setenv("APIFY_ACTOR_RUN_ID", "old-run")
    monkeypatch.setenv("APIFY_CONTAINER_PORT", "4000")
    monkeypatch.setenv("APIFY_ACTOR_EVENTS_WS_URL", "ws://127.0.0.1:3/old")
    settings = load_settings()
    assert (settings.queue.id, settings.dataset_id, settings.actor.key_value_store_id) == (
        "old-queue",
        "old-data",
        "old-store",
    )
    assert (settings.actor.run_id, settings.actor.web_server_port, settings.actor.events_url) == (
        "old-run",
        4000,
        "ws://127.0.0.1:3/old",
    )
    monkeypatch.setenv("ACTOR_DEFAULT_DATASET_ID", "new-data")
    monkeypatch.setenv("ACTOR_WEB_SERVER_PORT", "4001")
    settings = load_settings()
    assert (settings.dataset_id, settings.actor.web_server_port) == ("new-data", 4001)


def test_headlock_variables_and_flags_win_over_the_platforms(monkeypatch: pytest.MonkeyPatch) -> None:
    """HEADLOCK_DATASET_ID beats ACTOR_DEFAULT_DATASET_ID; a flag beats both."""
    monkeypatch.setenv("ACTOR_DEFAULT_DATASET_ID", "platform")
    monkeypatch.setenv("HEADLOCK_DATASET_ID", "mine")
    assert load_settings().dataset_id == "mine"
    assert load_settings(dataset_id="flag").dataset_id == "flag"


def _input(data: object) -> dict[str, object]:
    return input_settings(parse_input(json.dumps(data).encode(), "application/json; charset=utf-8"))


def test_the_input_fields_map_onto_settings(tmp_path: Path) -> None:
    """startUrls (both forms), maxRequestsPerCrawl, maxConcurrency and handlerOptions set their settings."""
    config = tmp_path / "c.toml"
    config.write_text("handler_options = {keep = 1, depth = 1}\n[workers]\nconcurrency = 3\n")
    actor_input = _input(
        {
            "startUrls": [
                "https://example.com/a",
                {"url": "https://example.com/b", "method": "POST", "payload": "x=1", "userData": {"label": "detail"}},
                {"url": "https://example.com/c", "headers": {"X-A": "1"}, "uniqueKey": "c-key"},
            ],
            "maxRequestsPerCrawl": 50,
            "maxConcurrency": 7,
            "handlerOptions": {"depth": 3},
        }
    )
    settings = load_settings(config, actor_input=actor_input)
    assert settings.workers.max_requests == 50
    assert settings.workers.concurrency == 7  # the input beats the config file
    assert settings.handler_options == {"keep": 1, "depth": 3}
    drafts = start_drafts(settings.start_urls)
    assert [d.url for d in drafts] == ["https://example.com/a", "https://example.com/b", "https://example.com/c"]
    assert (drafts[1].method, drafts[1].payload, drafts[1].user_data) == ("POST", "x=1", {"label": "detail"})
    assert (drafts[2].unique_key, drafts[2].headers) == ("c-key", {"X-A": "1"})


def test_flags_and_headlock_variables_beat_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """A HEADLOCK_ variable and a flag override what the input sets; 0 requests per crawl means no limit."""
    monkeypatch.setenv("HEADLOCK_WORKERS__CONCURRENCY", "2")
    actor_input = _input({"maxConcurrency": 7, "maxRequestsPerCrawl": 0, "startUrls": ["https://example.com/"]})
    settings = load_settings(actor_input=actor_input, start_urls=["https://example.org/"])
    assert settings.workers.concurrency == 2
    assert settings.workers.max_requests is None
    assert settings.start_urls == ["https://example.org/"]


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"startUrls": [{"href": "https://example.com"}]}', "application/json", "startUrls.0"),
        (b'{"maxConcurrency": 0}', "application/json", "maxConcurrency"),
        (b'{"handlerOptions": [1]}', "application/json", "handlerOptions"),
        (b"[1, 2]", "application/json", "must be a JSON object"),
        (b"{not json", "application/json", "malformed JSON"),
        (b"hello", "text/plain", "must be JSON"),
    ],
)
def test_a_bad_input_names_the_record_and_the_field(body: bytes, content_type: str, message: str) -> None:
    """Each malformed input is one ConfigError naming INPUT and what is wrong."""
    with pytest.raises(ConfigError, match="INPUT") as caught:
        parse_input(body, content_type)
    assert message in str(caught.value)


def test_unknown_input_fields_are_ignored_and_logged() -> None:
    """Fields headlock does not read are logged once by name, not refused."""
    with structlog.testing.capture_logs() as logs:
        assert _input({"proxyConfiguration": {"useApifyProxy": True}}) == {}
    assert [e["fields"] for e in logs if e["event"] == "actor.input.ignored"] == [["proxyConfiguration"]]


def test_a_start_table_in_toml_is_a_start_request(tmp_path: Path) -> None:
    """The config file takes start requests as tables too, with a label."""
    config = tmp_path / "c.toml"
    config.write_text('start_urls = ["https://example.com/", {url = "https://example.com/x", label = "detail"}]\n')
    settings = load_settings(config)
    assert settings.start_urls[1] == StartRequest(url="https://example.com/x", label="detail")
    assert start_drafts(settings.start_urls)[1].user_data == {"label": "detail"}
    config.write_text('start_urls = [{url = "https://example.com/x", requestsFromUrl = "https://x"}]\n')
    with pytest.raises(ConfigError, match=r"start_urls\.0\..*requestsFromUrl: unknown key"):
        load_settings(config)
