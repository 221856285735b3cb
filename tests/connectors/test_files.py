"""The file connectors: csv, jsonl, mailbox. Bad input is reported, never fatal."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from connectors import ConnectorContext, get_connector_class
from crmhub.errors import PermanentError
from crmhub.records import Page
from tests.conftest import SAMPLES


def make(kind: str, tmp_path: Path, **config):
    cls = get_connector_class(kind)
    return cls(cls.Config(type=kind, **config), ConnectorContext("t", tmp_path))


async def pull_all(connector, stream: str, cursor=None) -> list[Page]:
    return [page async for page in connector.pull(stream, cursor)]


async def records(connector, stream="contacts", cursor=None):
    pages = await pull_all(connector, stream, cursor)
    return [r for p in pages for r in p.records], [x for p in pages for x in p.rejects], pages


async def test_csv_semicolons_bom_quoted_newlines(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(codecs.BOM_UTF8 + b'id;name;note\n1;"Ann";"two\nlines"\n2;Bo;x\n')
    rows, rejects, _ = await records(make("csv", tmp_path, path="export.csv"))
    assert rejects == []
    assert [r.payload for r in rows] == [
        {"id": "1", "name": "Ann", "note": "two\nlines"},
        {"id": "2", "name": "Bo", "note": "x"},
    ]


async def test_csv_in_a_legacy_encoding_is_detected(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("id,first_name,city\n1,Zoë,Düsseldorf\n2,José,Málaga\n".encode("cp1252"))
    rows, _, _ = await records(make("csv", tmp_path, path="latin.csv"))
    assert [r.payload["city"] for r in rows] == ["Düsseldorf", "Málaga"]


async def test_csv_malformed_rows_are_rejected_with_their_line(tmp_path):
    (tmp_path / "m.csv").write_text(
        "id,email\n1,a@x.com\n2,b@x.com,extra\n\n3,c@x.com\n", encoding="utf-8"
    )
    rows, rejects, _ = await records(make("csv", tmp_path, path="m.csv"))
    assert [r.payload["id"] for r in rows] == ["1", "3"]
    assert rejects == [("m.csv:3", "row has 3 fields, the header has 2", "2,b@x.com,extra")]


async def test_csv_empty_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    rows, rejects, _ = await records(make("csv", tmp_path, path="empty.csv"))
    assert rows == []
    assert rejects == [("empty.csv", "file is empty: no header row", "")]


async def test_missing_file_names_the_config_key(tmp_path):
    connector = make("csv", tmp_path, path="data/leads.csv")
    with pytest.raises(PermanentError, match=r"'data/leads.csv' matches no file.*\[connectors.t\]"):
        await pull_all(connector, "contacts")
    with pytest.raises(PermanentError):
        await connector.check()


async def test_csv_rerun_reads_nothing_and_a_rewrite_is_read_again(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("id,email\n1,a@x.com\n2,b@x.com\n", encoding="utf-8")
    connector = make("csv", tmp_path, path="l.csv")
    _, _, pages = await records(connector)
    cursor = pages[-1].next_cursor
    again, _, _ = await records(connector, cursor=cursor)
    assert again == []
    path.write_text("id,email\n1,a@x.com\n2,CHANGED@x.com\n", encoding="utf-8")
    rewritten, _, _ = await records(connector, cursor=cursor)
    assert [r.payload["id"] for r in rewritten] == ["1", "2"]


async def test_jsonl_bad_lines_are_rejected_and_submissions_yield_both_kinds(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"a": 1}\n[1, 2]\n{oops\n\n{"a": 2}\n', encoding="utf-8")
    rows, rejects, _ = await records(make("jsonl", tmp_path, path="f.jsonl"), "activities")
    assert [(r.kind, r.payload["a"]) for r in rows] == [
        ("contact", 1),
        ("activity", 1),
        ("contact", 2),
        ("activity", 2),
    ]
    assert [(o, reason.split(":")[0]) for o, reason, _ in rejects] == [
        ("f.jsonl:2", "expected a JSON object, got list"),
        ("f.jsonl:3", "invalid JSON"),
    ]


async def test_mailbox_headers_participants_and_filters():
    connector = make(
        "mailbox",
        SAMPLES,
        path="mail",
        owner=["alex@crmhub-demo.example"],
        internal_domains=["crmhub-demo.example"],
    )
    rows, rejects, _ = await records(connector, "activities")
    assert rejects == []
    contacts = {r.external_id: r.payload["name"] for r in rows if r.kind == "contact"}
    activities = {r.external_id: r.payload for r in rows if r.kind == "activity"}
    assert contacts["maria.garcia@gmail.com"] == "María García"  # RFC 2047, utf-8
    assert contacts["chloe.dubois@lumiere.fr"] == "Chloé Dubois"  # RFC 2047, latin-1
    assert "h.mueller@bergwerk.de" in contacts  # unknown charset: still readable
    assert contacts["tom.becker@alpenblick.at"] == "Becker, Tom"  # from the mbox
    assert not any(a.endswith("crmhub-demo.example") for a in contacts)  # owner, colleagues
    assert "no-reply@mailer.example.net" not in contacts  # automated sender
    assert activities["9a8b7c@lumiere.fr"]["subject"] == "Proposition commerciale – Lumière"
    assert activities["9a8b7c@lumiere.fr"]["excerpt"].startswith("Bonjour Alex, Voici notre")
    assert "color:red" not in activities["9a8b7c@lumiere.fr"]["excerpt"]
    reply = activities["reply-2001@crmhub-demo.example"]
    assert reply["thread_id"] == "CAF1001@mail.gmail.com"
    assert "Could we do a demo" not in reply["excerpt"]  # quoted text left out
    assert activities["news-555@mailer.example.net"]["automated"] is True
    assert len(activities) == 8


async def test_message_without_id_gets_a_stable_one(tmp_path):
    raw = (
        b"From: A <a@x.com>\r\nTo: b@y.com\r\nSubject: hi\r\n"
        b"Date: Mon, 5 Oct 2026 08:00:00 +0000\r\n\r\nbody"
    )
    (tmp_path / "a.eml").write_bytes(raw)
    (tmp_path / "b.eml").write_bytes(raw)
    rows, _, _ = await records(make("mailbox", tmp_path, path="."), "activities")
    ids = {r.external_id for r in rows if r.kind == "activity"}
    assert len(ids) == 1
    assert next(iter(ids)).startswith("sha:")
