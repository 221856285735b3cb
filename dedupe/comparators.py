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
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from rapidfuzz import fuzz
from rapidfuzz.distance import OSA, JaroWinkler, Levenshtein
from rapidfuzz.process import cpdist

from dedupe.normalize import Prepared, nickname_of, nickname_pairs

__all__ = [
    "COMPARISONS",
    "NULL",
    "Columns",
    "Comparison",
    "TfCounts",
    "compare_levels",
    "email_local",
    "level_notes",
    "levels_many",
    "own_readings",
    "shares_address",
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


def _firsts(p: Prepared) -> tuple[str, ...]:
    """A record's readings of its first name: as written, and as its email address spells it."""
    return (p.first, p.first_alt) if p.first_alt else (p.first,)


def _lasts(p: Prepared) -> tuple[str, ...]:
    return (p.last, p.last_alt) if p.last_alt else (p.last,)


def own_readings(a: Prepared, b: Prepared) -> tuple[Prepared, Prepared]:
    """The pair as compared: two records that share an address do not also read their names
    from it (that would count one piece of evidence twice)."""
    if (a.first_alt or a.last_alt or b.first_alt or b.last_alt) and set(a.emails) & set(b.emails):
        return _written(a), _written(b)
    return a, b


def _written(p: Prepared) -> Prepared:
    return replace(p, first_alt="", last_alt="") if p.first_alt or p.last_alt else p


def shares_address(
    cols: Columns, ia: npt.NDArray[np.int64], ib: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """Per pair, whether the two records share an email key (vectorised for single ones)."""
    ea, eb = cols.codes["email"][ia], cols.codes["email"][ib]
    shared: npt.NDArray[np.bool_] = (ea == eb) & (ea != 0)
    recs = cols.records
    for k in np.flatnonzero(cols.multi[ia] | cols.multi[ib]).tolist():
        shared[k] = bool(set(recs[ia[k]].emails) & set(recs[ib[k]].emails))
    return shared


def _straight_levels(a: Prepared, b: Prepared) -> tuple[int, int]:
    """First- and last-name levels, each the best over both records' readings."""
    first = max(_first_level(x, y) for x in _firsts(a) for y in _firsts(b))
    last = max(_last_level(x, y) for x in _lasts(a) for y in _lasts(b))
    return first, last


def _swap_fits(first: int, last: int) -> bool:
    """A swapped reading counts with the exact surname and a fitting first name, or a surname
    one typo away and a first name at least that close."""
    return (last == 2 and first >= 1) or (last == 1 and first >= 2)


def _name_levels(a: Prepared, b: Prepared) -> tuple[int, int, bool]:
    """First- and last-name levels, and whether they were read with one side swapped.

    A source that puts the surname in the first-name field ('Pagan, William' read as
    first=pagan) is compared both ways; the swapped reading counts only when the straight
    reading agrees on neither name and the swapped one fits (`_swap_fits`). A record without
    a first name is read swapped against the other's first name ('Collingwood' vs
    'Collingwood Isaac') when that gives the exact surname and the straight surnames differ.
    """
    a, b = own_readings(a, b)
    first, last = _straight_levels(a, b)
    if max(first, last) >= 2 or not a.last or not b.last:
        return first, last, False
    if a.first and b.first:
        one = (_first_level(a.last, b.first), _last_level(a.first, b.last))  # a swapped
        other = (_first_level(a.first, b.last), _last_level(a.last, b.first))  # b swapped
        sw_first, sw_last = max(one, other, key=lambda r: (r[1], r[0]))
        if _swap_fits(sw_first, sw_last):
            return sw_first, sw_last, True
    elif last == 0 and (a.last == b.first or a.first == b.last):
        return first, 2, True
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
    email, phone = _contact_rules(a, b, last, company)
    return (first, last, email, phone, company, _city_level(a.city, b.city))


def _contact_rules(a: Prepared, b: Prepared, last: int, company: int) -> tuple[int, int]:
    """Email and phone levels, read in the light of the names and organisations."""
    email, phone = _email_level(a.emails, b.emails), _phone_level(a.phones, b.phones)
    if email == 2 and _name_derived(a, b):
        email = NULL  # "john.smith" elsewhere repeats the name evidence; it is not new evidence
    if email == 3 and last in (0, 1):
        email = 0  # joyce.fernandez@ / joyce.hernandez@: two surnames, not a typo
    if company == 0:  # at different organisations, different addresses and numbers are expected
        email = NULL if email == 1 else email
        phone = NULL if phone == 0 else phone
    return email, phone


def level_notes(a: Prepared, b: Prepared, levels: Sequence[int]) -> dict[str, str]:
    """Human-readable reasons for the agreeing levels ('nickname bob = robert', ...)."""
    notes: dict[str, str] = {}
    a, b = own_readings(a, b)
    if _name_levels(a, b)[2]:
        notes["first_name"] = notes["last_name"] = "first and last name swapped"
        return notes | _contact_notes(a, b, levels)
    first, second = _name_pair(_firsts(a), _firsts(b), _first_level)
    if levels[FIRST] == 3:
        notes["first_name"] = f"nickname {first} = {second}"
    elif levels[FIRST] == 1:
        notes["first_name"] = f"initial {first[0]} fits {max(first, second, key=len)}"
    if (first, second) != (a.first, b.first) and levels[FIRST] > _first_level(a.first, b.first):
        notes["first_name"] = _joined(notes.get("first_name"), _spelled(first, second, a, b))
    last, other = _name_pair(_lasts(a), _lasts(b), _last_level)
    if levels[LAST] > _last_level(a.last, b.last):
        notes["last_name"] = _spelled(last, other, a, b)
    return notes | _contact_notes(a, b, levels)


def _name_pair(xs: tuple[str, ...], ys: tuple[str, ...], level: Any) -> tuple[str, str]:
    """The readings of a name that gave its level (written names first on ties)."""
    return max(((x, y) for x in xs for y in ys), key=lambda p: level(*p))


def _spelled(x: str, y: str, a: Prepared, b: Prepared) -> str:
    alts = {a.first_alt, a.last_alt, b.first_alt, b.last_alt} - {""}
    used = ", ".join(v for v in dict.fromkeys((x, y)) if v in alts)
    return f"read as the email address spells it ({used})"


def _joined(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def _contact_notes(a: Prepared, b: Prepared, levels: Sequence[int]) -> dict[str, str]:
    notes: dict[str, str] = {}
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


@dataclass(frozen=True, slots=True)
class _NameColumn:
    """One name field of every record (or of some rows: `at`): value, length, first letter
    as a character code (0 when missing) and a code (equal codes, equal names) shared by all
    name fields of one `Columns`. Values are looked up only where strings must be compared
    (`values`): most pairs are settled by the integer arrays."""

    value: npt.NDArray[np.object_]  # the whole column's values
    rows: npt.NDArray[np.int64] | None  # which of them this view holds (None: all)
    length: npt.NDArray[np.int64]
    initial: npt.NDArray[np.int64]
    code: npt.NDArray[np.int64]

    @classmethod
    def of(cls, values: list[str], vocabulary: dict[str, int]) -> _NameColumn:
        codes = [vocabulary.setdefault(v, len(vocabulary)) for v in values]
        return cls(
            _col(values),
            None,
            _col([len(v) for v in values], np.int64),
            _col([ord(v[0]) if v else 0 for v in values], np.int64),
            _col(codes, np.int64),
        )

    def values(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.object_]:
        return self.value[rows if self.rows is None else self.rows[rows]]

    def at(self, idx: npt.NDArray[np.int64]) -> _NameColumn:
        return _NameColumn(
            self.value,
            idx if self.rows is None else self.rows[idx],
            self.length[idx],
            self.initial[idx],
            self.code[idx],
        )


def _codes(values: list[str]) -> tuple[npt.NDArray[np.int64], list[str]]:
    """Integer codes of the values ('' is 0) and the distinct values by code."""
    seen = {"": 0}
    codes = _col([seen.setdefault(v, len(seen)) for v in values], np.int64)
    return codes, list(seen)


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
    # 'first', 'last', 'first_alt', 'last_alt': values with their lengths and first letters
    names: dict[str, _NameColumn]
    vocabulary: list[str]  # the names by code
    # integer codes of company, city, email, domain, local, phone, org ('' is 0): equal
    # codes, equal values, and comparing integers is many times cheaper than strings
    codes: dict[str, npt.NDArray[np.int64]]
    distinct: dict[str, list[str]]  # their values by code
    tf_cache: dict[int, TfCounts] = field(default_factory=dict)
    _nicknames: npt.NDArray[np.int64] | None = None

    def nicknames(self) -> npt.NDArray[np.int64]:
        """Sorted pair codes (`_CODES` * a + b) of the names that are nicknames of each other."""
        if self._nicknames is None:
            pairs = nickname_pairs(self.vocabulary)
            codes = np.array([a * int(_CODES) + b for a, b in pairs], dtype=np.int64)
            self._nicknames = np.sort(codes)
        return self._nicknames

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
        phone = [r.phones[0] if r.phones else "" for r in records]
        org = [next(iter(r.orgs)) if len(r.orgs) == 1 else "" for r in records]
        vocabulary: dict[str, int] = {}
        plain = {"email": email, "domain": domain, "local": local, "phone": phone, "org": org}
        plain |= {name: [getattr(r, name) for r in records] for name in ("company", "city")}
        distinct = {name: _codes(values) for name, values in plain.items()}
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
            phone=_col(phone),
            org=_col(org),
            multi=_col(
                [len(r.emails) > 1 or len(r.phones) > 1 or len(r.orgs) > 1 for r in records],
                bool,
            ),
            names={
                name: _NameColumn.of([getattr(r, name) for r in records], vocabulary)
                for name in ("first", "last", "first_alt", "last_alt")
            },
            vocabulary=list(vocabulary),
            codes={name: coded[0] for name, coded in distinct.items()},
            distinct={name: coded[1] for name, coded in distinct.items()},
        )

    def tf_counts(self, freq: Frequencies) -> TfCounts:
        """How often records' values occur, counted as asked for (cached per `freq`)."""
        cached = self.tf_cache.get(id(freq))
        if cached is None:
            cached = TfCounts(self, freq)
            self.tf_cache = {id(freq): cached}
        return cached


class TfCounts:
    """Per record, how often its value of a term-frequency column occurs, counted on first
    use and each distinct value once. Only the values a pair's agreement actually weighs
    are asked for: an incremental caller's `Frequencies` counts them in the store, and the
    candidates of one record hold thousands of values it never needs."""

    def __init__(self, cols: Columns, freq: Frequencies) -> None:
        # The columns' parts, not the columns: `Columns.tf_cache` holds this object, and a
        # reference cycle would keep every batch's columns alive until the cyclic collector
        # runs (which the batch path pauses).
        self._names, self._vocabulary = cols.names, cols.vocabulary
        self._codes, self._distinct = cols.codes, cols.distinct
        self._freq = freq
        self._per_code: dict[str, npt.NDArray[np.int64]] = {}  # by kind; -1: not counted yet

    def of(self, column: str, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Counts of `column`'s value (first, last, first_alt, last_alt, company, email,
        local, phone) for the records at `rows`."""
        if column in self._names:
            kind = column.removesuffix("_alt")
            codes, values = self._names[column].code, self._vocabulary
        else:
            kind, codes, values = column, self._codes[column], self._distinct[column]
        per_code = self._per_code.get(kind)
        if per_code is None:
            per_code = self._per_code[kind] = np.full(len(values), -1, dtype=np.int64)
        wanted = codes[rows]
        for code in np.unique(wanted[per_code[wanted] < 0]).tolist():
            value = values[code]
            per_code[code] = self._freq.count(kind, value) if value else 0
        return per_code[wanted]


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
    last: npt.NDArray[np.int8],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8]]:
    """Email and phone levels of the pairs whose records hold at most one of each (vectorised
    `_contact_rules`); others are left 0."""
    n = len(ia)
    code = cols.codes
    ea, eb = code["email"][ia], code["email"][ib]
    email = np.ones(n, dtype=np.int8)
    same_domain = code["domain"][ia] == code["domain"][ib]
    email[same_domain] = 0
    near = np.flatnonzero(
        same_domain & (np.minimum(cols.user_len[ia], cols.user_len[ib]) > 3) & (ea != eb)
    )
    if len(near):
        users_a, users_b = cols.user[ia[near]], cols.user[ib[near]]
        dist = np.asarray(
            cpdist(
                users_a,
                users_b,
                scorer=Levenshtein.distance,
                score_cutoff=1,
                dtype=np.int32,
                workers=1,
            )
        )
        typo = [
            k
            for k in np.flatnonzero(dist <= 1).tolist()
            if not _distinguishing(users_a[k], users_b[k])
        ]
        email[near[typo]] = 3
    la, lb = code["local"][ia], code["local"][ib]
    email[~same_domain & (cols.local_len[ia] >= 5) & (la == lb)] = 2
    email[ea == eb] = 4
    recs = cols.records
    for k in np.flatnonzero((email == 2) & single).tolist():
        if _name_derived(recs[ia[k]], recs[ib[k]]):
            email[k] = NULL
    email[(email == 3) & ((last == 0) | (last == 1))] = 0
    email[(ea == 0) | (eb == 0)] = NULL
    pa, pb = code["phone"][ia], code["phone"][ib]
    phone = (pa == pb).astype(np.int8)
    phone[(pa == 0) | (pb == 0)] = NULL
    moved = company == 0
    email[moved & (email == 1)] = NULL
    phone[moved & (phone == 0)] = NULL
    email[~single] = 0
    phone[~single] = 0
    return email, phone


def _distinct_pairs(
    x: npt.NDArray[np.int64], y: npt.NDArray[np.int64], rows: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """One representative row per distinct pair of codes among `rows`, and for each row the
    index of its representative: values repeat, so each distinct pair is compared once.

    Pairs are unordered ((x, y) and (y, x) are one): every comparison made on them is
    symmetric. Any row may represent its pair, so a plain sort does (not `np.unique`, whose
    first-occurrence guarantee costs a stable sort).
    """
    if not len(rows):
        return rows, rows
    xs, ys = x[rows], y[rows]
    codes = np.minimum(xs, ys) * _CODES + np.maximum(xs, ys)
    order = np.argsort(codes)
    ordered = codes[order]
    starts = np.empty(len(ordered), dtype=bool)
    starts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return rows[order[starts]], inverse


_CODES = np.int64(1 << 31)  # more distinct names than any batch holds


def _among(values: npt.NDArray[np.int64], ordered: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """`np.isin(values, ordered)` for a sorted `ordered` (which `isin` would sort again on
    every call: the nickname pairs are looked up thousands of times per batch)."""
    if not len(ordered):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return np.asarray(ordered[at] == values, dtype=bool)


def _first_many(
    x: _NameColumn, y: _NameColumn, nicknames: npt.NDArray[np.int64]
) -> npt.NDArray[np.int8]:
    """`_first_level` over arrays of pairs (`nicknames`: `Columns.nicknames()`)."""
    shorter = np.minimum(x.length, y.length)
    out = np.zeros(len(x.code), dtype=np.int8)
    differ = np.flatnonzero((x.code != y.code) & (shorter > 1))
    rep, inverse = _distinct_pairs(x.code, y.code, differ)
    xs, ys = x.values(rep), y.values(rep)
    out[differ] = np.where(_close_many(xs, ys, shorter[rep]), 2, 0)[inverse]
    initial = (shorter > 0) & (x.initial == y.initial) & ((x.length == 1) | (y.length == 1))
    out[initial & (out == 0)] = 1
    nick = _among(x.code[rep] * _CODES + y.code[rep], nicknames)
    if len(nick):
        out[differ[nick[inverse]]] = 3
    out[(x.code == y.code) & (shorter > 0)] = 4
    out[shorter == 0] = NULL
    return out


def _last_many(x: _NameColumn, y: _NameColumn) -> npt.NDArray[np.int8]:
    """`_last_level` over arrays of pairs."""
    shorter = np.minimum(x.length, y.length)
    out = np.zeros(len(x.code), dtype=np.int8)
    differ = np.flatnonzero((x.code != y.code) & (shorter > 0))
    rep, inverse = _distinct_pairs(x.code, y.code, differ)
    out[differ] = np.where(_close_many(x.values(rep), y.values(rep), shorter[rep]), 1, 0)[inverse]
    out[(x.code == y.code) & (shorter > 0)] = 2
    out[shorter == 0] = NULL
    return out


def _name_levels_many(
    cols: Columns, ia: npt.NDArray[np.int64], ib: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8]]:
    """First- and last-name levels of the pairs (vectorised `_name_levels`)."""
    names = cols.names
    nicknames = cols.nicknames()

    def first_many(x: _NameColumn, y: _NameColumn) -> npt.NDArray[np.int8]:
        return _first_many(x, y, nicknames)

    fa, fb = names["first"].at(ia), names["first"].at(ib)
    la, lb = names["last"].at(ia), names["last"].at(ib)
    first, last = first_many(fa, fb), _last_many(la, lb)
    alt = (names["first_alt"].length[ia] > 0) | (names["last_alt"].length[ia] > 0)
    alt |= (names["first_alt"].length[ib] > 0) | (names["last_alt"].length[ib] > 0)
    rows = np.flatnonzero(alt)
    rows = rows[~shares_address(cols, ia[rows], ib[rows])]  # see `own_readings`
    if len(rows):
        ra, rb = ia[rows], ib[rows]
        for level, kind, base in ((first_many, "first", first), (_last_many, "last", last)):
            xs = (names[kind].at(ra), names[f"{kind}_alt"].at(ra))
            ys = (names[kind].at(rb), names[f"{kind}_alt"].at(rb))
            best = base[rows]
            for x, y in ((xs[1], ys[0]), (xs[0], ys[1]), (xs[1], ys[1])):
                best = np.maximum(best, level(x, y))
            base[rows] = best
    # Swapped readings, where the straight one agrees on neither name.
    open_ = (np.maximum(first, last) < 2) & (la.length > 0) & (lb.length > 0)
    both = np.flatnonzero(open_ & (fa.length > 0) & (fb.length > 0))
    if len(both):
        fa_, fb_, la_, lb_ = fa.at(both), fb.at(both), la.at(both), lb.at(both)
        last_one, last_other = _last_many(fa_, lb_), _last_many(la_, fb_)
        first_one = np.full(len(both), NULL, dtype=np.int8)
        first_other = np.full(len(both), NULL, dtype=np.int8)
        rows = np.flatnonzero(last_one >= 1)  # only a fitting surname can make a reading count
        first_one[rows] = first_many(la_.at(rows), fb_.at(rows))
        rows = np.flatnonzero(last_other >= 1)
        first_other[rows] = first_many(fa_.at(rows), lb_.at(rows))
        one = (last_one > last_other) | ((last_one == last_other) & (first_one >= first_other))
        sw_first = np.where(one, first_one, first_other)
        sw_last = np.where(one, last_one, last_other)
        fits = ((sw_last == 2) & (sw_first >= 1)) | ((sw_last == 1) & (sw_first >= 2))
        first[both[fits]], last[both[fits]] = sw_first[fits], sw_last[fits]
    lone = np.flatnonzero(
        open_
        & ((fa.length > 0) != (fb.length > 0))
        & (last == 0)
        & ((la.code == fb.code) | (fa.code == lb.code))
    )
    last[lone] = 2
    return first, last


def levels_many(
    cols: Columns, ia: npt.NDArray[np.int64], ib: npt.NDArray[np.int64]
) -> npt.NDArray[np.int8]:
    """Levels for the pairs (cols.records[ia[k]], cols.records[ib[k]]) as an (n, fields) array."""
    n = len(ia)
    out = np.zeros((n, len(COMPARISONS)), dtype=np.int8)
    out[:, FIRST], out[:, LAST] = _name_levels_many(cols, ia, ib)
    recs = cols.records

    code = cols.codes
    ca, cb = code["company"][ia], code["company"][ib]
    company = np.zeros(n, dtype=np.int8)
    differ = np.flatnonzero((ca != 0) & (cb != 0) & (ca != cb))
    rep, inverse = _distinct_pairs(ca, cb, differ)
    if len(rep):
        ratio = np.asarray(
            cpdist(
                cols.company[ia[rep]],
                cols.company[ib[rep]],
                scorer=fuzz.token_set_ratio,
                dtype=np.float64,
                workers=1,
            )
        )
        company[differ[(ratio >= COMPANY_RATIO)[inverse]]] = 2
    company[(ca != 0) & (ca == cb)] = 3
    multi = cols.multi[ia] | cols.multi[ib]
    single = ~multi
    oa, ob = code["org"][ia], code["org"][ib]
    zero = (company == 0) & single
    company[zero & ((oa == 0) | (ob == 0))] = NULL
    company[zero & (oa != 0) & (oa == ob)] = 1
    for k in np.flatnonzero((company == 0) & multi).tolist():
        a, b = recs[ia[k]], recs[ib[k]]
        if not a.orgs or not b.orgs:
            company[k] = NULL
        elif a.orgs & b.orgs:
            company[k] = 1
    out[:, COMPANY] = company
    last = out[:, LAST]
    out[:, EMAIL], out[:, PHONE] = _contact_levels(cols, ia, ib, single, company, last)
    for k in np.flatnonzero(multi).tolist():
        out[k, EMAIL], out[k, PHONE] = _contact_rules(
            recs[ia[k]], recs[ib[k]], int(last[k]), int(company[k])
        )

    xa, xb = code["city"][ia], code["city"][ib]
    city = (xa == xb).astype(np.int8)
    city[(xa == 0) | (xb == 0)] = NULL
    out[:, CITY] = city
    return out
