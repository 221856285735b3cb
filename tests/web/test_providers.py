"""Each provider's documented payload example, signed its way, posted over HTTP to a running
server: the submitter becomes a golden record and the submission a form_submission activity.

The `*_docs_example.json` fixtures and `webflow_form_submission.json` are the vendors' own
examples (sources in docs/connectors.md, "Signatures and payloads: sources"); the other
fixtures are the same shapes with readable field names, as a configured form sends them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Case:
    provider: str
    fixture: str
    golden: dict[str, Any]  # fields of the golden record
    subject: str  # the activity's subject: the form's name
    answers: dict[str, Any]  # some of the activity's answers
    occurred_at: str  # when the provider says it was submitted


CASES = [
    # https://www.typeform.com/developers/webhooks/example-payload/ (answers carry no ref:
    # it is resolved through form_response.definition.fields)
    Case(
        "typeform",
        "typeform_docs_example.json",
        {"emails": ["laura@example.com"]},
        "Webhooks example",
        {
            "readable_ref_short_text": "Laura",
            "readable_ref_picture_choice": ["London", "Sydney"],
            "readable_ref_multiple_choice": "London",
            "user_id": "abc123456",
        },
        "2018-01-18T18:17:02",
    ),
    Case(
        "typeform",
        "typeform_form_response.json",
        {"emails": ["laura.diaz@example.com"], "phones": ["+14155550101"], "last_name": "Diaz"},
        "Request a demo",
        {"team_size": "11-50", "utm_source": "newsletter"},
        "2026-03-01T10:01:30",
    ),
    # https://tally.so/help/webhooks, "Example webhook event" (every Tally field type)
    Case(
        "tally",
        "tally_docs_example.json",
        {"emails": ["alice@example.com"], "phones": ["+32491223344"]},
        "Webhook payload",
        {
            "multiple_choice": ["In progress"],
            "checkboxes": ["Swimming", "Skiing"],
            "ranking": ["Pear", "Apple", "Banana"],
            "utm_campaign": "newsletter",
            "payment_name": "Alice Smith",
        },
        "2023-06-28T15:00:21",
    ),
    Case(
        "tally",
        "tally_form_response.json",
        {"emails": ["tomas@berg.example"], "phones": ["+46701234567"], "company": "Berg AB"},
        "Webinar sign-up",
        {"topics": ["Sync", "Dedupe"]},
        "2026-03-02T09:15:00",
    ),
    # https://developers.webflow.com/data/reference/webhooks/events/form-submission
    Case(
        "webflow",
        "webflow_form_submission.json",
        {"emails": ["zaphod@heartofgold.ai"], "first_name": "Zaphod", "last_name": "Beeblebrox"},
        "Contact Us",
        {"phone_number": 15550000000},
        "2022-09-14T12:35:16",
    ),
    # https://developers.hubspot.com/docs/methods/workflows/webhook_information: a workflow's
    # "Send a webhook" posts the enrolled contact (contacts API shape) with its form submission
    Case(
        "hubspot",
        "hubspot_workflow_docs_example.json",
        {
            "emails": ["perf_user_970@test.com"],
            "first_name": "perf_user_970",
            "last_name": "perf_user_970",
        },
        "testform",
        {"lifecyclestage": "lead", "ipaddress": "unknown"},
        "2012-01-03T23:30:23",
    ),
    # The Forms API submission shape (fields: [{name, value}]), sent by a custom sender
    Case(
        "hubspot",
        "hubspot_form_submission.json",
        {"emails": ["priya@nair.example"], "phones": ["+442079460958"], "company": "Nair Ltd"},
        "Pricing",
        {"firstname": "Priya"},
        "2026-03-03T13:20:00",
    ),
    # crmhub's own scheme (X-Crmhub-Signature), flat JSON
    Case(
        "generic",
        "generic_submission.json",
        {"emails": ["ana@lima.example"], "first_name": "Ana", "company": "Lima SA"},
        "newsletter",
        {"message": "Hi!"},
        "2026-03-05T08:00:00",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.fixture.removesuffix(".json"))
def test_documented_example_becomes_golden_record_and_activity(case: Case, app, db):
    provider = case.provider
    body = json.dumps(fixture(case.fixture)).encode()
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
    for key, value in case.golden.items():
        assert golden[key] == value, (key, golden)
    (act,) = activities(db, provider)
    assert act["type"] == "form_submission"
    assert act["subject"] == case.subject
    data = act["data"]
    assert data["channel"] == provider
    assert data["participants"] == case.golden["emails"]
    assert data["occurred_at"].startswith(case.occurred_at), data["occurred_at"]
    answers = data["attributes"]["answers"]
    for key, value in case.answers.items():
        assert answers[key] == value, (key, answers)
    (submission,) = records(db, provider, "activity")
    assert contact["external_id"] == submission["external_id"]  # one submission, one id
    assert answered < 1.0
    assert [r["status"] for r in inbox_rows(db)] == ["done"]


def test_hubspot_workflow_payload_keeps_answers_not_analytics(app, db):
    body = json.dumps(fixture("hubspot_workflow_docs_example.json")).encode()
    with live(app) as server:
        url = f"{server.url}/hooks/forms/hubspot"
        response = httpx.post(url, content=body, headers=signed("hubspot", body, url=url))
        assert response.json()["delivery"] == "hubspot:2e137f47a86e48798322d47f6f529a93"
        wait_until(lambda: len(activities(db, "hubspot")) == 1)
    answers = activities(db, "hubspot")[0]["data"]["attributes"]["answers"]
    assert not [key for key in answers if key.startswith("hs_")]
    assert answers["email"] == "perf_user_970@test.com"


def test_typeform_typed_email_is_found_whatever_its_ref(app, db):
    body = json.dumps(fixture("typeform_form_response.json")).encode()
    with live(app) as server:
        url = f"{server.url}/hooks/forms/typeform"
        assert httpx.post(url, content=body, headers=signed("typeform", body)).status_code == 200
        wait_until(lambda: len(activities(db, "typeform")) == 1)
    answers = activities(db, "typeform")[0]["data"]["attributes"]["answers"]
    assert answers["readable_ref_email"] == "Laura.Diaz@Example.com"  # typed email, any ref
