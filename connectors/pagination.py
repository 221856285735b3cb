"""Paging strategies and the incremental watermark every API connector shares.

Paginators say how the next request differs from the last one; they work on a plain dict of
request parameters (query string or JSON body, the connector decides which):

- `OffsetPaginator`: `offset` + `count`/`limit`, stop on a short page or at the total
  (Mailchimp, ActiveCampaign).
- `AfterPaginator`: an opaque `after` token read from the body (`paging.next.after`, HubSpot).
- `LinksNextPaginator`: follow the JSON:API `links.next` URL until it is null (Klaviyo).

`Watermark` is the incremental cursor, written down once:

- The cursor is `{"since": ISO-8601 UTC, "seen": [ids]}`: the greatest `updated_at` among
  committed records, and the ids committed *at exactly that instant*.
- A query asks for `updated_at >= since` (inclusive filters) or `updated_at > since - overlap`
  (strict filters, `strict=True`; `overlap` is the source's timestamp resolution), sorted
  ascending, so records sharing the boundary instant are always read again, never lost to a tie.
- Records already committed at the boundary (`seen`) are dropped on resume, so a resumed run
  neither skips nor repeats them. Records in the overlap below `since` may be yielded again;
  the store absorbs those.
- Offset-paged sources page by seeking: each request restarts at `since` and skips only the
  records already consumed in that window, less a safety margin re-read and dropped by id. A
  record edited mid-run moves to the end of the order instead of shifting an unread record
  past the offset, so "updated while paging" costs a re-read, not a loss.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from crmhub.records import Cursor, Page, RawRecord
from crmhub.transforms import parse_datetime

__all__ = [
    "AfterPaginator",
    "LinksNextPaginator",
    "OffsetPaginator",
    "Paginator",
    "Watermark",
    "dig",
    "iso",
    "reject_of",
    "seek_pages",
]

MAX_SEEN_IDS = 1000
"""Above this many ties at the boundary the ids are not stored; a resume re-reads the ties."""


def dig(body: Any, path: str) -> Any:
    """`dig(body, "paging.next.after")`, or None if any step is missing."""
    current = body
    for part in path.split("."):
        if not isinstance(current, dict):
            return None
        current = current.get(part)
    return current


def iso(value: datetime) -> str:
    """UTC ISO-8601 with milliseconds and a `Z`, the format cursors are stored in."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Paginator(ABC):
    """How to get from one page's request to the next one's."""

    def init_request(self, params: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Set the first page's parameters (page size, starting offset)."""

    @abstractmethod
    def next_request(self, body: Any, items: list[Any], params: dict[str, Any]) -> str | None:
        """Update `params` for the page after `body`; return a full URL to fetch instead of
        the same path (links-style paging), `""` to reuse the path, or None when done."""


@dataclass
class OffsetPaginator(Paginator):
    limit: int
    offset_param: str = "offset"
    limit_param: str = "count"
    total_path: str | None = None

    def init_request(self, params: dict[str, Any]) -> None:
        params[self.limit_param] = self.limit
        params.setdefault(self.offset_param, 0)

    def next_request(self, body: Any, items: list[Any], params: dict[str, Any]) -> str | None:
        offset = int(params.get(self.offset_param, 0)) + len(items)
        total = dig(body, self.total_path) if self.total_path else None
        if len(items) < self.limit or (isinstance(total, int) and offset >= total):
            return None
        params[self.offset_param] = offset
        return ""


@dataclass
class AfterPaginator(Paginator):
    limit: int
    token_path: str = "paging.next.after"
    param: str = "after"

    def init_request(self, params: dict[str, Any]) -> None:
        params["limit"] = self.limit

    def next_request(self, body: Any, items: list[Any], params: dict[str, Any]) -> str | None:
        token = dig(body, self.token_path)
        if not token:
            return None
        params[self.param] = str(token)
        return ""


@dataclass
class LinksNextPaginator(Paginator):
    def next_request(self, body: Any, items: list[Any], params: dict[str, Any]) -> str | None:
        url = dig(body, "links.next")
        if not isinstance(url, str) or not url:
            return None
        params.clear()  # the link carries every query parameter
        return url


@dataclass
class Watermark:
    """Incremental state for one stream; see the module docstring for the semantics."""

    since: datetime | None = None
    overlap: timedelta = timedelta(0)
    strict: bool = False
    # Records consumed that the current query window still returns, id -> updated_at.
    _window: dict[str, datetime] = field(default_factory=dict)

    @classmethod
    def from_cursor(
        cls,
        cursor: Cursor | None,
        *,
        overlap: timedelta = timedelta(0),
        strict: bool = False,
        key: str = "since",
    ) -> Watermark:
        if not cursor or not cursor.get(key):
            return cls(None, overlap, strict)
        since = parse_datetime(cursor[key])
        seen = cursor.get("seen") or []
        return cls(since, overlap, strict, {str(i): since for i in seen})

    def query_from(self) -> datetime | None:
        """The lower bound to send (`since - overlap`), or None for everything."""
        return None if self.since is None else self.since - self.overlap

    def _in_window(self, at: datetime, low: datetime) -> bool:
        return at > low if self.strict else at >= low

    @property
    def consumed_in_window(self) -> int:
        return len(self._window)

    def admit(self, record_id: str, updated_at: datetime | None) -> bool:
        """Record that `record_id` was read; False when it is a repeat at the boundary."""
        if updated_at is None:
            return True
        if self._window.get(record_id) == updated_at:
            return False
        if self.since is not None and not self._in_window(updated_at, self.since - self.overlap):
            return True  # out of order at the source; keep it, do not move the mark back
        self._window[record_id] = updated_at
        if self.since is None or updated_at > self.since:
            self.since = updated_at
            low = updated_at - self.overlap
            self._window = {k: v for k, v in self._window.items() if self._in_window(v, low)}
        return True

    def cursor(self, **extra: Any) -> Cursor | None:
        if self.since is None:
            return dict(extra) if extra else None
        at_mark = [k for k, v in self._window.items() if v == self.since]
        out: Cursor = {"since": iso(self.since)}
        if len(at_mark) <= MAX_SEEN_IDS:
            out["seen"] = sorted(at_mark)
        out.update(extra)
        return out


Fetch = Callable[[datetime | None, int], Awaitable[tuple[list[Any], int | None]]]
Parse = Callable[[Any], RawRecord]


def reject_of(item: Any, origin: str, exc: Exception) -> tuple[str, str, str]:
    return (origin, f"{type(exc).__name__}: {exc}", json.dumps(item, default=str)[:2000])


async def seek_pages(
    fetch: Fetch,
    parse: Parse,
    mark: Watermark,
    *,
    limit: int,
    origin: str,
    margin: int | None = None,
    cursor_extra: Callable[[], dict[str, Any]] | None = None,
) -> AsyncIterator[Page]:
    """Page an offset-paged, `updated_at`-ascending query by seeking from the watermark.

    `fetch(since, offset)` returns one page of raw items (at most `limit`) and the total when
    known; `parse(item)` makes a `RawRecord` or raises for an unusable item (a reject).
    """
    # Re-read a few consumed records per page: survives that many mid-run edits of ties.
    margin = max(1, min(10, limit // 10)) if margin is None else margin
    seen: set[tuple[str, datetime | None]] = set()
    rejected: set[str] = set()
    extra = 0
    while True:
        offset = max(0, mark.consumed_in_window - margin) + extra
        items, total = await fetch(mark.query_from(), offset)
        records: list[RawRecord] = []
        rejects: list[tuple[str, str, str]] = []
        for item in items:
            try:
                record = parse(item)
            except (ValueError, KeyError, TypeError) as exc:
                reject = reject_of(item, origin, exc)
                if reject[2] not in rejected:
                    rejected.add(reject[2])
                    rejects.append(reject)
                continue
            key = (record.external_id, record.updated_at)
            if key in seen or not mark.admit(record.external_id, record.updated_at):
                continue
            seen.add(key)
            records.append(record)
        # A full page with nothing new (a tie group edited under us): step over it.
        extra = 0 if records or rejects else extra + limit
        extras = cursor_extra() if cursor_extra else {}
        yield Page(records, mark.cursor(**extras), rejects, total)
        if len(items) < limit:
            return
