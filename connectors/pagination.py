"""Paging strategies and the incremental watermark every API connector shares.

Paginators say how the next request differs from the last one; they work on a plain dict of
request parameters (query string or JSON body, the connector decides which):

- `OffsetPaginator`: `offset` + `count`/`limit`, stop on a short page or at the total
  (Mailchimp, ActiveCampaign).
- `AfterPaginator`: an opaque `after` token read from the body (`paging.next.after`, HubSpot).
- `LinksNextPaginator`: follow the JSON:API `links.next` URL until it is null (Klaviyo).

`Watermark` is the incremental cursor, written down once:

- The cursor is `{"since": ISO-8601 UTC, "seen": [ids], "recent": {id: ISO-8601}}`: the
  greatest `updated_at` among committed records, the ids committed *at exactly that instant*,
  and (sources queried with an overlap) those committed inside the overlap below it.
- A query asks for `updated_at >= since` (inclusive filters) or `updated_at > since - overlap`
  (strict filters, `strict=True`; `overlap` is the source's timestamp resolution), sorted
  ascending, so records sharing the boundary instant are always read again, never lost to a tie.
- Records already committed at the boundary or in the overlap (`seen`, `recent`) are dropped
  on resume, so a resumed run neither skips nor repeats them. Above `MAX_SEEN_IDS` of them the
  ids are not stored and a resume re-reads them; the store absorbs those.
- A source that refuses a position (an expired page token, a result cap, a `since` it no
  longer takes) gets a scoped resync of that stream (`resync_when_refused`), not a failed run.
- Offset-paged sources page by seeking: each request restarts at `since` and skips only the
  records already consumed in that window, less a safety margin re-read and dropped by id. A
  record edited mid-run moves to the end of the order instead of shifting an unread record
  past the offset, so "updated while paging" costs a re-read, not a loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from crmhub.errors import PermanentError
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
    "resync_when_refused",
    "seek_pages",
]

log = logging.getLogger(__name__)

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
    # Records consumed that the current query window still returns, id -> updated_at
    # (pruned lazily: exact whenever `consumed_in_window` or `cursor()` is read).
    _window: dict[str, datetime] = field(default_factory=dict)
    _pruned_at: datetime | None = None

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
        window = {str(i): since for i in cursor.get("seen") or []}
        for i, at in (cursor.get("recent") or {}).items():
            window[str(i)] = parse_datetime(at)
        return cls(since, overlap, strict, window)

    def query_from(self) -> datetime | None:
        """The lower bound to send (`since - overlap`), or None for everything."""
        return None if self.since is None else self.since - self.overlap

    def _in_window(self, at: datetime, low: datetime) -> bool:
        return at > low if self.strict else at >= low

    def _prune(self) -> None:
        """Forget records the query window has moved past. Once a page, not once a record:
        with a 1 s overlap and dense timestamps the window holds hundreds of ids."""
        if self.since is None or self._pruned_at == self.since:
            return
        low = self.since - self.overlap
        if self.strict:
            self._window = {k: v for k, v in self._window.items() if v > low}
        else:
            self._window = {k: v for k, v in self._window.items() if v >= low}
        self._pruned_at = self.since

    @property
    def consumed_in_window(self) -> int:
        self._prune()
        return len(self._window)

    def admit(self, record_id: str, updated_at: datetime | None) -> bool:
        """Record that `record_id` was read; False when it is a repeat at the boundary."""
        if updated_at is None:
            return True
        window = self._window
        if window.get(record_id) == updated_at:
            return False
        since = self.since
        if since is None or updated_at > since:
            self.since = updated_at
        elif not self._in_window(updated_at, since - self.overlap):
            return True  # out of order at the source; keep it, do not move the mark back
        window[record_id] = updated_at
        return True

    def cursor(self, **extra: Any) -> Cursor | None:
        if self.since is None:
            return dict(extra) if extra else None
        self._prune()
        at_mark = [k for k, v in self._window.items() if v == self.since]
        out: Cursor = {"since": _exact(self.since)}
        if len(at_mark) <= MAX_SEEN_IDS:
            out["seen"] = sorted(at_mark)
        if len(self._window) <= MAX_SEEN_IDS:
            # Sub-second sources queried with an overlap: what was read below the mark too.
            recent = {k: _exact(v) for k, v in self._window.items() if v != self.since}
            if recent:
                out["recent"] = dict(sorted(recent.items()))
        out.update(extra)
        return out


def _exact(value: datetime) -> str:
    """Like `iso`, to the microsecond when there is one: a stored mark must compare equal
    to the timestamps it was taken from."""
    spec = "microseconds" if value.microsecond % 1000 else "milliseconds"
    return value.astimezone(UTC).isoformat(timespec=spec).replace("+00:00", "Z")


REFUSED = frozenset({400, 410, 422})
"""Statuses with which a source refuses a position it once gave out or accepted: an expired
page token (Klaviyo 400), a result cap (HubSpot search, 400), a `since` it no longer takes."""


async def resync_when_refused(
    pages_from: Callable[[Cursor | None], AsyncGenerator[Page, None]],
    cursor: Cursor | None,
    *,
    connector: str,
    stream: str,
    restarts: int = 3,
) -> AsyncIterator[Page]:
    """`pages_from(cursor)`, resumed instead of failed when the source refuses a position.

    The one primitive for a cursor the source no longer accepts: a refused request (`REFUSED`)
    restarts the stream from the last page's cursor when pages came since the last start
    (the engine commits them, in order, before anything read after), else from nothing:
    a scoped resync of this stream, whose records the store absorbs by content hash. A refusal
    of a fresh start, or more than `restarts` of them, is an error for the operator.
    """
    start = cursor
    while True:
        progressed, last = False, start
        try:
            async with contextlib.aclosing(pages_from(start)) as pages:
                async for page in pages:
                    progressed, last = True, page.next_cursor
                    yield page
            return
        except PermanentError as exc:
            status = exc.context.get("status")
            if status not in REFUSED or restarts <= 0 or (start is None and not progressed):
                raise
            restarts -= 1
            start = last if progressed else None
            log.warning(
                "%s: the source refused the %s stream's position (HTTP %s); %s",
                connector,
                stream,
                status,
                "resuming from the last committed page" if progressed else "resyncing the stream",
                extra={"connector": connector, "stream": stream, "status": status},
            )


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
