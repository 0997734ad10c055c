"""`headlock export` through the real CLI: the formats, `-o FILE`, missing datasets, the API dataset, bounded memory."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.api.client import ApiClient
from runner.results.apify import ApiDataset
from runner.results.jsonl import read_items
from tests._server import running_server
from tests.conftest import cli_env, headlock

ITEMS: list[dict[str, Any]] = [
    {"url": "https://a.example/0", "status": 200, "title": 'Page 0, "quoted"'},
    {"url": "https://a.example/1", "status": 404, "tags": ["x", {"k": 1}], "size": 1.5},
    {"url": "https://a.example/2", "title": "Ünïcode\nnew line", "ok": True, "missing": None},
    {"status": 200, "nested": {"a": {"b": [1, 2]}}, "url": "https://a.example/3"},
]
"""Items with keys first seen in different items, nested values, quotes, a newline, null and booleans."""

COLUMNS = ["url", "status", "title", "tags", "size", "ok", "missing", "nested"]


def write_dataset(storage: Path, items: list[dict[str, Any]], name: str = "default") -> Path:
    """A local dataset file with `items`, as `JsonlDataset` writes them."""
    path = storage / "datasets" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


def csv_rows(text: str) -> list[list[str]]:
    """The rows of a CSV text."""
    return list(csv.reader(io.StringIO(text, newline="")))


def leftovers(directory: Path) -> list[str]:
    """Temporary files an export left in `directory`."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_csv_of_a_small_crawl_has_the_union_of_keys_and_nested_values_as_json(tmp_path: Path) -> None:
    """A crawl's items exported as CSV: a header of every key in the order first seen, one row per item, nested
    values as compact JSON, null empty, strings unquoted beyond RFC 4180; the summary line names the count."""
    (tmp_path / "items_handler.py").write_text(
        textwrap.dedent(
            f"""
            ITEMS = {ITEMS!r}

            async def handle(ctx):
                await ctx.push_data(ITEMS[int(ctx.url.rsplit("/", 1)[1])])
            """
        )
    )
    urls = [f"https://a.example/{i}" for i in range(len(ITEMS))]
    assert headlock("enqueue", *urls, "--log-format", "json", cwd=tmp_path).returncode == 0
    crawl = headlock("run", "--handler", "items_handler:handle", "--concurrency", "1", cwd=tmp_path)
    assert crawl.returncode == 0, crawl.stderr

    result = headlock("export", "--format", "csv", "--log-format", "json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    rows = csv_rows(result.stdout)
    assert rows[0] == COLUMNS
    by_url = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in rows[1:]}
    assert len(by_url) == len(ITEMS)
    assert by_url["https://a.example/0"]["title"] == 'Page 0, "quoted"'
    assert by_url["https://a.example/1"]["tags"] == '["x",{"k":1}]'
    assert by_url["https://a.example/1"]["size"] == "1.5"
    assert by_url["https://a.example/1"]["title"] == ""
    assert by_url["https://a.example/2"]["title"] == "Ünïcode\nnew line"
    assert by_url["https://a.example/2"]["ok"] == "true"
    assert by_url["https://a.example/2"]["missing"] == ""
    assert by_url["https://a.example/3"]["nested"] == '{"a":{"b":[1,2]}}'
    assert by_url["https://a.example/3"]["status"] == "200"
    done = [json.loads(line) for line in result.stderr.splitlines() if '"export.done"' in line]
    assert [record["items"] for record in done] == [len(ITEMS)]


def test_csv_column_order_is_first_seen_not_sorted(tmp_path: Path) -> None:
    """Columns keep the order keys were first seen in (the items' own order), across items; rows end in CRLF."""
    write_dataset(tmp_path / "storage", [{"z": 1, "b": 2}, {"a": 3, "z": 4}, {"m": 5}])
    result = headlock("export", "--format", "csv", "-o", "out.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.csv").read_bytes() == b"z,b,a,m\r\n1,2,,\r\n4,,3,\r\n,,,5\r\n"


def test_jsonl_is_the_file_as_it_is_and_json_is_one_array(tmp_path: Path) -> None:
    """JSONL reproduces the dataset's lines byte for byte; JSON is a valid array of the same items, in order."""
    path = write_dataset(tmp_path / "storage", ITEMS)
    jsonl = headlock("export", cwd=tmp_path)
    as_json = headlock("export", "--format", "json", "--dataset", "default", cwd=tmp_path)
    assert jsonl.returncode == as_json.returncode == 0
    assert jsonl.stdout == path.read_text()
    assert json.loads(as_json.stdout) == ITEMS


def test_an_empty_dataset_exports_nothing_an_empty_array_or_an_empty_csv(tmp_path: Path) -> None:
    """A dataset with no items: empty JSONL and CSV, `[]` for JSON, exit 0."""
    write_dataset(tmp_path / "storage", [])
    outputs = {fmt: headlock("export", "--format", fmt, cwd=tmp_path) for fmt in ("jsonl", "json", "csv")}
    assert all(result.returncode == 0 for result in outputs.values())
    assert outputs["jsonl"].stdout == outputs["csv"].stdout == ""
    assert json.loads(outputs["json"].stdout) == []


