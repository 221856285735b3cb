"""Email connector throughput: `python -m tests.fakes.bench_email imap|gmail|graph [N]`.

imap: a private Dovecot seeded with N messages (half INBOX, half Sent) over APPEND; reports
the connector alone (headers only, and headers + 4 KB of body), then the full pipeline into
SQLite, a no-op second run, 100 new messages, and a run cut mid-FETCH then resumed.
gmail / graph: the same against the fake servers over loopback HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from connectors import ConnectorContext, get_connector_class
from crmhub.errors import TransientError
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.queries import store_totals
from sync.store import make_engine
from tests.connectors.dovecot import PASSWORD, USER, CuttingProxy, Dovecot, message

_FIRST = ["Ann", "Bo", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea"]


def person(i: int) -> str:
    """A distinct correspondent per number (the same name on every message would make every
    pair a review candidate, which measures the matcher, not the connector)."""
    letters, n = "", i + 26 * 27
    while n:
        n, r = divmod(n, 26)
        letters = chr(97 + r) + letters
    return f"{_FIRST[i % len(_FIRST)]} {letters.capitalize()} <{letters}@{letters}-{i}.example>"


async def pull_rate(kind: str, table: dict[str, Any], label: str) -> float:
    cls = get_connector_class(kind)
    connector = cls(cls.Config(**table), ConnectorContext("bench", Path.cwd()))
    started, cpu = time.perf_counter(), time.process_time()
    count = 0
    async for page in connector.pull("activities", None):
        count += sum(r.kind == "activity" for r in page.records)
    seconds = time.perf_counter() - started
    print(
        f"{kind} {label}: {count:,} messages in {seconds:.2f}s = {count / seconds:,.0f} msg/s "
        f"(this process's CPU: {time.process_time() - cpu:.2f}s)"
    )
    return count / seconds


def engine_for(tmp: Path, table: dict[str, Any]) -> SyncEngine:
    settings = Settings(
        store={"url": f"sqlite:///{tmp / 'bench.db'}"},  # type: ignore[arg-type]
        connectors={"mail": table},
    )
    db = make_engine(settings.store.url, tmp)
    upgrade(db)
    return SyncEngine(settings, db)


async def imap(n: int) -> None:
    dovecot = Dovecot().start()
    try:
        started = time.perf_counter()
        half = n // 2
        dovecot.append(
            "INBOX", (message(i, sender=person(i), body="Hello " * 300) for i in range(half))
        )
        dovecot.append(
            "Sent",
            (message(i, sender=f"Rep <{USER}>", to=person(i)) for i in range(half, n)),
        )
        print(f"imap: seeded {n:,} messages over APPEND in {time.perf_counter() - started:.1f}s")
        table: dict[str, Any] = {
            "type": "imap",
            "host": "127.0.0.1",
            "port": dovecot.port,
            "security": "none",
            "username": USER,
            "password": PASSWORD,
            "folders": ["INBOX", "Sent"],
            "page_size": 1000,
        }
        await pull_rate("imap", {**table, "body_bytes": 0}, "pull, headers only")
        await pull_rate("imap", table, "pull, headers + 4 KB body")
        with tempfile.TemporaryDirectory() as tmp:
            engine = engine_for(Path(tmp), table)
            started, cpu = time.perf_counter(), time.process_time()
            first = await engine.run("mail")
            seconds = time.perf_counter() - started
            print(
                f"imap pipeline (SQLite): {first.counts.activities:,} activities + "
                f"{first.counts.contacts:,} contacts in {seconds:.1f}s = "
                f"{first.counts.activities / seconds:,.0f} msg/s "
                f"(this process's CPU: {time.process_time() - cpu:.1f}s)"
            )
            started = time.perf_counter()
            second = await engine.run("mail")
            print(
                f"imap second run: pulled {second.counts.pulled} records in "
                f"{time.perf_counter() - started:.2f}s"
            )
            dovecot.append("INBOX", (message(i, sender=person(i)) for i in range(n, n + 100)))
            third = await engine.run("mail")
            print(f"imap after 100 new: {third.counts.activities} activities pulled")
            engine.close()
        with tempfile.TemporaryDirectory() as tmp:
            proxy = CuttingProxy(dovecot.port, cut_after=8_000_000)
            engine = engine_for(Path(tmp), {**table, "port": proxy.port})
            try:
                await engine.run("mail")
            except TransientError as exc:
                print(f"imap cut mid-sync: {exc}")
            with engine.db.connect() as conn:
                before = store_totals(conn)["activities"]
            resumed = await engine.run("mail")
            with engine.db.connect() as conn:
                after = store_totals(conn)["activities"]
            print(
                f"imap resume: {before:,} committed before the cut, {resumed.counts.activities:,} "
                f"read after, {after:,} in the store (expected {n + 100:,})"
            )
            engine.close()
            proxy.close()
    finally:
        dovecot.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["imap", "gmail", "graph"])
    parser.add_argument("n", type=int, nargs="?", default=20_000)
    args = parser.parse_args()
    if args.kind == "imap":
        await imap(args.n)
    else:
        await api(args.kind, args.n)


def _serve(kind: str, n: int, urls: Any) -> None:
    """Child process: the fake with n messages, so it does not share the client's GIL."""
    from tests.fakes import gmail, graph
    from tests.fakes.server import FakeServer

    state: Any
    if kind == "gmail":
        state = gmail.GmailState("unused")
        for i in range(n):
            state.add_message(sender=person(i))
        app = gmail.make_app(state)
    else:
        state = graph.GraphState("unused")
        for i in range(n):
            name, _, address = person(i).partition(" <")
            state.add_message(sender=(name, address.rstrip(">")))
        app = graph.make_app(state)
    with FakeServer(app) as server:
        urls.put(server.url)
        while True:
            time.sleep(3600)


