"""Batch path: blocking into candidate pairs, EM training, chain-guarded clustering.

Used by the benchmark and by a full rebuild; the incremental pipeline uses `Matcher.keys` and
`Matcher.compare` instead. Everything is bounded: a blocking key held by more than `max_block`
records is skipped and reported (`ClusterResult.capped`), so one email shared by 50,000 records
costs 50,000 key entries, not 1.25 billion comparisons.
"""

from __future__ import annotations

import gc
import logging
import os
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from crmhub.records import Contact
from dedupe.comparators import COMPARISONS, NULL, Columns, levels_many
from dedupe.matcher import (
    PROBE_KINDS,
    FellegiSunterMatcher,
    MatchKey,
    blocking_keys,
    key_tuples,
)
from dedupe.normalize import Prepared, prepare
from dedupe.scoring import (
    MIN_POPULATION,
    FrequencyTable,
    Params,
    default_params,
    estimate_m,
    estimate_u,
    tf_values,
)

__all__ = [
    "BORDERLINE",
    "CandidatePairs",
    "ClusterResult",
    "KeyIndex",
    "candidate_pairs",
    "cluster",
    "cluster_prepared",
    "collection_paused",
    "frequency_table",
    "kept_probability",
    "link",
    "prepare_all",
    "should_join",
    "train",
]

log = logging.getLogger(__name__)
PAIRS_PER_STEP = 1 << 22  # candidate pairs built per NumPy step (bounds the temporaries)
# Threads scoring a batch's candidate pairs (each holds one chunk's temporaries, ~80 MB).
SCORING_THREADS = min(4, os.cpu_count() or 1)
LINKS_PER_CHECK = 65_536  # strong links taken between two calls of a `check_stop`
PROBE_MARKERS = frozenset(PROBE_KINDS.values())
# A merge link this close above `auto_merge` is borderline: a store that grows moves its weight
# (its size sets the prior, its counts the term frequencies), so the store keeps it and
# re-decides it as it grows (sync/borderline.py). A 10% growth moved such links by up to 0.02.
BORDERLINE = 0.03


def kept_probability(p: float, auto_merge: float) -> float | None:
    """What a merge link of probability `p` leaves on its records' memberships: `p` (to four
    places) when borderline, None when sure."""
    return round(p, 4) if p < auto_merge + BORDERLINE else None


@dataclass(slots=True)
class CandidatePairs:
    """Pairs (ia[k] < ib[k]) sharing at least one blocking key, and the keys that were skipped."""

    ia: npt.NDArray[np.int64]
    ib: npt.NDArray[np.int64]
    capped: list[tuple[MatchKey, int]]


@dataclass(slots=True)
class ClusterResult:
    """Clusters (lists of record indices, singletons included), pairs sent to review, and
    what blocking skipped. `probabilities` is aligned with `pairs`. `borderline`: each record
    a borderline merge link joined, with the weakest such link's probability
    (`kept_probability`)."""

    clusters: list[list[int]]
    review: list[tuple[int, int, float]]
    capped: list[tuple[MatchKey, int]]
    pairs: CandidatePairs
    probabilities: npt.NDArray[np.float64] = field(repr=False)
    borderline: dict[int, float] = field(default_factory=dict)


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch builds its records.

    Preparing 100,000 records allocates millions of small objects that all stay alive; the
    collector would re-scan them again and again as they accumulate (a quarter of the load
    time). Reference counting still frees everything acyclic meanwhile, and the collector
    runs again afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def prepare_all(contacts: Sequence[Contact]) -> list[Prepared]:
    """`prepare` for a batch (collector paused, see `collection_paused`)."""
    with collection_paused():
        return [prepare(c) for c in contacts]


