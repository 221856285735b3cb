"""The steward UI over HTTP: sign-in, sessions, CSRF, roles, escaping, the decision flow."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select

from sync.store import audit_log, review_item, web_session
from tests.web.conftest import PASSWORD, Workspace

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def sign_in(client, name: str) -> str:
    response = await client.post(
        "/login", data={"name": name, "password": PASSWORD, "next": "/queue"}
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/queue"
    page = await client.get("/queue")
    assert page.status_code == 200
    return CSRF.search(page.text).group(1)


async def test_every_page_needs_a_session(workspace):
    async with workspace.client() as anon:
        for path in ("/", "/queue", "/review/1", "/golden/1", "/search?q=x", "/audit"):
            response = await anon.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/login?next=")
        fragment = await anon.get("/queue", headers={"HX-Request": "true"})
        assert fragment.status_code == 401
        assert fragment.headers["hx-redirect"] == "/login"
        assert (await anon.post("/review/1/approve")).status_code == 303
        assert (await anon.get("/login")).status_code == 200
        assert (await anon.get("/static/htmx.min.js")).status_code == 200
        assert (await anon.get("/static/../app.py")).status_code == 404


async def test_sign_in_sets_a_hardened_cookie_and_throttles_guessing(workspace, db):
    async with workspace.client() as client:
        wrong = await client.post("/login", data={"name": "steward", "password": "nope"})
        assert wrong.status_code == 401
        assert "Wrong name or password" in wrong.text
        ok = await client.post("/login", data={"name": "steward", "password": PASSWORD})
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        value = client.cookies["crmhub_session"]
        with db.connect() as conn:
            assert value not in set(conn.execute(select(web_session.c.id_hash)).scalars())
        page = await client.get("/queue")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        csrf = CSRF.search(page.text).group(1)
        assert (await client.post("/logout", data={"csrf_token": csrf})).status_code == 303
        assert (await client.get("/queue")).status_code == 303  # the cookie is gone
    async with workspace.client() as replay:  # and the server forgot the session too
        replay.cookies.set("crmhub_session", value)
        assert (await replay.get("/queue")).status_code == 303
    async with workspace.client() as attacker:
        for _ in range(5):
            response = await attacker.post("/login", data={"name": "admin", "password": "guess"})
            assert response.status_code == 401
        blocked = await attacker.post("/login", data={"name": "admin", "password": PASSWORD})
        assert blocked.status_code == 429
    async with workspace.client() as client:
        evil = await client.post(
            "/login",
            data={"name": "viewer", "password": PASSWORD, "next": "//evil.example/x"},
        )
        assert evil.headers["location"] == "/queue"
        tab = await client.post(
            "/login", data={"name": "viewer", "password": PASSWORD, "next": "/\t/evil.example"}
        )
        assert tab.headers["location"] == "/queue"


async def test_decisions_need_the_role_and_the_csrf_token(workspace, db):
    async with workspace.client() as viewer:
        csrf = await sign_in(viewer, "viewer")
        forbidden = await viewer.post("/review/1/approve", data={"csrf_token": csrf})
        assert forbidden.status_code == 403
    async with workspace.client() as steward:
        csrf = await sign_in(steward, "steward")
        assert (await steward.post("/review/1/approve")).status_code == 403
        wrong = await steward.post("/review/1/approve", data={"csrf_token": "x" * 43})
        assert wrong.status_code == 403
        with db.connect() as conn:
            assert conn.execute(select(audit_log)).first() is None
        done = await steward.post("/review/1/reject", data={"csrf_token": csrf})
        assert done.status_code == 303
        assert done.headers["location"].startswith("/queue/next")
        header = await steward.post("/undo", headers={"X-CSRF-Token": csrf})
        assert header.status_code == 303
        with db.connect() as conn:
            actions = conn.execute(select(audit_log.c.action)).scalars().all()
        assert actions == ["review.reject", "undo"]


async def test_queue_compare_merge_and_golden_pages(workspace, db):
    async with workspace.client() as client:
        csrf = await sign_in(client, "steward")
        queue = await client.get("/queue")
        assert queue.text.count('class="open-review"') == 3
        fragment = await client.get(
            "/queue", params={"min_score": "0.99"}, headers={"HX-Request": "1"}
        )
        assert fragment.text.lstrip().startswith('<div id="queue">')
        assert "0 pairs" in fragment.text
        newest = await client.get("/queue", params={"sort": "newest", "max_age_days": "1"})
        shown = [int(i) for i in re.findall(r'href="/review/(\d+)"', newest.text)]
        assert len(shown) == 3
        assert shown == sorted(shown, reverse=True)
        assert '<option value="newest" selected>' in newest.text
        old = await client.get("/queue", params={"min_age_days": "1", "sort": "bogus"})
        assert "0 pairs" in old.text  # nothing has waited a day; an unknown sort is ignored
        first = (await client.get("/queue/next")).headers["location"]
        compare = await client.get(first)
        assert compare.status_code == 200
        assert '<tr class="differs" data-field="first_name">' in compare.text
        assert '<tr class="same" data-field="last_name">' in compare.text
        assert "nickname" in compare.text  # the matcher's evidence for the first name
        seen = re.search(r'name="seen" value="([^"]+)"', compare.text).group(1)
        choice = re.search(r'name="keep_first_name" value="(\d+)"> Anna<', compare.text)
        stale = await client.post(f"{first}/approve", data={"csrf_token": csrf, "seen": "0" * 16})
        assert stale.status_code == 409  # the page shows the pair afresh, with the reason
        assert "changed since it was shown" in stale.text
        assert f'name="seen" value="{seen}"' in stale.text
        merged = await client.post(
            f"{first}/approve",
            data={"csrf_token": csrf, "seen": seen, "keep_first_name": choice.group(1)},
        )
        assert merged.status_code == 303
        again = await client.post(f"{first}/approve", data={"csrf_token": csrf, "seen": seen})
        assert again.status_code == 409
        assert "already" in again.text
        golden_link = re.search(r'href="/golden/(\d+)"', again.text).group(1)
        golden = await client.get(f"/golden/{golden_link}")
        assert golden.status_code == 200
        assert golden.text.count("Split off") == 2
        assert re.search(r"<td[^>]*>Anna</td>", golden.text)  # the pick; B is newer
        history = golden.text[golden.text.index("<h2>History</h2>") :]
        assert re.search(r"merged <a [^>]*>#\d+</a> into <a [^>]*>#\d+</a>", history)
        assert "kept first_name" in history
        audit = await client.get("/audit")
        assert "review.approve" in audit.text
        assert "kept first_name" in audit.text


async def test_search_escapes_html_and_survives_sql_metacharacters(workspace):
    async with workspace.client() as client:
        await sign_in(client, "viewer")
        html = await client.get("/search", params={"q": "<script>alert(1)</script>"})
        assert html.status_code == 200
        assert "<script>alert(1)</script>" not in html.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html.text
        sql = await client.get("/search", params={"q": "' OR 1=1; DROP TABLE golden_record; --"})
        assert sql.status_code == 200
        assert "0 golden records" in sql.text
        found = await client.get("/search", params={"q": "Keller"})
        assert "Anna Keller" in found.text or "Ann Keller" in found.text
        long = await client.get("/search", params={"q": "x" * 5000})
        assert long.status_code == 200


async def test_hostile_and_huge_values_render_escaped(workspace, db):
    from sqlalchemy import update

    from sync.store import source_record

    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    async with workspace.client() as client:
        await sign_in(client, "viewer")
        first = (await client.get("/queue/next")).headers["location"]
        review_id = int(first.rsplit("/", 1)[1])
        with db.begin() as conn:
            record_a = conn.execute(
                select(review_item.c.record_a).where(review_item.c.id == review_id)
            ).scalar_one()
            data = conn.execute(
                select(source_record.c.data).where(source_record.c.id == record_a)
            ).scalar_one()
            conn.execute(
                update(source_record)
                .where(source_record.c.id == record_a)
                .values(data={**data, "full_name": hostile, "company": "C" * 20000})
            )
        for url in ("/queue", first):
            page = await client.get(url)
            assert page.status_code == 200
            assert "<script>alert" not in page.text
            assert "<img src=x" not in page.text
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text
        assert "C" * 20000 in page.text  # shown whole; the CSS wraps it


async def test_bucket_pages_preview_and_confirm(workspace, db):
    async with workspace.client() as client:
        csrf = await sign_in(client, "steward")
        listing = await client.get("/buckets")
        assert 'href="/buckets/same-name-company"' in listing.text
        preview = await client.get("/buckets/same-name-company")
        assert preview.text.count('class="open-review"') == 3
        assert 'name="expected_count" value="3"' in preview.text
        url = "/buckets/same-name-company/approve"
        unconfirmed = await client.post(url, data={"csrf_token": csrf, "expected_count": "3"})
        assert unconfirmed.headers["location"] == "/buckets/same-name-company"
        done = await client.post(
            url, data={"csrf_token": csrf, "expected_count": "3", "confirm": "yes"}
        )
        assert done.status_code == 303
        after = await client.get(done.headers["location"])
        assert "3 pairs approved" in after.text
        with db.connect() as conn:
            assert len(conn.execute(select(audit_log)).all()) == 3


async def test_sources_page_shows_quality_runs_and_dead_letters(workspace, db):
    from datetime import UTC, datetime

    from sync import review
    from sync.store import dead_letter

    with db.begin() as conn:
        conn.execute(
            dead_letter.insert().values(
                source="crm",
                scope="record",
                origin="crm.csv:9",
                reason="email <b>missing</b>",
                created_at=datetime.now(UTC),
            )
        )
    with db.connect() as conn:
        first = review.list_reviews(conn)[0][0]["id"]
    review.approve(db, first, "steward")
    async with workspace.client() as client:
        await sign_in(client, "viewer")
        page = await client.get("/sources")
        assert page.status_code == 200
        row = re.search(r"<tr>\s*<td class=\"title\">crm</td>(.*?)</tr>", page.text, re.S).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        assert cells[0] == "6"  # contacts
        assert cells[1] == "33%"  # 2 of 6 now share a golden record
        assert cells[2] == "100%"  # first name
        assert cells[8] == "50%"  # city
        assert 'href="/errors?source=crm">1</a>' in page.text
        assert "succeeded" in page.text  # the seeding run
        errors = await client.get("/errors", params={"source": "crm"})
        assert "crm.csv:9" in errors.text
        assert "email &lt;b&gt;missing&lt;/b&gt;" in errors.text


async def test_golden_page_shows_which_tools_were_told_what(workspace, db):
    from datetime import UTC, datetime

    from sync.store import golden_record, writeback_ledger

    with db.begin() as conn:
        golden_id = conn.execute(select(golden_record.c.id).limit(1)).scalar_one()
        conn.execute(
            writeback_ledger.insert().values(
                connector="newsletter",
                golden_id=golden_id,
                field="consent",
                value_hash="0" * 64,
                pushed_at=datetime(2026, 11, 24, 9, 30, tzinfo=UTC),
            )
        )
    async with workspace.client() as client:
        await sign_in(client, "viewer")
        page = await client.get(f"/golden/{golden_id}")
    assert page.status_code == 200
    assert "Connected tools told" in page.text
    cells = re.sub(r"<td [^>]*>", "<td>", page.text)  # without the phone layout's labels
    assert "<td>newsletter</td><td>consent</td><td>sent</td><td>2026-11-24 09:30</td>" in cells


async def test_a_session_id_is_never_reused_across_sign_ins(workspace, db):
    async with workspace.client() as client:
        # Session fixation: a value planted before sign-in is not adopted.
        planted = await client.post(
            "/login",
            data={"name": "steward", "password": PASSWORD},
            headers={"Cookie": "crmhub_session=planted-by-someone-else"},
        )
        assert planted.status_code == 303
        first = client.cookies["crmhub_session"]
        assert first != "planted-by-someone-else"
        # Signing in again issues a new id and ends the one the browser held.
        await sign_in(client, "steward")
        second = client.cookies["crmhub_session"]
        assert second != first
    async with workspace.client() as old:
        old.cookies.set("crmhub_session", first)
        assert (await old.get("/queue")).status_code == 303
    with db.connect() as conn:
        assert len(conn.execute(select(web_session)).all()) == 1


async def test_over_https_the_cookie_is_secure_and_host_prefixed(workspace):
    transport = httpx.ASGITransport(app=workspace.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://crmhub") as client:
        ok = await client.post("/login", data={"name": "viewer", "password": PASSWORD})
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith("__Host-crmhub_session=")
        assert "; Secure" in cookie
        assert "; Path=/" in cookie
        assert "Domain" not in cookie
        assert (await client.get("/queue")).status_code == 200
        # The unprefixed name does not count over HTTPS (a subdomain could have set it).
        value = client.cookies["__Host-crmhub_session"]
        client.cookies.clear()
        client.cookies.set("crmhub_session", value)
        assert (await client.get("/queue")).status_code == 303


async def test_state_changes_from_another_site_are_refused(workspace, db):
    evil = {"Origin": "https://evil.example"}
    async with workspace.client() as client:
        csrf = await sign_in(client, "steward")
        first = (await client.get("/queue/next")).headers["location"]
        refused = await client.post(f"{first}/reject", data={"csrf_token": csrf}, headers=evil)
        assert refused.status_code == 403
        assert "cross-site" in refused.text
        null = await client.post("/undo", data={"csrf_token": csrf}, headers={"Origin": "null"})
        assert null.status_code == 403
        with db.connect() as conn:
            assert conn.execute(select(audit_log)).first() is None
        own = await client.post(
            f"{first}/reject", data={"csrf_token": csrf}, headers={"Origin": "http://crmhub"}
        )
        assert own.status_code == 303
        proxied = await client.post(
            "/undo",
            data={"csrf_token": csrf},
            headers={"Origin": "https://crm.example.com", "X-Forwarded-Host": "crm.example.com"},
        )
        assert proxied.status_code == 303
    async with workspace.client() as client:  # login CSRF: no sign-in from a foreign form
        forged = await client.post(
            "/login", data={"name": "steward", "password": PASSWORD}, headers=evil
        )
        assert forged.status_code == 403
        assert "crmhub_session" not in client.cookies


async def test_sign_in_throttling_is_shared_by_every_web_process(workspace, db):
    """Two app instances on one store stand for two `crmhub serve` processes: failures on
    either count against the same limit, so more processes do not buy more guesses."""
    from crmhub.web import create_app
    from sync.store import login_failure

    other = Workspace(create_app(workspace.app.state.settings, db), workspace.tokens)
    async with workspace.client() as one, other.client() as two:
        for client in (one, two, one, two, one):
            wrong = await client.post("/login", data={"name": "admin", "password": "guess"})
            assert wrong.status_code == 401
        for client in (one, two):
            blocked = await client.post("/login", data={"name": "admin", "password": PASSWORD})
            assert blocked.status_code == 429
        # Another name from the same address still gets in (4x the per-name limit).
        assert (
            await two.post("/login", data={"name": "viewer", "password": PASSWORD})
        ).status_code == 303
    with db.connect() as conn:
        stored = conn.execute(select(login_failure.c.key_hash)).scalars().all()
    assert len(stored) == 10  # five failures, each for the name and the address
    assert all(len(h) == 64 and "admin" not in h for h in stored)

    # Failures older than the window no longer count, and the next failure deletes them.
    with db.begin() as conn:
        conn.execute(login_failure.update().values(at=datetime.now(UTC) - timedelta(hours=1)))
    async with other.client() as client:
        assert (
            await client.post("/login", data={"name": "admin", "password": "x"})
        ).status_code == 401
        assert (
            await client.post("/login", data={"name": "admin", "password": PASSWORD})
        ).status_code == 303
    with db.connect() as conn:
        remaining = len(conn.execute(select(login_failure)).all())
    assert remaining == 1  # the address's new failure; the name's went with the sign-in


async def test_role_matrix_of_the_pages(workspace, db):
    """Every state-changing page route refuses a role below the one it needs (403), with a
    valid CSRF token, and changes nothing; the admin page is hidden from stewards."""
    needs_steward = [
        ("/review/1/approve", {}),
        ("/review/1/reject", {}),
        ("/review/1/skip", {}),
        ("/golden/1/unmerge", {"record_id": "1"}),
        ("/undo", {}),
        ("/buckets/same-name-company/approve", {"expected_count": "3", "confirm": "yes"}),
    ]
    needs_admin = [("/admin/forget", {"identifier": "anna@keller.example", "confirm": "yes"})]
    async with workspace.client() as viewer, workspace.client() as steward:
        viewer_csrf = await sign_in(viewer, "viewer")
        steward_csrf = await sign_in(steward, "steward")
        for url, data in needs_steward + needs_admin:
            response = await viewer.post(url, data={"csrf_token": viewer_csrf, **data})
            assert response.status_code == 403, url
        for url, data in needs_admin:
            response = await steward.post(url, data={"csrf_token": steward_csrf, **data})
            assert response.status_code == 403, url
        assert (await steward.get("/admin/forget")).status_code == 403
        assert 'href="/admin/forget"' not in (await steward.get("/queue")).text
    with db.connect() as conn:
        assert conn.execute(select(audit_log)).first() is None
