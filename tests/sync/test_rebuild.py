"""`crmhub rebuild` on both stores: preview, cap, apply, stable ids, constraints, re-mapping."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import Engine, func, inspect, select
from typer.testing import CliRunner

from crmhub.cli.app import app as cli
from crmhub.settings import Settings
from dedupe import ExactMatcher
from sync import rebuild as rebuild_plan
from sync import rebuild_apply, review
from sync.engine import SyncEngine
from sync.golden import recompute_goldens
from sync.queries import resolve_golden_id
from sync.rebuild import BatchStopped, KeyRows, RebuildRefusedError
from sync.rebuild_apply import preview, rebuild
from sync.store import (
    audit_log,
    dead_letter,
    golden_record,
    match_key,
    membership,
    metadata,
    review_item,
    source_record,
    write_transaction,
)
from tests.conftest import make_settings
from tests.steward_data import seed_reviews
from tests.sync.test_key_lookup import _records


def _snapshot(db: Engine) -> dict[str, list[tuple]]:
    with db.connect() as conn:
        return {
            t.name: sorted(map(tuple, conn.execute(select(t)).all()), key=repr)
            for t in metadata.sorted_tables
        }


def _golden_of(db: Engine) -> dict[str, int]:
    """external id -> golden id."""
    with db.connect() as conn:
        rows = conn.execute(
            select(source_record.c.external_id, membership.c.golden_id).join(
                membership, membership.c.record_id == source_record.c.id
            )
        ).all()
    return {str(e): int(g) for e, g in rows}


def _loosen(settings: Settings) -> None:
    """Thresholds under which the Anna/Ann families (review-level pairs) merge."""
    settings.matching.auto_merge = 0.8
    settings.matching.review = 0.5


def _company_from_org(tmp_path) -> str:
    """A mapping override for the csv source: the `org` column becomes the company (the
    shipped mapping keeps it as an attribute)."""
    override = tmp_path / "crm_mapping.toml"
    override.write_text(
        "version = 1\n[contacts]\nexternal_id = 'id'\n[contacts.fields]\n"
        "first_name = 'first_name'\nlast_name = 'last_name'\nemail = 'email'\n"
        "company = 'org'\n",
        encoding="utf-8",
    )
    return str(override)


async def _synced_csv(tmp_path, store_url: str, db: Engine, text: str) -> Settings:
    """Settings with one csv source `crm` holding `text` (tmp_path / "crm.csv"), synced."""
    csv_path = tmp_path / "crm.csv"
    csv_path.write_text(text, encoding="utf-8")
    settings = make_settings(tmp_path, store_url, {"crm": {"type": "csv", "path": str(csv_path)}})
    await _sync(settings, db)
    return settings


async def _sync(settings: Settings, db: Engine, name: str = "crm") -> None:
    engine = SyncEngine(settings, db)
    try:
        await engine.run(name)
    finally:
        engine.close()


async def test_dry_run_and_a_refused_apply_write_nothing_then_yes_applies(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=3)
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(match_key)).scalar_one() > 0
    unchanged = preview(db, settings)
    assert not unchanged.changes_anything
    assert unchanged.clusters == {"kept": 6, "changed": 0, "merged": 0, "new": 0}

    _loosen(settings)
    before = _snapshot(db)
    plan = preview(db, settings)
    assert plan.clusters["merged"] == 3
    assert len(plan.moved) == 3
    assert plan.summary()["per_source"]["crm"]["moved"] == 3
    assert _snapshot(db) == before

    with pytest.raises(RebuildRefusedError, match=r"move 3 of 6 contacts .*--yes"):
        rebuild(db, settings, actor="sam")
    assert _snapshot(db) == before

    applied = rebuild(db, settings, actor="sam", confirm=True)
    assert len(applied.moved) == 3
    with db.connect() as conn:
        # The merged pairs' review items need no steward any more.
        assert set(conn.execute(select(review_item.c.status)).scalars()) == {"merged"}
        entry = conn.execute(select(audit_log)).one()
        assert (entry.actor, entry.action) == ("sam", "rebuild.apply")
        assert entry.details["records_moved"] == 3
        assert "Anna" not in json.dumps(entry.details)  # counts and ids, no personal data
    again = preview(db, settings)
    assert not again.changes_anything  # idempotent: a second rebuild changes nothing
    assert again.clusters["kept"] == 3


async def test_merge_keeps_the_older_id_and_a_split_keeps_the_larger_part(tmp_path, db, store_url):
    settings = await _synced_csv(
        tmp_path,
        store_url,
        db,
        "id,first_name,last_name,email,company,city\n"
        "a,Anna,Keller,anna@keller.example,Keller GmbH,Berlin\n"
        "b,Ann,Keller,a.keller@web.example,Keller GmbH,\n"
        "c,Anna,Keller,anna@keller.example,Keller GmbH,Berlin\n",
    )
    first = _golden_of(db)
    assert first["a"] == first["c"] != first["b"]
    older, younger = sorted({first["a"], first["b"]})

    _loosen(settings)
    rebuild(db, settings, actor="sam", confirm=True)
    merged = _golden_of(db)
    assert set(merged.values()) == {older}  # the older id survives
    with db.connect() as conn:
        assert resolve_golden_id(conn, younger) == older  # the other id still resolves
        alias = conn.execute(select(golden_record).where(golden_record.c.id == younger)).one()
        assert alias.merged_into == older

    settings.matching.auto_merge, settings.matching.review = 0.95, 0.80
    plan = preview(db, settings)
    assert plan.goldens_split == 1
    assert plan.clusters == {"kept": 0, "changed": 1, "merged": 0, "new": 1}
    rebuild(db, settings, actor="sam", confirm=True)
    split = _golden_of(db)
    assert split["a"] == split["c"] == older  # the larger part keeps the id
    assert split["b"] not in (older, younger)  # the part without an id gets a new one
    with db.connect() as conn:
        fields = conn.execute(
            select(golden_record.c.fields).where(golden_record.c.id == split["b"])
        ).scalar_one()
        assert fields["first_name"] == "Ann"
    assert not preview(db, settings).changes_anything


async def test_steward_decisions_survive_a_rebuild(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=2)
    with db.connect() as conn:
        items, _ = review.list_reviews(conn)
    rejected, approved = items[0], items[1]
    review.reject(db, rejected["id"], "sam")
    review.approve(db, approved["id"], "sam")
    before = _golden_of(db)

    _loosen(settings)  # would merge the rejected pair but for the steward
    plan = preview(db, settings)
    assert plan.moved == []
    rebuild(db, settings, actor="sam")
    assert _golden_of(db) == before

    settings.matching.auto_merge, settings.matching.review = 0.999, 0.99
    plan = preview(db, settings)  # would split the approved pair but for the steward
    assert plan.moved == []
    assert plan.reviews == []


async def test_a_changed_mapping_remaps_stored_payloads_on_apply(tmp_path, db, store_url):
    settings = await _synced_csv(
        tmp_path,
        store_url,
        db,
        "id,first_name,last_name,email,org,full_name\n"
        "1,Rosa,Lind,rosa@lind.example,Lind AB,\n"
        "2,Omar,Haddad,omar@haddad.example,Haddad Ltd,\n"
        "3,,,,,Vera Holm\n",
    )
    with db.connect() as conn:
        data = dict(conn.execute(select(source_record.c.external_id, source_record.c.data)).all())
    assert "company" not in data["1"]
    assert data["1"]["attributes"] == {"org": "Lind AB"}

    override = _company_from_org(tmp_path)
    settings = make_settings(
        tmp_path,
        store_url,
        {"crm": {"type": "csv", "path": str(tmp_path / "crm.csv"), "mapping": override}},
    )
    before = _snapshot(db)
    plan = preview(db, settings)
    assert sorted(plan.remapped) != []
    assert [f.external_id for f in plan.failures] == ["3"]  # no name left: rejected
    assert plan.summary()["per_source"]["crm"] == {
        "records": 3,
        "remapped": 2,
        "failed": 1,
        "moved": 0,
    }
    assert _snapshot(db) == before

    rebuild(db, settings, actor="sam")
    with db.connect() as conn:
        data = dict(conn.execute(select(source_record.c.external_id, source_record.c.data)).all())
        assert data["1"]["company"] == "Lind AB"
        assert data["3"]["last_name"] == "Holm"  # kept as staged
        golden = conn.execute(
            select(golden_record.c.fields)
            .join(membership, membership.c.golden_id == golden_record.c.id)
            .join(source_record, source_record.c.id == membership.c.record_id)
            .where(source_record.c.external_id == "2")
        ).scalar_one()
        assert golden["company"] == "Haddad Ltd"
        letter = conn.execute(select(dead_letter)).one()
        assert (letter.source, letter.origin) == ("crm", "rebuild:3")
    assert preview(db, settings).remapped == {}


async def test_the_apply_survives_from_the_plans_data_as_from_the_stored_members(
    tmp_path, db, store_url
):
    """The apply survives golden records from the data the plan read, not from members read
    back: a re-mapping's new data and recency (a zone other than UTC included) must give the
    golden records survivorship of the stored members gives."""
    await _synced_csv(
        tmp_path,
        store_url,
        db,
        "id,first_name,last_name,email,org,modified,optout\n"
        "1,Rob,Lind,rob@lind.example,Lind AB,2026-03-01T10:00:00+02:00,\n"
        "2,Robert,Lind,rob@lind.example,,2026-01-01T09:00:00Z,\n"
        "3,Vera,Holm,vera@holm.example,Holm Oy,2026-02-01T01:00:00+01:00,unsubscribed\n",
    )
    override = tmp_path / "dated.toml"
    override.write_text(
        "version = 1\n[contacts]\nexternal_id = 'id'\nupdated_at = 'modified'\n"
        "[contacts.fields]\nfirst_name = 'first_name'\nlast_name = 'last_name'\n"
        "email = 'email'\ncompany = 'org'\nconsent = 'optout'\n",
        encoding="utf-8",
    )
    settings = make_settings(
        tmp_path,
        store_url,
        {"crm": {"type": "csv", "path": str(tmp_path / "crm.csv"), "mapping": str(override)}},
    )
    rebuild(db, settings, actor="sam")
    query = select(golden_record.c.id, golden_record.c.fields, golden_record.c.lineage).where(
        golden_record.c.merged_into.is_(None)
    )
    with db.connect() as conn:
        applied = {g: (f, lin) for g, f, lin in conn.execute(query)}
        ids = dict(conn.execute(select(source_record.c.external_id, source_record.c.id)).all())
    rob = applied[_golden_of(db)["1"]]
    # record 1 is the most recent now (10:00 at +02:00 is after 2 January)
    assert (rob[0]["first_name"], rob[1]["first_name"]) == ("Rob", ids["1"])
    assert (rob[0]["company"], rob[1]["company"]) == ("Lind AB", ids["1"])
    # an opt-out without a time of its own is dated by the record's change, stored in UTC
    assert applied[_golden_of(db)["3"]][0]["consent_at"] == "2026-02-01T00:00:00+00:00"
    with db.connect() as conn, conn.begin():
        recompute_goldens(conn, set(applied))
        assert {g: (f, lin) for g, f, lin in conn.execute(query)} == applied
        conn.rollback()


async def test_outdated_match_keys_are_reported_and_rewritten(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=2)
    with db.begin() as conn:
        conn.execute(match_key.delete().where(match_key.c.key_kind == "fl"))
        conn.execute(match_key.insert().values(record_id=1, key_kind="sound2", key_value="old-key"))
    plan = preview(db, settings)
    assert plan.keys_outdated == 4
    assert plan.moved == []
    rebuild(db, settings, actor="sam")
    with db.connect() as conn:
        kinds = set(conn.execute(select(match_key.c.key_kind)).scalars())
    assert "fl" in kinds
    assert "sound2" not in kinds
    assert preview(db, settings).keys_outdated == 0


async def test_cli_dry_run_refusal_and_yes(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=2)
    config = tmp_path / "crmhub.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\n[matching]\nauto_merge = 0.8\nreview = 0.5\n'
        f'[connectors.crm]\ntype = "csv"\npath = "{tmp_path / "crm.csv"}"\n',
        encoding="utf-8",
    )
    runner = CliRunner()
    base = ["--config", str(config), "rebuild"]
    shown = runner.invoke(cli, [*base, "--dry-run", "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert (report["records_moved"], report["applied"]) == (2, False)

    table = runner.invoke(cli, [*base, "--dry-run"])
    assert "records moved" in table.output
    assert "dry run: nothing written" in table.output

    refused = runner.invoke(cli, [*base, "--json"])
    assert refused.exit_code == 5
    assert json.loads(refused.output)["applied"] is False

    applied = runner.invoke(cli, [*base, "--yes", "--json", "--as", "sam"])
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.output)["applied"] is True
    after = json.loads(runner.invoke(cli, [*base, "--dry-run", "--json"]).output)
    assert after["records_moved"] == 0


async def test_a_plan_read_in_small_chunks_equals_one_read_at_once(
    tmp_path, db, store_url, monkeypatch
):
    """The plan streams the stored records (re-mapped, prepared, payloads dropped) chunk by
    chunk; chunks that cut through sources change nothing in it."""
    crm = tmp_path / "crm.csv"
    crm.write_text(
        "id,first_name,last_name,email,org,full_name\n"
        "1,Anna,Keller,anna@keller.example,Keller GmbH,\n"
        "2,Omar,Haddad,omar@haddad.example,Haddad Ltd,\n"
        "3,,,,,Vera Holm\n"
        "4,Ann,Keller,a.keller@web.example,Keller GmbH,\n"
        "5,Rosa,Lind,rosa@lind.example,Lind AB,\n",
        encoding="utf-8",
    )
    shop = tmp_path / "shop.csv"
    shop.write_text(
        "id,first_name,last_name,email,company\n"
        "s1,Anna,Keller,anna@keller.example,Keller GmbH\n"
        "s2,Rosa,Lind,rosa.lind@mail.example,Lind AB\n"
        "s3,Omar,Hadad,omar@haddad.example,\n",
        encoding="utf-8",
    )
    sources = {"crm": {"type": "csv", "path": str(crm)}, "shop": {"type": "csv", "path": str(shop)}}
    settings = make_settings(tmp_path, store_url, sources)
    await _sync(settings, db, "shop")
    await _sync(settings, db, "crm")
    override = _company_from_org(tmp_path)
    sources["crm"]["mapping"] = override
    settings = make_settings(tmp_path, store_url, sources)
    _loosen(settings)

    whole = preview(db, settings)
    # a plan with something in it
    assert whole.remapped
    assert whole.failures
    assert whole.moved
    monkeypatch.setattr(rebuild_plan, "CHUNK_ROWS", 2)
    chunked = preview(db, settings)
    assert chunked.summary() == whole.summary()
    assert (chunked.target, chunked.current, chunked.remapped) == (
        whole.target,
        whole.current,
        whole.remapped,
    )
    assert list(chunked.keys.items()) == list(whole.keys.items())
    assert [r[:3] for r in chunked.reviews] == [r[:3] for r in whole.reviews]
    assert [(f.record_id, f.reason) for f in chunked.failures] == [
        (f.record_id, f.reason) for f in whole.failures
    ]


async def test_a_large_rebuild_builds_the_lookup_index_again(tmp_path, db, store_url, monkeypatch):
    """From REINDEX_FROM_CONTACTS contacts the match_key lookup index is dropped for the bulk
    insert and created again in the same transaction: same rows, same index afterwards."""
    settings = await seed_reviews(tmp_path, store_url, db, count=2)
    with db.connect() as conn:
        before = sorted(map(tuple, conn.execute(select(match_key)).all()))
    monkeypatch.setattr(rebuild_apply, "REINDEX_FROM_CONTACTS", 1)
    with db.begin() as conn:  # outdated keys, so that the apply rewrites them
        conn.execute(match_key.delete().where(match_key.c.key_kind == "fl"))
    rebuild(db, settings, actor="sam")
    with db.connect() as conn:
        after = sorted(map(tuple, conn.execute(select(match_key)).all()))
        indexes = {i["name"]: i["column_names"] for i in inspect(conn).get_indexes("match_key")}
    assert after == before
    assert indexes["ix_match_key_lookup"] == ["key_kind", "key_value"]


async def test_rewritten_match_keys_keep_apostrophes_and_accents(tmp_path, db, store_url):
    """The batch writes match_key rows as JSON on SQLite (`KeyRows.json_slices`): values with
    apostrophes (a valid address `o'brien@...`) and whatever the name folding leaves come
    back exactly as the incremental path stored them."""
    settings = await _synced_csv(
        tmp_path,
        store_url,
        db,
        "id,first_name,last_name,email,company\n"
        'a,Zoë,O\'Brien,o\'brien.zoe@example.com,"Quoted ""Name"" GmbH"\n'
        "b,Jürgen,Müller-Lüdenscheidt,j.mueller@example.de,Bäckerei Ünal\n"
        "c,Иван,Петров,ivan@example.ru,\n",
    )
    with db.connect() as conn:
        before = sorted(map(tuple, conn.execute(select(match_key)).all()))
    assert any("'" in row[2] for row in before)  # the address's apostrophe is in a key
    with db.begin() as conn:
        conn.execute(match_key.delete().where(match_key.c.key_kind == "fl"))
    rebuild(db, settings, actor="sam")
    with db.connect() as conn:
        after = sorted(map(tuple, conn.execute(select(match_key)).all()))
    assert after == before


async def test_switching_to_the_exact_matcher_reclusters_by_shared_identifiers(
    tmp_path, db, store_url
):
    """`method = "exact"`: records sharing an email key or phone become one golden record,
    a shared name alone does not; the match keys become the exact matcher's."""
    settings = await _synced_csv(
        tmp_path,
        store_url,
        db,
        "id,first_name,last_name,email,phone\n"
        "a,Anna,Keller,anna@keller.example,\n"
        "b,Annie,Kellerman,ANNA@keller.example,+49 30 1234567\n"
        "c,Bert,Ohm,,+49 30 1234567\n"
        "d,Anna,Keller,anna.k@other.example,\n",
    )
    settings.matching.method = "exact"
    plan = preview(db, settings)
    assert plan.matcher == ExactMatcher().version
    assert plan.keys_outdated == 4  # probabilistic keys stored, exact ones wanted
    rebuild(db, settings, actor="sam", confirm=True)
    golden = _golden_of(db)
    assert golden["a"] == golden["b"] == golden["c"] != golden["d"]
    with db.connect() as conn:
        kinds = set(conn.execute(select(match_key.c.key_kind)).scalars())
    assert kinds <= {"email", "phone"}
    assert not preview(db, settings).changes_anything


