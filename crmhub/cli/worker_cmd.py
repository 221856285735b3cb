"""`crmhub worker`: run background syncs from the queue; `--check` reports worker health."""

from __future__ import annotations

import asyncio

import typer
from rich.table import Table

from crmhub.cli.common import console, die, open_store, print_json, state
from crmhub.settings import Settings

__all__ = ["register", "require_queue"]


def require_queue(settings: Settings, command: str) -> None:
    """Workers exist only with `[queue] redis_url` set: then every `crmhub sync` that shares
    the config also takes the connectors' locks, and never overlaps a worker's run."""
    from sync.jobs import queue_configured

    if not queue_configured(settings):
        die(
            f"`{command}` needs [queue] redis_url in the config (or CRMHUB_QUEUE__REDIS_URL): "
            "the Redis shared by every worker and by every host that runs `crmhub sync`."
        )


def register(app: typer.Typer) -> None:
    @app.command()
    def worker(
        ctx: typer.Context,
        check: bool = typer.Option(
            False, "--check", help="Report live workers, queue and last successes; exit 1 if none."
        ),
        burst: bool = typer.Option(False, "--burst", help="Exit once the queue is empty."),
        metrics_port: int | None = typer.Option(
            None, "--metrics-port", help="Serve Prometheus metrics on this port."
        ),
        as_json: bool = typer.Option(False, "--json", help="With --check: machine-readable."),
    ) -> None:
        """Run scheduled and queued syncs (many workers may share one Redis and store).

        Each connector with a `schedule` (cron, UTC) is queued when it fires; `crmhub sync NAME
        --enqueue` queues one now. A connector runs on one worker at a time; SIGTERM lets the
        current page commit and leaves the run to resume.
        """
        settings = state(ctx).settings
        require_queue(settings, "crmhub worker --check" if check else "crmhub worker")
        if check:
            _check(settings, as_json)
            return
        from sync.worker import run_worker

        open_store(settings)  # creates/upgrades SQLite, refuses an old PostgreSQL schema
        if metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(metrics_port)
        console.print(
            f"worker started: queue {settings.queue.namespace}crmhub:queue, "
            f"{len(settings.connectors)} connectors (Ctrl-C or SIGTERM to stop)",
            highlight=False,
        )
        asyncio.run(run_worker(settings, burst=burst))


def _check(settings: Settings, as_json: bool) -> None:
    from sync.worker import check_health

    health = asyncio.run(check_health(settings, open_store(settings)))
    if as_json:
        print_json(
            {
                "ok": health.ok,
                "redis_ok": health.redis_ok,
                "workers": health.workers,
                "queued": health.queued,
                "connectors": health.connectors,
                "error": health.error,
            }
        )
    else:
        status = "[green]ok[/]" if health.ok else "[red]no live worker[/]"
        console.print(
            f"{status}: {len(health.workers)} worker(s) alive, {health.queued} job(s) queued"
            + (f" ({health.error})" if health.error else "")
        )
        for name, beat in sorted(health.workers.items()):
            console.print(f"  {name}: {beat}", highlight=False)
        table = Table(title="Connectors", title_justify="left")
        for column in ("connector", "schedule", "last success", "latest", "locked by"):
            table.add_column(column)
        for c in health.connectors:
            table.add_row(
                c["connector"],
                c["schedule"] or "",
                (c["last_success"] or "never")[:19],
                c["latest_state"] or "",
                c["locked_by"] or "",
            )
        console.print(table)
    raise typer.Exit(0 if health.ok else 1)