def frequency_table(
    records: Sequence[Prepared],
    keys: Sequence[Sequence[tuple[str, str]]] | None = None,
    *,
    blocking: bool = True,
) -> FrequencyTable:
    """Term frequencies and blocking-key counts of a batch (`keys`: each record's `key_tuples`).

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
        for kind, value in keys[i] if keys is not None else key_tuples(rec):
            if kind not in ("email", "phone"):  # those two are counted as tf values
                by_kind[kind].append(value)
    for kind, seen in by_kind.items():
        table.add(kind, seen)
    return table


@lru_cache(maxsize=512)
def _triu(size: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    ti, tj = np.triu_indices(size, k=1)
    return ti.astype(np.int64), tj.astype(np.int64)


class KeyIndex:
    """A batch's blocking keys as flat arrays (64-bit hash, owner, probe flag), built one
    record at a time, so a caller that computes each record's keys anyway (a rebuild, which
    stores them) need not keep them as Python objects for `candidate_pairs`.

    `kinds`: keep only keys of these kinds (None: all). Probe markers are never kept.
    """

    __slots__ = ("flags", "hashes", "kinds", "owners")

    def __init__(self, kinds: frozenset[str] | None = None) -> None:
        self.kinds = kinds
        self.hashes, self.owners, self.flags = array("q"), array("q"), array("b")

    def add(self, owner: int, record: Prepared, keys: Sequence[tuple[str, str]]) -> None:
        """Record `owner`'s keys (`key_tuples(record)`)."""
        self.add_parts(owner, *index_parts(record, keys, self.kinds))

    def add_parts(self, owner: int, used: Sequence[tuple[str, str]], flags: bytes) -> None:
        """Record `owner`'s keys as `index_parts` gives them (possibly on another process)."""
        self.hashes.extend(map(hash, used))
        self.owners.extend(repeat(owner, len(used)))
        self.flags.frombytes(flags)

    @classmethod
    def of(
        cls,
        records: Sequence[Prepared],
        kinds: frozenset[str] | None = None,
        keys: Sequence[Sequence[tuple[str, str]]] | None = None,
    ) -> KeyIndex:
        index = cls(kinds)
        for i, rec in enumerate(records):
            index.add(i, rec, keys[i] if keys is not None else key_tuples(rec))
        return index


def index_parts(
    record: Prepared, keys: Sequence[tuple[str, str]], kinds: frozenset[str] | None = None
) -> tuple[list[tuple[str, str]], bytes]:
    """The keys a `KeyIndex` (of `kinds`) holds for `record`, and each one's probe flag."""
    used = [k for k in keys if k[0] not in PROBE_MARKERS and (kinds is None or k[0] in kinds)]
    # 0: ordinary kind; probe kinds: 1 for a probe of the block, 2 for any other member
    probe = _PROBE_FLAGS[len(record.first) == 1 if record.first else 2]
    return used, bytes([probe.get(k[0], 0) for k in used])


