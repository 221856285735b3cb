"""The inbox under the intake: where it lives, how accepts are committed (many per
transaction, each durably before its 2xx), and rows left by an earlier version."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from sync.inbox_store import InboxStore
from sync.inbox_writer import InboxWriter
from sync.intake import Intake
from sync.store import dead_letter, inbox, write_transaction
from tests.web.conftest import activities, count, fixture, inbox_rows


def row(delivery: str, body: str | None = "{}") -> dict:
    return {
        "connector": "generic",
        "delivery_id": delivery,
        "received_at": datetime.now(UTC),
        "content_type": "application/json",
        "body": body,
        "status": "pending",
        "attempts": 0,
    }


@pytest.fixture
def store(db):
    inbox_store = InboxStore(db)
    yield inbox_store
    inbox_store.close()


def test_on_sqlite_the_inbox_is_a_file_of_its_own_and_processing_fsyncs(db, store, settings):
    if db.dialect.name != "sqlite":
        assert not store.separate
        assert store.engine is db
        return
    assert store.path is not None
    assert store.path.name == "store.inbox.db"
    intake = Intake(settings, db)
    try:
        accepted = intake.record("generic", "generic:a", "application/json", "{}")
    finally:
        intake.close()
    assert store.path.exists()
    assert count(db, inbox) == 0  # the store's own table is not written
    assert [r["id"] for r in inbox_rows(db)] == [accepted.inbox_id]
    with store.accepts.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL, like the store
    # Processing fsyncs what it writes to the store before it marks the rows done.
    intake = Intake(settings, db)
    try:
        with intake.engine.db.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    finally:
        intake.close()


async def test_concurrent_accepts_share_transactions(store):
    commits = 0

    def counted(_conn: object) -> None:
        nonlocal commits
        commits += 1

    event.listen(store.accepts, "commit", counted)
    writer = InboxWriter(store.accepts)
    try:
        results = await asyncio.gather(*(writer.write(row(f"d-{i}")) for i in range(50)))
    finally:
        writer.close()
    assert len({r.inbox_id for r in results}) == 50
    assert not any(r.duplicate for r in results)
    assert commits < 10, f"{commits} commits for 50 concurrent accepts"


async def test_the_same_delivery_twice_in_one_group_is_one_row(store, db):
    writer = InboxWriter(store.accepts)
    try:
        first, second = await asyncio.gather(writer.write(row("d-1")), writer.write(row("d-1")))
        again = writer.write_blocking(row("d-1"))
    finally:
        writer.close()
    assert (first.duplicate, second.duplicate, again.duplicate) == (False, True, True)
    assert first.inbox_id == second.inbox_id == again.inbox_id
    assert len(inbox_rows(db)) == 1


async def test_a_row_that_cannot_be_written_fails_alone(store, db):
    writer = InboxWriter(store.accepts)
    try:
        outcomes = await asyncio.gather(
            writer.write(row("good-1")),
            writer.write(row("bad", body=None)),  # NOT NULL: refused by the database
            writer.write(row("good-2")),
            return_exceptions=True,
        )
    finally:
        writer.close()
    assert isinstance(outcomes[1], IntegrityError)
    assert not isinstance(outcomes[0], BaseException)
    assert not isinstance(outcomes[2], BaseException)
    assert sorted(r["delivery_id"] for r in inbox_rows(db)) == ["good-1", "good-2"]


def test_a_closed_writer_accepts_nothing(store):
    writer = InboxWriter(store.accepts)
    writer.write_blocking(row("d-1"))
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_blocking(row("d-2"))


async def test_rows_an_earlier_version_left_in_the_store_move_to_the_inbox_file(
    tmp_path, sqlite_url
):
    from sync.store import make_engine
    from tests.conftest import make_settings
    from tests.web.conftest import connectors

    db = make_engine(sqlite_url)
    body = json.dumps(fixture("generic_submission.json"))
    with write_transaction(db) as conn:  # what the previous version wrote: the store's table
        conn.execute(inbox.insert(), [row("generic:gen-0001", body), row("old", "{}")])
        conn.execute(inbox.update().where(inbox.c.delivery_id == "old").values(status="done"))
    settings = make_settings(tmp_path, sqlite_url, connectors())
    intake = Intake(settings, db)
    try:
        assert count(db, inbox) == 0
        moved = {r["delivery_id"]: r["status"] for r in inbox_rows(db)}
        assert moved == {"generic:gen-0001": "pending", "old": "done"}
        # Replay protection carries over; the pending delivery is processed once.
        assert intake.record("generic", "old", "application/json", "{}").duplicate
        assert (await intake.drain()).processed == 1
    finally:
        intake.close()
        db.dispose()


def test_a_delivery_dead_lettered_twice_is_one_letter(settings, db):
    intake = Intake(settings, db)
    try:
        accepted = intake.record("generic", "generic:x", "application/json", "[1]")
        (claimed,) = intake._claim_batch(10)
        assert claimed["id"] == accepted.inbox_id
        # A crash between the letter and the mark means the row is lettered again later.
        intake._fail([claimed], "RecordError: not an object", True)
        intake._fail([claimed], "RecordError: not an object", True)
    finally:
        intake.close()
    assert count(db, dead_letter, dead_letter.c.source == "generic") == 1
    assert inbox_rows(db)[0]["status"] == "failed"
    assert activities(db, "generic") == []
