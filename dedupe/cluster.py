"""Batch path: blocking into candidate pairs, EM training, chain-guarded clustering.

Used by the benchmark and by a full rebuild; the incremental pipeline uses `Matcher.keys` and
`Matcher.compare` instead. Everything is bounded: a blocking key held by more than `max_block`
records is skipped and reported (`ClusterResult.capped`), so one email shared by 50,000 records
costs 50,000 key entries, not 1.25 billion comparisons.
"""

from __future__ import annotations

import logging
from array import array
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from crmhub.records import Contact
from dedupe.comparators import COMPARISONS, NULL, Columns, levels_many
from dedupe.matcher import PROBE_KINDS, FellegiSunterMatcher, MatchKey, blocking_keys, is_probe
from dedupe.normalize import Prepared, prepare
from dedupe.scoring import FrequencyTable, Params, default_params, estimate_m, estimate_u, tf_values

__all__ = [
    "CandidatePairs",
    "ClusterResult",
    "candidate_pairs",
    "cluster",
    "cluster_prepared",
    "frequency_table",
    "record_keys",
    "should_join",
    "train",
]

log = logging.getLogger(__name__)
PROBE_MARKERS = frozenset(PROBE_KINDS.values())


@dataclass(slots=True)
class CandidatePairs:
    """Pairs (ia[k] < ib[k]) sharing at least one blocking key, and the keys that were skipped."""

    ia: npt.NDArray[np.int64]
    ib: npt.NDArray[np.int64]
    capped: list[tuple[MatchKey, int]]


@dataclass(slots=True)
class ClusterResult:
    """Clusters (lists of record indices, singletons included), pairs sent to review, and
    what blocking skipped. `probabilities` is aligned with `pairs`."""

    clusters: list[list[int]]
    review: list[tuple[int, int, float]]
    capped: list[tuple[MatchKey, int]]
    pairs: CandidatePairs
    probabilities: npt.NDArray[np.float64] = field(repr=False)


def record_keys(records: Sequence[Prepared]) -> list[list[MatchKey]]:
    """Every record's blocking keys, computed once for `frequency_table` and `candidate_pairs`."""
    return [blocking_keys(rec) for rec in records]


def frequency_table(
    records: Sequence[Prepared],
    keys: Sequence[list[MatchKey]] | None = None,
    *,
    blocking: bool = True,
) -> FrequencyTable:
    """Term frequencies and blocking-key counts of a batch (`keys`: from `record_keys`).

    `blocking=False` counts term frequencies only: the batch path caps blocks itself and
    never asks `Matcher.keys()`, so it need not hold a count for every key.
    """
    table = FrequencyTable(n=len(records))
    by_kind: dict[str, list[str]] = defaultdict(list)
    for i, rec in enumerate(records):
        for kind, values in tf_values(rec).items():
            by_kind[kind].extend(values)
        if not blocking:
            continue
        for key in keys[i] if keys is not None else blocking_keys(rec):
            if key.kind not in ("email", "phone"):  # those two are counted as tf values
                by_kind[key.kind].append(key.value)
    for kind, seen in by_kind.items():
        table.add(kind, seen)
    return table


