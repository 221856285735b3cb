"""The whole pipeline on a benchmark CSV: `python -m bench.matching.run_pipeline IN OUT`.

What an ops team runs: the benchmark's contacts as a plain CSV export (id, name, email, phone,
company, city: no ground truth, no pre-normalised columns), a config with a SQLite store and a
`csv` connector on the default probabilistic matcher, and `crmhub sync` in its own process.
Timed is that command alone, from start to exit (read, map, stage, match, merge, commit);
then the store's golden records are written to OUT as `unique_id,cluster_id`. One JSON line of
timings and counts goes to stdout.
"""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from sync.store import make_engine, membership, source_record

FIELDS = ("first_name", "last_name", "email", "phone", "company", "city")


def main(argv: list[str]) -> None:
    src, out = Path(argv[0]), Path(argv[1])
    with tempfile.TemporaryDirectory(prefix="crmhub-pipeline-") as tmp:
        folder = Path(tmp)
        export = folder / "contacts.csv"
        with src.open(newline="") as fh, export.open("w", newline="") as dst:
            writer = csv.writer(dst)
            writer.writerow(["id", *FIELDS])
            for row in csv.DictReader(fh):
                writer.writerow([row["unique_id"], *(row[f] for f in FIELDS)])
        config = folder / "crmhub.toml"
        config.write_text(
            f'[store]\nurl = "sqlite:///{folder / "crmhub.db"}"\n\n'
            f'[connectors.export]\ntype = "csv"\npath = "{export}"\n',
            encoding="utf-8",
        )
        started, cpu = time.perf_counter(), _children_cpu()
        cmd = [sys.executable, "-m", "crmhub", "--config", str(config), "sync", "export"]
        done = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"crmhub sync failed ({done.returncode}):\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout)
        db = make_engine(f"sqlite:///{folder / 'crmhub.db'}", folder)
        with db.connect() as conn, out.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["unique_id", "cluster_id"])
            query = select(source_record.c.external_id, membership.c.golden_id).join(
                membership, membership.c.record_id == source_record.c.id
            )
            writer.writerows(conn.execute(query))
        db.dispose()
    print(
        json.dumps(
            {
                "match_seconds": round(seconds, 2),  # the whole `crmhub sync`
                "sync_cpu_seconds": round(_children_cpu() - cpu, 2),
                "summary": summary,
            }
        )
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main(sys.argv[1:])
