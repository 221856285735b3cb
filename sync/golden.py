"""Match and merge against the store: blocking keys, candidates, decisions, golden records.

`dedupe` decides (no I/O); this module feeds it candidates from the persisted blocking index
(`match_key`) and writes what it decided: memberships, golden records with lineage, review
items. Steward constraints (do-not-merge) always win.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Container, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, NamedTuple

import numpy as np
import orjson
from sqlalchemy import Connection, Text, cast, or_, select, text

from crmhub.records import Contact
from dedupe import Decision, ExactMatcher, Matcher, Member, survive
from dedupe.cluster import kept_probability, should_join
from dedupe.comparators import Columns
from dedupe.matcher import FellegiSunterMatcher, MatchKey, blocking_keys, lookup_keys
from dedupe.normalize import Prepared, prepare
from dedupe.scoring import MIN_POPULATION, tf_values
from sync import writeback
from sync.configure import survivorship_for
from sync.forms import data_digest, form_from_json, mend_forms, store_forms
from sync.frequencies import StoreFrequencies, tf_rows
from sync.key_lookup import key_counts, key_holders
from sync.staging import LONG_CHUNK, chunks
from sync.store import (
    allocate_ids,
    bind_values,
    contact_form,
    field_choice,
    golden_record,
    insert_rows,
    json_text,
    match_key,
    membership,
    merge_constraint,
    one_of,
    review_item,
    source_record,
    update_rows,
)

__all__ = [
    "BUMP_VERSION",
    "GOLDEN_COLUMNS",
    "MEMBERSHIP_COLUMNS",
    "SURVIVED_COLUMNS",
    "CandidateCache",
    "MatchInput",
    "MatchOutcome",
    "Survived",
    "finish_goldens",
    "fold_golden",
    "match_and_merge",
    "recompute_goldens",
    "survived_rows",
]

Node = tuple[Literal["r", "g"], int]
# A blocking key held by more records than this finds no candidates (reported as capped).
MAX_BLOCK = 200
# pg_advisory_xact_lock key that serialises match-and-merge on PostgreSQL ("crmhub" in hex).
MERGE_LOCK = 0x63726D687562
# Members per golden record sampled by the chain guard.
GUARD_SAMPLE = 8
# A page with at least this many candidate pairs scores them vectorised (`_score_pairs`).
VECTOR_PAIRS = 32


@dataclass(slots=True)
class MatchInput:
    record_id: int
    data_json: str  # the mapped (already validated) contact, as the store keeps it
    updated_at: datetime | None
    status: Literal["new", "changed"]
    source: str = ""  # the connector, for source-priority survivorship
    # Worked out by the mapping process when it could: the exact matcher's keys, and the
    # golden fields (JSON text) and lineage keys of this record alone
    # (`dedupe.survivorship.solo`).
    keys: list[tuple[str, str]] | None = None
    solo: tuple[str, list[str]] | None = None
    _data: dict[str, Any] | None = field(default=None, init=False, repr=False)
    _contact: Contact | None = field(default=None, init=False, repr=False)

    @property
    def data(self) -> dict[str, Any]:
        """The contact's data, decoded on first use (most records never need it)."""
        if self._data is None:
            self._data = orjson.loads(self.data_json)
        return self._data

    @property
    def contact(self) -> Contact:
        """The data as a Contact, built on first use (exact matching never needs it)."""
        if self._contact is None:
            self._contact = Contact.model_validate(self.data)
        return self._contact


class _Identifiers(NamedTuple):
    emails: list[str]
    phones: list[str]


@dataclass(slots=True)
class MatchOutcome:
    goldens_created: int = 0
    records_merged: int = 0
    goldens_merged: int = 0
    reviews_queued: int = 0
    reviews_settled: int = 0  # open items closed because their records now share a golden
    touched_goldens: set[int] = field(default_factory=set)
    capped_keys: set[tuple[str, str]] = field(default_factory=set)


