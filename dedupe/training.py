"""Learning from steward decisions: labelled pairs refine the Fellegi-Sunter parameters.

A steward's approval is a labelled match; a rejection, or splitting a record off a golden
record, a labelled non-match (`sync/labels.py` reads them from the store). Given the labelled
pairs' comparison levels, `train_from_labels` makes new `Params` from a base set (the shipped
parameters: training always starts from them, so training twice on the same labels gives the
same parameters instead of compounding):

**m**, per comparison, is the posterior mean of a Dirichlet prior centred on the base m, of
strength `prior_strength` (alpha, counted in labels), updated by the labelled matches:

    m'[l] = (alpha * m[l] + n[l]) / (alpha + N)

where n[l] is how many labelled matches show level l (a null level is no evidence and is not
counted) and N = sum(n). alpha is the number of labelled matches at which what they show and
the base weigh equally: with the default alpha = 100, 10 labelled matches move m at most
10/110 (9 %) of the way to their own level shares, 100 move it half way, 500 move it 83 %.
No labelled match, no change.

**u** stays as it is. u is a level's share among *all* non-matching pairs, estimated from
200,000 random pairs; the non-matches a steward sees are the look-alikes the matcher was
unsure of (an exact surname is common among them and rare among non-matches at large), so
their level shares would drag u the wrong way.

**The prior** can be recalibrated on all labels, matches and non-matches (`shift_sd` > 0; off
by default): a steward sees pairs picked by their score, but given a pair's fields its outcome
is not picked, so the labels say how far the model's probabilities are off in the review band.
The shift (bits added to the prior log-odds) is the maximum a posteriori intercept of a
logistic model whose offsets are the labelled pairs' match weights under the new m, with a
normal prior N(0, shift_sd^2) on it; the match rate becomes rate * 2^shift. On the benchmark
(docs/benchmarks.md) the review band was over-confident, the shift came out at -1 to -2.5
bits, and applied to every pair it bought precision with more recall than it was worth, hence
off by default. The thresholds stay as configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from dedupe.comparators import COMPARISONS
from dedupe.scoring import MODEL_VERSION, Params

__all__ = [
    "DEFAULT_PRIOR_STRENGTH",
    "DEFAULT_SHIFT_SD",
    "LevelChange",
    "TrainingResult",
    "base_version",
    "level_changes",
    "train_from_labels",
    "trained_version",
]

DEFAULT_PRIOR_STRENGTH = 100.0  # labels at which observed level shares and the base weigh equally
DEFAULT_SHIFT_SD = 0.0  # bits: sd of the normal prior on the prior shift; 0 = no shift
_EPS = 1e-6
_MAX_SHIFT = 20.0  # bits; the search interval for the shift


@dataclass(frozen=True, slots=True)
class LevelChange:
    """One comparison level before and after training."""

    comparison: str
    level: str
    labels: int  # labelled matches at this level
    old_m: float
    new_m: float
    old_weight: float  # bits, log2(m/u)
    new_weight: float

    @property
    def shift(self) -> float:
        return self.new_weight - self.old_weight

    def as_dict(self) -> dict[str, Any]:
        return {
            "comparison": self.comparison,
            "level": self.level,
            "labels": self.labels,
            "old_m": round(self.old_m, 6),
            "new_m": round(self.new_m, 6),
            "old_weight": round(self.old_weight, 3),
            "new_weight": round(self.new_weight, 3),
        }


@dataclass(frozen=True, slots=True)
class TrainingResult:
    """New parameters, what changed (largest weight shifts first) and the labels used."""

    params: Params
    matches: int
    non_matches: int
    prior_shift: float  # bits added to the prior log-odds
    base_match_rate: float
    changes: list[LevelChange] = field(default_factory=list)  # against the base parameters
    counts: dict[str, list[int]] = field(default_factory=dict)  # labelled matches per level

    def as_dict(self, top: int | None = None) -> dict[str, Any]:
        return {
            "version": self.params.version,
            "labels": {"match": self.matches, "non_match": self.non_matches},
            "prior_shift_bits": round(self.prior_shift, 3),
            "match_rate": {
                "old": round(self.base_match_rate, 6),
                "new": round(self.params.match_rate, 6),
            },
            "changes": [c.as_dict() for c in self.changes[:top]],
        }


def base_version(version: str) -> str:
    """The comparisons' version a parameter set belongs to ('crmhub-fs-2+t3' -> 'crmhub-fs-2')."""
    return version.partition("+")[0]


def trained_version(sequence: int, base: str = MODEL_VERSION) -> str:
    """The version of the `sequence`-th trained parameter set on top of `base`."""
    return f"{base_version(base)}+t{sequence}"


