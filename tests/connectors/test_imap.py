"""The IMAP connector against a real Dovecot: full, incremental, resync, faults, bad mail.

One private Dovecot serves the module (a second one, without CONDSTORE, serves one test);
every test gets its own user (its own maildir), seeds it over IMAP APPEND and syncs it through
the real pipeline into a throwaway store.
"""

from __future__ import annotations

import base64
import itertools
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, func, select

from connectors import ConnectorContext, get_connector_class
from crmhub.errors import AuthError, PermanentError, TransientError
from sync.queries import golden_detail, list_golden, search_golden
from sync.store import source_record, sync_run
from tests.conftest import service_missing
from tests.connectors.dovecot import (
    PASSWORD,
    USER,
    CuttingProxy,
    Dovecot,
    OAuthProvider,
    message,
)
from tests.connectors.mail import close, engine_for, make_connector, totals

_users = itertools.count(1)


@pytest.fixture(scope="module")
def idp() -> Iterator[OAuthProvider]:
    provider = OAuthProvider()
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def dovecot(idp: OAuthProvider) -> Iterator[Dovecot]:
    try:
        server = Dovecot(oauth2_introspection_url=idp.introspection_url).start()
    except (OSError, RuntimeError, FileNotFoundError) as exc:
        service_missing("Dovecot", exc)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dovecot_without_condstore() -> Iterator[Dovecot]:
    try:
        server = Dovecot(condstore=False).start()
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


def log_lines(dovecot: Dovecot, pattern: str, *, since: int = 0) -> list[str]:
    """Matches in Dovecot's log; its log process writes a moment after the event."""
    deadline = time.monotonic() + 3
    while not (found := re.findall(pattern, dovecot.log()[since:])) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def log_count(dovecot: Dovecot, pattern: str, *, since: int, expect: int) -> int:
    """How often `pattern` occurs in Dovecot's log since `since`. Its log process writes a
    moment late: wait up to 3 s for `expect`, then a little longer for a late extra line."""

    def count() -> int:
        return len(re.findall(pattern, dovecot.log()[since:]))

    deadline = time.monotonic() + 3
    while count() != expect and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return count()


def fetched_total(
    dovecot: Dovecot, user: str, *, since: int, expect: tuple[int, int]
) -> tuple[int, int]:
    """(headers, bodies) fetched by all of `user`'s sessions logged out since `since`; waits
    up to 3 s for `expect` (Dovecot logs a session a moment after it ends)."""

    def total() -> tuple[int, int]:
        counts = dovecot.fetch_counts(user, since=since, sessions=0)
        return sum(h for h, _ in counts), sum(b for _, b in counts)

    deadline = time.monotonic() + 3
    while total() != expect and time.monotonic() < deadline:
        time.sleep(0.05)
    return total()


def connector(table: dict[str, Any], tmp_path: Path) -> Any:
    return make_connector(table, tmp_path)


