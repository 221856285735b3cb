"""The IMAP connector against a real Dovecot: full, incremental, resync, faults, bad mail.

One private Dovecot serves the module; every test gets its own user (its own maildir), seeds
it over IMAP APPEND and syncs it through the real pipeline into a throwaway store.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from connectors import ConnectorContext, get_connector_class
from crmhub.errors import AuthError, PermanentError, TransientError
from sync.engine import SyncEngine
from sync.queries import golden_detail, list_golden, store_totals
from sync.store import make_engine, source_record
from tests.conftest import make_settings, service_missing
from tests.connectors.dovecot import PASSWORD, CuttingProxy, Dovecot, message

_users = itertools.count(1)


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    try:
        server = Dovecot().start()
    except (OSError, RuntimeError, FileNotFoundError) as exc:
        service_missing("Dovecot", exc)
    yield server
    server.stop()


@pytest.fixture
def user(dovecot: Dovecot) -> str:
    return dovecot.add_user(f"rep{next(_users)}@crmhub.test")


def imap_table(dovecot: Dovecot, user: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "imap",
        "host": "127.0.0.1",
        "port": dovecot.port,
        "security": "none",
        "username": user,
        "password": PASSWORD,
        "folders": ["INBOX", "Sent"],
        "internal_domains": ["crmhub.test"],
        **extra,
    }


def engine_for(tmp_path: Path, store_url: str, **connectors: dict[str, Any]) -> SyncEngine:
    return SyncEngine(make_settings(tmp_path, store_url, connectors), make_engine(store_url))


def totals(db: Engine) -> dict[str, int]:
    with db.connect() as conn:
        return store_totals(conn)


def log_lines(dovecot: Dovecot, pattern: str, *, since: int = 0) -> list[str]:
    """Matches in Dovecot's log; its log process writes a moment after the event."""
    deadline = time.monotonic() + 3
    while not (found := re.findall(pattern, dovecot.log()[since:])) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def connector(table: dict[str, Any], tmp_path: Path) -> Any:
    cls = get_connector_class("imap")
    return cls(cls.Config(**table), ConnectorContext("mail", tmp_path))


async def test_full_then_nothing_then_incremental(
    dovecot: Dovecot, user: str, tmp_path: Path, store_url: str
) -> None:
    dovecot.append("INBOX", (message(i) for i in range(40)), user)
    sent = (
        message(i, sender=f"Rep <{user}>", to="Bo Client <bo{i}@client.example>")
        for i in range(100, 110)
    )
    dovecot.append("Sent", sent, user)
    engine = engine_for(tmp_path, store_url, mail=imap_table(dovecot, user, page_size=15))
    first = await engine.run("mail")
    assert (first.counts.activities, first.counts.contacts) == (50, 50)
    assert first.counts.activities_linked == 50
    assert totals(engine.db)["activities"] == 50

    second = await engine.run("mail")
    assert second.counts.pulled == 0  # CONDSTORE / UIDNEXT say nothing arrived: no FETCH

    dovecot.append("INBOX", (message(i) for i in range(200, 205)), user)
    third = await engine.run("mail")
    assert (third.counts.activities, third.counts.new) == (5, 10)  # 5 activities + 5 contacts
    assert totals(engine.db)["activities"] == 55
    engine.close()
    engine.db.dispose()


async def test_cursor_tracks_uidvalidity_uid_and_modseq(
    dovecot: Dovecot, user: str, tmp_path: Path
) -> None:
    dovecot.append("INBOX", (message(i) for i in range(7)), user)
    imap = connector(imap_table(dovecot, user, folders=["INBOX"], page_size=3), tmp_path)
    pages = [p async for p in imap.pull("activities", None)]
    cursors = [p.next_cursor["folders"]["INBOX"] for p in pages]
    assert [c["uid"] for c in cursors] == [3, 6, 7]
    # Mid-folder pages carry no modseq: a crash there must not let the next run skip.
    assert [c["modseq"] is None for c in cursors] == [True, True, False]
    assert len({c["uidvalidity"] for c in cursors}) == 1
    again = [p async for p in imap.pull("activities", pages[-1].next_cursor)]
    assert sum(len(p.records) for p in again) == 0


