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
