"""The matcher seam, the exact matcher, and the Fellegi-Sunter matcher the pipeline uses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from crmhub.records import Contact
from dedupe.comparators import (
    COMPARISONS,
    NULL,
    Columns,
    compare_levels,
    email_local,
    level_notes,
    levels_many,
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
]

Action = Literal["merge", "review", "separate"]


class MatchKey(NamedTuple):
    """A blocking key: records sharing one are compared."""

    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What the matcher thinks of one pair, and why."""

    action: Action
    probability: float
    explanation: dict[str, Any] = field(default_factory=dict)


class Matcher(Protocol):
    """What the pipeline needs from a matcher."""

    version: str

    def keys(self, contact: Contact) -> list[MatchKey]:
        """Blocking keys for `contact` (stored; candidates share at least one)."""
        ...

    def compare(self, a: Contact, b: Contact) -> Decision:
        """Decide whether two contacts are the same person. Must be symmetric."""
        ...


class ExactMatcher:
    """Same person when a normalised email key or an E.164 phone is shared."""

    version = "exact-1"

    def keys(self, contact: Contact) -> list[MatchKey]:
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

    email key; phone; surname sound + first-name group member; exact name in either order;
    surname + first-name sound (typos in the first name); surname + organisation; first-name
    group member + organisation (typos in the surname); email local part without dots;
    surname sound + initial and surname sound alone (probe kinds, see `lookup_keys`).
    """
    keys = [MatchKey("email", e) for e in record.emails]
    keys += [MatchKey("phone", p) for p in record.phones]
    for email in record.emails:
        local = email.partition("@")[0].replace(".", "").replace("_", "")
        if len(local) >= 6:
            keys.append(MatchKey("local", local))
    first, last = record.first, record.last
    group = sorted(name_group(first))
    for org in sorted(record.orgs):
        keys += [MatchKey("orgfirst", f"{variant}:{org}") for variant in group]
    if last:
        sound = phonetic(last) or last
        keys += [MatchKey("name", f"{sound}:{variant}") for variant in group]
        if len(first) > 1:
            keys.append(MatchKey("swap", "|".join(sorted((first, last)))))
            keys.append(MatchKey("sound2", f"{last}:{phonetic(first) or first}"))
        keys += [MatchKey("org", f"{last}:{org}") for org in sorted(record.orgs)]
        if first:
            keys.append(MatchKey("initial", f"{sound}:{first[0]}"))
            if len(first) == 1:
                keys.append(MatchKey("initial-only", f"{sound}:{first[0]}"))
        keys.append(MatchKey("surname", sound))
        if not first:
            keys.append(MatchKey("no-first", sound))
    return list(dict.fromkeys(keys))


def is_probe(record: Prepared, kind: str) -> bool:
    """Whether `record` looks up blocks of probe kind `kind`."""
    return len(record.first) == 1 if kind == "initial" else not record.first


def lookup_keys(record: Prepared) -> list[MatchKey]:
    """The keys to find candidates with: the stored keys, except that a probe kind is looked
    up only by its probes, and everyone else looks up its probes' marker kind instead."""
    out: list[MatchKey] = []
    for key in blocking_keys(record):
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
    if name == "first_name":
        return (a.first, b.first)
    if name == "last_name":
        return (a.last, b.last)
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
        keys = blocking_keys(prepare(contact))
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
        keys = lookup_keys(prepare(contact))
        freq = self.frequencies
        if freq is None:
            return keys
        return [k for k in keys if freq.count(k.kind, k.value) <= self.max_key_count]

    # -- extensions -------------------------------------------------------------------------
    def action(self, p: float) -> Action:
        if p >= self.auto_merge:
            return "merge"
        return "review" if p >= self.review else "separate"

    def tf_adjustment(self, comp_index: int, level: int, values: tuple[str, ...]) -> float:
        """Bits added to a level for the agreeing values' frequency (0 without frequencies).

        With two values (a swapped name) the commoner one counts: the smaller adjustment.
        """
        comp = COMPARISONS[comp_index]
        freq = self.frequencies
        kind = comp.tf_kind(level)
        if not values or freq is None or kind is None or freq.total <= 0:
            return 0.0
        total = freq.total
        share = max(max(freq.count(kind, v) for v in values), 1) / total
        u_exact = self.params.u[comp.name][level]
        adjustment = math.log2(u_exact / share)
        if kind in ("email", "phone"):  # identifiers: weight grows with the store
            return max(TF_MIN, adjustment)
        return max(TF_MIN, min(TF_MAX, adjustment))

    def compare_prepared(self, a: Prepared, b: Prepared) -> Decision:
        levels = compare_levels(a, b)
        notes = level_notes(a, b, levels)
        params = self.params
        prior = params.prior_weight(self.frequencies.total if self.frequencies else None)
        total = prior
        fields: dict[str, Any] = {}
        for i, comp in enumerate(COMPARISONS):
            level = levels[i]
            weight = params.weight(comp.name, level)
            entry: dict[str, Any] = {
                "level": "null" if level == NULL else comp.levels[level],
                "weight": round(weight, 3),
            }
            if level != NULL and comp.tf_kind(level):
                adj = self.tf_adjustment(i, level, _tf_values(i, level, a, b))
                if adj:
                    entry["tf_adjustment"] = round(adj, 3)
                    weight += adj
            if comp.name in notes:
                entry["normalisation"] = notes[comp.name]
            total += weight
            fields[comp.name] = entry
        p = probability(total)
        explanation = {
            "model": params.version,
            "prior_weight": round(prior, 3),
            "match_weight": round(total, 3),
            "probability": round(p, 6),
            "fields": fields,
        }
        return Decision(self.action(p), p, explanation)

    def compare_many(self, pairs: Sequence[tuple[Contact, Contact]]) -> list[Decision]:
        """Batch `compare`: levels vectorised with rapidfuzz; same decisions as `compare`."""
        records: list[Prepared] = []
        for a, b in pairs:
            records += (prepare(a), prepare(b))
        idx = np.arange(len(records), dtype=np.int64)
        probs = self.probabilities(Columns.of(records), idx[0::2], idx[1::2])
        return [Decision(self.action(float(p)), float(p)) for p in probs]

    def probabilities(
        self, cols: Columns, ia: npt.NDArray[np.int64], ib: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """Match probability for each pair of prepared records (vectorised, in chunks so the
        per-pair temporaries stay small however many pairs there are)."""
        out = np.empty(len(ia), dtype=np.float64)
        for lo in range(0, len(ia), PAIR_CHUNK):
            a, b = ia[lo : lo + PAIR_CHUNK], ib[lo : lo + PAIR_CHUNK]
            out[lo : lo + len(a)] = self.probabilities_from_levels(
                cols, a, b, levels_many(cols, a, b)
            )
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


PAIR_CHUNK = 131_072  # pairs scored at a time in the batch path

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
            # Names: both values count (they differ when swapped), the commoner wins.
            if comp.name in _NAMES:
                rows = np.flatnonzero(at)
                c = np.maximum(counts[kind][ia[rows]], counts[kind][ib[rows]])
            else:
                rows = np.flatnonzero(at & ~multi) if kind in _IDENTIFIERS else np.flatnonzero(at)
                c = counts[kind][ia[rows]]
                for k in np.flatnonzero(at & multi).tolist() if kind in _IDENTIFIERS else []:
                    values = _tf_values(i, level, recs[ia[k]], recs[ib[k]])
                    adj[k] += matcher.tf_adjustment(i, level, values)
            u_exact = matcher.params.u[comp.name][level]
            bits = np.log2(u_exact * freq.total / np.maximum(c, 1))
            upper = np.inf if kind in ("email", "phone") else TF_MAX  # as in tf_adjustment
            adj[rows] += np.clip(bits, TF_MIN, upper)
    return adj


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