class _Comparer:
    """`matcher.compare` with each record normalised once per batch (when the matcher can)."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self.transitive = bool(getattr(matcher, "transitive", False))
        self._compare_prepared = getattr(matcher, "compare_prepared", None)
        self.uses_prepared = self._compare_prepared is not None
        self._prepared: dict[int, Prepared] = {}
        self._blocking: dict[int, list[MatchKey]] = {}
        self._lookup: dict[int, list[MatchKey]] = {}

    def remember(self, record_id: int, prepared: Prepared) -> None:
        """`record_id`'s prepared form, worked out earlier (`CandidateCache`)."""
        self._prepared[record_id] = prepared

    def prepared(self, record_id: int, contact: Contact) -> Prepared:
        found = self._prepared.get(record_id)
        if found is None:
            found = self._prepared[record_id] = prepare(contact)
        return found

    def blocking(self, item: MatchInput) -> list[MatchKey]:
        """`dedupe.matcher.blocking_keys` of `item`, computed once per batch."""
        found = self._blocking.get(item.record_id)
        if found is None:
            prepared = self.prepared(item.record_id, item.contact)
            found = self._blocking[item.record_id] = blocking_keys(prepared)
        return found

    def lookup(self, item: MatchInput) -> list[MatchKey]:
        """`dedupe.matcher.lookup_keys` of `item`, computed once per batch."""
        found = self._lookup.get(item.record_id)
        if found is None:
            prepared = self.prepared(item.record_id, item.contact)
            found = self._lookup[item.record_id] = lookup_keys(prepared, self.blocking(item))
        return found

    def keys(self, item: MatchInput) -> set[tuple[str, str]]:
        """The matcher's blocking keys of `item` as (kind, value), from what the mapping
        process worked out or the prepared form where possible."""
        matcher = self.matcher
        if isinstance(matcher, ExactMatcher):
            if item.keys is not None:
                return set(item.keys)
            data = item.data
            found = matcher.keys(_Identifiers(data.get("emails", []), data.get("phones", [])))
        elif isinstance(matcher, FellegiSunterMatcher):
            found = matcher.capped(self.blocking(item))
        else:
            found = matcher.keys(item.contact)
        return {(k.kind, k.value) for k in found}

    def lookups(self, item: MatchInput, stored: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Keys to find `item`'s candidates with: the matcher's lookup keys, else its keys."""
        matcher = self.matcher
        if isinstance(matcher, FellegiSunterMatcher):
            return [(k.kind, k.value) for k in matcher.capped(self.lookup(item))]
        lookup = getattr(matcher, "lookup_keys", None)
        if lookup is not None:
            return [(k.kind, k.value) for k in lookup(item.contact)]
        return sorted(stored)

    def form(self, record_id: int, contacts: _Contacts) -> Prepared:
        """`prepared`, asking `contacts` for the record's `Contact` only if it has no form."""
        found = self._prepared.get(record_id)
        return found if found is not None else self.prepared(record_id, contacts[record_id])

    def __call__(self, a: int, b: int, contacts: _Contacts) -> Decision:
        if self._compare_prepared is None:
            return self.matcher.compare(contacts[a], contacts[b])
        decision: Decision = self._compare_prepared(self.form(a, contacts), self.form(b, contacts))
        return decision


class CandidateCache:
    """Prepared forms of stored records recently compared, across pages.

    Candidates recur (everyone called Smith is a candidate of every new Smith): a form kept
    here is not decoded again. Entries are keyed by record id and the digest of its stored
    data (`sync.forms.data_digest`), so a record staged or re-mapped since (by any process)
    is a miss.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, str], Prepared] = OrderedDict()

    def get(self, key: tuple[int, str]) -> Prepared | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: tuple[int, str], value: Prepared) -> None:
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)


class _Contacts(dict[int, Contact]):
    """Contacts by record id. Candidates read with their prepared form are compared through
    it and rarely need their `Contact` (an explanation, a matcher without prepared forms):
    their data text waits in `texts` and is validated on first use."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[int, str] = {}

    def __missing__(self, record_id: int) -> Contact:
        contact = self[record_id] = Contact.model_validate_json(self.texts.pop(record_id))
        return contact

    def known(self) -> set[int]:
        return set(self) | set(self.texts)


def _load_contacts(
    conn: Connection,
    ids: set[int],
    into: _Contacts,
    compare: _Comparer | None = None,
    cache: CandidateCache | None = None,
) -> list[tuple[int, str, Prepared]]:
    """Stored contacts `ids` into `into`; with a `cache`, their prepared forms into `compare`
    too: from the cache, else from their stored form (`contact_form`) when it was made from
    the data they hold, else prepared here. Returns (id, data text, form) of the candidates
    whose stored form is missing or stale, for the caller to store (`mend_forms`)."""
    wanted = ids - into.known()
    mended: list[tuple[int, str, Prepared]] = []
    if cache is None or compare is None:
        query = select(source_record.c.id, source_record.c.data)
        for rid, data in _in_chunks(conn, query, source_record.c.id, wanted):
            into[rid] = Contact.model_validate(data)
        return mended
    query = select(
        source_record.c.id,
        cast(source_record.c.data, Text),
        contact_form.c.digest,
        contact_form.c.form,
    ).outerjoin(contact_form, contact_form.c.record_id == source_record.c.id)
    for rid, data_text, stored, form in _in_chunks(conn, query, source_record.c.id, wanted):
        into.texts[rid] = data_text
        if not compare.uses_prepared:
            continue  # the matcher compares `Contact`s, validated as it asks for them
        digest = data_digest(data_text)
        prepared = cache.get((rid, digest))
        if prepared is None:
            if stored == digest:
                prepared = form_from_json(form)
            else:  # no form, or one made from other data or by other code
                prepared = compare.prepared(rid, into[rid])
            cache.put((rid, digest), prepared)
        if stored != digest:
            # A store upgraded to stored forms, or a newer FORM_VERSION: mended as it is used.
            mended.append((rid, data_text, prepared))
        compare.remember(rid, prepared)
    return mended


def _scores_between(
    conn: Connection,
    compare: _Comparer,
    record: int,
    golden_a: int,
    golden_b: int,
    contacts: _Contacts,
) -> list[float]:
    """Probabilities of every pair between `golden_a` joined by `record` and `golden_b`, for
    the chain guard. Members are sampled (GUARD_SAMPLE each): a big cluster costs a bounded
    number of comparisons."""
    members: dict[int, list[int]] = defaultdict(list)
    rows = conn.execute(
        select(membership.c.golden_id, membership.c.record_id)
        .where(membership.c.golden_id.in_([golden_a, golden_b]))
        .order_by(membership.c.record_id)
    )
    for golden, rid in rows:
        if len(members[golden]) < GUARD_SAMPLE:
            members[golden].append(rid)
    _load_contacts(conn, set(members[golden_a]) | set(members[golden_b]), contacts)
    side_a = [*members[golden_a], record]
    scores = [compare(a, b, contacts).probability for a in side_a for b in members[golden_b]]
    return scores


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, node: Hashable) -> Hashable:
        self.parent.setdefault(node, node)
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: Hashable, b: Hashable) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def groups(self) -> list[list[Any]]:
        out: dict[Hashable, list[Any]] = defaultdict(list)
        for node in list(self.parent):
            out[self.find(node)].append(node)
        return list(out.values())


