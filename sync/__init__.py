"""The unified store and the runs that keep it current."""

from __future__ import annotations
