"""Email handling shared by the mailbox connectors: headers, addresses, excerpts.

Decoding never raises: RFC 2047 words in unknown charsets, 8-bit headers and broken MIME
degrade to replacement characters, and the message is still usable.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any

from crmhub.records import RawRecord

__all__ = [
    "MailIdentity",
    "ParsedEmail",
    "email_records",
    "html_to_text",
    "is_automated",
    "parse_email",
    "parse_header_list",
]

_EXCERPT = 500
_AUTOMATED_LOCAL = re.compile(r"^(no-?reply|do-?not-?reply|mailer-daemon|postmaster|bounces?)\b")


@dataclass(slots=True)
class ParsedEmail:
    message_id: str
    subject: str
    sent_at: datetime | None
    sender: tuple[str, str] | None  # (display name, address)
    to: list[tuple[str, str]] = field(default_factory=list)
    cc: list[tuple[str, str]] = field(default_factory=list)
    excerpt: str = ""
    thread_id: str | None = None
    automated: bool = False

    @property
    def participants(self) -> list[tuple[str, str]]:
        people = ([self.sender] if self.sender else []) + self.to + self.cc
        seen: dict[str, tuple[str, str]] = {}
        for name, address in people:
            seen.setdefault(address, (name, address))
        return list(seen.values())

    def as_payload(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "subject": self.subject,
            "date": self.sent_at.isoformat() if self.sent_at else None,
            "from": _addr(self.sender) if self.sender else None,
            "to": [_addr(a) for a in self.to],
            "cc": [_addr(a) for a in self.cc],
            "participants": [a for _, a in self.participants],
            "excerpt": self.excerpt,
            "thread_id": self.thread_id,
            "automated": self.automated,
        }


def _addr(pair: tuple[str, str]) -> dict[str, str]:
    return {"name": pair[0], "email": pair[1]}


def _header(msg: Message, name: str) -> str:
    raw = msg.get(name)
    if raw is None:
        return ""
    try:
        text = str(raw)
        if "=?" in text:
            text = str(make_header(decode_header(text)))
    except (LookupError, UnicodeError, ValueError, TypeError):
        # An unknown charset in an encoded word: keep what can be read.
        parts = []
        for chunk, _charset in decode_header(str(raw)):
            parts.append(chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk)
        text = "".join(parts)
    return " ".join(text.split())


def _addresses(msg: Message, *names: str) -> list[tuple[str, str]]:
    values = [_header(msg, n) for n in names]
    out = []
    for display, address in getaddresses([v for v in values if v]):
        address = address.strip().lower()
        if "@" in address and " " not in address:
            out.append((display.strip().strip('"'), address))
    return out


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "tr", "li"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    return " ".join(html.unescape("".join(parser.parts)).split())


def _body_text(msg: Message) -> str:
    plain = markup = None
    for part in msg.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = payload.decode(charset, "replace")
        except LookupError:
            text = payload.decode("utf-8", "replace")
        if ctype == "text/plain" and plain is None:
            plain = text
        elif ctype == "text/html" and markup is None:
            markup = text
    if plain is not None:
        lines = [ln for ln in plain.splitlines() if not ln.startswith(">")]
        return " ".join(" ".join(lines).split())
    return html_to_text(markup) if markup else ""


def parse_email(raw: bytes) -> ParsedEmail:
    """Parse one RFC 5322 message; never raises for malformed input."""
    msg: Message = message_from_bytes(raw, policy=policy.compat32)
    message_id = _header(msg, "Message-ID").strip("<> ")
    if not message_id:
        # No Message-ID: a stable id from the headers that identify the message.
        basis = "|".join(_header(msg, h) for h in ("From", "To", "Date", "Subject"))
        message_id = "sha:" + hashlib.sha256(basis.encode()).hexdigest()[:32]
    try:
        sent_at: datetime | None = parsedate_to_datetime(_header(msg, "Date"))
        if sent_at is not None and sent_at.tzinfo is None:
            sent_at = sent_at.replace(tzinfo=UTC)
    except (TypeError, ValueError, IndexError):
        sent_at = None
    senders = _addresses(msg, "From")
    sender = senders[0] if senders else None
    references = _header(msg, "References").split()
    thread = (references[0] if references else _header(msg, "In-Reply-To")) or message_id
    automated = is_automated(sender[1] if sender else None, msg)
    return ParsedEmail(
        message_id=message_id,
        subject=_header(msg, "Subject"),
        sent_at=sent_at.astimezone(UTC) if sent_at else None,
        sender=sender,
        to=_addresses(msg, "To"),
        cc=_addresses(msg, "Cc"),
        excerpt=_body_text(msg)[:_EXCERPT],
        thread_id=thread.strip("<> "),
        automated=automated,
    )


def is_automated(sender: str | None, headers: Message | dict[str, str]) -> bool:
    """Machine-sent mail (no-reply, bulk, auto-replies): its sender is not a correspondent.

    `headers` is a parsed message or a dict of header values (API connectors).
    """

    def get(name: str, default: str = "") -> str:
        if isinstance(headers, Message):
            return str(headers.get(name, default))
        lowered = {k.lower(): v for k, v in headers.items()}
        return str(lowered.get(name.lower(), default))

    return bool(
        (sender and _AUTOMATED_LOCAL.match(sender.split("@")[0]))
        or get("List-Unsubscribe")
        or (get("Auto-Submitted", "no").strip().lower() not in ("", "no"))
        or get("Precedence").strip().lower() in ("bulk", "list", "junk")
    )


def parse_header_list(headers: list[tuple[str, str]], excerpt: str = "") -> ParsedEmail:
    """Parse a message given as (name, value) header pairs (Gmail metadata, Graph headers).

    The headers are rebuilt into an RFC 5322 block, so decoding, addresses, thread ids and
    the derived id of a message without Message-ID are exactly those of `parse_email`.
    """
    lines = []
    for name, value in headers:
        clean_name = re.sub(r"[^!-9;-~]", "", name)  # printable, no colon
        if clean_name:
            lines.append(f"{clean_name}: {' '.join(str(value).split())}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")
    parsed = parse_email(raw)
    parsed.excerpt = " ".join(html.unescape(excerpt).split())[:_EXCERPT]
    return parsed


@dataclass(frozen=True, slots=True)
class MailIdentity:
    """Who "we" are for one mailbox: the owner's addresses and the company's domains."""

    owner: frozenset[str]
    internal_domains: frozenset[str]

    @classmethod
    def of(cls, owner: list[str], internal_domains: list[str]) -> MailIdentity:
        return cls(
            frozenset(a.strip().lower() for a in owner if a.strip()),
            frozenset(d.strip().lower().lstrip("@") for d in internal_domains if d.strip()),
        )

    def is_external(self, address: str) -> bool:
        address = address.lower()
        return address not in self.owner and address.rpartition("@")[2] not in self.internal_domains


def email_records(parsed: ParsedEmail, origin: str, identity: MailIdentity) -> list[RawRecord]:
    """One `activity` per message plus one `contact` per external, human participant.

    Colleagues (internal domains), the mailbox owner and the sender of automated mail are
    never turned into contacts; they still appear among the activity's participants.
    """
    out: list[RawRecord] = []
    for name, address in parsed.participants:
        if not identity.is_external(address):
            continue
        if parsed.automated and parsed.sender and address == parsed.sender[1]:
            continue
        out.append(RawRecord(address, "contact", {"email": address, "name": name}, origin=origin))
    out.append(
        RawRecord(parsed.message_id, "activity", parsed.as_payload(), parsed.sent_at, origin)
    )
    return out
