"""Normalisation for matching: names, companies, emails and phones, each to a comparable form.

Everything here is pure and cached where it pays (the same first names and companies recur
millions of times). `prepare(contact)` turns a `Contact` into a `Prepared` record: the folded,
tokenised form every comparator and blocking rule reads, computed once per record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import jellyfish
from anyascii import anyascii
from nicknames import NickNamer

from crmhub.records import Contact

__all__ = [
    "FREEMAIL_DOMAINS",
    "ROLE_LOCAL_PARTS",
    "Prepared",
    "company_key",
    "domain_org",
    "email_key",
    "fold",
    "is_role_address",
    "name_group",
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


def _name_tokens(text: str) -> list[str]:
    return [t for t in fold(text).split() if t not in _TITLES and t not in _SUFFIXES]


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
def nickname_of(a: str, b: str) -> bool:
    """True when one first name is a known nickname of the other (symmetric)."""
    if a == b or len(a) < 2 or len(b) < 2:
        return False
    if name_group(a) & name_group(b):
        return True
    return b in _NICKNAMER.nicknames_of(a) or a in _NICKNAMER.nicknames_of(b)


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

    `first_raw` keeps the folded first name as written, so explanations can say
    'nickname bob = robert'. Empty strings mean missing.
    """

    first: str
    last: str
    emails: tuple[str, ...]  # identity keys (gmail dots/+tags removed), role addresses excluded
    email_notes: tuple[str, ...]  # what the key normalisation did, per email
    phones: tuple[str, ...]
    company: str
    orgs: frozenset[str]  # company key (no spaces) plus organisations of non-freemail domains
    city: str


def _first_last(contact: Contact) -> tuple[str, str]:
    first = _name_tokens(contact.first_name)[:1] if contact.first_name else []
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
    orgs.update(o for o in (domain_org(e) for e in emails) if o)
    return Prepared(
        first=first,
        last=last,
        emails=tuple(emails),
        email_notes=tuple(notes),
        phones=phones,
        company=company,
        orgs=frozenset(orgs),
        city=fold(contact.city) if contact.city else "",
    )
