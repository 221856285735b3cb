"""Measure a connector against its fake: `python -m tests.fakes.bench KIND [N] [--rate R]`.

Full sync of N contacts into a fresh SQLite store through `SyncEngine`, then 1% of them
edited and an incremental run. With `--rate R` the fake enforces R requests/s (429 beyond)
and the connector is given the same budget: reports achieved request rate and 429 share.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.store import make_engine
from tests.connectors.vendors import TOKEN, VENDORS, Running
from tests.fakes.server import FakeServer, FakeState


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(VENDORS))
    parser.add_argument("n", type=int, nargs="?", default=50_000)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--pull-only", action="store_true", help="connector alone, no store")
    args = parser.parse_args()
    vendor = VENDORS[args.kind]
    state = FakeState(TOKEN)
    state.add_people(args.n, step_ms=10)
    state.enforce_rate = args.rate
    with tempfile.TemporaryDirectory() as tmp, FakeServer(vendor.make_app(state)) as server:
        table = {**vendor.config(server.url, TOKEN), "rate_limit": args.rate or 100_000}
        if args.rate:
            table["rate_limit"] = args.rate * 0.95  # headroom for clock skew between the two
        settings = Settings(
            store={"url": f"sqlite:///{Path(tmp) / 'bench.db'}"},  # type: ignore[arg-type]
            connectors={"src": table},
        )
        if args.pull_only:
            await pull_only(vendor, server.url, args.n)
            return
        db = make_engine(settings.store.url, Path(tmp))
        upgrade(db)
        engine = SyncEngine(settings, db)
        started = time.perf_counter()
        first = await engine.run("src")
        full_s = time.perf_counter() - started
        requests = len(state.requests)
        limited = state.statuses.count(429)
        print(
            f"{args.kind}: full sync {first.counts.contacts} contacts in {full_s:.1f}s "
            f"= {first.counts.contacts / full_s:,.0f} contacts/s; {requests} requests "
            f"({requests / full_s:.2f} req/s), {limited} answered 429 "
            f"({100 * limited / max(requests, 1):.2f}%)"
        )
        changed = list(range(1, args.n + 1, 100))
        state.touch(changed)
        started = time.perf_counter()
        second = await engine.run("src")
        print(
            f"{args.kind}: incremental after editing {len(changed)}: "
            f"{second.counts.contacts} contacts, {second.counts.changed} changed, "
            f"{time.perf_counter() - started:.1f}s"
        )


async def pull_only(vendor: Any, url: str, n: int) -> None:
    running = Running(vendor, FakeState(TOKEN), url)
    started = time.perf_counter()
    count = 0
    async for page in running.connector().pull("contacts", None):
        count += len(page.records)
    seconds = time.perf_counter() - started
    print(f"{vendor.kind}: pulled {count} of {n} in {seconds:.1f}s = {count / seconds:,.0f}/s")


if __name__ == "__main__":
    asyncio.run(main())
