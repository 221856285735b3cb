"""Seeded synthetic CRM contacts with ground truth.

People are drawn with US census name frequencies (the `names` package ships the 1990 census
tables), so many distinct people share common names; companies have Zipf-like sizes, so many
people share a company, its domain and its switchboard number. Each person appears in 2-4
sources (as issue 3 specifies; 2, 3, 4 with odds 50:33:17), and each appearance is corrupted
the way CRM data is: nicknames, initials, typos, swapped first/last names, accents dropped,
gmail dots and +tags, work vs personal addresses, switchboard instead of mobile, company
legal-suffix variants, job changes, missing fields.

`generate(n, seed)` returns rows (dicts) with `unique_id`, `cluster` (the person) and the
contact columns; the same seed always gives the same rows.
"""

from __future__ import annotations

import itertools
import os
import random
import string
from dataclasses import dataclass
from functools import lru_cache

import names
from nicknames import NickNamer

from dedupe.normalize import email_key

__all__ = ["COLUMNS", "generate"]

COLUMNS = (
    "unique_id",
    "cluster",
    "source",
    "first_name",
    "last_name",
    "email",
    "phone",
    "company",
    "city",
)
SOURCES = ("hubspot", "mailchimp", "webform", "mailbox", "csv")
FREEMAIL = ("gmail.com",) * 6 + ("yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "aol.com")
LEGAL = ("Inc", "LLC", "Ltd", "Corp", "GmbH", "Group", "Co")
LEGAL_VARIANTS = {
    "Inc": ("Inc", "Inc.", ", Inc.", "Incorporated", ""),
    "LLC": ("LLC", "L.L.C.", ", LLC", ""),
    "Ltd": ("Ltd", "Ltd.", "Limited", ""),
    "Corp": ("Corp", "Corp.", "Corporation", ""),
    "GmbH": ("GmbH", ""),
    "Group": ("Group", ""),
    "Co": ("Co", "Company", "& Co", ""),
}
WORDS = [
    "acme",
    "apex",
    "blue",
    "bright",
    "cedar",
    "cloud",
    "coral",
    "crest",
    "delta",
    "echo",
    "ember",
    "falcon",
    "fern",
    "forge",
    "granite",
    "harbor",
    "horizon",
    "iron",
    "jade",
    "keystone",
    "lumen",
    "maple",
    "meridian",
    "nova",
    "oak",
    "orbit",
    "pine",
    "pioneer",
    "quartz",
    "raven",
    "ridge",
    "river",
    "sage",
    "sierra",
    "silver",
    "solar",
    "spruce",
    "stone",
    "summit",
    "terra",
    "tidal",
    "vertex",
    "vista",
    "willow",
    "zenith",
    "atlas",
    "beacon",
    "canyon",
    "copper",
    "dune",
    "glacier",
    "indigo",
    "lotus",
    "mosaic",
    "nimbus",
    "onyx",
    "pacific",
    "prairie",
    "quill",
    "redwood",
    "sable",
    "timber",
    "umber",
    "velvet",
    "walnut",
    "yonder",
]
INDUSTRY = (
    "Labs",
    "Systems",
    "Foods",
    "Logistics",
    "Health",
    "Media",
    "Capital",
    "Software",
    "Partners",
    "Works",
    "Energy",
    "Analytics",
    "Design",
    "Robotics",
    "Retail",
)
CITIES = (
    "New York",
    "Los Angeles",
    "Chicago",
    "Houston",
    "Phoenix",
    "Philadelphia",
    "San Antonio",
    "San Diego",
    "Dallas",
    "Austin",
    "Jacksonville",
    "Columbus",
    "Charlotte",
    "Indianapolis",
    "Seattle",
    "Denver",
    "Boston",
    "Nashville",
    "Portland",
    "Las Vegas",
    "Detroit",
    "Memphis",
    "Baltimore",
    "Milwaukee",
    "Albuquerque",
    "Tucson",
    "Fresno",
    "Sacramento",
    "Atlanta",
    "Miami",
    "Oakland",
    "Minneapolis",
    "Tulsa",
    "Cleveland",
    "Raleigh",
    "Omaha",
    "Pittsburgh",
)
ACCENTED = {
    "jose": "José",
    "muller": "Müller",
    "zoe": "Zoë",
    "rene": "René",
    "andre": "André",
    "garcia": "García",
    "lopez": "López",
    "martinez": "Martínez",
    "hernandez": "Hernández",
    "gonzalez": "González",
    "perez": "Pérez",
    "rodriguez": "Rodríguez",
    "ramirez": "Ramírez",
    "sanchez": "Sánchez",
    "chloe": "Chloë",
    "noel": "Noël",
    "francois": "François",
}
_NICK = NickNamer()


@lru_cache(maxsize=1)
def _census() -> tuple[tuple[list[str], list[float]], ...]:
    base = os.path.dirname(names.__file__)

    def table(name: str, limit: int) -> tuple[list[str], list[float]]:
        words, weights = [], []
        with open(os.path.join(base, name)) as fh:
            for line in list(fh)[:limit]:
                parts = line.split()
                words.append(parts[0].capitalize())
                weights.append(max(float(parts[1]), 0.0004))
        return words, list(itertools.accumulate(weights))

    return (
        table("dist.male.first", 1219),
        table("dist.female.first", 4275),
        table("dist.all.last", 40000),
    )


@dataclass(slots=True)
class Company:
    name: str
    legal: str
    domain: str
    switchboard: str


@dataclass(slots=True)
class Person:
    first: str
    last: str
    company: int | None
    personal: str | None
    work: str | None
    mobile: str | None
    city: str


def _phone(rng: random.Random) -> str:
    area = rng.choice((201, 212, 305, 312, 415, 512, 617, 646, 702, 713, 805, 917))
    return f"+1{area}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"


def _companies(rng: random.Random, count: int) -> list[Company]:
    out, seen = [], set()
    while len(out) < count:
        name = f"{rng.choice(WORDS).capitalize()} {rng.choice(INDUSTRY)}"
        if rng.random() < 0.4:
            name = f"{rng.choice(WORDS).capitalize()}{rng.choice(WORDS)} {rng.choice(INDUSTRY)}"
        if name in seen:
            continue
        seen.add(name)
        slug = name.lower().replace(" ", "")
        out.append(Company(name, rng.choice(LEGAL), f"{slug}.com", _phone(rng)))
    return out


def _local(rng: random.Random, first: str, last: str) -> str:
    f, ln = _ascii(first).lower(), _ascii(last).lower().replace(" ", "")
    pattern = rng.random()
    if pattern < 0.35:
        return f"{f}.{ln}"
    if pattern < 0.55:
        return f"{f}{ln}"
    if pattern < 0.75:
        return f"{f[0]}{ln}"
    if pattern < 0.9:
        return f"{f}.{ln}{rng.randint(1, 99)}"
    return f"{f}{rng.randint(10, 9999)}"


def _ascii(text: str) -> str:
    table = str.maketrans("éüëáíóúçñèà", "eueaiouçnea")
    return text.translate(table).replace("ç", "c")


def _typo(rng: random.Random, word: str) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.random()
    if kind < 0.33:
        return word[:i] + word[i + 1 :]
    if kind < 0.66:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1 :]