def _in_chunks(conn: Connection, query: Any, column: Any, values: Iterable[Any]) -> list[Any]:
    rows: list[Any] = []
    for part in chunks(sorted(set(values)), LONG_CHUNK):
        rows.extend(conn.execute(query.where(one_of(conn, column, part))).all())
    return rows


def _prefetch_frequencies(
    conn: Connection, freq: StoreFrequencies, compare: _Comparer, inputs: list[MatchInput]
) -> None:
    """Counts for every value the page's comparisons and key caps will ask about, the page's
    new records' own values included (as a batch counts every record, the pair's two among
    them; without, a surname two people hold counted 1 when the second arrived, and the pair
    weighed a bit more than in a batch). A changed record's values are in the store already."""
    wanted: list[tuple[str, str]] = []
    own: Counter[tuple[str, str]] = Counter()
    for item in inputs:
        prepared = compare.prepared(item.record_id, item.contact)
        wanted += [(k.kind, k.value) for k in compare.blocking(item)]
        wanted += [(k.kind, k.value) for k in compare.lookup(item)]
        values = {(kind, v) for kind, vs in tf_values(prepared).items() for v in vs}
        wanted += values
        if item.status == "new":
            own.update(values)
    freq.prefetch(conn, wanted, added=sum(1 for i in inputs if i.status == "new"), own=own)


def _batch_keys(
    conn: Connection, compare: _Comparer, inputs: list[MatchInput]
) -> dict[int, set[tuple[str, str]]]:
    """The keys each record of the batch is stored under; changed records' old keys (and
    term-frequency rows) are deleted, so the store holds only earlier records' keys until
    `_store_keys` writes these after the candidate lookup."""
    keys = {i.record_id: compare.keys(i) for i in inputs}
    changed = [i.record_id for i in inputs if i.status == "changed"]
    for part in chunks(changed):
        conn.execute(match_key.delete().where(one_of(conn, match_key.c.record_id, part)))
        conn.execute(contact_form.delete().where(one_of(conn, contact_form.c.record_id, part)))
    return keys


def _store_keys(
    conn: Connection,
    compare: _Comparer,
    inputs: list[MatchInput],
    keys: dict[int, set[tuple[str, str]]],
    freq: StoreFrequencies | None,
) -> None:
    rows = [(rid, kind, value) for rid, pairs in keys.items() for kind, value in pairs]
    if freq is not None:
        # Term-frequency rows: how many contacts share a first name, surname, company...
        rows += [
            (i.record_id, kind, value)
            for i in inputs
            for kind, value in dict.fromkeys(
                tf_rows(tf_values(compare.prepared(i.record_id, i.contact)))
            )
        ]
    insert_rows(conn, match_key, ("record_id", "key_kind", "key_value"), rows)
    if compare.uses_prepared:
        store_forms(
            conn,
            ((i.record_id, i.data_json, compare.prepared(i.record_id, i.contact)) for i in inputs),
        )


