"""Source-side merges become aliases, end to end: fake vendor over real HTTP -> SyncEngine ->
SQLite and PostgreSQL. The retired id resolves to the survivor's golden record, its
activities follow, nothing is dead-lettered and nothing counts as a deletion."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from crmhub.cli.app import app
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.queries import dead_letters, golden_detail, iter_golden, iter_xref, store_totals
from sync.store import activity_participant, make_engine, source_record
from tests.conftest import make_settings
from tests.connectors.vendors import TOKEN, Running, running
from tests.fakes import hubspot, klaviyo
from tests.fakes.server import Event


def engine_for(
    tmp_path: Path, vendor: Running, store_url: str, **options: Any
) -> tuple[SyncEngine, Engine]:
    table = {**vendor.vendor.config(vendor.url, TOKEN), "rate_limit": 10_000, "page_size": 50}
    settings: Settings = make_settings(tmp_path, store_url, {"src": {**table, **options}})
    db = make_engine(store_url)
    return SyncEngine(settings, db), db


def xref(db: Engine) -> dict[str, int]:
    with db.connect() as conn:
        return {external: gid for _, external, gid in iter_xref(conn)}


def cli(tmp_path: Path, store_url: str, args: list[str]) -> str:
    """`crmhub --config C ARGS` in process, against the test's store; its output."""
    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.output


def aliases(db: Engine) -> dict[str, str]:
    """Retired external id -> its survivor's, for every alias in the store."""
    with db.connect() as conn:
        rows = conn.execute(
            select(source_record.c.external_id, source_record.c.alias_of).where(
                source_record.c.alias_of.is_not(None)
            )
        )
        return {str(ext): str(alias_of) for ext, alias_of in rows}


def timeline_of(db: Engine, golden_id: int) -> set[int]:
    with db.connect() as conn:
        detail = golden_detail(conn, golden_id)
    assert detail is not None
    return {t["record_id"] for t in detail["timeline"]}


def activities_to(db: Engine, email: str) -> set[int]:
    """Activity records with `email` among their participants."""
    with db.connect() as conn:
        return set(
            conn.execute(
                select(activity_participant.c.record_id).where(
                    activity_participant.c.email_key == email
                )
            ).scalars()
        )


def assert_clean(db: Engine) -> None:
    with db.connect() as conn:
        assert dead_letters(conn, source="src") == []


@pytest.mark.parametrize("new_record", [False, True], ids=["primary-keeps-id", "new-id"])
async def test_hubspot_merge_makes_the_retired_id_an_alias(
    tmp_path: Path, store_url: str, new_record: bool
) -> None:
    with running("hubspot") as vendor:
        state = vendor.state
        state.add_people(30)
        state.add_events(2, start=state.clock + timedelta(seconds=2))
        engine, db = engine_for(tmp_path, vendor, store_url)
        first = await engine.run("src")
        assert first.counts.contacts == 30
        before = xref(db)
        old_golden = before["4"]
        old_activities = activities_to(db, "person4@example.com")
        assert len(old_activities) == 2

        survivor = hubspot.merge_contacts(state, 3, 4, new_record=new_record)
        second = await engine.run("src")
        retired = ["3", "4"] if new_record else ["4"]
        assert second.counts.aliased == len(retired)
        assert second.counts.deleted == 0
        assert second.counts.dead_letters == 0
        with db.connect() as conn:
            assert store_totals(conn)["contacts"] == 29  # one live record for the two
            goldens = {g["golden_id"] for g in iter_golden(conn)}
        assert len(goldens) == 29
        refs = xref(db)
        kept = refs[str(survivor.id)]
        assert all(refs[r] == kept for r in retired)  # the retired ids resolve to it
        with db.connect() as conn:
            detail = golden_detail(conn, old_golden)  # the old golden id resolves too
            assert detail is not None
            assert detail["id"] == kept
            assert "person4@example.com" in detail["fields"]["emails"]
            members = {m["external_id"]: m for m in detail["members"]}
            assert members["4"]["deleted"]
            assert members["4"]["method"] == "alias"
        assert aliases(db) == dict.fromkeys(retired, str(survivor.id))
        # What a user sees: `golden show OLD_ID` and `export xref` name the survivor's record.
        shown = cli(tmp_path, store_url, ["golden", "show", str(old_golden), "--json"])
        assert json.loads(shown)["id"] == kept
        exported = cli(tmp_path, store_url, ["export", "xref", "--format", "csv"])
        assert f"src,4,{kept}" in exported.splitlines()
        # The retired contact's activities are on the survivor's golden record...
        assert old_activities <= timeline_of(db, kept)
        # ... and so are those staged later under its identity.
        state.events.append(Event(900, 4, "open", state.clock + timedelta(seconds=1)))
        third = await engine.run("src")
        assert third.counts.activities == 1
        assert third.counts.activities_linked == 1
        assert activities_to(db, "person4@example.com") - old_activities <= timeline_of(db, kept)
        assert third.counts.aliased == 0

        # The survivor is listed again with its merged ids: nothing moves.
        state.touch([survivor.id])
        again = await engine.run("src")
        assert again.counts.contacts == 1
        assert again.counts.aliased == 0
        # A full scan does not take the retired ids for deletions.
        full = await engine.run("src", full=True)
        assert full.counts.deleted == 0
        assert full.counts.deletions_held == 0
        assert xref(db) == refs
        assert_clean(db)


