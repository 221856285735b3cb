"""The pipeline end to end on both stores: pull -> map -> stage -> match -> merge -> checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

import sync.engine
from connectors.csv import CsvConnector
from crmhub.records import Contact
from dedupe import Decision, MatchKey
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.queries import golden_detail, iter_xref, search_golden, store_totals
from sync.store import (
    connector_state,
    dead_letter,
    golden_record,
    make_engine,
    membership,
    review_item,
    source_record,
    sync_run,
)
from tests.conftest import SAMPLES, make_settings


def demo_connectors(root: Path) -> dict[str, dict]:
    return {
        "leads": {"type": "csv", "path": str(root / "leads.csv")},
        "mail": {
            "type": "mailbox",
            "path": str(root / "mail"),
            "owner": ["alex@crmhub-demo.example"],
            "internal_domains": ["crmhub-demo.example"],
        },
        "webforms": {"type": "jsonl", "path": str(root / "forms.jsonl")},
    }


async def sync_all(engine: SyncEngine, full: bool = False) -> dict[str, dict]:
    results = {}
    for name in engine.settings.connectors:
        result = await engine.run(name, full=full)
        results[name] = result.as_dict()["counts"]
    return results


def snapshot(db: Engine) -> dict:
    """Everything a user can observe about the store's people, ignoring timestamps."""
    with db.connect() as conn:
        goldens = {
            r.id: (r.fields, r.merged_into)
            for r in conn.execute(
                select(golden_record.c.id, golden_record.c.fields, golden_record.c.merged_into)
            )
        }
        records = sorted(
            conn.execute(
                select(
                    source_record.c.source,
                    source_record.c.kind,
                    source_record.c.external_id,
                    source_record.c.content_hash,
                )
            )
        )
        return {"goldens": goldens, "records": records, "xref": sorted(iter_xref(conn))}


async def test_demo_sources_merge_people_across_sources(tmp_path, db, store_url):
    engine = SyncEngine(make_settings(tmp_path, store_url, demo_connectors(SAMPLES)), db)
    counts = await sync_all(engine)

    assert counts["leads"]["new"] == 23
    assert counts["leads"]["dead_letters"] == 2  # a short row and a row with no identity
    assert counts["leads"]["field_issues"] == 3  # bad email, bad phone, bad birth date
    assert counts["webforms"]["dead_letters"] == 1  # the line that is not JSON
    with db.connect() as conn:
        totals = store_totals(conn)
        bob = search_golden(conn, "bob.smith@gmail.com")
        assert len(bob) == 1
        detail = golden_detail(conn, bob[0]["id"])
    assert detail is not None
    # Lead L-1021, the mail participant and the web form share bob.smith@gmail.com; lead
    # L-1001 (Robert Smith at Acme Corp) has the form's phone, company and a nickname of its
    # name: one person, as the Bob/Robert Smith example wants.
    sources = sorted((m["source"], m["external_id"]) for m in detail["members"])
    assert sources == [
        ("leads", "L-1001"),
        ("leads", "L-1021"),
        ("mail", "bob.smith@gmail.com"),
        ("webforms", "F-9001"),
    ]
    assert detail["fields"]["phones"] == ["+14155550132"]
    assert detail["lineage"]["company"]["external_id"] == "F-9001"
    assert {t["type"] for t in detail["timeline"]} == {"email", "form_submission"}
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(review_item)).scalar_one() == 0
    # Two different James Smiths stay apart.
    with db.connect() as conn:
        assert len(search_golden(conn, "james smith")) == 2
    assert totals["golden_records"] == 24
    assert totals["open_reviews"] == 0
    assert totals["contacts"] == 39


async def test_rerun_is_a_no_op(tmp_path, db, store_url):
    engine = SyncEngine(make_settings(tmp_path, store_url, demo_connectors(SAMPLES)), db)
    await sync_all(engine)
    before = snapshot(db)
    again = await sync_all(engine)
    assert all(c["pulled"] == 0 for c in again.values())
    forced = await sync_all(engine, full=True)
    assert all(c["new"] == 0 and c["changed"] == 0 for c in forced.values())
    assert forced["leads"]["unchanged"] == 23
    assert snapshot(db) == before


