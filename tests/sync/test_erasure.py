"""Erasure: a person disappears everywhere; only keyed hashes remain to recognise them."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from crmhub.records import Contact
from sync import review
from sync.erasure import forget, is_suppressed
from sync.queries import search_golden
from sync.store import (
    audit_log,
    contact_form,
    golden_record,
    review_item,
    source_record,
    suppression,
)
from tests.steward_data import seed_reviews


def _count(conn, table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


async def test_forget_erases_the_person_and_keeps_only_hashes(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=2)
    with db.connect() as conn:
        items, _ = review.list_reviews(conn)
    keller = next(i for i in items if "keller" in (i["a"]["email"] or ""))
    review.approve(db, keller["id"], "sam")
    with db.connect() as conn:
        before = (_count(conn, source_record), _count(conn, golden_record))

    result = forget(db, "ANNA@keller.example", "admin")
    assert result["source_records"] == 2
    assert result["golden_records"] == 2  # the survivor and the alias it absorbed
    assert result["suppressed"] == 4  # two emails and two source identities
    with db.connect() as conn:
        assert (_count(conn, source_record), _count(conn, golden_record)) == (
            before[0] - 2,
            before[1] - 2,
        )
        assert search_golden(conn, "Keller") == []
        forms = conn.execute(select(contact_form.c.form)).scalars().all()
        assert forms  # the other family's prepared forms (they hold names and emails too)
        assert not any("keller" in form for form in forms)
        assert _count(conn, review_item) == 1  # the other family's pair stays
        assert _count(conn, suppression) == 4
        hashes = conn.execute(select(suppression.c.hash)).scalars().all()
        assert not any("keller" in h for h in hashes)
        entry = conn.execute(
            select(audit_log.c.details).where(audit_log.c.action == "privacy.forget")
        ).scalar_one()
        assert "keller" not in str(entry).lower()
        back = Contact.model_validate({"first_name": "A", "emails": ["a.keller@web.example"]})
        assert is_suppressed(conn, "elsewhere", "X-1", back)
        same_row = Contact.model_validate({"first_name": "A", "emails": ["new@example.org"]})
        assert is_suppressed(conn, "crm", "0-a", same_row)
        other = Contact.model_validate({"first_name": "A", "emails": ["anna@fischer.example"]})
        assert not is_suppressed(conn, "crm", "1-a", other)

    with pytest.raises(review.NotFoundError, match="no person found"):
        forget(db, "anna@keller.example", "admin")  # already gone
    with pytest.raises(review.NotFoundError):
        forget(db, "12", "admin")


async def test_forget_by_phone_needs_the_full_number(tmp_path, db, store_url):
    from sync.engine import SyncEngine
    from tests.conftest import make_settings

    (tmp_path / "p.csv").write_text(
        "id,first_name,last_name,phone,country\n1,Lena,Vogt,+49 30 1234567,DE\n"
        "2,Omar,Haddad,+1 415 555 0132,US\n",
        encoding="utf-8",
    )
    settings = make_settings(
        tmp_path, store_url, {"p": {"type": "csv", "path": str(tmp_path / "p.csv")}}
    )
    engine = SyncEngine(settings, db)
    try:
        await engine.run("p")
    finally:
        engine.close()
    with pytest.raises(review.NotFoundError):
        forget(db, "1234567", "admin")  # a suffix is not an identity
    assert forget(db, "+49 30 1234567", "admin")["source_records"] == 1
    with db.connect() as conn:
        names = [g["name"] for g in search_golden(conn, "a")]
    assert "Omar Haddad" in names
    assert "Lena Vogt" not in names


async def test_an_erased_person_is_not_brought_back_by_later_syncs(tmp_path, db, store_url):
    from sync.engine import SyncEngine
    from sync.erasure import forget
    from sync.queries import search_golden
    from tests.conftest import make_settings

    path = tmp_path / "crm.csv"
    path.write_text(
        "id,first_name,last_name,email\n1,Erin,Gone,erin@example.com\n"
        "2,Kept,Here,kept@example.com\n",
        encoding="utf-8",
    )
    settings = make_settings(tmp_path, store_url, {"crm": {"type": "csv", "path": str(path)}})
    engine = SyncEngine(settings, db)
    await engine.run("crm")
    forget(db, "erin@example.com", "admin")
    again = await engine.run("crm", full=True)
    assert again.counts.suppressed == 1
    with db.connect() as conn:
        assert search_golden(conn, "erin@example.com") == []
        assert len(search_golden(conn, "kept@example.com")) == 1