def candidate_pairs(
    records: Sequence[Prepared],
    max_block: int = 200,
    kinds: frozenset[str] | None = None,
    keys: Sequence[Sequence[tuple[str, str]]] | None = None,
    *,
    index: KeyIndex | None = None,
) -> CandidatePairs:
    """Union of the blocking rules' pairs (all, or those of `kinds`), each pair once.

    A block of an ordinary kind gives all its pairs and is skipped above `max_block` members;
    a block of a probe kind gives probe x member pairs and is skipped when that exceeds
    max_block^2 / 2 pairs (the cost of the largest ordinary block).

    Keys are held as 64-bit hashes in flat arrays (`KeyIndex`; pass `index` when it was
    built already, and it is consumed) and grouped by sorting, so no per-key Python object
    outlives its record; a hash collision could only add candidate pairs, which scoring then
    rejects.
    """
    built = index if index is not None else KeyIndex.of(records, kinds, keys)
    hashes, owners, flags = built.hashes, built.owners, built.flags
    built.hashes, built.owners, built.flags = array("q"), array("q"), array("b")
    h = np.frombuffer(hashes, dtype=np.int64) if hashes else np.zeros(0, dtype=np.int64)
    order = np.argsort(h)  # members' order within a block does not matter: no stable sort
    h = h[order]
    owner = np.frombuffer(owners, dtype=np.int64)[order] if owners else h
    flag = np.frombuffer(flags, dtype=np.int8)[order] if flags else h.astype(np.int8)
    del hashes, owners, flags, order
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else h
    sizes = np.diff(np.r_[starts, len(h)])
    probe_block = flag[starts] != 0
    capped_at: list[tuple[int, int]] = []  # (start, size) of skipped blocks
    # Each pair as one code, min * n + max (8 bytes a pair until the duplicates go, not 16).
    n = np.int64(max(len(records), 1))
    chunks: list[npt.NDArray[np.int64]] = []
    # Ordinary blocks, vectorised per block size: a (blocks, size) matrix of members.
    ordinary = ~probe_block & (sizes >= 2)
    for size in np.unique(sizes[ordinary]).tolist():
        at = starts[ordinary & (sizes == size)]
        if size > max_block:
            capped_at += [(s, size) for s in at.tolist()]
            continue
        ti, tj = _triu(size)
        per = max(1, PAIRS_PER_STEP // len(ti))  # blocks at a time: bounded temporaries
        for lo in range(0, len(at), per):
            members = owner[at[lo : lo + per, None] + np.arange(size)]
            # members are in key order, not by index: either column may hold the smaller one
            left, right = members[:, ti].ravel(), members[:, tj].ravel()
            chunks.append(_pair_codes(left, right, n))
            del members, left, right
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
        pa, pb = pa[pa != pb], pb[pa != pb]
        chunks.append(_pair_codes(pa, pb, n))
    capped = [(_key_of(records, int(owner[s]), int(h[s])), size) for s, size in capped_at]
    if capped:
        # The kind only: a key's value is an email or phone (PII stays out of logs; the
        # values are in ClusterResult.capped for the report that asked for them).
        largest, size = max(capped, key=lambda c: c[1])
        log.warning(
            "%d blocking keys skipped as too common (largest: a %s key held by %d records)",
            len(capped),
            largest.kind,
            size,
        )
    del h, owner, flag
    if not chunks:
        empty = np.zeros(0, dtype=np.int64)
        return CandidatePairs(empty, empty, capped)
    codes = np.concatenate(chunks)
    del chunks
    codes = _distinct(codes, in_place=True)
    return CandidatePairs(codes // n, codes % n, capped)


# Probe flags by kind for a record with a full first name (0), an initial (1), none (2):
# the same as `is_probe` (tests/dedupe/test_cluster.py checks the table against it).
_PROBE_FLAGS = (
    {"initial": 2, "surname": 2},
    {"initial": 1, "surname": 2},
    {"initial": 2, "surname": 1},
)


def _pair_codes(
    a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], n: np.int64
) -> npt.NDArray[np.int64]:
    """Each pair of record indices as one code, min * n + max (`n`: the number of records)."""
    return np.minimum(a, b) * n + np.maximum(a, b)


def _distinct(values: npt.NDArray[np.int64], *, in_place: bool = False) -> npt.NDArray[np.int64]:
    """Sorted distinct values (`np.unique`'s hash path is many times slower on millions of
    mostly distinct integers than a sort). `in_place`: sort `values` itself (no copy)."""
    if in_place:
        values.sort()
    else:
        values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


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
    records = prepare_all(contacts)
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
    """Union-find with member lists (merging the smaller into the larger). Member lists exist
    only for merged clusters: a singleton's members are itself.

    Cannot-link pairs (`forbid`): `allowed(ra, rb)` says whether two clusters may join; only
    the constrained members of each cluster are looked at, so constraints cost nothing for
    clusters without any."""

    def __init__(self, n: int) -> None:
        self.root = list(range(n))
        self.size = [1] * n
        self.merged: dict[int, list[int]] = {}
        self.apart: dict[int, set[int]] = defaultdict(set)  # record -> records never joined
        self.marked: dict[int, set[int]] = {}  # root -> its members with a cannot-link

    def forbid(self, pairs: Sequence[tuple[int, int]]) -> None:
        for a, b in pairs:
            self.apart[a].add(b)
            self.apart[b].add(a)
            for x in (a, b):
                self.marked.setdefault(self.find(x), set()).add(x)

    def allowed(self, ra: int, rb: int) -> bool:
        """May the clusters rooted at `ra` and `rb` join (no cannot-link between them)?"""
        ma, mb = self.marked.get(ra), self.marked.get(rb)
        if not ma or not mb:
            return True
        small, other = (ma, rb) if len(ma) <= len(mb) else (mb, ra)
        return not any(self.find(y) == other for x in small for y in self.apart[x])

    def find(self, x: int) -> int:
        root = self.root[x]
        while root != self.root[root]:
            root = self.root[root]
        while self.root[x] != root:
            self.root[x], x = root, self.root[x]
        return root

    def members(self, root: int) -> list[int]:
        return self.merged.get(root) or [root]

    def union(self, a: int, b: int) -> None:
        if self.size[a] < self.size[b]:
            a, b = b, a
        taken = self.merged.pop(b, None) or [b]
        for x in taken:
            self.root[x] = a
        self.merged[a] = self.members(a) + taken
        self.size[a] += self.size[b]
        if b in self.marked:
            self.marked.setdefault(a, set()).update(self.marked.pop(b))

    def groups(self) -> list[list[int]]:
        """Every cluster, singletons included, each sorted, ordered by first member."""
        out = [sorted(m) for m in self.merged.values()]
        out += [[i] for i, r in enumerate(self.root) if r == i and i not in self.merged]
        out.sort(key=lambda m: m[0])
        return out


def should_join(
    scores_between_clusters: Sequence[float], review: float, auto_merge: float = 0.95
) -> bool:
    """The chain guard: may a strong link join two clusters, given every scored pair between
    them (the link included)?

    Yes when the pairs agree on average (mean probability >= `review`), or when none of them
    contradicts the link: a pair contradicts when the model is as sure that its two records
    are different people as it must be sure of a pair to merge it (probability below
    1 - `auto_merge`). A record from before a job change, or one with nothing but a common
    name, scores low against the others without contradicting them; a namesake pulled in
    through one shared switchboard number usually differs from someone by first name, city
    or address, and is held. No pairs: nothing contradicts the link, so yes. Pure, so the
    incremental path applies the same rule before it joins two existing golden records.
    """
    if not scores_between_clusters:
        return True
    if min(scores_between_clusters) >= 1.0 - auto_merge:
        return True
    return sum(scores_between_clusters) / len(scores_between_clusters) >= review


@dataclass(slots=True)
class _Adjacency:
    """Scored pairs as a compressed sparse row table: record x's neighbours are
    `nbr[start[x]:start[x + 1]]` with probabilities `prob[...]` (arrays, not dicts)."""

    start: npt.NDArray[np.int64]
    nbr: npt.NDArray[np.signedinteger[Any]]
    prob: npt.NDArray[np.float64]

    @classmethod
    def of(
        cls,
        n: int,
        ia: npt.NDArray[np.int64],
        ib: npt.NDArray[np.int64],
        probs: npt.NDArray[np.float64],
    ) -> _Adjacency:
        # Record indices as int32 while sorting (half the memory of int64); pair k is at
        # positions k and m + k of the doubled list, so its probability is probs[pos % m].
        m = len(ia)
        both: npt.NDArray[np.signedinteger[Any]]
        both = np.empty(2 * m, dtype=np.int32 if n < 2**31 else np.int64)
        both[:m], both[m:] = ia, ib
        start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(both, minlength=n), out=start[1:])
        # Unstable: a record's neighbours may come in any order (`should_join` only takes their
        # minimum and mean), and NumPy's stable sort of int32 is twice as slow.
        order = np.argsort(both)
        both[:m], both[m:] = ib, ia
        nbr = both[order]
        del both
        return cls(start, nbr, np.take(probs, order, mode="wrap") if m else probs)


