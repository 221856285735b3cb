"""Contacts' prepared forms, stored beside their match_key rows (table `contact_form`).

Matching one new contact against a big store compares it with a couple of hundred stored
candidates, and validating and preparing each (`Contact.model_validate_json`, then
`dedupe.normalize.prepare`) cost more than reading and scoring them together. So whoever
writes a contact's match_key rows (a page's match, a batch's key writer) writes its prepared
form too, and a candidate's form is read back instead of worked out again.

A form is used only for the data it was made from: each row carries a digest of the record's
stored data text, salted with FORM_VERSION and the versions of the name data `prepare` uses,
and a candidate whose data no longer gives that digest (re-staged or re-mapped since by any
process, or prepared by other code) is prepared from its data as before, and that form is
stored in place of the stale or missing one (`mend_forms`). Bump FORM_VERSION
whenever `prepare` gives other output for the same contact (tests/sync/test_forms.py holds a
digest of dedupe/normalize.py that fails on any change to it, as a reminder).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import fields
from importlib.metadata import version
from operator import attrgetter

import orjson
from sqlalchemy import Connection

from dedupe.normalize import Prepared
from sync.store import contact_form, insert_rows, upsert

__all__ = [
    "DIGEST_CHARS",
    "FORM_COLUMNS",
    "FORM_VERSION",
    "data_digest",
    "form_from_json",
    "form_json",
    "form_row",
    "mend_forms",
    "prepared_values",
    "split_row",
    "store_forms",
]

FORM_VERSION = 1
FORM_COLUMNS = ("record_id", "digest", "form")
DIGEST_CHARS = 16  # hex digits of an 8-byte digest
# A `Prepared`'s field values, in declaration order (what `Prepared(*values)` takes back).
prepared_values = attrgetter(*(f.name for f in fields(Prepared)))


def _salt(form_version: int) -> bytes:
    # Newer name data or transliteration tables can change `prepare`'s output too.
    libraries = [version(lib) for lib in ("nicknames", "anyascii")]
    return ":".join([f"crmhub-form-{form_version}", *libraries, ""]).encode()


_SALT = _salt(FORM_VERSION)


def data_digest(data_text: str) -> str:
    """A digest of a record's data as the store keeps it (its `data` column's text)."""
    return hashlib.blake2b(_SALT + data_text.encode(), digest_size=8).hexdigest()


def form_json(record: Prepared) -> str:
    """The prepared form as a JSON array of its fields (sets sorted, so it is stable)."""
    values = prepared_values(record)
    return orjson.dumps([sorted(v) if isinstance(v, frozenset) else v for v in values]).decode()


def form_from_json(text: str) -> Prepared:
    """The `Prepared` a `form_json` text holds."""
    (first, last, emails, notes, phones, company, orgs, city, first_alt, last_alt) = orjson.loads(
        text
    )
    return Prepared(
        first,
        last,
        tuple(emails),
        tuple(notes),
        tuple(phones),
        company,
        frozenset(orgs),
        city,
        first_alt,
        last_alt,
    )


def form_row(data_text: str, record: Prepared) -> str:
    """A contact's `contact_form` row but its id, as one string: the digest (DIGEST_CHARS
    long) then the form (compact in a batch's plan; `split_row` takes it apart)."""
    return data_digest(data_text) + form_json(record)


def split_row(row: str) -> tuple[str, str]:
    """(digest, form) of a `form_row`."""
    return row[:DIGEST_CHARS], row[DIGEST_CHARS:]


def store_forms(conn: Connection, rows: Iterable[tuple[int, str, Prepared]]) -> None:
    """Insert (record id, data text, prepared form) rows; a record's old row must be gone."""
    insert_rows(
        conn,
        contact_form,
        FORM_COLUMNS,
        [(rid, data_digest(text), form_json(record)) for rid, text, record in rows],
    )


def mend_forms(conn: Connection, rows: list[tuple[int, str, Prepared]]) -> None:
    """Store (id, data text, form) rows over whatever form those records had: candidates a
    probe had to prepare itself, so the next probe reads them. An upsert, as another process
    may mend the same candidate at the same time."""
    if not rows:
        return
    statement = upsert(conn, contact_form)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["record_id"],
            set_={"digest": statement.excluded.digest, "form": statement.excluded.form},
        ),
        [
            {"record_id": rid, "digest": data_digest(text), "form": form_json(record)}
            for rid, text, record in sorted(rows, key=lambda row: row[0])
        ],
    )
