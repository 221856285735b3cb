from __future__ import annotations

import pytest

from crmhub.records import Contact
from dedupe.normalize import (
    company_key,
    domain_org,
    email_key,
    email_names,
    fold,
    is_role_address,
    name_group,
    nickname_of,
    nickname_pairs,
    prepare,
    split_full_name,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Jürgen  O’Brien", "jurgen o brien"),
        ("ИВАН", "ivan"),
        ("Zoë 😀", "zoe"),
        ("", ""),
        ("x" * 10_000, "x" * 128),
    ],
)
def test_fold(text: str, expected: str) -> None:
    assert fold(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Smith, Bob", ("bob", "smith")),
        ("Dr. Bob van der Berg Jr.", ("bob", "van der berg")),
        ("Cher", ("", "cher")),
        ("", ("", "")),
    ],
)
def test_split_full_name(text: str, expected: tuple[str, str]) -> None:
    assert split_full_name(text) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("bob", "robert", True),
        ("robert", "bob", True),
        ("jim", "james", True),
        ("peggy", "margaret", True),
        ("bob", "bob", False),  # equal is not a nickname relation
        ("john", "mary", False),
        ("b", "bob", False),
    ],
)
def test_nickname_of(a: str, b: str, expected: bool) -> None:
    assert nickname_of(a, b) is expected


def test_name_group_contains_canonical() -> None:
    assert {"bob", "robert"} <= name_group("bob")
    assert name_group("") == frozenset()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ACME, Inc.", "acme"),
        ("The Acme Corporation", "acme"),
        ("Acme L.L.C.", "acme"),
        ("Müller GmbH & Co. KG", "muller"),
        ("Acme Widgets Ltd", "acme widgets"),
    ],
)
def test_company_key(text: str, expected: str) -> None:
    assert company_key(text) == expected


@pytest.mark.parametrize(
    ("email", "expected"),
    [
        ("B.o.b.Smith+crm@googlemail.com", "bobsmith@gmail.com"),
        ("bob.smith+x@acme.com", "bob.smith@acme.com"),
        ("Bob@Example.COM", "bob@example.com"),
    ],
)
def test_email_key(email: str, expected: str) -> None:
    assert email_key(email) == expected


def test_role_addresses_and_domain_orgs() -> None:
    assert is_role_address("info@acme.com")
    assert is_role_address("Sales+eu@acme.com")
    assert not is_role_address("bob@acme.com")
    assert domain_org("rsmith@mail.acme.co.uk") == "acme"
    assert domain_org("bob@gmail.com") == ""


def test_prepare_drops_role_addresses_and_keeps_orgs() -> None:
    rec = prepare(
        Contact(
            full_name="Smith, Bob",
            emails=["info@acme.com", "bob.smith+x@gmail.com", "rsmith@acme.com"],
            company="Acme Inc.",
        )
    )
    assert (rec.first, rec.last) == ("bob", "smith")
    assert rec.emails == ("bobsmith@gmail.com", "rsmith@acme.com")
    assert rec.orgs == frozenset({"acme"})
    assert "gmail dots removed" in rec.email_notes[0]


def test_prepare_empty_contact() -> None:
    rec = prepare(Contact())
    assert (rec.first, rec.last, rec.emails, rec.phones, rec.orgs) == ("", "", (), (), frozenset())


@pytest.mark.parametrize(
    ("local", "first", "last", "expected"),
    [
        ("rogerduggan", "rod", "duggn", ("roger", "duggan")),  # nickname + surname typo
        ("henry.chilcott33", "henry", "cpilcott", ("henry", "chilcott")),
        ("eric3773", "erc", "zendejas", ("eric", "")),  # the first name alone
        ("jsmith", "jane", "smith", ("j", "smith")),
        ("smith.john", "", "smith", ("john", "smith")),  # last.first, no written first name
        ("rebeccalemmons", "becca", "lemmons", ("rebecca", "lemmons")),
        ("sales.team", "", "smith", ("", "")),  # spells nobody's name
        ("janesmithson", "jane", "smith", ("", "")),  # another surname, not a typo of this one
        ("mary.jones", "robert", "smith", ("", "")),  # someone else's address
    ],
)
def test_email_names(local: str, first: str, last: str, expected: tuple[str, str]) -> None:
    assert email_names(local, first, last) == expected


def test_prepare_reads_names_as_the_address_spells_them() -> None:
    typo = prepare(Contact(first_name="Rod", last_name="Duggn", emails=["rogerduggan@gmail.com"]))
    assert (typo.first, typo.last, typo.first_alt, typo.last_alt) == (
        "rod",
        "duggn",
        "roger",
        "duggan",
    )
    nameless = prepare(Contact(last_name="Collingwood", emails=["isaac.collingwood@x.com"]))
    assert (nameless.first, nameless.first_alt) == ("isaac", "")  # taken, not an alternative
    plain = prepare(Contact(first_name="Jane", last_name="Smith", emails=["jsmith@acme.com"]))
    assert (plain.first_alt, plain.last_alt) == ("", "")  # an initial says less than "jane"


def test_nickname_pairs_agree_with_nickname_of() -> None:
    names = ["bob", "robert", "rob", "mary", "polly", "ann", "anne", "x", "smith", "bobby"]
    pairs = nickname_pairs(names)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert ((i, j) in pairs) == nickname_of(a, b), (a, b)


def test_email_names_tries_only_the_cuts_that_can_fit() -> None:
    """The typo-at-the-end search tries only cuts leaving a surname within one letter of the
    written one's length: the same answers as trying every cut, on random user names."""
    import random

    from dedupe.normalize import _fits_first, _one_edit

    def every_cut(word: str, first: str, last: str) -> tuple[str, str] | None:
        for cut in range(1, len(word) - 2):
            f, s = word[:cut], word[cut:]
            if _one_edit(s, last) and _fits_first(f, first):
                return f, s
        return None

    rng = random.Random(3)
    letters = "aeilnorst"
    checked = 0
    for _ in range(4000):
        first = "".join(rng.choice(letters) for _ in range(rng.randint(0, 6)))
        last = "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 4))) + last
        if rng.random() < 0.8:  # a typo in the surname part: a letter added, lost or changed
            at = len(word) - len(last) + rng.randrange(len(last))
            keep = at + rng.choice((0, 1, 1))
            word = (
                word[:at]
                + ("" if keep > at and rng.random() < 0.5 else rng.choice(letters))
                + word[keep:]
            )
        got = email_names(word, first, last)
        if word.endswith(last) and len(word) > len(last) and _fits_first(word[: -len(last)], first):
            continue  # answered before the search
        expected = every_cut(word, first, last)
        if expected is not None:
            checked += 1
            assert got == expected, (word, first, last)
        else:
            assert got in {("", ""), (word, "")}, (word, first, last)
    assert checked > 300
