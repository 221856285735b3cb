from __future__ import annotations

import pytest

from crmhub.records import Contact
from dedupe.normalize import (
    company_key,
    domain_org,
    email_key,
    fold,
    is_role_address,
    name_group,
    nickname_of,
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
