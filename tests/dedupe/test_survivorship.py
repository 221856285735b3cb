"""Survivorship rules: which member supplies each golden field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from crmhub.errors import SettingsError
from crmhub.settings import Settings
from dedupe.survivorship import Member, Policy, survive


def at(day: int) -> datetime:
    return datetime(2026, 1, day, tzinfo=UTC)


OLD_CRM = Member(
    1, at(1), {"job_title": "VP Sales", "company": "Acme Inc", "city": "Boston"}, "crm"
)
FORM = Member(2, at(3), {"job_title": "", "company": "ACME inc ", "city": "Cambridge"}, "forms")
MAIL = Member(3, at(2), {"job_title": "Sales", "company": "Acme Incorporated"}, "mail")
MEMBERS = [OLD_CRM, FORM, MAIL]


def test_most_recent_non_empty_by_default() -> None:
    fields, lineage = survive(MEMBERS)
    # the form is newest but its job title is blank: the next most recent value holds
    assert (fields["job_title"], lineage["job_title"]) == ("Sales", 3)
    assert (fields["city"], lineage["city"]) == ("Cambridge", 2)


def test_source_priority_beats_recency_and_skips_sources_without_a_value() -> None:
    policy = Policy(fields={"job_title": "source_priority"}, source_priority=("forms", "crm"))
    fields, lineage = survive(MEMBERS, policy)
    assert (fields["job_title"], lineage["job_title"]) == ("VP Sales", 1)  # forms has none
    assert fields["city"] == "Cambridge"  # unlisted fields keep the default rule


def test_unlisted_sources_rank_last_and_tie_to_the_most_recent() -> None:
    policy = Policy(default="source_priority", source_priority=("crm",))
    assert survive(MEMBERS, policy)[1]["city"] == 1  # crm listed
    policy = Policy(default="source_priority", source_priority=("elsewhere",))
    assert survive(MEMBERS, policy)[1]["job_title"] == 3  # neither listed: most recent


def test_most_complete_takes_the_longest_value() -> None:
    fields, lineage = survive(MEMBERS, Policy(fields={"company": "most_complete"}))
    assert (fields["company"], lineage["company"]) == ("Acme Incorporated", 3)


def test_most_frequent_counts_values_ignoring_case_and_spaces() -> None:
    fields, lineage = survive(MEMBERS, Policy(fields={"company": "most_frequent"}))
    # "Acme Inc" and "ACME inc " agree (2 votes); the most recent of them is the form's
    assert (fields["company"], lineage["company"]) == ("ACME inc ", 2)


def test_consent_is_most_restrictive_whatever_the_policy() -> None:
    members = [
        Member(1, at(1), {"consent": "unsubscribed"}, "crm"),
        Member(2, at(5), {"consent": "subscribed"}, "forms"),
    ]
    policy = Policy(default="source_priority", source_priority=("forms",))
    fields, lineage = survive(members, policy)
    assert (fields["consent"], lineage["consent"]) == ("unsubscribed", 1)


def test_settings_name_the_bad_field_and_require_a_priority_list() -> None:
    with pytest.raises(ValueError, match="did you mean 'job_title'"):
        Settings(survivorship={"fields": {"job_titel": "most_recent"}})
    with pytest.raises(ValueError, match="source_priority ="):
        Settings(survivorship={"fields": {"city": "source_priority"}})
    with pytest.raises(ValueError, match="most_complete"):
        Settings(survivorship={"default": "longest"})


def test_settings_file_errors_point_at_the_key(tmp_path) -> None:
    from crmhub.settings import load_settings

    path = tmp_path / "crmhub.toml"
    path.write_text('[survivorship]\nfields = { job_titel = "most_recent" }\n')
    with pytest.raises(SettingsError, match="survivorship"):
        load_settings(path)


# -- consent: most restrictive wins, unless an explicit opt-in is later than every opt-out --


def consent(
    rid: int, updated: int, status: str, at_day: int | None = None, src: str = ""
) -> Member:
    data: dict[str, object] = {"consent": status}
    if at_day is not None:
        data["consent_at"] = at(at_day).isoformat()
    return Member(rid, at(updated), data, src or f"s{rid}")


def decided(*members: Member) -> tuple[str, str | None, int | None]:
    fields, lineage = survive(list(members))
    return fields["consent"], fields.get("consent_at"), lineage.get("consent")


def test_a_stale_opt_in_never_lifts_an_opt_out() -> None:
    # subscribed without consent_at, edited long after the opt-out: still unsubscribed
    out = consent(1, 2, "unsubscribed", at_day=2)
    stale = consent(2, 20, "subscribed")
    assert decided(out, stale) == ("unsubscribed", at(2).isoformat(), 1)


def test_an_explicit_later_opt_in_lifts_the_opt_out() -> None:
    out = consent(1, 25, "unsubscribed", at_day=2)  # record edited later; the opt-out is day 2
    optin = consent(2, 3, "subscribed", at_day=10)
    assert decided(out, optin) == ("subscribed", at(10).isoformat(), 2)


def test_an_explicit_earlier_opt_in_does_not_lift() -> None:
    out = consent(1, 12, "unsubscribed", at_day=12)
    optin = consent(2, 30, "subscribed", at_day=10)
    assert decided(out, optin) == ("unsubscribed", at(12).isoformat(), 1)


def test_a_tie_stays_restrictive() -> None:
    out = consent(1, 5, "cleaned", at_day=5)
    optin = consent(2, 5, "subscribed", at_day=5)
    assert decided(out, optin) == ("cleaned", at(5).isoformat(), 1)
    assert decided(optin, out) == ("cleaned", at(5).isoformat(), 1)  # order does not matter


def test_the_opt_in_must_beat_every_opt_out_and_uses_updated_at_without_consent_at() -> None:
    early_out = consent(1, 2, "unsubscribed", at_day=2)
    late_out = consent(3, 15, "cleaned")  # no consent_at: its updated_at (day 15) counts
    optin = consent(2, 4, "subscribed", at_day=10)
    # unsubscribed outranks cleaned, so the shown opt-out is record 1's
    assert decided(early_out, optin, late_out) == ("unsubscribed", at(2).isoformat(), 1)
    later = consent(4, 4, "subscribed", at_day=16)
    assert decided(early_out, optin, late_out, later) == ("subscribed", at(16).isoformat(), 4)


def test_an_opt_out_of_unknown_time_is_never_lifted() -> None:
    out = Member(1, None, {"consent": "unsubscribed"}, "csv")
    optin = consent(2, 3, "subscribed", at_day=28)
    fields, lineage = survive([out, optin])
    assert (fields["consent"], lineage["consent"]) == ("unsubscribed", 1)
    assert "consent_at" not in fields


def test_without_opt_outs_the_usual_ranking_holds_and_unknown_has_no_date() -> None:
    assert decided(consent(1, 3, "pending", 3), consent(2, 1, "subscribed"))[:2] == (
        "subscribed",
        at(1).isoformat(),  # no consent_at: the record's updated_at
    )
    fields, lineage = survive([Member(1, at(1), {}, "a"), Member(2, at(2), {}, "b")])
    assert fields["consent"] == "unknown"
    assert "consent_at" not in fields
    assert "consent" not in lineage


def test_result_does_not_depend_on_member_order() -> None:
    members = [
        consent(1, 2, "unsubscribed", at_day=2),
        consent(2, 9, "subscribed", at_day=9),
        consent(3, 9, "subscribed", at_day=9),  # same time: the most recent record (3) wins
        consent(4, 5, "cleaned", at_day=5),
    ]
    want = survive(members)
    assert want[0]["consent"] == "subscribed"
    assert want[1]["consent"] == 3
    assert survive(members[::-1]) == want


@pytest.mark.parametrize(
    "data",
    [
        {"consent": "unsubscribed", "consent_at": "2026-01-02T00:00:00+00:00", "city": "Oslo"},
        {"consent": "subscribed", "emails": ["a@example.com"]},
        {"consent": "pending", "consent_at": "2026-01-03T09:30:00Z"},
        {"full_name": "No Consent"},
        {"consent": "unknown", "consent_at": "2026-01-03T09:30:00Z", "company": ""},
        {"consent": "cleaned", "consent_at": datetime(2026, 2, 1, tzinfo=UTC)},
        {
            "first_name": "Ann",
            "last_name": "",
            "job_title": None,
            "emails": ["a@example.com", "b@example.com", "a@example.com"],
            "phones": ["+14155550100", "+14155550100"],
            "birth_date": "1990-02-03",
            "attributes": {"tier": "gold"},
        },
        {},
    ],
)
@pytest.mark.parametrize("updated", [True, False], ids=["updated_at", "no_updated_at"])
def test_the_singleton_fast_path_matches_the_general_path(
    data: dict[str, object], updated: bool
) -> None:
    from dedupe.survivorship import DEFAULT_POLICY, _general, solo

    member = Member(7, at(4) if updated else None, data, "src")
    want = _general([member], DEFAULT_POLICY)
    assert survive([member]) == want
    # The mapping process's form of it: the same fields, the lineage keys in the same order.
    assert solo(data, member.updated_at) == (want[0], list(want[1]))


def test_fields_come_out_in_one_order_whatever_order_the_data_lists_them() -> None:
    """Golden fields are stored as JSON text: two members listing their fields in another
    order (and blanks of every kind) must not change the text."""
    a = {"city": "Boston", "company": "", "first_name": "Ann", "job_title": None, "phones": []}
    b = {"last_name": "Lee", "first_name": "Anne", "company": "Acme", "city": ""}
    forward = survive([Member(1, at(1), a, "crm"), Member(2, at(2), b, "forms")])
    backward = survive(
        [
            Member(1, at(1), dict(reversed(a.items())), "crm"),
            Member(2, at(2), dict(reversed(b.items())), "forms"),
        ]
    )
    assert forward == backward
    assert list(forward[0]) == [
        "first_name",
        "last_name",
        "company",
        "city",
        "consent",
        "emails",
        "phones",
    ]
    assert forward[1] == {"first_name": 2, "last_name": 2, "company": 2, "city": 1}
