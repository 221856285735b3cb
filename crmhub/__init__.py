"""crmhub: a CRM integration hub and sync engine (the kernel package)."""

from __future__ import annotations

__version__ = "0.1.0"