@lru_cache(maxsize=512)
def _triu(size: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    ti, tj = np.triu_indices(size, k=1)
    return ti.astype(np.int64), tj.astype(np.int64)


def candidate_pairs(
    records: Sequence[Prepared],
    max_block: int = 200,
    kinds: frozenset[str] | None = None,
    keys: Sequence[list[MatchKey]] | None = None,
) -> CandidatePairs:
    """Union of the blocking rules' pairs (all, or those of `kinds`), each pair once.

    A block of an ordinary kind gives all its pairs and is skipped above `max_block` members;
    a block of a probe kind gives probe x member pairs and is skipped when that exceeds
    max_block^2 / 2 pairs (the cost of the largest ordinary block).

    Keys are held as 64-bit hashes in flat arrays and grouped by sorting, so no per-key
    Python object outlives its record; a hash collision could only add candidate pairs,
    which scoring then rejects.
    """
    hashes, owners, flags = array("q"), array("q"), array("b")
    for i, rec in enumerate(records):
        for key in keys[i] if keys is not None else blocking_keys(rec):
            kind = key.kind
            if kind in PROBE_MARKERS or (kinds is not None and kind not in kinds):
                continue
            hashes.append(hash(key))
            owners.append(i)
            # 0: ordinary kind; probe kinds: 1 for a probe of the block, 2 for any other member
            flags.append(0 if kind not in PROBE_KINDS else 1 if is_probe(rec, kind) else 2)
    h = np.frombuffer(hashes, dtype=np.int64) if hashes else np.zeros(0, dtype=np.int64)
    order = np.argsort(h, kind="stable")
    h = h[order]
    owner = np.frombuffer(owners, dtype=np.int64)[order] if owners else h
    flag = np.frombuffer(flags, dtype=np.int8)[order] if flags else h.astype(np.int8)
    del hashes, owners, flags, order
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else h
    sizes = np.diff(np.r_[starts, len(h)])
    probe_block = flag[starts] != 0
    capped_at: list[tuple[int, int]] = []  # (start, size) of skipped blocks
    chunks_a: list[npt.NDArray[np.int64]] = []
    chunks_b: list[npt.NDArray[np.int64]] = []
    # Ordinary blocks, vectorised per block size: a (blocks, size) matrix of members.
    ordinary = ~probe_block & (sizes >= 2)
    for size in np.unique(sizes[ordinary]).tolist():
        at = starts[ordinary & (sizes == size)]
        if size > max_block:
            capped_at += [(s, size) for s in at.tolist()]
            continue
        members = owner[at[:, None] + np.arange(size)]
        ti, tj = _triu(size)
        chunks_a.append(members[:, ti].ravel())
        chunks_b.append(members[:, tj].ravel())
    budget = max_block * max_block // 2
    for s, size in zip(
        starts[probe_block & (sizes >= 2)].tolist(),
        sizes[probe_block & (sizes >= 2)].tolist(),
        strict=True,
    ):
        members = owner[s : s + size]
        probes = members[flag[s : s + size] == 1]
        if not len(probes):
            continue
        if len(probes) * size > budget:
            capped_at.append((s, size))
            continue
        pa, pb = np.repeat(probes, size), np.tile(members, len(probes))
        chunks_a.append(pa[pa != pb])
        chunks_b.append(pb[pa != pb])
    capped = [(_key_of(records, int(owner[s]), int(h[s])), size) for s, size in capped_at]
    if capped:
        log.warning(
            "%d blocking keys skipped as too common (largest %s:%s, %d records)",
            len(capped),
            *max(capped, key=lambda c: c[1])[0],
            max(c[1] for c in capped),
        )
    if not chunks_a:
        empty = np.zeros(0, dtype=np.int64)
        return CandidatePairs(empty, empty, capped)
    a, b = np.concatenate(chunks_a), np.concatenate(chunks_b)
    del chunks_a, chunks_b
    n = np.int64(max(len(records), 1))
    codes = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return CandidatePairs(codes // n, codes % n, capped)


def _key_of(records: Sequence[Prepared], owner: int, key_hash: int) -> MatchKey:
    """The key with this hash among `owner`'s keys (to report a skipped block by name)."""
    return next(k for k in blocking_keys(records[owner]) if hash(k) == key_hash)


# EM sessions, as splink trains: each blocks on some fields and estimates m for the others
# (the blocked-on fields agree by construction, so their m cannot be learnt from those pairs).
_SESSIONS: tuple[tuple[frozenset[str], frozenset[str]], ...] = (
    (frozenset({"email"}), frozenset({"first_name", "last_name", "company", "city"})),
    (frozenset({"name", "swap"}), frozenset({"email", "phone", "company", "city"})),
)


def train(
    contacts: Sequence[Contact],
    *,
    start: Params | None = None,
    max_block: int = 200,
    seed: int = 0,
) -> Params:
    """Unsupervised parameters from data: u from random pairs, m and match rate by EM.

    Two EM sessions (blocked on email; blocked on name) each estimate m for the fields they
    did not block on; fields estimated twice are averaged. The match rate comes from the
    union of all candidate pairs with the learnt m and u.
    """
    records = [prepare(c) for c in contacts]
    base = start or default_params()
    if len(records) < 2:
        return base
    u = estimate_u(records, seed=seed)
    cols = Columns.of(records)
    learnt: dict[str, list[list[float]]] = defaultdict(list)
    for kinds, fields in _SESSIONS:
        pairs = candidate_pairs(records, max_block, kinds)
        if len(pairs.ia) < 50:
            continue
        levels = levels_many(cols, pairs.ia, pairs.ib)
        active = [i for i, c in enumerate(COMPARISONS) if c.name in fields]
        masked = np.full_like(levels, NULL)
        masked[:, active] = levels[:, active]
        start_params = Params(match_rate=base.match_rate, m=base.m, u=u)
        session = estimate_m(masked, start_params, len(records), cand_prior=0.5)
        for name in fields:
            learnt[name].append(session.m[name])
    m = {
        c.name: (
            [float(x) for x in np.mean(learnt[c.name], axis=0)]
            if learnt[c.name]
            else base.m[c.name]
        )
        for c in COMPARISONS
    }
    params = Params(match_rate=base.match_rate, m=m, u=u, trained_on=len(records))
    pairs = candidate_pairs(records, max_block)
    if len(pairs.ia) == 0:
        return params
    levels = levels_many(cols, pairs.ia, pairs.ib)
    return estimate_m(levels, params, len(records), fixed_m=True)


class _Clusters:
    """Union-find with member lists (merging the smaller into the larger)."""

    def __init__(self, n: int) -> None:
        self.root = list(range(n))
        self.members: dict[int, list[int]] = {i: [i] for i in range(n)}

    def find(self, x: int) -> int:
        root = self.root[x]
        while root != self.root[root]:
            root = self.root[root]
        while self.root[x] != root:
            self.root[x], x = root, self.root[x]
        return root

    def union(self, a: int, b: int) -> None:
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a
        for x in self.members[b]:
            self.root[x] = a
        self.members[a] += self.members.pop(b)


def should_join(scores_between_clusters: Sequence[float], review: float) -> bool:
    """The chain guard: may a strong link join two clusters, given every scored pair between
    them (the link included)?

    Yes when the pairs agree on average (mean probability >= `review`), or when none of them
    leans towards "different people" (every probability >= 0.5): a record from before a job
    change scores low against the others but not below even odds, while a namesake pulled in
    through one shared switchboard number usually contradicts someone. No pairs: nothing
    contradicts the link, so yes. Pure, so the incremental path applies the same rule before
    it joins two existing golden records.
    """
    if not scores_between_clusters:
        return True
    if min(scores_between_clusters) >= 0.5:
        return True
    return sum(scores_between_clusters) / len(scores_between_clusters) >= review


@dataclass(slots=True)
class _Adjacency:
    """Scored pairs as a compressed sparse row table: record x's neighbours are
    `nbr[start[x]:start[x + 1]]` with probabilities `prob[...]` (arrays, not dicts)."""

    start: npt.NDArray[np.int64]
    nbr: npt.NDArray[np.int64]
    prob: npt.NDArray[np.float64]

    @classmethod
    def of(
        cls,
        n: int,
        ia: npt.NDArray[np.int64],
        ib: npt.NDArray[np.int64],
        probs: npt.NDArray[np.float64],
    ) -> _Adjacency:
        src, dst = np.concatenate([ia, ib]), np.concatenate([ib, ia])
        order = np.argsort(src, kind="stable")
        start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=n), out=start[1:])
        return cls(start, dst[order], np.concatenate([probs, probs])[order])


