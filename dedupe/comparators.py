"""Per-field comparison levels (splink-style small classes), scalar and vectorised.

Each comparison maps a pair of `Prepared` records to a level: `NULL` (-1) when either side is
missing the field (no evidence either way), otherwise an index into that comparison's `LEVELS`
(0 = disagree, higher = stronger agreement). The scalar path (`compare_levels`) serves the
incremental pipeline, one pair at a time in a few microseconds; the vectorised path
(`levels_many`) serves batches through `rapidfuzz.process.cpdist`. Both must agree exactly;
tests/dedupe/test_comparators.py checks that on random pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from rapidfuzz import fuzz
from rapidfuzz.distance import OSA, JaroWinkler, Levenshtein
from rapidfuzz.process import cpdist

from dedupe.normalize import Prepared, nickname_of

__all__ = [
    "COMPARISONS",
    "NULL",
    "Columns",
    "Comparison",
    "compare_levels",
    "email_local",
    "level_notes",
    "levels_many",
]

NULL = -1


class Frequencies(Protocol):
    """How often a value occurs (see dedupe.scoring.Frequencies, the documented one)."""

    @property
    def total(self) -> int: ...

    def count(self, kind: str, value: str) -> int: ...


NAME_JW = 0.88  # Jaro-Winkler floor for a "close" name (typos, transpositions)
TYPO_MIN_LEN = 4  # names this long are also "close" at one edit (OSA: a transposition is one)
COMPANY_RATIO = 90.0  # token-set ratio floor for "same company, written differently"


@dataclass(frozen=True, slots=True)
class Comparison:
    """One field's comparison: its name and its levels, weakest (disagree) first."""

    name: str
    levels: tuple[str, ...]
    # (level, Frequencies kind): levels whose weight is adjusted by the agreeing value's
    # term frequency, and the kind that value is counted under.
    tf: tuple[tuple[int, str], ...] = ()

    def tf_kind(self, level: int) -> str | None:
        return next((kind for lv, kind in self.tf if lv == level), None)


COMPARISONS: tuple[Comparison, ...] = (
    Comparison(
        "first_name", ("different", "initial", "similar", "nickname", "exact"), ((4, "first"),)
    ),
    Comparison("last_name", ("different", "similar", "exact"), ((2, "last"),)),
    Comparison(
        "email",
        ("different", "other-domain", "same-local", "similar", "exact"),
        ((2, "local"), (4, "email")),
    ),
    Comparison("phone", ("different", "exact"), ((1, "phone"),)),
    Comparison("company", ("different", "domain", "similar", "exact"), ((3, "company"),)),
    Comparison("city", ("different", "exact")),
)
FIRST, LAST, EMAIL, PHONE, COMPANY, CITY = range(len(COMPARISONS))


def _name_levels(a: Prepared, b: Prepared) -> tuple[int, int, bool]:
    """First- and last-name levels, and whether they were read with one side swapped.

    A source that puts the surname in the first-name field ('Pagan, William' read as
    first=pagan) is compared both ways; the swapped reading counts only when it gives the
    exact surname and a fitting first name (initial at least), and the straight reading
    agrees on neither name.
    """
    first, last = _first_level(a.first, b.first), _last_level(a.last, b.last)
    if first == 4 and last == 2:
        return first, last, False
    if a.first and a.last and b.first and b.last and (a.first == b.last or a.last == b.first):
        if a.first == b.last and a.last == b.first and a.first != a.last:
            return 4, 2, True
        if a.first == b.last:
            sw_first = _first_level(a.last, b.first)
        else:
            sw_first = _first_level(a.first, b.last)
        if sw_first >= 1 and (sw_first, 2) > (first, last) and max(first, last) < 2:
            return sw_first, 2, True
    return first, last, False


