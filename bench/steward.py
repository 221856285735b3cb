"""`python -m bench.steward --items 100000 --store sqlite --store postgres`: review-queue speed.

Fills a store with N open review items (2N source records, each its own golden record), then
measures, in process (server time, no network):
- the queue page (`GET /queue`, rendered HTML): first page, a deep page, score, source and
  age filters, and the other sort orders;
- the API listing (`GET /api/v1/review`);
- a golden record page (`GET /golden/ID`), whose history searches an audit log of N entries;
- one steward decision (`sync.review.approve` / `reject`: one write transaction each).

Each figure is the median (and p95) of wall time and of the process's CPU time (all threads),
since the shared machine's load moves wall time; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import Engine

from crmhub.settings import Settings
from crmhub.web import create_app
from sync import review
from sync.migrate import upgrade
from sync.store import (
    audit_log,
    golden_record,
    make_engine,
    membership,
    review_item,
    source_record,
    write_transaction,
)
from sync.users import add_user, create_session

PG_ADMIN = os.environ.get("CRMHUB_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
CHUNK = 5000


def fill(db: Engine, items: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    explanation = {
        "model": "bench",
        "fields": {"first_name": {"level": "nickname", "weight": 5.4}},
    }
    with write_transaction(db) as conn:
        for start in range(0, 2 * items, CHUNK):
            ids = range(start + 1, min(start + CHUNK, 2 * items) + 1)
            conn.execute(
                source_record.insert(),
                [
                    {
                        "id": i,
                        "source": "bench" if i % 3 else "other",
                        "kind": "contact",
                        "external_id": f"B-{i}",
                        "content_hash": f"{i:064x}",
                        "payload": {},
                        "data": {
                            "first_name": "Anna" if i % 2 else "Ann",
                            "last_name": f"Person{i // 2}",
                            "full_name": f"Ann Person{i // 2}",
                            "emails": [f"p{i}@example.com"],
                        },
                        "staged_at": now,
                        "deleted": 0,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                golden_record.insert(),
                [
                    {
                        "id": i,
                        "fields": {"full_name": f"Ann Person{i // 2}"},
                        "lineage": {},
                        "version": 1,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                membership.insert(),
                [{"record_id": i, "golden_id": i, "method": "new", "decided_at": now} for i in ids],
            )
        for start in range(0, items, CHUNK):
            conn.execute(
                review_item.insert(),
                [
                    {
                        "record_a": 2 * k + 1,
                        "record_b": 2 * k + 2,
                        "probability": round(rng.uniform(0.80, 0.95), 6),
                        "explanation": explanation,
                        "status": "open",
                        "created_at": now,
                    }
                    for k in range(start, min(start + CHUNK, items))
                ],
            )
        # An audit log as long as the queue: earlier decisions on other records.
        for start in range(0, items, CHUNK):
            conn.execute(
                audit_log.insert(),
                [
                    {
                        "at": now,
                        "actor": "earlier",
                        "action": "review.reject" if k % 2 else "review.approve",
                        "details": {"review_id": 10**9 + k, "survivor": 10**9 + k, "alias": None},
                    }
                    for k in range(start, min(start + CHUNK, items))
                ],
            )
    if db.dialect.name == "postgresql":
        with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("source_record", "golden_record"):  # the ids above were explicit
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
            conn.exec_driver_sql("ANALYZE")


def _ms(wall: list[float], cpu: list[float]) -> dict[str, float]:
    def p95(values: list[float]) -> float:
        return sorted(values)[int(0.95 * (len(values) - 1))]

    return {
        "median_ms": round(statistics.median(wall) * 1000, 1),
        "p95_ms": round(p95(wall) * 1000, 1),
        "cpu_median_ms": round(statistics.median(cpu) * 1000, 1),
        "cpu_p95_ms": round(p95(cpu) * 1000, 1),
    }


class _Timer:
    """Wall and CPU time (process-wide: the request's worker thread included) of a block."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)

    def result(self) -> dict[str, float]:
        return _ms(self.wall, self.cpu)


async def _time_get(client: httpx.AsyncClient, url: str, runs: int) -> dict[str, float]:
    timer = _Timer()
    for _ in range(runs):
        with timer:
            response = await client.get(url)
        assert response.status_code == 200, (url, response.status_code)
    return timer.result()


async def measure_pages(db: Engine, workdir: Path, runs: int) -> dict[str, Any]:
    settings = Settings(store={"url": str(db.url)}, connectors={})
    settings.source_path = workdir / "crmhub.toml"
    user = add_user(db, f"bench-{uuid.uuid4().hex[:6]}", "bench password", "steward")
    session_id, _ = create_session(db, user)
    app = create_app(settings, db)
    from sync.users import create_token

    token = create_token(db, user.name)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://bench", cookies={"crmhub_session": session_id}
    ) as client:
        await client.get("/queue")  # warm caches and templates
        out = {
            "queue_first_page": await _time_get(client, "/queue", runs),
            "queue_page_1000": await _time_get(client, "/queue?page=1000", runs),
            "queue_score_filter": await _time_get(client, "/queue?min_score=0.9", runs),
            "queue_source_filter": await _time_get(client, "/queue?source=other", runs),
            "queue_oldest_first": await _time_get(client, "/queue?sort=oldest", runs),
            "queue_borderline_first": await _time_get(client, "/queue?sort=borderline", runs),
            # Every pair was queued just now: one age filter keeps none, the other all.
            "queue_age_filter_none": await _time_get(client, "/queue?min_age_days=1", runs),
            "queue_age_filter_all": await _time_get(client, "/queue?max_age_days=1", runs),
        }
        # A golden record two decisions made: its history is looked up in the audit log.
        with db.connect() as conn:
            pair = review.list_reviews(conn, limit=1)[0][0]
        merged = review.approve(db, pair["id"], user.name)
        review.unmerge(db, pair["b"]["record_id"], user.name)
        out["golden_page"] = await _time_get(client, f"/golden/{merged['golden_id']}", runs)
        client.headers["Authorization"] = f"Bearer {token}"
        out["api_review_list"] = await _time_get(client, "/api/v1/review", runs)
    return out


