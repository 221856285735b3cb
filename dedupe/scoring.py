"""Fellegi-Sunter scoring: m/u parameters, match weights, term frequencies, EM training.

For each comparison level `l`, `m[l]` is the share of true matches at that level and `u[l]` the
share of non-matches. A pair's match weight is the prior log-odds plus `log2(m/u)` of each
field's level (a null level adds nothing). The prior is stated as a `match_rate`: how many
other records match a given record (about 1 in CRM data). The prior odds for a pair among `n`
records is then `match_rate / (n - 1)`, so the prior follows the size of the store, and so does
the term-frequency-adjusted weight of an exact identifier (a value held by 2 of n records):
the two cancel, which keeps one set of thresholds meaningful at 10k and at 10M records.

Term-frequency adjustment: agreeing on "smith" is weaker evidence than agreeing on "zbigniew".
For an exact level the weight gets `log2(u_exact / tf(value))`, where `tf(value)` is the value's
share among all records (from a `Frequencies` object). Names and companies are clamped to
[TF_MIN, TF_MAX] bits; identifiers (email, phone) are not clamped upwards, since their weight
must grow with the store as the prior shrinks. A phone number shared by a whole switchboard
gets a large negative adjustment the same way.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dedupe.comparators import COMPARISONS, NULL, Columns, email_local, levels_many
from dedupe.normalize import Prepared

__all__ = [
    "MIN_POPULATION",
    "MODEL_VERSION",
    "Frequencies",
    "FrequencyTable",
    "Params",
    "default_params",
    "estimate_m",
    "estimate_u",
    "tf_values",
]

MODEL_VERSION = "crmhub-fs-3"  # bump when comparisons or shipped params change
# Below this many records term frequencies are noise (a phone on 2 of 3 records looks
# "common"): the matcher keeps its shipped priors. The pipeline applies the same floor.
MIN_POPULATION = 2000
TF_MIN, TF_MAX = -16.0, 6.0  # bits, for names and companies
_EPS = 1e-6


class Frequencies(Protocol):
    """How often a value occurs among the records the matcher works on.

    Kinds: 'first', 'last', 'email', 'phone', 'company' (term frequencies, by normalised value)
    and the blocking-key kinds of `MatchKey` ('email', 'phone', 'name', 'swap', 'org'), which
    decide which keys are too common to block on. The pipeline can back this with the store
    (`SELECT count(*) FROM match_key WHERE kind = ? AND value = ?`, cached); the batch path
    uses `FrequencyTable`.
    """

    @property
    def total(self) -> int:
        """Number of records counted."""
        ...

    def count(self, kind: str, value: str) -> int:
        """Records with this value (0 when unseen)."""
        ...


@dataclass(slots=True)
class FrequencyTable:
    """In-memory `Frequencies`: one Counter per kind."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    n: int = 0

    @property
    def total(self) -> int:
        return self.n

    def count(self, kind: str, value: str) -> int:
        table = self.counts.get(kind)
        return table.get(value, 0) if table else 0

    def add(self, kind: str, values: Iterable[str]) -> None:
        self.counts.setdefault(kind, Counter()).update(values)


def tf_values(record: Prepared) -> dict[str, tuple[str, ...]]:
    """The values of a record that term frequencies are counted on, by kind."""
    return {
        "first": tuple(v for v in (record.first, record.first_alt) if v),
        "last": tuple(v for v in (record.last, record.last_alt) if v),
        "email": record.emails,
        "local": tuple(loc for loc in (email_local(e) for e in record.emails) if len(loc) >= 5),
        "phone": record.phones,
        "company": (record.company,) if record.company else (),
    }


