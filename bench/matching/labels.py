"""Simulated steward: label review-band pairs from the ground truth, retrain, re-score.

`python -m bench.matching --labels N` runs crmhub once with the shipped parameters, lets a
simulated steward decide N pairs drawn at random from the review queue it produced (approve
when the ground truth says same person, reject otherwise: a steward who is always right),
trains on those labels exactly as `crmhub dedupe train` does (`dedupe.training`, from the
shipped parameters), and clusters the whole data set again with the trained parameters.

Only the parameters change between the two runs: the labelled pairs are not forced together
or apart in the second run, so the figures show what the labels taught the model about
every other pair, not the N decisions themselves.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from dedupe.cluster import ClusterResult
from dedupe.comparators import Columns, levels_many
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import Prepared
from dedupe.training import (
    DEFAULT_PRIOR_STRENGTH,
    DEFAULT_SHIFT_SD,
    TrainingResult,
    train_from_labels,
    trained_version,
)

__all__ = ["label_review_pairs", "retrain"]


def label_review_pairs(
    result: ClusterResult, truth: Sequence[str], n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N review pairs picked at random (seeded), labelled by the ground truth."""
    queue = sorted((a, b) for a, b, _p in result.review)
    picked = random.Random(seed).sample(queue, min(n, len(queue)))
    ia = np.array([a for a, _ in picked], dtype=np.int64)
    ib = np.array([b for _, b in picked], dtype=np.int64)
    labels = np.array([truth[a] == truth[b] for a, b in picked], dtype=np.bool_)
    return ia, ib, labels


def retrain(
    records: Sequence[Prepared],
    matcher: FellegiSunterMatcher,
    ia: np.ndarray,
    ib: np.ndarray,
    labels: np.ndarray,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    shift_sd: float = DEFAULT_SHIFT_SD,
) -> TrainingResult:
    """`train_from_labels` on the labelled pairs, offsets as the pipeline computes them."""
    cols = Columns.of(records)
    levels = levels_many(cols, ia, ib)
    total = matcher.frequencies.total if matcher.frequencies else None
    offsets = matcher.params.prior_weight(total) + matcher.tf_many(cols, ia, ib, levels)
    return train_from_labels(
        matcher.params,
        levels,
        labels,
        version=trained_version(1),
        offsets=offsets,
        prior_strength=prior_strength,
        shift_sd=shift_sd,
    )
