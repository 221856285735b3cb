"""The `crmhub` command line (Typer + Rich). The only place that calls `asyncio.run`."""

from __future__ import annotations

from crmhub.cli.app import app, main

__all__ = ["app", "main"]
