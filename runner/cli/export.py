"""`headlock export`: a dataset's items as JSON lines, a JSON array or CSV, to a file or standard output.

The items come from the local dataset (`<storage>/datasets/<name>.jsonl`); when results go to the API (`--backend
apify`), from the API dataset (`dataset_id`, else `--dataset NAME`), a page at a time; on the postgres backend, from
the dataset in the queue's database (`runner.results.postgres`), through a server-side cursor. Memory stays bounded
whatever the size: lines are streamed; CSV needs its columns before its first row, so it reads the items twice (the
local file twice, the postgres dataset twice in one snapshot, API items spooled to a temporary file on the first
pass) and holds only the column names.

CSV: a header row with every top-level key, in the order first seen; strings as they are, numbers and booleans
as JSON (`1.5`, `true`), null as an empty cell, objects and arrays as compact JSON text; RFC 4180 quoting and
`\\r\\n` line ends; no BOM.

A dataset being written meanwhile is exported as it was when the export started. `-o FILE` is written to a
temporary file beside it and renamed when complete: FILE is never half-written.

Exit codes: 0 exported (an empty dataset too: nothing, `[]` or an empty file); 2 nothing exported: no such dataset,
or the output cannot be written (one line naming it); 1 the export failed part-way (a dataset line that is not a
JSON object, a read or write error, the API after its retries), `-o FILE` left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import anyio
import anyio.to_thread
import structlog

from runner.cli._common import EXIT_OK
from runner.errors import ConfigError, HeadlockError, NotFoundError
from runner.open import api_client, postgres_dsn, results_in_postgres
from runner.results.apify import ApiDataset
from runner.results.jsonl import dataset_path, iter_lines, whole_lines_size
from runner.settings import Settings

__all__ = ["FORMATS", "add_parsers", "export_command"]

log = structlog.get_logger("headlock.cli")

FORMATS = ("jsonl", "json", "csv")

_WRITE_BUFFER = 1 << 20


class _Writer(Protocol):
    """Writes items in one format to a binary stream, one at a time."""

    def add(self, line: bytes, item: dict[str, Any]) -> None:
        """Write one item, given as its JSON text and parsed."""

    def finish(self) -> None:
        """Write what closes the output (the JSON array's bracket) and flush."""


class _JsonLines:
    def __init__(self, out: IO[bytes]) -> None:
        self._out = out

    def add(self, line: bytes, item: dict[str, Any]) -> None:
        self._out.write(line + b"\n")

    def finish(self) -> None:
        self._out.flush()


class _JsonArray:
    """`[`, one item per line, `]`: valid JSON that line tools can still read."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._first = True

    def add(self, line: bytes, item: dict[str, Any]) -> None:
        self._out.write((b"[\n" if self._first else b",\n") + line)
        self._first = False

    def finish(self) -> None:
        self._out.write(b"[]\n" if self._first else b"\n]\n")
        self._out.flush()


class _Csv:
    def __init__(self, out: IO[bytes], columns: list[str]) -> None:
        self._text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        self._rows = csv.writer(self._text, lineterminator="\r\n")
        self._columns = columns
        if columns:
            self._rows.writerow(columns)

    def add(self, line: bytes, item: dict[str, Any]) -> None:
        self._rows.writerow([_cell(item[column]) if column in item else "" for column in self._columns])

    def finish(self) -> None:
        self._text.flush()
        self._text.detach()  # the stream stays open: its owner closes (or renames) it


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def _cell(value: object) -> str:
    """A CSV cell: strings as they are, None empty, everything else as compact JSON (`true`, `1.5`, `[1,2]`)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    return _encode(value)  # floats as JSON writes them, objects, arrays


def _parsed(lines: Iterable[tuple[int, bytes]], where: str) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Each line with its item.

    Raises:
        HeadlockError: `where:N: not a JSON object` for the first line that is not.
    """
    for number, line in lines:
        try:
            item = _decode(line.decode())
        except ValueError:  # UnicodeDecodeError too
            item = None
        if not isinstance(item, dict):
            raise HeadlockError(f"{where}:{number}: not a JSON object: {line[:80]!r}")
        yield line, item


def _read(path: Path, end: int) -> Iterator[tuple[int, bytes]]:
    """`iter_lines`, its errors as ours.

    Raises:
        HeadlockError: the file cannot be read.
    """
    try:
        yield from iter_lines(path, end)
    except OSError as exc:
        raise HeadlockError(f"export: cannot read {path}: {exc.strerror or exc}") from exc


def _columns(items: Iterable[tuple[bytes, dict[str, Any]]]) -> list[str]:
    """Every top-level key, in the order first seen."""
    seen: dict[str, None] = {}
    for _, item in items:
        seen.update(dict.fromkeys(item))
    return list(seen)


class _Output:
    """Standard output, or a temporary file beside the target that `commit` renames onto it."""

    def __init__(self, target: Path | None) -> None:
        self.target = target
        self._temporary: Path | None = None
        self._destination: Path | None = None
        self.stream: IO[bytes]

    @property
    def name(self) -> str:
        return "standard output" if self.target is None else str(self.target)

    def open(self) -> None:
        """Raises: ConfigError: the target's directory does not take a new file (one line naming it)."""
        if self.target is None:
            self.stream = sys.stdout.buffer
            return
        # The target as it is on disk: a symlink's file is what gets replaced, never the link.
        self._destination = Path(os.path.realpath(self.target))
        if self._destination.exists() and not self._destination.is_file():
            # /dev/null, a FIFO, a terminal: written to as it is. A rename onto it would replace the device itself.
            try:
                self.stream = self._destination.open("wb", buffering=_WRITE_BUFFER)
            except OSError as exc:
                raise ConfigError(f"export: cannot write {self.target}: {exc.strerror or exc}") from exc
            return
        self._temporary = self._destination.with_name(f".{self.target.name}.{secrets.token_hex(4)}.partial")
        try:
            # 0o666 and the umask, as the renamed file should have (mkstemp would make it 0o600).
            fd = os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            self._temporary = None
            raise ConfigError(f"export: cannot write {self.target}: {exc.strerror or exc}") from exc
        self.stream = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)

    def commit(self) -> None:
        """Flush; for a file, sync it and rename it onto the target."""
        self.stream.flush()
        if self._temporary is not None and self._destination is not None:
            os.fsync(self.stream.fileno())
            self.stream.close()
            os.replace(self._temporary, self._destination)
            self._temporary = None

    def discard(self) -> None:
        """Remove the temporary file (the target is left as it was). Idempotent."""
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            with contextlib.suppress(OSError):
                self._temporary.unlink()
            self._temporary = None


