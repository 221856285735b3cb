"""`crmhub serve`: the web app (API, steward UI, webhook intake)."""

from __future__ import annotations

import typer

from crmhub.cli.common import console, open_store, state

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        ctx: typer.Context,
        host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
        port: int = typer.Option(8000, help="Port to listen on."),
    ) -> None:
        """Serve the REST API, the steward UI and webhook intake over HTTP."""
        import uvicorn

        from crmhub.web import create_app

        settings = state(ctx).settings
        web_app = create_app(settings, open_store(settings))
        console.print(f"crmhub serving on http://{host}:{port} (Ctrl-C to stop)")
        uvicorn.run(web_app, host=host, port=port, log_level="warning")
