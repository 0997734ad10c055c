"""The collector's threshold during a run (`runner.gcpolicy`), on the process's real collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from runner import Context, JsonlDataset, RequestDraft, SqliteQueue, WorkerSettings, run
from runner.gcpolicy import DEFAULT_GC_THRESHOLD, young_threshold


@pytest.fixture(autouse=True)
def python_default() -> Iterator[tuple[int, int, int]]:
    """Python's own thresholds for the test (700, 10, 10), the process's put back after it."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield gc.get_threshold()
    finally:
        gc.set_threshold(*before)


def test_raises_the_youngest_threshold_for_the_block_and_puts_it_back() -> None:
    with young_threshold(5_000):
        assert gc.get_threshold() == (5_000, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


def test_puts_it_back_when_the_block_raises() -> None:
    with pytest.raises(KeyError), young_threshold(5_000):
        raise KeyError("x")
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("threshold", [0, 500, 700])
def test_zero_or_a_value_not_above_the_current_changes_nothing(threshold: int) -> None:
    gc.set_threshold(700, 5, 5)
    with young_threshold(threshold):
        assert gc.get_threshold() == (700, 5, 5)
        gc.set_threshold(900, 5, 5)  # someone else's change in the block stays
    assert gc.get_threshold() == (900, 5, 5)


def test_a_disabled_collector_is_left_alone() -> None:
    gc.disable()
    try:
        with young_threshold(5_000):
            assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.enable()


def test_a_change_made_in_the_block_is_kept() -> None:
    with young_threshold(5_000):
        gc.set_threshold(300, 10, 10)
    assert gc.get_threshold() == (300, 10, 10)


def test_nested_blocks_leave_the_outer_ones_threshold_until_it_ends() -> None:
    with young_threshold(5_000):
        with young_threshold(2_000):  # lower than the set one: nothing
            assert gc.get_threshold() == (5_000, 10, 10)
        with young_threshold(8_000):
            assert gc.get_threshold() == (8_000, 10, 10)
        assert gc.get_threshold() == (5_000, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.anyio
@pytest.mark.parametrize(("setting", "during"), [(None, DEFAULT_GC_THRESHOLD), (0, 700), (12_345, 12_345)])
async def test_a_run_crawls_with_its_threshold_and_gives_the_process_its_own_back(
    queue: SqliteQueue, dataset: JsonlDataset, setting: int | None, during: int
) -> None:
    seen: list[tuple[int, int, int]] = []

    async def handle(ctx: Context) -> None:
        seen.append(gc.get_threshold())

    drafts = [RequestDraft(unique_key=str(n), url=f"http://127.0.0.1:9/{n}") for n in range(3)]
    await queue.batch_add(drafts, client_key="seeder")
    workers = WorkerSettings() if setting is None else WorkerSettings(gc_threshold=setting)
    summary = await run(queue, handle, dataset, workers=workers)
    assert summary.stats["handled"] == 3
    assert seen == [(during, 10, 10)] * 3
    assert gc.get_threshold() == (700, 10, 10)


def test_a_negative_threshold_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="gc_threshold"):
        WorkerSettings(gc_threshold=-1)
