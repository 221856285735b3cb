"""`crmhub outbox` (what was pushed to the connected tools, what waits, what failed and why)
and `crmhub outbox relay` (deliver what is due now)."""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from crmhub.cli.common import EXIT_ERROR, console, die, open_store, print_json, state
from crmhub.errors import CrmHubError
from crmhub.settings import Settings

__all__ = ["register", "relay_if_configured"]

outbox_app = typer.Typer(
    help="Write-back: pushes of opt-outs, erasures and golden fields to the connected tools.",
    invoke_without_command=True,
)


class Status(StrEnum):
    pending = "pending"
    sent = "sent"
    failed = "failed"


def relay_if_configured(settings: Settings) -> dict[str, Any] | None:
    """Run one relay pass when any connector has write-back on (after `crmhub sync`)."""
    from sync.outbox import relay
    from sync.writeback import plan_from_settings

    if not plan_from_settings(settings).targets:
        return None
    db = open_store(settings)
    try:
        return asyncio.run(relay(settings, db)).as_dict()
    finally:
        db.dispose()


@outbox_app.callback()
def outbox_list(
    ctx: typer.Context,
    status: Status | None = typer.Option(None, "--status", help="Only rows in this state."),
    limit: int = typer.Option(50, "--limit", min=1, help="Most recent rows to list."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """List outbox rows (newest first) with counts per state; failed rows say why.

    Rows name the golden record and the tool, never the person's address.
    """
    if ctx.invoked_subcommand is not None:
        return
    from sqlalchemy import select

    from sync.outbox import outbox_counts
    from sync.store import outbox

    db = open_store(state(ctx).settings)
    query = select(
        outbox.c.id,
        outbox.c.connector,
        outbox.c.action,
        outbox.c.golden_id,
        outbox.c.status,
        outbox.c.attempts,
        outbox.c.created_at,
        outbox.c.sent_at,
        outbox.c.next_attempt_at,
        outbox.c.last_error,
    ).order_by(outbox.c.id.desc())
    if status is not None:
        query = query.where(outbox.c.status == status.value)
    with db.connect() as conn:
        counts = outbox_counts(conn)
        rows = [dict(r._mapping) for r in conn.execute(query.limit(limit))]
    db.dispose()
    if as_json:
        print_json({"counts": counts, "rows": rows})
        return
    table = Table(title="Outbox", title_justify="left")
    for column in ("id", "tool", "action", "golden", "state", "tries", "created", "sent / next"):
        table.add_column(column)
    for r in rows:
        colour = {"failed": "red", "pending": "yellow"}.get(r["status"], "green")
        when = r["sent_at"] if r["status"] == "sent" else r["next_attempt_at"]
        table.add_row(
            str(r["id"]),
            escape(r["connector"]),
            r["action"],
            str(r["golden_id"] or ""),
            f"[{colour}]{r['status']}[/]",
            str(r["attempts"]),
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}",
            f"{when:%Y-%m-%d %H:%M:%S}" if r["status"] != "failed" else "",
        )
        if r["last_error"]:
            table.add_row("", "", "", "", "", "", "", f"[dim]{escape(r['last_error'])}[/]")
    table.caption = ", ".join(f"{n:,} {s}" for s, n in counts.items())
    console.print(table)


@outbox_app.command("relay")
def outbox_relay(
    ctx: typer.Context,
    limit: int = typer.Option(500, "--limit", min=1, help="Rows to deliver in this pass."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """Deliver the due outbox rows now (the same pass the worker and `crmhub sync` run).

    Exit code 1 when some row failed for good (see `crmhub outbox --status failed`).
    """
    from sync.outbox import relay

    settings = state(ctx).settings
    db = open_store(settings)
    try:
        report = asyncio.run(relay(settings, db, limit=limit))
    except CrmHubError as exc:
        die(str(exc))
    finally:
        db.dispose()
    if as_json:
        print_json(report.as_dict())
    else:
        console.print(
            f"outbox: {report.sent} sent, {report.retried} to retry, {report.failed} failed "
            f"({report.seconds:.1f}s)"
        )
        for error in report.errors:
            console.print(f"[red]failed:[/] {escape(error)}", highlight=False)
    if report.failed:
        raise typer.Exit(EXIT_ERROR)


@outbox_app.command("retry")
def outbox_retry(
    ctx: typer.Context,
    connector: str | None = typer.Option(None, "--connector", help="Only this tool's rows."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """Put failed rows back in the queue (after fixing what `crmhub outbox` reported)."""
    from sync.outbox import requeue_failed
    from sync.store import write_transaction

    db = open_store(state(ctx).settings)
    with write_transaction(db) as conn:
        count = requeue_failed(conn, connector=connector)
    db.dispose()
    if as_json:
        print_json({"requeued": count})
    else:
        console.print(f"{count} failed row(s) queued again; `crmhub outbox relay` sends them.")


def register(app: typer.Typer) -> None:
    app.add_typer(outbox_app, name="outbox")
