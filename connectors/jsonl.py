"""JSON Lines files: one JSON object per line (form submissions, or any export).

By default each line is a submission: an activity (the mapping's [activities] section) whose
submitter is also a contact ([contacts]). `record_kind = "contact"` or `"activity"` reads
exports of only one kind.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from connectors.base import Connector, ConnectorConfig, Stream
from connectors.files import advance, detect_encoding, file_state, resolve_files, resume_position
from connectors.registry import register
from crmhub.records import Cursor, Page, RawRecord, RecordKind

_SUFFIXES = (".jsonl", ".ndjson", ".json")


class JsonlConfig(ConnectorConfig):
    path: str = Field(description="a .jsonl file, a folder of them, or a glob")
    record_kind: Literal["submission", "activity", "contact"] = Field(
        "submission",
        description="submission: an activity plus its submitter as a contact; or one kind only",
    )
    encoding: str | None = Field(None, description="text encoding; detected when unset")
    page_size: int = Field(10000, ge=1, description="lines per committed batch")


@register("jsonl", label="JSON Lines file")
class JsonlConnector(Connector[JsonlConfig]):
    Config = JsonlConfig
    streams: ClassVar[frozenset[Stream]] = frozenset({"activities"})

    @property
    def _kinds(self) -> tuple[RecordKind, ...]:
        if self.config.record_kind == "submission":
            return ("contact", "activity")
        return (self.config.record_kind,)

    async def check(self) -> str:
        paths = resolve_files(self.context, self.config.path, suffixes=_SUFFIXES)
        return f"{len(paths)} file(s), {sum(p.stat().st_size for p in paths):,} bytes"

    async def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        current = cursor
        for path in resolve_files(self.context, self.config.path, suffixes=_SUFFIXES):
            async for page in self._pull_file(path, current):
                if page.next_cursor is not None:
                    current = page.next_cursor
                yield page

    async def _pull_file(self, path: Path, cursor: Cursor | None) -> AsyncIterator[Page]:
        state = file_state(path)
        start = resume_position(cursor, path, state)
        if start is None:
            return
        records: list[RawRecord] = []
        rejects: list[tuple[str, str, str]] = []
        encoding = detect_encoding(path, self.config.encoding)
        pos = 0
        with path.open("r", encoding=encoding, errors="replace") as fh:
            for pos, line in enumerate(fh, start=1):
                if pos <= start or not line.strip():
                    continue
                origin = f"{path.name}:{pos}"
                try:
                    payload = json.loads(line)
                except json.JSONDecodeError as exc:
                    rejects.append(
                        (
                            origin,
                            f"invalid JSON: {exc.msg} at column {exc.colno}",
                            line.rstrip("\n")[:2000],
                        )
                    )
                else:
                    if isinstance(payload, dict):
                        records.extend(
                            RawRecord("", kind, payload, origin=origin) for kind in self._kinds
                        )
                    else:
                        rejects.append(
                            (
                                origin,
                                f"expected a JSON object, got {type(payload).__name__}",
                                line.rstrip("\n")[:2000],
                            )
                        )
                if len(records) + len(rejects) >= self.config.page_size:
                    yield Page(records, advance(cursor, path, state, pos, False), rejects)
                    records, rejects = [], []
        yield Page(records, advance(cursor, path, state, pos, True), rejects)