async def test_changed_row_updates_the_golden_record_and_its_lineage(tmp_path, db, store_url):
    src = tmp_path / "leads.csv"
    src.write_text(
        "id,email,first_name,last_name,company\n"
        "1,ann@example.com,Ann,Lee,Old Co\n2,bo@example.com,Bo,Ng,Other\n",
        encoding="utf-8",
    )
    engine = SyncEngine(
        make_settings(tmp_path, store_url, {"crm": {"type": "csv", "path": str(src)}}), db
    )
    await engine.run("crm")
    src.write_text(
        "id,email,first_name,last_name,company\n"
        "1,ann@example.com,Ann,Lee,New Co\n2,bo@example.com,Bo,Ng,Other\n",
        encoding="utf-8",
    )
    result = await engine.run("crm")
    assert (result.counts.changed, result.counts.unchanged, result.counts.new) == (1, 1, 0)
    with db.connect() as conn:
        [ann] = search_golden(conn, "ann@example.com")
        assert ann["company"] == "New Co"
        assert golden_detail(conn, ann["id"])["version"] == 2


async def test_new_record_bridging_two_goldens_merges_them_and_old_id_resolves(
    tmp_path, db, store_url
):
    src = tmp_path / "a.csv"
    src.write_text(
        "id,first_name,last_name,email,phone\n1,Ann,Lee,x@example.com,\n2,Ann,Lee,,+14155550100\n",
        encoding="utf-8",
    )
    engine = SyncEngine(
        make_settings(tmp_path, store_url, {"a": {"type": "csv", "path": str(src)}}), db
    )
    await engine.run("a")
    with db.connect() as conn:
        assert store_totals(conn)["golden_records"] == 2
    with src.open("a", encoding="utf-8") as fh:
        fh.write("3,Ann,Lee,x@example.com,+1 415 555 0100\n")
    result = await engine.run("a")
    assert result.counts.goldens_merged == 1
    with db.connect() as conn:
        assert store_totals(conn)["golden_records"] == 1
        merged_away = conn.execute(
            select(golden_record.c.id).where(golden_record.c.merged_into.is_not(None))
        ).scalar_one()
        detail = golden_detail(conn, merged_away)
    assert detail["id"] != merged_away
    assert len(detail["members"]) == 3


async def test_bad_records_are_dead_lettered_and_the_run_goes_on(tmp_path, db, store_url):
    src = tmp_path / "bad.csv"
    src.write_text(
        "id,email,phone,birth_date,first_name\n"
        "1,good@example.com,,1990-01-02,Good\n"
        "2,not-an-email,,,Kept\n"  # kept: the name identifies it; the email is dropped
        "3,,,,\n"  # no identity at all
        "4,x@example.com,1,2\n"  # too few fields
        "5,late@example.com,,31/12/1990,Late\n",  # bad date dropped, record kept
        encoding="utf-8",
    )
    engine = SyncEngine(
        make_settings(tmp_path, store_url, {"bad": {"type": "csv", "path": str(src)}}), db
    )
    result = await engine.run("bad")
    assert result.state == "succeeded"
    assert result.counts.new == 3
    assert result.counts.dead_letters == 2
    with db.connect() as conn:
        letters = conn.execute(
            select(
                dead_letter.c.scope, dead_letter.c.origin, dead_letter.c.field, dead_letter.c.reason
            ).order_by(dead_letter.c.origin)
        ).all()
    reasons = {(r.scope, r.origin, r.field): r.reason for r in letters}
    assert "no identity" in reasons[("record", "bad.csv:4", None)]
    assert "has 4 fields, the header has 5" in reasons[("record", "bad.csv:5", None)]
    assert "not a valid email" in reasons[("field", "bad.csv:3", "email")]
    assert "31/12/1990" in reasons[("field", "bad.csv:6", "birth_date")]


