"""`python -m bench.workers --connectors 20 --rows 300 --workers 1 --workers 2`: queue throughput.

Queues one run for each of N connectors on a fresh PostgreSQL database, starts W `crmhub worker`
processes and times until every run has succeeded. The connectors read distinct CSV files
(every run stages its own rows), or with `--latency S` one fake ActiveCampaign API on 127.0.0.1
that answers each page after S seconds (runs that mostly wait on their source). Reports runs/min
and records/s per worker count and where the time went:

- CPU seconds of the worker processes, of their mapping helpers (included in the former) and of
  the store's PostgreSQL backends (sampled from /proc, so PostgreSQL must run on this host);
- the share of the wall time the match-and-merge lock (`sync.golden.MERGE_LOCK`) was held, and
  how many page transactions waited for it on average (sampled from `pg_locks`);
- the mean number of runs under way (sum of run durations / wall time);
- the load average before each measurement (the machine may be shared).

`--split` starts no worker: it runs the connectors one after another in this process and reports
the share of the CPU spent in match-and-merge, the part workers can only run one page at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from arq.connections import create_pool
from sqlalchemy import Engine, func, select

from bench.synthetic import write_leads_csv
from crmhub.settings import Settings, load_settings
from sync.golden import MERGE_LOCK
from sync.jobs import enqueue_sync, redis_settings
from sync.migrate import upgrade
from sync.store import make_engine, sync_run

PG_ADMIN = os.environ.get("CRMHUB_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CRMHUB_BENCH_REDIS", "redis://127.0.0.1:6379/0")
TICK = os.sysconf("SC_CLK_TCK")

# pg_advisory_xact_lock(bigint) shows in pg_locks as classid = high and objid = low 32 bits.
_LOCKS = """
SELECT count(*) FILTER (WHERE l.granted), count(*) FILTER (WHERE NOT l.granted)
FROM pg_locks l JOIN pg_database d ON d.oid = l.database
WHERE l.locktype = 'advisory' AND d.datname = %s AND l.classid = %s AND l.objid = %s
"""


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process, from /proc (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"; utime, stime are 14, 15
    return (int(fields[11]) + int(fields[12])) / TICK


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class Sampler:
    """Samples, every `interval` seconds until stopped: the merge lock in `pg_locks`, the CPU of
    the database's backends and of the workers' helper processes (last value seen per pid)."""

    db_name: str
    workers: list[int]
    interval: float = 0.1
    samples: int = 0
    held: int = 0
    waiting: int = 0
    backends: dict[int, float] = field(default_factory=dict)
    helpers: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        key = (MERGE_LOCK >> 32, MERGE_LOCK & 0xFFFFFFFF)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            while not self._stop.wait(self.interval):
                granted, waiting = conn.execute(_LOCKS, [self.db_name, *key]).fetchone() or (0, 0)
                self.samples += 1
                self.held += bool(granted)
                self.waiting += waiting
                pids = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", [self.db_name]
                ).fetchall()
                for (pid,) in pids:
                    self._seen(self.backends, pid)
                for worker in self.workers:
                    for child in _children(worker):
                        self._seen(self.helpers, child)

    @staticmethod
    def _seen(into: dict[int, float], pid: int) -> None:
        cpu = _cpu_seconds(pid)
        if cpu is not None:
            into[pid] = max(cpu, into.get(pid, 0.0))


def _sources(folder: Path, connectors: int, rows: int, vendor: Any) -> list[str]:
    """The connector tables: distinct CSV files, or with `vendor` (`--latency`) one slow fake
    ActiveCampaign serving the same `rows` people to every connector (one person, 20 tools)."""
    if vendor is None:
        return [
            f'type = "csv"\npath = "{write_leads_csv(folder / f"c{i}.csv", rows, seed=i)}"'
            for i in range(connectors)
        ]
    table = (
        f'type = "activecampaign"\nbase_url = "{vendor.url}"\napi_token = "{vendor.state.token}"'
    )
    return [table + "\nrate_limit = 10000\npage_size = 100"] * connectors


@dataclass
class BenchStore:
    """A fresh PostgreSQL database, a Redis namespace and a config of N connectors on them."""

    config: Path
    settings: Settings
    db: Engine
    db_name: str
    namespace: str
    rows: int  # per connector


@contextlib.contextmanager
def _bench_store(
    folder: Path, connectors: int, rows: int, matching: str, vendor: Any
) -> Iterator[BenchStore]:
    db_name = f"crmhub_bench_{uuid.uuid4().hex[:8]}"
    ns = f"bench-{uuid.uuid4().hex[:8]}:"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/"
    url += db_name
    lines = [
        f'[store]\nurl = "{url}"',
        f'[queue]\nredis_url = "{REDIS_URL}"\nnamespace = "{ns}"\nmax_jobs = 4',
        f'[matching]\nmethod = "{matching}"',
    ]
    for i, table in enumerate(_sources(folder, connectors, rows, vendor)):
        lines.append(f"[connectors.c{i}]\n{table}")
    config = folder / "bench.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = make_engine(url)
    try:
        upgrade(db)
        yield BenchStore(config, load_settings(config), db, db_name, ns, rows)
    finally:
        db.dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        for key in [*client.scan_iter(match=f"{ns}*"), *client.scan_iter(match=f"arq:*{ns}*")]:
            client.delete(key)
        client.close()


def _measure(store: BenchStore, workers: int) -> dict[str, float]:
    settings, db = store.settings, store.db
    connectors = len(settings.connectors)

    async def queue_all() -> None:
        pool = await create_pool(redis_settings(settings, retries=0))
        for name in settings.connectors:
            await enqueue_sync(pool, settings, db, name)
        await pool.aclose()

    asyncio.run(queue_all())
    procs: list[subprocess.Popen[bytes]] = []
    cpu_before = _children_cpu()
    started = time.perf_counter()
    for _ in range(workers):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "crmhub", "--config", str(store.config), "worker"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    sampler = Sampler(store.db_name, [p.pid for p in procs])
    sampler.start()
    try:
        while True:
            with db.connect() as conn:
                done = conn.execute(
                    select(func.count()).where(sync_run.c.state == "succeeded")
                ).scalar_one()
            if done >= connectors:
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - started  # includes worker start-up
    finally:
        sampler.stop()
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
    with db.connect() as conn:
        spans = conn.execute(select(sync_run.c.started_at, sync_run.c.finished_at)).all()
    # A run that hit a conflict with another may leave a queued row for the reconciler
    # (no finished_at): only finished attempts count as time under way.
    busy = sum((end - start).total_seconds() for start, end in spans if end is not None)
    return {
        "seconds": seconds,
        "worker_cpu_s": _children_cpu() - cpu_before,
        "helper_cpu_s": sum(sampler.helpers.values()),
        "pg_cpu_s": sum(sampler.backends.values()),
        "merge_lock_held": sampler.held / max(1, sampler.samples),
        "merge_lock_waiters": sampler.waiting / max(1, sampler.samples),
        "runs_under_way": busy / seconds,
        "runs_per_min": connectors / seconds * 60,
        "records_per_s": connectors * store.rows / seconds,
    }


class _ThreadCpu:
    """Wraps a function: CPU seconds of the calling thread inside it, and how many calls."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()  # the page transaction's own thread
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds += time.thread_time() - started
            self.calls += 1


