"""`python -m bench.incremental` at a tiny size, so its code path cannot rot (no timings)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from bench.incremental import VARIANTS, _write_csv, build_store, make_probes, run_probes
from sync.store import make_engine, match_key, source_record


def test_build_then_probe_one_submission_at_a_time(tmp_path: Path, store_url: str) -> None:
    rows, probes = make_probes(2000, 6, seed=3)
    assert len(rows) == 2000
    assert sorted(p.kind for p in probes) == sorted(["new person"] * 3 + list(VARIANTS))
    assert all(p.fields for p in probes)
    csv_path = tmp_path / "contacts.csv"
    _write_csv(rows, csv_path)
    build_store(store_url, tmp_path, csv_path)
    db = make_engine(store_url)
    with db.connect() as conn:
        staged = conn.execute(select(func.count()).select_from(source_record)).scalar_one()
        tf_rows = conn.execute(
            select(func.count()).select_from(match_key).where(match_key.c.key_kind == "tf:last")
        ).scalar_one()
    db.dispose()
    assert staged == 2000
    assert tf_rows > 1500  # term-frequency rows, as the incremental path stores them
    result = run_probes(store_url, tmp_path, csv_path, probes, "test", 0.0)
    assert len(result.millis) == 6
    assert result.records == 2000  # counted before the probes
    db = make_engine(store_url)
    with db.connect() as conn:
        after = conn.execute(select(func.count()).select_from(source_record)).scalar_one()
    db.dispose()
    assert after == 2000 + 2 * (5 + 6)  # warm-ups and probes: a contact and an activity each
    outcomes = dict(result.outcomes)
    assert outcomes[("new person", "new")] == 3
    assert (
        sum(c for (kind, o), c in outcomes.items() if kind != "new person" and o == "merged") >= 2
    )
