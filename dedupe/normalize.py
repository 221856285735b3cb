"""Normalisation for matching: names, companies, emails and phones, each to a comparable form.

Everything here is pure and cached where it pays (the same first names and companies recur
millions of times). `prepare(contact)` turns a `Contact` into a `Prepared` record: the folded,
tokenised form every comparator and blocking rule reads, computed once per record.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import jellyfish
from anyascii import anyascii
from nicknames import NickNamer
from rapidfuzz.distance import OSA

from crmhub.records import Contact

__all__ = [
    "FREEMAIL_DOMAINS",
    "ROLE_LOCAL_PARTS",
    "Prepared",
    "company_key",
    "domain_org",
    "email_key",
    "email_names",
    "fold",
    "is_role_address",
    "name_group",
    "nickname_of",
    "nickname_pairs",
    "phonetic",
    "prepare",
    "split_full_name",
]

# Longer inputs are cut before normalising: no real name or company is longer, and a 10,000
# character field must not cost 10,000 characters of work in every comparison.
MAX_FIELD_CHARS = 128
MAX_VALUES = 5  # emails / phones per record taken into account

_GMAIL = frozenset({"gmail.com", "googlemail.com"})
FREEMAIL_DOMAINS = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "ymail.com",
        "hotmail.com",
        "outlook.com",
        "live.com",
        "msn.com",
        "icloud.com",
        "me.com",
        "mac.com",
        "aol.com",
        "proton.me",
        "protonmail.com",
        "gmx.com",
        "gmx.de",
        "web.de",
        "mail.com",
        "yandex.ru",
        "qq.com",
        "163.com",
        "comcast.net",
        "verizon.net",
        "att.net",
    }
)
# Shared mailboxes say nothing about who a person is.
ROLE_LOCAL_PARTS = frozenset(
    {
        "info",
        "sales",
        "support",
        "hello",
        "contact",
        "admin",
        "office",
        "team",
        "noreply",
        "no-reply",
        "marketing",
        "billing",
        "help",
        "enquiries",
        "inquiries",
        "jobs",
        "hr",
        "accounts",
        "service",
        "reception",
    }
)
_TITLES = frozenset({"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "dame", "rev"})
_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv", "phd", "md", "esq"})
_PARTICLES = frozenset({"van", "von", "de", "da", "del", "der", "di", "la", "le", "du", "st"})
# Legal forms and filler words that say nothing about which organisation it is.
_COMPANY_NOISE = frozenset(
    {
        "inc",
        "incorporated",
        "corp",
        "corporation",
        "co",
        "company",
        "llc",
        "llp",
        "lp",
        "ltd",
        "limited",
        "plc",
        "gmbh",
        "ag",
        "kg",
        "sa",
        "sas",
        "sarl",
        "srl",
        "spa",
        "bv",
        "nv",
        "oy",
        "ab",
        "as",
        "aps",
        "pty",
        "pte",
        "kk",
        "the",
        "and",
        "group",
        "holdings",
        "holding",
    }
)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_NICKNAMER = NickNamer()


@lru_cache(maxsize=262144)
def fold(text: str) -> str:
    """Unicode to lowercase ASCII words: 'Jürgen  O\u2019Brien' -> 'jurgen o brien'.

    Transliterates (anyascii: 'Иван' -> 'ivan', '王伟' -> 'wangwei'), drops punctuation and
    emoji, collapses spaces.
    """
    ascii_text = anyascii(text[:MAX_FIELD_CHARS]).lower()
    ascii_text = re.sub(r":[a-z0-9_+-]+:", " ", ascii_text)  # emoji become :name: in anyascii
    return _NON_ALNUM.sub(" ", ascii_text).strip()


@lru_cache(maxsize=131072)
def _name_tokens(text: str) -> tuple[str, ...]:
    return tuple(t for t in fold(text).split() if t not in _TITLES and t not in _SUFFIXES)


@lru_cache(maxsize=65536)
def split_full_name(text: str) -> tuple[str, str]:
    """'Smith, Bob' / 'Dr. Bob van der Berg Jr.' -> ('bob', 'van der berg'), folded."""
    if "," in text:
        last, _, first = text.partition(",")
        first_tokens, last_tokens = _name_tokens(first), _name_tokens(last)
        return (first_tokens[0] if first_tokens else "", " ".join(last_tokens))
    tokens = _name_tokens(text)
    if not tokens:
        return "", ""
    if len(tokens) == 1:
        return "", tokens[0]
    start = len(tokens) - 1
    while start > 1 and tokens[start - 1] in _PARTICLES:
        start -= 1
    return tokens[0], " ".join(tokens[start:])


@lru_cache(maxsize=65536)
def name_group(first: str) -> frozenset[str]:
    """The name and its nickname-group canonicals: 'bob' -> {bob, robert, bobby, bert}."""
    if len(first) < 2:
        return frozenset()
    return frozenset({first, *_NICKNAMER.canonicals_of(first)})


@lru_cache(maxsize=65536)
def _nicknames(first: str) -> frozenset[str]:
    return frozenset(_NICKNAMER.nicknames_of(first))


def nickname_pairs(names: Sequence[str]) -> set[tuple[int, int]]:
    """Every (i, j) with `nickname_of(names[i], names[j])`, found through the nickname
    groups instead of by trying all pairs."""
    code = {name: i for i, name in enumerate(names)}
    by_canonical: dict[str, list[int]] = {}
    pairs: set[tuple[int, int]] = set()
    for i, name in enumerate(names):
        if len(name) < 2:
            continue
        for canonical in name_group(name):
            by_canonical.setdefault(canonical, []).append(i)
        for nick in _nicknames(name):
            j = code.get(nick)
            if j is not None and j != i and len(nick) >= 2:
                pairs.update(((i, j), (j, i)))
    for members in by_canonical.values():
        pairs.update((i, j) for i in members for j in members if i != j)
    return pairs


def nickname_of(a: str, b: str) -> bool:
    """True when one first name is a known nickname of the other (symmetric).

    Cached per name, not per pair: a batch compares hundreds of thousands of name pairs.
    """
    if a == b or len(a) < 2 or len(b) < 2:
        return False
    if name_group(a) & name_group(b):
        return True
    return b in _nicknames(a) or a in _nicknames(b)


@lru_cache(maxsize=65536)
def phonetic(text: str) -> str:
    """Metaphone code of a folded surname ('smith', 'smyth' -> 'SM0'); '' when empty."""
    return jellyfish.metaphone(text.replace(" ", "")) if text else ""


@lru_cache(maxsize=65536)
def company_key(text: str) -> str:
    """'ACME, Inc.' / 'The Acme Corporation' -> 'acme'; legal forms and punctuation dropped."""
    tokens = [t for t in fold(text.replace(".", "")).split() if t not in _COMPANY_NOISE]
    return " ".join(tokens)


def email_key(email: str) -> str:
    """The identity key of an address: lowercase; gmail ignores dots and +tags."""
    local, _, domain = email[: MAX_FIELD_CHARS * 2].lower().strip().partition("@")
    local = local.split("+", 1)[0]
    if domain in _GMAIL:
        local = local.replace(".", "")
        domain = "gmail.com"
    return f"{local}@{domain}"


def is_role_address(email: str) -> bool:
    """info@, sales@ ...: a shared mailbox, not evidence about one person."""
    return email.partition("@")[0].lower().split("+", 1)[0] in ROLE_LOCAL_PARTS


def domain_org(email: str) -> str:
    """The organisation an address belongs to ('rsmith@mail.acme.co.uk' -> 'acme'), else ''."""
    domain = email.rpartition("@")[2].lower()
    if not domain or domain in FREEMAIL_DOMAINS:
        return ""
    labels = domain.split(".")
    if len(labels) >= 3 and labels[-2] in {"co", "com", "org", "net", "ac", "gov"}:
        return labels[-3]
    return labels[-2] if len(labels) >= 2 else labels[0]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A contact in the comparable form: folded names, email keys, phones, organisation keys.

    `first_alt` / `last_alt` are the names as the record's email address spells them, when
    that differs from the written name and fits it ('Rod Duggn' <rogerduggan@...> reads also
    as roger / duggan): an address is typed by its owner and used daily, so its spelling
    repairs typos, initials and nicknames in the name fields. Empty strings mean missing.
    """

    first: str
    last: str
    emails: tuple[str, ...]  # identity keys (gmail dots/+tags removed), role addresses excluded
    email_notes: tuple[str, ...]  # what the key normalisation did, per email
    phones: tuple[str, ...]
    company: str
    orgs: frozenset[str]  # company key (no spaces) plus organisations of non-freemail domains
    city: str
    first_alt: str = ""
    last_alt: str = ""