def _candidates(
    conn: Connection,
    lookups: dict[int, list[tuple[str, str]]],
    keys: dict[int, set[tuple[str, str]]],
    before: Callable[[str, str], int | None],
    outcome: MatchOutcome,
) -> dict[tuple[str, str], list[int]]:
    """Records holding each lookup key; keys held by more than MAX_BLOCK records are capped
    (a shared inbox or switchboard number says nothing about who someone is).

    Called before the batch's own `keys` are stored: the store answers for earlier records
    only, and the batch's holders are added from `keys`. `before(kind, value)`: how many
    records held a key before this batch, when known (an upper bound: changed records' old
    keys are gone since). A key no earlier record holds is answered from the batch alone,
    and one that cannot exceed the cap is fetched without counting it first.
    """
    in_batch: dict[tuple[str, str], list[int]] = defaultdict(list)
    for rid, pairs in keys.items():
        for key in pairs:
            in_batch[key].append(rid)
    holders: dict[tuple[str, str], list[int]] = {}
    to_count: list[tuple[str, str]] = []
    to_fetch: list[tuple[str, str]] = []

    def from_batch(key: tuple[str, str]) -> None:
        mine = in_batch.get(key, [])
        if len(mine) > MAX_BLOCK:
            outcome.capped_keys.add(key)
        elif mine:
            holders[key] = mine

    for key in {key for pairs in lookups.values() for key in pairs}:
        earlier = before(*key)
        if earlier == 0:
            from_batch(key)
        elif earlier is not None and earlier + len(in_batch.get(key, ())) <= MAX_BLOCK:
            to_fetch.append(key)
        elif earlier is not None and earlier - len(keys) > MAX_BLOCK:
            # Capped for certain: at most one row per batch record was deleted since.
            outcome.capped_keys.add(key)
        else:
            to_count.append(key)
    # Counted first, so the holders of a capped key are never fetched.
    counts = key_counts(conn, to_count)
    for key in to_count:
        earlier = counts.get(key, 0)
        if earlier + len(in_batch.get(key, ())) > MAX_BLOCK:
            outcome.capped_keys.add(key)
        elif earlier == 0:
            from_batch(key)
        else:
            to_fetch.append(key)
    fetched = key_holders(conn, to_fetch)
    for key in to_fetch:
        found = fetched.get(key, []) + in_batch.get(key, [])
        if len(found) > MAX_BLOCK:
            outcome.capped_keys.add(key)
        elif found:
            holders[key] = found
    return holders


def _unknown(kind: str, value: str) -> int | None:
    return None


def _do_not_merge(conn: Connection, ids: set[int]) -> set[frozenset[int]]:
    pairs: set[frozenset[int]] = set()
    for part in chunks(sorted(ids)):
        rows = conn.execute(
            select(merge_constraint.c.record_a, merge_constraint.c.record_b).where(
                merge_constraint.c.kind == "do_not_merge",
                or_(
                    one_of(conn, merge_constraint.c.record_a, part),
                    one_of(conn, merge_constraint.c.record_b, part),
                ),
            )
        )
        pairs.update(frozenset((a, b)) for a, b in rows)
    return pairs