def _blend_m(
    base: Params, levels: npt.NDArray[np.int8], alpha: float
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    new_m: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    for i, comp in enumerate(COMPARISONS):
        column = levels[:, i]
        n = [int(np.count_nonzero(column == lv)) for lv in range(len(comp.levels))]
        old = np.asarray(base.m[comp.name], dtype=np.float64)
        old = old / old.sum()
        total = sum(n)
        if total == 0:
            new_m[comp.name] = list(base.m[comp.name])  # no evidence: exactly as it was
        else:
            new_m[comp.name] = [float(x) for x in (alpha * old + np.asarray(n)) / (alpha + total)]
        counts[comp.name] = n
    return new_m, counts


def _sigmoid2(bits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp2(-np.clip(bits, -60, 60))), dtype=np.float64)


def _prior_shift(
    scores: npt.NDArray[np.float64], is_match: npt.NDArray[np.bool_], shift_sd: float
) -> float:
    """MAP intercept shift (bits): root of ln2 * sum(y - p(s + d)) - d / sd^2, by bisection
    (the left side falls monotonically in d, so the root is unique)."""
    if shift_sd <= 0 or len(scores) == 0:
        return 0.0
    y = is_match.astype(np.float64)

    def slope(d: float) -> float:
        return float(math.log(2) * np.sum(y - _sigmoid2(scores + d)) - d / shift_sd**2)

    lo, hi = -_MAX_SHIFT, _MAX_SHIFT
    for _ in range(80):
        mid = (lo + hi) / 2
        if slope(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def train_from_labels(
    base: Params,
    levels: npt.NDArray[np.int8],
    is_match: npt.NDArray[np.bool_],
    *,
    version: str,
    offsets: npt.NDArray[np.float64] | None = None,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    shift_sd: float = DEFAULT_SHIFT_SD,
    trained_at: datetime | None = None,
    provenance: dict[str, Any] | None = None,
) -> TrainingResult:
    """Parameters refined by labelled pairs (see the module docstring for the method).

    `levels` is the (pairs, comparisons) level array of the labelled pairs (`levels_many` or
    `compare_levels`; NULL for a missing field) and `is_match` their labels. `offsets` are the
    parts of each pair's match weight that m does not touch: the prior for the store's size
    plus term-frequency adjustments (bits; default: the base prior alone). `provenance` adds
    to what is recorded about the training (e.g. a fingerprint of the labels).
    """
    levels = np.asarray(levels, dtype=np.int8).reshape(-1, len(COMPARISONS))
    is_match = np.asarray(is_match, dtype=np.bool_)
    if len(levels) != len(is_match):
        raise ValueError(f"{len(levels)} level rows for {len(is_match)} labels")
    if prior_strength <= 0:
        raise ValueError("prior_strength must be positive (labels that weigh like the base)")
    new_m, counts = _blend_m(base, levels[is_match], prior_strength)
    stepping = Params(
        match_rate=base.match_rate,
        m=new_m,
        u=base.u,
        trained_on=base.trained_on,
        population=base.population,
    )
    table = stepping.weight_matrix()
    base_offsets = (
        np.full(len(levels), base.prior_weight())
        if offsets is None
        else np.asarray(offsets, dtype=np.float64)
    )
    scores = base_offsets + table[np.arange(len(COMPARISONS)), levels].sum(axis=1)
    shift = _prior_shift(scores, is_match, shift_sd)
    matches = int(is_match.sum())
    when = trained_at or datetime.now(UTC)
    params = Params(
        match_rate=base.match_rate * 2.0**shift,
        m=new_m,
        u=base.u,
        version=version,
        trained_on=base.trained_on,
        population=base.population,
        provenance={
            "method": "labels",
            "base_version": base.version,
            "trained_at": when.isoformat(timespec="seconds"),
            "labels": {"match": matches, "non_match": len(is_match) - matches},
            "prior_strength": prior_strength,
            "shift_sd": shift_sd,
            "prior_shift_bits": round(shift, 4),
            **(provenance or {}),
        },
    )
    return TrainingResult(
        params,
        matches,
        len(is_match) - matches,
        shift,
        base.match_rate,
        level_changes(base, params, counts),
        counts,
    )


def level_changes(
    old: Params, new: Params, counts: dict[str, list[int]] | None = None
) -> list[LevelChange]:
    """Every comparison level's m and weight in `old` and `new`, largest weight shift first.

    `counts`: labelled matches per comparison and level (from a `TrainingResult`).
    """
    changes = [
        LevelChange(
            comparison=comp.name,
            level=name,
            labels=counts[comp.name][lv] if counts else 0,
            old_m=old.m[comp.name][lv],
            new_m=new.m[comp.name][lv],
            old_weight=old.weight(comp.name, lv),
            new_weight=new.weight(comp.name, lv),
        )
        for comp in COMPARISONS
        for lv, name in enumerate(comp.levels)
    ]
    changes.sort(key=lambda c: (-abs(c.shift), c.comparison, c.level))
    return changes
