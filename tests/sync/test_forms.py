"""Contacts' prepared forms stored with their match_key rows (sync/forms.py): what pages and
batches write, and how matching one contact reads them back, and when it must not."""

from __future__ import annotations

import csv
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine, Text, cast, select, update

import sync.golden
from crmhub.records import Contact
from dedupe.normalize import Prepared, prepare
from sync import forms
from sync.engine import SyncEngine
from sync.forms import FORM_VERSION, data_digest, form_from_json, form_json
from sync.rebuild_apply import rebuild
from sync.store import contact_form, membership, source_record, write_transaction
from tests.conftest import make_settings

CONTACTS = [
    Contact(first_name="Bob", last_name="Smith", emails=["Bob.Smith+crm@gmail.com"]),
    Contact(
        full_name="Robert Smith",
        company="Acme Inc.",
        phones=["+15550101234", "+15550109999"],
        emails=["rsmith@acme.com", "info@acme.com"],
        city="Springfield",
    ),
    Contact(first_name="Zoë", last_name="Ångström-Łukasz 🎉", company="Société Générale S.A."),
    Contact(first_name="R.", last_name="Duggn", emails=["rogerduggan@example.org"]),
    Contact(),
]


@pytest.mark.parametrize("contact", CONTACTS, ids=range(len(CONTACTS)))
def test_a_form_reads_back_as_the_contact_prepared(contact: Contact) -> None:
    prepared = prepare(contact)
    assert form_from_json(form_json(prepared)) == prepared


def test_a_change_to_normalisation_comes_with_a_new_form_version() -> None:
    """Stored forms are trusted for the data they were made from, by the code that made them:
    when `dedupe/normalize.py` changes, decide whether `prepare` now gives other output, and if
    it does, bump FORM_VERSION (stored forms are then prepared afresh); then record the file's
    new digest here."""
    source = (Path(__file__).parents[2] / "dedupe" / "normalize.py").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    assert (FORM_VERSION, digest) == (1, "65314746670718dd"), "see this test's docstring"


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    columns = ["id", "first_name", "last_name", "email", "phone", "company"]
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)


def _forms_match_data(db: Engine, stored_only: bool = False) -> int:
    """Checks every live contact (`stored_only`: with a form) has a form made from the data it
    holds; returns how many."""
    with db.connect() as conn:
        rows = conn.execute(
            select(
                source_record.c.id,
                cast(source_record.c.data, Text),
                contact_form.c.digest,
                contact_form.c.form,
            )
            .join(
                contact_form,
                contact_form.c.record_id == source_record.c.id,
                isouter=not stored_only,
            )
            .where(source_record.c.kind == "contact", source_record.c.deleted == 0)
        ).all()
    for rid, text, digest, form in rows:
        assert digest == data_digest(text), f"record {rid}"
        assert form_from_json(form) == prepare(Contact.model_validate_json(text)), f"record {rid}"
    return len(rows)


async def test_pages_and_batches_store_each_contacts_form(tmp_path, db, store_url):
    """A page's match writes its contacts' forms (changed ones anew), a rebuild rewrites them
    all (as a first load's batch does), and a contact the source deleted has none."""
    from bench.matching.generate import generate

    columns = ("first_name", "last_name", "email", "phone", "company")
    people = [
        {"id": row["unique_id"], **{c: row[c] for c in columns}} for row in generate(300, seed=3)
    ]
    # text SQLite's JSON functions pass through on the batch path (quotes, accents, emoji)
    people.append({"id": "x1", "first_name": 'Zoë "Z"', "last_name": "Ångström 🎉 \\ O'Hara"})
    src = tmp_path / "contacts.csv"
    _write_csv(src, people)
    settings = make_settings(tmp_path, store_url, {"c": {"type": "csv", "path": str(src)}})
    engine = SyncEngine(settings, db)
    try:
        await engine.run("c")
        assert _forms_match_data(db) == len(people)
        # the first contact's company changes; the source deletes the second
        _write_csv(src, [{**people[0], "company": "Changed Company Ltd"}, *people[1:]])
        await engine.run("c")
        with write_transaction(db) as conn:
            assert engine._apply_deletions(conn, "c", [people[1]["id"]], datetime.now(UTC)) == 1
    finally:
        engine.close()
    assert _forms_match_data(db) == len(people) - 1
    with db.connect() as conn:
        assert len(conn.execute(select(contact_form.c.record_id)).all()) == len(people) - 1
        conn.execute(contact_form.delete())
        conn.commit()
    rebuild(db, settings, actor="test", confirm=True)
    assert _forms_match_data(db) == len(people) - 1


async def _sync_csv(tmp_path: Path, store_url: str, db: Engine, name: str, rows: list) -> None:
    """Sync `rows` from a CSV source `name` with a new engine (no cache from earlier runs)."""
    src = tmp_path / f"{name}.csv"
    _write_csv(src, rows)
    settings = make_settings(tmp_path, store_url, {name: {"type": "csv", "path": str(src)}})
    engine = SyncEngine(settings, db)
    try:
        await engine.run(name)
    finally:
        engine.close()


async def _probe(tmp_path: Path, store_url: str, db: Engine, name: str, row: dict) -> set[int]:
    """Sync one contact from a source of its own; the ids of the records in its golden
    record."""
    await _sync_csv(tmp_path, store_url, db, name, [row])
    with db.connect() as conn:
        rid = conn.execute(
            select(source_record.c.id).where(source_record.c.source == name)
        ).scalar_one()
        golden = select(membership.c.golden_id).where(membership.c.record_id == rid)
        members = select(membership.c.record_id).where(
            membership.c.golden_id == golden.scalar_subquery()
        )
        return set(conn.execute(members).scalars())