def match_and_merge(
    conn: Connection,
    matcher: Matcher,
    inputs: list[MatchInput],
    now: datetime | None = None,
    frequencies: StoreFrequencies | None = None,
    cache: CandidateCache | None = None,
) -> MatchOutcome:
    """Fold new/changed contacts into golden records; call inside the page's transaction.
    `cache`: candidates' prepared forms kept from earlier calls (a long-lived caller's)."""
    now = now or datetime.now(UTC)
    outcome = MatchOutcome()
    if not inputs:
        return outcome
    batch = {i.record_id: i for i in inputs}
    if conn.dialect.name == "postgresql":
        # One merger at a time across all workers: merges touch golden records of any source,
        # in any order, and concurrent ones deadlock. (SQLite's BEGIN IMMEDIATE already
        # serialises writers.) Released when the page's transaction ends.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MERGE_LOCK})")
    compare = _Comparer(matcher)
    if not hasattr(matcher, "frequencies"):
        frequencies = None  # the exact matcher has no use for them
    if frequencies is not None:
        _prefetch_frequencies(conn, frequencies, compare, inputs)
        # Below a few thousand contacts frequencies are noise (a phone on 2 of 3 records looks
        # "common"): the matcher keeps its shipped priors until the store is big enough.
        enough = frequencies.total >= MIN_POPULATION
        matcher.frequencies = frequencies if enough else None  # type: ignore[attr-defined]
    keys = _batch_keys(conn, compare, inputs)
    lookups = {i.record_id: compare.lookups(i, keys[i.record_id]) for i in inputs}
    holders = _candidates(
        conn, lookups, keys, frequencies.stored if frequencies else _unknown, outcome
    )
    pairs: set[tuple[int, int]] = set()
    for rid, wanted in lookups.items():
        for key in wanted:
            found = holders.get(key)
            if found and (len(found) > 1 or found[0] != rid):  # not the record alone
                pairs.update((min(rid, o), max(rid, o)) for o in found if o != rid)
    candidate_ids = {rid for pair in pairs for rid in pair}
    # New records have no membership yet: only candidates and changed records are looked up.
    member_of = dict(
        _in_chunks(
            conn,
            select(membership.c.record_id, membership.c.golden_id),
            membership.c.record_id,
            candidate_ids | {rid for rid, i in batch.items() if i.status == "changed"},
        )
    )
    # The exact matcher merges every pair that shares a key, and candidates share one by
    # construction: its contacts are loaded only for the chain guard, if it ever asks.
    exact = isinstance(matcher, ExactMatcher)
    contacts = _Contacts()
    if not exact:
        contacts.update((rid, batch[rid].contact) for rid in candidate_ids & set(batch))
        mend_forms(conn, _load_contacts(conn, candidate_ids - set(batch), contacts, compare, cache))
    forbidden = _do_not_merge(conn, set(batch))
    ordered = [pair for pair in sorted(pairs) if frozenset(pair) not in forbidden]
    scored = (
        _score_pairs(compare, matcher, ordered, contacts)
        if isinstance(matcher, FellegiSunterMatcher) and len(ordered) >= VECTOR_PAIRS
        else {}
    )
    # Stored after the counts above were taken: they describe the store before this page.
    _store_keys(conn, compare, inputs, keys, frequencies)

    uf = _UnionFind()
    # Records with no candidate and no golden record yet need no union-find: each gets a
    # golden record of its own (most records of a first load).
    lone = [rid for rid in batch if rid not in candidate_ids and rid not in member_of]
    for rid in batch:
        if rid in candidate_ids or rid in member_of:
            uf.find(("r", rid))
            if rid in member_of:
                uf.union(("g", member_of[rid]), ("r", rid))
    reviews: dict[tuple[int, int], Decision] = {}
    # batch record -> the weakest borderline link that placed it (membership.probability)
    weak: dict[int, float] = {}
    borderline = _borderline_of(matcher)
    # batch record -> golden record -> its strongest merge decision (and with which member)
    links: dict[int, dict[int, tuple[Decision, int]]] = defaultdict(dict)
    # batch record -> golden record -> probabilities of its pairs with that one's members
    against: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for a, b in ordered:
        decision = _SHARES_A_KEY if exact else scored.get((a, b)) or compare(a, b, contacts)
        both = a in batch and b in batch  # else one is stored (pairs come from the batch)
        inside, other = (a, b) if a in batch else (b, a)
        golden = None if both else member_of.get(other)  # None: a staged record without one
        if golden is not None:
            against[inside][golden].append(decision.probability)
        if decision.action == "review":
            reviews[(a, b)] = decision
        elif decision.action == "merge":
            if both:
                uf.union(("r", a), ("r", b))
                _note_link(weak, borderline(decision.probability), a, b)
            elif golden is not None:
                best = links[inside].get(golden)
                if best is None or decision.probability > best[0].probability:
                    links[inside][golden] = (decision, other)
    review = float(getattr(matcher, "review", 0.0))
    auto_merge = float(getattr(matcher, "auto_merge", 1.0))
    for rid, linked in links.items():
        ranked = sorted(linked.items(), key=lambda g: -g[1][0].probability)
        joined: list[int] = []
        for golden, (decision, other) in ranked:
            # Chain guard (the batch clusterer's rule, dedupe.cluster.should_join): a record
            # joins a golden record only if its other scored pairs with the members do not
            # contradict the link, and two golden records only if their members agree;
            # otherwise the link goes to review.
            if compare.transitive:
                joined.append(golden)
                continue
            if joined:
                contacts.setdefault(rid, batch[rid].contact)
                scores = _scores_between(conn, compare, rid, joined[0], golden, contacts)
            elif golden == member_of.get(rid):
                scores = []  # a changed record's own golden record: it is a member already
            else:
                scores = against[rid][golden]
            if should_join(scores, review, auto_merge):
                joined.append(golden)
            else:
                if not decision.explanation:  # a shortcut's decision: explain it now
                    _load_contacts(conn, {other}, contacts)
                    decision = compare(rid, other, contacts)
                average = sum(scores) / len(scores)
                held = (
                    f"held for review: this record would join two golden records ({joined[0]} "
                    f"and {golden}) whose members match only {average:.2f} on average"
                    if joined
                    else f"held for review: this record matches golden record {golden}'s "
                    f"members only {average:.2f} on average"
                )
                reviews[(min(rid, other), max(rid, other))] = Decision(
                    "review", decision.probability, {**decision.explanation, "held": held}
                )
        for golden_id in joined:
            uf.union(("g", golden_id), ("r", rid))
            _note_link(weak, borderline(linked[golden_id][0].probability), rid)

    stamp = bind_values(conn, membership.c.decided_at, [now])[0]  # `now`, as the driver takes it
    new_members: list[tuple[int, int, str, float | None, Any]] = []
    moved: list[tuple[int, float | None, Any, int]] = []  # golden, probability, at, record
    fresh: list[list[int]] = [[rid] for rid in lone]  # batch records needing a golden record
    for group in uf.groups():
        goldens = sorted(g for kind, g in group if kind == "g")
        records = sorted(r for kind, r in group if kind == "r")
        if len(group) > 1:
            outcome.records_merged += sum(
                1 for r in records if batch[r].status == "new" or member_of.get(r) not in goldens
            )
        if not goldens:
            fresh.append(records)
            continue
        golden_id = goldens[0]  # the oldest id survives; the others become aliases
        outcome.touched_goldens.add(golden_id)
        for alias in goldens[1:]:
            fold_golden(conn, alias, golden_id, now)
            outcome.goldens_merged += 1
        for r in records:
            if r not in member_of:
                new_members.append((r, golden_id, "auto", weak.get(r), stamp))
            elif member_of[r] != golden_id:
                moved.append((golden_id, weak.get(r), stamp, r))
    if fresh:
        # New golden records in batch order, whichever way they were found (stable ids).
        order = {rid: i for i, rid in enumerate(batch)}
        fresh.sort(
            key=lambda records: (
                order[records[0]] if len(records) == 1 else min(map(order.__getitem__, records))
            )
        )
        policy = survivorship_for(conn)
        ids = allocate_ids(conn, golden_record, len(fresh))
        rows: list[tuple[int, str, str, int, Any, Any]] = []
        joint: dict[int, tuple[dict[str, Any], dict[str, int]]] = {}  # several members
        for golden_id, records in zip(ids, fresh, strict=True):
            alone = batch[records[0]].solo if len(records) == 1 else None
            if alone is not None:
                fields_text = alone[0]
                lineage_text = json_text(dict.fromkeys(alone[1], records[0]))
            else:
                fields, lineage = survive(
                    [
                        Member(r, batch[r].updated_at, batch[r].data, batch[r].source)
                        for r in records
                    ],
                    policy,
                )
                if len(records) > 1:
                    joint[golden_id] = (fields, lineage)
                fields_text, lineage_text = json_text(fields), json_text(lineage)
            rows.append((golden_id, fields_text, lineage_text, 1, stamp, stamp))
        insert_rows(conn, golden_record, GOLDEN_COLUMNS, rows)
        outcome.goldens_created += len(ids)
        if joint:  # new golden records of several records: tools may need telling
            writeback.golden_changed(
                conn,
                {gid: fields for gid, (fields, _) in joint.items()},
                {gid: lineage for gid, (_, lineage) in joint.items()},
                now,
            )
        for records, golden_id in zip(fresh, ids, strict=True):
            method = "new" if len(records) == 1 else "auto"
            new_members.extend((r, golden_id, method, weak.get(r), stamp) for r in records)
    insert_rows(conn, membership, MEMBERSHIP_COLUMNS, new_members)
    update_rows(conn, membership, ("golden_id", "probability", "decided_at"), "record_id", moved)
    _queue_reviews(conn, reviews, now, outcome)
    outcome.reviews_settled += _settle_reviews(conn, set(batch), outcome.touched_goldens, now)
    recompute_goldens(conn, outcome.touched_goldens, now)
    return outcome


