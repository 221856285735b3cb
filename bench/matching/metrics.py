"""Pairwise and B-cubed precision/recall/F1 of a clustering against ground truth."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

__all__ = ["scores"]


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def scores(truth: Mapping[str, str], predicted: Mapping[str, str]) -> dict[str, float]:
    """`truth` and `predicted` map record id -> cluster id (every record in both)."""
    joint = Counter((truth[r], predicted[r]) for r in truth)
    t_sizes = Counter(truth.values())
    p_sizes = Counter(predicted[r] for r in truth)
    tp = sum(c * (c - 1) // 2 for c in joint.values())
    true_pairs = sum(c * (c - 1) // 2 for c in t_sizes.values())
    pred_pairs = sum(c * (c - 1) // 2 for c in p_sizes.values())
    pp = tp / pred_pairs if pred_pairs else 1.0
    pr = tp / true_pairs if true_pairs else 1.0
    # B-cubed: per record, overlap of its predicted and true cluster.
    n = len(truth)
    bp = sum(c * c / p_sizes[p] for (_, p), c in joint.items()) / n
    br = sum(c * c / t_sizes[t] for (t, _), c in joint.items()) / n
    return {
        "pairwise_precision": pp,
        "pairwise_recall": pr,
        "pairwise_f1": _f1(pp, pr),
        "bcubed_precision": bp,
        "bcubed_recall": br,
        "bcubed_f1": _f1(bp, br),
        "true_pairs": true_pairs,
        "predicted_pairs": pred_pairs,
    }


# Pair categories, from the data alone (the same for every matcher), first that applies.
CATEGORIES = (
    "same email",
    "same phone",
    "name only, different company",
    "name only, first name differs",
    "name only",
)


def category(a: Mapping[str, str], b: Mapping[str, str]) -> str:
    """Which kind of evidence a pair of benchmark rows offers (canonical columns)."""
    if a["email_key"] and a["email_key"] == b["email_key"]:
        return CATEGORIES[0]
    if a["phone"] and a["phone"] == b["phone"]:
        return CATEGORIES[1]
    if a["company_key"] and b["company_key"] and a["company_key"] != b["company_key"]:
        return CATEGORIES[2]
    if a["first_name_norm"] != b["first_name_norm"]:
        return CATEGORIES[3]
    return CATEGORIES[4]


def errors_by_category(
    rows: Mapping[str, Mapping[str, str]],
    truth: Mapping[str, str],
    predicted: Mapping[str, str],
    *,
    max_cluster: int = 2000,
) -> dict[str, dict[str, int]]:
    """Per category: true pairs, missed true pairs, false pairs (predicted, not true).

    Predicted clusters above `max_cluster` records are counted as 'giant cluster' false pairs
    without listing them (a collapsed matcher would otherwise cost billions of pairs here).
    """
    out = {c: {"true": 0, "missed": 0, "false": 0} for c in (*CATEGORIES, "giant cluster")}

    def groups(mapping: Mapping[str, str]) -> list[list[str]]:
        by: dict[str, list[str]] = {}
        for rid, cid in mapping.items():
            by.setdefault(cid, []).append(rid)
        return list(by.values())

    for members in groups(truth):
        for i, x in enumerate(members):
            for y in members[i + 1 :]:
                cat = category(rows[x], rows[y])
                out[cat]["true"] += 1
                if predicted[x] != predicted[y]:
                    out[cat]["missed"] += 1
    for members in groups(predicted):
        if len(members) > max_cluster:
            same = Counter(truth[r] for r in members)
            wrong = len(members) * (len(members) - 1) // 2
            out["giant cluster"]["false"] += wrong - sum(c * (c - 1) // 2 for c in same.values())
            continue
        for i, x in enumerate(members):
            for y in members[i + 1 :]:
                if truth[x] != truth[y]:
                    out[category(rows[x], rows[y])]["false"] += 1
    return out