def _unique(rng: random.Random, address: str, used: set[str]) -> str:
    """Addresses belong to one person: a taken one gets digits, as mail providers insist.

    Taken means taken as a mailbox: Gmail ignores dots, so john.smith@ and johnsmith@gmail.com
    are one mailbox and cannot belong to two people (compared by email key, not as written).
    """
    while email_key(address) in used:
        local, _, domain = address.partition("@")
        address = f"{local}{rng.randint(1, 999)}@{domain}"
    used.add(email_key(address))
    return address


def _person(
    rng: random.Random, companies: list[Company], weights: list[float], used: set[str]
) -> Person:
    male, female, last_names = _census()
    firsts = male if rng.random() < 0.5 else female
    first = rng.choices(firsts[0], cum_weights=firsts[1])[0]
    last = rng.choices(last_names[0], cum_weights=last_names[1])[0]
    if rng.random() < 0.08:
        first = ACCENTED.get(first.lower(), first)
        last = ACCENTED.get(last.lower(), last)
    company = (
        rng.choices(range(len(companies)), cum_weights=weights)[0] if rng.random() < 0.85 else None
    )
    personal = None
    if rng.random() < 0.8:
        personal = _unique(rng, f"{_local(rng, first, last)}@{rng.choice(FREEMAIL)}", used)
    work = None
    if company is not None and rng.random() < 0.85:
        work = _unique(rng, f"{_local(rng, first, last)}@{companies[company].domain}", used)
    mobile = _phone(rng) if rng.random() < 0.7 else None
    return Person(first, last, company, personal, work, mobile, rng.choice(CITIES))


