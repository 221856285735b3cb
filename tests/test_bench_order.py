"""`python -m bench.order` at a tiny size, so its code path cannot rot (no timings)."""

from __future__ import annotations

from pathlib import Path

from bench.order import bench_order, disagreement, fed_settings, last_batch
from crmhub.settings import Settings


def test_disagreement_compares_clusters_as_sets_of_records() -> None:
    one = {"a": "1", "b": "1", "c": "2", "d": "3"}
    assert disagreement(one, {"a": "x", "b": "x", "c": "y", "d": "z"}) == 0.0  # renamed only
    # c joins a and b: their clusters and c's change, d's does not.
    assert disagreement(one, {"a": "1", "b": "1", "c": "1", "d": "3"}) == 0.75


def test_four_stores_built_and_compared(tmp_path: Path) -> None:
    figures = bench_order(400, seed=2, store="sqlite", trickle=0.25, workdir=tmp_path)
    assert figures["batch vs batch, shuffled"] == 0.0  # the batch is order independent
    fed = ("one at a time", "300 in a batch, then one at a time")
    for label in ("batch", "batch, shuffled", *fed):
        assert 0.8 < figures[f"{label}: B-cubed F1"] <= 1.0
    for label in fed:
        assert 0.0 <= figures[f"batch vs {label}"] < 0.5
        assert figures[f"{label}: rebuild would move"] >= 0


def test_last_batch_follows_the_store_sizes_of_recluster_growth() -> None:
    settings = Settings()
    assert last_batch(0, 20_000, settings) == 19_706  # ... 17,915, 19,706, 21,677 at 0.1
    assert last_batch(18_000, 20_000, settings) == 19_706
    assert last_batch(90_000, 90_500, settings) == 90_000  # the batch it was loaded in
    assert last_batch(0, 1_999, settings) == 0
    settings.matching = settings.matching.model_copy(update={"recluster_growth": 0})
    assert last_batch(0, 20_000, settings) == 2_000


def test_the_fed_stores_take_the_matching_settings_asked_for(tmp_path: Path) -> None:
    url, csv = "sqlite:///x.db", tmp_path / "x.csv"
    asked = fed_settings(url, tmp_path, csv, {"recluster_growth": 0.025, "recheck_growth": 0.02})
    assert (asked.matching.recluster_growth, asked.matching.recheck_growth) == (0.025, 0.02)
    default = fed_settings(url, tmp_path, csv).matching
    assert (default.recluster_growth, default.recheck_growth) == (0.1, 0.01)
