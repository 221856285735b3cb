"""POST /f/{form}: plain HTML forms, urlencoded and multipart, with their guards; and the
snippet `crmhub forms snippet` prints."""

from __future__ import annotations

import asyncio
import re

import pytest
from typer.testing import CliRunner

from crmhub.cli.app import app as cli
from crmhub.errors import ConfigError
from sync.sources import load_source
from tests.conftest import make_settings
from tests.web.conftest import activities, connectors, golden_of, inbox_count, records

ORIGIN = {"origin": "https://www.example.com"}


async def test_urlencoded_post_redirects_and_creates_contact_and_activity(client, db):
    response = await client.post(
        "/f/contact",
        data={"name": "Mia Wong", "email": "Mia@Wong.example", "message": "Call me"},
        headers=ORIGIN,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "https://www.example.com/thanks"
    (contact,) = records(db, "contact", "contact")
    golden = golden_of(db, contact["id"])
    assert golden is not None
    assert golden["emails"] == ["mia@wong.example"]
    (act,) = activities(db, "contact")
    assert act["type"] == "form_submission"
    assert act["data"]["excerpt"] == "Call me"


async def test_multipart_post_is_accepted_but_files_are_refused(client, db):
    response = await client.post(
        "/f/contact",
        files={"email": (None, "lu@example.com"), "name": (None, "Lu Chen")},
        headers=ORIGIN,
    )
    assert response.status_code == 303
    assert len(records(db, "contact", "contact")) == 1
    upload = await client.post(
        "/f/contact", files={"cv": ("cv.pdf", b"%PDF-1.4", "application/pdf")}, headers=ORIGIN
    )
    assert upload.status_code == 400
    assert inbox_count(db) == 1


async def test_honeypot_spam_gets_the_same_redirect_and_is_not_stored(client, db):
    response = await client.post(
        "/f/contact",
        data={"name": "Bot", "email": "bot@spam.example", "website_url": "http://spam.example"},
        headers=ORIGIN,
    )
    assert response.status_code == 303
    assert inbox_count(db) == 0
    assert records(db, "contact", "contact") == []


async def test_foreign_or_missing_origin_is_403(client, db):
    foreign = await client.post(
        "/f/contact", data={"email": "x@y.example"}, headers={"origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    missing = await client.post("/f/contact", data={"email": "x@y.example"})
    assert missing.status_code == 403
    referer = await client.post(
        "/f/contact",
        data={"email": "x@y.example"},
        headers={"referer": "https://www.example.com/contact?x=1"},
    )
    assert referer.status_code == 303
    assert inbox_count(db) == 1


async def test_burst_from_one_ip_is_429_and_what_was_accepted_is_kept(client, db):
    answers = await asyncio.gather(
        *[
            client.post("/f/contact", data={"email": f"p{i}@burst.example"}, headers=ORIGIN)
            for i in range(12)
        ]
    )
    codes = sorted(r.status_code for r in answers)
    assert codes.count(303) == 5  # rate_limit = 5 per minute in the test config
    assert codes.count(429) == 7
    limited = next(r for r in answers if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert len(records(db, "contact", "contact")) == 5


async def test_wrong_content_type_oversized_and_unknown_form(client, db):
    as_json = await client.post("/f/contact", json={"email": "a@b.example"}, headers=ORIGIN)
    assert as_json.status_code == 415
    huge = await client.post("/f/contact", data={"message": "x" * 70_000}, headers=ORIGIN)
    assert huge.status_code == 413
    unknown = await client.post("/f/nope", data={"email": "a@b.example"}, headers=ORIGIN)
    assert unknown.status_code == 404
    not_hosted = await client.post("/f/generic", data={"email": "a@b.example"}, headers=ORIGIN)
    assert not_hosted.status_code == 404
    assert inbox_count(db) == 0


def _write_config(tmp_path, store_url: str) -> str:
    path = tmp_path / "crmhub.toml"
    path.write_text(
        f'[store]\nurl = "{store_url}"\n'
        '[connectors.contact]\ntype = "webform"\nhosted = true\n'
        'form_fields = ["name", "email", "company", "message"]\n'
        '[connectors.signed]\ntype = "webform"\nsecret = "${FORMS_SECRET}"\n'
    )
    return str(path)


async def test_snippet_posts_a_working_form(tmp_path, sqlite_url, app, client, db, monkeypatch):
    monkeypatch.setenv("FORMS_SECRET", "s3cret")
    config = _write_config(tmp_path, sqlite_url)
    result = CliRunner().invoke(
        cli, ["--config", config, "forms", "snippet", "contact", "--base-url", "http://crmhub/"]
    )
    assert result.exit_code == 0, result.output
    html = result.output
    assert 'action="http://crmhub/f/contact"' in html
    assert 'name="website_url"' in html  # the honeypot
    assert 'type="email" name="email"' in html
    names = re.findall(r'name="([^"]+)"', html)
    assert names == ["name", "email", "company", "message", "website_url"]
    # Submit it as a browser would: every field, honeypot left empty.
    data = dict.fromkeys(names, "") | {"name": "Eva Stone", "email": "eva@stone.example"}
    response = await client.post("/f/contact", data=data, headers=ORIGIN)
    assert response.status_code == 303
    assert len(records(db, "contact", "contact")) == 1
    refused = CliRunner().invoke(cli, ["--config", config, "forms", "snippet", "signed"])
    assert refused.exit_code == 1
    assert "hosted = true" in refused.output


async def test_fifty_thousand_fields_are_413_and_a_thousand_are_400(client, db):
    many = "&".join(f"f{i}=1" for i in range(50_000))
    form = {**ORIGIN, "content-type": "application/x-www-form-urlencoded"}
    assert (await client.post("/f/contact", content=many, headers=form)).status_code == 413
    fields = "&".join(f"f{i}=" for i in range(1_000))  # 7 KB: under the size limit
    response = await client.post("/f/contact", content=fields, headers=form)
    assert response.status_code == 400
    assert "Too many fields" in response.json()["error"]
    assert inbox_count(db) == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("thank_you_url", "javascript:alert(1)"),
        ("thank_you_url", "file:///etc/passwd"),
        ("public_url", "/hooks/forms/contact"),
        ("allowed_origins", ["https://www.example.com/contact"]),
        ("allowed_origins", ["www.example.com"]),
    ],
)
def test_urls_in_a_webform_config_are_checked_when_it_loads(tmp_path, sqlite_url, key, value):
    tables = connectors()
    tables["contact"][key] = value
    settings = make_settings(tmp_path, sqlite_url, tables)
    with pytest.raises(ConfigError) as raised:
        load_source(settings, "contact")
    assert f"connectors.contact.{key}" in str(raised.value)