def _first_last(contact: Contact) -> tuple[str, str]:
    first = _name_tokens(contact.first_name)[:1] if contact.first_name else ()
    last = " ".join(_name_tokens(contact.last_name)) if contact.last_name else ""
    first_name = first[0] if first else ""
    if (not first_name or not last) and contact.full_name:
        full_first, full_last = split_full_name(contact.full_name)
        first_name = first_name or full_first
        last = last or full_last
    return first_name, last


def _email_note(email: str, key: str) -> str:
    local, _, domain = email.lower().partition("@")
    notes = []
    if "+" in local:
        notes.append("+tag removed")
    if key.partition("@")[2] == "gmail.com" and "." in local.split("+", 1)[0]:
        notes.append("gmail dots removed")
    if domain == "googlemail.com":
        notes.append("googlemail = gmail")
    return ", ".join(notes)


_LOCAL_SPLIT = re.compile(r"[._-]+")


def _one_edit(x: str, y: str) -> bool:
    """A typo apart: one edit (a transposition counts as one), same first letter, 4+ letters."""
    return (
        x[:1] == y[:1]
        and max(len(x), len(y)) >= 4
        and abs(len(x) - len(y)) <= 1
        and OSA.distance(x, y, score_cutoff=1) <= 1
    )


def _fits_last(part: str, last: str) -> bool:
    return part == last or (min(len(part), len(last)) >= 3 and _one_edit(part, last))


