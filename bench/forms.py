"""`python -m bench.forms --n 10000 --rate 200`: signed form webhooks against `crmhub serve`.

Starts `crmhub serve` (uvicorn and its processor process; `--process thread`: processing in
the server process; `drain`/`after`: a `crmhub forms drain --follow` process instead) on
loopback over a fresh store, sends `--n` signed generic deliveries open-loop at `--rate` per
second over keep-alive connections (bench/loadgen.py; 10% are people seen before, so matching
merges), then replays 200 of them. Reports the sustained rate and p50/p95/p99 of the 2xx
(from each request's scheduled time), CPU per request of the web process (load-independent)
and per delivery in all, the machine's load, how long processing lagged behind, and the
check against the store, delivery by delivery: nothing acknowledged is missing from the
inbox or unprocessed into a contact and an activity, nothing is stored twice, and every
replay is answered `duplicate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import func, select

from bench.loadgen import Request, post_open_loop
from bench.synthetic import FIRST, LAST
from connectors.webform import sign_generic
from sync.inbox_store import InboxStore
from sync.migrate import upgrade
from sync.store import activity, inbox, make_engine, membership, source_record

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


def _cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU of process `pid` (all threads) and, with `children`, of its live
    child processes, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            # Fields after the parenthesised command: utime and stime are the 12th and 13th.
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            if not children:
                break
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _signed(body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "X-Crmhub-Signature": sign_generic(SECRET, body, int(time.time())),
    }


async def _send(n: int, rate: float, port: int, connections: int) -> dict[str, Any]:
    rng = random.Random(1)
    path = "/hooks/forms/bench"
    bodies = [json.dumps(_payload(i, rng)).encode() for i in range(n)]
    sent = await post_open_loop(
        "127.0.0.1", port, [Request(path, b, _signed) for b in bodies], rate, connections
    )
    answered = [a for a in sent.answers if a is not None]
    latencies = [a.latency for a in answered if 200 <= a.status < 300]
    statuses: dict[int, int] = {}
    for a in answered:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    # Replays: a sample re-sent after the run, each must be answered `duplicate`.
    sample = rng.sample(bodies, min(200, n))
    replays = await post_open_loop(
        "127.0.0.1", port, [Request(path, b, _signed) for b in sample], rate, 4
    )
    duplicates = sum(
        1
        for a in replays.answers
        if a is not None and orjson.loads(a.body).get("status") == "duplicate"
    )
    return {
        "sent": n,
        "seconds": round(sent.elapsed, 2),
        "sustained_rps": round(len(latencies) / sent.elapsed, 1),
        "statuses": statuses,
        "unanswered": n - len(answered),
        "resent_after_broken_connection": sent.resent,
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 1),
        "p95_ms": round(_percentile(latencies, 0.95) * 1000, 1),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "client_loop_lag_p99_ms": round(_percentile(sent.loop_lag, 0.99) * 1000, 1),
        "replays_answered_duplicate": f"{duplicates}/{len(sample)}",
        "timeline": [
            (round(i / rate, 3), round(a.latency * 1000, 1) if a else None, a.status if a else None)
            for i, a in enumerate(sent.answers)
        ],
        "accepted_ids": sorted(
            orjson.loads(a.body)["delivery"] for a in answered if a.status == 200
        ),
    }


def _done_count(store_url: str) -> int:
    db = make_engine(store_url)
    store = InboxStore(db)
    try:
        with store.engine.connect() as conn:
            query = select(func.count()).select_from(inbox).where(inbox.c.status == "done")
            return int(conn.execute(query).scalar_one())
    finally:
        store.close()
        db.dispose()


def _verify(store_url: str, n: int, accepted: list[str]) -> dict[str, Any]:
    """Check the store against what was sent and acknowledged, delivery by delivery."""
    db = make_engine(store_url)
    store = InboxStore(db)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(
                    inbox.c.delivery_id,
                    inbox.c.status,
                    inbox.c.attempts,
                    inbox.c.received_at,
                    inbox.c.processed_at,
                ).where(inbox.c.connector == "bench")
            ).all()
        with db.connect() as conn:
            staged = conn.execute(
                select(source_record.c.kind, source_record.c.external_id).where(
                    source_record.c.source == "bench"
                )
            ).all()
            activities = conn.execute(
                select(func.count())
                .select_from(activity.join(source_record))
                .where(source_record.c.source == "bench")
            ).scalar_one()
            members = conn.execute(
                select(func.count())
                .select_from(membership.join(source_record))
                .where(source_record.c.source == "bench", source_record.c.kind == "contact")
            ).scalar_one()
    finally:
        store.close()
        db.dispose()
    in_inbox = [r.delivery_id for r in rows]
    delays = [
        (r.processed_at - r.received_at).total_seconds() for r in rows if r.processed_at is not None
    ]
    sent = {f"bench-{i}" for i in range(n)}
    by_kind: dict[str, list[str]] = {"contact": [], "activity": []}
    for kind, external_id in staged:
        by_kind.setdefault(kind, []).append(external_id)
    acknowledged = {d.removeprefix("generic:") for d in accepted}
    return {
        "inbox_rows": len(in_inbox),
        "inbox_done": sum(1 for r in rows if r.status == "done"),
        # Lost: acknowledged with a 2xx but missing from the inbox, or never processed into
        # a contact record and an activity.
        "lost": len(set(accepted) - set(in_inbox))
        + len(acknowledged - set(by_kind["contact"]))
        + len(acknowledged - set(by_kind["activity"])),
        "unprocessed": sum(1 for r in rows if r.status != "done"),
        # Duplicated: a delivery stored twice, a submission staged or linked twice, or
        # anything staged that was never sent.
        "duplicated": (len(in_inbox) - len(set(in_inbox)))
        + sum(len(ids) - len(set(ids)) for ids in by_kind.values())
        + (int(activities) - len(set(by_kind["activity"])))
        + (int(members) - len(set(by_kind["contact"])))
        + len((set(by_kind["contact"]) | set(by_kind["activity"])) - sent),
        "claimed_more_than_once": sum(1 for r in rows if r.attempts > 1),
        # Receipt to "done" in the inbox: how soon a submission was a matched contact.
        "processed_after_receipt_p50_s": round(_percentile(delays, 0.5), 2) if delays else None,
        "processed_after_receipt_p99_s": round(_percentile(delays, 0.99), 2) if delays else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0, help="deliveries per second")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument(
        "--wait", type=float, default=900, help="max seconds to wait for processing"
    )
    parser.add_argument("--latencies", default="", help="write each request's latency here")
    parser.add_argument("--keep", action="store_true", help="keep the store and config")
    parser.add_argument("--store", default="", help="store URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--process",
        choices=["process", "thread", "drain", "after"],
        default="process",
        help="process: serve maps and matches in its processor process (the default); thread: "
        "in the server process; drain: the connector only accepts and a `crmhub forms drain "
        "--follow` process does it, concurrently; after: that process starts once every "
        "delivery is answered",
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
        f'process = "{"inline" if args.process in ("process", "thread") else "drain"}"\n'
    )
    port = _free_port()
    env = {**os.environ, "BENCH_FORMS_SECRET": SECRET}
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "crmhub", "--config", str(config), "serve"),
            *(
                "--port",
                str(port),
                "--processing",
                "thread" if args.process == "thread" else "process",
            ),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    print(f"crmhub serve: pid {server.pid}", file=sys.stderr, flush=True)
    drain_cmd = [sys.executable, "-m", "crmhub", "--config", str(config), "forms", "drain"]
    drainer = None
    if args.process == "drain":
        drainer = subprocess.Popen([*drain_cmd, "--follow"], env=env, stdout=subprocess.DEVNULL)

    def cpu() -> tuple[float, float]:
        """CPU seconds so far: the web process alone, and everything processing beside it
        (serve's processor process, or the drain process)."""
        web = _cpu_seconds(server.pid, children=False)
        beside = _cpu_seconds(server.pid) - web + (_cpu_seconds(drainer.pid) if drainer else 0)
        return web, beside

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
        time.sleep(3)  # the processor process's start-up (imports) is not the run's work
        load_before = os.getloadavg()[0]
        (web_start, beside_start), client_start = cpu(), time.process_time()
        result = asyncio.run(_send(args.n, args.rate, port, args.connections))
        accepted: list[str] = result.pop("accepted_ids")
        timeline = result.pop("timeline")
        if args.latencies:
            # One line per request: seconds into the run it was due, latency ms, status.
            with open(args.latencies, "w") as out:
                out.writelines(f"{t} {ms} {status}\n" for t, ms, status in timeline)
        # CPU per request does not depend on the machine's load, unlike the latencies.
        requests = args.n + min(200, args.n)  # the replays are requests too
        web, beside = cpu()
        result["web_cpu_s"] = round(web - web_start, 2)
        result["web_cpu_ms_per_request"] = round((web - web_start) * 1000 / requests, 2)
        result["processing_cpu_s_while_sending"] = round(beside - beside_start, 2)
        result["client_cpu_s"] = round(time.process_time() - client_start, 2)
        result["load_average_1m"] = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
        print(json.dumps({"answered": result}), file=sys.stderr, flush=True)
        sent_done = time.perf_counter()
        if args.process == "after":
            drainer = subprocess.Popen([*drain_cmd, "--follow"], env=env, stdout=subprocess.DEVNULL)
        # Wait for processing while it makes progress (a slow machine is not a loss).
        last, stalled_since = -1, time.perf_counter()
        while (done := _done_count(store_url)) < len(accepted):
            if done != last:
                last, stalled_since = done, time.perf_counter()
            elif time.perf_counter() - stalled_since > 60:
                break
            if time.perf_counter() - sent_done > args.wait:
                break
            time.sleep(0.2)
        result["processing_lag_s"] = round(time.perf_counter() - sent_done, 2)
        # All CPU the run cost the server side: intake plus map, match and merge.
        web, beside = cpu()
        total = web - web_start + beside - beside_start
        result["total_cpu_ms_per_delivery"] = round(total * 1000 / args.n, 2)
    finally:
        for proc in (server, drainer):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
    result.update(_verify(store_url, args.n, accepted))
    result["target_rps"] = args.rate
    result["process"] = args.process
    result["store"] = store_url.split(":", 1)[0]
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
