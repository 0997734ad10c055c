"""Datasets on disk: `datasets/<stem>.jsonl`, the very files a local `headlock run` writes its results to.

Items are appended as `JsonlDataset` appends them (one write under an exclusive `flock`), so the server and local
runs can write one dataset at once. Reads go through an index of line offsets per dataset, kept in memory and
extended by reading only what was appended since (under a shared `flock`, so never half a write): a page of items
reads just its own lines, whatever the file's size. The metadata sits beside the file (`<stem>.__metadata__.json`).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from runner.results.items import encode_item
from runner.results.jsonl import JsonlDataset
from runner.server import _wire as wire
from runner.server._storages import METADATA_FILENAME, Storage, StorageIndex

__all__ = ["Datasets", "ItemsQuery", "Page", "render"]

_SUFFIX = ".jsonl"
_READ_STEP = 1 << 20
"""Bytes read per step when indexing or serving lines."""
_BLOCK_ROWS = 1000
"""Most rows handled per worker-thread call when serving a page (a block is also cut at `_READ_STEP` bytes)."""


def _is_clean(line: bytes) -> bool:
    """Whether an item is non-empty once its hidden (`#`-prefixed) top-level fields are dropped."""
    if line.strip() == b"{}":
        return False
    if b'"#' not in line:  # no hidden field can be there: the cheap, usual case
        return True
    try:
        item = json.loads(line)
    except ValueError:
        return True
    return not isinstance(item, dict) or any(not key.startswith("#") for key in item)


@dataclass(slots=True)
class _LineIndex:
    """Where each item's line starts in one file, up to `end`, the end of the last whole line indexed."""

    inode: int = -1
    end: int = 0
    starts: array[int] = field(default_factory=lambda: array("Q"))
    clean: int = 0

    def line_end(self, row: int) -> int:
        """Where the line of `row` ends (its newline included)."""
        return self.starts[row + 1] if row + 1 < len(self.starts) else self.end

    def extend(self, fd: int) -> None:
        """Index the whole lines appended since the last call (from the start if the file was replaced or cut)."""
        stat = os.fstat(fd)
        if stat.st_ino != self.inode or stat.st_size < self.end:
            self.inode, self.end, self.starts, self.clean = stat.st_ino, 0, array("Q"), 0
        position = self.end
        pending = b""  # the start of a line not yet ended by a newline
        while position < stat.st_size:
            chunk = os.pread(fd, min(_READ_STEP, stat.st_size - position), position)
            if not chunk:
                break
            data = pending + chunk
            base = position - len(pending)
            offset = 0
            while (newline := data.find(b"\n", offset)) >= 0:
                line = data[offset:newline]
                if line.strip():  # blank lines are no items (`read_items` skips them too)
                    self.starts.append(base + offset)
                    self.clean += _is_clean(line)
                offset = newline + 1
            self.end = base + offset
            pending = data[offset:]
            position += len(chunk)


