"""`crmhub sync`, `crmhub init` and `crmhub demo`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from crmhub.cli.common import (
    EXIT_DEAD_LETTERS,
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_NEEDS_CONFIRMATION,
    console,
    die,
    err_console,
    open_store,
    print_json,
    state,
)
from crmhub.errors import ConfigError, CrmHubError
from crmhub.settings import DEFAULT_CONFIG, Settings, load_settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["register"]

ROOT = Path(__file__).resolve().parents[2]


def _bundled(name: str) -> Path:
    """A file shipped with crmhub (repo checkout or wheel)."""
    for candidate in (ROOT / name, Path(__file__).resolve().parents[1] / f"_{name}"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(name)


async def _queue_redis(settings: Settings) -> Redis | None:
    """A connection for the connectors' leases when workers may be running ([queue] redis_url
    is set), else None. Unreachable: stop before anything runs, and say what to do."""
    from sync.jobs import queue_configured, redis_settings

    if not queue_configured(settings):
        return None
    from arq.connections import create_pool
    from redis.exceptions import RedisError

    try:
        return await create_pool(redis_settings(settings, retries=0))
    except (RedisError, OSError) as exc:
        die(
            "cannot reach the queue's Redis ([queue] redis_url) to take the connector locks "
            f"that workers share ({type(exc).__name__}: {exc}). Start Redis, or remove "
            "redis_url from [queue] if no `crmhub worker` uses this store."
        )


def _lease(
    settings: Settings, redis: Redis | None, name: str
) -> contextlib.AbstractAsyncContextManager[None]:
    """The connector's lease, taken as a worker's job takes it; nothing without a queue."""
    from sync.locks import connector_lease

    if redis is None:
        return contextlib.nullcontext()
    return connector_lease(redis, settings.queue.namespace, name, settings.queue.lease_seconds)


async def _run_all(
    settings: Settings, names: list[str], full: bool, quiet: bool, allow_deletes: bool = False
) -> list[dict[str, Any]]:
    redis = await _queue_redis(settings)
    try:
        return await _run_each(settings, names, full, quiet, redis, allow_deletes)
    finally:
        if redis is not None:
            await redis.aclose()


async def _run_each(
    settings: Settings,
    names: list[str],
    full: bool,
    quiet: bool,
    redis: Redis | None,
    allow_deletes: bool = False,
) -> list[dict[str, Any]]:
    from sync.engine import PageReport, SyncEngine
    from sync.locks import ConnectorLocked, LeaseLost

    engine = SyncEngine(settings, open_store(settings))
    results: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8,.0f} rec/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )
    with progress:
        for name in names:
            task = progress.add_task(name, total=None, rate=0.0)

            def report(page: PageReport, task: TaskID = task) -> None:
                elapsed = progress.tasks[task].elapsed or 1e-9
                total = page.total_hint if page.total_hint else None
                progress.update(
                    task,
                    description=f"{page.connector}: {page.note}" if page.note else page.connector,
                    completed=page.counts.pulled,
                    total=total,
                    rate=page.counts.pulled / elapsed,
                )

            try:
                async with _lease(settings, redis, name):
                    result = await engine.run(
                        name, full=full, progress=report, allow_deletes=allow_deletes
                    )
            except ConnectorLocked as exc:
                results.append(
                    {"connector": name, "state": "locked", "error": str(exc), "counts": {}}
                )
            except LeaseLost:
                error = (
                    f"{name}: lost the connector's lock mid-run (Redis unreachable for "
                    "[queue] lease_seconds, or this process stalled that long); the committed "
                    "pages stand: run it again to resume."
                )
                results.append({"connector": name, "state": "failed", "error": error, "counts": {}})
            except ConfigError as exc:
                results.append(
                    {"connector": name, "state": "failed", "error": str(exc), "counts": {}}
                )
            except CrmHubError as exc:
                results.append(
                    {"connector": name, "state": "failed", "error": str(exc), "counts": {}}
                )
            else:
                results.append(result.as_dict())
                progress.update(
                    task, total=result.counts.pulled or 1, completed=result.counts.pulled or 1
                )
    return results


_ROWS = (
    ("records pulled", "pulled"),
    ("  new", "new"),
    ("  changed", "changed"),
    ("  unchanged", "unchanged"),
    ("golden records created", "goldens_created"),
    ("records merged into others", "records_merged"),
    ("pairs queued for review", "reviews_queued"),
    ("  settled: their records merged since", "reviews_settled"),
    ("activities", "activities"),
    ("  linked to a contact", "activities_linked"),
    ("deleted at the source", "deleted"),
    ("merged at the source (aliases)", "aliased"),
    ("deletions held for confirmation", "deletions_held"),
    ("dead letters (rejected records)", "dead_letters"),
    ("dropped values (bad email, phone...)", "field_issues"),
)


def _summary_table(results: list[dict[str, Any]], totals: dict[str, int]) -> Table:
    """One column per connector, one row per figure: stays readable in 80 columns."""
    table = Table(title="Sync summary", title_justify="left")
    table.add_column("")
    for r in results:
        table.add_column(r["connector"], justify="right")
    for label, key in _ROWS:
        cells = []
        for r in results:
            value = (r.get("counts") or {}).get(key)
            if value is None:
                cells.append("")
            elif key in ("dead_letters", "deletions_held") and value:
                cells.append(f"[yellow]{value:,}[/]")
            else:
                cells.append(f"{value:,}")
        table.add_row(label, *cells)
    table.add_row(
        "state",
        *[r["state"] if r["state"] == "succeeded" else f"[red]{r['state']}[/]" for r in results],
    )
    table.add_row("time", *[f"{r['seconds']:.1f}s" if "seconds" in r else "" for r in results])
    table.caption = (
        f"store: {totals['contacts']:,} contacts -> {totals['golden_records']:,} golden records, "
        f"{totals['activities']:,} activities, {totals['open_reviews']:,} pair(s) awaiting "
        f"review, {totals['dead_letters']:,} dead letters"
    )
    return table


def _sync(
    settings: Settings,
    names: list[str],
    full: bool,
    quiet: bool,
    as_json: bool,
    allow_deletes: bool = False,
) -> int:
    from sync.queries import store_totals
    from sync.sources import configured_sources

    names = names or configured_sources(settings)
    if not names:
        die(
            "no connectors configured. Add a [connectors.NAME] table to "
            f"{settings.source_path or DEFAULT_CONFIG} (see config.example.toml)."
        )
    unknown = [n for n in names if n not in settings.connectors]
    if unknown:
        die(
            f"unknown connector(s): {', '.join(unknown)}; configured: "
            f"{', '.join(settings.connectors) or 'none'}"
        )
    results = asyncio.run(_run_all(settings, names, full, quiet or as_json, allow_deletes))
    from crmhub.cli.outbox_cmd import relay_if_configured

    pushed = relay_if_configured(settings)  # write-back, when any connector has it on
    with open_store(settings).connect() as conn:
        totals = store_totals(conn)
    if as_json:
        print_json({"runs": results, "store": totals, "outbox": pushed})
    elif not quiet:
        console.print(_summary_table(results, totals))
        if pushed is not None:
            console.print(
                f"write-back: {pushed['sent']} pushed, {pushed['retried']} to retry, "
                f"{pushed['failed']} failed (see `crmhub outbox`)"
            )
    for r in results:
        if r.get("held_deletions"):
            err_console.print(
                f"[yellow]deletions held:[/] {escape(r['held_deletions']['message'])}",
                highlight=False,
            )
        if r["state"] == "locked":
            err_console.print(f"[yellow]skipped:[/] {escape(r['error'])}", highlight=False)
        elif r["state"] != "succeeded":
            err_console.print(
                f"[red]{escape(r['connector'])} failed:[/] {escape(r['error'])}", highlight=False
            )
    if any(r["state"] not in ("succeeded", "locked") for r in results):
        return EXIT_ERROR
    if any(r.get("held_deletions") for r in results):
        return EXIT_NEEDS_CONFIRMATION
    if any(r["state"] == "locked" for r in results):
        return EXIT_LOCKED
    if any((r.get("counts") or {}).get("dead_letters") for r in results):
        if not (quiet or as_json):
            err_console.print("Some records were dead-lettered: see `crmhub errors`.")
        return EXIT_DEAD_LETTERS
    return 0


def _enqueue(settings: Settings, names: list[str], full: bool, as_json: bool) -> int:
    """Record a queued run per connector and put its job on the worker queue."""
    from arq.connections import create_pool
    from redis.exceptions import RedisError

    from crmhub.cli.worker_cmd import require_queue
    from sync.jobs import enqueue_sync, redis_settings
    from sync.sources import configured_sources, load_source

    require_queue(settings, "crmhub sync --enqueue")
    names = names or configured_sources(settings)
    for name in names:
        load_source(settings, name)  # config errors now, not in a worker later
    db = open_store(settings)

    async def go() -> list[dict[str, Any]]:
        redis = await create_pool(redis_settings(settings, retries=0))
        try:
            out = []
            for name in names:
                run_id = await enqueue_sync(redis, settings, db, name, full=full)
                out.append({"connector": name, "run_id": run_id, "queued": run_id is not None})
            return out
        finally:
            await redis.aclose()

    try:
        results = asyncio.run(go())
    except (RedisError, OSError) as exc:
        die(f"cannot reach the queue's Redis ([queue] redis_url): {type(exc).__name__}: {exc}")
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["queued"]:
                console.print(f"queued {r['connector']} (run {r['run_id']})", highlight=False)
            else:
                console.print(
                    f"{r['connector']}: a run is already queued or running", highlight=False
                )
    return 0


def register(app: typer.Typer) -> None:
    @app.command()
    def sync(
        ctx: typer.Context,
        sources: list[str] = typer.Argument(None, help="Connector names (default: all enabled)."),
        full: bool = typer.Option(False, "--full", help="Ignore cursors and re-read everything."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary (cron)."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
        enqueue: bool = typer.Option(
            False, "--enqueue", help="Queue the runs for `crmhub worker` instead of running here."
        ),
        allow_deletes: bool = typer.Option(
            False,
            "--allow-deletes",
            help="With --full: apply the deletions the scan infers even above max_delete_ratio.",
        ),
    ) -> None:
        """Pull, map, stage, match and merge: bring the store up to date.

        Exit codes: 0 all good, 1 a connector failed, 3 some records were dead-lettered
        (see `crmhub errors`), 4 a worker was syncing a connector, so it was skipped (only
        with [queue] redis_url set: then this takes the same per-connector lock as workers),
        5 a --full run found more contacts gone than max_delete_ratio allows and deleted
        none (confirm with --full --allow-deletes).
        """
        if allow_deletes and (enqueue or not full):
            die(
                "--allow-deletes confirms the deletions of a --full run here: add --full "
                "(and run it without --enqueue)"
            )
        if enqueue:
            raise typer.Exit(_enqueue(state(ctx).settings, sources or [], full, as_json))
        raise typer.Exit(
            _sync(state(ctx).settings, sources or [], full, quiet, as_json, allow_deletes)
        )

    @app.command()
    def init(
        ctx: typer.Context,
        force: bool = typer.Option(False, "--force", help="Overwrite an existing config file."),
    ) -> None:
        """Write a starter crmhub.toml (if there is none) and create or upgrade the store."""
        target = state(ctx).config or Path(DEFAULT_CONFIG)
        if not target.exists() or force:
            shutil.copyfile(_bundled("config.example.toml"), target)
            console.print(f"wrote {target} (from config.example.toml): edit its connectors.")
        settings = load_settings(target)
        open_store(settings, migrate=True)
        console.print(f"store ready: {settings.store.url}")

    @app.command()
    def demo(
        directory: Path = typer.Option(
            Path(".crmhub-demo"), "--dir", help="Where the demo config and store live."
        ),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
    ) -> None:
        """Sync the bundled sample sources (CSV leads, mail, web forms) into a SQLite store.

        Run it twice: the second run finds nothing new.
        """
        directory.mkdir(parents=True, exist_ok=True)
        samples = _bundled("samples")
        config = directory / "crmhub.toml"
        config.write_text(
            (samples / "demo.toml")
            .read_text(encoding="utf-8")
            .replace("@SAMPLES@", samples.as_posix()),
            encoding="utf-8",
        )
        settings = load_settings(config)
        code = _sync(settings, [], False, False, as_json)
        if not as_json:
            cfg = f"--config {config}"
            console.print(
                "\n[bold]Try next:[/]\n"
                f"  crmhub {cfg} golden list --merged\n"
                f"  crmhub {cfg} golden show 1\n"
                f"  crmhub {cfg} golden search smith\n"
                f"  crmhub {cfg} explain leads:L-1001 webforms:F-9001\n"
                f"  crmhub {cfg} errors\n"
                f"  crmhub {cfg} export xref --format csv\n"
                "  (with `make demo`, the commands live in .venv/bin/: "
                "`source .venv/bin/activate` first)",
                highlight=False,
            )
        raise typer.Exit(0 if code == EXIT_DEAD_LETTERS else code)
