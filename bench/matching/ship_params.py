"""Regenerate dedupe/data/default_params.json: EM (no labels) on seeded synthetic contacts.

`python -m bench.matching.ship_params [--records 20000] [--seed 99]`. The seed differs from
the benchmark's, and training never sees the ground-truth column.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.matching.generate import generate
from crmhub.records import Contact
from dedupe.cluster import train

TARGET = Path(__file__).resolve().parents[2] / "dedupe" / "data" / "default_params.json"


def contact(row: dict[str, str]) -> Contact:
    return Contact(
        first_name=row["first_name"] or None,
        last_name=row["last_name"] or None,
        emails=[row["email"].lower()] if row["email"] else [],
        phones=[row["phone"]] if row["phone"] else [],
        company=row["company"] or None,
        city=row["city"] or None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.matching.ship_params")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args()
    params = train([contact(r) for r in generate(args.records, args.seed)])
    params.trained_on = 0  # shipped defaults: "not trained on your data"
    TARGET.write_text(params.to_json() + "\n", encoding="utf-8")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