async def test_uidvalidity_change_resyncs_without_duplicates(
    dovecot: Dovecot, user: str, tmp_path: Path, sqlite_url: str
) -> None:
    dovecot.append("Deals", (message(i) for i in range(12)), user)
    table = imap_table(dovecot, user, folders=["INBOX", "Deals"])
    engine = engine_for(tmp_path, sqlite_url, mail=table)
    await engine.run("mail")
    dovecot.reset_uidvalidity("Deals", user)
    dovecot.append("Deals", [message(99)], user)
    result = await engine.run("mail")
    assert result.counts.pulled == 26  # all 13 messages read again (+13 contacts)
    assert result.counts.new == 2  # only message 99 and its sender are new
    assert totals(engine.db)["activities"] == 13
    engine.close()
    engine.db.dispose()


async def test_connection_cut_mid_fetch_resumes_with_exact_counts(
    dovecot: Dovecot, user: str, tmp_path: Path, sqlite_url: str
) -> None:
    dovecot.append("INBOX", (message(i, body="x" * 2000) for i in range(60)), user)
    proxy = CuttingProxy(dovecot.port, cut_after=60_000)  # a few 10-message pages in
    try:
        table = imap_table(dovecot, user, port=proxy.port, folders=["INBOX"], page_size=10)
        engine = engine_for(tmp_path, sqlite_url, mail=table)
        with pytest.raises(TransientError, match="IMAP connection"):
            await engine.run("mail")
        assert proxy.cuts == 1
        committed = totals(engine.db)["activities"]
        assert 0 < committed < 60
        assert committed % 10 == 0
        resumed = await engine.run("mail")
        # The resumed run reads only what was not committed: nothing lost, nothing twice.
        assert resumed.counts.activities == 60 - committed
        assert resumed.counts.new == 2 * (60 - committed)
        assert totals(engine.db)["activities"] == 60
        engine.close()
        engine.db.dispose()
    finally:
        proxy.close()


async def test_wrong_password_is_one_clear_auth_error(
    dovecot: Dovecot, user: str, tmp_path: Path
) -> None:
    imap = connector(imap_table(dovecot, user, password="wrong-horse"), tmp_path)
    with pytest.raises(AuthError) as caught:
        [p async for p in imap.pull("activities", None)]
    assert user in str(caught.value)
    assert "'password'" in str(caught.value)
    assert "wrong-horse" not in str(caught.value)
    # One login attempt, not a retry storm.
    failed = rf"auth failed.*user=<{re.escape(user)}>"
    assert len(log_lines(dovecot, failed)) == 1
    with pytest.raises(AuthError):
        await imap.check()


async def test_tls_starttls_and_an_untrusted_certificate(
    dovecot: Dovecot, user: str, tmp_path: Path
) -> None:
    dovecot.append("INBOX", [message(1)], user)
    cert = str(dovecot.cert)
    tls = imap_table(dovecot, user, security="tls", port=dovecot.tls_port, ca_file=cert)
    assert "INBOX: 1" in await connector(tls, tmp_path).check()
    starttls = imap_table(dovecot, user, security="starttls", ca_file=cert)
    pages = [p async for p in connector(starttls, tmp_path).pull("activities", None)]
    assert sum(r.kind == "activity" for p in pages for r in p.records) == 1
    untrusted = imap_table(dovecot, user, security="tls", port=dovecot.tls_port)
    with pytest.raises(PermanentError, match="certificate"):
        await connector(untrusted, tmp_path).check()