def _borderline_of(matcher: Matcher) -> Callable[[float], float | None]:
    """What a merge link leaves on its records' memberships (`kept_probability`): only the
    probabilistic matcher's borderline links are kept (the exact matcher's are all sure)."""
    if isinstance(matcher, FellegiSunterMatcher):
        return partial(kept_probability, auto_merge=matcher.auto_merge)
    return lambda _: None


def _note_link(weak: dict[int, float], p: float | None, *records: int) -> None:
    """Remember a borderline link `p` (None: a sure one) on `records`, the weakest kept."""
    if p is not None:
        for r in records:
            weak[r] = min(weak.get(r, p), p)


# The columns new golden records and memberships are inserted with (`insert_rows`).
GOLDEN_COLUMNS = ("id", "fields", "lineage", "version", "created_at", "updated_at")
MEMBERSHIP_COLUMNS = ("record_id", "golden_id", "method", "probability", "decided_at")
# What the exact matcher decides for two records that share a key.
_SHARES_A_KEY = Decision("merge", 1.0, {})


def _score_pairs(
    compare: _Comparer,
    matcher: FellegiSunterMatcher,
    pairs: list[tuple[int, int]],
    contacts: _Contacts,
) -> dict[tuple[int, int], Decision]:
    """The page's candidate pairs scored at once (`FellegiSunterMatcher.probabilities`, the
    batch clusterer's vectorised path: the same probabilities as `compare_prepared`, many
    times cheaper). Only pairs that go to review get `compare`'s explanation; the others'
    decisions carry none (the chain guard works one out if it needs it)."""
    ids = sorted({rid for pair in pairs for rid in pair})
    index = {rid: i for i, rid in enumerate(ids)}
    cols = Columns.of([compare.form(rid, contacts) for rid in ids])
    # Term frequencies: the values pairs agree on are mostly the page's own, prefetched; the
    # others (a candidate's nickname or swapped name) are counted as the matcher asks for them
    # (`dedupe.comparators.TfCounts`), each by one `matcher.frequencies.count` query.
    ia = np.array([index[a] for a, _ in pairs], dtype=np.int64)
    ib = np.array([index[b] for _, b in pairs], dtype=np.int64)
    out: dict[tuple[int, int], Decision] = {}
    for (a, b), p in zip(pairs, matcher.probabilities(cols, ia, ib).tolist(), strict=True):
        action = matcher.action(p)
        out[(a, b)] = compare(a, b, contacts) if action == "review" else Decision(action, p, {})
    return out


