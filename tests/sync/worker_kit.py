"""What the worker tests share: `crmhub worker` processes, configs, waiting, store comparison.

Workers are real `crmhub worker` processes; a test only queues runs and watches the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from bench.synthetic import write_leads_csv
from crmhub.settings import load_settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.store import (
    connector_state,
    dead_letter,
    golden_record,
    make_engine,
    match_key,
    membership,
    source_record,
    sync_run,
)
from tests.conftest import REDIS_URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Workers:
    """`crmhub worker` processes for one config; all stopped at the end of the test.

    Each worker leads a process group of its own, with its mapping helper process: a worker
    killed with SIGKILL leaves its helper behind (it waits for work from a parent that is
    gone), so `stop_all` kills the whole group.
    """

    def __init__(self, config: Path) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
        with (self.config.parent / f"worker-{len(self.procs)}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "crmhub", "-v", "--config", str(self.config), "worker"],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def by_pid(self, pid: int) -> subprocess.Popen[bytes]:
        return next(p for p in self.procs if p.pid == pid)

    def stop_all(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the worker and its helper
            p.wait(timeout=30)

    def log_lines(self, containing: str) -> list[str]:
        return [
            line
            for f in sorted(self.config.parent.glob("worker-*.log"))
            for line in f.read_text(errors="replace").splitlines()
            if containing in line
        ]

    def logs(self, whole: bool = False) -> str:
        """The workers' logs: the last 3,000 characters of each (for failure messages)."""
        return "\n".join(
            text if whole else text[-3000:]
            for f in sorted(self.config.parent.glob("worker-*.log"))
            if (text := f.read_text(errors="replace"))
        )


def write_config(
    folder: Path,
    store_url: str,
    namespace: str,
    redis_url: str,
    *,
    rows: int,
    page: int,
    matching: str = "probabilistic",
    **queue: Any,
) -> Path:
    """One CSV connector `leads` of `rows` synthetic rows, in pages of `page`."""
    csv_path = folder / "leads.csv"
    if not csv_path.exists():
        write_leads_csv(csv_path, rows)
    table = {"lease_seconds": 2, "job_timeout": 600, "max_jobs": 2, **queue}
    lines = [
        f'[store]\nurl = "{store_url}"',
        f'[queue]\nredis_url = "{redis_url}"\nnamespace = "{namespace}"',
        *(f"{k} = {v}" for k, v in table.items()),
        f'[matching]\nmethod = "{matching}"',
        f'[connectors.leads]\ntype = "csv"\npath = "{csv_path}"\npage_size = {page}',
    ]
    config = folder / "crmhub.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def write_tables_config(
    folder: Path, store_url: str, namespace: str, tables: dict[str, dict[str, Any]], **queue: Any
) -> Path:
    """A config of the given `[connectors.NAME]` tables on the test Redis, with `[queue]` keys.

    Values are written with `json.dumps`: strings, numbers and booleans read back alike in TOML.
    """
    lines = [
        f"[store]\nurl = {json.dumps(store_url)}",
        f"[queue]\nredis_url = {json.dumps(REDIS_URL)}\nnamespace = {json.dumps(namespace)}",
        *(f"{k} = {json.dumps(v)}" for k, v in queue.items()),
    ]
    for name, table in tables.items():
        lines.append(f"[connectors.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    config = folder / "crmhub.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def staged(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(source_record)).scalar_one())


def run_rows(db: Engine) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(select(sync_run).order_by(sync_run.c.id)))


