"""Bad input and forged deliveries at POST /hooks/forms/{connector}: the right 4xx, nothing
stored, nothing processed twice, nothing legitimate lost."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import resource
import time
from collections.abc import Iterator

import httpx
import pytest

from connectors import webform
from sync.store import activity, source_record
from tests.web.conftest import (
    SECRET,
    activities,
    count,
    dead_letters,
    fixture,
    golden_of,
    inbox_count,
    inbox_rows,
    live,
    records,
    signed,
    wait_until,
)

HOOK = "/hooks/forms/generic"


def submission(**fields) -> bytes:
    body = {"submission_id": "s-1", "form": "contact", "fields": fields or {"email": "a@b.example"}}
    return json.dumps(body).encode()


async def test_missing_and_bad_signatures_are_401_and_logged_without_the_body(client, db, caplog):
    body = submission(email="secret.person@example.com")
    caplog.set_level(logging.DEBUG)
    unsigned = await client.post(HOOK, content=body, headers={"content-type": "application/json"})
    assert unsigned.status_code == 401
    assert "missing" in unsigned.json()["error"]
    good = signed("generic", body)
    tampered = await client.post(HOOK, content=body + b" ", headers=good)
    assert tampered.status_code == 401
    wrong_key = dict(good, **{"X-Crmhub-Signature": good["X-Crmhub-Signature"][:-4] + "0000"})
    assert (await client.post(HOOK, content=body, headers=wrong_key)).status_code == 401
    for provider in ("typeform", "tally", "webflow", "hubspot"):
        forged = await client.post(
            f"/hooks/forms/{provider}",
            content=body,
            headers=signed("generic", body),  # another scheme's header: theirs is missing
        )
        assert forged.status_code == 401, provider
    assert inbox_count(db) == 0
    assert "secret.person" not in caplog.text
    assert SECRET not in caplog.text
    assert "webhook rejected" in caplog.text


async def test_stale_and_future_timestamps_are_refused(client, db):
    body = submission()
    for skew in (-301, 600):
        response = await client.post(
            HOOK, content=body, headers=signed("generic", body, when=time.time() + skew)
        )
        assert response.status_code == 401
        assert "tolerance" in response.json()["error"]
    stale_webflow = signed("webflow", body, when=time.time() - 400)
    assert (
        await client.post("/hooks/forms/webflow", content=body, headers=stale_webflow)
    ).status_code == 401
    assert inbox_count(db) == 0


async def test_rotation_accepts_either_of_two_v1_signatures(client, db):
    body = submission()
    header = signed("generic", body)["X-Crmhub-Signature"]
    rotated = header.replace("v1=", "v1=" + "0" * 64 + ",v1=")
    response = await client.post(
        HOOK,
        content=body,
        headers={"content-type": "application/json", "X-Crmhub-Signature": rotated},
    )
    assert response.status_code == 200


async def test_replayed_delivery_is_acknowledged_but_processed_once(client, db):
    body = json.dumps(fixture("typeform_form_response.json")).encode()
    headers = signed("typeform", body)
    answers = await asyncio.gather(
        *[client.post("/hooks/forms/typeform", content=body, headers=headers) for _ in range(20)]
    )
    assert all(r.status_code == 200 for r in answers)
    statuses = sorted(r.json()["status"] for r in answers)
    assert statuses.count("accepted") == 1
    assert statuses.count("duplicate") == 19
    assert inbox_count(db) == 1
    assert count(db, source_record, source_record.c.source == "typeform") == 2
    assert count(db, activity) == 1
    assert inbox_rows(db)[0]["attempts"] == 1


async def test_oversized_body_is_413_before_it_is_read(client, db):
    big = submission(email="a@b.example", message="x" * 5000)
    response = await client.post("/hooks/forms/small", content=big, headers=signed("generic", big))
    assert response.status_code == 413

    async def chunked():  # no Content-Length: the limit applies while streaming
        for _ in range(100):
            yield b"x" * 1024

    response = await client.post(
        "/hooks/forms/small", content=chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert inbox_count(db) == 0


async def test_wrong_content_type_invalid_json_and_deep_json_are_4xx(client, db):
    body = submission()
    form = dict(signed("generic", body), **{"content-type": "application/x-www-form-urlencoded"})
    assert (await client.post(HOOK, content=body, headers=form)).status_code == 415
    broken = b'{"submission_id": "s-2", "fields": {'
    response = await client.post(HOOK, content=broken, headers=signed("generic", broken))
    assert response.status_code == 400
    assert "invalid JSON" in response.json()["error"]
    deep = b'{"a": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}"
    response = await client.post(
        "/hooks/forms/small", content=deep, headers=signed("generic", deep)
    )
    assert response.status_code == 400
    assert "nested" in response.json()["error"]
    bad_utf8 = b'{"fields": {"name": "\xff\xfe"}}'
    assert (
        await client.post(HOOK, content=bad_utf8, headers=signed("generic", bad_utf8))
    ).status_code == 400
    array = b"[1, 2]"
    assert (
        await client.post(HOOK, content=array, headers=signed("generic", array))
    ).status_code == 400
    assert inbox_count(db) == 0


async def test_unknown_connector_is_404(client):
    body = submission()
    response = await client.post("/hooks/forms/nope", content=body, headers=signed("generic", body))
    assert response.status_code == 404


async def test_no_email_or_phone_but_a_name_is_a_contact_candidate_and_an_activity(client, db):
    body = json.dumps(
        {
            "submission_id": "walk-in",
            "form": "visit",
            "fields": {"name": "Rosa Park", "message": "hi"},
        }
    ).encode()
    assert (
        await client.post(HOOK, content=body, headers=signed("generic", body))
    ).status_code == 200
    (contact,) = records(db, "generic", "contact")
    golden = golden_of(db, contact["id"])
    assert golden is not None
    assert golden["last_name"] == "Park"
    (act,) = activities(db, "generic")
    assert act["data"]["excerpt"] == "hi"
    assert not act["data"].get("participants")


async def test_no_identity_at_all_keeps_the_activity_and_dead_letters_the_contact(client, db):
    body = json.dumps({"submission_id": "anon", "fields": {"message": "just a question"}}).encode()
    assert (
        await client.post(HOOK, content=body, headers=signed("generic", body))
    ).status_code == 200
    assert records(db, "generic", "contact") == []
    assert len(activities(db, "generic")) == 1
    (letter,) = dead_letters(db, "generic")
    assert letter["origin"].startswith("inbox:")
    assert inbox_rows(db)[0]["status"] == "done"


async def test_a_payload_not_in_the_providers_shape_is_dead_lettered_not_lost(client, db):
    body = json.dumps({"event_id": "evt-9", "something": "else"}).encode()
    response = await client.post(
        "/hooks/forms/typeform", content=body, headers=signed("typeform", body)
    )
    assert response.status_code == 200  # signed and durable: the sender must not retry forever
    (row,) = inbox_rows(db)
    assert row["status"] == "failed"
    assert "form_response" in row["error"]
    (letter,) = dead_letters(db, "typeform")
    assert "form_response" in letter["reason"]
    assert letter["raw"] == body.decode()


@pytest.mark.parametrize("provider", ["typeform", "tally"])
async def test_unsigned_providers_without_timestamp_still_dedupe_by_event_id(provider, client, db):
    name = {"typeform": "typeform_form_response.json", "tally": "tally_form_response.json"}
    body = json.dumps(fixture(name[provider])).encode()
    first = await client.post(
        f"/hooks/forms/{provider}", content=body, headers=signed(provider, body)
    )
    # The same event re-serialised (other whitespace): same event id, so still a duplicate.
    again = json.dumps(fixture(name[provider]), indent=2).encode()
    second = await client.post(
        f"/hooks/forms/{provider}", content=again, headers=signed(provider, again)
    )
    assert (first.json()["status"], second.json()["status"]) == ("accepted", "duplicate")


async def test_odd_shapes_inside_a_valid_payload_are_dead_lettered(client, db):
    body = json.dumps(
        {"event_id": "evt-odd", "form_response": {"answers": [{"type": "text", "field": "x"}]}}
    ).encode()
    response = await client.post(
        "/hooks/forms/typeform", content=body, headers=signed("typeform", body)
    )
    assert response.status_code == 200
    (row,) = inbox_rows(db)
    assert row["status"] == "failed"
    assert len(dead_letters(db, "typeform")) == 1


# -- over real HTTP, against a running server (RELIABILITY.md S9, S10) ----------------------


async def test_a_delivery_replayed_100_times_concurrently_is_processed_once(app, db):
    body = json.dumps(fixture("generic_submission.json")).encode()
    headers = signed("generic", body)  # one signature, replayed within its tolerance
    with live(app) as server:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            answers = await asyncio.gather(
                *[client.post(HOOK, content=body, headers=headers) for _ in range(100)]
            )
        assert {r.status_code for r in answers} == {200}
        statuses = [r.json()["status"] for r in answers]
        assert (statuses.count("accepted"), statuses.count("duplicate")) == (1, 99)
        wait_until(lambda: [r["status"] for r in inbox_rows(db)] == ["done"])
    assert inbox_rows(db)[0]["attempts"] == 1  # claimed and processed once
    assert count(db, source_record, source_record.c.source == "generic") == 2
    assert len(activities(db, "generic")) == 1


def test_the_code_compares_signatures_in_constant_time():
    source = inspect.getsource(webform)
    assert source.count("hmac.compare_digest") >= 3
    # No signature, digest or MAC is ever compared with == / != (timing leak).
    assert not re.search(r"(given|candidate|expected|mac|signature)\w*\s*[!=]=", source)


def _stream(total: int) -> Iterator[bytes]:
    chunk = b"x" * 65536
    for _ in range(total // len(chunk)):
        yield chunk


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_bodies_are_refused_before_they_are_buffered_and_the_server_stays_up(app, db):
    ten_mb = 10 * 1024 * 1024
    headers = {"content-type": "application/json"}
    with live(app) as server:
        url = f"{server.url}{HOOK}"
        before = _peak_rss_mb()
        started = time.monotonic()
        # Declared: refused from Content-Length, before a byte of the body is read.
        declared = httpx.post(
            url, content=_stream(ten_mb), headers={**headers, "content-length": str(ten_mb)}
        )
        # Chunked, no Content-Length: refused once 256 KiB have arrived.
        chunked = httpx.post(url, content=_stream(ten_mb), headers=headers)
        elapsed = time.monotonic() - started
        assert (declared.status_code, chunked.status_code) == (413, 413)
        assert "larger than 262144 bytes" in chunked.json()["error"]
        assert _peak_rss_mb() - before < 8, "the server buffered a body past its limit"
        assert elapsed < 5
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        body = json.dumps(fixture("generic_submission.json")).encode()
        assert httpx.post(url, content=body, headers=signed("generic", body)).status_code == 200
    assert len(inbox_rows(db)) == 1


def test_json_nested_100k_deep_is_400_without_parsing(app, db):
    deep = b'{"fields": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with live(app) as server:
        response = httpx.post(
            f"{server.url}{HOOK}", content=deep, headers=signed("generic", deep), timeout=10
        )
        assert response.status_code == 400
        assert "nested 100001 deep" in response.json()["error"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert inbox_count(db) == 0


@pytest.mark.parametrize("provider", ["generic", "webflow", "hubspot"])
async def test_timestamped_schemes_refuse_stale_deliveries(provider, client, db):
    body = submission()
    url = f"http://crmhub/hooks/forms/{provider}"
    headers = signed(provider, body, url=url, when=time.time() - 301)
    response = await client.post(url, content=body, headers=headers)
    assert response.status_code == 401
    assert "tolerance" in response.json()["error"]
    fresh = signed(provider, body, url=url)
    assert (await client.post(url, content=body, headers=fresh)).status_code == 200
    assert inbox_count(db) == 1