def _close(x: str, y: str) -> bool:
    """Whether two different names look like one name with a typo."""
    if JaroWinkler.similarity(x, y) >= NAME_JW:
        return True
    return (
        min(len(x), len(y)) >= TYPO_MIN_LEN
        and abs(len(x) - len(y)) <= 1
        and OSA.distance(x, y, score_cutoff=1) <= 1
    )


def _first_level(x: str, y: str) -> int:
    if not x or not y:
        return NULL
    if x == y:
        return 4
    if nickname_of(x, y):
        return 3
    if min(len(x), len(y)) > 1 and _close(x, y):
        return 2
    if x[0] == y[0] and (len(x) == 1 or len(y) == 1):
        return 1
    return 0


def _last_level(x: str, y: str) -> int:
    if not x or not y:
        return NULL
    if x == y:
        return 2
    return 1 if _close(x, y) else 0


def email_local(email: str) -> str:
    """The user name of an address without dots and underscores ('bob.smith' -> 'bobsmith')."""
    return email.partition("@")[0].replace(".", "").replace("_", "")


def _distinguishing(x: str, y: str) -> bool:
    """Whether two user names differ where colleagues' addresses differ: the first letter
    (b.alderson vs p.alderson) or a digit (john.smith vs john.smith2)."""
    return x[:1] != y[:1] or any(c.isdigit() for c in set(x) ^ set(y))


def _typo_of(x: str, y: str) -> bool:
    """One user name is the other with a typo (one edit, not a distinguishing one)."""
    return (
        min(len(x), len(y)) > 3
        and Levenshtein.distance(x, y, score_cutoff=1) <= 1
        and not _distinguishing(x, y)
    )


def _email_level(xs: tuple[str, ...], ys: tuple[str, ...]) -> int:
    if not xs or not ys:
        return NULL
    if set(xs) & set(ys):
        return 4
    level = 1
    for x in xs:
        xl, _, xd = x.partition("@")
        for y in ys:
            yl, _, yd = y.partition("@")
            if xd == yd:
                if _typo_of(xl, yl):
                    return 3
                level = 0
            elif len(email_local(x)) >= 5 and email_local(x) == email_local(y):
                level = max(level, 2)
    return level


def _name_derived(a: Prepared, b: Prepared) -> bool:
    """Whether the user names the two records share spell a surname of theirs."""
    shared = {email_local(e) for e in a.emails} & {email_local(e) for e in b.emails}
    surnames = {s.replace(" ", "") for s in (a.last, b.last, a.first, b.first) if len(s) > 2}
    return any(name in local for local in shared for name in surnames)


def _phone_level(xs: tuple[str, ...], ys: tuple[str, ...]) -> int:
    if not xs or not ys:
        return NULL
    return 1 if set(xs) & set(ys) else 0


def _company_level(a: Prepared, b: Prepared) -> int:
    if not a.orgs or not b.orgs:
        return NULL
    if a.company and b.company:
        if a.company == b.company:
            return 3
        if fuzz.token_set_ratio(a.company, b.company) >= COMPANY_RATIO:
            return 2
    return 1 if a.orgs & b.orgs else 0


def _city_level(x: str, y: str) -> int:
    if not x or not y:
        return NULL
    return 1 if x == y else 0


def compare_levels(a: Prepared, b: Prepared) -> tuple[int, ...]:
    """The level of every comparison for one pair (symmetric in a and b)."""
    first, last, _ = _name_levels(a, b)
    company = _company_level(a, b)
    email, phone = _email_level(a.emails, b.emails), _phone_level(a.phones, b.phones)
    if email == 2 and _name_derived(a, b):
        email = NULL  # "john.smith" elsewhere repeats the name evidence; it is not new evidence
    if company == 0:  # at different organisations, different addresses and numbers are expected
        email = NULL if email == 1 else email
        phone = NULL if phone == 0 else phone
    return (first, last, email, phone, company, _city_level(a.city, b.city))