async def wait_for(
    what: str, check: Callable[[], Any], seconds: float, workers: Workers | None = None
) -> Any:
    """Poll `check` (a function, or one returning an awaitable) until it returns a truthy value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.1)
    logs = workers.logs() if workers else ""
    raise AssertionError(f"timed out after {seconds}s waiting for {what}\n{logs}")


# -- comparing stores ----------------------------------------------------------------------
Dump = dict[str, list[tuple[Any, ...]]]


def _json(value: Any) -> str:
    if isinstance(value, str):  # SQLite hands JSON back as text in some column types
        value = json.loads(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def store_dump(db: Engine) -> Dump:
    """Everything a sync writes, canonical and without surrogate ids, on either back end.

    Surrogate ids differ from an uninterrupted run (PostgreSQL does not hand back sequence
    values of a transaction that died with its worker); what they point at must not. Records
    are named `source/kind/external_id`, JSON is re-serialised with sorted keys, and every
    section is sorted in Python (collations differ between SQLite and PostgreSQL).
    """
    sr = source_record.c
    with db.connect() as conn:
        q = conn.execute
        name = {
            rid: f"{source}/{kind}/{ext}"
            for rid, source, kind, ext in q(select(sr.id, sr.source, sr.kind, sr.external_id))
        }
        members: dict[int, list[tuple[str, str]]] = {}
        for rid, gid, method in q(
            select(membership.c.record_id, membership.c.golden_id, membership.c.method)
        ):
            members.setdefault(gid, []).append((name[rid], method))
        goldens = []
        for gid, fields, lineage in q(
            select(golden_record.c.id, golden_record.c.fields, golden_record.c.lineage).where(
                golden_record.c.merged_into.is_(None)
            )
        ):
            if gid not in members:
                continue
            lineage = json.loads(lineage) if isinstance(lineage, str) else lineage or {}
            named = {k: name[v] for k, v in lineage.items()}
            goldens.append((repr(sorted(members[gid])), _json(fields), _json(named)))
        dl = dead_letter.c
        cs = connector_state.c
        return {
            "records": sorted(
                (source, kind, ext, content_hash, _json(data), int(deleted))
                for source, kind, ext, content_hash, data, deleted in q(
                    select(sr.source, sr.kind, sr.external_id, sr.content_hash, sr.data, sr.deleted)
                )
            ),
            "goldens": sorted(goldens),
            "keys": sorted(
                (name[rid], kind, value)
                for rid, kind, value in q(
                    select(match_key.c.record_id, match_key.c.key_kind, match_key.c.key_value)
                )
            ),
            "letters": sorted(
                tuple(r) for r in q(select(dl.source, dl.scope, dl.origin, dl.field, dl.reason))
            ),
            "cursors": sorted(
                (c, s, _json(cursor))
                for c, s, cursor in q(select(cs.connector, cs.stream, cs.cursor))
            ),
        }


def assert_same_store(got: Dump, want: Dump) -> None:
    """Section by section; on a difference, show its size and a few differing rows only."""
    for section in want:
        a, b = got[section], want[section]
        if a == b:
            continue
        extra, missing = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise AssertionError(
            f"{section}: {len(a)} rows, reference has {len(b)}; "
            f"only here: {extra}; only in the reference: {missing}"
        )


def digest(dump: Dump) -> dict[str, tuple[int, str]]:
    return {k: (len(v), hashlib.sha256(repr(v).encode()).hexdigest()[:16]) for k, v in dump.items()}


async def reference_dump(config: Path, folder: Path) -> tuple[Dump, float]:
    """The dump of an uninterrupted in-process run of `config`'s connectors on SQLite.

    SQLite because it is the faster store (about half the CPU of PostgreSQL at 100k rows); the
    dump is the same on both back ends (`test_store_dump_is_the_same_on_sqlite_and_postgresql`).
    Returns the dump and the seconds the run and the dump took.
    """
    started = time.perf_counter()
    settings = load_settings(config)
    url = f"sqlite:///{folder / 'reference.db'}"
    db = make_engine(url)
    upgrade(db)
    settings.store.url = url
    engine = SyncEngine(settings, db)
    try:
        for name in settings.connectors:
            await engine.run(name)
    finally:
        engine.close()
    dump = store_dump(db)
    db.dispose()
    return dump, time.perf_counter() - started