def _cpu_split(store: BenchStore) -> dict[str, float]:
    """Every connector run in turn in this process, as one worker with one job at a time:
    the CPU of match-and-merge (which workers run one page at a time, under the merge lock)
    and of its pair scoring, against the process's whole CPU, mapping helper included.
    Load-independent, unlike wall times on a shared machine."""
    import sync.engine
    import sync.golden

    names = vars(sync.engine)  # where the page transaction looks match_and_merge up
    comparer = vars(sync.golden)["_Comparer"]
    merge = _ThreadCpu(names["match_and_merge"])
    scoring = _ThreadCpu(comparer.__call__)

    async def run_all() -> None:
        engine = sync.engine.SyncEngine(store.settings, store.db)
        try:
            for name in store.settings.connectors:
                await engine.run(name)
        finally:
            engine.close()  # the mapping helper exits: its CPU counts as a child's

    names["match_and_merge"] = merge
    comparer.__call__ = lambda self, *args: scoring(self, *args)
    own, children = resource.getrusage(resource.RUSAGE_SELF), _children_cpu()
    try:
        asyncio.run(run_all())
    finally:
        names["match_and_merge"] = merge.real
        comparer.__call__ = scoring.real
    after = resource.getrusage(resource.RUSAGE_SELF)
    total = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime
    total += _children_cpu() - children
    return {
        "cpu_s": total,
        "merge_cpu_s": merge.seconds,
        "merge_share": merge.seconds / total,
        "scoring_cpu_s": scoring.seconds,
        "pairs_per_record": scoring.calls / (len(store.settings.connectors) * store.rows),
    }