def _company_text(rng: random.Random, company: Company) -> str:
    suffix = rng.choice(LEGAL_VARIANTS[company.legal])
    name = company.name.upper() if rng.random() < 0.1 else company.name
    if not suffix:
        return name
    return f"{name}{suffix}" if suffix.startswith(",") else f"{name} {suffix}"


def _appearance(
    rng: random.Random, p: Person, companies: list[Company], weights: list[float]
) -> dict[str, str]:
    first, last = p.first, p.last
    r = rng.random()
    if r < 0.15:
        nicks = sorted(_NICK.nicknames_of(first.lower()))
        if nicks:
            first = rng.choice(nicks).capitalize()
    elif r < 0.19:
        first = first[0] + "."
    elif r < 0.24:
        first = _typo(rng, first)
    if rng.random() < 0.05:
        last = _typo(rng, last)
    if rng.random() < 0.5:
        first, last = _ascii(first), _ascii(last)
    if rng.random() < 0.02:
        first, last = last, first
    if rng.random() < 0.03:
        first = ""
    company_idx = p.company
    work = p.work
    if company_idx is not None and rng.random() < 0.08:  # changed jobs since
        company_idx = rng.choices(range(len(companies)), cum_weights=weights)[0]
        work = f"{_local(rng, p.first, p.last)}@{companies[company_idx].domain}"
    options = [e for e in (p.personal, work) if e]
    email = rng.choice(options) if options and rng.random() < 0.88 else ""
    if email.endswith("@gmail.com") and rng.random() < 0.25:
        local = email.split("@")[0]
        if rng.random() < 0.5 and len(local) > 3:
            local = local[:2] + "." + local[2:]
        else:
            local = f"{local}+{rng.choice(('news', 'crm', 'shop'))}"
        email = f"{local}@gmail.com"
    phone = ""
    if rng.random() < 0.65:
        if company_idx is not None and (p.mobile is None or rng.random() < 0.25):
            phone = companies[company_idx].switchboard
        elif p.mobile:
            phone = p.mobile
    company = ""
    if company_idx is not None and rng.random() < 0.75:
        company = _company_text(rng, companies[company_idx])
    city = p.city if rng.random() < 0.5 else ""
    return {
        "source": rng.choice(SOURCES),
        "first_name": first,
        "last_name": last,
        "email": email,
        "phone": phone,
        "company": company,
        "city": city,
    }


def generate(n: int, seed: int = 1) -> list[dict[str, str]]:
    """About `n` contact rows (exactly n) with ground-truth `cluster` ids, shuffled."""
    rng = random.Random(seed)
    companies = _companies(rng, max(5, n // 25))
    weights = list(itertools.accumulate(1.0 / (r + 1) ** 0.9 for r in range(len(companies))))
    rows: list[dict[str, str]] = []
    person_id = 0
    used: set[str] = set()
    while len(rows) < n:
        person = _person(rng, companies, weights, used)
        copies = rng.choices((2, 3, 4), (0.5, 0.33, 0.17))[0]
        for _ in range(min(copies, n - len(rows))):
            row = _appearance(rng, person, companies, weights)
            row["cluster"] = str(person_id)
            rows.append(row)
        person_id += 1
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["unique_id"] = str(i)
    return rows
