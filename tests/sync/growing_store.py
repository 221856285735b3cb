"""Helpers of the tests of a store that grows: a CSV source of generated contacts, and
generated contacts as pushed records (a webhook's or a form's)."""

from __future__ import annotations

from pathlib import Path

from bench.incremental import CSV_COLUMNS, _write_csv
from crmhub.records import RawRecord
from crmhub.settings import Settings
from tests.conftest import make_settings


def pushed(rows: list[dict[str, str]]) -> list[RawRecord]:
    """Generated rows (bench.matching.generate) as records pushed to source "contacts"."""
    return [
        RawRecord(
            "", "contact", {"id": f"C-{r['unique_id']}", **{c: r[c] for c in CSV_COLUMNS[1:]}}
        )
        for r in rows
    ]


def csv_source(
    tmp_path: Path, store_url: str, rows: list[dict[str, str]], **options: object
) -> Settings:
    """Settings of a CSV source "contacts" holding `rows` (more connector `options`)."""
    export = tmp_path / "contacts.csv"
    _write_csv(rows, export)
    source = {"type": "csv", "path": str(export), **options}
    return make_settings(tmp_path, store_url, {"contacts": source})
