"""CSV exports: one contact per row, from a file, a folder or a glob.

Headers named like canonical fields (`first_name`, `Email`, `Postal Code` ...) map without a
mapping file; `id` is the external id and other columns land in `attributes`. Delimiter and
encoding are detected (BOM, UTF-8, else a best guess) unless configured.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from connectors.base import Connector, ConnectorConfig, Stream
from connectors.files import advance, detect_encoding, file_state, resolve_files, resume_position
from connectors.registry import register
from crmhub.records import Cursor, Page, RawRecord

csv.field_size_limit(10 * 1024 * 1024)


class CsvConfig(ConnectorConfig):
    path: str = Field(description="a CSV file, a folder of them, or a glob (data/*.csv)")
    delimiter: str | None = Field(None, description="field separator; detected when unset")
    encoding: str | None = Field(None, description="text encoding; detected when unset")
    page_size: int = Field(10000, ge=1, description="rows per committed batch")


def _sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


@register("csv", label="CSV file")
class CsvConnector(Connector[CsvConfig]):
    Config = CsvConfig
    streams: ClassVar[frozenset[Stream]] = frozenset({"contacts"})

    async def check(self) -> str:
        paths = resolve_files(self.context, self.config.path, suffixes=(".csv", ".tsv", ".txt"))
        size = sum(p.stat().st_size for p in paths)
        return f"{len(paths)} file(s), {size:,} bytes"

    async def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        paths = resolve_files(self.context, self.config.path, suffixes=(".csv", ".tsv", ".txt"))
        # Lines, not rows (quoted newlines count twice): good enough for a progress bar's ETA.
        total = sum(_count_lines(p) - 1 for p in paths)
        current = cursor
        for path in paths:
            async for page in self._pull_file(path, current):
                if page.next_cursor is not None:
                    current = page.next_cursor
                page.total_hint = total
                yield page

    async def _pull_file(self, path: Path, cursor: Cursor | None) -> AsyncIterator[Page]:
        state = file_state(path)
        start = resume_position(cursor, path, state)
        if start is None:
            return
        if state.size == 0:
            yield Page(
                [],
                advance(cursor, path, state, 0, True),
                rejects=[(path.name, "file is empty: no header row", "")],
            )
            return
        encoding = detect_encoding(path, self.config.encoding)
        with path.open("r", encoding=encoding, errors="replace", newline="") as fh:
            sample = fh.read(64 * 1024)
            fh.seek(0)
            delimiter = self.config.delimiter or _sniff_delimiter(sample)
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                yield Page(
                    [],
                    advance(cursor, path, state, 0, True),
                    rejects=[(path.name, "file has no header row", "")],
                )
                return
            header = [h.strip().lstrip("\ufeff") for h in header]
            width = len(header)
            records: list[RawRecord] = []
            rejects: list[tuple[str, str, str]] = []
            pos = 0
            name = path.name
            page_size = self.config.page_size
            for row in reader:
                pos += 1
                if pos <= start:
                    continue
                origin = f"{name}:{reader.line_num}"
                if len(row) != width:
                    if not any(cell.strip() for cell in row):
                        continue  # blank line
                    rejects.append(
                        (
                            origin,
                            f"row has {len(row)} fields, the header has {width}",
                            _render(row, delimiter),
                        )
                    )
                else:
                    payload = {h: v for h, v in zip(header, row, strict=True) if h}
                    records.append(RawRecord("", "contact", payload, origin=origin))
                if len(records) + len(rejects) >= page_size:
                    yield Page(records, advance(cursor, path, state, pos, False), rejects)
                    records, rejects = [], []
            yield Page(records, advance(cursor, path, state, pos, True), rejects)


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def _render(row: list[str], delimiter: str) -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter).writerow(row)
    return out.getvalue().rstrip("\r\n")