PERSON = {
    "first_name": "Zebulon",
    "last_name": "Quixote",
    "email": "zebulon.quixote@example.org",
    "phone": "+1 555 010 7788",
    "company": "Windmill Partners",
}
OTHERS = [
    {"id": str(i), "first_name": f"Ann{chr(97 + i)}", "last_name": "Lee", "email": f"ann{i}@x.org"}
    for i in range(5)
]
SOMEONE_ELSE = Contact(first_name="Mary", last_name="Jones", emails=["mj@elsewhere.net"])


async def test_candidates_are_compared_through_their_stored_forms(
    tmp_path, db, store_url, monkeypatch
):
    """A probe prepares only itself when its candidates have forms for the data they hold;
    a doctored form is what it compares with (so forms are read, not re-derived), and one
    whose digest no longer fits the data (re-staged or re-mapped since) is not used."""
    await _sync_csv(tmp_path, store_url, db, "people", [*OTHERS, {"id": "9", **PERSON}])
    with db.connect() as conn:
        stored = conn.execute(
            select(source_record.c.id).where(source_record.c.external_id == "9")
        ).scalar_one()
    prepared: list[Contact] = []

    def counting(contact: Contact) -> Prepared:
        prepared.append(contact)
        return prepare(contact)

    monkeypatch.setattr(sync.golden, "prepare", counting)
    first = await _probe(tmp_path, store_url, db, "first", {"id": "p1", **PERSON})
    assert stored in first  # the same person: merged
    assert len(prepared) == 1, "a candidate with a valid stored form was prepared again"

    # Every stored form now says someone else, under the digest of its record's data.
    with db.begin() as conn:
        conn.execute(update(contact_form).values(form=form_json(prepare(SOMEONE_ELSE))))
    second = await _probe(tmp_path, store_url, db, "second", {"id": "p2", **PERSON})
    assert len(second) == 1  # compared with "Mary Jones" twice: a person of its own

    # The stored person's data changes behind its form's back (another process re-mapped
    # it): the digest no longer fits, and its data is prepared instead. (The other member of
    # its golden record gets its true form back first: a member that looks like someone else
    # would hold the join for review, as the chain guard does.)
    (joined,) = first - {stored}
    with db.begin() as conn:
        data = conn.execute(
            select(source_record.c.data).where(source_record.c.id == joined)
        ).scalar_one()
        true_form = form_json(prepare(Contact.model_validate(data)))
        conn.execute(
            update(contact_form).where(contact_form.c.record_id == joined).values(form=true_form)
        )
    with db.begin() as conn:
        text = conn.execute(
            select(cast(source_record.c.data, Text)).where(source_record.c.id == stored)
        ).scalar_one()
        data = {**orjson.loads(text), "city": "La Mancha"}
        conn.execute(update(source_record).where(source_record.c.id == stored).values(data=data))
    prepared.clear()
    third = await _probe(tmp_path, store_url, db, "third", {"id": "p3", **PERSON})
    assert stored in third
    assert [c.city for c in prepared] == [None, "La Mancha"]  # the probe, then the stale one
    # ... and its form was mended: the next probe prepares only itself.
    prepared.clear()
    assert stored in await _probe(tmp_path, store_url, db, "fourth", {"id": "p4", **PERSON})
    assert [c.city for c in prepared] == [None]


async def test_a_store_without_forms_gets_them_as_its_records_are_candidates(
    tmp_path, db, store_url, monkeypatch
):
    """A store upgraded to stored forms (migration 0013) has none until its records are
    matched again: a probe prepares the candidates that lack one and stores their forms, so
    the next probe with the same candidates prepares only itself."""
    await _sync_csv(tmp_path, store_url, db, "people", [*OTHERS, {"id": "9", **PERSON}])
    with db.begin() as conn:
        conn.execute(contact_form.delete())
    prepared: list[Contact] = []

    def counting(contact: Contact) -> Prepared:
        prepared.append(contact)
        return prepare(contact)

    monkeypatch.setattr(sync.golden, "prepare", counting)
    await _probe(tmp_path, store_url, db, "first", {"id": "p1", **PERSON})
    candidates = len(prepared) - 1
    assert candidates >= 1
    with db.connect() as conn:
        mended = set(conn.execute(select(contact_form.c.record_id)).scalars())
    assert len(mended) == candidates + 1  # the candidates' forms, and the probe's own
    assert _forms_match_data(db, stored_only=True) == len(mended)
    prepared.clear()
    await _probe(tmp_path, store_url, db, "second", {"id": "p2", **PERSON})
    assert len(prepared) == 1


def test_the_digest_is_salted_with_the_form_version(monkeypatch):
    """Another FORM_VERSION (or name data version) gives every data text another digest, so
    forms stored before it are prepared afresh."""
    assert forms._salt(FORM_VERSION) == forms._SALT
    assert forms._salt(FORM_VERSION + 1) != forms._SALT
    text = '{"first_name":"Ann"}'
    before = data_digest(text)
    monkeypatch.setattr(forms, "_SALT", forms._salt(FORM_VERSION + 1))
    assert data_digest(text) != before
