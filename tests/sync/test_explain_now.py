"""`crmhub explain` weighs a pair as the sync did: the store's size and term frequencies."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.synthetic import HEADER, write_leads_csv
from dedupe.scoring import MIN_POPULATION, default_params
from sync.store import make_engine, review_item
from tests.test_cli import run

ROWS = MIN_POPULATION + 100


def test_explain_gives_the_weights_and_prior_the_sync_decided_with(tmp_path: Path) -> None:
    leads = write_leads_csv(tmp_path / "leads.csv", ROWS)
    # One person twice, by name alone (one also with a city), under a surname no one else
    # has: only the store's counts (a rare surname) and size (a prior for 2,102 contacts,
    # not for the 100,000 assumed without a store) make that a merge.
    with leads.open("a", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER, restval="")
        writer.writerow({"id": "Q-1", "first_name": "Ottoline", "last_name": "Quillfeather"})
        writer.writerow(
            {"id": "Q-2", "first_name": "Ottoline", "last_name": "Quillfeather", "city": "Leeds"}
        )
    (tmp_path / "crmhub.toml").write_text(
        '[connectors.leads]\ntype = "csv"\npath = "leads.csv"\n', encoding="utf-8"
    )
    synced = run("sync", "--json", cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    contacts = json.loads(synced.stdout)["store"]["contacts"]
    assert contacts >= MIN_POPULATION

    shown = run("explain", "leads:Q-1", "leads:Q-2", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    why = json.loads(shown.stdout)
    assert why["a"]["golden_id"] == why["b"]["golden_id"]  # the sync merged them
    assert why["action"] == "merge"
    explanation = why["explanation"]
    assert explanation["prior_weight"] == round(default_params().prior_weight(contacts), 3)
    assert explanation["fields"]["last_name"]["tf_adjustment"] > 0  # a surname of one person

    table = run("explain", "leads:Q-1", "leads:Q-2", cwd=tmp_path).stdout
    assert "rare value" in table
    assert "prior weight" in table


def test_a_queued_pair_carries_the_probability_explain_gives_it(tmp_path: Path) -> None:
    """The pipeline counts a page's own records in its term frequencies, as a batch and a
    later `explain` do: the two rows of one person arriving together weigh the same then and
    now (before, the surname they share counted 0 in their page, and 2 once stored)."""
    leads = write_leads_csv(tmp_path / "leads.csv", ROWS)
    with leads.open("a", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER, restval="")
        writer.writerow({"id": "Q-1", "first_name": "Ottoline", "last_name": "Quillfeather"})
        writer.writerow({"id": "Q-2", "first_name": "Otto", "last_name": "Quillfeather"})
    # Thresholds that queue the pair rather than merge it, so its probability is stored.
    (tmp_path / "crmhub.toml").write_text(
        "[matching]\nauto_merge = 0.9999\nreview = 0.3\n\n"
        '[connectors.leads]\ntype = "csv"\npath = "leads.csv"\n',
        encoding="utf-8",
    )
    synced = run("sync", "--json", cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    shown = run("explain", "leads:Q-1", "leads:Q-2", "--json", cwd=tmp_path)
    why = json.loads(shown.stdout)
    assert why["action"] == "review"
    db = make_engine(f"sqlite:///{tmp_path / 'crmhub.db'}")
    with db.connect() as conn:
        (queued,) = conn.execute(
            select(review_item.c.probability).where(
                review_item.c.record_a == why["a"]["record_id"],
                review_item.c.record_b == why["b"]["record_id"],
            )
        ).scalars()
    db.dispose()
    assert why["probability"] == pytest.approx(queued, abs=1e-9)