def _writer(fmt: str, out: IO[bytes], columns: list[str]) -> _Writer:
    if fmt == "jsonl":
        return _JsonLines(out)
    if fmt == "json":
        return _JsonArray(out)
    return _Csv(out, columns)


def _export_file(path: Path, fmt: str, output: _Output) -> int:
    """Export the local dataset file at `path` (a snapshot of its whole lines now); return how many items.

    Raises:
        ConfigError: the file is missing, or the output cannot be opened.
        HeadlockError: a line is not a JSON object, or reading or writing failed part-way.
    """
    if output.target is not None and output.target.resolve() == path.resolve():
        # Renamed onto the dataset, the export would take the file from under a run appending to it.
        raise ConfigError(f"export: -o {output.target} is the dataset itself; write elsewhere")
    try:
        end = whole_lines_size(path)
    except FileNotFoundError:
        raise ConfigError(f"export: no dataset {path.stem!r}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"export: cannot read {path}: {exc.strerror or exc}") from exc

    def items() -> Iterator[tuple[bytes, dict[str, Any]]]:
        return _parsed(_read(path, end), str(path))

    columns = _columns(items()) if fmt == "csv" else []
    output.open()
    writer = _writer(fmt, output.stream, columns)
    count = 0
    for line, item in items():
        writer.add(line, item)
        count += 1
    writer.finish()
    return count


def _export_postgres(dsn: str, name: str, fmt: str, output: _Output) -> tuple[int, str]:
    """Export the postgres dataset `name` as it is now (one snapshot for both of CSV's passes); return how many
    items and where they came from.

    Raises:
        ConfigError: no such dataset, or the output cannot be opened.
        HeadlockError: the database cannot be reached, or reading or writing failed part-way.
    """
    from runner.results.postgres import PostgresSnapshot  # noqa: PLC0415 - only this backend needs psycopg

    with PostgresSnapshot.open(dsn, name) as snapshot:

        def items() -> Iterator[tuple[bytes, dict[str, Any]]]:
            return _parsed(snapshot.lines(), snapshot.location)

        columns = _columns(items()) if fmt == "csv" else []
        output.open()
        writer = _writer(fmt, output.stream, columns)
        count = 0
        for line, item in items():
            writer.add(line, item)
            count += 1
        writer.finish()
        return count, snapshot.location


async def _export_api(dataset: ApiDataset, fmt: str, output: _Output) -> int:
    """Export the API dataset a page at a time; CSV through a spool file (columns first). Return how many items.

    Raises:
        ConfigError: the output cannot be opened.
        QueueError: an API call failed after its retries.
    """
    if fmt != "csv":
        await anyio.to_thread.run_sync(output.open)
        writer = _writer(fmt, output.stream, [])
        count = await _write_pages(dataset.pages(), writer.add)
        await anyio.to_thread.run_sync(writer.finish)
        return count
    spool = await anyio.to_thread.run_sync(tempfile.TemporaryFile)  # removed when closed
    try:
        columns: dict[str, None] = {}

        def spool_one(line: bytes, item: dict[str, Any]) -> None:
            spool.write(line + b"\n")
            columns.update(dict.fromkeys(item))

        count = await _write_pages(dataset.pages(), spool_one)

        def write_csv() -> None:
            spool.seek(0)
            output.open()
            writer = _writer(fmt, output.stream, list(columns))
            for line in spool:
                writer.add(line, _decode(line.decode()))
            writer.finish()

        await anyio.to_thread.run_sync(write_csv)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(spool.close)
    return count


async def _write_pages(pages: AsyncIterator[list[dict[str, Any]]], add: Callable[[bytes, dict[str, Any]], None]) -> int:
    """Hand each item of each page to `add` with its JSON text (in a worker thread: it writes files); return how
    many."""
    count = 0
    async for page in pages:

        def write(page: list[dict[str, Any]] = page) -> None:
            for item in page:
                add(_dump(item), item)

        await anyio.to_thread.run_sync(write)
        count += len(page)
    return count


def _dump(item: dict[str, Any]) -> bytes:
    return _encode(item).encode()


async def export_command(settings: Settings, args: argparse.Namespace) -> int:
    """`headlock export` (see the module docstring for the formats and the exit codes)."""
    name = args.dataset or settings.dataset
    if "/" in name or name in {".", ".."}:
        raise ConfigError(f"export --dataset: {name!r} is a dataset name, not a path")
    output = _Output(None if args.output in (None, "-") else Path(args.output))
    try:
        if results_in_postgres(settings):
            dsn = postgres_dsn(settings)
            count, source = await anyio.to_thread.run_sync(_export_postgres, dsn, name, args.format, output)
        elif settings.results_on_api():
            count, source = await _from_api(settings, args, name, output)
        else:
            path = dataset_path(settings.storage_dir, name)
            count, source = await anyio.to_thread.run_sync(_export_file, path, args.format, output), str(path)
        await anyio.to_thread.run_sync(output.commit)
    except BrokenPipeError:
        # The reader went away (`| head`): what it read is what it wanted. Silence the flush at exit too.
        output.discard()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return EXIT_OK
    except OSError as exc:
        output.discard()
        raise HeadlockError(f"export: cannot write {output.name}: {exc.strerror or exc}") from exc
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(output.discard)
        raise
    log.info("export.done", items=count, format=args.format, source=source, output=output.name)
    return EXIT_OK


async def _from_api(settings: Settings, args: argparse.Namespace, name: str, output: _Output) -> tuple[int, str]:
    dataset_id = None if args.dataset else settings.dataset_id
    async with api_client(settings) as api:
        try:
            if dataset_id is not None:
                dataset = await ApiDataset.find(api, dataset_id=dataset_id)
            else:
                dataset = await ApiDataset.find(api, name=name)
        except NotFoundError as exc:
            raise ConfigError(f"export: {exc}") from exc
        count = await _export_api(dataset, args.format, output)
        return count, dataset.location


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add `export`."""
    export = commands.add_parser(
        "export",
        parents=[common],
        help="write a dataset's items as JSONL, JSON or CSV",
        description="Write the items of a dataset (the local file, the API dataset with --backend apify, or the "
        "dataset in the queue's database on the postgres backend) to a file or standard output, streaming. CSV: a "
        "header of every top-level key in the order first seen, nested values as JSON.",
        epilog="exit codes: 0 exported; 1 failed part-way (FILE left as it was); 2 no such dataset, or the output "
        "cannot be written",
    )
    export.add_argument("--dataset", help="dataset name (default: the settings' dataset, 'default')")
    export.add_argument("--format", choices=FORMATS, default="jsonl", help="default jsonl")
    export.add_argument("--output", "-o", metavar="FILE", help="write to FILE (replaced when complete); '-': stdout")
    export.set_defaults(command=export_command, needs_settings=True)
