from __future__ import annotations

import json

from crmhub.records import Contact
from dedupe import build_matcher
from dedupe.cluster import should_join
from dedupe.explain import render
from dedupe.normalize import prepare

BOB = Contact(first_name="Bob", last_name="Smith", emails=["bob.smith@gmail.com"])
ROBERT = Contact(
    first_name="Robert", last_name="Smith", emails=["bobsmith+crm@gmail.com"], city="Leeds"
)


def test_should_join_accepts_agreeing_clusters_and_refuses_a_lone_bridge() -> None:
    assert should_join([], 0.8)
    assert should_join([0.99, 0.6, 0.55], 0.8)  # nobody contradicts the link
    assert should_join([0.99, 0.3, 0.06], 0.8)  # weak, but not sure to be different people
    assert should_join([0.99] * 5 + [0.01], 0.8)  # one contradicts; the mean agrees
    assert not should_join([0.99, 0.97, 0.04], 0.8)  # mean 0.667 and a contradiction
    assert not should_join([0.99, 0.01, 0.02], 0.8)  # one strong link, the rest disagree
    assert not should_join([0.96, 0.03], 0.8)
    # The contradiction bar follows the auto-merge threshold (1 - auto_merge).
    assert should_join([0.96, 0.03], 0.8, auto_merge=0.99)
    assert not should_join([0.96, 0.3], 0.8, auto_merge=0.5)


def test_render_explains_each_field_in_words() -> None:
    decision = build_matcher().compare(BOB, ROBERT)
    rows = {r["field"]: r for r in render(decision)}
    assert rows["first_name"]["finding"] == "one first name is a nickname of the other"
    assert rows["first_name"]["note"].startswith("nickname bob = robert")
    assert rows["email"]["level"] == "exact"
    assert "+tag removed" in rows["email"]["note"]
    assert rows["email"]["strength"] == "strong evidence for"
    assert rows["city"]["level"] == "null"
    assert rows["city"]["weight"] == 0.0
    assert rows["city"]["strength"] == "no real evidence"
    # Works on the stored (JSON) form too, and is itself JSON-ready.
    stored = json.loads(json.dumps(decision.explanation))
    assert render(stored) == render(decision)
    assert json.loads(json.dumps(render(stored))) == render(stored)
    assert render({}) == []


def test_common_value_note_from_term_frequencies() -> None:
    from dedupe.cluster import frequency_table

    people = [Contact(first_name="Ann", last_name="Smith", city=f"c{i}") for i in range(40)]
    people += [BOB, ROBERT]
    matcher = build_matcher(frequencies=frequency_table([prepare(c) for c in people]))
    rows = {r["field"]: r for r in render(matcher.compare(people[0], people[1]))}
    assert "common value" in rows["last_name"]["note"]
    assert rows["last_name"]["weight"] < build_matcher().params.weight("last_name", 2)


def test_fuzzy_swap_and_org_without_spaces() -> None:
    matcher = build_matcher()
    a = Contact(first_name="Pagan", last_name="William", company="Zenithsilver Labs")
    b = Contact(first_name="Will", last_name="Pagan", emails=["wpagan@zenithsilverlabs.com"])
    fields = matcher.compare(a, b).explanation["fields"]
    assert fields["first_name"]["level"] == "nickname"
    assert fields["last_name"]["level"] == "exact"
    assert fields["last_name"]["normalisation"] == "first and last name swapped"
    c = Contact(first_name="Ann", last_name="Lee", company="Jade Robotics Ltd.")
    d = Contact(first_name="Ann", last_name="Lee", emails=["ann.lee@jaderobotics.com"])
    assert matcher.compare(c, d).explanation["fields"]["company"]["level"] == "domain"
