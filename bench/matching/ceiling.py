"""How far could any scorer of these fields go? `python -m bench.matching.ceiling`.

Fits a supervised lookup table on the ground truth of one seed (the development seed, 7):
for every cell of (all six comparison levels, the first and last names' frequency buckets),
the share of its candidate pairs that are truly one person. No independence between fields
is assumed, and the answers are used, which crmhub never does. The table then scores the
candidate pairs of another seed (the benchmark's, 1) where its cell holds `--min-cell` pairs
or more (crmhub's probability elsewhere), and those probabilities are clustered by the same
code (`cluster_prepared`, same thresholds and chain guard), so the two rows differ only in
the probabilities.

If the table does no better than crmhub, accuracy is limited by what the records say, not
by the model: the remaining misses are pairs whose fields look the same as those of pairs
of two people. Prints the scores of both, and per threshold the precision and true pairs
of the scored pairs at or above it (before clustering).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.matching.generate import generate
from bench.matching.metrics import scores
from bench.matching.ship_params import contact
from dedupe.cluster import ClusterResult, cluster_prepared, frequency_table
from dedupe.comparators import Columns, levels_many
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import Prepared, prepare

Cell = tuple[int, ...]


class _Given(FellegiSunterMatcher):
    """crmhub's matcher with the pairs' probabilities given (the table's)."""

    def __init__(self, base: FellegiSunterMatcher, probs: npt.NDArray[np.float64]) -> None:
        super().__init__(
            base.params,
            auto_merge=base.auto_merge,
            review=base.review,
            frequencies=base.frequencies,
        )
        self._probs = probs

    def probabilities(self, *args: Any, **kwargs: Any) -> npt.NDArray[np.float64]:
        return self._probs


class Run:
    """One seed's records, crmhub's clustering of them, and each candidate pair's cell."""

    def __init__(self, records: int, seed: int) -> None:
        self.rows = generate(records, seed)
        self.records: list[Prepared] = [prepare(contact(r)) for r in self.rows]
        self.truth = np.unique([r["cluster"] for r in self.rows], return_inverse=True)[1]
        frequencies = frequency_table(self.records, blocking=False)
        self.matcher = FellegiSunterMatcher(None, frequencies=frequencies)
        self.result = cluster_prepared(self.records, self.matcher)
        ia, ib = self.result.pairs.ia, self.result.pairs.ib
        self.same = self.truth[ia] == self.truth[ib]
        levels = levels_many(Columns.of(self.records), ia, ib)
        firsts = Counter(r.first for r in self.records)
        lasts = Counter(r.last for r in self.records)
        first = np.array([_bucket(firsts[r.first]) for r in self.records])
        last = np.array([_bucket(lasts[r.last]) for r in self.records])
        buckets = np.c_[np.maximum(first[ia], first[ib]), np.maximum(last[ia], last[ib])]
        self.cells: list[Cell] = [tuple(row) for row in np.c_[levels, buckets].tolist()]

    def clustered(self, probs: npt.NDArray[np.float64]) -> ClusterResult:
        return cluster_prepared(self.records, _Given(self.matcher, probs))

    def scores(self, result: ClusterResult) -> dict[str, float]:
        ids = [r["unique_id"] for r in self.rows]
        predicted = {ids[i]: ids[members[0]] for members in result.clusters for i in members}
        return scores({r["unique_id"]: r["cluster"] for r in self.rows}, predicted)


def _bucket(count: int) -> int:
    return min(int(math.log2(count + 1)), 12)


def fitted(train: Run) -> dict[Cell, tuple[int, int]]:
    """Per cell: candidate pairs, and how many of them are truly one person."""
    seen: dict[Cell, tuple[int, int]] = {}
    for cell, same in zip(train.cells, train.same.tolist(), strict=True):
        pairs, true = seen.get(cell, (0, 0))
        seen[cell] = (pairs + 1, true + same)
    return seen


def table_probabilities(
    test: Run, seen: dict[Cell, tuple[int, int]], min_cell: int
) -> tuple[npt.NDArray[np.float64], int]:
    """The table's probability of each of `test`'s pairs (crmhub's where its cell holds
    fewer than `min_cell` pairs), and how many pairs the table scored."""
    probs = test.result.probabilities.copy()
    covered = 0
    for k, cell in enumerate(test.cells):
        pairs, true = seen.get(cell, (0, 0))
        if pairs >= min_cell:
            probs[k] = (true + 0.5) / (pairs + 1)
            covered += 1
    return probs, covered


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.matching.ceiling")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--train-seed", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-cell", type=int, default=20)
    args = parser.parse_args()
    train, test = Run(args.records, args.train_seed), Run(args.records, args.seed)
    seen = fitted(train)
    table, covered = table_probabilities(test, seen, args.min_cell)
    print(
        f"{args.records} records; table fitted on seed {args.train_seed}'s ground truth "
        f"({len(seen)} cells), scoring seed {args.seed}'s {len(table):,} candidate pairs "
        f"({covered / max(len(table), 1):.1%} in a cell of {args.min_cell}+)"
    )
    header = f"{'scorer':<28}{'pair P':>8}{'pair R':>8}{'pair F1':>8}{'B3 F1':>8}"
    print(header)
    for name, result in (
        ("crmhub (shipped params)", test.result),
        ("supervised table", test.clustered(table)),
    ):
        s = test.scores(result)
        print(
            f"{name:<28}{s['pairwise_precision']:>8.4f}{s['pairwise_recall']:>8.4f}"
            f"{s['pairwise_f1']:>8.4f}{s['bcubed_f1']:>8.4f}"
        )
    true_pairs = int(test.same.sum())
    print(f"\nscored pairs at or above a threshold (of {true_pairs:,} true candidate pairs)")
    print(f"{'threshold':>10}{'crmhub P':>10}{'true':>8}{'table P':>10}{'true':>8}")
    for t in (0.5, 0.8, 0.9, 0.95):
        cells = []
        for probs in (test.result.probabilities, table):
            at = probs >= t
            cells += [f"{test.same[at].mean():>10.4f}", f"{int((at & test.same).sum()):>8,}"]
        print(f"{t:>10}" + "".join(cells))


if __name__ == "__main__":
    main()
