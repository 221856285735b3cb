"""`crmhub explain A B`: why two contact records match, or not, field by field."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from crmhub.cli.common import console, die, open_store, print_json, state

__all__ = ["register"]

_FIELD_VALUES = {
    "first_name": ("first_name",),
    "last_name": ("last_name",),
    "email": ("emails",),
    "phone": ("phones",),
    "company": ("company",),
    "city": ("city",),
}


def _value(data: dict[str, Any], field: str) -> str:
    values = [data.get(key) for key in _FIELD_VALUES.get(field, (field,))]
    flat = [v for value in values for v in (value if isinstance(value, list) else [value]) if v]
    return ", ".join(str(v) for v in flat)


def register(app: typer.Typer) -> None:
    @app.command()
    def explain(
        ctx: typer.Context,
        a: str = typer.Argument(..., help="A contact record: its id, or source:external_id."),
        b: str = typer.Argument(..., help="The other contact record."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """Show, field by field, why two records match or not (levels, weights, reasons)."""
        from crmhub.records import Contact
        from dedupe.explain import render
        from sync.engine import SyncEngine
        from sync.explain import decide_now
        from sync.queries import find_contact_record

        settings = state(ctx).settings
        db = open_store(settings)
        matcher = SyncEngine(settings, db).matcher
        with db.connect() as conn:
            left, right = find_contact_record(conn, a), find_contact_record(conn, b)
            for ref, found in ((a, left), (b, right)):
                if found is None:
                    die(
                        f"no contact record {ref!r} (use a record id from `crmhub golden "
                        "show`, or source:external_id)"
                    )
            assert left is not None
            assert right is not None
            # Weighed as a sync would now: the store's term frequencies and size.
            decision = decide_now(
                conn,
                matcher,
                Contact.model_validate(left["data"]),
                Contact.model_validate(right["data"]),
            )
            explanation = decision.explanation
        if as_json:
            print_json(
                {
                    "a": left,
                    "b": right,
                    "action": decision.action,
                    "probability": decision.probability,
                    "explanation": explanation,
                }
            )
            return
        table = Table(
            title=f"{left['source']}:{left['external_id']}  vs  "
            f"{right['source']}:{right['external_id']}",
            title_justify="left",
        )
        for column in ("field", "A", "B", "found", "weight", "why"):
            table.add_column(column, justify="right" if column == "weight" else "left")
        fields = explanation.get("fields", {})
        for row in render(explanation):  # weights with their term-frequency adjustment
            weight = row["weight"]
            colour = "green" if weight > 0 else "red" if weight < 0 else "dim"
            table.add_row(
                row["label"],
                _value(left["data"], row["field"]),
                _value(right["data"], row["field"]),
                row["finding"] if row["level"] != "null" else "missing on one side",
                f"[{colour}]{weight:+.2f}[/]",
                row["note"],
            )
        console.print(table)
        if not fields:
            console.print(f"shared identifiers: {explanation}")
        elif "prior_weight" in explanation:
            console.print(f"prior weight: {explanation['prior_weight']:+.2f}")
        same = left["golden_id"] == right["golden_id"]
        model = explanation.get("model", getattr(matcher, "version", ""))
        console.print(
            f"decision: [bold]{decision.action}[/] (probability {decision.probability:.4f}, "
            f"model {model}); "
            f"today they are {'in the same' if same else 'in different'} golden records "
            f"({left['golden_id']}, {right['golden_id']})."
        )
