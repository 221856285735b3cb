"""A `Decision`'s explanation in a steward's words: one row per field.

`render(decision)` reads the explanation dict the matcher stores with every decision (also in
`review_item.explanation`), so it works on decisions read back from the store as well. Each row
says what the field comparison found, how much that counts and in which direction, and what
normalisation made two values equal ("gmail dots removed", "nickname bob = robert").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from dedupe.comparators import COMPARISONS
from dedupe.matcher import Decision

__all__ = ["ExplainRow", "render"]


class ExplainRow(TypedDict):
    """One field of an explanation, JSON-ready."""

    field: str  # comparison name ('first_name')
    label: str  # 'First name'
    level: str  # comparison level ('nickname', 'null')
    finding: str  # the level in words ('one is a nickname of the other')
    weight: float  # bits of evidence, term-frequency adjustment included (0 when missing)
    strength: str  # 'strong evidence for' ... 'strong evidence against', 'no evidence'
    note: str  # normalisation and frequency notes, '' when none


_LABELS = {
    "first_name": "First name",
    "last_name": "Last name",
    "email": "Email",
    "phone": "Phone",
    "company": "Company",
    "city": "City",
}
_FINDINGS: dict[str, dict[str, str]] = {
    "first_name": {
        "different": "first names differ",
        "initial": "an initial fits the other first name",
        "similar": "first names nearly the same (a typo or spelling variant)",
        "nickname": "one first name is a nickname of the other",
        "exact": "same first name",
    },
    "last_name": {
        "different": "last names differ",
        "similar": "last names nearly the same (a typo or spelling variant)",
        "exact": "same last name",
    },
    "email": {
        "different": "different addresses at the same domain",
        "other-domain": "different addresses at different domains",
        "same-local": "same user name at another domain",
        "similar": "addresses one character apart at the same domain",
        "exact": "same address",
    },
    "phone": {"different": "different numbers", "exact": "same number"},
    "company": {
        "different": "different organisations",
        "domain": "one's company is the other's email domain",
        "similar": "company names nearly the same",
        "exact": "same company",
    },
    "city": {"different": "different cities", "exact": "same city"},
}
_NULL_FINDING = "missing on one side or not comparable: no evidence either way"


def _strength(weight: float) -> str:
    if abs(weight) < 0.5:
        return "no real evidence"
    direction = "for" if weight > 0 else "against"
    size = abs(weight)
    if size >= 8:
        return f"strong evidence {direction}"
    if size >= 3:
        return f"evidence {direction}"
    return f"weak evidence {direction}"


def _tf_note(adjustment: float) -> str:
    if adjustment > 0:
        return f"rare value: +{adjustment:.1f} bits"
    return f"common value: {adjustment:.1f} bits"


def render(decision: Decision | Mapping[str, Any]) -> list[ExplainRow]:
    """Rows for every compared field, in the matcher's field order.

    Accepts a `Decision` or its explanation dict (as stored). An explanation without fields
    (the exact matcher, a steward's forced merge) renders as no rows.
    """
    explanation = decision.explanation if isinstance(decision, Decision) else decision
    fields: Mapping[str, Any] = explanation.get("fields") or {}
    rows: list[ExplainRow] = []
    order = [c.name for c in COMPARISONS] + sorted(set(fields) - {c.name for c in COMPARISONS})
    for name in order:
        entry = fields.get(name)
        if not isinstance(entry, Mapping):
            continue
        level = str(entry.get("level", "null"))
        adjustment = float(entry.get("tf_adjustment", 0.0))
        weight = 0.0 if level == "null" else float(entry.get("weight", 0.0)) + adjustment
        notes = [str(entry["normalisation"])] if entry.get("normalisation") else []
        if adjustment:
            notes.append(_tf_note(adjustment))
        finding = _NULL_FINDING if level == "null" else _FINDINGS.get(name, {}).get(level, level)
        rows.append(
            ExplainRow(
                field=name,
                label=_LABELS.get(name, name.replace("_", " ").capitalize()),
                level=level,
                finding=finding,
                weight=round(weight, 2),
                strength=_strength(weight),
                note="; ".join(notes),
            )
        )
    return rows