async def test_missing_file_fails_the_run_with_a_clear_message(tmp_path, db, store_url):
    engine = SyncEngine(
        make_settings(tmp_path, store_url, {"gone": {"type": "csv", "path": "nope/*.csv"}}), db
    )
    with pytest.raises(Exception, match=r"matches no file.*\[connectors\.gone\]"):
        await engine.run("gone")
    with db.connect() as conn:
        state, error = conn.execute(select(sync_run.c.state, sync_run.c.error)).one()
    assert state == "failed"
    assert "matches no file" in error


async def test_cursor_commits_with_its_page(tmp_path, db, store_url):
    """The stored cursor never runs ahead of the committed records."""
    src = tmp_path / "many.csv"
    rows = "".join(f"{i},p{i}@example.com\n" for i in range(1, 251))
    src.write_text("id,email\n" + rows, encoding="utf-8")
    cfg = {"many": {"type": "csv", "path": str(src), "page_size": 100}}
    engine = SyncEngine(make_settings(tmp_path, store_url, cfg), db)
    seen = []

    def fail_after_two_pages(report):
        seen.append(report.counts.pulled)
        if len(seen) == 2:
            raise KeyboardInterrupt  # the process dies after page 2 committed

    with pytest.raises(KeyboardInterrupt):
        await engine.run("many", progress=fail_after_two_pages)
    with db.connect() as conn:
        staged = conn.execute(select(func.count()).select_from(source_record)).scalar_one()
        cursor = conn.execute(select(connector_state.c.cursor)).scalar_one()
        run_state = conn.execute(select(sync_run.c.state)).scalar_one()
    assert staged == 200
    assert cursor["files"][str(src)]["pos"] == 200
    assert run_state == "interrupted"
    result = await engine.run("many")
    assert (result.counts.pulled, result.counts.new) == (50, 50)


def _csv_in_pages(
    tmp_path: Path, db: Engine, store_url: str, name: str, rows: int
) -> tuple[SyncEngine, Path]:
    """An engine with connector `name`: a CSV of `rows` contacts read 10 rows a page."""
    src = tmp_path / f"{name}.csv"
    src.write_text(
        "id,email\n" + "".join(f"{i},p{i}@example.com\n" for i in range(1, rows + 1)),
        encoding="utf-8",
    )
    cfg = {name: {"type": "csv", "path": str(src), "page_size": 10}}
    return SyncEngine(make_settings(tmp_path, store_url, cfg), db), src


async def test_small_pages_are_written_together_with_the_last_cursor(
    tmp_path, db, store_url, monkeypatch
):
    """Pages pulled ahead of the writer share a transaction (for connectors whose pages the
    vendor sizes); the cursor stored with them is the last one's, so an interruption still
    leaves cursor and records in step."""
    monkeypatch.setattr(CsvConnector, "joins_pages", True)  # as HTTP connectors do
    engine, src = _csv_in_pages(tmp_path, db, store_url, "small", 3000)
    reports = []

    def stop_after_first_write(report):
        reports.append(report.counts.pulled)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await engine.run("small", progress=stop_after_first_write)
    with db.connect() as conn:
        staged = conn.execute(select(func.count()).select_from(source_record)).scalar_one()
        cursor = conn.execute(select(connector_state.c.cursor)).scalar_one()
    assert 10 < reports[0] < 3000  # several pages, at most a WRITE_BATCH's worth
    assert cursor["files"][str(src)]["pos"] == staged == reports[0]
    result = await engine.run("small", progress=reports.append)
    assert (result.counts.pulled, result.counts.new) == (3000 - staged, 3000 - staged)
    assert len(reports) - 1 < (3000 - staged) // 10  # fewer writes than pages


async def test_pages_are_pulled_ahead_of_the_writer_within_bounds(
    tmp_path, db, store_url, monkeypatch
):
    """Big pages: the next PAGES_AHEAD pages are pulled (and mapped) while one is written,
    even past READ_AHEAD records, so the mapping helper never waits for a page to be read
    and sent; and no more than that, so memory stays bounded."""
    monkeypatch.setattr(sync.engine, "READ_AHEAD", 1)  # every page is "big"
    pull = CsvConnector.pull
    pulled = 0

    async def counted(self, stream, cursor):
        nonlocal pulled
        async for page in pull(self, stream, cursor):
            pulled += 1
            yield page

    monkeypatch.setattr(CsvConnector, "pull", counted)
    engine, _ = _csv_in_pages(tmp_path, db, store_url, "pages", 200)
    ahead: list[int] = []
    result = await engine.run("pages", progress=lambda r: ahead.append(pulled - len(ahead) - 1))
    assert result.counts.new == 200
    # Ahead of each committed page: PAGES_AHEAD queued, and one more the producer holds
    # while it waits for room.
    assert max(ahead) == sync.engine.PAGES_AHEAD + 1


