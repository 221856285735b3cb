"""Where the intake inbox lives, and what a committed accept survives.

PostgreSQL: the store's own `inbox` table (row locks: accepts never wait for processing).
Commits are as durable as the server is configured (`synchronous_commit`, on by default).

SQLite: a database file of its own next to the store (`crmhub.db` -> `crmhub.inbox.db`),
same `inbox` table. SQLite has one write lock per file, and a processing transaction (map,
stage, match and merge a batch) holds the store's for hundreds of milliseconds; an accept
queued behind it turned a 2 ms answer into a 0.3-5 s one (docs/benchmarks.md). With its own
file an accept only ever waits for another inbox write (a few ms). Like the store, the file
runs WAL with `synchronous=NORMAL`: a committed accept survives a crash of crmhub (it is in
the operating system's hands), not a power loss or kernel crash in the moments after it.
Fsyncing each accept (`synchronous=FULL`) was measured: with processing writing the same
disk, fsync times reached 150 ms and the p99 of the 2xx went from 23 ms to 216-409 ms.

Two files are no longer committed in one order, so processing fsyncs each ingest before it
marks rows done (sync/intake.py): "done" never outlives the records it stands for.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event, inspect, select
from sqlalchemy.sql.dml import Insert

from sync.store import inbox, make_engine, upsert, write_transaction

__all__ = ["InboxStore", "fsync_commits", "inbox_path", "insert_new"]

log = logging.getLogger("crmhub.intake")

_prepared: set[Path] = set()
_prepare_lock = threading.Lock()
_MOVE_BATCH = 1000
# Write-ahead-log pages (4 KiB) after which the accepting connection checkpoints itself.
ACCEPT_CHECKPOINT_PAGES = 20_000


def inbox_path(db: Engine) -> Path | None:
    """The inbox file of SQLite store `db`, or None when the inbox is the store's own table
    (PostgreSQL; in-memory or URI-named SQLite databases, which have no path to sit next to)."""
    if db.dialect.name != "sqlite":
        return None
    database = db.url.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return path.with_name(f"{path.stem}.inbox{path.suffix or '.db'}")


def insert_new(conn: Connection) -> Insert:
    """INSERT one inbox row, doing nothing if its (connector, delivery_id) is there already;
    RETURNING the new id (no row for a duplicate)."""
    return (
        upsert(conn, inbox)
        .on_conflict_do_nothing(index_elements=["connector", "delivery_id"])
        .returning(inbox.c.id)
    )


def fsync_commits(dbapi_connection: Any, _record: Any) -> None:
    """SQLite connect hook: every commit of this engine fsyncs the write-ahead log."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


class InboxStore:
    """The engines that hold `inbox` for store `db`.

    `engine`: claims, marks and reads. `accepts`: the accepting writer's (SQLite: it leaves
    write-ahead-log checkpoints, which wait for the disk, to the processing side's commits,
    and only checkpoints itself when nobody else has for a long while).
    """

    def __init__(self, db: Engine) -> None:
        self.store = db
        self.path = inbox_path(db)
        if self.path is None:
            self.engine = self.accepts = db
            return
        url = f"sqlite:///{self.path}"
        self.engine = make_engine(url)
        self.accepts = make_engine(url)
        event.listen(self.accepts, "connect", _rare_checkpoints)
        _prepare(self.engine, db, self.path)

    @property
    def separate(self) -> bool:
        """True when the inbox is a file of its own (SQLite)."""
        return self.path is not None

    def close(self) -> None:
        if self.separate:
            self.engine.dispose()
            self.accepts.dispose()


def _rare_checkpoints(dbapi_connection: Any, _record: Any) -> None:
    # SQLite's default is 1000 pages; the claims and marks of processing reach that first.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA wal_autocheckpoint={ACCEPT_CHECKPOINT_PAGES}")
    cursor.close()


def _prepare(engine: Engine, store: Engine, path: Path) -> None:
    """Create the inbox file's table (once per process), and move in any rows a previous
    version left in the store's own `inbox` table."""
    with _prepare_lock:
        if path in _prepared:
            return
        inbox.create(engine, checkfirst=True)
        _move_legacy_rows(store, engine)
        _prepared.add(path)


def _move_legacy_rows(store: Engine, engine: Engine) -> None:
    """Copy, then delete: a crash in between copies again, and the unique (connector,
    delivery_id) turns the second copy into a no-op, so no row is lost or doubled."""
    with store.connect() as conn:
        if not inspect(conn).has_table("inbox"):
            return
    moved = 0
    while True:
        with store.connect() as conn:
            rows = [
                dict(r)
                for r in conn.execute(
                    select(inbox).order_by(inbox.c.id).limit(_MOVE_BATCH)
                ).mappings()
            ]
        if not rows:
            break
        with write_transaction(engine) as conn:
            for row in rows:
                conn.execute(insert_new(conn), {k: v for k, v in row.items() if k != "id"})
        with write_transaction(store) as conn:
            conn.execute(inbox.delete().where(inbox.c.id <= rows[-1]["id"]))
        moved += len(rows)
    if moved:
        log.info("inbox rows moved to their own file", extra={"rows": moved})