def _fits_first(part: str, first: str) -> bool:
    """Whether a user-name part can be this first name: the same, its initial, the full name
    of a written initial, a nickname pair, or a typo apart. Any part fits a missing name."""
    if not first or part == first:
        return bool(part)
    if len(part) == 1 or len(first) == 1:
        return part[0] == first[0]
    return nickname_of(part, first) or _one_edit(part, first)


def email_names(local: str, first: str, last: str) -> tuple[str, str]:
    """(first, last) as an address's user name spells them, or '' for a part it does not give.

    Only user names that spell *this* record's name count: 'first.last', 'last.first',
    'firstlast', 'flast' and 'first' (digits after them ignored), where the surname part is the
    written surname or one typo from it and the first-name part fits the written first name
    (`_fits_first`). 'jsmith' gives ('j', 'smith'); 'sales.team' gives nothing.
    """
    last = last.replace(" ", "")
    base = local.split("+", 1)[0].rstrip("0123456789")
    parts = [p for p in _LOCAL_SPLIT.split(base) if p]
    if len(last) < 2 or not parts or len(parts) > 2:
        return "", ""
    if len(parts) == 2:
        x, y = parts
        for f, s in ((x, y), (y, x)):
            if _fits_last(s, last) and _fits_first(f, first):
                return f, s
        return "", ""
    word = parts[0]
    if word.endswith(last) and len(word) > len(last) and _fits_first(word[: -len(last)], first):
        return word[: -len(last)], last
    # A surname with a typo at the end of the user name: one edit keeps its length within
    # one of the written surname's, so only those (at most three) cuts can fit.
    low = max(1, len(word) - len(last) - 1)
    for cut in range(low, min(len(word) - 2, len(word) - len(last) + 2)):
        f, s = word[:cut], word[cut:]
        if _one_edit(s, last) and _fits_first(f, first):
            return f, s
    if first and len(word) >= 3 and word != first and _fits_first(word, first):
        return word, ""
    return "", ""


def _alt_names(first: str, last: str, emails: tuple[str, ...]) -> tuple[str, str, str]:
    """(first, first_alt, last_alt): a missing first name is taken from the address; otherwise
    the address's spelling becomes the alternative when it says more than the written one."""
    for email in emails:
        f, s = email_names(email.partition("@")[0], first, last)
        if not f and not s:
            continue
        s = s if s != last.replace(" ", "") else ""
        if not first:
            return f, "", s
        return first, f if len(f) > 1 and f != first else "", s
    return first, "", ""


def prepare(contact: Contact) -> Prepared:
    """Normalise one contact for comparison and blocking."""
    first, last = _first_last(contact)
    emails: list[str] = []
    notes: list[str] = []
    for email in contact.emails[:MAX_VALUES]:
        if is_role_address(email):
            continue
        key = email_key(email)
        if key not in emails:
            emails.append(key)
            notes.append(_email_note(email, key))
    phones = tuple(dict.fromkeys(p[:32] for p in contact.phones[:MAX_VALUES]))
    company = company_key(contact.company) if contact.company else ""
    # Spaces dropped so that 'Jade Robotics' and jaderobotics.com name the same organisation.
    orgs = {company.replace(" ", "")} if company else set()
    for email in emails:
        org = domain_org(email)
        if org:
            orgs.add(org)
    first, first_alt, last_alt = _alt_names(first, last, tuple(emails)) if last else (first, "", "")
    return Prepared(
        first=first,
        last=last,
        emails=tuple(emails),
        email_notes=tuple(notes),
        phones=phones,
        company=company,
        orgs=frozenset(orgs),
        city=fold(contact.city) if contact.city else "",
        first_alt=first_alt,
        last_alt=last_alt,
    )
