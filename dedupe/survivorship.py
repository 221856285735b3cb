"""Survivorship: which member supplies each golden field, with lineage.

A `Policy` names a rule per field (a default for the rest):

- most_recent: the most recently updated member's non-empty value (the default);
- most_complete: the longest non-empty value ("Robert J. Smith" over "R. Smith");
- most_frequent: the value most members agree on (ignoring case and outer spaces);
- source_priority: the value from the first source in `source_priority` that has one.

Ties always go to the most recent member, so every rule is deterministic. Two fields are
not configurable: consent (below), and emails and phones, which keep every distinct value,
the most recent member's primary first.

Consent (the email-marketing status) is "most restrictive wins": unsubscribed over cleaned
over subscribed over pending. Only an explicit opt-in lifts a restrictive status: a member
that is `subscribed` with a `consent_at` later than every restrictive member's time (its
`consent_at`, else its `updated_at`; a restrictive member with neither is never lifted).
A `subscribed` without `consent_at` is a stale opt-in and lifts nothing; a tie stays
restrictive. `consent_at` on the golden record is the deciding member's time, by the same
rule, and lineage names that member for both fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from crmhub.records import SCALAR_CONTACT_FIELDS

__all__ = ["DEFAULT_POLICY", "RULES", "Member", "Policy", "Rule", "solo", "survive"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CONSENT_RANK = {"unsubscribed": 4, "cleaned": 3, "subscribed": 2, "pending": 1, "unknown": 0}
_RESTRICTIVE = _CONSENT_RANK["subscribed"]  # ranks above this are opt-outs

Rule = Literal["most_recent", "most_complete", "most_frequent", "source_priority"]
RULES: tuple[str, ...] = get_args(Rule)
# Fields a policy may name: the scalar contact fields except consent (always most restrictive).
CONFIGURABLE_FIELDS: tuple[str, ...] = tuple(f for f in SCALAR_CONTACT_FIELDS if f != "consent")
_CONFIGURABLE = frozenset(CONFIGURABLE_FIELDS)


@dataclass(frozen=True, slots=True)
class Member:
    """One source record of a golden record: its id, recency, mapped contact fields and the
    connector it came from."""

    record_id: int
    updated_at: datetime | None
    data: dict[str, Any]
    source: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    default: Rule = "most_recent"
    fields: Mapping[str, Rule] = field(default_factory=dict)
    source_priority: Sequence[str] = ()

    def rule(self, name: str) -> Rule:
        return self.fields.get(name, self.default)


DEFAULT_POLICY = Policy()


def survive(
    members: list[Member], policy: Policy = DEFAULT_POLICY
) -> tuple[dict[str, Any], dict[str, int]]:
    """The golden record's fields under `policy`, and lineage: field -> supplying record id
    (`emails.<value>` / `phones.<value>` for each address and number)."""
    if len(members) == 1:
        return _single(members[0])
    return _general(members, policy)


def _general(members: list[Member], policy: Policy) -> tuple[dict[str, Any], dict[str, int]]:
    """`survive` of any number of members; `_single` must agree with it on one."""
    # Most recent first: the order every rule falls back on.
    ordered = sorted(members, key=lambda m: (m.updated_at or _EPOCH, m.record_id), reverse=True)
    # Each field's holders (members with a value), most recent first, in one pass over the
    # members' data, which holds only the fields they have (a batch survives 1M contacts).
    holders: dict[str, list[Member]] = {}
    for member in ordered:
        for name, value in member.data.items():
            if name in _CONFIGURABLE and value is not None and value != "":
                holders.setdefault(name, []).append(member)
    fields: dict[str, Any] = {}
    lineage: dict[str, int] = {}
    for name in CONFIGURABLE_FIELDS:  # in this order, whichever order the data has
        found = holders.get(name)
        if found:
            chosen = _CHOOSERS[policy.rule(name)](found, name, policy)
            fields[name] = chosen.data[name]
            lineage[name] = chosen.record_id
    _survive_consent(ordered, fields, lineage)
    for plural in ("emails", "phones"):
        values: list[str] = []
        for member in ordered:
            for value in member.data.get(plural) or []:
                if value not in values:
                    values.append(value)
                    lineage.setdefault(f"{plural}.{value}", member.record_id)
        fields[plural] = values
    return fields, lineage


# Each chooser gets the members holding a value for the field, most recent first.
Chooser = Callable[[list[Member], str, Policy], Member]


def _most_recent(holders: list[Member], name: str, policy: Policy) -> Member:
    return holders[0]


def _most_complete(holders: list[Member], name: str, policy: Policy) -> Member:
    # max keeps the first of equals: the most recent of the longest.
    return max(holders, key=lambda m: len(str(m.data[name]).strip()))


def _most_frequent(holders: list[Member], name: str, policy: Policy) -> Member:
    def key(m: Member) -> str:
        return str(m.data[name]).strip().casefold()

    votes = Counter(key(m) for m in holders)
    return max(holders, key=lambda m: votes[key(m)])


def _source_priority(holders: list[Member], name: str, policy: Policy) -> Member:
    rank = {source: i for i, source in enumerate(policy.source_priority)}
    unlisted = len(rank)
    return min(holders, key=lambda m: rank.get(m.source, unlisted))


_CHOOSERS: dict[str, Chooser] = {
    "most_recent": _most_recent,
    "most_complete": _most_complete,
    "most_frequent": _most_frequent,
    "source_priority": _source_priority,
}


def solo(data: dict[str, Any], updated_at: datetime | None) -> tuple[dict[str, Any], list[str]]:
    """`survive` of a golden record with one member, whatever the policy: its fields, and the
    lineage keys (every one supplied by that member). Needs no record id, so the mapping
    process computes it for every contact while the writer is busy; kept lean for that
    (it was an eighth of the helper's time). `_general` must agree with it on one member."""
    fields: dict[str, Any] = {}
    for name in CONFIGURABLE_FIELDS:
        value = data.get(name)
        if value is not None and value != "":
            fields[name] = value
    lineage = list(fields)
    # `_survive_consent` of one member: its own status, and when it was set.
    status = data.get("consent") or "unknown"
    fields["consent"] = status
    if status != "unknown":
        lineage.append("consent")
        at = data.get("consent_at") or updated_at
        if at:
            fields["consent_at"] = at.isoformat() if isinstance(at, datetime) else str(at)
            lineage.append("consent_at")
    for plural in ("emails", "phones"):
        values = list(dict.fromkeys(data.get(plural) or ()))
        fields[plural] = values
        lineage += [f"{plural}.{v}" for v in values]
    return fields, lineage


def _single(member: Member) -> tuple[dict[str, Any], dict[str, int]]:
    """`survive` of one member (most golden records): its own values, all from it."""
    fields, keys = solo(member.data, member.updated_at)
    return fields, dict.fromkeys(keys, member.record_id)


def _survive_consent(
    ordered: list[Member], fields: dict[str, Any], lineage: dict[str, int]
) -> None:
    """Set `consent`, `consent_at` and their lineage from `ordered` (most recent first)."""
    if len(ordered) == 1:
        decider = ordered[0]
    elif any(m.data.get("consent") for m in ordered):
        decider = _decide_consent(ordered)
    else:  # nobody says anything (most golden records): no status to weigh
        fields["consent"] = "unknown"
        return
    status = decider.data.get("consent") or "unknown"
    fields["consent"] = status
    if status == "unknown":
        return
    lineage["consent"] = decider.record_id
    # The member's own text when it has one (the store keeps ISO 8601; no re-formatting).
    given = decider.data.get("consent_at")
    at = given or decider.updated_at
    if at:
        fields["consent_at"] = at.isoformat() if isinstance(at, datetime) else str(at)
        lineage["consent_at"] = decider.record_id


def _decide_consent(ordered: list[Member]) -> Member:
    """The member whose consent the golden record takes (see the module docstring)."""

    def rank(m: Member) -> int:
        return _CONSENT_RANK.get(m.data.get("consent") or "unknown", 0)

    top = max(ordered, key=rank)  # max keeps the first of equals: the most recent
    if rank(top) <= _RESTRICTIVE:
        return top
    latest_out: datetime | None = None
    for m in ordered:
        if rank(m) > _RESTRICTIVE:
            at = _consent_time(m)
            if at is None:
                return top  # an opt-out of unknown time cannot be shown to be older
            latest_out = at if latest_out is None or at > latest_out else latest_out
    if latest_out is None:  # unreachable: `top` is an opt-out; keeps the types plain
        return top
    # Strictly later lifts: a tie stays restrictive, and equal opt-ins keep the most recent.
    bar, decider = latest_out, top
    for m in ordered:
        if m.data.get("consent") == "subscribed" and m.data.get("consent_at"):
            at = _consent_time(m)
            if at is not None and at > bar:
                bar, decider = at, m
    return decider


def _consent_time(member: Member) -> datetime | None:
    """When the member's consent status was set: its `consent_at`, else its `updated_at`."""
    value = member.data.get("consent_at")
    at: datetime | None = member.updated_at
    if value:
        at = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return at if at is None or at.tzinfo else at.replace(tzinfo=UTC)
