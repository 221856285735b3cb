"""The steward workspace in the browser: sign-in, review queue, compare, golden records, audit."""

from __future__ import annotations

from crmhub.web.steward.pages import router

__all__ = ["router"]