@dataclass(slots=True)
class Params:
    """A trained (or default) model: prior, m and u per level, with a version. JSON round-trips."""

    match_rate: float  # other records matching a given record, on average
    m: dict[str, list[float]]
    u: dict[str, list[float]]
    version: str = MODEL_VERSION
    trained_on: int = 0  # records seen by training; 0 for the shipped defaults
    population: int = 100_000  # store size assumed when no Frequencies says otherwise
    # How these were made, for parameters trained from steward labels (dedupe.training):
    # labels used, date, base version. Empty for the shipped and EM-trained parameters.
    provenance: dict[str, Any] = field(default_factory=dict)
    _weights: dict[str, list[float]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for comp in COMPARISONS:
            m, u = self.m[comp.name], self.u[comp.name]
            if len(m) != len(comp.levels) or len(u) != len(comp.levels):
                raise ValueError(f"params for {comp.name} need {len(comp.levels)} levels")
        self._weights = {
            c.name: [
                math.log2(max(mm, _EPS) / max(uu, _EPS))
                for mm, uu in zip(self.m[c.name], self.u[c.name], strict=True)
            ]
            for c in COMPARISONS
        }

    def prior_weight(self, n: int | None = None) -> float:
        """log2 prior odds that two records among `n` (default `population`) match."""
        size = max(n or self.population, 2)
        p = min(self.match_rate / (size - 1), 0.5)
        return math.log2(p / (1.0 - p))

    def weight(self, comparison: str, level: int) -> float:
        """log2(m/u) of one level; 0 for NULL."""
        return 0.0 if level == NULL else self._weights[comparison][level]

    def weight_matrix(self) -> npt.NDArray[np.float64]:
        """(fields, max_levels + 1) table; column -1 (last) holds the NULL weight 0."""
        width = max(len(c.levels) for c in COMPARISONS) + 1
        table = np.zeros((len(COMPARISONS), width))
        for i, c in enumerate(COMPARISONS):
            table[i, : len(c.levels)] = self._weights[c.name]
        return table

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "trained_on": self.trained_on,
                "population": self.population,
                "match_rate": round(self.match_rate, 6),
                "comparisons": {
                    c.name: {
                        "levels": list(c.levels),
                        "m": [round(x, 6) for x in self.m[c.name]],
                        "u": [round(x, 8) for x in self.u[c.name]],
                    }
                    for c in COMPARISONS
                },
                **({"provenance": self.provenance} if self.provenance else {}),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Params:
        data: dict[str, Any] = json.loads(text)
        comps = data["comparisons"]
        return cls(
            match_rate=float(data["match_rate"]),
            m={name: [float(x) for x in c["m"]] for name, c in comps.items()},
            u={name: [float(x) for x in c["u"]] for name, c in comps.items()},
            version=str(data.get("version", MODEL_VERSION)),
            trained_on=int(data.get("trained_on", 0)),
            population=int(data.get("population", 100_000)),
            provenance=dict(data.get("provenance") or {}),
        )


def default_params() -> Params:
    """The shipped parameters (dedupe/data/default_params.json): work with no training."""
    text = resources.files("dedupe").joinpath("data/default_params.json").read_text("utf-8")
    return Params.from_json(text)


def _level_shares(
    levels: npt.NDArray[np.int8], weights: npt.NDArray[np.float64] | None
) -> dict[str, list[float]]:
    shares: dict[str, list[float]] = {}
    for i, comp in enumerate(COMPARISONS):
        col = levels[:, i]
        w = np.ones(len(col)) if weights is None else weights
        seen = col != NULL
        total = float(w[seen].sum())
        counts = [float(w[col == lv].sum()) + 0.5 for lv in range(len(comp.levels))]
        denom = total + 0.5 * len(comp.levels)
        shares[comp.name] = [c / denom for c in counts]
    return shares


def estimate_u(
    records: Sequence[Prepared], *, pairs: int = 200_000, seed: int = 0
) -> dict[str, list[float]]:
    """u per level from random pairs (almost all of them non-matches)."""
    n = len(records)
    if n < 2:
        raise ValueError("need at least two records to estimate u")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, n, size=pairs)
    ib = rng.integers(0, n, size=pairs)
    keep = ia != ib
    levels = levels_many(Columns.of(records), ia[keep], ib[keep])
    return _level_shares(levels, None)


def estimate_m(
    levels: npt.NDArray[np.int8],
    start: Params,
    n_records: int,
    *,
    iterations: int = 25,
    tolerance: float = 1e-4,
    cand_prior: float | None = None,
    fixed_m: bool = False,
) -> Params:
    """EM over candidate pairs' levels: re-estimates m and the match rate; u stays fixed.

    `levels` is the (pairs, fields) array from `levels_many` on the blocked candidate pairs of
    `n_records` records. Inside EM the prior is the share of candidate pairs that match; the
    result is stated as a match rate (matching records per record). `fixed_m` estimates the
    match rate alone.
    """
    n_pairs = len(levels)
    if cand_prior is None:
        cand_prior = min(max(start.match_rate * n_records / 2 / max(n_pairs, 1), 1e-4), 0.9)
    m = start.m
    weights = np.zeros((len(COMPARISONS), max(len(c.levels) for c in COMPARISONS) + 1))
    for _ in range(iterations):
        for i, c in enumerate(COMPARISONS):
            weights[i, : len(c.levels)] = [
                math.log2(max(a, _EPS) / max(b, _EPS))
                for a, b in zip(m[c.name], start.u[c.name], strict=True)
            ]
        logit = math.log2(cand_prior / (1 - cand_prior))
        score = logit + weights[np.arange(len(COMPARISONS)), levels].sum(axis=1)
        p = 1.0 / (1.0 + np.exp2(-np.clip(score, -60, 60)))
        new_m = m if fixed_m else _level_shares(levels, p)
        cand_prior = float(np.clip(p.mean(), 1e-4, 0.9))
        delta = max(abs(a - b) for name in m for a, b in zip(new_m[name], m[name], strict=True))
        m = new_m
        if delta < tolerance and not fixed_m:
            break
    rate = 2.0 * cand_prior * n_pairs / max(n_records, 1)
    return Params(
        match_rate=rate, m=m, u=start.u, trained_on=n_records, population=start.population
    )
