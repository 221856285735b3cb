from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from crmhub.errors import MappingError
from crmhub.mapping import BUILTIN_MAPPINGS, load_mapping
from crmhub.records import Activity, Contact
from crmhub.transforms import normalise_phone, parse_datetime, split_name


@pytest.mark.parametrize("path", sorted(BUILTIN_MAPPINGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_mapping_loads(path):
    mapping = load_mapping(path)
    assert mapping.contacts is not None or mapping.activities is not None


def test_canonical_csv_headers_need_no_mapping():
    mapping = load_mapping(BUILTIN_MAPPINGS / "csv.toml")
    mapped = mapping.map_contact(
        {
            "id": "7",
            "First Name": " Ann ",
            "Last Name": "Lee",
            "EMAIL": "Ann.Lee@Example.COM",
            "phone": "(415) 555-0132",
            "Postal Code": "94107",
            "Birth Date": "1990-02-03",
            "Favourite colour": "green",
            "updated_at": "2026-01-02T03:04:05+02:00",
        }
    )
    contact = mapped.record
    assert isinstance(contact, Contact)
    assert mapped.external_id == "7"
    assert mapped.updated_at == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert (contact.first_name, contact.last_name, contact.full_name) == ("Ann", "Lee", "Ann Lee")
    assert contact.emails == ["ann.lee@example.com"]
    assert contact.phones == ["+14155550132"]
    assert contact.postal_code == "94107"
    assert contact.birth_date == date(1990, 2, 3)
    assert contact.attributes == {"Favourite colour": "green"}


def test_bad_values_are_dropped_and_reported_the_record_is_kept():
    mapping = load_mapping(BUILTIN_MAPPINGS / "csv.toml")
    mapped = mapping.map_contact(
        {
            "email": "a@@b",
            "phone": "12",
            "birth_date": "0000-00-00",
            "first_name": "Kept",
            "consent": "maybe",
        }
    )
    assert isinstance(mapped.record, Contact)
    assert mapped.record.first_name == "Kept"
    assert {i.field for i in mapped.issues} == {"email", "phone", "birth_date", "consent"}


def test_nested_paths_transforms_defaults_and_constants(tmp_path: Path):
    path = tmp_path / "shop.toml"
    path.write_text(
        'version = 1\n[contacts]\nexternal_id = "id"\nattributes = "rest"\n'
        "[contacts.fields]\n"
        'full_name = { path = "person.name", transform = ["strip"] }\n'
        'emails = { paths = ["person.emails", "backup_email"] }\n'
        'birth_date = { path = "dob", '
        'transform = [{ name = "parse_date", format = "%d/%m/%Y" }] }\n'
        'country = { path = "country", default = "NL" }\n'
        '"attributes.first_tag" = "tags[0]"\n'
        '[activities]\nexternal_id = "id"\n[activities.fields]\n'
        'type = { const = "order" }\n'
        'occurred_at = { path = "at", transform = ["parse_datetime"] }\n'
        'participant = "person.emails[0]"\n',
        encoding="utf-8",
    )
    mapping = load_mapping(path)
    payload = {
        "id": 5,
        "person": {"name": " Jan de Vries ", "emails": ["JAN@x.nl"]},
        "backup_email": "jan2@x.nl",
        "dob": "31/12/1980",
        "tags": ["vip"],
        "at": 1700000000,
        "extra": 1,
    }
    contact = mapping.map_contact(payload).record
    assert isinstance(contact, Contact)
    assert (contact.first_name, contact.last_name) == ("Jan", "de Vries")
    assert contact.emails == ["jan@x.nl", "jan2@x.nl"]
    assert contact.birth_date == date(1980, 12, 31)
    assert contact.country == "NL"
    # "rest" is per section: keys only the activities section reads are left over here.
    assert contact.attributes == {"first_tag": "vip", "extra": 1, "at": 1700000000}
    act = mapping.map_activity(payload).record
    assert isinstance(act, Activity)
    assert act.type == "order"
    assert act.participants == ["jan@x.nl"]
    assert act.occurred_at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_every_problem_in_a_mapping_file_is_reported_at_once(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(
        'version = 1\nextra = 1\n[contacts]\nidd = "x"\n[contacts.fields]\n'
        'emial = "e"\nphone = { path = "p", transform = ["e164"] }\n'
        '[activities]\n[activities.fields]\nsubject = "s"\n',
        encoding="utf-8",
    )
    with pytest.raises(MappingError) as err:
        load_mapping(path)
    problems = err.value.problems
    assert any("unknown top-level key 'extra'" in p for p in problems)
    assert any("unknown key 'idd'" in p for p in problems)
    assert any("emial" in p and "unknown target" in p for p in problems)
    assert any("unknown transform 'e164'" in p for p in problems)
    assert any("required target 'type'" in p for p in problems)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bob Smith", ("Bob", "Smith")),
        ("Smith, Bob", ("Bob", "Smith")),
        ("Dr. Bob Smith Jr.", ("Bob", "Smith")),
        ("Ludwig van Beethoven", ("Ludwig", "van Beethoven")),
        ("Cher", ("Cher", None)),
    ],
)
def test_split_name(text, expected):
    parts = split_name(text)
    assert (parts["first_name"], parts["last_name"]) == expected


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("(415) 555-0132", "US", "+14155550132"),
        ("+44 20 7946 0958", "US", "+442079460958"),
        ("030 901820", "DE", "+4930901820"),
    ],
)
def test_phone_e164(raw, region, expected):
    assert normalise_phone(raw, region) == expected


def test_datetimes_are_utc_aware():
    assert parse_datetime("2026-03-01T10:00:00").tzinfo is UTC
    assert parse_datetime("2026-03-01T10:00:00+02:00").hour == 8
    with pytest.raises(ValueError, match="does not match"):
        parse_datetime("yesterday")


def test_when_maps_a_field_only_while_another_value_matches(tmp_path: Path):
    path = tmp_path / "m.toml"
    path.write_text(
        '[contacts]\nexternal_id = "id"\n[contacts.fields]\nemail = "e"\nconsent = "s"\n'
        'consent_at = { path = "t", when = { path = "s", in = ["subscribed", "yes"] } }\n'
    )
    mapping = load_mapping(path)
    row = {"id": "1", "e": "a@example.com", "t": "2026-02-01T08:00:00+01:00"}
    assert mapping.map_contact({**row, "s": "yes"}).record.consent_at == datetime(
        2026, 2, 1, 7, tzinfo=UTC
    )
    assert mapping.map_contact({**row, "s": "no"}).record.consent_at is None
    assert mapping.map_contact(row).record.consent_at is None  # no status at all


def test_a_bad_when_is_reported_with_its_key(tmp_path: Path):
    path = tmp_path / "m.toml"
    path.write_text(
        '[contacts]\nexternal_id = "id"\n[contacts.fields]\n'
        'consent_at = { path = "t", when = { path = "s", equals = "x" } }\n'
    )
    with pytest.raises(MappingError) as err:
        load_mapping(path)
    assert "[contacts.fields].consent_at.when" in str(err.value.problems)


def test_csv_consent_columns_map_by_name():
    mapped = load_mapping(BUILTIN_MAPPINGS / "csv.toml").map_contact(
        {"id": "1", "email": "a@example.com", "consent": "opted_out", "Consent At": "2026-03-02"}
    )
    assert (mapped.record.consent, mapped.record.consent_at) == (
        "unsubscribed",
        datetime(2026, 3, 2, tzinfo=UTC),
    )
