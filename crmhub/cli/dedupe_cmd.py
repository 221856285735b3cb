"""`crmhub dedupe train|params|rollback`: the matcher learns from steward decisions.

Approvals, rejections and unmerges are labelled pairs (sync/labels.py); `train` re-estimates
the matcher's parameters from them and stores a new version, which the next sync uses.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from crmhub.cli.common import console, open_store, print_json, state
from crmhub.cli.review_cmd import ACTOR, _default_actor

__all__ = ["register"]

dedupe_app = typer.Typer(
    help="The matcher's parameters: train them on steward decisions, show, roll back.",
    no_args_is_help=True,
)

_SAID = {
    "trained": "trained",
    "dry_run": "dry run: nothing stored; this is what `crmhub dedupe train` would do",
    "unchanged": "nothing to do: no new decisions since the active parameters were trained "
    "(--force trains anyway)",
    "too_few_labels": "too few steward decisions to learn from",
}


def _print_changes(changes: list[dict[str, Any]]) -> None:
    table = Table(title="largest weight changes (bits, log2 m/u)", title_justify="left")
    for column in ("comparison", "level", "labels", "old m", "new m", "old weight", "new weight"):
        table.add_column(column, justify="left" if column in ("comparison", "level") else "right")
    for c in changes:
        shift = c["new_weight"] - c["old_weight"]
        colour = "green" if shift > 0 else "red" if shift < 0 else "dim"
        table.add_row(
            c["comparison"],
            c["level"],
            str(c["labels"]),
            f"{c['old_m']:.4f}",
            f"{c['new_m']:.4f}",
            f"{c['old_weight']:+.2f}",
            f"[{colour}]{c['new_weight']:+.2f}[/]",
        )
    console.print(table)


@dedupe_app.command()
def train(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; store nothing."),
    force: bool = typer.Option(False, "--force", help="Train even if no decision is new."),
    top: int = typer.Option(10, help="How many of the largest weight changes to show."),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Re-estimate the matcher from steward decisions (approve = same person; reject and
    unmerge = different people). The next sync uses the new parameters."""
    from sync.model_params import train as run_training

    settings = state(ctx).settings
    outcome = run_training(
        open_store(settings),
        settings,
        actor=actor or _default_actor(),
        dry_run=dry_run,
        force=force,
    )
    report = outcome.as_dict(top=top)
    if as_json:
        print_json(report)
        return
    labels = report["labels"]
    used = f"{labels['match']} same-person and {labels['non_match']} different-people decisions"
    console.print(f"{_SAID[outcome.status]}; labels: {used}")
    if outcome.status == "too_few_labels":
        console.print(
            f"[matching] train_min_labels = {outcome.min_labels}: decide more pairs in the "
            "review queue (`crmhub review list`), or lower the setting. Nothing changed; the "
            f"matcher keeps {outcome.previous_version}.",
            markup=False,  # "[matching]" is a config table, not Rich markup
        )
        return
    if outcome.status == "unchanged":
        console.print(f"active: {outcome.previous_version}")
        return
    verb = "would become" if outcome.status == "dry_run" else "is now"
    console.print(f"model: {outcome.previous_version} -> {outcome.version} ({verb} active)")
    if report.get("prior_shift_bits"):
        console.print(f"prior shifted by {report['prior_shift_bits']:+.2f} bits")
    _print_changes(report["changes"])


@dedupe_app.command()
def params(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show the active model version, the labels available, and every trained version."""
    from dedupe.scoring import MODEL_VERSION
    from sync.labels import label_counts
    from sync.model_params import active_params, history

    settings = state(ctx).settings
    with open_store(settings).connect() as conn:
        active = active_params(conn)
        rows = history(conn)
        labels = label_counts(conn)
    report = {
        "active": active.version,
        "comparisons": MODEL_VERSION,
        "provenance": active.provenance,
        "labels": labels,
        "min_labels": settings.matching.train_min_labels,
        "schedule": settings.matching.train_schedule,
        "history": rows,
    }
    if as_json:
        print_json(report)
        return
    source = "shipped parameters" if not active.provenance else "trained on steward decisions"
    console.print(f"active model: [bold]{active.version}[/] ({source})")
    made = active.provenance
    if made:
        used = made.get("labels", {})
        console.print(
            f"  trained {made.get('trained_at')} by {made.get('trained_by')} from "
            f"{used.get('match', 0)} same-person and {used.get('non_match', 0)} "
            f"different-people decisions"
        )
    console.print(
        f"labels now: {labels['match']} same-person, {labels['non_match']} different-people "
        f"(training needs {settings.matching.train_min_labels}); schedule: "
        f"{settings.matching.train_schedule or 'none (run `crmhub dedupe train`)'}"
    )
    if rows:
        table = Table(title="trained versions", title_justify="left")
        for column in ("version", "labels", "created", "by", "state"):
            table.add_column(column)
        for r in rows:
            if r["active"]:
                note = "active"
            elif r["retired_at"]:
                note = f"retired {r['retired_at']}"
            elif not r["usable"]:
                note = f"for comparisons {r['base_version']}: train again"
            else:
                note = ""
            table.add_row(
                r["version"],
                f"{r['labels']['match']} / {r['labels']['non_match']}",
                r["created_at"],
                r["created_by"],
                note,
            )
        console.print(table)


@dedupe_app.command()
def rollback(
    ctx: typer.Context,
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Retire the active trained parameters: the previous version (or the shipped one) is
    used from the next sync on. Nothing is deleted."""
    from sync.model_params import rollback as retire

    settings = state(ctx).settings
    result = retire(open_store(settings), actor or _default_actor())
    if as_json:
        print_json(result)
    elif result["retired"] is None:
        console.print(f"no trained parameters in use; the matcher runs {result['active']}")
    else:
        console.print(f"retired {result['retired']}; active now: {result['active']}")


def register(app: typer.Typer) -> None:
    app.add_typer(dedupe_app, name="dedupe")
