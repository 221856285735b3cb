"""Run crmhub's batch matcher on a benchmark CSV: `python -m bench.matching.run_crmhub IN OUT`.

Writes `unique_id,cluster_id` to OUT and one JSON line of timings and counts to stdout. Run as
its own process by the harness, so its peak memory is measured alone.
"""

from __future__ import annotations

import csv
import json
import sys
import time

from crmhub.records import Contact
from dedupe.cluster import cluster_prepared, frequency_table, train
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import prepare


def main(argv: list[str]) -> None:
    src, out = argv[0], argv[1]
    do_train = "--train" in argv
    start = time.perf_counter()
    ids: list[str] = []
    records = []
    contacts: list[Contact] = []  # kept only when training needs them
    with open(src, newline="") as fh:
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
            records.append(prepare(contact))
            if do_train:
                contacts.append(contact)
    loaded = time.perf_counter()
    params = train(contacts) if do_train else None
    del contacts
    trained = time.perf_counter()
    matcher = FellegiSunterMatcher(params, frequencies=frequency_table(records, blocking=False))
    result = cluster_prepared(records, matcher)
    done = time.perf_counter()
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
                "candidate_pairs": len(result.pairs.ia),
                "review_pairs": len(result.review),
                "capped_keys": len(result.capped),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
