"""Incremental match latency: `python -m bench.incremental --records 1000000 --store sqlite
--store postgres [--probes 500] [--seed 1] [--workdir DIR]`.

Builds a store of `--records` contacts from `bench/matching`'s seeded generator (census name
frequencies, shared companies, people in 2-4 sources), the way a sync with the default
(probabilistic) matcher leaves it: the rows are pulled from a CSV by the csv connector, mapped
and staged (source_record with payload and data), then `crmhub rebuild` (the batch path:
match_key rows with term-frequency rows, golden records, memberships, review items) clusters
them. Then `--probes` form submissions are fed one at a time through `SyncEngine.ingest`, as
`crmhub serve` does for a webhook: map, stage, match against the stored blocking index, merge,
commit. Half are people the store has never seen, half are variants (nickname, typo, new
email) of a person it holds, from the generator's ground truth. Each `ingest` is timed.

The built SQLite file is kept in the work directory (a temp dir removed at the end unless
`--workdir` is given, in which case a later run with the same records and seed reuses it);
probes always run on a copy. PostgreSQL gets a throwaway database, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, func, select

from bench.matching.generate import _NICK, _typo, generate
from connectors.webform import normalise, records_for
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.mapping_step import MappedRecord, map_records
from sync.migrate import upgrade
from sync.rebuild_apply import rebuild
from sync.sources import load_source
from sync.staging import StageItem, stage
from sync.store import golden_record, make_engine, match_key, source_record, write_transaction

__all__ = ["Probe", "build_store", "main", "make_probes", "run_probes"]

PG_ADMIN = os.environ.get("CRMHUB_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
CSV_COLUMNS = ("id", "first_name", "last_name", "email", "phone", "company", "city")
STORE_SOURCE = "contacts"  # the csv connector the store is built from
PROBE_SOURCE = "forms"  # the webform connector probes arrive through
VARIANTS = ("nickname", "typo", "new email")
WARMUP = 5  # submissions before the timed ones (imports, caches, the first frequency count)


@dataclass(slots=True)
class Probe:
    kind: str  # "new person" or one of VARIANTS
    fields: dict[str, str]


@dataclass(slots=True)
class ProbeResult:
    store: str
    records: int
    goldens: int
    match_keys: int
    build_seconds: float
    millis: list[float] = field(default_factory=list)
    cpu_millis: list[float] = field(default_factory=list)  # this process's CPU per probe
    by_outcome: dict[str, list[float]] = field(default_factory=dict)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def percentile(self, q: float, millis: list[float] | None = None) -> float:
        ordered = sorted(self.millis if millis is None else millis)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_probes(records: int, probes: int, seed: int) -> tuple[list[dict[str, str]], list[Probe]]:
    """The store's rows (exactly `records`) and the probes: people absent from those rows,
    and variants of people present in them (ground truth: the generator's clusters)."""
    fresh = probes // 2
    rows = generate(records + 3 * fresh + 50, seed)
    by_person: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_person.setdefault(row["cluster"], []).append(row)
    rng = random.Random(seed)
    people = sorted(by_person, key=int)
    held = set(rng.sample(people, fresh))
    store_rows = [r for r in rows if r["cluster"] not in held][:records]
    out = [Probe("new person", _fields(by_person[p][0])) for p in sorted(held, key=int)]
    first_row: dict[str, dict[str, str]] = {}
    for row in store_rows:
        first_row.setdefault(row["cluster"], row)
    present = sorted(first_row, key=int)
    for i, person in enumerate(rng.sample(present, probes - fresh)):
        kind = VARIANTS[i % len(VARIANTS)]
        out.append(Probe(kind, _variant(rng, kind, _fields(first_row[person]))))
    rng.shuffle(out)
    return store_rows, out


def _fields(row: dict[str, str]) -> dict[str, str]:
    return {k: row[k] for k in CSV_COLUMNS[1:] if row.get(k)}


def _variant(rng: random.Random, kind: str, fields: dict[str, str]) -> dict[str, str]:
    out = dict(fields)
    first, last = out.get("first_name", ""), out.get("last_name", "")
    if kind == "nickname":
        nicks = sorted(_NICK.nicknames_of(first.lower())) if first else []
        if nicks:
            out["first_name"] = rng.choice(nicks).capitalize()
        elif last:
            out["last_name"] = _typo(rng, last)
    elif kind == "typo":
        if last and len(last) >= 4:
            out["last_name"] = _typo(rng, last)
        elif first:
            out["first_name"] = _typo(rng, first)
    else:  # a new address at a mailbox provider, the old one dropped
        local = f"{first or 'x'}.{last or 'y'}{rng.randint(100, 999)}".lower().replace(" ", "")
        out["email"] = f"{local}@fastmail.com"
    return out


def _write_csv(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([f"C-{row['unique_id']}", *(row[c] for c in CSV_COLUMNS[1:])])


def _settings(url: str, workdir: Path, csv_path: Path) -> Settings:
    settings = Settings(
        store={"url": url},
        connectors={
            STORE_SOURCE: {"type": "csv", "path": str(csv_path)},
            PROBE_SOURCE: {"type": "webform", "secret": "unused"},
        },
    )
    settings.source_path = workdir / "crmhub.toml"
    return settings


async def _stage_all(settings: Settings, db: Engine) -> int:
    """Pull, map and stage every CSV row as a sync does, without matching (rebuild does)."""
    source = load_source(settings, STORE_SOURCE)
    path = str(source.mapping.path)
    mtime = source.mapping.path.stat().st_mtime_ns
    region = settings.matching.default_region
    staged = analyzed = 0
    async with httpx.AsyncClient() as client:
        connector = source.connector(settings, client)
        async for page in connector.pull("contacts", None):  # type: ignore[arg-type]
            items = [
                StageItem(
                    m.external_id,
                    m.content_hash,
                    m.payload_json or "",
                    m.data_json or "",
                    m.updated_at,
                )
                for m in map_records(path, mtime, region, page.records, for_writer=True)
                if isinstance(m, MappedRecord)
            ]
            with write_transaction(db) as conn:
                staged += len(stage(conn, STORE_SOURCE, "contact", items))
            if db.dialect.name == "postgresql" and staged >= 2 * analyzed:
                # As the sync engine does while a load grows the table: without statistics
                # the planner filters the identity lookups row by row.
                with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql("ANALYZE source_record")
                analyzed = staged
    return staged


def build_store(url: str, workdir: Path, csv_path: Path) -> tuple[float, float]:
    """Stage the CSV and rebuild; returns (staging seconds, rebuild seconds)."""
    db = make_engine(url)
    upgrade(db)
    settings = _settings(url, workdir, csv_path)
    try:
        started = time.perf_counter()
        asyncio.run(_stage_all(settings, db))
        staged = time.perf_counter()
        rebuild(db, settings, actor="bench", confirm=True)
        if db.dialect.name == "postgresql":
            with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
        return staged - started, time.perf_counter() - staged
    finally:
        db.dispose()


def _submission(i: int, probe: Probe) -> list[Any]:
    payload = {"submission_id": f"probe-{i}", "form": "bench", "fields": probe.fields}
    submission = normalise("generic", payload, f"generic:probe-{i}", datetime.now(UTC))
    return records_for(submission, f"probe-{i}")


def _outcome(counts: Any) -> str:
    if counts.records_merged:
        return "merged"
    if counts.reviews_queued:
        return "review"
    return "new"


async def _probe_all(engine: SyncEngine, probes: list[Probe], result: ProbeResult) -> None:
    warm = [Probe("warm-up", {"first_name": "Warm", "last_name": f"Up{i}"}) for i in range(WARMUP)]
    for i, probe in enumerate(warm):
        await engine.ingest(PROBE_SOURCE, _submission(-1 - i, probe))
    result.load_before = os.getloadavg()
    for i, probe in enumerate(probes):
        records = _submission(i, probe)
        started, cpu = time.perf_counter(), time.process_time()
        counts = await engine.ingest(PROBE_SOURCE, records)
        millis = (time.perf_counter() - started) * 1000
        result.cpu_millis.append((time.process_time() - cpu) * 1000)
        outcome = _outcome(counts)
        result.millis.append(millis)
        result.by_outcome.setdefault(outcome, []).append(millis)
        result.outcomes[(probe.kind, outcome)] += 1
    result.load_after = os.getloadavg()


def run_probes(
    url: str, workdir: Path, csv_path: Path, probes: list[Probe], store: str, build: float
) -> ProbeResult:
    db = make_engine(url)
    settings = _settings(url, workdir, csv_path)
    with db.connect() as conn:
        records = conn.execute(select(func.count()).select_from(source_record)).scalar_one()
        goldens = conn.execute(
            select(func.count())
            .select_from(golden_record)
            .where(golden_record.c.merged_into.is_(None))
        ).scalar_one()
        keys = conn.execute(select(func.count()).select_from(match_key)).scalar_one()
    result = ProbeResult(store, records, goldens, keys, build)
    engine = SyncEngine(settings, db)
    try:
        asyncio.run(_probe_all(engine, probes, result))
    finally:
        engine.close()
        db.dispose()
    return result


@contextmanager
def _postgres_database() -> Iterator[str]:
    import psycopg

    name = f"crmhub_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _print(result: ProbeResult, target_ms: float) -> None:
    n = len(result.millis)
    p95 = result.percentile(0.95)
    verdict = "met" if p95 < target_ms else "NOT met"
    print(
        f"{result.store:>8}: {result.records:,} source records, {result.goldens:,} golden "
        f"records, {result.match_keys:,} match_key rows (built in {result.build_seconds:.0f} s)"
    )
    print(
        f"          {n} probes: p50 {result.percentile(0.5):.1f} ms, p95 {p95:.1f} ms, "
        f"p99 {result.percentile(0.99):.1f} ms, max {max(result.millis):.1f} ms, "
        f"mean {statistics.fmean(result.millis):.1f} ms (target p95 < {target_ms:g} ms: "
        f"{verdict}); load {result.load_before[0]:.1f} -> {result.load_after[0]:.1f}"
    )
    cpu = result.cpu_millis
    print(
        f"          CPU of this process per probe: p50 {result.percentile(0.5, cpu):.1f} ms, "
        f"p95 {result.percentile(0.95, cpu):.1f} ms (wall minus CPU: waiting for a core, the "
        "disk or PostgreSQL)"
    )
    totals: Counter[str] = Counter()
    for (_, outcome), count in result.outcomes.items():
        totals[outcome] += count
    print(f"          outcomes: {dict(sorted(totals.items()))}")
    for outcome, millis in sorted(result.by_outcome.items()):
        print(
            f"            {outcome:>6}: p50 {result.percentile(0.5, millis):.1f} ms, "
            f"p95 {result.percentile(0.95, millis):.1f} ms ({len(millis)})"
        )
    for kind in ("new person", *VARIANTS):
        row = {o: c for (k, o), c in sorted(result.outcomes.items()) if k == kind}
        print(f"            {kind:>10}: {row}")


def bench_incremental(
    records: int, stores: list[str], probes: int, seed: int, workdir: Path | None
) -> list[ProbeResult]:
    """Build each store, probe it, print and return the figures."""
    temporary = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="crmhub-bench-incr-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[ProbeResult] = []
    try:
        started = time.perf_counter()
        store_rows, probe_list = make_probes(records, probes, seed)
        csv_path = work / f"contacts-{records}-{seed}.csv"
        _write_csv(store_rows, csv_path)
        del store_rows
        print(
            f"{records:,} contacts, {len(probe_list)} probes, seed {seed}, generated in "
            f"{time.perf_counter() - started:.0f} s; cores {os.cpu_count()}, load "
            f"{os.getloadavg()[0]:.1f}"
        )
        for store in stores:
            if store == "sqlite":
                results.append(_sqlite(work, csv_path, probe_list, records, seed))
            else:
                with _postgres_database() as url:
                    staging, rebuilding = build_store(url, work, csv_path)
                    print(f"postgres: staged in {staging:.0f} s, rebuilt in {rebuilding:.0f} s")
                    results.append(
                        run_probes(url, work, csv_path, probe_list, store, staging + rebuilding)
                    )
            _print(results[-1], 20.0 if store == "sqlite" else 50.0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak memory of this process: {peak:,.0f} MiB")
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return results


def _sqlite(
    work: Path, csv_path: Path, probes: list[Probe], records: int, seed: int
) -> ProbeResult:
    built = work / f"built-{records}-{seed}.db"
    marker = built.with_suffix(".json")
    build = 0.0
    if built.exists() and marker.exists():
        build = float(json.loads(marker.read_text())["build_seconds"])
        print(f"  sqlite: reusing {built}")
    else:
        staging, rebuilding = build_store(f"sqlite:///{built}", work, csv_path)
        build = staging + rebuilding
        marker.write_text(json.dumps({"build_seconds": build}))
        print(f"  sqlite: staged in {staging:.0f} s, rebuilt in {rebuilding:.0f} s")
    copy = work / "probed.db"
    shutil.copyfile(built, copy)
    try:
        return run_probes(f"sqlite:///{copy}", work, csv_path, probes, "sqlite", build)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.incremental", description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--store", action="append", choices=["sqlite", "postgres"])
    parser.add_argument("--probes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep and reuse the build")
    args = parser.parse_args(argv)
    bench_incremental(args.records, args.store or ["sqlite"], args.probes, args.seed, args.workdir)


if __name__ == "__main__":
    main()
