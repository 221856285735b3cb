"""Matching and merging: records and candidates in, decisions out. No I/O.

The pipeline (sync/engine.py) talks to this package through three seams:

- `Matcher.keys(contact)` -> the blocking keys stored in the `match_key` table; records that
  share a key are candidates for each other.
- `Matcher.compare(a, b)` -> a `Decision` (merge / review / separate, probability, explanation).
- `survive(members)` -> the golden record's fields and per-field lineage.
"""

from __future__ import annotations

from dedupe.matcher import Decision, ExactMatcher, Matcher, MatchKey, build_matcher
from dedupe.survivorship import Member, survive

__all__ = [
    "Decision",
    "ExactMatcher",
    "MatchKey",
    "Matcher",
    "Member",
    "build_matcher",
    "survive",
]
