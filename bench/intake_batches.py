"""`python -m bench.intake_batches 1 5 25 100 --n 1000`: processing CPU per delivery by batch size.

For each batch size: a fresh SQLite store, `--n` generic deliveries accepted into the inbox
(as bench/forms.py sends them), then one `Intake.process_pending()` with that batch size.
Prints the CPU time per delivery of this process and its children (mapping helper), which
does not depend on the machine's load: what a batch costs beyond its deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import sync.intake
from bench.forms import _cpu_seconds, _payload
from crmhub.settings import Settings
from sync.intake import Intake
from sync.migrate import upgrade
from sync.store import make_engine


def measure(batch: int, n: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="crmhub-bench-batches-"))
    url = f"sqlite:///{workdir / 'store.db'}"
    db = make_engine(url)
    upgrade(db)
    settings = Settings(
        store={"url": url}, connectors={"bench": {"type": "webform", "secret": "unused"}}
    )
    settings.source_path = workdir / "crmhub.toml"
    intake = Intake(settings, db)
    rng = random.Random(1)
    try:
        for i in range(n):
            body = json.dumps(_payload(i, rng))
            intake.record("bench", f"generic:bench-{i}", "application/json", body)
        sync.intake.BATCH_SIZE = batch
        sync.intake.BATCH_GAP = 0.0
        cpu, wall = _cpu_seconds(os.getpid()), time.perf_counter()
        report = asyncio.run(intake.process_pending())
        cpu, wall = _cpu_seconds(os.getpid()) - cpu, time.perf_counter() - wall
    finally:
        intake.close()
        db.dispose()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "batch": batch,
        "processed": report.processed,
        "cpu_ms_per_delivery": round(cpu * 1000 / n, 2),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batches", type=int, nargs="+")
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    for batch in args.batches:
        print(json.dumps(measure(batch, args.n)), flush=True)


if __name__ == "__main__":
    main()
