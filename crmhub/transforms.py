"""Named, pure value transforms used by mapping files, plus the canonical normalisers.

A mapping names transforms as strings (`"strip"`) or tables with arguments
(`{ name = "parse_date", format = "%d/%m/%Y" }`). Every transform takes the value and returns
the new value; `None` passes through. A transform that cannot convert raises `ValueError` with
a message fit for a person, and the mapping reports it against the field.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import PhoneMetadata

__all__ = [
    "TRANSFORMS",
    "Transform",
    "normalise_consent",
    "normalise_email",
    "normalise_phone",
    "parse_date",
    "parse_datetime",
    "split_name",
]

Transform = Callable[..., Any]

# A strict ASCII subset of RFC 5322 addresses: anything it accepts email-validator accepts too,
# so the common case skips the slower full validation.
_SIMPLE_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
# The same with letters and digits of any script before the @ (RFC 6531): "chloé.müller@…".
_INTL_EMAIL = re.compile(
    r"(?:[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*)"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
_E164 = re.compile(r"\+[1-9]\d{6,14}")


def normalise_email(value: str) -> str:
    """Trim, lowercase and validate an address (syntax only, no DNS)."""
    text = value.strip().strip("<>").strip()
    if _SIMPLE_EMAIL.fullmatch(text) and len(text) <= 254:
        return text.lower()
    if _plain_international(text):
        return text.lower()
    try:
        result = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address ({exc})") from None
    return result.normalized.lower()


def _plain_international(text: str) -> bool:
    """An address email-validator accepts as it is: an ASCII domain and, before the @,
    letters and digits of any script (already NFC, as the validator would make them) among
    the ASCII characters an address may hold. Such addresses are common in CRM exports, and
    the full validation takes tens of microseconds each."""
    return (
        _INTL_EMAIL.fullmatch(text) is not None
        and len(text.encode()) <= 254
        and unicodedata.is_normalized("NFC", text)
        and all(c.isascii() or unicodedata.category(c)[0] in "LN" for c in text)
    )


@lru_cache(maxsize=65536)
def normalise_phone(value: str, region: str = "US") -> str:
    """Any written phone number to E.164, using `region` when it has no +country prefix."""
    text = value.strip()
    if not text:
        raise ValueError("empty phone number")
    return _plain_number(text, region.upper()) or _parsed_number(text, region.upper())


def _parsed_number(text: str, region: str) -> str:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise ValueError("not a phone number") from None
    # Most numbers belong to the default region: checking it first skips the search for the
    # number's region (for +1, a walk through two dozen NANP regions).
    if not (
        phonenumbers.is_valid_number_for_region(number, region)
        or phonenumbers.is_valid_number(number)
    ):
        raise ValueError(f"not a valid phone number for region {region}")
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if not _E164.fullmatch(formatted):  # phonenumbers accepts some longer German numbers
        raise ValueError("longer than the 15 digits an E.164 phone number may have")
    return formatted


_SEPARATORS = str.maketrans("", "", " ()-.")
_DIGITS = re.compile(r"\+?[1-9]\d{5,16}")


def _plain_number(text: str, region: str) -> str | None:
    """E.164 for a valid number written as digits and separators only ("+1 212-555-0100",
    "(212) 555-0100" in a NANP region), without `phonenumbers.parse`; None when parsing
    might read it otherwise (a national or international prefix, a leading zero, any other
    character), and for an invalid number, so that such text takes the full path. Most CRM
    phones are written this way, and parsing them is most of a bulk load's phone work."""
    digits = text.translate(_SEPARATORS)
    if not _DIGITS.fullmatch(digits):
        return None
    international = digits[0] == "+"
    if international:
        country_code, national = _split_country_code(digits[1:])
        region_code = phonenumbers.region_code_for_country_code(country_code)
    else:
        country_code, national, region_code = _country_code(region), digits, region
    metadata = PhoneMetadata.metadata_for_region(region_code)
    if country_code == 0 or metadata is None or national[:1] in ("", "0"):
        return None
    if not international and (
        # National: parse may strip the region's own code or its international prefix.
        digits.startswith(str(country_code))
        or (metadata.international_prefix and re.match(metadata.international_prefix, digits))
    ):
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix and re.match(prefix, national):  # parse would consider stripping a prefix
        return None
    number = phonenumbers.PhoneNumber(country_code=country_code, national_number=int(national))
    if not (
        phonenumbers.is_valid_number_for_region(number, region)
        or phonenumbers.is_valid_number(number)
    ):
        return None
    formatted = f"+{country_code}{national}"
    return formatted if _E164.fullmatch(formatted) else None


def _split_country_code(digits: str) -> tuple[int, str]:
    """The country calling code at the start of `digits` (codes are prefix-free) and the rest;
    0 when none is known."""
    for length in (1, 2, 3):
        code = int(digits[:length])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return code, digits[length:]
    return 0, digits


@lru_cache(maxsize=256)
def _country_code(region: str) -> int:
    return int(phonenumbers.country_code_for_region(region))


_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d.%m.%Y", "%Y%m%d")