LOOKUPS_PER_JOIN = 4_096  # member pairs looked up one by one when two clusters may join


@dataclass(slots=True)
class _ScoredPairs:
    """Scored pairs by code (min * n + max, sorted, as `candidate_pairs` gives them) with
    their probabilities. Two small clusters (nearly every join) look up each pair of their
    members by binary search; a table of each record's neighbours (`_Adjacency`, a sort of
    all pairs: 7 s at 1M records) is built only if two clusters big enough to need it meet,
    where trying every pair of members would grow with the product of their sizes."""

    n: int
    codes: npt.NDArray[np.int64]
    probs: npt.NDArray[np.float64]
    adjacency: _Adjacency | None = None

    def between(self, clusters: _Clusters, ra: int, rb: int) -> list[float]:
        """Probabilities of the scored pairs between two clusters (their roots)."""
        xs, ys = clusters.members(ra), clusters.members(rb)
        if len(xs) * len(ys) > LOOKUPS_PER_JOIN:
            small, other = (xs, rb) if len(xs) <= len(ys) else (ys, ra)
            return self._by_neighbours(clusters, small, other)
        if not len(self.codes):
            return []
        a, b = np.array(xs, dtype=np.int64)[:, None], np.array(ys, dtype=np.int64)[None, :]
        wanted = _pair_codes(a, b, np.int64(self.n)).ravel()
        # a code past the last one is looked up there, and is not equal to it
        at = np.minimum(np.searchsorted(self.codes, wanted), len(self.codes) - 1)
        probs: list[float] = self.probs[at[self.codes[at] == wanted]].tolist()
        return probs

    def _by_neighbours(self, clusters: _Clusters, small: list[int], other: int) -> list[float]:
        """The scored pairs from the members `small` into the cluster rooted at `other`."""
        if self.adjacency is None:
            self.adjacency = _Adjacency.of(
                self.n, self.codes // self.n, self.codes % self.n, self.probs
            )
        start, nbr, prob = self.adjacency.start, self.adjacency.nbr, self.adjacency.prob
        out: list[float] = []
        for x in small:
            lo, hi = int(start[x]), int(start[x + 1])
            for y, p in zip(nbr[lo:hi].tolist(), prob[lo:hi].tolist(), strict=True):
                if clusters.find(y) == other:
                    out.append(p)
        return out