async def test_hubspot_merge_of_a_survivor_moves_its_aliases_along(
    tmp_path: Path, store_url: str
) -> None:
    """4 into 3, then 3 into 5: both old ids resolve to 5's golden record."""
    with running("hubspot") as vendor:
        state = vendor.state
        state.add_people(12)
        engine, db = engine_for(tmp_path, vendor, store_url)
        await engine.run("src")
        hubspot.merge_contacts(state, 3, 4)
        await engine.run("src")
        hubspot.merge_contacts(state, 5, 3)
        result = await engine.run("src")
        assert result.counts.aliased == 1
        refs = xref(db)
        assert refs["3"] == refs["4"] == refs["5"]
        with db.connect() as conn:
            assert store_totals(conn)["contacts"] == 10
            detail = golden_detail(conn, refs["5"])
            assert detail is not None
            assert set(detail["fields"]["emails"]) == {f"person{n}@example.com" for n in (3, 4, 5)}
        assert aliases(db) == {"3": "5", "4": "5"}
        assert_clean(db)


async def test_klaviyo_profile_merge_makes_the_source_an_alias(
    tmp_path: Path, store_url: str
) -> None:
    with running("klaviyo") as vendor:
        state = vendor.state
        state.add_people(30)
        state.add_events(2, start=state.clock + timedelta(seconds=2))
        engine, db = engine_for(tmp_path, vendor, store_url)
        await engine.run("src")
        source, destination = klaviyo.profile_id(4), klaviyo.profile_id(3)
        old_activities = activities_to(db, "person4@example.com")
        assert len(old_activities) == 2

        klaviyo.merge_profiles(state, 4, 3)
        second = await engine.run("src")
        assert second.counts.aliased == 1
        assert second.counts.deleted == 0
        assert second.counts.dead_letters == 0
        assert second.counts.activities == 1  # the Merged Profile event itself
        refs = xref(db)
        assert refs[source] == refs[destination]
        with db.connect() as conn:
            assert store_totals(conn)["contacts"] == 29
        kept = refs[destination]
        assert old_activities <= timeline_of(db, kept)
        # An event delivered later under the retired profile lands there too.
        state.events.append(Event(900, 4, "open", state.clock + timedelta(seconds=1)))
        third = await engine.run("src")
        assert third.counts.activities == 1
        assert third.counts.activities_linked == 1
        assert activities_to(db, "person4@example.com") <= timeline_of(db, kept)
        full = await engine.run("src", full=True)
        assert full.counts.deleted == 0
        assert full.counts.deletions_held == 0
        assert full.counts.aliased == 0  # the Merged Profile event again: a no-op
        assert_clean(db)
