"""`python -m crmhub` is the `crmhub` command."""

from __future__ import annotations

from crmhub.cli import main

main()