def measure_decisions(db: Engine, count: int) -> dict[str, Any]:
    with db.connect() as conn:
        items, _ = review.list_reviews(conn, limit=2 * count)
    approve, reject = _Timer(), _Timer()
    for i, item in enumerate(items):
        if i % 2:
            with reject:
                review.reject(db, item["id"], "bench")
        else:
            with approve:
                review.approve(db, item["id"], "bench")
    return {"approve": approve.result(), "reject": reject.result()}


def run(store: str, items: int, runs: int, decisions: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="crmhub-bench-steward-"))
    admin = None
    if store == "sqlite":
        url = f"sqlite:///{workdir / 'store.db'}"
    else:
        name = f"crmhub_bench_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
        admin.execute(f'CREATE DATABASE "{name}"')
        url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}".replace(
            "postgresql://", "postgresql+psycopg://", 1
        )
    db = make_engine(url)
    try:
        upgrade(db)
        started = time.perf_counter()
        fill(db, items)
        filled = time.perf_counter() - started
        result = {
            "store": store,
            "items": items,
            "load_before": os.getloadavg(),
            "fill_seconds": round(filled, 1),
            **asyncio.run(measure_pages(db, workdir, runs)),
            "decisions": measure_decisions(db, decisions),
            "load_after": os.getloadavg(),
        }
    finally:
        db.dispose()
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--store", action="append", choices=["sqlite", "postgres"])
    parser.add_argument("--runs", type=int, default=20, help="Requests per page measured.")
    parser.add_argument("--decisions", type=int, default=50, help="Approvals + rejections.")
    args = parser.parse_args()
    for store in args.store or ["sqlite"]:
        result = run(store, args.items, args.runs, args.decisions)
        print(result, flush=True)


if __name__ == "__main__":
    main()
