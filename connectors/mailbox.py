"""Local mail: a folder of .eml files and/or mbox files.

Each message becomes an `email` activity (Message-ID is the external id); each external
participant becomes a contact keyed by address, with the display name parsed into first/last.
The mailbox owner, `internal_domains` and automated senders (no-reply, bulk) are not contacts.
"""

from __future__ import annotations

import mailbox as stdlib_mailbox
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from connectors.base import Connector, ConnectorConfig, Stream
from connectors.email_parsing import MailIdentity, email_records, parse_email
from connectors.files import advance, file_state, resolve_files, resume_position
from connectors.registry import register
from crmhub.records import Cursor, Page, RawRecord

_SUFFIXES = (".eml", ".mbox", ".mbx")


class MailboxConfig(ConnectorConfig):
    path: str = Field(description="a folder of .eml/.mbox files, or one mbox file")
    owner: list[str] = Field(default_factory=list, description="the mailbox owner's addresses")
    internal_domains: list[str] = Field(
        default_factory=list, description="colleagues' domains: never turned into contacts"
    )
    page_size: int = Field(500, ge=1, description="messages per committed batch")


@register("mailbox", label="Mail folder (.eml / mbox)")
class MailboxConnector(Connector[MailboxConfig]):
    Config = MailboxConfig
    streams: ClassVar[frozenset[Stream]] = frozenset({"activities"})

    async def check(self) -> str:
        paths = resolve_files(self.context, self.config.path, suffixes=_SUFFIXES)
        return f"{len(paths)} mail file(s)"

    async def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        current = cursor
        identity = MailIdentity.of(self.config.owner, self.config.internal_domains)
        records: list[RawRecord] = []
        rejects: list[tuple[str, str, str]] = []
        for path in resolve_files(self.context, self.config.path, suffixes=_SUFFIXES):
            state = file_state(path)
            start = resume_position(current, path, state)
            if start is None:
                continue
            pos = 0
            for pos, origin, raw in self._messages(path):
                if pos <= start:
                    continue
                try:
                    parsed = parse_email(raw)
                except Exception as exc:
                    rejects.append((origin, f"unreadable message: {exc}", ""))
                    continue
                records.extend(email_records(parsed, origin, identity))
                if len(records) >= self.config.page_size:
                    current = advance(current, path, state, pos, False)
                    yield Page(records, current, rejects)
                    records, rejects = [], []
            current = advance(current, path, state, pos, True)
        yield Page(records, current, rejects)

    @staticmethod
    def _messages(path: Path) -> Iterator[tuple[int, str, bytes]]:
        if path.suffix.lower() == ".eml":
            yield 1, path.name, path.read_bytes()
            return
        box = stdlib_mailbox.mbox(path, create=False)
        try:
            for index, key in enumerate(box.iterkeys(), start=1):
                yield index, f"{path.name}#{index}", box.get_bytes(key)
        finally:
            box.close()