@dataclass(frozen=True, slots=True)
class ItemsQuery:
    """Which items to serve and how: rows `offset`..`offset + limit` (None: to the end), newest first if `desc`."""

    offset: int = 0
    limit: int | None = None
    desc: bool = False
    skip_hidden: bool = False
    skip_empty: bool = False
    fields: tuple[str, ...] = ()
    omit: tuple[str, ...] = ()

    @property
    def raw(self) -> bool:
        """Whether the stored lines can be served as they are, without parsing them."""
        return not (self.skip_hidden or self.skip_empty or self.fields or self.omit)

    def shape(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """The item as served, or None when it is skipped (empty with `skip_empty`)."""
        if self.fields:
            item = {name: item[name] for name in self.fields if name in item}
        if self.omit:
            item = {name: value for name, value in item.items() if name not in self.omit}
        if self.skip_hidden:
            item = {name: value for name, value in item.items() if not name.startswith("#")}
        if self.skip_empty and not item:
            return None
        return item


@dataclass(frozen=True, slots=True)
class Page:
    """The rows one GET items call serves: `rows` (file offsets `(start, end)` of each line, in serving order)."""

    total: int
    offset: int
    rows: list[tuple[int, int]]
    path: Path


class Datasets(StorageIndex):
    """The datasets under `storage/datasets/`."""

    what = "dataset"

    def __init__(self, storage_dir: Path) -> None:
        """Serve the datasets under `storage_dir/datasets/`."""
        super().__init__(storage_dir / "datasets")
        self._indexes: dict[str, _LineIndex] = {}
        self._writers: dict[str, JsonlDataset] = {}

    def metadata_path(self, stem: str) -> Path:
        """The dataset's metadata, beside its file."""
        return self.directory / f"{stem}.{METADATA_FILENAME}"

    def path(self, storage: Storage) -> Path:
        """The dataset's file."""
        return self.directory / f"{storage.stem}{_SUFFIX}"

    def _data_exists(self, stem: str) -> bool:
        return (self.directory / f"{stem}{_SUFFIX}").is_file()

    def _stems(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        stems = set()
        for name in os.listdir(self.directory):
            stem = name.removesuffix(f".{METADATA_FILENAME}") if name.endswith(METADATA_FILENAME) else name
            if stem.endswith(_SUFFIX) or stem != name:
                stems.add(stem.removesuffix(_SUFFIX))
        return sorted(stem for stem in stems if wire.is_storage_name(stem))

    def _create_data(self, stem: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{stem}{_SUFFIX}").touch()

    def _delete_data(self, stem: str) -> None:
        (self.directory / f"{stem}{_SUFFIX}").unlink(missing_ok=True)
        self._indexes.pop(stem, None)
        writer = self._writers.pop(stem, None)
        if writer is not None:
            writer.close()

    # -- items ---------------------------------------------------------------------------------------------

    async def push(self, storage: Storage, items: Sequence[dict[str, Any]]) -> int:
        """Append `items` (JSON objects) as one write; return how many.

        Raises:
            InvalidItemError: an item JSON cannot represent (nothing is written then).
            DatasetWriteError: the write failed; nothing of it stays in the file.
        """
        lines = [encode_item(item) for item in items]
        async with self._turn(storage):
            return await anyio.to_thread.run_sync(self._write, storage, lines)

    def _write(self, storage: Storage, lines: list[str]) -> int:
        writer = self._writers.get(storage.stem)
        if writer is None:
            writer = self._writers[storage.stem] = JsonlDataset(self.path(storage))
        return writer.write_lines(lines)

    async def counts(self, storage: Storage) -> tuple[int, int]:
        """`(itemCount, cleanItemCount)` of the dataset."""
        async with self._turn(storage):
            index = await anyio.to_thread.run_sync(self._refresh, storage)
        return len(index.starts), index.clean

    def _refresh(self, storage: Storage) -> _LineIndex:
        index = self._indexes.setdefault(storage.stem, _LineIndex())
        path = self.path(storage)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            index.inode, index.end, index.starts, index.clean = -1, 0, array("Q"), 0
            return index
        try:
            # Shared: appends hold the lock exclusively for their one write, so no line is read half-written.
            fcntl.flock(fd, fcntl.LOCK_SH)
            index.extend(fd)
        finally:
            os.close(fd)  # closing releases the lock
        return index

    async def page(self, storage: Storage, query: ItemsQuery) -> Page:
        """The rows `query` selects, as they are now (items appended later are not in it)."""
        async with self._turn(storage):
            index = await anyio.to_thread.run_sync(self._refresh, storage)
            total = len(index.starts)
            first = min(query.offset, total)
            last = total if query.limit is None else min(total, first + query.limit)
            chosen = range(total - 1 - first, total - 1 - last, -1) if query.desc else range(first, last)
            rows = [(index.starts[row], index.line_end(row)) for row in chosen]
        return Page(total=total, offset=query.offset, rows=rows, path=self.path(storage))

    async def aclose(self) -> None:
        """Close the files the server appends to. Idempotent."""
        writers, self._writers = list(self._writers.values()), {}
        for writer in writers:
            await anyio.to_thread.run_sync(writer.close)


# -- reading and rendering a page ----------------------------------------------------------------------------


def _blocks(rows: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """`rows` cut into blocks of at most `_BLOCK_ROWS` rows and about `_READ_STEP` bytes (at least one row)."""
    block: list[tuple[int, int]] = []
    size = 0
    for row in rows:
        if block and (len(block) >= _BLOCK_ROWS or size + row[1] - row[0] > _READ_STEP):
            yield block
            block, size = [], 0
        block.append(row)
        size += row[1] - row[0]
    if block:
        yield block


def _read_block(path: Path, block: list[tuple[int, int]]) -> list[bytes]:
    """The lines of `block` (without their newlines), read in one span when they are adjacent in the file."""
    low, high = min(start for start, _ in block), max(end for _, end in block)
    with path.open("rb") as file:
        file.seek(low)
        span = file.read(high - low)
    return [span[start - low : end - low].rstrip(b"\r\n") for start, end in block]


async def _lines(page: Page) -> AsyncIterator[bytes]:
    for block in _blocks(page.rows):
        for line in await anyio.to_thread.run_sync(_read_block, page.path, block):
            yield line


async def _items(page: Page, query: ItemsQuery) -> AsyncIterator[dict[str, Any]]:
    async for line in _lines(page):
        try:
            item = json.loads(line)
        except ValueError:
            continue  # not written by us or a local run (a person edited the file): nothing to serve
        shaped = query.shape(item) if isinstance(item, dict) else None
        if shaped is not None:
            yield shaped


def _dump(item: dict[str, Any]) -> bytes:
    return json.dumps(item, ensure_ascii=False).encode()


async def _json(page: Page, query: ItemsQuery) -> AsyncIterator[bytes]:
    separator = b"[\n"
    if query.raw:
        async for line in _lines(page):
            yield separator + line
            separator = b",\n"
    else:
        async for item in _items(page, query):
            yield separator + _dump(item)
            separator = b",\n"
    yield b"[]\n" if separator == b"[\n" else b"\n]\n"


async def _jsonl(page: Page, query: ItemsQuery) -> AsyncIterator[bytes]:
    if query.raw:
        async for line in _lines(page):
            yield line + b"\n"
    else:
        async for item in _items(page, query):
            yield _dump(item) + b"\n"


def _flatten(value: Any, prefix: str, into: dict[str, str]) -> None:
    """Nested objects and arrays as `a/b` and `a/0` columns, as the platform's CSV export has them."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(inner, f"{prefix}/{key}" if prefix else str(key), into)
    elif isinstance(value, list) and value:
        for number, inner in enumerate(value):
            _flatten(inner, f"{prefix}/{number}" if prefix else str(number), into)
    elif value is None:
        into[prefix] = ""
    elif isinstance(value, bool):
        into[prefix] = "true" if value else "false"
    elif isinstance(value, str):
        into[prefix] = value
    else:
        into[prefix] = json.dumps(value)


@dataclass(frozen=True, slots=True)
class CsvOptions:
    """`format=csv` options: `delimiter`, `bom` (default on), `skipHeaderRow`."""

    delimiter: str = ","
    bom: bool = True
    header: bool = True


async def _csv(page: Page, query: ItemsQuery, options: CsvOptions) -> AsyncIterator[bytes]:
    # Two passes over the page: the columns (every flattened field, in order of first appearance), then the rows.
    columns: dict[str, None] = dict.fromkeys(query.fields)
    async for item in _items(page, query):
        flat: dict[str, str] = {}
        _flatten(item, "", flat)
        columns.update(dict.fromkeys(flat))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=options.delimiter, lineterminator="\r\n")

    def take() -> bytes:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text.encode()

    if options.bom:
        yield "\ufeff".encode()
    if options.header:
        writer.writerow(columns)
        yield take()
    async for item in _items(page, query):
        flat = {}
        _flatten(item, "", flat)
        writer.writerow([flat.get(column, "") for column in columns])
        yield take()


FORMATS: dict[str, str] = {
    "json": "application/json; charset=utf-8",
    "jsonl": "application/jsonl; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
}
"""The `format`s served, with their content types (the platform's other formats are refused with a 400)."""


def render(page: Page, query: ItemsQuery, item_format: str, csv_options: CsvOptions) -> AsyncIterator[bytes]:
    """The body of a GET items answer in `item_format` (one of `FORMATS`), produced a block of rows at a time."""
    renderers: dict[str, Callable[[], AsyncIterator[bytes]]] = {
        "json": lambda: _json(page, query),
        "jsonl": lambda: _jsonl(page, query),
        "csv": lambda: _csv(page, query, csv_options),
    }
    return renderers[item_format]()
