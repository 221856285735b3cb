from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from crmhub.records import Contact
from dedupe import cluster as cluster_module
from dedupe import matcher as matcher_module
from dedupe.cluster import candidate_pairs, cluster, cluster_prepared, link, train
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import prepare


def test_issue_example_folds_into_one_person() -> None:
    contacts = [
        Contact(first_name="Bob", last_name="Smith", emails=["bob.smith@gmail.com"]),
        Contact(
            first_name="Robert",
            last_name="Smith",
            company="Acme Inc.",
            emails=["bobsmith@gmail.com"],
            phones=["+15550101234"],
        ),
        Contact(full_name="R. Smith", emails=["rsmith@acme.com"], company="Acme"),
        Contact(first_name="James", last_name="Smith", company="Globex", phones=["+15550100002"]),
        Contact(first_name="James", last_name="Smith", company="Initech", phones=["+15550100003"]),
    ]
    result = cluster(contacts)
    # Bob = Robert on the email key; "R. Smith" at Acme is likely but not certain: not merged.
    assert [0, 1] in result.clusters
    assert [2] in result.clusters
    pairs = list(zip(result.pairs.ia.tolist(), result.pairs.ib.tolist(), strict=True))
    likely = dict(zip(pairs, result.probabilities.tolist(), strict=True))
    assert 0.5 <= likely[(1, 2)] < 0.95
    assert [3] in result.clusters
    assert [4] in result.clusters


def test_empty_and_tiny_inputs() -> None:
    assert cluster([]).clusters == []
    assert cluster([Contact()]).clusters == [[0]]
    assert cluster([Contact(), Contact()]).clusters == [[0], [1]]


def test_one_email_shared_by_50k_records_is_capped_not_quadratic(caplog) -> None:
    shared = Contact(emails=["pat@bigco.com"])  # not a role address: only the cap catches it
    records = [prepare(shared)] * 50_000
    start = time.perf_counter()
    pairs = candidate_pairs(records, max_block=200)
    assert time.perf_counter() - start < 10
    assert len(pairs.ia) == 0
    assert any(key.value == "pat@bigco.com" and size == 50_000 for key, size in pairs.capped)
    # The warning says which kind of key and how big, never the address itself (PII).
    assert "email key held by 50000 records" in caplog.text
    assert "pat@bigco.com" not in caplog.text


def test_chain_guard_sends_weak_bridge_to_review() -> None:
    # Two clear people, and a bridge record that looks like each of them on one identifier.
    ann = [Contact(first_name="Ann", last_name="Lee", emails=["ann@x.com"], city="Oslo")] * 2
    bea = [Contact(first_name="Bea", last_name="Moss", phones=["+15550100009"], city="Rome")] * 2
    bridge = Contact(
        first_name="Ann", last_name="Lee", emails=["ann@x.com"], phones=["+15550100009"]
    )
    result = cluster([*ann, *bea, bridge])
    members = {tuple(c) for c in result.clusters}
    assert (0, 1, 2, 3, 4) not in members  # no chaining of Ann and Bea through the bridge
    assert any(set(c) >= {0, 1} for c in result.clusters)
    assert any(set(c) >= {2, 3} for c in result.clusters)