def level_notes(a: Prepared, b: Prepared, levels: Sequence[int]) -> dict[str, str]:
    """Human-readable reasons for the agreeing levels ('nickname bob = robert', ...)."""
    notes: dict[str, str] = {}
    crossed = bool(a.first) and (a.first == b.last or a.last == b.first)
    if crossed and _name_levels(a, b)[2]:
        notes["first_name"] = notes["last_name"] = "first and last name swapped"
    elif levels[FIRST] == 3:
        notes["first_name"] = f"nickname {a.first} = {b.first}"
    elif levels[FIRST] == 1:
        notes["first_name"] = f"initial {a.first[0]} fits {max(a.first, b.first, key=len)}"
    if levels[EMAIL] == 2:
        notes["email"] = "same user name at another domain"
    if levels[EMAIL] == 4:
        shared = sorted(set(a.emails) & set(b.emails))[0]
        how = {
            part
            for p in (a, b)
            for e, n in zip(p.emails, p.email_notes, strict=True)
            if e == shared
            for part in n.split(", ")
            if part
        }
        notes["email"] = ", ".join(sorted(how)) or "same address"
    if levels[PHONE] == 1:
        notes["phone"] = "same number in E.164"
    if levels[COMPANY] == 3:
        notes["company"] = "same company after removing legal suffixes"
    elif levels[COMPANY] == 1:
        notes["company"] = "company matches an email domain"
    return notes


def _col(values: Sequence[object], dtype: type = object) -> npt.NDArray[Any]:
    return np.array(values, dtype=dtype) if len(values) else np.zeros(0, dtype=dtype)


@dataclass(slots=True)
class Columns:
    """Column-wise view of prepared records for the vectorised path.

    Emails, phones and organisations are multi-valued; the columns hold the only value of
    records that have at most one (`multi` marks the others, whose pairs take the scalar
    path). Almost every CRM record has at most one of each, so almost every pair is
    compared without a per-pair Python object.
    """

    records: Sequence[Prepared]
    first: npt.NDArray[np.object_]
    last: npt.NDArray[np.object_]
    company: npt.NDArray[np.object_]
    city: npt.NDArray[np.object_]
    email: npt.NDArray[np.object_]  # the address key, '' when none
    user: npt.NDArray[np.object_]  # its part before '@'
    user_len: npt.NDArray[np.int64]
    domain: npt.NDArray[np.object_]
    local: npt.NDArray[np.object_]  # email_local(email)
    local_len: npt.NDArray[np.int64]
    phone: npt.NDArray[np.object_]
    org: npt.NDArray[np.object_]  # the one organisation, '' when none
    multi: npt.NDArray[np.bool_]  # more than one email, phone or organisation
    first_len: npt.NDArray[np.int64]
    last_len: npt.NDArray[np.int64]
    initial: npt.NDArray[np.object_]  # first letter of the first name, '' when none
    tf_cache: dict[int, dict[str, npt.NDArray[np.int64]]] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Sequence[Prepared]) -> Columns:
        def col(name: str) -> npt.NDArray[np.object_]:
            return _col([getattr(r, name) for r in records])

        email = [r.emails[0] if r.emails else "" for r in records]
        user, domain = [], []
        for e in email:
            u, _, d = e.partition("@")
            user.append(u)
            domain.append(d)
        local = [email_local(e) if e else "" for e in email]
        return cls(
            records,
            col("first"),
            col("last"),
            col("company"),
            col("city"),
            email=_col(email),
            user=_col(user),
            user_len=_col([len(u) for u in user], np.int64),
            domain=_col(domain),
            local=_col(local),
            local_len=_col([len(x) for x in local], np.int64),
            phone=_col([r.phones[0] if r.phones else "" for r in records]),
            org=_col([next(iter(r.orgs)) if len(r.orgs) == 1 else "" for r in records]),
            multi=_col(
                [len(r.emails) > 1 or len(r.phones) > 1 or len(r.orgs) > 1 for r in records],
                bool,
            ),
            first_len=_col([len(r.first) for r in records], np.int64),
            last_len=_col([len(r.last) for r in records], np.int64),
            initial=_col([r.first[:1] for r in records]),
        )

    def tf_counts(self, freq: Frequencies) -> dict[str, npt.NDArray[np.int64]]:
        """Per record, how often its value of each term-frequency kind occurs (cached)."""
        cached = self.tf_cache.get(id(freq))
        if cached is not None:
            return cached

        def counts(kind: str, values: npt.NDArray[np.object_]) -> npt.NDArray[np.int64]:
            seen: dict[str, int] = {}
            out = np.zeros(len(values), dtype=np.int64)
            for i, v in enumerate(values.tolist()):
                if v:
                    c = seen.get(v)
                    if c is None:
                        c = seen[v] = freq.count(kind, v)
                    out[i] = c
            return out

        result = {
            "first": counts("first", self.first),
            "last": counts("last", self.last),
            "company": counts("company", self.company),
            "email": counts("email", self.email),
            "local": counts("local", self.local),
            "phone": counts("phone", self.phone),
        }
        self.tf_cache = {id(freq): result}
        return result


