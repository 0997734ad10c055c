"""Actor runs as a local stand-in has them: every id is a RUNNING run over the server's default storages.

An Actor reads its run at start and sets status messages on it; nothing here runs anything. The last status
message of each run is kept in memory (for the `MAX_RUNS` runs set most recently), so a GET gives it back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from runner.errors import InvalidInputError
from runner.models import format_api_datetime

__all__ = ["MAX_RUNS", "RunDefaults", "Runs"]

MAX_RUNS = 10_000
"""Runs whose status message is remembered; the one set longest ago is forgotten first."""
_GENERAL_ACCESS = frozenset(
    {"ANYONE_WITH_ID_CAN_READ", "ANYONE_WITH_NAME_CAN_READ", "FOLLOW_USER_SETTING", "RESTRICTED"}
)


@dataclass(frozen=True, slots=True)
class RunDefaults:
    """The storage ids a run reports as its defaults (`serve --default-queue-id` and the others).

    `default`, the default of each, names the storages a local `headlock run` uses by default.
    """

    queue_id: str = "default"
    dataset_id: str = "default"
    kv_store_id: str = "default"


@dataclass(slots=True)
class _Status:
    message: str | None = None
    terminal: bool | None = None
    general_access: str | None = None


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(f"Invalid input: {message}", status=400)


class Runs:
    """Synthetic runs and the status messages set on them."""

    def __init__(self, defaults: RunDefaults) -> None:
        """Runs whose default storages are `defaults`."""
        self.defaults = defaults
        self._started = datetime.now(UTC)
        self._status: OrderedDict[str, _Status] = OrderedDict()

    def get(self, run_id: str) -> dict[str, Any]:
        """The run `run_id` (any id is one), with the fields the official client's `Run` model requires."""
        status = self._status.get(run_id, _Status())
        run: dict[str, Any] = {
            "id": run_id,
            "actId": "local",
            "userId": "local",
            "actorTaskId": None,
            "startedAt": format_api_datetime(self._started),
            "finishedAt": None,
            "status": "RUNNING",
            "statusMessage": status.message,
            "isStatusMessageTerminal": status.terminal,
            "meta": {"origin": "DEVELOPMENT"},
            "stats": {},
            "options": {"build": "latest", "timeoutSecs": 0, "memoryMbytes": 1024, "diskMbytes": 0},
            "buildId": "local",
            "buildNumber": None,
            "exitCode": None,
            "defaultKeyValueStoreId": self.defaults.kv_store_id,
            "defaultDatasetId": self.defaults.dataset_id,
            "defaultRequestQueueId": self.defaults.queue_id,
            "pricingInfo": None,
            "chargedEventCounts": {},
        }
        if status.general_access is not None:
            run["generalAccess"] = status.general_access
        return run

    def update(self, run_id: str, body: Any) -> dict[str, Any]:
        """Apply a PUT body (`statusMessage`, `isStatusMessageTerminal`, `generalAccess`); return the run.

        A field left out keeps its value. Other fields are refused, as fields a local run cannot change.

        Raises:
            InvalidInputError: the body is not an object, a field has the wrong type, or is not one of these.
        """
        if not isinstance(body, dict):
            raise _invalid("the body of PUT /v2/actor-runs/{runId} must be a JSON object")
        unknown = sorted(set(body) - {"statusMessage", "isStatusMessageTerminal", "generalAccess"})
        if unknown:
            raise _invalid(f"unknown run fields {unknown}: only statusMessage, isStatusMessageTerminal, generalAccess")
        message, terminal, access = (
            body.get("statusMessage"),
            body.get("isStatusMessageTerminal"),
            body.get("generalAccess"),
        )
        if message is not None and not isinstance(message, str):
            raise _invalid(f"statusMessage must be a string, got {type(message).__name__}")
        if terminal is not None and not isinstance(terminal, bool):
            raise _invalid(f"isStatusMessageTerminal must be a boolean, got {type(terminal).__name__}")
        if access is not None and access not in _GENERAL_ACCESS:
            raise _invalid(f"generalAccess must be one of {sorted(_GENERAL_ACCESS)}, got {access!r}")
        status = self._status.pop(run_id, _Status())
        if "statusMessage" in body:
            status.message = message
        if "isStatusMessageTerminal" in body:
            status.terminal = terminal
        if "generalAccess" in body:
            status.general_access = access
        self._status[run_id] = status
        while len(self._status) > MAX_RUNS:
            self._status.popitem(last=False)
        return self.get(run_id)