def test_train_learns_parameters_without_labels() -> None:
    contacts = [
        Contact(first_name=f, last_name=s, emails=[f"{f}.{s}@gmail.com".lower()])
        for f in ("Ann", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")
        for s in ("Lee", "Moss", "Ng", "Orr", "Park", "Quinn", "Ross", "Shaw")
    ] * 2
    params = train(contacts)
    assert params.trained_on == len(contacts)
    assert params.weight("last_name", 2) > 0 > params.weight("last_name", 0)
    assert params.match_rate > 0


def test_probe_flag_table_agrees_with_is_probe() -> None:
    from dedupe.cluster import _PROBE_FLAGS
    from dedupe.matcher import PROBE_KINDS, is_probe

    for contact, row in (
        (Contact(first_name="Ann"), 0),
        (Contact(first_name="A."), 1),
        (Contact(), 2),
    ):
        record = prepare(contact)
        assert _PROBE_FLAGS[row] == {k: 1 if is_probe(record, k) else 2 for k in PROBE_KINDS}


def test_steward_constraints_bind_the_batch_clusterer() -> None:
    same = [
        Contact(first_name="Bob", last_name="Smith", emails=["bob.smith@gmail.com"]),
        Contact(first_name="Robert", last_name="Smith", emails=["bobsmith@gmail.com"]),
        Contact(first_name="Bob", last_name="Smith", emails=["bob.smith@gmail.com"]),
        Contact(first_name="Ann", last_name="Ortiz", phones=["+15550100009"]),
    ]
    records = [prepare(c) for c in same]
    matcher = FellegiSunterMatcher()
    assert cluster_prepared(records, matcher).clusters == [[0, 1, 2], [3]]
    # do-not-merge 0/1: 2 joins one of them, never both; confirmed merge 0/3 holds.
    held = cluster_prepared(records, matcher, must_link=[(0, 3)], cannot_link=[(0, 1)])
    assert [0, 3] in [sorted(set(c) & {0, 3}) for c in held.clusters]
    assert not any({0, 1} <= set(c) for c in held.clusters)
    # The exact path: transitive links, the same constraints.
    assert link(4, [(0, 1), (1, 2)]) == [[0, 1, 2], [3]]
    assert link(4, [(0, 1), (1, 2)], cannot_link=[(0, 2)]) == [[0, 1], [2], [3]]
    assert link(4, [], must_link=[(2, 3)]) == [[0], [1], [2, 3]]


def test_check_stop_is_asked_per_chunk_scored_and_per_block_of_links(monkeypatch) -> None:
    """A caller can end a long clustering (Ctrl-C during a first load) between any two
    chunks of pairs scored or blocks of links taken: `check_stop` raises, and the error
    comes out of `cluster_prepared`."""
    monkeypatch.setattr(matcher_module, "PAIR_CHUNK", 16)
    monkeypatch.setattr(cluster_module, "LINKS_PER_CHECK", 8)
    names = ("Ann", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")
    people = [
        Contact(first_name=f, last_name=s, emails=[f"{f}.{s}@gmail.com".lower()])
        for f in names
        for s in ("Lee", "Moss", "Ng", "Orr")
    ]
    records = [prepare(c) for c in people * 2]
    matcher = FellegiSunterMatcher()
    calls: list[int] = []
    result = cluster_prepared(records, matcher, check_stop=lambda: calls.append(1))
    assert result.clusters == cluster_prepared(records, matcher).clusters  # asked, unchanged
    scored, linked = len(result.pairs.ia), len(people)  # each person's two records link
    assert len(calls) >= scored // 16 + linked // 8

    class Stopped(Exception):
        pass

    def stop_at(n: int) -> Callable[[], None]:
        def check() -> None:
            if len(asked) == n:
                raise Stopped
            asked.append(1)

        asked: list[int] = []
        return check

    for n in (0, len(calls) // 2, len(calls) - 1):  # at blocking, scoring, linking
        with pytest.raises(Stopped):
            cluster_prepared(records, matcher, check_stop=stop_at(n))


class _GivenScores(FellegiSunterMatcher):
    """The shipped matcher with each candidate pair's probability given by the test."""

    def __init__(self, given: dict[tuple[int, int], float]) -> None:
        super().__init__()
        self.given = given

    def probabilities(self, cols: Any, ia: Any, ib: Any, **_: Any) -> npt.NDArray[np.float64]:
        return np.array([self.given[a, b] for a, b in zip(ia.tolist(), ib.tolist(), strict=True)])


def test_the_chain_guard_weighs_every_scored_pair_between_two_clusters() -> None:
    """{0, 1} and {2, 3} are each one person; the strong link 1-2 would join them, but 0 and 3
    are surely different people: the link goes to review. Without that contradiction the
    clusters join."""
    records = [prepare(Contact(first_name="Jo", last_name="Smith")) for _ in range(4)]
    sure, apart = {(0, 1): 0.99, (2, 3): 0.99, (1, 2): 0.98}, {(0, 2): 0.5, (1, 3): 0.5}
    held = cluster_prepared(records, _GivenScores({**sure, **apart, (0, 3): 0.001}))
    assert held.clusters == [[0, 1], [2, 3]]
    assert [(a, b) for a, b, _ in held.review] == [(1, 2)]
    joined = cluster_prepared(records, _GivenScores({**sure, **apart, (0, 3): 0.2}))
    assert joined.clusters == [[0, 1, 2, 3]]  # low, but not a contradiction


@pytest.mark.parametrize("lookups", [1_000_000, 0])  # by binary search, by neighbours
def test_scored_pairs_between_two_clusters_are_all_found(monkeypatch, lookups: int) -> None:
    from dedupe.cluster import _Clusters, _ScoredPairs

    monkeypatch.setattr(cluster_module, "LOOKUPS_PER_JOIN", lookups)
    rng = np.random.default_rng(5)
    n = 300
    codes = np.unique(rng.integers(0, n, 5_000) * n + rng.integers(0, n, 5_000))
    ia, ib = codes // n, codes % n
    ia, ib = ia[ia < ib], ib[ia < ib]
    probs = rng.random(len(ia))
    scored = _ScoredPairs(n, ia * n + ib, probs)
    by_pair = dict(zip(zip(ia.tolist(), ib.tolist(), strict=True), probs.tolist(), strict=True))
    for _ in range(100):
        clusters = _Clusters(n)
        groups = np.split(rng.permutation(n), np.sort(rng.choice(n, 60, replace=False)))
        for group in groups:
            for x in group[1:].tolist():
                clusters.union(clusters.find(int(group[0])), clusters.find(x))
        xs, ys = (g.tolist() for g in groups[1:3])
        between = [(min(x, y), max(x, y)) for x in xs for y in ys]
        want = sorted(by_pair[pair] for pair in between if pair in by_pair)
        got = scored.between(clusters, clusters.find(xs[0]), clusters.find(ys[0]))
        assert sorted(got) == want
    none = _ScoredPairs(n, codes[:0], probs[:0])
    assert none.between(_Clusters(n), 1, 2) == []