async def test_appended_rows_are_the_only_ones_read(tmp_path, db, store_url):
    src = tmp_path / "grow.csv"
    src.write_text("id,email\n1,a@example.com\n", encoding="utf-8")
    engine = SyncEngine(
        make_settings(tmp_path, store_url, {"g": {"type": "csv", "path": str(src)}}), db
    )
    await engine.run("g")
    with src.open("a", encoding="utf-8") as fh:
        fh.write("2,b@example.com\n")
    result = await engine.run("g")
    assert (result.counts.pulled, result.counts.new) == (1, 1)


async def test_mail_in_two_folders_is_one_activity(tmp_path, db, store_url):
    for folder in ("inbox", "copy"):
        (tmp_path / folder).mkdir()
        shutil.copy(SAMPLES / "mail" / "01-demo-request.eml", tmp_path / folder / "m.eml")
    cfg = {
        "mail": {"type": "mailbox", "path": str(tmp_path), "owner": ["alex@crmhub-demo.example"]}
    }
    engine = SyncEngine(make_settings(tmp_path, store_url, cfg), db)
    result = await engine.run("mail")
    assert result.counts.activities == 1
    assert result.counts.activities_linked == 1


async def test_pushed_records_are_ingested_once(tmp_path, db, store_url):
    from crmhub.records import RawRecord

    cfg = {"forms": {"type": "jsonl", "path": "unused.jsonl"}}
    engine = SyncEngine(make_settings(tmp_path, store_url, cfg), db)
    payload = {
        "submission_id": "S1",
        "submitted_at": "2026-10-01T09:00:00Z",
        "form": "demo",
        "fields": {"name": "Ann Lee", "email": "ann@example.com"},
    }
    records = [RawRecord("", "contact", payload), RawRecord("", "activity", payload)]
    first = await engine.ingest("forms", records)
    assert (first.new, first.goldens_created, first.activities_linked) == (2, 1, 1)
    again = await engine.ingest("forms", records)
    assert (again.new, again.unchanged) == (0, 2)


async def test_one_record_may_not_chain_two_unlike_golden_records(tmp_path, db, store_url):
    """The chain guard: C matches A by email and B by phone, but A and B (same common name,
    different company and city) do not look alike; C joins A and the C-B link waits for a
    steward with the reasons."""
    rows = [
        "id,first_name,last_name,email,phone,company,city",
        "A,Robert,Smith,robert.smith@acme-corp.com,,Acme Corp,San Francisco",
        "B,Robert,Smith,,+12125550143,Globex Inc,New York",
    ]
    # Enough other people that a shared name is weak evidence on its own.
    rows += [f"P{i},Pat{i},Lee{i},p{i}@example.org,,Co{i},Town{i % 7}" for i in range(300)]
    (tmp_path / "base.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "new.csv").write_text(
        "id,first_name,last_name,email,phone\n"
        "C,Robert,Smith,robert.smith@acme-corp.com,+1 212 555 0143\n",
        encoding="utf-8",
    )
    cfg = {"base": {"type": "csv", "path": "base.csv"}, "new": {"type": "csv", "path": "new.csv"}}
    engine = SyncEngine(make_settings(tmp_path, store_url, cfg), db)
    await engine.run("base")
    result = await engine.run("new")
    assert result.counts.reviews_queued == 1
    with db.connect() as conn:
        golden_of = dict(
            conn.execute(
                select(source_record.c.external_id, membership.c.golden_id)
                .join(membership, membership.c.record_id == source_record.c.id)
                .where(source_record.c.external_id.in_(["A", "B", "C"]))
            ).all()
        )
        [item] = conn.execute(select(review_item)).all()
    assert golden_of["C"] == golden_of["A"] != golden_of["B"]
    assert item.status == "open"
    assert "would join two golden records" in item.explanation["held"]
    assert item.explanation["fields"]["phone"]["level"] == "exact"