def fold_golden(conn: Connection, alias: int, survivor: int, now: datetime) -> None:
    """Fold golden record `alias` into `survivor`: its members move, its id (and ids merged
    into it earlier) keep resolving to the survivor, and its stewards' field choices move along
    where the survivor has none for the field."""
    conn.execute(
        membership.update()
        .where(membership.c.golden_id == alias)
        .values(golden_id=survivor, decided_at=now)
    )
    conn.execute(
        golden_record.update()
        .where(golden_record.c.id == alias)
        .values(merged_into=survivor, updated_at=now)
    )
    conn.execute(
        golden_record.update()
        .where(golden_record.c.merged_into == alias)
        .values(merged_into=survivor)
    )
    taken = select(field_choice.c.field).where(field_choice.c.golden_id == survivor)
    conn.execute(
        field_choice.update()
        .where(field_choice.c.golden_id == alias, field_choice.c.field.not_in(taken))
        .values(golden_id=survivor)
    )


# Open items settled by a page: both records are members of one golden record among those the
# page touched or its records belong to. One statement: from those goldens' members (the
# golden_id index) to the items that list them first (the (record_a, record_b) index) and the
# other record's membership; the id lists travel as one parameter each. SQLite is kept off the
# status index (`+r.status`): without statistics it would walk every open item instead.
_SETTLED_SQL = (
    "WITH g(id) AS ({goldens} UNION SELECT golden_id FROM membership WHERE record_id IN "
    "({records})) SELECT r.id FROM g JOIN membership a ON a.golden_id = g.id "
    "JOIN review_item r ON r.record_a = a.record_id "
    "JOIN membership b ON b.record_id = r.record_b "
    "WHERE {status} = 'open' AND b.golden_id = a.golden_id"
)
_SETTLED = {
    "sqlite": text(
        _SETTLED_SQL.format(
            goldens="SELECT value FROM json_each(:goldens)",
            records="SELECT value FROM json_each(:records)",
            status="+r.status",
        )
    ),
    "postgresql": text(
        _SETTLED_SQL.format(
            goldens="SELECT unnest(CAST(:goldens AS bigint[]))",
            records="SELECT unnest(CAST(:records AS bigint[]))",
            status="r.status",
        )
    ),
}


def _settle_reviews(
    conn: Connection, record_ids: set[int], goldens: set[int], now: datetime
) -> int:
    """Open review items whose two records now share a golden record need no steward: they
    are closed as merged. Returns how many."""
    if (
        conn.execute(
            select(review_item.c.id).where(review_item.c.status == "open").limit(1)
        ).first()
        is None
    ):
        return 0  # nothing open: skip the membership lookups
    if conn.dialect.name == "postgresql":
        lists: dict[str, Any] = {"goldens": sorted(goldens), "records": sorted(record_ids)}
    else:
        lists = {
            "goldens": orjson.dumps(sorted(goldens)).decode(),
            "records": orjson.dumps(sorted(record_ids)).decode(),
        }
    settled = sorted(set(conn.execute(_SETTLED[conn.dialect.name], lists).scalars()))
    for part in chunks(settled):
        conn.execute(
            review_item.update()
            .where(one_of(conn, review_item.c.id, part))
            .values(status="merged", decided_by="matcher", decided_at=now)
        )
    return len(settled)