def _jw(x: npt.NDArray[np.object_], y: npt.NDArray[np.object_]) -> npt.NDArray[np.float64]:
    if len(x) == 0:
        return np.zeros(0)
    return np.asarray(
        cpdist(x, y, scorer=JaroWinkler.similarity, dtype=np.float64, workers=1), dtype=np.float64
    )


def _close_many(
    x: npt.NDArray[np.object_],
    y: npt.NDArray[np.object_],
    lens: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """`_close` over arrays of names; `lens` holds the shorter length of each pair."""
    close = _jw(x, y) >= NAME_JW
    rest = np.flatnonzero(~close & (lens >= TYPO_MIN_LEN))
    if len(rest):
        dist = np.asarray(
            cpdist(x[rest], y[rest], scorer=OSA.distance, score_cutoff=1, dtype=np.int32, workers=1)
        )
        close[rest[dist <= 1]] = True
    return np.asarray(close, dtype=bool)


def _contact_levels(
    cols: Columns,
    ia: npt.NDArray[np.int64],
    ib: npt.NDArray[np.int64],
    single: npt.NDArray[np.bool_],
    company: npt.NDArray[np.int8],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8]]:
    """Email and phone levels of the pairs whose records hold at most one of each (vectorised
    `_email_level` / `_phone_level` plus the rules of `compare_levels`); others are left 0."""
    n = len(ia)
    ea, eb = cols.email[ia], cols.email[ib]
    email = np.ones(n, dtype=np.int8)
    same_domain = cols.domain[ia] == cols.domain[ib]
    email[same_domain] = 0
    near = np.flatnonzero(
        same_domain & (np.minimum(cols.user_len[ia], cols.user_len[ib]) > 3) & (ea != eb)
    )
    if len(near):
        dist = np.asarray(
            cpdist(
                cols.user[ia[near]],
                cols.user[ib[near]],
                scorer=Levenshtein.distance,
                score_cutoff=1,
                dtype=np.int32,
                workers=1,
            )
        )
        users_a, users_b = cols.user[ia], cols.user[ib]
        email[
            [k for k in near[dist <= 1].tolist() if not _distinguishing(users_a[k], users_b[k])]
        ] = 3
    la, lb = cols.local[ia], cols.local[ib]
    email[~same_domain & (cols.local_len[ia] >= 5) & (la == lb)] = 2
    email[ea == eb] = 4
    recs = cols.records
    for k in np.flatnonzero((email == 2) & single).tolist():
        if _name_derived(recs[ia[k]], recs[ib[k]]):
            email[k] = NULL
    email[(ea == "") | (eb == "")] = NULL
    pa, pb = cols.phone[ia], cols.phone[ib]
    phone = (pa == pb).astype(np.int8)
    phone[(pa == "") | (pb == "")] = NULL
    moved = company == 0
    email[moved & (email == 1)] = NULL
    phone[moved & (phone == 0)] = NULL
    email[~single] = 0
    phone[~single] = 0
    return email, phone