async def test_survivorship_policy_from_config_picks_the_trusted_source(tmp_path, db, store_url):
    (tmp_path / "crm.csv").write_text(
        "id,email,job_title,city\nc1,ann@example.com,VP Sales,Boston\n", encoding="utf-8"
    )
    (tmp_path / "web.csv").write_text(
        "id,email,job_title,city\nw1,ann@example.com,Sales,Cambridge\n", encoding="utf-8"
    )
    cfg = {name: {"type": "csv", "path": str(tmp_path / f"{name}.csv")} for name in ("crm", "web")}
    settings = make_settings(tmp_path, store_url, cfg)
    settings.matching.method = "exact"  # same email: one person
    settings.survivorship.fields = {"job_title": "source_priority"}
    settings.survivorship.source_priority = ["crm"]
    engine = SyncEngine(settings, db)
    await engine.run("crm")
    await engine.run("web")  # staged later: the most recent member
    with db.connect() as conn:
        (golden,) = search_golden(conn, "ann@example.com")
        detail = golden_detail(conn, golden["id"])
    fields = detail["fields"]
    assert fields["job_title"] == "VP Sales"  # source priority: crm
    assert fields["city"] == "Cambridge"  # default rule: most recent


class _ProbeMatcher:
    """Stores a surname probe key only for records without a first name; everyone looks the
    probe up (the shape of the probabilistic matcher's probe kinds). Every pair it is asked
    about goes to review, so the test sees exactly which pairs were compared."""

    version = "probe-test"

    def keys(self, contact: Contact) -> list[MatchKey]:
        if contact.first_name:
            return [MatchKey("name", f"{contact.first_name}:{contact.last_name}")]
        return [MatchKey("probe", contact.last_name or "")]

    def lookup_keys(self, contact: Contact) -> list[MatchKey]:
        return [MatchKey("probe", contact.last_name or "")]

    def compare(self, a: Contact, b: Contact) -> Decision:
        return Decision("review", 0.9, {"why": "test"})


@pytest.mark.parametrize("pages", [1, 2], ids=["same-page", "earlier-page"])
async def test_a_key_only_looked_up_finds_its_one_holder(tmp_path, db, store_url, pages):
    src = tmp_path / "people.csv"
    src.write_text("id,first_name,last_name\n1,,Neblett\n", encoding="utf-8")
    settings = make_settings(tmp_path, store_url, {"people": {"type": "csv", "path": str(src)}})
    engine = SyncEngine(settings, db, matcher=_ProbeMatcher())
    if pages == 2:
        await engine.run("people")
    with src.open("a", encoding="utf-8") as fh:
        fh.write("2,Donald,Neblett\n3,Donny,Neblett\n")
    await engine.run("people")
    with db.connect() as conn:
        ids = dict(conn.execute(select(source_record.c.external_id, source_record.c.id)).all())
        reviewed = {
            frozenset(pair)
            for pair in conn.execute(select(review_item.c.record_a, review_item.c.record_b))
        }
    # Record 1 is the probe key's only holder; records 2 and 3 only look it up.
    assert reviewed == {frozenset((ids["1"], ids["2"])), frozenset((ids["1"], ids["3"]))}


