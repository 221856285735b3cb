"""`crmhub review list|show|approve|reject|skip|unmerge|undo` and `crmhub users add|list|token`.

The same functions as the web UI and the REST API (sync/review.py, sync/users.py), so the
terminal, the browser and scripts cannot disagree.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any, NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from crmhub.cli.common import console, die, open_store, print_json, state

__all__ = ["register"]

review_app = typer.Typer(
    help="The merge-review queue: pairs the matcher was unsure about.", no_args_is_help=True
)
users_app = typer.Typer(
    help="Local users of the steward UI and the REST API.", no_args_is_help=True
)


def _default_actor() -> str:
    return f"cli:{os.environ.get('USER') or getpass.getuser() or 'unknown'}"


ACTOR = typer.Option(
    None, "--as", help="Who decides, for the audit log (default cli:$USER).", show_default=False
)


def _fail(exc: Exception) -> NoReturn:
    from sync.review import ReviewError, StaleDecisionError

    if isinstance(exc, ReviewError | StaleDecisionError):
        die(str(exc))
    raise exc


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


@review_app.command("list")
def list_(
    ctx: typer.Context,
    status: str = typer.Option("open", help="open, skipped, approved, rejected, merged, all."),
    min_score: float | None = typer.Option(None, help="Only pairs at or above this probability."),
    max_score: float | None = typer.Option(None, help="Only pairs at or below this probability."),
    source: str | None = typer.Option(None, help="Only pairs with a record from this source."),
    min_age_days: float | None = typer.Option(
        None, help="Only pairs queued this many days ago or more."
    ),
    max_age_days: float | None = typer.Option(
        None, help="Only pairs queued at most this many days ago."
    ),
    sort: str = typer.Option("best", help="best, borderline, oldest or newest first."),
    limit: int = typer.Option(50, help="How many rows."),
    offset: int = typer.Option(0, help="Skip this many rows."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List review items, most probable first (or as --sort says)."""
    from sync.review import ReviewError, list_reviews

    with open_store(state(ctx).settings).connect() as conn:
        try:
            items, total = list_reviews(
                conn,
                status=status,
                min_score=min_score,
                max_score=max_score,
                source=source,
                min_age_days=min_age_days,
                max_age_days=max_age_days,
                sort=sort,
                limit=limit,
                offset=offset,
            )
        except ReviewError as exc:
            die(str(exc))
    if as_json:
        print_json({"total": total, "items": items})
        return
    table = Table(title=f"Review queue ({status}): {total}", title_justify="left")
    for column in ("id", "score", "record A", "record B", "status"):
        table.add_column(column, justify="right" if column in ("id", "score") else "left")
    for i in items:
        table.add_row(
            str(i["id"]),
            f"{i['probability']:.3f}",
            escape(f"{i['a']['name'] or ''} <{i['a']['email'] or ''}> [{i['a']['source']}]"),
            escape(f"{i['b']['name'] or ''} <{i['b']['email'] or ''}> [{i['b']['source']}]"),
            i["status"] + (" (re-check)" if i.get("recheck") else ""),
        )
    console.print(table)


