"""Benchmark harnesses: they print figures; they are not timed tests."""

from __future__ import annotations