def _children_cpu() -> float:
    """User + system seconds of the finished child processes (the workers) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connectors", type=int, default=20)
    parser.add_argument("--rows", type=int, default=300, help="rows per connector")
    parser.add_argument("--workers", type=int, action="append", help="repeatable")
    parser.add_argument("--matching", choices=["probabilistic", "exact"], default="probabilistic")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds per page of a fake vendor API instead of CSV files (I/O-bound runs)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="no workers: run the connectors in this process, report the CPU in match-and-merge",
    )
    args = parser.parse_args()
    if args.split and args.latency:
        parser.error("--split measures this process's CPU: the fake vendor would run in it too")
    source = f"a vendor API at {args.latency}s per 100-row page" if args.latency else "CSV"
    print(
        f"{args.connectors} connectors x {args.rows} rows from {source}, {args.matching} "
        f"matching, PostgreSQL{'' if args.split else ', max_jobs=4 per worker'}"
    )
    with contextlib.ExitStack() as stack:
        vendor = None
        if args.latency:
            # The tests' fake vendors: real HTTP servers on 127.0.0.1 built from vendor docs.
            from tests.connectors.vendors import running

            vendor = stack.enter_context(running("activecampaign"))
            vendor.state.add_people(args.rows)
        if args.split:
            _print_split(args)
        else:
            print(
                "| workers | seconds | runs/min | records/s | worker CPU s (helpers) "
                "| PostgreSQL CPU s | merge lock held | waiting for it | runs under way "
                "| load before |\n|---|---|---|---|---|---|---|---|---|---|"
            )
            for workers in args.workers or [1, 2]:
                _measure_and_print(args, workers, vendor)


def _print_split(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory() as tmp,
        _bench_store(Path(tmp), args.connectors, args.rows, args.matching, None) as store,
    ):
        r = _cpu_split(store)
    print(
        f"in-process, one run at a time: CPU {r['cpu_s']:.1f}s, of which match-and-merge "
        f"{r['merge_cpu_s']:.1f}s ({r['merge_share']:.0%}), in it scoring pairs "
        f"{r['scoring_cpu_s']:.1f}s ({r['pairs_per_record']:.0f} pairs per record); "
        f"load before {load:.1f}"
    )


def _measure_and_print(args: argparse.Namespace, workers: int, vendor: Any) -> None:
    if vendor is not None:
        from tests.fakes.server import Fault

        # Every page request of every run waits `latency` (a fault is used up per request).
        pages = args.connectors * (args.rows // 100 + 5)
        vendor.state.faults[:] = [Fault(delay=args.latency, path="contacts")] * pages
    load = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory() as tmp,
        _bench_store(Path(tmp), args.connectors, args.rows, args.matching, vendor) as store,
    ):
        r = _measure(store, workers)
    print(
        f"| {workers} | {r['seconds']:.1f} | {r['runs_per_min']:.1f} | "
        f"{r['records_per_s']:.0f} | {r['worker_cpu_s']:.1f} ({r['helper_cpu_s']:.1f}) | "
        f"{r['pg_cpu_s']:.1f} | {r['merge_lock_held']:.0%} | {r['merge_lock_waiters']:.1f} | "
        f"{r['runs_under_way']:.1f} | {load:.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