def parse_date(value: Any, format: str | None = None) -> date:
    """A date from ISO text, or from `format` (strptime) when given."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value).strip()
    formats = (format,) if format else _DATE_FORMATS
    for fmt in formats:
        try:
            return datetime.strptime(text, fmt).date()  # noqa: DTZ007 - a date has no zone
        except ValueError:
            continue
    expected = format or "YYYY-MM-DD"
    raise ValueError(f"date {text!r} does not match {expected}")


def parse_datetime(value: Any, format: str | None = None, tz: str = "UTC") -> datetime:
    """A tz-aware UTC datetime from ISO 8601 text, epoch seconds/millis, or `format`."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 10**11 else value
        return datetime.fromtimestamp(seconds, tz=UTC)
    text = str(value).strip()
    try:
        parsed = (
            datetime.strptime(text, format)  # noqa: DTZ007 - zone applied below
            if format
            else datetime.fromisoformat(text.replace("Z", "+00:00"))
        )
    except ValueError:
        if text.isdigit():
            return parse_datetime(int(text))
        raise ValueError(f"datetime {text!r} does not match {format or 'ISO 8601'}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


_NAME_PARTICLES = {"van", "von", "de", "da", "del", "der", "di", "la", "le", "du", "st", "st."}


def split_name(value: str) -> dict[str, str | None]:
    """'Smith, Bob' / 'Bob van der Berg' / 'Dr. Bob Smith Jr.' -> first and last name."""
    text = " ".join(value.replace("\u00a0", " ").split())
    if not text:
        return {"first_name": None, "last_name": None}
    if "," in text:
        last, _, first = text.partition(",")
        return {"first_name": first.strip() or None, "last_name": last.strip() or None}
    parts = [p for p in text.split(" ") if p.lower().rstrip(".") not in {"mr", "mrs", "ms", "dr"}]
    while len(parts) > 1 and parts[-1].lower().rstrip(".") in {"jr", "sr", "ii", "iii", "phd"}:
        parts.pop()
    if len(parts) == 1:
        return {"first_name": parts[0], "last_name": None}
    cut = len(parts) - 1
    while cut > 1 and parts[cut - 1].lower() in _NAME_PARTICLES:
        cut -= 1
    return {"first_name": " ".join(parts[:cut]), "last_name": " ".join(parts[cut:])}


_CONSENT = {
    "subscribed": "subscribed",
    "opted_in": "subscribed",
    "opt_in": "subscribed",
    "yes": "subscribed",
    "true": "subscribed",
    "1": "subscribed",
    "unsubscribed": "unsubscribed",
    "opted_out": "unsubscribed",
    "opt_out": "unsubscribed",
    "no": "unsubscribed",
    "false": "unsubscribed",
    "0": "unsubscribed",
    "pending": "pending",
    "cleaned": "cleaned",
    "bounced": "cleaned",
    "unknown": "unknown",
    "": "unknown",
}


def normalise_consent(value: Any) -> str:
    key = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _CONSENT:
        raise ValueError(f"unknown consent status {value!r}; use subscribed/unsubscribed/pending")
    return _CONSENT[key]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _fold(value: Any) -> str:
    decomposed = unicodedata.normalize("NFKD", _text(value))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _join(value: Any, sep: str = " ") -> str:
    if isinstance(value, list):
        return sep.join(_text(v).strip() for v in value if v not in (None, ""))
    return _text(value)


def _replace(value: Any, old: str = "", new: str = "") -> str:
    return _text(value).replace(old, new)


def _split(value: Any, sep: str = ",") -> list[str]:
    if isinstance(value, list):
        return value
    return [part.strip() for part in _text(value).split(sep) if part.strip()]


def _map_values(value: Any, **table: Any) -> Any:
    key = _text(value).strip()
    if key in table:
        return table[key]
    if key.lower() in table:
        return table[key.lower()]
    raise ValueError(f"{key!r} is not one of {', '.join(sorted(table))}")


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return next((v for v in value if v not in (None, "")), None)
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    key = _text(value).strip().lower()
    if key in {"1", "true", "yes", "y", "on"}:
        return True
    if key in {"0", "false", "no", "n", "off", ""}:
        return False
    raise ValueError(f"{value!r} is not a yes/no value")


TRANSFORMS: dict[str, Transform] = {
    "strip": _strip,
    "lower": lambda v: _text(v).lower(),
    "upper": lambda v: _text(v).upper(),
    "title": lambda v: _text(v).title(),
    "fold": _fold,
    "digits": lambda v: "".join(ch for ch in _text(v) if ch.isdigit()),
    "email_normalise": lambda v: normalise_email(_text(v)),
    "phone_e164": lambda v, region="US": normalise_phone(_text(v), region),
    "parse_date": parse_date,
    "parse_datetime": parse_datetime,
    "split_name": lambda v: split_name(_text(v)),
    "join": _join,
    "split": _split,
    "replace": _replace,
    "map": _map_values,
    "first": _first,
    "bool": _bool,
    "consent": normalise_consent,
    "str": _text,
}