@contextlib.contextmanager
def fake_process(kind: str, n: int) -> Iterator[Any]:
    ctx = multiprocessing.get_context("spawn")
    urls = ctx.Queue()
    child = ctx.Process(target=_serve, args=(kind, n, urls), daemon=True)
    child.start()
    try:
        yield types.SimpleNamespace(url=urls.get(timeout=120))
    finally:
        child.terminate()
        child.join(5)


async def api(kind: str, n: int) -> None:
    """Gmail or Graph: connector alone, then the pipeline, against the fake over HTTP."""
    from tests.fakes import gmail, graph

    with fake_process(kind, n) as server:
        if kind == "gmail":
            table: dict[str, Any] = {
                "type": "gmail",
                "base_url": server.url + "/gmail/v1",
                "token_url": server.url + "/token",
                "client_id": gmail.CLIENT_ID,
                "client_secret": gmail.CLIENT_SECRET,
                "refresh_token": gmail.REFRESH,
                "page_size": 500,
                "rate_limit": 100_000,
                "concurrency": 20,
            }
        else:
            table = {
                "type": "graph",
                "base_url": server.url + "/v1.0",
                "token_url": server.url + "/common/oauth2/v2.0/token",
                "client_id": graph.CLIENT_ID,
                "client_secret": graph.CLIENT_SECRET,
                "refresh_token": graph.REFRESH,
                "page_size": 1000,
                "rate_limit": 100_000,
                "folders": ["inbox"],
            }
        await pull_rate(kind, table, "pull (fake over loopback HTTP)")
        if kind == "gmail":
            for concurrency in (1, 5):
                label = f"pull, concurrency {concurrency}"
                await pull_rate(kind, {**table, "concurrency": concurrency}, label)
        with tempfile.TemporaryDirectory() as tmp:
            engine = engine_for(Path(tmp), table)
            started = time.perf_counter()
            first = await engine.run("mail")
            seconds = time.perf_counter() - started
            print(
                f"{kind} pipeline (SQLite): {first.counts.activities:,} activities in "
                f"{seconds:.1f}s = {first.counts.activities / seconds:,.0f} msg/s"
            )
            engine.close()


if __name__ == "__main__":
    asyncio.run(main())