def levels_many(
    cols: Columns, ia: npt.NDArray[np.int64], ib: npt.NDArray[np.int64]
) -> npt.NDArray[np.int8]:
    """Levels for the pairs (cols.records[ia[k]], cols.records[ib[k]]) as an (n, fields) array."""
    n = len(ia)
    out = np.zeros((n, len(COMPARISONS)), dtype=np.int8)
    fa, fb, la, lb = cols.first[ia], cols.first[ib], cols.last[ia], cols.last[ib]
    empty_f, empty_l = (fa == "") | (fb == ""), (la == "") | (lb == "")

    first = np.zeros(n, dtype=np.int8)
    len_a, len_b = cols.first_len[ia], cols.first_len[ib]
    first[_close_many(fa, fb, np.minimum(len_a, len_b))] = 2
    short = np.minimum(len_a, len_b) <= 1
    first[short & (first == 2)] = 0
    initial = (
        (len_a > 0)
        & (len_b > 0)
        & (cols.initial[ia] == cols.initial[ib])
        & ((len_a == 1) | (len_b == 1))
    )
    first[initial & (first == 0)] = 1
    candidates = np.flatnonzero((fa != fb) & ~short)
    nick = [k for k in candidates if nickname_of(fa[k], fb[k])]
    first[nick] = 3
    first[fa == fb] = 4
    first[empty_f] = NULL

    last_len = np.minimum(cols.last_len[ia], cols.last_len[ib])
    last = np.where(_close_many(la, lb, last_len), 1, 0).astype(np.int8)
    last[la == lb] = 2
    last[empty_l] = NULL

    recs = cols.records
    # Swapped readings: only pairs where a first name equals the other's surname (rare).
    crossed = ~empty_f & ~empty_l & ((fa == lb) | (la == fb)) & ~((first == 4) & (last == 2))
    for k in np.flatnonzero(crossed).tolist():
        first[k], last[k], _ = _name_levels(recs[ia[k]], recs[ib[k]])
    out[:, FIRST], out[:, LAST] = first, last

    ca, cb = cols.company[ia], cols.company[ib]
    company = np.zeros(n, dtype=np.int8)
    both = np.flatnonzero((ca != "") & (cb != ""))
    if len(both):
        ratio = np.asarray(
            cpdist(ca[both], cb[both], scorer=fuzz.token_set_ratio, dtype=np.float64, workers=1)
        )
        company[both[ratio >= COMPANY_RATIO]] = 2
        company[both[ca[both] == cb[both]]] = 3
    multi = cols.multi[ia] | cols.multi[ib]
    single = ~multi
    oa, ob = cols.org[ia], cols.org[ib]
    zero = (company == 0) & single
    company[zero & ((oa == "") | (ob == ""))] = NULL
    company[zero & (oa != "") & (oa == ob)] = 1
    for k in np.flatnonzero((company == 0) & multi).tolist():
        a, b = recs[ia[k]], recs[ib[k]]
        if not a.orgs or not b.orgs:
            company[k] = NULL
        elif a.orgs & b.orgs:
            company[k] = 1
    out[:, COMPANY] = company
    out[:, EMAIL], out[:, PHONE] = _contact_levels(cols, ia, ib, single, company)
    for k in np.flatnonzero(multi).tolist():
        a, b = recs[ia[k]], recs[ib[k]]
        email, phone = _email_level(a.emails, b.emails), _phone_level(a.phones, b.phones)
        if email == 2 and _name_derived(a, b):
            email = NULL
        if company[k] == 0:
            email = NULL if email == 1 else email
            phone = NULL if phone == 0 else phone
        out[k, EMAIL], out[k, PHONE] = email, phone

    xa, xb = cols.city[ia], cols.city[ib]
    city = (xa == xb).astype(np.int8)
    city[(xa == "") | (xb == "")] = NULL
    out[:, CITY] = city
    return out