class _SetAfter(threading.Event):
    """An event that reads as set from its `looks`+1-th look on."""

    def __init__(self, looks: int) -> None:
        super().__init__()
        self.looks = looks

    def is_set(self) -> bool:
        self.looks -= 1
        return self.looks < 0


def test_a_stopped_key_writer_ends_after_its_slice_and_its_rows_roll_back(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's match_key writer runs beside the clustering; asked to stop, it ends after
    the slice in hand instead of writing millions of rows first."""
    monkeypatch.setattr(rebuild_apply, "ROWS_PER_INSERT", 4)
    before, after = KeyRows(), KeyRows()
    for rid in range(1, 21):
        before.add(rid, [("email", f"p{rid}@x.com")])
        after.add(rid, [("email", f"new{rid}@x.com"), ("phone", f"+155501{rid:05}")])
    with write_transaction(db) as conn:
        _records(conn, list(range(1, 21)))
        rebuild_apply.write_keys(conn, before)
    stop = _SetAfter(looks=2)  # 40 rows in slices of 4: stops before the third slice
    with pytest.raises(BatchStopped), write_transaction(db) as conn:
        rebuild_apply.write_keys(conn, after, stop)
    assert stop.looks == -1
    with db.connect() as conn:
        values = conn.execute(select(match_key.c.key_value)).scalars().all()
    assert sorted(values) == sorted(f"p{rid}@x.com" for rid in range(1, 21))