async def test_full_then_nothing_then_incremental(
    dovecot: Dovecot, user: str, tmp_path: Path, store_url: str
) -> None:
    jose = "=?utf-8?Q?Jos=C3=A9_Garc=C3=ADa?= <jose@buyer.example>"
    dovecot.append(
        "INBOX", (message(i, sender=jose) if i == 3 else message(i) for i in range(40)), user
    )
    sent = (
        message(i, sender=f"Rep <{user}>", to="Bo Client <bo{i}@client.example>")
        for i in range(100, 109)
    )
    cc = message(
        109,
        sender=f"Rep <{user}>",
        to="Kim Lee <kim@client.example>",
        extra="Cc: =?utf-8?Q?Zo=C3=AB_M=C3=BCller?= <zoe@partner.example>, col@crmhub.test",
    )
    dovecot.append("Sent", [*sent, cc], user)
    engine = engine_for(tmp_path, store_url, mail=imap_table(dovecot, user, page_size=15))
    first = await engine.run("mail")
    assert (first.counts.activities, first.counts.contacts) == (50, 51)
    assert first.counts.activities_linked == 50
    assert totals(engine.db)["activities"] == 50
    # Correspondents became contacts with their names split; each one's timeline (from, to
    # or cc) shows the message. The colleague on cc is not a contact.
    with engine.db.connect() as conn:
        for address, first_last, subject in [
            ("jose@buyer.example", ("José", "García"), "Quote #3"),
            ("kim@client.example", ("Kim", "Lee"), "Quote #109"),
            ("zoe@partner.example", ("Zoë", "Müller"), "Quote #109"),
        ]:
            [found] = search_golden(conn, address)
            detail = golden_detail(conn, found["id"])
            assert detail is not None
            assert (detail["fields"]["first_name"], detail["fields"]["last_name"]) == first_last
            assert [t["subject"] for t in detail["timeline"]] == [subject]
        assert search_golden(conn, "col@crmhub.test") == []

    second = await engine.run("mail")
    assert second.counts.pulled == 0  # CONDSTORE / UIDNEXT say nothing arrived: no FETCH

    dovecot.append("INBOX", (message(i) for i in range(200, 205)), user)
    third = await engine.run("mail")
    assert (third.counts.activities, third.counts.new) == (5, 10)  # 5 activities + 5 contacts
    assert totals(engine.db)["activities"] == 55
    close(engine)


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


async def test_condstore_flag_changes_cost_no_fetch(
    dovecot: Dovecot, user: str, tmp_path: Path
) -> None:
    start = len(dovecot.log())
    dovecot.append("INBOX", (message(i) for i in range(10)), user)
    imap = connector(imap_table(dovecot, user, folders=["INBOX"]), tmp_path)
    first = [p async for p in imap.pull("activities", None)][-1].next_cursor
    with dovecot.client(user) as other:  # a mail client reads and flags a message
        other.select_folder("INBOX")
        other.add_flags(other.search("ALL")[:3], [b"\\Seen", b"\\Flagged"])
    assert dovecot.fetch_counts(user, since=start, sessions=3)[1] == (10, 10)  # the first pull
    before = len(dovecot.log())
    pages = [p async for p in imap.pull("activities", first)]
    assert sum(len(p.records) for p in pages) == 0
    moved = pages[-1].next_cursor["folders"]["INBOX"]
    assert moved["uid"] == first["folders"]["INBOX"]["uid"]  # the UID checkpoint stays
    assert moved["modseq"] > first["folders"]["INBOX"]["modseq"]  # only the modseq moves
    again = [p async for p in imap.pull("activities", pages[-1].next_cursor)]
    assert again == []  # HIGHESTMODSEQ unchanged: the folder is skipped after its SELECT
    # Dovecot's own account of those two sessions: no header or body fetched.
    assert dovecot.fetch_counts(user, since=before, sessions=2) == [(0, 0), (0, 0)]


async def test_without_condstore_uidnext_alone_decides(
    dovecot_without_condstore: Dovecot, tmp_path: Path
) -> None:
    server = dovecot_without_condstore
    server.append("INBOX", (message(i) for i in range(10)), USER)
    imap = connector(imap_table(server, USER, folders=["INBOX"], page_size=4), tmp_path)
    pages = [p async for p in imap.pull("activities", None)]
    assert sum(r.kind == "activity" for p in pages for r in p.records) == 10
    cursor = pages[-1].next_cursor
    assert cursor["folders"]["INBOX"]["modseq"] is None  # the server has no HIGHESTMODSEQ
    with server.client(USER) as other:  # a mail client reads and flags a message
        other.select_folder("INBOX")
        other.add_flags(other.search("ALL")[:3], [b"\\Seen", b"\\Flagged"])
    before = len(server.log())
    assert [p async for p in imap.pull("activities", cursor)] == []  # UIDNEXT: nothing new
    server.append("INBOX", (message(i) for i in range(10, 13)), USER)
    again = [p async for p in imap.pull("activities", cursor)]
    assert sum(r.kind == "activity" for p in again for r in p.records) == 3

    # Dovecot's account of the sessions since: only the 3 new messages were fetched.
    assert fetched_total(server, USER, since=before, expect=(3, 3)) == (3, 3)


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
    close(engine)