def test_output_file_is_written_whole_then_renamed(tmp_path: Path) -> None:
    """`-o FILE` replaces FILE with the complete export and leaves no temporary file; `-o -` is stdout."""
    write_dataset(tmp_path / "storage", ITEMS, name="shop")
    target = tmp_path / "out.json"
    target.write_text("old")
    result = headlock("export", "--dataset", "shop", "--format", "json", "-o", "out.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(target.read_text()) == ITEMS
    assert result.stdout == ""
    assert leftovers(tmp_path) == []
    to_stdout = headlock("export", "--dataset", "shop", "--format", "json", "-o", "-", cwd=tmp_path)
    assert json.loads(to_stdout.stdout) == ITEMS


def test_a_fifo_or_device_as_output_is_written_to_not_replaced(tmp_path: Path) -> None:
    """`-o` naming a FIFO (as `/dev/null` or a terminal would be) writes into it: the rename that makes `-o FILE`
    atomic would replace the device itself with a regular file (as it once did to /dev/null), and a symlink's file
    is what a rename replaces, never the link."""
    import os  # noqa: PLC0415 - only this test makes special files
    import stat  # noqa: PLC0415
    import threading  # noqa: PLC0415

    write_dataset(tmp_path / "storage", ITEMS, name="shop")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = headlock("export", "--dataset", "shop", "--format", "jsonl", "-o", "pipe", cwd=tmp_path)
    reader.join(30)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [json.loads(line) for line in received[0].splitlines()] == ITEMS
    real = tmp_path / "real.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    result = headlock("export", "--dataset", "shop", "--format", "jsonl", "-o", "link.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    assert [json.loads(line) for line in real.read_text().splitlines()] == ITEMS


def test_a_bad_line_fails_part_way_and_leaves_the_output_file_as_it_was(tmp_path: Path) -> None:
    """A line that is not a JSON object: exit 1 naming the file and line; FILE keeps its old content, no temporary
    file is left behind."""
    path = write_dataset(tmp_path / "storage", ITEMS)
    with path.open("a") as file:
        file.write("{not json\n")
    (tmp_path / "out.jsonl").write_text("old\n")
    result = headlock("export", "-o", "out.jsonl", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 1
    assert f"{Path('storage/datasets/default.jsonl')}:5: not a JSON object" in result.stderr
    assert (tmp_path / "out.jsonl").read_text() == "old\n"
    assert leftovers(tmp_path) == []
    assert "Traceback" not in result.stderr


def test_a_missing_dataset_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """No such dataset: exit 2, one line naming it and its path, and no output file created."""
    result = headlock("export", "--dataset", "nope", "-o", "out.csv", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no dataset 'nope'" in lines[0]
    assert str(Path("storage/datasets/nope.jsonl")) in lines[0]
    assert not (tmp_path / "out.csv").exists()


def test_an_output_directory_that_does_not_exist_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`-o` into a missing directory: exit 2, one line naming the file."""
    write_dataset(tmp_path / "storage", ITEMS)
    result = headlock("export", "-o", "no/such/dir/out.csv", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot write no/such/dir/out.csv" in result.stderr


def test_the_dataset_itself_is_refused_as_output(tmp_path: Path) -> None:
    """`-o` naming the dataset file is refused: renaming onto it would take it from under a running crawl."""
    path = write_dataset(tmp_path / "storage", ITEMS)
    result = headlock("export", "-o", "storage/datasets/default.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert "is the dataset itself" in result.stderr
    assert read_items(path) == ITEMS


def test_a_reader_that_goes_away_ends_the_export_quietly(tmp_path: Path) -> None:
    """`headlock export | head -1`: the export stops when its reader closes the pipe, exit 0, no traceback."""
    write_dataset(tmp_path / "storage", [{"n": i, "pad": "x" * 100} for i in range(5000)])
    with subprocess.Popen(
        [sys.executable, "-m", "runner", "export"],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
        code = proc.wait(timeout=30)
    assert json.loads(first)["n"] == 0
    assert code == 0
    assert b"Traceback" not in stderr


# -- the API dataset ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`headlock serve` without a token, over a storage of its own."""
    with running_server(tmp_path_factory.mktemp("served")) as url:
        yield url


def push(base_url: str, name: str, items: list[dict[str, Any]]) -> str:
    """Create the API dataset `name` and push `items` into it; return its id."""
    with httpx.Client(base_url=f"{base_url}/v2", timeout=30) as client:
        created = client.post("/datasets", params={"name": name})
        created.raise_for_status()
        dataset_id = str(created.json()["data"]["id"])
        for start in range(0, len(items), 1000):
            client.post(f"/datasets/{dataset_id}/items", json=items[start : start + 1000]).raise_for_status()
    return dataset_id


MANY = [{"n": i, **({"odd": True} if i % 2 else {}), **({"late": [i]} if i == 2400 else {})} for i in range(2500)]
"""Over two pages of `PAGE_ITEMS`, with a key first seen on the third page."""


@pytest.mark.slow
def test_export_from_the_api_dataset_by_name_reads_every_page(tmp_path: Path, server: str) -> None:
    """`--backend apify --dataset NAME`: every page of the API dataset, in order, in each format; CSV's header has
    a key first seen on the last page."""
    push(server, "export-pages", MANY)
    api = ["--backend", "apify", "--api-base-url", server, "--dataset", "export-pages"]
    jsonl = headlock("export", *api, cwd=tmp_path)
    as_json = headlock("export", *api, "--format", "json", cwd=tmp_path)
    as_csv = headlock("export", *api, "--format", "csv", "-o", "out.csv", cwd=tmp_path)
    assert jsonl.returncode == as_json.returncode == as_csv.returncode == 0, as_csv.stderr
    assert [json.loads(line) for line in jsonl.stdout.splitlines()] == MANY
    assert json.loads(as_json.stdout) == MANY
    rows = csv_rows((tmp_path / "out.csv").read_text())
    assert rows[0] == ["n", "odd", "late"]
    assert len(rows) == 1 + len(MANY)
    assert rows[1] == ["0", "", ""]
    assert rows[2402] == ["2401", "true", ""]
    assert rows[2401] == ["2400", "", "[2400]"]


def test_export_from_the_api_by_dataset_id_from_the_settings(tmp_path: Path, server: str) -> None:
    """The run's dataset id (`dataset_id`, e.g. ACTOR_DEFAULT_DATASET_ID) is what `export` reads on the API."""
    dataset_id = push(server, "export-by-id", ITEMS)
    result = headlock(
        "export", "--backend", "apify", "--api-base-url", server, "--format", "json", cwd=tmp_path,
        HEADLOCK_DATASET_ID=dataset_id,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ITEMS


def test_a_missing_api_dataset_is_one_line_and_exit_2_and_is_not_created(tmp_path: Path, server: str) -> None:
    """An API dataset name that does not exist: exit 2, one line; it is not created by asking."""
    api = ["--backend", "apify", "--api-base-url", server, "--log-format", "json"]
    result = headlock("export", *api, "--dataset", "never-made", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no dataset 'never-made'" in result.stderr
    with httpx.Client(base_url=f"{server}/v2") as client:
        assert client.get("/datasets/~never-made").status_code == 404


@pytest.fixture
async def api(server: str) -> AsyncIterator[ApiClient]:
    """An ApiClient to the module's server."""
    async with ApiClient(base_url=server, token=None, max_retries=0) as client:
        yield client


@pytest.mark.anyio
async def test_pages_are_read_with_offset_and_limit_up_to_the_first_total(server: str, api: ApiClient) -> None:
    """`ApiDataset.pages` reads pages of `limit` items in order, and stops at the total its first page reported:
    items pushed meanwhile are left out, so a growing dataset still ends."""
    dataset = await ApiDataset.open(api, name="export-paged")
    await dataset.push_lines([json.dumps({"n": i}) for i in range(7)])
    seen: list[list[int]] = []
    async for page in dataset.pages(limit=3):
        seen.append([item["n"] for item in page])
        if len(seen) == 1:
            await dataset.push_lines([json.dumps({"n": 100})])
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    assert api.calls["GET /v2/datasets/{datasetId}/items 200"] == 3


# -- memory -------------------------------------------------------------------------------------------------

_PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.write(done.stderr.decode())
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_kib(cwd: Path, *args: str) -> int:
    """The peak RSS (KiB) of `python -m runner ARGS`, measured by a parent of its own (only that child counted)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    code, peak = done.stdout.split()
    assert code == "0", done.stderr
    return int(peak)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_memory_stays_bounded_whatever_the_dataset_size(tmp_path: Path, fmt: str) -> None:
    """Exporting 200,000 items peaks at about the RSS of exporting 2,000 (a list of them all would add ~100 MB)."""
    sizes = {"small": 2_000, "large": 200_000}
    peaks = {}
    for label, count in sizes.items():
        where = tmp_path / label
        path = where / "storage" / "datasets" / "default.jsonl"
        path.parent.mkdir(parents=True)
        with path.open("w") as file:
            for i in range(count):
                file.write(json.dumps({"url": f"https://a.example/{i}", "n": i, "tags": [i % 7]}) + "\n")
        peaks[label] = peak_rss_kib(where, "export", "--format", fmt, "-o", f"out.{fmt}")
        assert (where / f"out.{fmt}").stat().st_size > count * 20
    assert peaks["large"] - peaks["small"] < 20 * 1024, peaks
