from __future__ import annotations

import random

import numpy as np
import pytest

from crmhub.records import Contact
from dedupe.comparators import (
    COMPARISONS,
    NULL,
    Columns,
    _among,
    _distinct_pairs,
    compare_levels,
    levels_many,
)
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


def test_names_read_as_the_address_spells_them() -> None:
    rod = C(first_name="Rod", last_name="Duggn", emails=["rogerduggan@gmail.com"])
    roger = C(first_name="Roger", last_name="Duggan", phones=["+15550101234"])
    assert level("first_name", rod, roger) == "exact"
    assert level("last_name", rod, roger) == "exact"
    # Not from an address both records share: that would count the address twice.
    bob = C(first_name="Bob", last_name="Smith", emails=["bob.smith@gmail.com"])
    robert = C(first_name="Robert", last_name="Smith", emails=["bobsmith@gmail.com"])
    assert level("first_name", bob, robert) == "nickname"


def test_swapped_names_with_typos_and_without_a_first_name() -> None:
    assert (
        level(
            "first_name",
            C(first_name="Mathis", last_name="Mary"),
            C(first_name="Mray", last_name="Mahtis"),
        )
        == "similar"
    )
    assert (
        level(
            "last_name",
            C(first_name="Mathis", last_name="Mary"),
            C(first_name="Mray", last_name="Mahtis"),
        )
        == "similar"
    )
    no_first = C(last_name="Collingwood")
    swapped = C(first_name="Collingwood", last_name="Isaac")
    assert level("last_name", no_first, swapped) == "exact"
    assert level("first_name", no_first, swapped) == "null"


def test_one_edit_addresses_spelling_two_surnames_are_two_mailboxes() -> None:
    a = C(first_name="Joyce", last_name="Fernandez", emails=["joyce.fernandez@gmail.com"])
    b = C(first_name="Joy", last_name="Hernandez", emails=["joyce.hernandez@gmail.com"])
    assert level("email", a, b) == "different"
    c = C(first_name="Joyce", last_name="Fernandez", emails=["joyce.fernandex@gmail.com"])
    assert level("email", a, c) == "similar"  # same surname: a typo in the address


def test_different_company_makes_address_and_phone_differences_uninformative() -> None:
    a = C(emails=["bob@acme.com"], phones=["+15550101234"], company="Acme")
    b = C(emails=["bob.s@gmail.com"], phones=["+15550109999"], company="Globex")
    assert level("email", a, b) == "null"
    assert level("phone", a, b) == "null"
    assert level("company", a, b) == "different"


def _random_contact(rng: random.Random) -> Contact:
    firsts = ["Bob", "Robert", "R.", "Rob", "Mary", "Marie", "", "Jim", "James", "Smith", "Rboert"]
    lasts = ["Smith", "Smyth", "Jones", "", "Bob", "Müller", "Muller", "Smiht", "Robert"]
    # Addresses that spell names (read as alternative spellings) and ones that do not.
    emails = ["bob@acme.com", "b.o.b@gmail.com", "bob1@acme.com", "mary@globex.com", "bob@x.org"]
    emails += ["robert.smith@acme.com", "rsmith@globex.com", "smith.bob@gmail.com"]
    emails += ["jimjones@x.org"]
    return Contact(
        first_name=rng.choice(firsts) or None,
        last_name=rng.choice(lasts) or None,
        emails=rng.sample(emails, rng.choice((0, 1, 1, 1, 2))),
        phones=rng.sample(["+15550101234", "+15550109999"], rng.randint(0, 1)),
        company=rng.choice(["Acme Inc", "ACME", "Acme Widgets", "Globex", None]),
        city=rng.choice(["Boston", "boston", None]),
    )


def test_vectorised_levels_equal_scalar_levels() -> None:
    rng = random.Random(3)
    contacts = [_random_contact(rng) for _ in range(300)]
    records = [prepare(c) for c in contacts]
    assert sum(bool(r.first_alt or r.last_alt) for r in records) >= 20  # alternatives exercised
    ia = np.array([rng.randrange(300) for _ in range(4000)], dtype=np.int64)
    ib = np.array([rng.randrange(300) for _ in range(4000)], dtype=np.int64)
    batch = levels_many(Columns.of(records), ia, ib)
    for k in range(len(ia)):
        scalar = compare_levels(records[ia[k]], records[ib[k]])
        assert tuple(int(x) for x in batch[k]) == scalar
        assert compare_levels(records[ib[k]], records[ia[k]]) == scalar


def test_levels_many_empty() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert levels_many(Columns.of([]), empty, empty).shape == (0, len(COMPARISONS))


def test_each_unordered_pair_of_values_is_compared_once() -> None:
    x = np.array([1, 2, 1, 3, 2, 5, 4], dtype=np.int64)
    y = np.array([2, 1, 2, 3, 1, 4, 5], dtype=np.int64)
    rows = np.array([0, 1, 2, 3, 4, 5, 6], dtype=np.int64)
    rep, inverse = _distinct_pairs(x, y, rows)
    assert len(rep) == 3  # {1, 2}, {3}, {4, 5}
    for row, k in zip(rows.tolist(), inverse.tolist(), strict=True):
        assert {int(x[rep[k]]), int(y[rep[k]])} == {int(x[row]), int(y[row])}
    subset = np.array([3, 5], dtype=np.int64)
    rep, inverse = _distinct_pairs(x, y, subset)
    assert sorted(rep.tolist()) == [3, 5]
    assert sorted(inverse.tolist()) == [0, 1]
    none = np.zeros(0, dtype=np.int64)
    assert [len(a) for a in _distinct_pairs(x, y, none)] == [0, 0]


def test_among_is_isin_for_a_sorted_table() -> None:
    rng = np.random.default_rng(5)
    table = np.unique(rng.integers(0, 1000, size=300))
    values = rng.integers(-5, 1100, size=2000)
    assert np.array_equal(_among(values, table), np.isin(values, table))
    assert not _among(values, table[:0]).any()