async def test_connection_cut_mid_fetch_resumes_with_exact_counts(
    dovecot: Dovecot, user: str, tmp_path: Path, store_url: str
) -> None:
    dovecot.append("INBOX", (message(i, body="x" * 2000) for i in range(60)), user)
    proxy = CuttingProxy(dovecot.port, cut_after=60_000)  # a few 10-message pages in
    try:
        table = imap_table(dovecot, user, port=proxy.port, folders=["INBOX"], page_size=10)
        engine = engine_for(tmp_path, store_url, mail=table)
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
        close(engine)
    finally:
        proxy.close()


async def test_wrong_password_is_one_clear_auth_error(
    dovecot: Dovecot,
    user: str,
    tmp_path: Path,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    table = imap_table(dovecot, user, password="wrong-horse")
    engine = engine_for(tmp_path, sqlite_url, mail=table)
    before = len(dovecot.log())
    with pytest.raises(AuthError) as caught:
        await engine.run("mail")
    assert user in str(caught.value)
    assert "'password'" in str(caught.value)
    # One login attempt, not a retry storm; the failed run says what to fix.
    failed = rf"auth failed.*user=<{re.escape(user)}>"
    assert log_count(dovecot, failed, since=before, expect=1) == 1
    assert "'password'" in run_errors(engine.db)
    for text in (str(caught.value), run_errors(engine.db), caplog.text):
        assert "wrong-horse" not in text
    with pytest.raises(AuthError):
        await connector(table, tmp_path).check()
    close(engine)


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


def multipart(i: int, parts: list[tuple[str, str]], attachment_bytes: int = 0) -> bytes:
    """multipart/mixed: a multipart/alternative of `parts` ((subtype, text)), then a PDF."""
    head = message(i, subject="Proposal {i}", body="").split(b"MIME-Version")[0].decode()
    alternative = "".join(
        f"--alt\r\nContent-Type: text/{subtype}; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{text}\r\n"
        for subtype, text in parts
    )
    pdf = base64.encodebytes(b"%PDF-1.4 " + b"\x00" * attachment_bytes).decode()
    return (
        head + "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=mix\r\n\r\n"
        "--mix\r\nContent-Type: multipart/alternative; boundary=alt\r\n\r\n"
        f"{alternative}--alt--\r\n"
        "--mix\r\nContent-Type: application/pdf; name=deck.pdf\r\n"
        "Content-Disposition: attachment; filename=deck.pdf\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{pdf}\r\n--mix--\r\n"
    ).encode()


async def test_excerpt_is_the_first_text_part_and_attachments_stay_on_the_server(
    dovecot: Dovecot, user: str, tmp_path: Path
) -> None:
    html = (
        "<html><head><style>p {color:red}</style></head><body><p>Hi Sam,</p>"
        "<p>the pricing is &euro;1=2C200 per seat.</p><script>track()</script></body></html>"
    )
    dovecot.append(
        "INBOX",
        [
            multipart(
                1, [("plain", "Plain words first."), ("html", "<p>Rich words</p>")], 3_000_000
            ),
            multipart(2, [("html", html)], 3_000_000),
        ],
        user,
    )
    imap = connector(imap_table(dovecot, user, folders=["INBOX"]), tmp_path)
    before = len(dovecot.log())
    pages = [p async for p in imap.pull("activities", None)]
    excerpts = {
        r.payload["subject"]: r.payload["excerpt"]
        for p in pages
        for r in p.records
        if r.kind == "activity"
    }
    assert excerpts == {
        "Proposal 1": "Plain words first.",  # text/plain preferred over its HTML twin
        "Proposal 2": "Hi Sam, the pricing is €1,200 per seat.",  # HTML converted
    }
    # Two 4 MB attachments in the mailbox; the session sent a few KB.
    pull = rf"imap\({re.escape(user)}\).*Logged out in=\d+ out=(\d+) fetch_hdr_count=2\b"
    [session_out] = log_lines(dovecot, pull, since=before)
    assert int(session_out) < 50_000


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
    pull = rf"imap\({re.escape(user)}\).*Logged out in=\d+ out=(\d+) fetch_hdr_count=4\b"
    [session_out] = log_lines(dovecot, pull, since=before)
    assert int(session_out) < 100_000
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
    close(engine)


# -- XOAUTH2 against Dovecot's oauth2 passdb and the loopback identity provider ----------------


def xoauth2_table(
    dovecot: Dovecot, idp: OAuthProvider, user: str, refresh_token: str, **extra: Any
) -> dict[str, Any]:
    table = imap_table(dovecot, user, folders=["INBOX"], **extra)
    del table["password"]
    return {
        **table,
        "refresh_token": refresh_token,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "token_url": idp.token_url,
    }


def assert_no_secrets(idp: OAuthProvider, refresh_token: str, *texts: str) -> None:
    """No access token, refresh token or client secret, raw or as the XOAUTH2 SASL string."""
    secrets = [*idp.issued, refresh_token, idp.client_secret]
    for user, token in idp.issued_to():
        sasl = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
        secrets.append(base64.b64encode(sasl).decode())
    for text in texts:
        for secret in secrets:
            assert secret not in text


def assert_xoauth2_logins(dovecot: Dovecot, user: str, *, since: int, ok: int, failed: int) -> None:
    """Dovecot's log since `since` shows exactly `ok` successful and `failed` refused XOAUTH2
    logins of `user`."""
    who = re.escape(user)
    seen = (
        log_count(dovecot, rf"Login: user=<{who}>, method=XOAUTH2", since=since, expect=ok),
        log_count(
            dovecot,
            rf"auth failed, \d+ attempts.*user=<{who}>, method=XOAUTH2",
            since=since,
            expect=failed,
        ),
    )
    assert seen == (ok, failed), f"(ok, failed) XOAUTH2 logins: {seen}"


def run_errors(db: Engine) -> str:
    with db.connect() as conn:
        return " ".join(str(e) for e in conn.execute(select(sync_run.c.error)).scalars())


async def test_xoauth2_token_logs_in_syncs_and_is_reused(
    dovecot: Dovecot,
    idp: OAuthProvider,
    user: str,
    tmp_path: Path,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    refresh = idp.grant(user)
    dovecot.append("INBOX", (message(i) for i in range(30)), user)
    engine = engine_for(tmp_path, sqlite_url, mail=xoauth2_table(dovecot, idp, user, refresh))
    before, requests = len(dovecot.log()), idp.token_requests
    first = await engine.run("mail")
    assert first.counts.activities == 30
    assert idp.token_requests == requests + 1
    dovecot.append("INBOX", (message(i) for i in range(30, 35)), user)
    second = await engine.run("mail")
    assert second.counts.activities == 5
    # The access token is still valid: the second run logs in with it, no new token request.
    assert idp.token_requests == requests + 1
    assert_xoauth2_logins(dovecot, user, since=before, ok=2, failed=0)
    assert_no_secrets(idp, refresh, caplog.text, dovecot.log()[before:])
    close(engine)


async def test_xoauth2_expired_token_is_refreshed_and_the_sync_goes_on(
    dovecot: Dovecot,
    idp: OAuthProvider,
    user: str,
    tmp_path: Path,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    refresh = idp.grant(user)
    dovecot.append("INBOX", (message(i) for i in range(20)), user)
    engine = engine_for(tmp_path, sqlite_url, mail=xoauth2_table(dovecot, idp, user, refresh))
    assert (await engine.run("mail")).counts.activities == 20
    requests = idp.token_requests
    # The provider ends the token early (the client still thinks it has an hour left) ...
    idp.expire(user)
    dovecot.append("INBOX", (message(i) for i in range(20, 120)), user)
    before = len(dovecot.log())
    second = await engine.run("mail")
    # ... the refused login costs one refresh, then the sync picks up exactly the 100 new.
    assert second.counts.activities == 100
    assert idp.token_requests == requests + 1
    assert_xoauth2_logins(dovecot, user, since=before, ok=1, failed=1)
    assert totals(engine.db)["activities"] == 120
    assert "refreshing it once" in caplog.text
    assert_no_secrets(idp, refresh, caplog.text, dovecot.log()[before:])
    close(engine)


async def test_xoauth2_token_near_expiry_is_renewed_before_login(
    dovecot: Dovecot, idp: OAuthProvider, user: str, tmp_path: Path
) -> None:
    refresh = idp.grant(user, lifetime=30)  # expires_in below the client's 60 s margin
    dovecot.append("INBOX", [message(1)], user)
    table = xoauth2_table(dovecot, idp, user, refresh)
    before, requests = len(dovecot.log()), idp.token_requests
    assert "INBOX: 1" in await connector(table, tmp_path).check()
    assert "INBOX: 1" in await connector(table, tmp_path).check()
    assert idp.token_requests == requests + 2  # renewed up front each time ...
    assert_xoauth2_logins(dovecot, user, since=before, ok=2, failed=0)  # ... so never refused


async def test_xoauth2_revoked_refresh_token_is_one_clear_error(
    dovecot: Dovecot,
    idp: OAuthProvider,
    user: str,
    tmp_path: Path,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    refresh = idp.grant(user)
    dovecot.append("INBOX", (message(i) for i in range(5)), user)
    engine = engine_for(tmp_path, sqlite_url, mail=xoauth2_table(dovecot, idp, user, refresh))
    await engine.run("mail")
    idp.revoke(refresh)  # the user removed the app's access: its access token dies too
    requests, before = idp.token_requests, len(dovecot.log())
    with pytest.raises(AuthError) as caught:
        await engine.run("mail")
    message_text = str(caught.value)
    assert "refused the refresh token (invalid_grant)" in message_text
    assert "'refresh_token'" in message_text
    assert "'mail'" in message_text
    # One refused login with the cached token, one refresh attempt, then stop: no storm.
    assert idp.token_requests == requests + 1
    assert_xoauth2_logins(dovecot, user, since=before, ok=0, failed=1)
    # A worker retrying later (a new process: nothing cached) asks once and never logs in.
    fresh = xoauth2_table(dovecot, idp, user, refresh, client_id=idp.client_id)
    imap = get_connector_class("imap")
    other = imap(imap.Config(**fresh), ConnectorContext("mail-2", tmp_path))
    with pytest.raises(AuthError, match="invalid_grant"):
        [p async for p in other.pull("activities", None)]
    assert idp.token_requests == requests + 2
    assert_xoauth2_logins(dovecot, user, since=before, ok=0, failed=1)
    out = capsys.readouterr()
    assert_no_secrets(
        idp, refresh, caplog.text, message_text, run_errors(engine.db), out.out + out.err
    )
    close(engine)


async def test_xoauth2_fresh_token_refused_is_not_retried(
    dovecot: Dovecot, idp: OAuthProvider, user: str, tmp_path: Path
) -> None:
    other_user = dovecot.add_user(f"rep{next(_users)}@crmhub.test")
    refresh = idp.grant(other_user)  # a token for someone else's mailbox
    table = xoauth2_table(dovecot, idp, user, refresh)
    requests, before = idp.token_requests, len(dovecot.log())
    with pytest.raises(AuthError) as caught:
        await connector(table, tmp_path).check()
    assert user in str(caught.value)
    assert "scope" in str(caught.value)
    assert idp.token_requests == requests + 1
    assert_xoauth2_logins(dovecot, user, since=before, ok=0, failed=1)
    assert_no_secrets(idp, refresh, str(caught.value))


async def test_xoauth2_token_check_unavailable_is_transient(
    dovecot: Dovecot, idp: OAuthProvider, user: str, tmp_path: Path
) -> None:
    refresh = idp.grant(user)
    table = xoauth2_table(dovecot, idp, user, refresh)
    idp.introspection_down = True
    try:
        with pytest.raises(TransientError, match="could not check the login") as caught:
            await connector(table, tmp_path).check()
    finally:
        idp.introspection_down = False
    assert_no_secrets(idp, refresh, str(caught.value))
    assert "INBOX: 0" in await connector(table, tmp_path).check()  # a later try works


def test_xoauth2_config_names_what_is_missing() -> None:
    cls = get_connector_class("imap")
    base = {"type": "imap", "host": "imap.example.com", "username": "ann@ourco.com"}
    with pytest.raises(ValidationError, match="exactly one of password"):
        cls.Config(**base)
    with pytest.raises(ValidationError, match="exactly one of password"):
        cls.Config(**base, password="x", refresh_token="y", client_id="c", token_url="u")
    with pytest.raises(ValidationError, match="also needs client_id and token_url"):
        cls.Config(**base, refresh_token="y")
    canary = "rt_canary_8f2e"
    config = cls.Config(**base, refresh_token=canary, client_id="c", token_url="https://t/token")
    assert config.xoauth2
    assert canary not in repr(config)


# -- the "Done means", at full size ---------------------------------------------------

CUSTOMERS = 1_000  # distinct correspondents: a sales mailbox writes to the same people again


def customer(i: int) -> str:
    n = i % CUSTOMERS
    return f"Cus{n} Tomer{n} <c{n}@customer{n % 97}.example>"


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_twenty_thousand_messages_sync_resume_noop_and_incremental(
    dovecot: Dovecot, user: str, tmp_path: Path, sqlite_url: str
) -> None:
    """About 30 s on the shared 2-core machine (seeding over MULTIAPPEND ~3 s, the rest the
    sync through the pipeline). SQLite only: the same cut-and-resume runs on PostgreSQL too,
    at 60 messages (test_connection_cut_mid_fetch_resumes_with_exact_counts)."""
    started = time.perf_counter()
    inbox = (message(i, sender=customer(i), to=f"Rep <{user}>") for i in range(10_000))
    sent = (message(i, sender=f"Rep <{user}>", to=customer(i)) for i in range(10_000, 20_000))
    assert dovecot.append("INBOX", inbox, user) + dovecot.append("Sent", sent, user) == 20_000
    seeded = time.perf_counter()
    # The first sync's connection dies ~3 MB in (a few 500-message pages into INBOX).
    proxy = CuttingProxy(dovecot.port, cut_after=3_000_000)
    try:
        table = imap_table(dovecot, user, port=proxy.port)
        engine = engine_for(tmp_path, sqlite_url, mail=table)
        with pytest.raises(TransientError, match="IMAP connection"):
            await engine.run("mail")
        assert proxy.cuts == 1
        committed = totals(engine.db)["activities"]
        assert 0 < committed < 10_000
        assert committed % 500 == 0  # whole pages only

        resumed = await engine.run("mail")
        assert resumed.counts.activities == 20_000 - committed  # nothing read twice ...
        assert totals(engine.db)["activities"] == 20_000  # ... and nothing lost
        synced = time.perf_counter()

        # Dovecot logs the resumed session a moment after it ends: wait for it, then mark.
        resumed_session = rf"imap\({re.escape(user)}\).*fetch_hdr_count={20_000 - committed}\b"
        assert log_lines(dovecot, resumed_session)
        before = len(dovecot.log())
        second = await engine.run("mail")
        assert second.counts.pulled == 0
        assert dovecot.fetch_counts(user, since=before) == [(0, 0)]  # not one FETCH

        dovecot.append(
            "INBOX", (message(i, sender=customer(i)) for i in range(20_000, 20_100)), user
        )
        third = await engine.run("mail")
        assert third.counts.activities == 100
        totals_now = totals(engine.db)
        assert totals_now["activities"] == 20_100
        assert totals_now["contacts"] == CUSTOMERS
        close(engine)
    finally:
        proxy.close()
    print(
        f"\n20,000 messages: seeded in {seeded - started:.1f}s; sync cut after {committed:,} "
        f"and resumed in {synced - seeded:.1f}s; no-op + 100 new in "
        f"{time.perf_counter() - synced:.1f}s"
    )