def _content_rank(
    records: Sequence[Prepared], subset: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Dense rank by content of the records in `subset` (identical records share a rank;
    others get 0). Ranks within any subset keep the order a full ranking would give."""
    keys = {
        i: (r.last, r.first, "|".join(r.emails), "|".join(r.phones), r.company, r.city)
        for i in subset.tolist()
        for r in (records[i],)
    }
    rank = np.zeros(len(records), dtype=np.int64)
    current, previous = -1, None
    for i in sorted(keys, key=keys.__getitem__):
        if keys[i] != previous:
            current, previous = current + 1, keys[i]
        rank[i] = current
    return rank


def cluster_prepared(
    records: Sequence[Prepared],
    matcher: FellegiSunterMatcher,
    *,
    max_block: int = 200,
    index: KeyIndex | None = None,
    must_link: Sequence[tuple[int, int]] = (),
    cannot_link: Sequence[tuple[int, int]] = (),
    check_stop: Callable[[], None] | None = None,
    threads: int = SCORING_THREADS,
) -> ClusterResult:
    """Block, score and cluster prepared records with `matcher`'s params and thresholds.

    Chain guard: pairs at or above `auto_merge` are merged strongest first, but two clusters
    join only if `should_join` accepts the scored pairs between them; a strong link that fails
    goes to review instead (one strong link cannot join two groups whose other members
    disagree).

    Steward constraints (indices into `records`): `must_link` pairs are joined before any
    scored link (a confirmed merge); no link ever joins two clusters holding a `cannot_link`
    pair (a do-not-merge), and such a link is not sent to review either (a steward decided).
    `index`: the records' blocking keys when the caller built them already (`KeyIndex`).
    Pairs are scored on `threads` threads, so with more than one `matcher.frequencies`, if
    any, must be in memory (`frequency_table`), not counted through a database connection.
    `check_stop` is called between steps, before each chunk of pairs scored and every
    `LINKS_PER_CHECK` links; what it raises abandons the clustering (a caller asked to stop:
    at 1M records this function runs for over a minute).
    """
    stop = check_stop or _go_on
    pairs = candidate_pairs(records, max_block, index=index)
    stop()
    probs = matcher.probabilities(
        Columns.of(records), pairs.ia, pairs.ib, threads=threads, check_stop=stop
    )
    stop()
    # Strongest first; ties broken by the records' content, not their position, so that the
    # clusters do not depend on input order (tests/dedupe/test_order_independence.py).
    strong = np.flatnonzero(probs >= matcher.review)
    rank = _content_rank(records, _distinct(np.r_[pairs.ia[strong], pairs.ib[strong]]))
    rank_a, rank_b = rank[pairs.ia[strong]], rank[pairs.ib[strong]]
    strong = strong[
        np.lexsort((np.maximum(rank_a, rank_b), np.minimum(rank_a, rank_b), -probs[strong]))
    ]
    # Only records with an auto-merge link ever join a cluster, so only pairs between two such
    # records can lie between clusters: the guard looks up just those.
    joinable = np.zeros(len(records), dtype=bool)
    sure = probs >= matcher.auto_merge
    joinable[pairs.ia[sure]] = joinable[pairs.ib[sure]] = True
    kept = joinable[pairs.ia] & joinable[pairs.ib]
    del joinable
    n = max(len(records), 1)  # as in candidate_pairs, whose pairs have ia < ib
    scored = _ScoredPairs(n, pairs.ia[kept] * n + pairs.ib[kept], probs[kept])
    del kept
    stop()
    clusters = _Clusters(len(records))
    for a, b in must_link:
        ra, rb = clusters.find(a), clusters.find(b)
        if ra != rb:
            clusters.union(ra, rb)
    clusters.forbid(cannot_link)
    review: list[tuple[int, int, float]] = []
    borderline: dict[int, float] = {}
    links = zip(
        pairs.ia[strong].tolist(), pairs.ib[strong].tolist(), probs[strong].tolist(), strict=True
    )
    for done, (a, b, p) in enumerate(links):
        if done % LINKS_PER_CHECK == 0:
            stop()
        ra, rb = clusters.find(a), clusters.find(b)
        if ra == rb or not clusters.allowed(ra, rb):
            continue
        if p < matcher.auto_merge:
            review.append((a, b, p))
            continue
        if clusters.size[ra] + clusters.size[rb] > 2 and not should_join(
            scored.between(clusters, ra, rb), matcher.review, matcher.auto_merge
        ):
            review.append((a, b, p))
            continue
        clusters.union(ra, rb)
        weak = kept_probability(p, matcher.auto_merge)
        if weak is not None:  # links come strongest first: a later one is the weakest
            borderline[a] = borderline[b] = weak
    return ClusterResult(clusters.groups(), review, pairs.capped, pairs, probs, borderline)


def _go_on() -> None:
    """A `check_stop` that never stops."""


def link(
    n: int,
    pairs: Sequence[tuple[int, int]],
    *,
    must_link: Sequence[tuple[int, int]] = (),
    cannot_link: Sequence[tuple[int, int]] = (),
) -> list[list[int]]:
    """Clusters of `n` records joined transitively by `pairs` (a matcher whose every link is
    a merge, such as the exact one), under the same steward constraints as
    `cluster_prepared`. Pairs are taken in order; a pair that would join two clusters holding
    a `cannot_link` pair is skipped."""
    clusters = _Clusters(n)
    for a, b in must_link:
        ra, rb = clusters.find(a), clusters.find(b)
        if ra != rb:
            clusters.union(ra, rb)
    clusters.forbid(cannot_link)
    for a, b in pairs:
        ra, rb = clusters.find(a), clusters.find(b)
        if ra != rb and clusters.allowed(ra, rb):
            clusters.union(ra, rb)
    return clusters.groups()


def cluster(
    contacts: Sequence[Contact],
    *,
    params: Params | None = None,
    auto_merge: float = 0.95,
    review: float = 0.80,
    max_block: int = 200,
) -> ClusterResult:
    """Deduplicate a batch: term frequencies from the batch itself (from `MIN_POPULATION`
    records on, as in the pipeline), then `cluster_prepared`."""
    records = prepare_all(contacts)
    enough = len(records) >= MIN_POPULATION
    matcher = FellegiSunterMatcher(
        params,
        auto_merge=auto_merge,
        review=review,
        frequencies=frequency_table(records, blocking=False) if enough else None,
    )
    return cluster_prepared(records, matcher, max_block=max_block)
