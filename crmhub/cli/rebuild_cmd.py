"""`crmhub rebuild [--dry-run] [--yes]`: re-map stored payloads and re-match every contact.

After a change of mapping or matching settings: `--dry-run` shows what would change (clusters
kept, changed, merged, split, new; records moved, per source) and writes nothing; without it
the change is applied in one transaction, unless it moves more than `[matching]
rebuild_max_moved_share` of the contacts, which needs `--yes`.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from crmhub.cli.common import (
    EXIT_NEEDS_CONFIRMATION,
    console,
    die,
    open_store,
    print_json,
    state,
)
from crmhub.cli.review_cmd import ACTOR, _default_actor

__all__ = ["register"]


def _print(report: dict[str, Any], heading: str) -> None:
    console.print(heading, markup=False)
    table = Table(title="rebuild", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    clusters = report["clusters"]
    rows = [
        ("contacts", report["contacts"]),
        ("activities", report["activities"]),
        ("records re-mapped (mapping changed)", report["remapped"]),
        ("payloads the mapping now rejects", report["failed"]),
        ("contacts with outdated match keys", report["match_keys_outdated"]),
        ("clusters kept as they are", clusters.get("kept", 0)),
        ("clusters whose members change", clusters.get("changed", 0)),
        ("clusters merged from several golden records", clusters.get("merged", 0)),
        ("golden records becoming aliases", report["goldens_merged"]),
        ("golden records split", report["goldens_split"]),
        ("new golden records", clusters.get("new", 0)),
        ("records moved", f"{report['records_moved']} ({report['moved_share']:.1%})"),
        ("pairs to queue for review", report["reviews"]),
    ]
    for what, count in rows:
        table.add_row(what, str(count))
    console.print(table)
    sources = Table(title="per source", title_justify="left")
    for column in ("source", "contacts", "re-mapped", "rejected", "moved"):
        sources.add_column(column, justify="left" if column == "source" else "right")
    for name, c in report["per_source"].items():
        sources.add_row(
            name, str(c["records"]), str(c["remapped"]), str(c["failed"]), str(c["moved"])
        )
    console.print(sources)
    for f in report["failures"]:
        console.print(f"  rejected: record {f['record_id']} ({f['source']}): {f['reason']}")
    if report["unconfigured_sources"]:
        names = ", ".join(report["unconfigured_sources"])
        console.print(f"not re-mapped (no longer configured, kept as staged): {names}")


def rebuild(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
    yes: bool = typer.Option(
        False, "--yes", help="Apply even if more records move than rebuild_max_moved_share."
    ),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Recompute canonical data, match keys and golden records from the stored raw payloads
    (nothing is fetched again), after a change of mapping or matching settings."""
    from sync.rebuild import RebuildRefusedError
    from sync.rebuild_apply import preview
    from sync.rebuild_apply import rebuild as apply_rebuild

    settings = state(ctx).settings
    db = open_store(settings)
    if dry_run:
        report = preview(db, settings).summary()
        report["applied"] = False
        if as_json:
            print_json(report)
        else:
            _print(report, "dry run: nothing written; this is what `crmhub rebuild` would do")
        return
    try:
        plan = apply_rebuild(db, settings, actor=actor or _default_actor(), confirm=yes)
    except RebuildRefusedError as exc:
        if as_json:
            print_json({"applied": False, "refused": str(exc), **exc.attrs()})
            raise typer.Exit(EXIT_NEEDS_CONFIRMATION) from None
        die(str(exc), EXIT_NEEDS_CONFIRMATION)
    report = plan.summary()
    report["applied"] = True
    if as_json:
        print_json(report)
    else:
        _print(report, "rebuilt")


def register(app: typer.Typer) -> None:
    app.command("rebuild")(rebuild)
