"""Blank-overwrite incidents: a source re-sends a contact without a value it had before.

End to end with a real CSV connector on both stores: sync, blank one row's company and remove
another row's only email, sync again; the incidents name the right records and fields, nothing
for unchanged rows, nothing more on a replay, and no personal data in the table.
"""

from __future__ import annotations

from sqlalchemy import Engine, select

from sync.blanks import lost_fields
from sync.engine import SyncEngine
from sync.quality import blank_incidents, blank_summary, source_quality
from sync.store import blank_overwrite, source_record, sync_run
from tests.blanks_data import blank_settings, write_blanked


def incidents(db: Engine) -> list[dict]:
    with db.connect() as conn:
        rows = conn.execute(select(blank_overwrite).order_by(blank_overwrite.c.id)).mappings()
        return [dict(r) for r in rows]


async def test_a_blank_over_a_value_is_an_incident(tmp_path, store_url, db):
    settings = blank_settings(tmp_path, store_url)
    leads = tmp_path / "leads.csv"
    engine = SyncEngine(settings, db)
    try:
        await engine.run("crm")
        await engine.run("leads")
        assert incidents(db) == []  # new records lose nothing
        with db.connect() as conn:
            before = {
                r.external_id: dict(r.data)
                for r in conn.execute(select(source_record.c.external_id, source_record.c.data))
            }
        write_blanked(leads)
        second = await engine.run("leads")
        run_id = second.run_id
        assert (second.counts.changed, second.counts.unchanged) == (2, 1)  # Cleo: unchanged
        found = incidents(db)
        assert sorted((r["external_id"], r["field"]) for r in found) == [
            ("L-1", "company"),
            ("L-2", "emails"),
        ]
        assert {r["source"] for r in found} == {"leads"}
        assert {r["run_id"] for r in found} == {run_id}
        # Ids and field names only: none of the lost (or any other) values is stored.
        assert set(found[0]) == {
            "id", "source", "record_id", "external_id", "field", "run_id", "detected_at",
        }  # fmt: skip
        values = {
            str(v) for data in before.values() for v in data.values() if v not in (None, "", [])
        }
        values |= {e for data in before.values() for e in data.get("emails") or []}
        stored = {str(v) for r in found for v in r.values()}
        assert not stored & values

        # A replay of the same file, and a re-run, record nothing more.
        leads.write_text(leads.read_text(encoding="utf-8"), encoding="utf-8")
        await engine.run("leads", full=True)
        assert len(incidents(db)) == 2
        with db.connect() as conn:
            states = dict(conn.execute(select(sync_run.c.id, sync_run.c.state)).all())
            assert states[run_id] == "succeeded"
            items, total = blank_incidents(conn, "leads")
            summary = blank_summary(conn)
            quality = {q["source"]: q for q in source_quality(conn)}
    finally:
        engine.close()
    assert total == 2
    by_record = {i["external_id"]: i for i in items}
    # Anna's golden record still has her company (from crm); Ben's has no email left.
    assert by_record["L-1"]["golden_has_value"] is True
    assert by_record["L-2"]["golden_has_value"] is False
    assert all(i["golden_id"] for i in items)
    assert summary["leads"]["total"] == summary["leads"]["last_30_days"] == 2
    assert {f["field"] for f in summary["leads"]["fields"]} == {"company", "emails"}
    assert "crm" not in summary
    assert quality["leads"]["blank_overwrites"]["total"] == 2
    assert quality["crm"]["blank_overwrites"] == {"total": 0, "last_30_days": 0, "fields": []}


def test_what_counts_as_a_lost_value():
    old = {
        "first_name": "Anna",
        "company": "Keller",
        "city": "Berlin",
        "emails": ["a@example.org", "b@example.org"],
        "phones": ["+4930123"],
        "consent": "subscribed",
        "attributes": {"tier": "gold"},
    }
    new = {
        "first_name": "Anna",
        "company": "  ",  # whitespace is no value
        "emails": ["a@example.org"],  # one of two left: an edit, not a blank
        "phones": [],
        "consent": "unknown",  # a state, not a value
        "attributes": {},  # not a contact field
    }
    assert lost_fields(old, new) == ["company", "city", "phones"]
    assert lost_fields(None, new) == []
    assert lost_fields(old, old) == []