def _between(clusters: _Clusters, adjacency: _Adjacency, ra: int, rb: int) -> list[float]:
    """Probabilities of the scored pairs between two clusters."""
    small, other = (ra, rb) if len(clusters.members[ra]) <= len(clusters.members[rb]) else (rb, ra)
    out: list[float] = []
    for x in clusters.members[small]:
        lo, hi = int(adjacency.start[x]), int(adjacency.start[x + 1])
        for y, p in zip(adjacency.nbr[lo:hi].tolist(), adjacency.prob[lo:hi].tolist(), strict=True):
            if clusters.find(y) == other:
                out.append(p)
    return out


def _content_rank(records: Sequence[Prepared]) -> npt.NDArray[np.int64]:
    """Dense rank of each record by its content (identical records share a rank)."""

    def key(i: int) -> tuple[str, ...]:
        r = records[i]
        return (r.last, r.first, "|".join(r.emails), "|".join(r.phones), r.company, r.city)

    ordered = sorted(range(len(records)), key=key)
    rank = np.zeros(len(records), dtype=np.int64)
    current, previous = -1, None
    for i in ordered:
        k = key(i)
        if k != previous:
            current, previous = current + 1, k
        rank[i] = current
    return rank


def cluster_prepared(
    records: Sequence[Prepared],
    matcher: FellegiSunterMatcher,
    *,
    max_block: int = 200,
    keys: Sequence[list[MatchKey]] | None = None,
) -> ClusterResult:
    """Block, score and cluster prepared records with `matcher`'s params and thresholds.

    Chain guard: pairs at or above `auto_merge` are merged strongest first, but two clusters
    join only if `should_join` accepts the scored pairs between them; a strong link that fails
    goes to review instead (one strong link cannot join two groups whose other members
    disagree).
    """
    pairs = candidate_pairs(records, max_block, keys=keys)
    probs = matcher.probabilities(Columns.of(records), pairs.ia, pairs.ib)
    # Strongest first; ties broken by the records' content, not their position, so that the
    # clusters do not depend on input order (tests/dedupe/test_order_independence.py).
    rank = _content_rank(records)
    rank_a, rank_b = rank[pairs.ia], rank[pairs.ib]
    order = np.lexsort((np.maximum(rank_a, rank_b), np.minimum(rank_a, rank_b), -probs))
    strong = order[probs[order] >= matcher.review]
    # Only records with an auto-merge link ever join a cluster, so only pairs between two such
    # records can lie between clusters: the guard's adjacency holds just those.
    joinable = np.zeros(len(records), dtype=bool)
    sure = probs >= matcher.auto_merge
    joinable[pairs.ia[sure]] = joinable[pairs.ib[sure]] = True
    kept = np.flatnonzero(joinable[pairs.ia] & joinable[pairs.ib])
    adjacency = _Adjacency.of(len(records), pairs.ia[kept], pairs.ib[kept], probs[kept])
    del kept, joinable
    clusters = _Clusters(len(records))
    review: list[tuple[int, int, float]] = []
    for k in strong:
        a, b, p = int(pairs.ia[k]), int(pairs.ib[k]), float(probs[k])
        ra, rb = clusters.find(a), clusters.find(b)
        if ra == rb:
            continue
        if p < matcher.auto_merge:
            review.append((a, b, p))
            continue
        if len(clusters.members[ra]) + len(clusters.members[rb]) > 2 and not should_join(
            _between(clusters, adjacency, ra, rb), matcher.review
        ):
            review.append((a, b, p))
            continue
        clusters.union(ra, rb)
    groups = sorted((sorted(m) for m in clusters.members.values()), key=lambda m: m[0])
    return ClusterResult(groups, review, pairs.capped, pairs, probs)


def cluster(
    contacts: Sequence[Contact],
    *,
    params: Params | None = None,
    auto_merge: float = 0.95,
    review: float = 0.80,
    max_block: int = 200,
) -> ClusterResult:
    """Deduplicate a batch: term frequencies from the batch itself, then `cluster_prepared`."""
    records = [prepare(c) for c in contacts]
    matcher = FellegiSunterMatcher(
        params,
        auto_merge=auto_merge,
        review=review,
        frequencies=frequency_table(records, blocking=False),
    )
    return cluster_prepared(records, matcher, max_block=max_block)