def _queue_reviews(
    conn: Connection, reviews: dict[tuple[int, int], Decision], now: datetime, outcome: MatchOutcome
) -> None:
    if not reviews:
        return
    existing = {
        (a, b)
        for a, b in _in_chunks(
            conn,
            select(review_item.c.record_a, review_item.c.record_b),
            review_item.c.record_a,
            {a for a, _ in reviews},
        )
    }
    rows = [
        {
            "record_a": a,
            "record_b": b,
            "probability": d.probability,
            "explanation": d.explanation,
            "status": "open",
            "created_at": now,
        }
        for (a, b), d in reviews.items()
        if (a, b) not in existing
    ]
    if rows:
        conn.execute(review_item.insert(), rows)
        outcome.reviews_queued += len(rows)


Survived = tuple[dict[str, Any], dict[str, int]]  # a golden record's fields and lineage
SURVIVED_COLUMNS = ("fields", "lineage", "updated_at")  # what `survived_rows` updates
BUMP_VERSION = "version = version + 1"


def recompute_goldens(conn: Connection, golden_ids: set[int], now: datetime | None = None) -> None:
    """Recompute fields and lineage of `golden_ids` from their live members (survivorship)."""
    if not golden_ids:
        return
    now = now or datetime.now(UTC)
    members: dict[int, list[Member]] = defaultdict(list)
    query = (
        select(
            membership.c.golden_id,
            source_record.c.id,
            source_record.c.source_updated_at,
            source_record.c.data,
            source_record.c.source,
        )
        .join(source_record, source_record.c.id == membership.c.record_id)
        .where(source_record.c.deleted == 0)
    )
    for golden_id, rid, updated_at, data, source in _in_chunks(
        conn, query, membership.c.golden_id, golden_ids
    ):
        members[golden_id].append(Member(rid, updated_at, data, source))
    policy = survivorship_for(conn)
    survived = {g: survive(members[g], policy) if members[g] else ({}, {}) for g in golden_ids}
    stamp = bind_values(conn, golden_record.c.updated_at, [now])[0]
    _, updates = survived_rows(survived, stamp)
    update_rows(conn, golden_record, SURVIVED_COLUMNS, "id", updates, also=BUMP_VERSION)
    finish_goldens(conn, golden_ids, now)


def survived_rows(
    survived: dict[int, Survived], stamp: Any, created: Container[int] = ()
) -> tuple[list[tuple[int, str, str, int, Any, Any]], list[tuple[str, str, Any, int]]]:
    """Survivorship's fields and lineage (`survived`, by golden id) as rows for the store,
    `stamp` (driver-ready) their time: `GOLDEN_COLUMNS` rows to insert for the golden records
    in `created` (version 1), and (fields, lineage, updated_at, id) rows for the others."""
    inserts: list[tuple[int, str, str, int, Any, Any]] = []
    updates: list[tuple[str, str, Any, int]] = []
    for golden_id, (fields, lineage) in survived.items():
        fields_text, lineage_text = json_text(fields), json_text(lineage)
        if golden_id in created:
            inserts.append((golden_id, fields_text, lineage_text, 1, stamp, stamp))
        else:
            updates.append((fields_text, lineage_text, stamp, golden_id))
    return inserts, updates


def finish_goldens(conn: Connection, golden_ids: set[int], now: datetime) -> None:
    """After survivorship: stewards' per-field choices override its values, and the
    write-back pushes the final values call for are queued, in this transaction."""
    # Imported here: review builds on this module.
    from sync.review import apply_field_choices

    apply_field_choices(conn, golden_ids)
    # Read back, so a steward's choice is what gets pushed; not at all when no connector
    # writes back (a 1M first load would decode every golden record's fields again for
    # nothing).
    if writeback.plan_for(conn) is None:
        return
    final = {
        gid: (fields, lineage)
        for gid, fields, lineage in conn.execute(
            select(golden_record.c.id, golden_record.c.fields, golden_record.c.lineage).where(
                one_of(conn, golden_record.c.id, sorted(golden_ids))
            )
        )
    }
    writeback.golden_changed(
        conn,
        {gid: f for gid, (f, _) in final.items()},
        {gid: lin for gid, (_, lin) in final.items()},
        now,
    )
