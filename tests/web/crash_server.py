"""`python -m tests.web.crash_server CONFIG PORT`: crmhub's web app whose processing step
never finishes, so a test can SIGKILL it after the 2xx and before any processing."""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from crmhub.cli.common import open_store
from crmhub.settings import load_settings
from crmhub.web import create_app
from sync.intake import Intake


async def _stuck(self: Intake) -> object:
    await asyncio.sleep(3600)  # the process is killed long before this returns
    return None


def main() -> None:
    config, port = sys.argv[1], int(sys.argv[2])
    Intake.process_pending = _stuck  # type: ignore[method-assign,assignment]
    Intake.drain = _stuck  # type: ignore[method-assign,assignment]
    settings = load_settings(config)
    app = create_app(settings, open_store(settings, migrate=True))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


if __name__ == "__main__":
    main()
