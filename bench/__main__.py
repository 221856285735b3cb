"""`python -m bench sync --rows 200000 --store sqlite --store postgres [--method exact]`.

Prints CSV -> store throughput (pull + map + stage + match + merge + checkpoint) per store,
then the time of a `--full` re-run in which every row is unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

from bench.synthetic import write_leads_csv
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.queries import store_totals
from sync.store import make_engine

PG_ADMIN = os.environ.get("CRMHUB_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _run(store_url: str, csv_path: Path, workdir: Path, method: str) -> dict[str, float]:
    db = make_engine(store_url, workdir)
    upgrade(db)
    settings = Settings(
        store={"url": store_url},
        matching={"method": method},
        connectors={"leads": {"type": "csv", "path": str(csv_path)}},
    )
    settings.source_path = workdir / "crmhub.toml"
    engine = SyncEngine(settings, db)
    try:
        started = time.perf_counter()
        result = asyncio.run(engine.run("leads"))
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        again = asyncio.run(engine.run("leads", full=True))
        rerun = time.perf_counter() - started
    finally:
        engine.close()
    with db.connect() as conn:
        totals = store_totals(conn)
    db.dispose()
    return {
        "rows": result.counts.pulled,
        "seconds": seconds,
        "rows_per_s": result.counts.pulled / seconds,
        "goldens": totals["golden_records"],
        "merged": result.counts.records_merged,
        "rerun_unchanged": again.counts.unchanged,
        "rerun_s": rerun,
    }


def _postgres(csv_path: Path, workdir: Path, method: str) -> dict[str, float]:
    import psycopg

    name = f"crmhub_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        return _run(f"{base}/{name}", csv_path, workdir, method)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_sync(rows: int, stores: list[str], method: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        csv_path = write_leads_csv(workdir / "leads.csv", rows)
        size = csv_path.stat().st_size / 1e6
        print(f"CSV: {rows:,} rows, {size:.1f} MB, seed 7, ~10% repeats; cores: {os.cpu_count()}")
        for store in stores:
            if store == "sqlite":
                figures = _run(f"sqlite:///{workdir / 'bench.db'}", csv_path, workdir, method)
            else:
                figures = _postgres(csv_path, workdir, method)
            print(
                f"{store:>8}: {figures['rows']:,} rows in {figures['seconds']:.1f} s = "
                f"{figures['rows_per_s']:,.0f} rows/s (pull+map+stage+{method} match+merge+"
                f"checkpoint); {figures['goldens']:,} golden records, {figures['merged']:,} "
                f"merged; re-run --full: {figures['rerun_unchanged']:,} unchanged in "
                f"{figures['rerun_s']:.1f} s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    sync_parser = sub.add_parser("sync", help="CSV -> store throughput")
    sync_parser.add_argument("--rows", type=int, default=200_000)
    sync_parser.add_argument("--store", action="append", choices=["sqlite", "postgres"])
    sync_parser.add_argument("--method", choices=["exact", "probabilistic"], default="exact")
    args = parser.parse_args()
    bench_sync(args.rows, args.store or ["sqlite"], args.method)


if __name__ == "__main__":
    main()
