"""Labelled pairs for the matcher, read from the steward's decisions.

There is no label table: the `merge_constraint` rows that sync/review.py writes *are* the
labels, so they cannot drift apart from what stewards decided.

- approve a review item -> `must_merge` (a, b) -> a labelled match;
- reject it ("not the same person") -> `do_not_merge` (a, b) -> a labelled non-match;
- unmerge record r from a golden record -> `do_not_merge` (r, each other member) ->
  labelled non-matches;
- undo restores the constraint the pair had before, so the label goes (or flips back).

Constraints survive every later sync (staging updates records in place), so the labels do
too; erasing a person deletes their records and, by cascade, their labels. The pairs'
comparison levels are computed from the records' current data at training time, so a
new release whose comparisons changed trains on the same decisions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, func, select

from crmhub.records import Contact
from dedupe.comparators import COMPARISONS, compare_levels
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import Prepared, prepare
from dedupe.scoring import Params
from sync.frequencies import counted_for
from sync.staging import chunks
from sync.store import merge_constraint, one_of, source_record

__all__ = ["Label", "LabelSet", "fingerprint", "label_counts", "labelled_pairs", "load_labels"]

_KINDS = {"must_merge": True, "do_not_merge": False}


@dataclass(frozen=True, slots=True)
class Label:
    """One steward decision about a pair of source records."""

    record_a: int
    record_b: int
    match: bool
    decided_by: str | None
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class LabelSet:
    """What training needs: per pair its comparison levels, label and fixed weight part."""

    labels: list[Label]
    levels: npt.NDArray[np.int8]  # (pairs, comparisons)
    is_match: npt.NDArray[np.bool_]
    offsets: npt.NDArray[np.float64]  # prior + term-frequency bits, as the pipeline scores


def load_labels(conn: Connection) -> list[Label]:
    """Every labelled pair, oldest decision first."""
    rows = conn.execute(
        select(
            merge_constraint.c.record_a,
            merge_constraint.c.record_b,
            merge_constraint.c.kind,
            merge_constraint.c.created_by,
            merge_constraint.c.created_at,
        )
        .where(merge_constraint.c.kind.in_(list(_KINDS)))
        .order_by(merge_constraint.c.created_at, merge_constraint.c.record_a)
    )
    return [Label(int(a), int(b), _KINDS[kind], by, at) for a, b, kind, by, at in rows]


def label_counts(conn: Connection) -> dict[str, int]:
    """Labelled matches and non-matches in the store."""
    counts = {"match": 0, "non_match": 0}
    for kind, n in conn.execute(
        select(merge_constraint.c.kind, func.count()).group_by(merge_constraint.c.kind)
    ):
        if kind in _KINDS:
            counts["match" if _KINDS[kind] else "non_match"] += int(n)
    return counts


def fingerprint(labels: list[Label]) -> str:
    """A digest of the labelled pairs and their labels (not of who decided or when): the
    scheduled job trains again only when it changes."""
    text = "\n".join(
        f"{min(x.record_a, x.record_b)},{max(x.record_a, x.record_b)},{int(x.match)}"
        for x in sorted(labels, key=lambda x: (x.record_a, x.record_b))
    )
    return hashlib.sha256(text.encode()).hexdigest()


def labelled_pairs(conn: Connection, labels: list[Label], base: Params) -> LabelSet:
    """Comparison levels and score offsets of the labelled pairs, from the records' data now.

    Offsets are what the pipeline adds to the m/u weights: the prior for the store's size and
    the term-frequency adjustments (only once the store is big enough, as in sync/golden.py).
    """
    ids = sorted({x.record_a for x in labels} | {x.record_b for x in labels})
    records: dict[int, Prepared] = {}
    for part in chunks(ids):
        for rid, data in conn.execute(
            select(source_record.c.id, source_record.c.data).where(
                one_of(conn, source_record.c.id, part)
            )
        ):
            records[int(rid)] = prepare(Contact.model_validate(data))
    matcher = FellegiSunterMatcher(base, frequencies=counted_for(conn, records.values()))
    levels = np.empty((len(labels), len(COMPARISONS)), dtype=np.int8)
    offsets = np.empty(len(labels), dtype=np.float64)
    for k, label in enumerate(labels):
        a, b = records[label.record_a], records[label.record_b]
        levels[k] = compare_levels(a, b)
        explanation = matcher.compare_prepared(a, b).explanation
        offsets[k] = explanation["prior_weight"] + sum(
            float(entry.get("tf_adjustment", 0.0)) for entry in explanation["fields"].values()
        )
    is_match = np.array([x.match for x in labels], dtype=np.bool_)
    return LabelSet(labels, levels, is_match, offsets)