async def test_missing_folder_is_named(dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    imap = connector(imap_table(dovecot, user, folders=["INBOX", "Archive 2019"]), tmp_path)
    with pytest.raises(PermanentError, match=r"'Archive 2019' does not exist.*INBOX"):
        [p async for p in imap.pull("activities", None)]


async def test_bad_mail_degrades_and_huge_mail_is_not_downloaded(
    dovecot: Dovecot, user: str, tmp_path: Path
) -> None:
    huge = message(
        3,
        body="Big deck attached.\r\n" + "A" * 76 * 80_000,  # ~6 MB
        subject="Deck",
    )
    broken = (
        b"From: =?x-unknown?B?SGVsbG8=?= <kim@client.example>\r\n"
        b"To: sales@crmhub.test\r\nSubject: caf\xe9 \xff\r\n"
        b"Content-Type: multipart/mixed; boundary=nope\r\n\r\n--other\r\ngarbage"
    )
    no_id = message(4, message_id=None, subject="No id here")
    dovecot.append("INBOX", [message(1), broken, huge, no_id], user)
    imap = connector(imap_table(dovecot, user, folders=["INBOX"], body_bytes=2048), tmp_path)
    before = len(dovecot.log())
    pages = [p async for p in imap.pull("activities", None)]
    acts = {r.payload["subject"]: r for p in pages for r in p.records if r.kind == "activity"}
    assert set(acts) == {"Quote #1", "caf\ufffd \ufffd", "Deck", "No id here"}
    assert acts["caf\ufffd \ufffd"].payload["from"] == {
        "name": "Hello",
        "email": "kim@client.example",
    }
    assert acts["Deck"].payload["excerpt"].startswith("Big deck attached. AAAA")
    assert len(acts["Deck"].payload["excerpt"]) <= 500
    # The session sent far less than the 6 MB message: only header + 2 KB of body.
    session_out = log_lines(dovecot, r"Logged out in=\d+ out=(\d+)", since=before)
    assert session_out
    assert int(session_out[-1]) < 100_000
    derived = acts["No id here"].external_id
    assert derived.startswith("sha:")
    again = [p async for p in imap.pull("activities", None)]
    assert derived in {r.external_id for p in again for r in p.records}  # stable


async def test_colleagues_owner_and_automated_senders_are_not_contacts(
    dovecot: Dovecot, user: str, tmp_path: Path
) -> None:
    dovecot.append(
        "INBOX",
        [
            message(1, to=f"{user}, Col League <col@crmhub.test>, Ann <ann@customer.example>"),
            message(2, sender="Shop <no-reply@shop.example>"),
            message(3, sender="News <news@list.example>", extra="List-Unsubscribe: <mailto:u@x>"),
            message(4, sender="Bot <bot@x.example>", extra="Auto-Submitted: auto-replied"),
        ],
        user,
    )
    imap = connector(imap_table(dovecot, user, folders=["INBOX"]), tmp_path)
    pages = [p async for p in imap.pull("activities", None)]
    contacts = sorted(r.external_id for p in pages for r in p.records if r.kind == "contact")
    assert contacts == ["ann1@customer.example", "ann@customer.example"]
    assert sum(r.kind == "activity" for p in pages for r in p.records) == 4


async def test_same_message_in_two_mailboxes_is_one_timeline_entry(
    dovecot: Dovecot, tmp_path: Path, sqlite_url: str
) -> None:
    rep_a = dovecot.add_user(f"rep{next(_users)}@crmhub.test")
    rep_b = dovecot.add_user(f"rep{next(_users)}@crmhub.test")
    shared = message(1, to=f"{rep_a}, {rep_b}")
    dovecot.append("INBOX", [shared, message(2, sender="Zed <zed@other.example>")], rep_a)
    dovecot.append("INBOX", [shared], rep_b)
    engine = engine_for(
        tmp_path,
        sqlite_url,
        a=imap_table(dovecot, rep_a, folders=["INBOX"]),
        b=imap_table(dovecot, rep_b, folders=["INBOX"]),
    )
    await engine.run("a")
    await engine.run("b")
    with engine.db.connect() as conn:
        staged = conn.execute(
            select(func.count())
            .select_from(source_record)
            .where(
                source_record.c.kind == "activity",
                source_record.c.external_id == "msg-1@customer.example",
            )
        ).scalar_one()
        assert staged == 2  # each mailbox keeps its copy (lineage) ...
        golden = next(g for g in list_golden(conn) if "ann1@customer.example" in str(g))
        detail = golden_detail(conn, golden["id"])
    assert detail is not None
    assert [t["subject"] for t in detail["timeline"]] == ["Quote #1"]  # ... one entry shown
    engine.close()
    engine.db.dispose()
