from __future__ import annotations

import random

import numpy as np
import pytest

from crmhub.records import Contact
from dedupe.comparators import COMPARISONS, NULL, Columns, compare_levels, levels_many
from dedupe.normalize import prepare

NAMES = {c.name: i for i, c in enumerate(COMPARISONS)}


def level(field: str, a: Contact, b: Contact) -> str:
    value = compare_levels(prepare(a), prepare(b))[NAMES[field]]
    return "null" if value == NULL else COMPARISONS[NAMES[field]].levels[value]


C = Contact
CASES = [
    ("first_name", C(first_name="Bob"), C(first_name="Robert"), "nickname"),
    ("first_name", C(first_name="Bob"), C(first_name="bob"), "exact"),
    ("first_name", C(first_name="Gregory"), C(first_name="Gregroy"), "similar"),
    ("first_name", C(first_name="R."), C(first_name="Robert"), "initial"),
    ("first_name", C(first_name="Mary"), C(first_name="Robert"), "different"),
    ("first_name", C(first_name="Mary"), C(), "null"),
    ("first_name", C(first_name="José"), C(first_name="Jose"), "exact"),
    ("last_name", C(last_name="Smith"), C(last_name="Smiht"), "similar"),
    ("last_name", C(last_name="Smith"), C(last_name="Jones"), "different"),
    (
        "last_name",
        C(first_name="Bob", last_name="Smith"),
        C(first_name="Smith", last_name="Bob"),
        "exact",
    ),
    ("email", C(emails=["bob.smith@gmail.com"]), C(emails=["bobsmith+x@gmail.com"]), "exact"),
    ("email", C(emails=["bob.smith@gmail.com"]), C(emails=["bob.smith@acme.com"]), "same-local"),
    ("email", C(emails=["jdoe@acme.com"]), C(emails=["jdoee@acme.com"]), "similar"),
    # A digit or another first letter is how colleagues' addresses differ: not a typo.
    ("email", C(emails=["jdoe@acme.com"]), C(emails=["jdoe1@acme.com"]), "different"),
    ("email", C(emails=["jdoe@acme.com"]), C(emails=["pdoe@acme.com"]), "different"),
    ("email", C(emails=["jdoe@acme.com"]), C(emails=["mary@acme.com"]), "different"),
    ("email", C(emails=["jdoe@acme.com"]), C(emails=["mary@gmail.com"]), "other-domain"),
    ("email", C(emails=["info@acme.com"]), C(emails=["info@acme.com"]), "null"),  # role address
    ("phone", C(phones=["+15550101234"]), C(phones=["+15550101234"]), "exact"),
    ("phone", C(phones=["+15550101234"]), C(), "null"),
    ("company", C(company="Acme Inc."), C(company="ACME, Incorporated"), "exact"),
    ("company", C(company="Acme"), C(company="Acme Widgets"), "similar"),
    ("company", C(company="Acme Inc."), C(emails=["rsmith@acme.com"]), "domain"),
    ("company", C(company="Acme"), C(company="Globex"), "different"),
    ("company", C(company="Acme"), C(emails=["bob@gmail.com"]), "null"),
    ("city", C(city="Zürich"), C(city="zurich"), "exact"),
]


@pytest.mark.parametrize(("field", "a", "b", "expected"), CASES)
def test_levels(field: str, a: Contact, b: Contact, expected: str) -> None:
    assert level(field, a, b) == expected
    assert level(field, b, a) == expected  # symmetric


def test_different_company_makes_address_and_phone_differences_uninformative() -> None:
    a = C(emails=["bob@acme.com"], phones=["+15550101234"], company="Acme")
    b = C(emails=["bob.s@gmail.com"], phones=["+15550109999"], company="Globex")
    assert level("email", a, b) == "null"
    assert level("phone", a, b) == "null"
    assert level("company", a, b) == "different"


def _random_contact(rng: random.Random) -> Contact:
    firsts = ["Bob", "Robert", "R.", "Rob", "Mary", "Marie", "", "Jim", "James", "Smith"]
    lasts = ["Smith", "Smyth", "Jones", "", "Bob", "Müller", "Muller"]
    return Contact(
        first_name=rng.choice(firsts) or None,
        last_name=rng.choice(lasts) or None,
        emails=rng.sample(
            ["bob@acme.com", "b.o.b@gmail.com", "bob1@acme.com", "mary@globex.com", "bob@x.org"],
            rng.randint(0, 2),
        ),
        phones=rng.sample(["+15550101234", "+15550109999"], rng.randint(0, 1)),
        company=rng.choice(["Acme Inc", "ACME", "Acme Widgets", "Globex", None]),
        city=rng.choice(["Boston", "boston", None]),
    )


def test_vectorised_levels_equal_scalar_levels() -> None:
    rng = random.Random(3)
    contacts = [_random_contact(rng) for _ in range(300)]
    records = [prepare(c) for c in contacts]
    ia = np.array([rng.randrange(300) for _ in range(2000)], dtype=np.int64)
    ib = np.array([rng.randrange(300) for _ in range(2000)], dtype=np.int64)
    batch = levels_many(Columns.of(records), ia, ib)
    for k in range(len(ia)):
        scalar = compare_levels(records[ia[k]], records[ib[k]])
        assert tuple(int(x) for x in batch[k]) == scalar
        assert compare_levels(records[ib[k]], records[ia[k]]) == scalar


def test_levels_many_empty() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert levels_many(Columns.of([]), empty, empty).shape == (0, len(COMPARISONS))
