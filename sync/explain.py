"""A pair's decision as a sync would take it now (`crmhub explain`).

The pipeline scores a pair with the store's term frequencies and a prior for the store's size
(sync/golden.py, from MIN_POPULATION contacts on); a bare `matcher.compare` has neither and
would show a steward other weights, and another probability, than the ones that decided.
"""

from __future__ import annotations

from sqlalchemy import Connection

from crmhub.records import Contact
from dedupe.matcher import Decision, FellegiSunterMatcher, Matcher
from dedupe.normalize import prepare
from sync.frequencies import counted_for

__all__ = ["decide_now"]


def decide_now(conn: Connection, matcher: Matcher, a: Contact, b: Contact) -> Decision:
    """`matcher`'s decision on `a` and `b` with the store's counts as `conn` sees them."""
    if not isinstance(matcher, FellegiSunterMatcher):
        return matcher.compare(a, b)  # the exact matcher counts nothing
    left, right = prepare(a), prepare(b)
    scoring = FellegiSunterMatcher(
        matcher.params,
        auto_merge=matcher.auto_merge,
        review=matcher.review,
        frequencies=counted_for(conn, (left, right)),
    )
    return scoring.compare_prepared(left, right)
