"""Run crmhub's batch matcher on a benchmark CSV: `python -m bench.matching.run_crmhub IN OUT`.

Writes `unique_id,cluster_id` to OUT and one JSON line of timings and counts to stdout. Run as
its own process by the harness, so its peak memory is measured alone. `--train`: EM on the
data first. `--labels N`: a simulated steward labels N review pairs, the parameters are
trained on them and OUT holds the clusters of the trained parameters (bench/matching/labels.py).
`--calibration`: the JSON line also says, per band of predicted probability, how many
candidate pairs fell in it and what share of them are truly one person (`calibration`).
"""

from __future__ import annotations

import csv
import json
import sys
import time

import numpy as np
import numpy.typing as npt

from bench.matching.labels import label_review_pairs, retrain
from crmhub.records import Contact
from dedupe.cluster import cluster_prepared, collection_paused, frequency_table, train
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import prepare


def main(argv: list[str]) -> None:
    src, out = argv[0], argv[1]
    do_train = "--train" in argv
    n_labels = int(argv[argv.index("--labels") + 1]) if "--labels" in argv else 0
    shift_sd = float(argv[argv.index("--shift-sd") + 1]) if "--shift-sd" in argv else 0.0
    strength = float(argv[argv.index("--strength") + 1]) if "--strength" in argv else 100.0
    truth: list[str] = []  # the ground truth: read only by the simulated steward
    start, cpu_start = time.perf_counter(), time.process_time()
    ids: list[str] = []
    records = []
    contacts: list[Contact] = []  # kept only when training needs them
    with open(src, newline="") as fh, collection_paused():
        # One row at a time to its prepared form: no table of dicts or Contacts stays alive.
        for r in csv.DictReader(fh):
            contact = Contact(
                first_name=r["first_name"] or None,
                last_name=r["last_name"] or None,
                emails=[r["email"].lower()] if r["email"] else [],
                phones=[r["phone"]] if r["phone"] else [],
                company=r["company"] or None,
                city=r["city"] or None,
            )
            ids.append(r["unique_id"])
            truth.append(r["cluster"])
            records.append(prepare(contact))
            if do_train:
                contacts.append(contact)
    loaded, cpu_loaded = time.perf_counter(), time.process_time()
    params = train(contacts) if do_train else None
    del contacts
    trained, cpu_trained = time.perf_counter(), time.process_time()
    matcher = FellegiSunterMatcher(params, frequencies=frequency_table(records, blocking=False))
    result = cluster_prepared(records, matcher)
    done, cpu_done = time.perf_counter(), time.process_time()
    bands = (
        calibration(result.pairs.ia, result.pairs.ib, result.probabilities, truth)
        if "--calibration" in argv
        else None
    )
    learnt: dict[str, object] = {}
    if n_labels:
        ia, ib, labels = label_review_pairs(result, truth, n_labels, seed=n_labels)
        trained_params = retrain(records, matcher, ia, ib, labels, strength, shift_sd)
        learnt = trained_params.as_dict(top=8)
        learnt["review_pairs_before"] = len(result.review)
        matcher = FellegiSunterMatcher(trained_params.params, frequencies=matcher.frequencies)
        result = cluster_prepared(records, matcher)
        learnt["relearn_seconds"] = time.perf_counter() - done
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["unique_id", "cluster_id"])
        for members in result.clusters:
            for i in members:
                writer.writerow([ids[i], ids[members[0]]])
    print(
        json.dumps(
            {
                "load_seconds": loaded - start,
                "train_seconds": trained - loaded,
                "match_seconds": done - trained,
                "load_cpu_seconds": round(cpu_loaded - cpu_start, 2),
                "match_cpu_seconds": round(cpu_done - cpu_trained, 2),
                "candidate_pairs": len(result.pairs.ia),
                "review_pairs": len(result.review),
                "capped_keys": len(result.capped),
                **({"labels": learnt} if learnt else {}),
                **({"calibration": bands} if bands is not None else {}),
            }
        )
    )


BANDS = (0.0, 0.01, 0.05, 0.2, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


def calibration(
    ia: npt.NDArray[np.int64],
    ib: npt.NDArray[np.int64],
    probabilities: npt.NDArray[np.float64],
    truth: list[str],
) -> list[dict[str, float]]:
    """Per probability band: candidate pairs, their mean predicted probability and the share
    that are truly one person. A calibrated model has the two close in every band; then no
    threshold can take the misses of a band without as many wrong merges as its share says."""
    people = np.unique(np.asarray(truth), return_inverse=True)[1].ravel()
    same = people[ia] == people[ib]
    band = np.clip(np.searchsorted(BANDS, probabilities, side="right") - 1, 0, len(BANDS) - 2)
    out = []
    for k in range(len(BANDS) - 1):
        at = band == k
        if at.any():
            out.append(
                {
                    "from": BANDS[k],
                    "to": BANDS[k + 1],
                    "pairs": int(at.sum()),
                    "mean_p": round(float(probabilities[at].mean()), 4),
                    "true_share": round(float(same[at].mean()), 4),
                }
            )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
