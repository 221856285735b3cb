"""`bench.workers` still measures what docs/benchmarks.md reports, at a tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.workers as bench
import sync.engine
import sync.golden
from tests.conftest import PG_ADMIN_URL
from tests.sync.worker_kit import REDIS_URL

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(180)]


def test_worker_bench_reports_cpu_lock_and_throughput(
    tmp_path: Path, pg_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pg_url and namespace: PostgreSQL and Redis are there (or the test fails under CI=true).
    monkeypatch.setattr(bench, "PG_ADMIN", PG_ADMIN_URL)
    monkeypatch.setattr(bench, "REDIS_URL", REDIS_URL)
    with bench._bench_store(tmp_path, 2, 40, "probabilistic", None) as store:
        measured = bench._measure(store, workers=1)
    assert measured["records_per_s"] == pytest.approx(80 / measured["seconds"])
    assert measured["worker_cpu_s"] > 0
    assert measured["pg_cpu_s"] > 0  # the store's backends were found and sampled
    assert 0 <= measured["merge_lock_held"] <= 1
    assert measured["runs_under_way"] > 0

    (tmp_path / "split").mkdir()
    with bench._bench_store(tmp_path / "split", 2, 40, "probabilistic", None) as store:
        split = bench._cpu_split(store)
    assert 0 < split["scoring_cpu_s"] < split["merge_cpu_s"] < split["cpu_s"]
    assert split["pairs_per_record"] > 0  # the seeded names repeat: candidates are scored
    comparer = vars(sync.golden)["_Comparer"]
    assert "lambda" not in comparer.__call__.__qualname__
    assert vars(sync.engine)["match_and_merge"] is sync.golden.match_and_merge  # unpatched
