"""Group commit for the inbox: one writer thread, one transaction for every accept waiting.

Each accepted delivery must be committed before its 2xx. Committing each in its own
transaction costs one commit (an fsync on PostgreSQL) and a thread hop per request; here
concurrent accepts queue up while the previous group commits, and the next transaction takes
all of them. A lone request still commits at once: nothing waits for a group to fill.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select

from sync.inbox_store import insert_new
from sync.store import inbox, write_transaction

__all__ = ["Accepted", "InboxWriter"]

log = logging.getLogger("crmhub.intake")

# Deliveries per transaction at most (a burst of this many commits as one).
MAX_GROUP = 256


@dataclass(frozen=True, slots=True)
class Accepted:
    """The outcome of an accept: the inbox row, and whether it was already there."""

    inbox_id: int
    duplicate: bool


@dataclass(slots=True)
class _Waiting:
    row: dict[str, Any]
    future: asyncio.Future[Accepted] | concurrent.futures.Future[Accepted]
    loop: asyncio.AbstractEventLoop | None  # None: a blocking caller


class InboxWriter:
    """Commits inbox rows on its own thread, many accepts per transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()
        self._closed = False

    async def write(self, row: dict[str, Any]) -> Accepted:
        """Commit `row` (or find its delivery already there); returns once it is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Accepted] = loop.create_future()
        self._put(_Waiting(row, future, loop))
        # Shielded: a client that hangs up does not undo the write, and the row is kept.
        return await asyncio.shield(future)

    def write_blocking(self, row: dict[str, Any]) -> Accepted:
        """`write` for callers without an event loop (the CLI, tests)."""
        future: concurrent.futures.Future[Accepted] = concurrent.futures.Future()
        self._put(_Waiting(row, future, None))
        return future.result()

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        with self._state:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=30)

    def _put(self, waiting: _Waiting) -> None:
        with self._state:
            if self._closed:
                raise RuntimeError("the intake is closed; no delivery can be accepted")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="inbox-writer", daemon=True)
                self._thread.start()
            self._queue.put(waiting)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                group.append(item)
            self._commit(group)

    def _commit(self, group: list[_Waiting]) -> None:
        try:
            _deliver(group, self._insert(group))
        except Exception as exc:
            if len(group) == 1:
                log.error("inbox write failed", extra={"error_type": type(exc).__name__})
                _deliver(group, [exc])
                return
            # One transaction per row instead, so a row that cannot be written fails alone.
            for waiting in group:
                self._commit([waiting])

    def _insert(self, group: list[_Waiting]) -> list[Accepted]:
        with write_transaction(self.engine) as conn:
            return [_insert_one(conn, w.row) for w in group]


def _insert_one(conn: Connection, row: dict[str, Any]) -> Accepted:
    new_id = conn.execute(insert_new(conn), row).scalar()
    if new_id is not None:
        return Accepted(int(new_id), duplicate=False)
    existing = conn.execute(
        select(inbox.c.id).where(
            inbox.c.connector == row["connector"], inbox.c.delivery_id == row["delivery_id"]
        )
    ).scalar_one()
    return Accepted(int(existing), duplicate=True)


def _deliver(group: list[_Waiting], outcomes: Sequence[Accepted | BaseException]) -> None:
    """Hand each waiter its outcome: one wake-up per event loop, not one per row."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiting, Accepted | BaseException]]] = {}
    for waiting, outcome in zip(group, outcomes, strict=True):
        if waiting.loop is None:
            _settle(waiting.future, outcome)
        else:
            by_loop.setdefault(waiting.loop, []).append((waiting, outcome))
    for loop, items in by_loop.items():
        # A closed loop has nobody waiting any more (the rows are committed all the same).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_all, items)


def _settle_all(items: list[tuple[_Waiting, Accepted | BaseException]]) -> None:
    for waiting, outcome in items:
        _settle(waiting.future, outcome)


def _settle(
    future: asyncio.Future[Accepted] | concurrent.futures.Future[Accepted],
    outcome: Accepted | BaseException,
) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