@review_app.command()
def show(
    ctx: typer.Context,
    review_id: int = typer.Argument(..., metavar="ID", help="Review item id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a pair side by side: differing fields marked, with the matcher's evidence."""
    from sync.review import NotFoundError, show_review

    with open_store(state(ctx).settings).connect() as conn:
        try:
            item = show_review(conn, review_id)
        except NotFoundError as exc:
            die(f"{exc} (try `crmhub review list`)")
    if as_json:
        print_json(item)
        return
    a, b = item["a"], item["b"]
    table = Table(
        title=f"Review {item['id']}: p={item['probability']:.3f} ({item['status']})",
        title_justify="left",
    )
    table.add_column("field")
    table.add_column(escape(f"A: {a['source']}:{a['external_id']} (golden {a['golden_id']})"))
    table.add_column(escape(f"B: {b['source']}:{b['external_id']} (golden {b['golden_id']})"))
    table.add_column("evidence")
    for f in item["fields"]:
        style = "bold yellow" if f["differs"] else ""
        evidence = f["evidence"] or {}
        note = (
            f"{evidence.get('level')} ({evidence.get('weight'):+})"
            if evidence.get("weight") is not None
            else ""
        )
        table.add_row(f["field"], escape(_short(f["a"])), escape(_short(f["b"])), note, style=style)
    if item["explanation"].get("model"):
        table.caption = f"scored by model {item['explanation']['model']}"
    if item.get("recheck"):
        console.print(escape(f"Back for a re-check: {item['recheck']['reason']}"), style="yellow")
    console.print(table)


@review_app.command()
def approve(
    ctx: typer.Context,
    review_id: int = typer.Argument(..., metavar="ID", help="Review item id."),
    keep: list[str] = typer.Option(
        [],
        "--keep",
        help="FIELD=a|b: keep this field's value from record A or B (repeatable).",
    ),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Same person: merge the two golden records."""
    from sync.review import NotFoundError, approve, show_review

    db = open_store(state(ctx).settings)
    choices: dict[str, int] = {}
    if keep:
        with db.connect() as conn:
            try:
                item = show_review(conn, review_id)
            except NotFoundError as exc:
                die(str(exc))
        for spec in keep:
            name, _, side = spec.partition("=")
            if side not in ("a", "b"):
                die(f"--keep {spec!r}: write FIELD=a or FIELD=b")
            choices[name] = int(item[side]["record_id"])
    try:
        result = approve(db, review_id, actor or _default_actor(), choices=choices)
    except Exception as exc:
        _fail(exc)
    if as_json:
        print_json(result)
    else:
        console.print(f"review {review_id} approved: golden record {result['golden_id']}")


@review_app.command()
def reject(
    ctx: typer.Context,
    review_id: int = typer.Argument(..., metavar="ID", help="Review item id."),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Not the same person: never merge this pair (later syncs respect it)."""
    from sync.review import reject

    try:
        result = reject(open_store(state(ctx).settings), review_id, actor or _default_actor())
    except Exception as exc:
        _fail(exc)
    if as_json:
        print_json(result)
    else:
        console.print(f"review {review_id} rejected: the pair will not be merged")


@review_app.command()
def skip(
    ctx: typer.Context,
    review_id: int = typer.Argument(..., metavar="ID", help="Review item id."),
    actor: str | None = ACTOR,
) -> None:
    """Put a pair aside for later (`review list --status skipped`)."""
    from sync.review import skip

    try:
        skip(open_store(state(ctx).settings), review_id, actor or _default_actor())
    except Exception as exc:
        _fail(exc)
    console.print(f"review {review_id} skipped")


@review_app.command()
def unmerge(
    ctx: typer.Context,
    record_id: int = typer.Argument(..., metavar="RECORD", help="Source record id to split off."),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Split a source record off its golden record into one of its own."""
    from sync.review import unmerge

    try:
        result = unmerge(open_store(state(ctx).settings), record_id, actor or _default_actor())
    except Exception as exc:
        _fail(exc)
    if as_json:
        print_json(result)
    else:
        console.print(
            f"record {record_id} split off golden record {result['golden_id']} "
            f"into {result['new_golden_id']}"
        )


@review_app.command()
def undo(ctx: typer.Context, actor: str | None = ACTOR) -> None:
    """Undo your last decision (approve, reject, skip or unmerge)."""
    from sync.review import undo_last

    try:
        result = undo_last(open_store(state(ctx).settings), actor or _default_actor())
    except Exception as exc:
        _fail(exc)
    console.print(f"undid {result['action']} (audit entry {result['undid']})")


@review_app.command()
def buckets(
    ctx: typer.Context,
    bucket: str | None = typer.Argument(None, help="Show a sample of this bucket."),
    sample: int = typer.Option(5, help="How many random pairs to show."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Rule buckets of open pairs with counts; with BUCKET, a random sample of it."""
    from sync.review import NotFoundError, bucket_counts, bucket_preview

    with open_store(state(ctx).settings).connect() as conn:
        if bucket is None:
            rows = bucket_counts(conn)
            if as_json:
                print_json(rows)
                return
            table = Table(title="Buckets of open pairs", title_justify="left")
            for column in ("bucket", "pairs", "rule"):
                table.add_column(column)
            for r in rows:
                table.add_row(r["bucket"], str(r["count"]), r["label"])
            console.print(table)
            return
        try:
            preview = bucket_preview(conn, bucket, sample=sample)
        except NotFoundError as exc:
            die(str(exc))
    if as_json:
        print_json(preview)
        return
    console.print(f"{escape(preview['label'])}: {preview['count']} pairs. A random sample:")
    for item in preview["sample"]:
        a, b = item["a"]["data"], item["b"]["data"]
        console.print(
            f"  #{item['id']} p={item['probability']:.3f}  "
            f"{escape(str(a.get('full_name')))} / {escape(str(b.get('full_name')))}"
        )
    console.print(
        f"Approve all with: crmhub review approve-bucket {bucket} --expect {preview['count']}"
    )


@review_app.command("approve-bucket")
def approve_bucket(
    ctx: typer.Context,
    bucket: str = typer.Argument(..., help="Bucket name (see `crmhub review buckets`)."),
    expect: int = typer.Option(..., help="The pair count you previewed (guards against drift)."),
    actor: str | None = ACTOR,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Approve every open pair in a bucket (each pair audited on its own)."""
    from sync.review import approve_bucket

    try:
        result = approve_bucket(
            open_store(state(ctx).settings), bucket, actor or _default_actor(), expected=expect
        )
    except Exception as exc:
        _fail(exc)
    if as_json:
        print_json(result)
    else:
        console.print(f"bucket {bucket}: {result['approved']} pairs approved")


@users_app.command("add")
def users_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Sign-in name."),
    role: str = typer.Option("viewer", help="viewer (reads), steward (decides), admin (manages)."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input (scripts)."
    ),
    actor: str | None = ACTOR,
) -> None:
    """Add a local user; the password is asked for (never passed as an argument)."""
    from sync.users import UserError, add_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        user = add_user(
            open_store(state(ctx).settings), name, password, role, actor=actor or _default_actor()
        )
    except UserError as exc:
        die(str(exc))
    console.print(f"user {escape(user.name)} added as {user.role}")


@users_app.command("list")
def users_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List local users and their roles."""
    from sync.users import list_users

    with open_store(state(ctx).settings).connect() as conn:
        rows = list_users(conn)
    if as_json:
        print_json(rows)
        return
    table = Table(title="Users", title_justify="left")
    for column in ("name", "role", "disabled", "created"):
        table.add_column(column)
    for r in rows:
        table.add_row(escape(r["name"]), r["role"], "yes" if r["disabled"] else "", r["created_at"])
    console.print(table)


@users_app.command("token")
def users_token(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The user the token acts as."),
    label: str = typer.Option("api", help="What the token is for."),
    actor: str | None = ACTOR,
) -> None:
    """Create an API token (printed once; only its hash is stored)."""
    from sync.users import UserError, create_token

    try:
        token = create_token(
            open_store(state(ctx).settings), name, label, actor=actor or _default_actor()
        )
    except UserError as exc:
        die(str(exc))
    sys.stdout.write(token + "\n")


def forget(
    ctx: typer.Context,
    identifier: str = typer.Argument(..., help="An email, a phone number, or golden:ID."),
    actor: str | None = ACTOR,
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Erase a person everywhere; only keyed hashes stay, so a later sync can skip them."""
    from sync.erasure import forget as erase

    if not yes and not typer.confirm(
        "Erase this person from every source record? This cannot be undone"
    ):
        raise typer.Exit(1)
    try:
        result = erase(open_store(state(ctx).settings), identifier, actor or _default_actor())
    except Exception as exc:
        _fail(exc)
    if as_json:
        print_json(result)
    else:
        console.print(
            f"erased {result['golden_records']} golden record(s), "
            f"{result['source_records']} source record(s), {result['activities']} activities"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(review_app, name="review")
    app.add_typer(users_app, name="users")
    app.command()(forget)
