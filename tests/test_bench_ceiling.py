"""The ceiling check: its table holds each cell's share of true pairs, it scores pairs by
their cell, and the clustering takes the probabilities it is given."""

from __future__ import annotations

import numpy as np

from bench.matching.ceiling import Run, fitted, table_probabilities


def test_the_table_scores_each_pair_by_its_cells_share_of_true_pairs():
    run = Run(3000, seed=3)
    seen = fitted(run)
    assert sum(pairs for pairs, _ in seen.values()) == len(run.cells)
    assert sum(true for _, true in seen.values()) == int(run.same.sum())
    probs, covered = table_probabilities(run, seen, min_cell=1)
    assert covered == len(probs)
    for k in range(0, len(probs), 97):
        pairs, true = seen[run.cells[k]]
        assert probs[k] == (true + 0.5) / (pairs + 1)
    # Knowing the answers, the table puts fewer pairs on the wrong side of 0.5.
    wrong_table = int(((probs >= 0.5) != run.same).sum())
    wrong_crmhub = int(((run.result.probabilities >= 0.5) != run.same).sum())
    assert wrong_table < wrong_crmhub
    # Cells with fewer pairs than asked keep crmhub's probability.
    kept, covered = table_probabilities(run, seen, min_cell=10**9)
    assert covered == 0
    assert np.array_equal(kept, run.result.probabilities)


def test_clustering_takes_the_probabilities_given():
    run = Run(3000, seed=3)
    assert run.scores(run.result)["predicted_pairs"] > 0
    alone = run.clustered(np.zeros(len(run.cells)))
    assert all(len(members) == 1 for members in alone.clusters)
    assert run.scores(alone)["predicted_pairs"] == 0
