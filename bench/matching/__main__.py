"""Matching benchmark: `python -m bench.matching --records 100000 [--seed 1] [--no-splink]`.

`--pipeline` adds `crmhub sync` of the same data as a plain CSV export into a SQLite store,
timed from start to exit (bench/matching/run_pipeline.py); its clusters are scored alike.

`--calibration`: per band of crmhub's predicted probability, how many candidate pairs fell in
it and what share of them are truly one person (is a probability what it says?).

`--labels 100,500` adds one crmhub run per figure: a simulated steward labels that many pairs
of the review queue from the ground truth, the parameters are trained on them as `crmhub
dedupe train` does, and everything is clustered again (bench/matching/labels.py).

Generates seeded synthetic contacts with ground truth, writes them as one CSV (raw columns
plus the canonical forms both matchers get), then runs crmhub's batch matcher and Splink
(DuckDB, in its own venv; see setup_splink.sh) each in its own process, and prints pairwise
and B-cubed precision/recall/F1, wall time and peak memory (max RSS of that process).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.matching.generate import COLUMNS, generate
from bench.matching.metrics import errors_by_category, scores
from dedupe.normalize import company_key, email_key, fold

HERE = Path(__file__).resolve().parent
EXTRA = ("first_name_norm", "last_name_norm", "email_key", "company_key")


def write_data(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*COLUMNS, *EXTRA])
        writer.writeheader()
        for row in rows:
            row["first_name_norm"] = fold(row["first_name"])
            row["last_name_norm"] = fold(row["last_name"])
            row["email_key"] = email_key(row["email"]) if row["email"] else ""
            row["company_key"] = company_key(row["company"]) if row["company"] else ""
            writer.writerow(row)


def run_measured(cmd: list[str]) -> tuple[dict[str, object], float, float]:
    """Run one matcher process: its JSON line, wall seconds, and its own peak RSS in MiB.

    The JSON line gains `cpu_seconds` (user + system of that process, all its threads): on a
    shared machine wall time depends on the neighbours, CPU time much less.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stderr is not None
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    info: dict[str, object] = json.loads(lines[-1]) if lines else {}
    info["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 2)
    return info, wall, usage.ru_maxrss / 1024


def read_clusters(path: Path) -> dict[str, str]:
    with path.open(newline="") as fh:
        return {r["unique_id"]: r["cluster_id"] for r in csv.DictReader(fh)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.matching")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="also run crmhub with EM training")
    parser.add_argument(
        "--labels",
        default="",
        help="comma-separated label counts: train on that many simulated steward decisions",
    )
    parser.add_argument(
        "--labels-shift-sd",
        type=float,
        default=0.0,
        help="with --labels: recalibrate the prior too ([matching] train_prior_shift_sd)",
    )
    parser.add_argument(
        "--labels-strength",
        type=float,
        default=100.0,
        help="with --labels: [matching] train_prior_strength",
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="also run `crmhub sync` on the data as a CSV export into SQLite (timed whole)",
    )
    parser.add_argument(
        "--calibration",
        action="store_true",
        help="print how often crmhub's candidate pairs in each probability band truly match",
    )
    parser.add_argument("--no-splink", action="store_true")
    parser.add_argument("--splink-python", default="/tmp/splink-venv/bin/python")
    parser.add_argument("--splink-threshold", type=float, default=0.9)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crmhub-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = generate(args.records, args.seed)
    data = workdir / "contacts.csv"
    write_data(rows, data)
    truth = {r["unique_id"]: r["cluster"] for r in rows}
    print(
        f"{len(rows)} records, {len(set(truth.values()))} people, seed {args.seed}, "
        f"generated in {time.perf_counter() - started:.1f}s -> {data}"
    )

    shipped = [sys.executable, "-m", "bench.matching.run_crmhub"]
    runs: list[tuple[str, list[str]]] = [
        ("crmhub (shipped params)", [*shipped, *(["--calibration"] if args.calibration else [])]),
    ]
    if args.train:
        runs.append(
            ("crmhub (EM-trained)", [sys.executable, "-m", "bench.matching.run_crmhub", "--train"])
        )
    for count in [int(x) for x in args.labels.split(",") if x.strip()]:
        runs.append(
            (
                f"crmhub ({count} labels)",
                [
                    *(sys.executable, "-m", "bench.matching.run_crmhub", "--labels", str(count)),
                    *("--shift-sd", str(args.labels_shift_sd)),
                    *("--strength", str(args.labels_strength)),
                ],
            )
        )
    if args.pipeline:
        runs.append(
            ("crmhub sync (pipeline)", [sys.executable, "-m", "bench.matching.run_pipeline"])
        )
    if not args.no_splink:
        if not Path(args.splink_python).exists():
            print(f"Splink venv missing: run bench/matching/setup_splink.sh ({args.splink_python})")
        else:
            runs.append(
                (
                    f"splink {args.splink_threshold}",
                    [args.splink_python, str(HERE / "run_splink.py")],
                )
            )

    header = (
        f"{'matcher':26} {'pair P':>7} {'pair R':>7} {'pair F1':>7} {'B3 P':>7} {'B3 R':>7} "
        f"{'B3 F1':>7} {'match s':>8} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9}"
    )
    results = []
    clusterings: list[dict[str, str]] = []
    for name, base in runs:
        out = workdir / f"{name.split()[0]}-{len(results)}.csv"
        if base[0] == args.splink_python:
            cmd = [*base, str(data), str(out), str(args.splink_threshold)]
        else:
            cmd = [*base[:3], str(data), str(out), *base[3:]]
        info, wall, peak = run_measured(cmd)
        predicted = read_clusters(out)
        s = scores(truth, predicted)
        results.append((name, s, info, wall, peak))
        clusterings.append(predicted)
    print(header)
    for name, s, info, wall, peak in results:
        print(
            f"{name:26} {s['pairwise_precision']:7.4f} {s['pairwise_recall']:7.4f} "
            f"{s['pairwise_f1']:7.4f} {s['bcubed_precision']:7.4f} {s['bcubed_recall']:7.4f} "
            f"{s['bcubed_f1']:7.4f} {float(str(info.get('match_seconds', 'nan'))):8.2f} "
            f"{wall:7.2f} {float(str(info['cpu_seconds'])):7.2f} {peak:9.0f}"
        )
    for name, _, info, _, _ in results:
        print(f"{name}: {json.dumps(info)}")
    for name, _, info, _, _ in results:
        learnt = info.get("labels")
        if isinstance(learnt, dict):
            print(f"\n{name}: {learnt['labels']} -> {learnt['version']}; biggest weight changes:")
            for c in learnt["changes"]:
                print(
                    f"  {c['comparison']:10} {c['level']:12} {c['old_weight']:+7.2f} -> "
                    f"{c['new_weight']:+7.2f} bits ({c['labels']} labelled matches)"
                )
    for name, _, info, _, _ in results:
        bands = info.get("calibration")
        if isinstance(bands, list):
            print(f"\n{name}: candidate pairs by predicted probability")
            print(f"{'band':>14} {'pairs':>10} {'mean p':>7} {'truly one person':>17}")
            for b in bands:
                print(
                    f"{b['from']:>6} - {b['to']:<5} {b['pairs']:10d} {b['mean_p']:7.4f} "
                    f"{b['true_share']:17.4f}"
                )
    # Where the errors are: true pairs missed and false pairs made, by the evidence a pair has.
    by_id = {r["unique_id"]: r for r in rows}
    print()
    print(f"{'errors by pair category':34} {'true':>7}", end="")
    for name, *_ in results:
        print(f" | {name.split()[0][:10]:>10} missed {'false':>6}", end="")
    print()
    tables = [errors_by_category(by_id, truth, predicted) for predicted in clusterings]
    for cat in tables[0] if tables else []:
        print(f"{cat:34} {tables[0][cat]['true']:7d}", end="")
        for table in tables:
            print(f" | {'':>10} {table[cat]['missed']:6d} {table[cat]['false']:6d}", end="")
        print()


if __name__ == "__main__":
    main()
