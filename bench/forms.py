"""`python -m bench.forms --n 10000 --rate 200`: signed form webhooks against `crmhub serve`.

Starts `crmhub serve` (uvicorn, one process; with `--process drain` also a
`crmhub forms drain --follow` process) on loopback over a fresh store, sends `--n`
signed generic deliveries open-loop at `--rate` per second (10% are people seen before, so
matching merges), then replays a sample of them. Reports the sustained rate, p50/p95/p99 of
the 2xx, how long processing lagged behind, and the loss/duplication check: every accepted
delivery is one inbox row, processed, one activity; every replay is answered `duplicate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from bench.synthetic import FIRST, LAST
from connectors.webform import sign_generic
from sync.migrate import upgrade
from sync.store import activity, inbox, make_engine, source_record

SECRET = "bench-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _payload(i: int, rng: random.Random) -> dict[str, Any]:
    person = rng.randrange(i) if i > 10 and rng.random() < 0.1 else i  # 10% repeat people
    # Varied names (bench/synthetic.py lists): one shared surname would put every person in
    # one matching block and measure the blocking, not the intake.
    first, last = FIRST[person % len(FIRST)], LAST[(person // len(FIRST)) % len(LAST)]
    return {
        "submission_id": f"bench-{i}",
        "form": "bench",
        "fields": {
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{person}@bench.example",
            "company": f"Company {person % 500}",
            "message": "Please call me back about pricing.",
        },
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _send(n: int, rate: float, url: str, concurrency: int) -> dict[str, Any]:
    rng = random.Random(1)
    bodies = [json.dumps(_payload(i, rng)).encode() for i in range(n)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def post(body: bytes) -> None:
            async with gate:
                headers = {
                    "content-type": "application/json",
                    "X-Crmhub-Signature": sign_generic(SECRET, body, int(time.time())),
                }
                started = time.perf_counter()
                response = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        start = time.perf_counter()
        tasks = []
        for i, body in enumerate(bodies):
            delay = start + i / rate - time.perf_counter()  # open loop: a fixed schedule
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(body)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        # Replays: a sample re-sent, each must be answered `duplicate`.
        replayed = 0
        for body in rng.sample(bodies, min(200, n)):
            headers = {
                "content-type": "application/json",
                "X-Crmhub-Signature": sign_generic(SECRET, body, int(time.time())),
            }
            answer = await client.post(url, content=body, headers=headers)
            replayed += answer.json().get("status") == "duplicate"
    return {
        "sent": n,
        "seconds": round(elapsed, 2),
        "sustained_rps": round(n / elapsed, 1),
        "statuses": statuses,
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 1),
        "p95_ms": round(_percentile(latencies, 0.95) * 1000, 1),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "replays_answered_duplicate": f"{replayed}/{min(200, n)}",
    }


def _counts(store_url: str) -> dict[str, int]:
    db = make_engine(store_url)
    try:
        with db.connect() as conn:

            def n(table: Any, *where: Any) -> int:
                q = select(func.count()).select_from(table).where(*where)
                return int(conn.execute(q).scalar_one())

            return {
                "inbox": n(inbox),
                "inbox_done": n(inbox, inbox.c.status == "done"),
                "activities": n(activity),
                "activity_records": n(source_record, source_record.c.kind == "activity"),
                "contact_records": n(source_record, source_record.c.kind == "contact"),
            }
    finally:
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0, help="deliveries per second")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--wait", type=float, default=900, help="max seconds to wait for processing"
    )
    parser.add_argument("--store", default="", help="store URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--process",
        choices=["inline", "drain", "after"],
        default="inline",
        help="inline: serve maps and matches; drain: a `crmhub forms drain --follow` process "
        "does, concurrently; after: that process starts once every delivery is answered",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="crmhub-bench-forms-"))
    store_url = args.store or f"sqlite:///{workdir / 'store.db'}"
    db = make_engine(store_url)
    upgrade(db)
    db.dispose()
    config = workdir / "crmhub.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\n'
        '[connectors.bench]\ntype = "webform"\nsecret = "${BENCH_FORMS_SECRET}"\n'
        f'process = "{"inline" if args.process == "inline" else "drain"}"\n'
    )
    port = _free_port()
    env = {**os.environ, "BENCH_FORMS_SECRET": SECRET}
    server = subprocess.Popen(
        [sys.executable, "-m", "crmhub", "--config", str(config), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    drain_cmd = [sys.executable, "-m", "crmhub", "--config", str(config), "forms", "drain"]
    drainer = None
    if args.process == "drain":
        drainer = subprocess.Popen([*drain_cmd, "--follow"], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("crmhub serve did not start") from None
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/hooks/forms/bench"
        result = asyncio.run(_send(args.n, args.rate, url, args.concurrency))
        print(json.dumps({"answered": result}), file=sys.stderr, flush=True)
        sent_done = time.perf_counter()
        if args.process == "after":
            drainer = subprocess.Popen([*drain_cmd, "--follow"], env=env, stdout=subprocess.DEVNULL)
        # Wait for processing while it makes progress (a slow machine is not a loss).
        last, stalled_since = -1, time.perf_counter()
        while (done := _counts(store_url)["inbox_done"]) < args.n:
            if done != last:
                last, stalled_since = done, time.perf_counter()
            elif time.perf_counter() - stalled_since > 60:
                break
            if time.perf_counter() - sent_done > args.wait:
                break
            time.sleep(0.5)
        result["processing_lag_s"] = round(time.perf_counter() - sent_done, 2)
    finally:
        for proc in (server, drainer):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
    counts = _counts(store_url)
    result.update(counts)
    ok = result["statuses"].get(200, 0)
    result["acknowledged_not_in_inbox"] = ok - counts["inbox"]  # lost: must be 0
    result["unprocessed"] = counts["inbox"] - counts["inbox_done"]
    result["duplicated"] = counts["activity_records"] - counts["inbox_done"]
    result["target_rps"] = args.rate
    result["process"] = args.process
    result["store"] = store_url.split(":", 1)[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
