"""The matcher seam, the exact matcher, and the Fellegi-Sunter matcher the pipeline uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from crmhub.records import Contact
from dedupe.comparators import (
    COMPANY,
    COMPARISONS,
    NULL,
    PHONE,
    Columns,
    TfCounts,
    compare_levels,
    email_local,
    level_notes,
    levels_many,
    own_readings,
    shares_address,
)
from dedupe.normalize import (
    ROLE_LOCAL_PARTS,
    Prepared,
    email_key,
    is_role_address,
    name_group,
    phonetic,
    prepare,
)
from dedupe.scoring import TF_MAX, TF_MIN, Frequencies, Params, default_params

__all__ = [
    "ROLE_LOCAL_PARTS",
    "Decision",
    "ExactMatcher",
    "FellegiSunterMatcher",
    "MatchKey",
    "Matcher",
    "build_matcher",
    "email_key",
    "is_role_address",
    "key_tuples",
]

Action = Literal["merge", "review", "separate"]


class MatchKey(NamedTuple):
    """A blocking key: records sharing one are compared."""

    kind: str
    value: str


class Decision:
    """What the matcher thinks of one pair, and why.

    The explanation is given, or built by `explain` when first read: the probabilistic
    matcher scores every candidate of an incoming record (up to a few hundred at 1M
    contacts), and only the few that are queued or merged are ever explained; building the
    explanation (normalisation notes, rounded weights) cost half of each comparison.
    """

    __slots__ = ("_explain", "_explanation", "action", "probability")

    def __init__(
        self,
        action: Action,
        probability: float,
        explanation: dict[str, Any] | None = None,
        *,
        explain: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.action: Action = action
        self.probability = probability
        self._explanation = explanation if explanation is not None or explain else {}
        self._explain = explain

    @property
    def explanation(self) -> dict[str, Any]:
        if self._explanation is None:
            assert self._explain is not None
            self._explanation, self._explain = self._explain(), None
        return self._explanation

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (self.action, self.probability, self.explanation) == (
            other.action,
            other.probability,
            other.explanation,
        )

    __hash__ = None  # type: ignore[assignment]  # holds a dict, as the dataclass did

    def __repr__(self) -> str:
        return f"Decision({self.action!r}, {self.probability!r}, {self.explanation!r})"


class Matcher(Protocol):
    """What the pipeline needs from a matcher."""

    version: str

    def keys(self, contact: Contact) -> list[MatchKey]:
        """Blocking keys for `contact` (stored; candidates share at least one)."""
        ...

    def compare(self, a: Contact, b: Contact) -> Decision:
        """Decide whether two contacts are the same person. Must be symmetric."""
        ...


class Identifiers(Protocol):
    """What the exact matcher reads of a contact (a Contact has both)."""

    @property
    def emails(self) -> Sequence[str]: ...

    @property
    def phones(self) -> Sequence[str]: ...


class ExactMatcher:
    """Same person when a normalised email key or an E.164 phone is shared."""

    version = "exact-1"

    def keys(self, contact: Identifiers) -> list[MatchKey]:
        keys = [MatchKey("email", email_key(e)) for e in contact.emails if not is_role_address(e)]
        keys += [MatchKey("phone", p) for p in contact.phones]
        return list(dict.fromkeys(keys))

    def compare(self, a: Contact, b: Contact) -> Decision:
        shared = {k.kind for k in set(self.keys(a)) & set(self.keys(b))}
        if shared:
            return Decision("merge", 1.0, {"shared": sorted(shared)})
        return Decision("separate", 0.0, {"shared": []})


def probability(weight: float) -> float:
    """Match weight (log2 odds) to probability."""
    return 1.0 / (1.0 + math.pow(2.0, -max(min(weight, 60.0), -60.0)))


# Key kinds with probe semantics: every record stores them, but only a "probe" (a record
# with just an initial, or no first name) looks them up. Pairs come from probe x block, so the
# surname blocks that would be huge for everyone stay cheap.
PROBE_KINDS = {"initial": "initial-only", "surname": "no-first"}


def blocking_keys(record: Prepared) -> list[MatchKey]:
    """The keys a record is stored under (blocking rules, union):

    email key; phone; email local part without dots; and for each reading of the name (as
    written, and as the email address spells it): surname sound + first-name group member;
    exact name in either order; surname + first initial (typos in the first name); first
    name + the surname's first or last three letters (typos in the surname); surname +
    organisation; first-name group member + organisation; surname sound + initial and
    surname sound alone (probe kinds, see `lookup_keys`).
    """
    return list(map(_KEY, key_tuples(record)))


_KEY = MatchKey._make


def key_tuples(record: Prepared) -> list[tuple[str, str]]:
    """`blocking_keys` as plain (kind, value) tuples (equal and hashing alike), for the batch
    path, which handles millions of them."""
    keys = [("email", e) for e in record.emails]
    keys += [("phone", p) for p in record.phones]
    for email in record.emails:
        local = email.partition("@")[0].replace(".", "").replace("_", "")
        if len(local) >= 6:
            keys.append(("local", local))
    orgs = sorted(record.orgs)
    lasts = (record.last, record.last_alt) if record.last_alt else (record.last,)
    for first in (record.first, record.first_alt) if record.first_alt else (record.first,):
        group = _group(first)
        keys += [("orgfirst", f"{variant}:{org}") for org in orgs for variant in group]
        for last in lasts:
            if last:
                keys += [("org", f"{last}:{org}") for org in orgs]
                keys += _reading_keys(first, last)
    return list(dict.fromkeys(keys))


@lru_cache(maxsize=65536)
def _group(first: str) -> tuple[str, ...]:
    return tuple(sorted(name_group(first)))


def _reading_keys(first: str, last: str) -> list[tuple[str, str]]:
    """The keys of one reading of a name (first may be empty)."""
    sound = phonetic(last) or last
    keys = [("name", f"{sound}:{variant}") for variant in _group(first)]
    if len(first) > 1:
        keys.append(("swap", f"{first}|{last}" if first < last else f"{last}|{first}"))
        if len(last) >= 4:
            keys.append(("fl", f"{first}:{last[:3]}"))
            keys.append(("fl", f"{first}:{last[-3:]}"))
    if first:
        keys.append(("li", f"{last}:{first[0]}"))
        keys.append(("initial", f"{sound}:{first[0]}"))
        if len(first) == 1:
            keys.append(("initial-only", f"{sound}:{first[0]}"))
    keys.append(("surname", sound))
    if not first:
        keys.append(("no-first", sound))
    return keys


def is_probe(record: Prepared, kind: str) -> bool:
    """Whether `record` looks up blocks of probe kind `kind`."""
    return len(record.first) == 1 if kind == "initial" else not record.first


def lookup_keys(record: Prepared, stored: list[MatchKey] | None = None) -> list[MatchKey]:
    """The keys to find candidates with: the stored keys, except that a probe kind is looked
    up only by its probes, and everyone else looks up its probes' marker kind instead.

    `stored`: the record's `blocking_keys`, when the caller has them already.
    """
    out: list[MatchKey] = []
    for key in blocking_keys(record) if stored is None else stored:
        marker = PROBE_KINDS.get(key.kind)
        if key.kind in PROBE_KINDS.values():
            continue
        if marker is None or is_probe(record, key.kind):
            out.append(key)
        else:
            out.append(MatchKey(marker, key.value))
    return out


def _tf_values(comp_index: int, level: int, a: Prepared, b: Prepared) -> tuple[str, ...]:
    """The agreeing value(s) whose frequency adjusts `level` (both sides: symmetric)."""
    name = COMPARISONS[comp_index].name
    if name in _NAMES:
        a, b = own_readings(a, b)
        # The reading both records share (written or as the address spells it); a swapped
        # pair shares none, and counts the written names.
        if name == "first_name":
            ours, theirs = (a.first, a.first_alt), (b.first, b.first_alt)
        else:
            ours, theirs = (a.last, a.last_alt), (b.last, b.last_alt)
        both = tuple(sorted((set(ours) & set(theirs)) - {""}))
        return both or (ours[0], theirs[0])
    if name == "company":
        return (a.company,)
    if name == "email" and level == 2:
        shared = sorted({email_local(e) for e in a.emails} & {email_local(e) for e in b.emails})
    else:
        xs, ys = (a.emails, b.emails) if name == "email" else (a.phones, b.phones)
        shared = sorted(set(xs) & set(ys))
    return (shared[0],) if shared else ()


class FellegiSunterMatcher:
    """Probabilistic matcher: per-field levels, m/u weights, term-frequency adjustment.

    `frequencies` (optional) switches on term-frequency adjustment and the cap on blocking
    keys: a key held by more than `max_key_count` records (a switchboard phone, a shared
    inbox) is not emitted by `keys()`, so no record gets a huge candidate list from it.
    """

    def __init__(
        self,
        params: Params | None = None,
        *,
        auto_merge: float = 0.95,
        review: float = 0.80,
        frequencies: Frequencies | None = None,
        max_key_count: int = 200,
    ) -> None:
        if not 0.0 < review <= auto_merge <= 1.0:
            raise ValueError("need 0 < review <= auto_merge <= 1")
        self.params = params or default_params()
        self.auto_merge = auto_merge
        self.review = review
        self.frequencies = frequencies
        self.max_key_count = max_key_count
        self.version = self.params.version

    # -- the seam ---------------------------------------------------------------------------
    def keys(self, contact: Contact) -> list[MatchKey]:
        return self.capped(blocking_keys(prepare(contact)))

    def capped(self, keys: list[MatchKey]) -> list[MatchKey]:
        """`keys` without those held by more than `max_key_count` records (when counted)."""
        freq = self.frequencies
        if freq is None:
            return keys
        return [k for k in keys if freq.count(k.kind, k.value) <= self.max_key_count]

    def compare(self, a: Contact, b: Contact) -> Decision:
        return self.compare_prepared(prepare(a), prepare(b))

    def lookup_keys(self, contact: Contact) -> list[MatchKey]:
        """Keys to look candidates up with (a subset of, or markers among, stored keys).

        Optional extension of the seam: a pipeline that looks up by `keys()` instead is still
        correct, only with larger candidate lists for the surname-only probe blocks.
        """
        return self.capped(lookup_keys(prepare(contact)))

    # -- extensions -------------------------------------------------------------------------
    def action(self, p: float) -> Action:
        if p >= self.auto_merge:
            return "merge"
        return "review" if p >= self.review else "separate"

    def tf_adjustment(
        self, comp_index: int, level: int, values: tuple[str, ...], within: int = 0
    ) -> float:
        """Bits added to a level for the agreeing values' frequency (0 without frequencies).

        With two values (a swapped name) the commoner one counts: the smaller adjustment.
        `within`: the pair is known to share an organisation of this many records, and the
        value is a phone: its share is also taken among that organisation (`_share`).
        """
        comp = COMPARISONS[comp_index]
        freq = self.frequencies
        kind = comp.tf_kind(level)
        if not values or freq is None or kind is None or freq.total <= 0:
            return 0.0
        count = max(freq.count(kind, v) for v in values)
        share = _share_one(count, freq.total, within)
        u_exact = self.params.u[comp.name][level]
        adjustment = math.log2(u_exact / share)
        if kind in ("email", "phone"):  # identifiers: weight grows with the store
            return max(TF_MIN, adjustment)
        return max(TF_MIN, min(TF_MAX, adjustment))

    def _within(self, levels: Sequence[int], a: Prepared) -> int:
        """Records of the organisation a pair shares by company name (0: none shared)."""
        if self.frequencies is None or levels[COMPANY] != _SAME_COMPANY:
            return 0
        return self.frequencies.count("company", a.company)

    def compare_prepared(self, a: Prepared, b: Prepared) -> Decision:
        levels = compare_levels(a, b)
        params = self.params
        prior = params.prior_weight(self.frequencies.total if self.frequencies else None)
        total = prior
        parts: list[tuple[float, float]] = []  # per comparison: weight, tf adjustment
        for i, comp in enumerate(COMPARISONS):
            level = levels[i]
            weight, adj = params.weight(comp.name, level), 0.0
            if level != NULL and comp.tf_kind(level):
                within = self._within(levels, a) if i == PHONE else 0
                adj = self.tf_adjustment(i, level, _tf_values(i, level, a, b), within)
            total += weight + adj
            parts.append((weight, adj))
        p = probability(total)

        def explain() -> dict[str, Any]:
            notes = level_notes(a, b, levels)
            fields: dict[str, Any] = {}
            for comp, level, (weight, adj) in zip(COMPARISONS, levels, parts, strict=True):
                entry: dict[str, Any] = {
                    "level": "null" if level == NULL else comp.levels[level],
                    "weight": round(weight, 3),
                }
                if adj:
                    entry["tf_adjustment"] = round(adj, 3)
                if comp.name in notes:
                    entry["normalisation"] = notes[comp.name]
                fields[comp.name] = entry
            return {
                "model": params.version,
                "prior_weight": round(prior, 3),
                "match_weight": round(total, 3),
                "probability": round(p, 6),
                "fields": fields,
            }

        return Decision(self.action(p), p, explain=explain)

    def compare_many(self, pairs: Sequence[tuple[Contact, Contact]]) -> list[Decision]:
        """Batch `compare`: levels vectorised with rapidfuzz; same decisions as `compare`."""
        records: list[Prepared] = []
        for a, b in pairs:
            records += (prepare(a), prepare(b))
        idx = np.arange(len(records), dtype=np.int64)
        probs = self.probabilities(Columns.of(records), idx[0::2], idx[1::2])
        return [Decision(self.action(float(p)), float(p)) for p in probs]

    def probabilities(
        self,
        cols: Columns,
        ia: npt.NDArray[np.int64],
        ib: npt.NDArray[np.int64],
        *,
        threads: int = 1,
        check_stop: Callable[[], None] | None = None,
    ) -> npt.NDArray[np.float64]:
        """Match probability for each pair of prepared records (vectorised, in chunks so the
        per-pair temporaries stay small however many pairs there are).

        `threads`: chunks scored on this many threads at once; NumPy and rapidfuzz release
        the GIL for most of a chunk's work. Only with in-memory frequencies (the batch
        path): a store's are counted through one database connection.
        `check_stop`: called before each chunk (on any of the threads); what it raises ends
        the scoring (a caller asked to stop: `cluster_prepared`).
        """
        out = np.empty(len(ia), dtype=np.float64)

        def score(lo: int) -> None:
            if check_stop is not None:
                check_stop()
            a, b = ia[lo : lo + PAIR_CHUNK], ib[lo : lo + PAIR_CHUNK]
            out[lo : lo + len(a)] = self.probabilities_from_levels(
                cols, a, b, levels_many(cols, a, b)
            )

        starts = range(0, len(ia), PAIR_CHUNK)
        if threads <= 1 or len(starts) < 3:
            for lo in starts:
                score(lo)
            return out
        # The first chunk alone: it builds the lookups all chunks share (nickname pairs, the
        # term-frequency tables). Later chunks may add counts to those tables, each the same
        # whichever thread adds it.
        score(starts[0])
        with ThreadPoolExecutor(threads, thread_name_prefix="crmhub-score") as pool:
            for _ in pool.map(score, starts[1:]):
                pass  # re-raises a chunk's error
        return out

    def tf_many(
        self,
        cols: Columns,
        ia: npt.NDArray[np.int64],
        ib: npt.NDArray[np.int64],
        levels: npt.NDArray[np.int8],
    ) -> npt.NDArray[np.float64]:
        """`tf_adjustment` for every pair at once (per-record counts looked up once)."""
        return _tf_many_impl(self, cols, ia, ib, levels)

    def probabilities_from_levels(
        self,
        cols: Columns,
        ia: npt.NDArray[np.int64],
        ib: npt.NDArray[np.int64],
        levels: npt.NDArray[np.int8],
    ) -> npt.NDArray[np.float64]:
        table = self.params.weight_matrix()
        n = self.frequencies.total if self.frequencies else None
        score = self.params.prior_weight(n) + table[np.arange(len(COMPARISONS)), levels].sum(axis=1)
        if self.frequencies is not None:
            score += self.tf_many(cols, ia, ib, levels)
        return np.asarray(1.0 / (1.0 + np.exp2(-np.clip(score, -60, 60))), dtype=np.float64)


# Pairs scored at a time in the batch path. Each distinct pair of names or companies is
# compared once per chunk, so larger chunks repeat fewer comparisons (131,072 until the
# sixth stop: 10% slower at 300k records, 60 MB less peak memory).
PAIR_CHUNK = 524_288
_SAME_COMPANY = 3  # company level "exact"

_IDENTIFIERS = frozenset({"email", "local", "phone"})  # multi-valued: scalar path if several
_NAMES = frozenset({"first_name", "last_name"})


def _tf_many_impl(
    matcher: FellegiSunterMatcher,
    cols: Columns,
    ia: npt.NDArray[np.int64],
    ib: npt.NDArray[np.int64],
    levels: npt.NDArray[np.int8],
) -> npt.NDArray[np.float64]:
    freq = matcher.frequencies
    adj = np.zeros(len(ia))
    if freq is None or freq.total <= 0 or len(ia) == 0:
        return adj
    counts = cols.tf_counts(freq)
    multi = cols.multi[ia] | cols.multi[ib]
    recs = cols.records
    for i, comp in enumerate(COMPARISONS):
        for level, kind in comp.tf:
            at = levels[:, i] == level
            # Names: the shared reading's count (`_tf_values`); the commoner wins.
            if comp.name in _NAMES:
                rows = np.flatnonzero(at)
                c = _shared_name_count(cols, counts, kind, ia[rows], ib[rows])
            else:
                rows = np.flatnonzero(at & ~multi) if kind in _IDENTIFIERS else np.flatnonzero(at)
                c = counts.of(kind, ia[rows])
                for k in np.flatnonzero(at & multi).tolist() if kind in _IDENTIFIERS else []:
                    values = _tf_values(i, level, recs[ia[k]], recs[ib[k]])
                    org = matcher._within(levels[k], recs[ia[k]]) if i == PHONE else 0
                    adj[k] += matcher.tf_adjustment(i, level, values, org)
            within = np.zeros(len(rows), dtype=np.int64)
            if i == PHONE:
                same = levels[rows, COMPANY] == _SAME_COMPANY
                within[same] = counts.of("company", ia[rows[same]])
            u_exact = matcher.params.u[comp.name][level]
            bits = np.log2(u_exact / _share(c, freq.total, within))
            upper = np.inf if kind in ("email", "phone") else TF_MAX  # as in tf_adjustment
            adj[rows] += np.clip(bits, TF_MIN, upper)
    return adj


def _share(
    count: npt.NDArray[np.int64], total: int, within: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """A value's share among all records; for a phone of a pair at the same organisation
    (`within` > 0 records), at least its share among that organisation's other records.

    A switchboard number on 3 of 100,000 records looks rare, but two colleagues at its
    company share it easily: without the organisation's share, the company and the number
    would count the same evidence twice. The pair's own two records are left out, so a
    number only they hold keeps its full weight.
    """
    share = np.maximum(count, 1) / total
    inside = within > 0
    share[inside] = np.maximum(
        share[inside], np.maximum(count[inside] - 2, 0) / np.maximum(within[inside], 1)
    )
    return np.asarray(np.minimum(share, 1.0), dtype=np.float64)


def _share_one(count: int, total: int, within: int) -> float:
    """`_share` of one value, without arrays (the incremental path scores pairs one at a
    time; the same float operations, so the same result)."""
    share = max(count, 1) / total
    if within > 0:
        share = max(share, max(count - 2, 0) / max(within, 1))
    return min(share, 1.0)


def _shared_name_count(
    cols: Columns,
    counts: TfCounts,
    kind: str,
    ia: npt.NDArray[np.int64],
    ib: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Per pair, the count of the name reading both records share (the larger if both their
    readings are shared); for pairs sharing none (swapped), the larger written-name count."""
    written, alt = cols.names[kind], cols.names[f"{kind}_alt"]
    xa, xb, ya, yb = written.code[ia], alt.code[ia], written.code[ib], alt.code[ib]
    has_xb, has_yb = alt.length[ia] > 0, alt.length[ib] > 0
    own = np.flatnonzero((has_xb | has_yb) & shares_address(cols, ia, ib))
    has_xb[own] = has_yb[own] = False  # see `own_readings`
    written_shared = (xa == ya) | ((xa == yb) & has_yb)
    alt_shared = has_xb & ((xb == ya) | ((xb == yb) & has_yb))
    shared = np.zeros(len(ia), dtype=np.int64)
    at = np.flatnonzero(written_shared)
    shared[at] = counts.of(kind, ia[at])
    at = np.flatnonzero(alt_shared)
    shared[at] = np.maximum(shared[at], counts.of(f"{kind}_alt", ia[at]))
    at = np.flatnonzero(~written_shared & ~alt_shared)
    shared[at] = np.maximum(counts.of(kind, ia[at]), counts.of(kind, ib[at]))
    return shared


def build_matcher(
    auto_merge: float = 0.95,
    review: float = 0.80,
    region: str = "US",
    *,
    params: Params | None = None,
    frequencies: Frequencies | None = None,
) -> FellegiSunterMatcher:
    """The matcher the pipeline uses for these thresholds (shipped params unless given).

    `region` is accepted for the seam: contacts reach the matcher with E.164 phones already.
    """
    return FellegiSunterMatcher(
        params, auto_merge=auto_merge, review=review, frequencies=frequencies
    )