async def test_vectorised_pair_scoring_decides_as_the_scalar_path(tmp_path, monkeypatch):
    """Pages score their candidate pairs vectorised (`golden._score_pairs`); the outcome must
    be what scoring each pair with `compare` gives: same clusters, same review queue.
    (Matching does not depend on the store's dialect: SQLite files, one per run.)"""
    from bench.matching.__main__ import write_data
    from bench.matching.generate import generate
    from sync import golden

    src = tmp_path / "contacts.csv"
    write_data(generate(3000, seed=5), src)

    async def outcome(vector_pairs: int) -> tuple[set[frozenset[str]], set[tuple]]:
        monkeypatch.setattr(golden, "VECTOR_PAIRS", vector_pairs)
        folder = tmp_path / f"store-{vector_pairs}"
        folder.mkdir()
        url = f"sqlite:///{folder / 'crmhub.db'}"
        store = make_engine(url, folder)
        upgrade(store)
        engine = SyncEngine(
            make_settings(folder, url, {"c": {"type": "csv", "path": str(src)}}), store
        )
        try:
            await engine.run("c")
        finally:
            engine.close()
        with store.connect() as conn:
            ext = dict(conn.execute(select(source_record.c.id, source_record.c.external_id)).all())
            groups: dict[int, set[str]] = {}
            for rid, gid in conn.execute(select(membership.c.record_id, membership.c.golden_id)):
                groups.setdefault(gid, set()).add(ext[rid])
            reviews = {
                (ext[a], ext[b], round(p, 6))
                for a, b, p in conn.execute(
                    select(
                        review_item.c.record_a, review_item.c.record_b, review_item.c.probability
                    )
                )
            }
        store.dispose()
        return {frozenset(g) for g in groups.values()}, reviews

    vectorised = await outcome(32)
    scalar = await outcome(10**9)
    assert len(vectorised[1]) > 0  # the data set has uncertain pairs
    assert sum(len(g) > 1 for g in vectorised[0]) > 100  # and people it merges
    assert vectorised == scalar


async def test_search_takes_like_wildcards_literally(tmp_path, db, store_url):
    src = tmp_path / "people.csv"
    src.write_text(
        "id,first_name,last_name,company\n1,Ann,Lee,Axb Corp\n2,Bob,Roe,100% Organic\n",
        encoding="utf-8",
    )
    engine = SyncEngine(
        make_settings(tmp_path, store_url, {"people": {"type": "csv", "path": str(src)}}), db
    )
    await engine.run("people")
    with db.connect() as conn:
        assert search_golden(conn, "%") != []  # "100% Organic" holds a percent sign
        assert [g["company"] for g in search_golden(conn, "%")] == ["100% Organic"]
        assert search_golden(conn, "a_b") == []  # not "Axb"
        assert len(search_golden(conn, "axb")) == 1


class _FirstNameMatcher:
    """Blocks on the last name; the same person when the first names agree."""

    version = "first-name-test"

    def keys(self, contact: Contact) -> list[MatchKey]:
        return [MatchKey("last", contact.last_name or "")]

    def compare(self, a: Contact, b: Contact) -> Decision:
        same = a.first_name == b.first_name
        return Decision("merge" if same else "separate", float(same), {"same": same})


async def test_a_candidate_staged_again_is_compared_as_it_is_now(tmp_path, db, store_url):
    """Candidates are kept prepared across pages; one restaged since must not be compared as
    it was."""
    src = tmp_path / "people.csv"
    settings = make_settings(tmp_path, store_url, {"people": {"type": "csv", "path": str(src)}})
    engine = SyncEngine(settings, db, matcher=_FirstNameMatcher())
    header = "id,first_name,last_name,email\n"
    src.write_text(header + "A,Ann,Lee,a@example.com\n", encoding="utf-8")
    await engine.run("people")
    src.write_text(header + "A,Ann,Lee,a@example.com\nB,Ann,Lee,b@example.com\n", "utf-8")
    await engine.run("people", full=True)  # B is compared with A: A is loaded as a candidate
    src.write_text(header + "A,Bob,Lee,a@example.com\nB,Ann,Lee,b@example.com\n", "utf-8")
    await engine.run("people", full=True)  # A is staged again, as Bob
    src.write_text(
        header + "A,Bob,Lee,a@example.com\nB,Ann,Lee,b@example.com\nC,Bob,Lee,c@example.com\n",
        "utf-8",
    )
    await engine.run("people", full=True)  # C is compared with A as it is now: Bob
    with db.connect() as conn:
        ids = dict(conn.execute(select(source_record.c.external_id, source_record.c.id)).all())
        golden_of = dict(conn.execute(select(membership.c.record_id, membership.c.golden_id)).all())
    assert golden_of[ids["C"]] == golden_of[ids["A"]]
