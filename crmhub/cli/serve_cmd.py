"""`crmhub serve`: the web app (API, steward UI, webhook intake)."""

from __future__ import annotations

import typer

from crmhub.cli.common import console, die, open_store, state

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        ctx: typer.Context,
        host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
        port: int = typer.Option(8000, help="Port to listen on."),
        processing: str = typer.Option(
            "process",
            help="Where form deliveries are mapped and matched: 'process' (a processor process "
            "next to the server, the other core) or 'thread' (in the server process).",
        ),
    ) -> None:
        """Serve the REST API, the steward UI and webhook intake over HTTP."""
        import uvicorn

        from crmhub.web import create_app

        if processing not in ("process", "thread"):
            die(f"--processing must be 'process' or 'thread', not {processing!r}")
        settings = state(ctx).settings
        web_app = create_app(
            settings, open_store(settings), "process" if processing == "process" else "thread"
        )
        console.print(f"crmhub serving on http://{host}:{port} (Ctrl-C to stop)")
        uvicorn.run(web_app, host=host, port=port, log_level="warning", access_log=False)
