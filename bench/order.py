"""Order independence of the clusters: `python -m bench.order --records 20000 [--seed 1]
[--store sqlite|postgres] [--trickle 0.1] [--page 1] [--no-empty] [--recluster-growth 0.1]
[--recheck-growth 0.01] [--workdir DIR]`.

Issue 3 asks that shuffling the input, or feeding it one record at a time, yields the same
clusters, or that the disagreement rate is reported and stays under 0.1%. From one seeded
data set (`bench/matching`'s generator, with ground truth) this builds four stores with the
default probabilistic matcher:

- **batch**: the rows staged in the generator's order, then clustered in one batch (`crmhub
  rebuild`, the path a first load takes);
- **batch, shuffled**: the same rows staged in another order, clustered the same way;
- **one at a time**: the rows in that other order, each one alone through `SyncEngine.ingest`
  (map, stage, match against the stored blocking index, merge, commit), as a webhook arrives,
  into an empty store;
- **N in a batch, then one at a time**: the first `1 - trickle` of them loaded in a batch, the
  rest one at a time: a first load followed by the day-to-day changes.

With `--page N` the fed stores take N records per `ingest` (one transaction, matched together
and against the store), as a connector's page arrives, instead of one.

It prints, for each store, pairwise and B-cubed F1 against the truth, and for each pair of
stores the disagreement rate: the share of records whose cluster (the set of records it is
grouped with) differs. For the stores fed one at a time it also prints what `crmhub rebuild
--dry-run` would change there (records moved, clusters merged or split): the tool's own answer
to "how far is this store from a batch of the same records".
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, select

from bench.incremental import (
    CSV_COLUMNS,
    STORE_SOURCE,
    _postgres_database,
    _settings,
    _write_csv,
    build_store,
)
from bench.matching.generate import generate
from bench.matching.metrics import scores
from crmhub.records import RawRecord
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.first_load import size_reached
from sync.migrate import upgrade
from sync.rebuild import RebuildPlan
from sync.rebuild_apply import preview
from sync.store import audit_log, make_engine, membership, source_record

__all__ = [
    "bench_order",
    "disagreement",
    "fed_settings",
    "feed",
    "last_batch",
    "main",
    "rechecks",
]

TARGET = 0.001  # the bound on the disagreement rate


def disagreement(a: Mapping[str, str], b: Mapping[str, str]) -> float:
    """Share of records (keys of `a`, all in `b`) whose fellow members differ between the
    two clusterings. Cluster ids need not correspond: a cluster is its set of records."""
    groups_a: dict[str, set[str]] = {}
    groups_b: dict[str, set[str]] = {}
    for record in a:
        groups_a.setdefault(a[record], set()).add(record)
        groups_b.setdefault(b[record], set()).add(record)
    differ = sum(1 for r in a if groups_a[a[r]] != groups_b[b[r]])
    return differ / len(a) if a else 0.0


def clusters(url: str) -> dict[str, str]:
    """External id -> golden id of every staged contact."""
    db = make_engine(url)
    try:
        with db.connect() as conn:
            query = select(source_record.c.external_id, membership.c.golden_id).join(
                membership, membership.c.record_id == source_record.c.id
            )
            return {external: str(golden) for external, golden in conn.execute(query)}
    finally:
        db.dispose()


async def _feed(engine: SyncEngine, rows: list[dict[str, str]], page: int) -> None:
    step = max(page, len(rows) // 10 // page * page)
    started = time.perf_counter()
    for at in range(0, len(rows), page):
        records = [
            RawRecord(
                "",
                "contact",
                {"id": f"C-{row['unique_id']}", **{c: row[c] for c in CSV_COLUMNS[1:]}},
            )
            for row in rows[at : at + page]
        ]
        await engine.ingest(STORE_SOURCE, records)
        done = at + len(records)
        if done % step == 0:
            print(f"  fed {done:,} records, {time.perf_counter() - started:.0f} s")


def fed_settings(
    url: str, work: Path, csv_path: Path, matching: Mapping[str, float] | None = None
) -> Settings:
    """The benchmark's settings, with these `[matching]` values (`recluster_growth`,
    `recheck_growth`) if given."""
    settings = _settings(url, work, csv_path)
    if matching:  # validated as a config file's values would be
        values = {**settings.matching.model_dump(), **matching}
        settings.matching = settings.matching.model_validate(values)
    return settings


def feed(
    url: str,
    work: Path,
    csv_path: Path,
    rows: list[dict[str, str]],
    page: int = 1,
    matching: Mapping[str, float] | None = None,
) -> float:
    """Feed `rows` into the store `page` at a time (each page one `ingest`, one transaction);
    returns the seconds taken."""
    db = make_engine(url)
    upgrade(db)
    engine = SyncEngine(fed_settings(url, work, csv_path, matching), db)
    try:
        started = time.perf_counter()
        asyncio.run(_feed(engine, rows, page))
        return time.perf_counter() - started
    finally:
        engine.close()
        db.dispose()


def bench_order(
    records: int,
    seed: int,
    store: str,
    trickle: float,
    workdir: Path | None,
    from_empty: bool = True,
    page: int = 1,
    matching: Mapping[str, float] | None = None,
) -> dict[str, float]:
    temporary = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="crmhub-bench-order-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = generate(records, seed)
        truth = {f"C-{r['unique_id']}": r["cluster"] for r in rows}
        reordered = list(rows)
        random.Random(seed + 1).shuffle(reordered)
        loaded = round(records * (1 - trickle))
        in_order, shuffled = work / "contacts.csv", work / "contacts-shuffled.csv"
        first_part = work / "contacts-loaded.csv"
        _write_csv(rows, in_order)
        _write_csv(reordered, shuffled)
        _write_csv(reordered[:loaded], first_part)
        print(f"{records:,} contacts, seed {seed}, {len(set(truth.values())):,} people, {store}")
        found: dict[str, dict[str, str]] = {}
        plans: dict[str, RebuildPlan] = {}
        for label, csv_path in (("batch", in_order), ("batch, shuffled", shuffled)):
            with _database(store, work, label) as url:
                staging, clustering = build_store(url, work, csv_path)
                print(f"  {label}: staged in {staging:.1f} s, clustered in {clustering:.1f} s")
                found[label] = clusters(url)
        fed: dict[str, tuple[Path | None, list[dict[str, str]]]] = {}
        how = "one at a time" if page == 1 else f"in pages of {page}"
        if from_empty:
            fed[how] = (None, reordered)
        fed[f"{loaded:,} in a batch, then {how}"] = (first_part, reordered[loaded:])
        for label, (first, rest) in fed.items():
            with _database(store, work, label) as url:
                if first is not None:
                    build_store(url, work, first)
                seconds = feed(url, work, shuffled, rest, page, matching)
                print(f"  {label}: {seconds:.0f} s, {1000 * seconds / len(rest):.1f} ms a record")
                settings = fed_settings(url, work, shuffled, matching)
                last = last_batch(records - len(rest), records, settings)
                print(
                    f"  {label}: last clustered in a batch at {last:,} contacts; "
                    f"{records - last:,} ({(records - last) / records:.2%}) decided one at a "
                    "time since"
                )
                found[label] = clusters(url)
                db = make_engine(url)
                try:
                    done, taken = rechecks(db)
                    print(
                        f"  {label}: {done} borderline rechecks while fed, of {taken:,} "
                        f"records in all ({taken / max(done, 1):,.0f} each)"
                    )
                    plans[label] = preview(db, settings)
                finally:
                    db.dispose()
        return _report(truth, found, plans, records)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def rechecks(db: Engine) -> tuple[int, int]:
    """The borderline rechecks of a store (sync/borderline.py): how many, and how many
    records they clustered again in all."""
    with db.connect() as conn:
        details = conn.execute(
            select(audit_log.c.details).where(audit_log.c.action == "rebuild.borderline")
        ).scalars()
        taken = [int(d.get("contacts", 0)) for d in details]
    return len(taken), sum(taken)


def last_batch(start: int, end: int, settings: Settings) -> int:
    """The store's size at its last batch when fed from `start` contacts (0: empty; else a
    batch of that many) to `end`: the last of `first_load.batch_sizes` it reached, if past
    `start`."""
    return max(start, size_reached(end, settings.matching.recluster_growth) or 0)


@contextmanager
def _database(store: str, work: Path, label: str) -> Iterator[str]:
    """A store for one build: a throwaway PostgreSQL database, or a fresh SQLite file in the
    work directory (kept with `--workdir`)."""
    if store == "postgres":
        with _postgres_database() as url:
            yield url
        return
    path = work / f"{label.replace(', ', '-').replace(' ', '-')}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    yield f"sqlite:///{path}"


def _report(
    truth: dict[str, str],
    found: dict[str, dict[str, str]],
    plans: dict[str, RebuildPlan],
    records: int,
) -> dict[str, float]:
    figures: dict[str, float] = {}
    print("\nagainst the truth:")
    for label, predicted in found.items():
        missing = set(truth) - set(predicted)
        if missing:
            raise SystemExit(f"{label}: {len(missing)} records have no golden record")
        s = scores(truth, predicted)
        figures[f"{label}: pairwise F1"] = s["pairwise_f1"]
        figures[f"{label}: B-cubed F1"] = s["bcubed_f1"]
        print(
            f"  {label:>16}: pairwise P {s['pairwise_precision']:.4f} R "
            f"{s['pairwise_recall']:.4f} F1 {s['pairwise_f1']:.4f}; B-cubed F1 {s['bcubed_f1']:.4f}"
        )
    print(f"\ndisagreement (records whose cluster differs; target < {TARGET:.1%}):")
    labels = list(found)
    for i, first in enumerate(labels):
        for second in labels[i + 1 :]:
            rate = disagreement(found[first], found[second])
            figures[f"{first} vs {second}"] = rate
            verdict = "met" if rate < TARGET else "NOT met"
            print(f"  {first} vs {second}: {rate:.4%} ({verdict})")
    for label, plan in plans.items():
        moved = len(plan.moved)
        figures[f"{label}: rebuild would move"] = moved
        changes = ", ".join(f"{k} {v:,}" for k, v in sorted(plan.clusters.items()))
        print(
            f"`crmhub rebuild --dry-run` on the store fed {label}: {moved:,} of {records:,} "
            f"records would move ({moved / records:.4%}); clusters: {changes}"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory of this process: {peak:,.0f} MiB")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.order", description=__doc__)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--trickle", type=float, default=0.1, help="share fed one at a time after a batch load"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the stores here")
    parser.add_argument(
        "--no-empty",
        action="store_true",
        help="skip feeding every record one at a time into an empty store (slow at 100k+)",
    )
    parser.add_argument(
        "--page", type=int, default=1, help="records per ingest when fed (1: one at a time)"
    )
    parser.add_argument(
        "--recluster-growth",
        type=float,
        default=None,
        help="[matching] recluster_growth of the fed stores (default: the setting's default)",
    )
    parser.add_argument(
        "--recheck-growth",
        type=float,
        default=None,
        help="[matching] recheck_growth of the fed stores (default: the setting's default)",
    )
    args = parser.parse_args(argv)
    matching = {
        name: value
        for name, value in (
            ("recluster_growth", args.recluster_growth),
            ("recheck_growth", args.recheck_growth),
        )
        if value is not None
    }
    bench_order(
        args.records,
        args.seed,
        args.store,
        args.trickle,
        args.workdir,
        not args.no_empty,
        args.page,
        matching,
    )


if __name__ == "__main__":
    main()
