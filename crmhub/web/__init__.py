"""The HTTP side of crmhub: REST API, steward UI, webhook intake (`crmhub serve`)."""

from __future__ import annotations

from crmhub.web.app import create_app

__all__ = ["create_app"]
