"""Every shipped HTTP-connector mapping maps its vendor fixtures (tests/fixtures/<kind>/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from crmhub.mapping import load_mapping, mapping_path_for

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture(kind: str, name: str) -> Any:
    return json.loads((FIXTURES / kind / name).read_text())


@pytest.mark.parametrize(
    ("kind", "page", "key"),
    [
        ("hubspot", "contacts_search_page.json", "results"),
        ("mailchimp", "members_page.json", "members"),
        ("activecampaign", "contacts_page.json", "contacts"),
        ("klaviyo", "profiles_page.json", "data"),
    ],
)
def test_contact_pages_map(kind: str, page: str, key: str) -> None:
    mapping = load_mapping(mapping_path_for(kind))
    subscribed, unsubscribed, broken = (mapping.map_contact(p) for p in fixture(kind, page)[key])
    assert subscribed.record.emails == ["person1@example.com"]
    assert subscribed.record.first_name == "First1"
    assert subscribed.record.phones == ["+14155550001"]
    assert subscribed.updated_at is not None
    assert subscribed.record.consent in ("subscribed", "unknown")
    assert unsubscribed.record.consent == "unsubscribed"
    assert subscribed.external_id
    assert unsubscribed.external_id != subscribed.external_id
    # A record with a bad or missing email keeps its other fields (Mailchimp members always
    # have an address; its third fixture is an archived member instead).
    if kind != "mailchimp":
        assert broken.record.emails == []
    assert broken.record.last_name == "Last3"


def test_mailchimp_archived_member_is_unsubscribed() -> None:
    mapping = load_mapping(mapping_path_for("mailchimp"))
    archived = fixture("mailchimp", "members_page.json")["members"][2]
    assert mapping.map_contact(archived).record.consent == "unsubscribed"


def test_hubspot_bad_values_are_reported_not_fatal() -> None:
    mapping = load_mapping(mapping_path_for("hubspot"))
    broken = fixture("hubspot", "contacts_search_page.json")["results"][2]
    issues = {i.field for i in mapping.map_contact(broken).issues}
    assert {"email", "phone"} <= issues


@pytest.mark.parametrize(
    ("kind", "name", "type_"),
    [
        ("hubspot", "email_engagement.json", "email_sent"),
        ("mailchimp", "email_activity_event.json", "email_opened"),
        ("klaviyo", "event_opened_email.json", "opened_email"),
    ],
)
def test_activities_map(kind: str, name: str, type_: str) -> None:
    mapped = load_mapping(mapping_path_for(kind)).map_activity(fixture(kind, name))
    assert mapped.record.type == type_
    assert "person1@example.com" in mapped.record.participants
    assert mapped.record.occurred_at.tzinfo is not None


def test_consent_at_is_the_vendors_own_consent_time() -> None:
    from datetime import UTC, datetime

    opt_in = datetime(2026, 1, 1, tzinfo=UTC)
    mailchimp = load_mapping(mapping_path_for("mailchimp"))
    subscribed, unsubscribed, archived = (
        mailchimp.map_contact(m).record
        for m in fixture("mailchimp", "members_page.json")["members"]
    )
    assert subscribed.consent_at == opt_in  # timestamp_opt
    # timestamp_opt is the old opt-in, not the opt-out: left out (survivorship uses last_changed)
    assert unsubscribed.consent_at is None
    assert archived.consent_at is None
    klaviyo = load_mapping(mapping_path_for("klaviyo"))
    profiles = [
        klaviyo.map_contact(p).record for p in fixture("klaviyo", "profiles_page.json")["data"]
    ]
    assert [(p.consent, p.consent_at) for p in profiles[:2]] == [
        ("subscribed", opt_in),
        ("unsubscribed", opt_in),  # consent_timestamp: when the status was set
    ]


@pytest.mark.parametrize("kind", ["jsonl", "webform_generic", "webform_tally"])
def test_a_form_submission_dates_its_consent_only_when_it_has_one(kind: str) -> None:
    from datetime import UTC, datetime

    mapping = load_mapping(mapping_path_for(kind))
    base = {"submission_id": "s1", "submitted_at": "2026-03-02T10:00:00Z", "form": "signup"}
    with_box = mapping.map_contact({**base, "fields": {"email": "a@example.com", "consent": "yes"}})
    assert (with_box.record.consent, with_box.record.consent_at) == (
        "subscribed",
        datetime(2026, 3, 2, 10, tzinfo=UTC),
    )
    without = mapping.map_contact({**base, "fields": {"email": "a@example.com"}})
    assert (without.record.consent, without.record.consent_at) == ("unknown", None)
    assert without.issues == []
