"""Measure a connector against its fake: `python -m tests.fakes.bench KIND [N] [--rate R]`.

Full sync of N contacts into a fresh SQLite store through `SyncEngine`, then 1% of them
edited and an incremental run. With `--rate R` the fake enforces R requests/s (429 beyond)
and the connector is given the same budget: reports achieved request rate and 429 share.

The fake runs in a process of its own, as the vendor's servers would: in the measuring
process it would take the interpreter lock from the sync it is serving.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import tempfile
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.store import make_engine
from tests.connectors.vendors import TOKEN, VENDORS, Running
from tests.fakes.server import FakeServer, FakeState


def serve_fake(kind: str, n: int, rate: float | None, control: Connection, events: int = 0) -> None:
    """Child process: the vendor's fake with N people (and `events` activities each);
    answers control messages until told to stop: ("touch", ids) edits people, ("stats",)
    returns (requests, 429s, CPU seconds the fake has used)."""
    state = _people(n, events)
    state.enforce_rate = rate
    state.views = {}  # listings memoised between edits: the fake must not be the bottleneck
    with FakeServer(VENDORS[kind].make_app(state), http="httptools") as server:
        control.send(server.url)
        while True:
            message = control.recv()
            if message[0] == "touch":
                state.touch(message[1])
                control.send(None)
            elif message[0] == "stats":
                control.send((len(state.requests), state.statuses.count(429), time.process_time()))
            else:
                return


class RemoteFake:
    """The fake in a child process, driven through a pipe."""

    def __init__(self, kind: str, n: int, rate: float | None, events: int = 0) -> None:
        self._control, child = multiprocessing.Pipe()
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(target=serve_fake, args=(kind, n, rate, child, events))
        self._process.start()
        self.url: str = self._control.recv()

    def touch(self, ids: list[int]) -> None:
        self._control.send(("touch", ids))
        self._control.recv()

    def stats(self) -> tuple[int, int, float]:
        """Requests served, of which answered 429, and the fake's CPU seconds so far."""
        self._control.send(("stats",))
        requests, limited, cpu = self._control.recv()
        return int(requests), int(limited), float(cpu)

    def close(self) -> None:
        self._control.send(("stop",))
        self._process.join(timeout=10)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(VENDORS))
    parser.add_argument("n", type=int, nargs="?", default=50_000)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--events", type=int, default=0, help="activities per person")
    parser.add_argument("--pull-only", action="store_true", help="connector alone, no store")
    parser.add_argument(
        "--stream", choices=["contacts", "activities"], default="contacts", help="--pull-only"
    )
    parser.add_argument("--profile", type=Path, help="--pull-only: write a cProfile here")
    parser.add_argument(
        "--method", choices=["probabilistic", "exact"], default="probabilistic", help="matcher"
    )
    parser.add_argument(
        "--batch-first-load",
        type=int,
        default=None,
        help="[matching] batch_first_load (default: the setting's default)",
    )
    args = parser.parse_args()
    events = args.events or (1 if args.pull_only and args.stream == "activities" else 0)
    fake = RemoteFake(args.kind, args.n, args.rate, events)
    try:
        if args.pull_only:
            await pull_only(VENDORS[args.kind], fake, args.stream, args.profile, args.rate)
            return
        with tempfile.TemporaryDirectory() as tmp:
            matching: dict[str, Any] = {"method": args.method}
            if args.batch_first_load is not None:
                matching["batch_first_load"] = args.batch_first_load
            await measure(args.kind, args.n, args.rate, matching, fake, Path(tmp))
    finally:
        fake.close()


def _people(n: int, events: int = 0) -> FakeState:
    state = FakeState(TOKEN)
    state.add_people(n, step_ms=10)
    if events:
        state.add_events(events, start=state.clock + timedelta(seconds=1))
    return state


async def measure(
    kind: str,
    n: int,
    rate: float | None,
    matching: dict[str, Any],
    fake: RemoteFake,
    tmp: Path,
) -> None:
    table = {**VENDORS[kind].config(fake.url, TOKEN), "rate_limit": rate or 100_000}
    if rate:
        table["rate_limit"] = rate * 0.95  # headroom for clock skew between the two
    settings = Settings(
        store={"url": f"sqlite:///{tmp / 'bench.db'}"},
        matching=matching,
        connectors={"src": table},
    )
    db = make_engine(settings.store.url, tmp)
    upgrade(db)
    engine = SyncEngine(settings, db)
    try:
        _, _, fake_cpu = fake.stats()
        started = time.perf_counter()
        cpu = time.process_time()
        first = await engine.run("src")
        full_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu
        requests, limited, fake_after = fake.stats()
        print(
            f"{kind} ({matching}): full sync {first.counts.contacts} contacts in {full_s:.1f}s "
            f"= {first.counts.contacts / full_s:,.0f} contacts/s "
            f"({first.counts.activities} activities; crmhub CPU {cpu_s:.1f}s, "
            f"fake CPU {fake_after - fake_cpu:.1f}s); "
            f"{requests} requests ({requests / full_s:.2f} req/s), {limited} answered 429 "
            f"({100 * limited / max(requests, 1):.2f}%)"
        )
        changed = list(range(1, n + 1, 100))
        fake.touch(changed)
        started = time.perf_counter()
        second = await engine.run("src")
        print(
            f"{kind}: incremental after editing {len(changed)}: "
            f"{second.counts.contacts} contacts, {second.counts.changed} changed, "
            f"{time.perf_counter() - started:.1f}s"
        )
    finally:
        engine.close()


async def pull_only(
    vendor: Any, fake: RemoteFake, stream: str, profile: Path | None, rate: float | None
) -> None:
    """The connector alone: pull every page of `stream`, count records, keep nothing."""
    budget = rate * 0.95 if rate else 100_000  # as `measure`: headroom for clock skew
    connector = Running(vendor, FakeState(TOKEN), fake.url).connector(rate_limit=budget)
    _, _, fake_cpu = fake.stats()
    profiler = cProfile.Profile(time.process_time) if profile else None
    started, cpu = time.perf_counter(), time.process_time()
    count = 0
    if profiler:
        profiler.enable()
    async for page in connector.pull(stream, None):  # type: ignore[arg-type]
        count += len(page.records)
    if profiler and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    requests, limited, fake_after = fake.stats()
    print(
        f"{vendor.kind} {stream} pull-only: {count:,} records in {seconds:.1f}s = "
        f"{count / seconds:,.0f}/s; crmhub CPU {cpu_s:.2f}s ({10_000 * cpu_s / count:.2f} s "
        f"per 10k); fake CPU {fake_after - fake_cpu:.2f}s; {requests} requests "
        f"({requests / seconds:.2f} req/s), {limited} answered 429"
    )


if __name__ == "__main__":
    asyncio.run(main())
