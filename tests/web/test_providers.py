"""Each provider's documented payload example, signed its way, posted to a running server:
the submitter becomes a golden record and the submission a form_submission activity."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.web.conftest import (
    activities,
    fixture,
    golden_of,
    inbox_rows,
    live,
    records,
    signed,
    wait_until,
)

CASES = {
    "typeform": (
        "typeform_form_response.json",
        {"emails": ["laura.diaz@example.com"], "phones": ["+14155550101"], "last_name": "Diaz"},
        "Request a demo",
    ),
    "tally": (
        "tally_form_response.json",
        {"emails": ["tomas@berg.example"], "phones": ["+46701234567"], "company": "Berg AB"},
        "Webinar sign-up",
    ),
    "webflow": (
        "webflow_form_submission.json",
        {"emails": ["zaphod@heartofgold.ai"], "first_name": "Zaphod", "last_name": "Beeblebrox"},
        "Contact Us",
    ),
    "hubspot": (
        "hubspot_form_submission.json",
        {"emails": ["priya@nair.example"], "phones": ["+442079460958"], "company": "Nair Ltd"},
        "Pricing",
    ),
    "generic": (
        "generic_submission.json",
        {"emails": ["ana@lima.example"], "first_name": "Ana", "company": "Lima SA"},
        "newsletter",
    ),
}


@pytest.mark.parametrize("provider", sorted(CASES))
def test_documented_example_becomes_golden_record_and_activity(provider, app, db):
    name, expected, subject = CASES[provider]
    body = json.dumps(fixture(name)).encode()
    with live(app) as server:
        url = f"{server.url}/hooks/forms/{provider}"
        started = time.monotonic()
        response = httpx.post(url, content=body, headers=signed(provider, body, url=url))
        answered = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "accepted"
        wait_until(lambda: len(activities(db, provider)) == 1 and records(db, provider, "contact"))
    (contact,) = records(db, provider, "contact")
    golden = golden_of(db, contact["id"])
    assert golden is not None
    for key, value in expected.items():
        assert golden[key] == value, (key, golden)
    (act,) = activities(db, provider)
    assert act["type"] == "form_submission"
    assert act["subject"] == subject
    assert act["data"]["channel"] == provider
    assert act["data"]["participants"] == expected["emails"]
    assert answered < 1.0
    assert [r["status"] for r in inbox_rows(db)] == ["done"]


def test_typeform_choice_and_hidden_fields_are_kept_as_answers(app, db):
    body = json.dumps(fixture("typeform_form_response.json")).encode()
    with live(app) as server:
        url = f"{server.url}/hooks/forms/typeform"
        assert httpx.post(url, content=body, headers=signed("typeform", body)).status_code == 200
        wait_until(lambda: len(activities(db, "typeform")) == 1)
    answers = activities(db, "typeform")[0]["data"]["attributes"]["answers"]
    assert answers["team_size"] == "11-50"
    assert answers["utm_source"] == "newsletter"
    assert answers["readable_ref_email"] == "Laura.Diaz@Example.com"  # typed email, any ref


def test_tally_choices_arrive_as_option_texts(app, db):
    body = json.dumps(fixture("tally_form_response.json")).encode()
    with live(app) as server:
        url = f"{server.url}/hooks/forms/tally"
        assert httpx.post(url, content=body, headers=signed("tally", body)).status_code == 200
        wait_until(lambda: len(activities(db, "tally")) == 1)
    answers = activities(db, "tally")[0]["data"]["attributes"]["answers"]
    assert answers["topics"] == ["Sync", "Dedupe"]
