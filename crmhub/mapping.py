"""Declarative mappings: one TOML file per connector kind turns raw payloads into the model.

Format (see mappings/README.md for the full reference)::

    version = 1
    connector = "jsonl"

    [contacts]
    external_id = "submission_id"       # path into the payload
    updated_at = "submitted_at"
    attributes = "rest"                 # unmapped top-level keys land in attributes
    [contacts.fields]
    email = { path = "fields.email", transform = ["strip"] }
    full_name = "fields.name"
    phone = { path = "fields.phone" }
    "attributes.utm_source" = "utm.source"

    [activities]
    external_id = "submission_id"
    [activities.fields]
    type = { const = "form_submission" }
    occurred_at = { path = "submitted_at", transform = ["parse_datetime"] }

A path is dotted (`a.b`), `[n]` indexes a list, and a key that exists verbatim wins (CSV
headers such as `First Name`). A field is a path, or a table with `path` or `paths`
(several values), `const`, `default`, `transform` (names, or tables with arguments) and
`when = { path, in }` (map the field only while another value is one of `in`).
`canonical = true` maps columns named like canonical fields without listing them.

Values are normalised after mapping whatever the file says: emails validated and lowercased,
phones to E.164, dates parsed. A bad value is dropped and reported; the record is kept.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from crmhub.errors import MappingError
from crmhub.records import Activity, Contact
from crmhub.transforms import (
    TRANSFORMS,
    normalise_consent,
    normalise_email,
    normalise_phone,
    parse_date,
    parse_datetime,
    split_name,
)

__all__ = [
    "BUILTIN_MAPPINGS",
    "FieldIssue",
    "Mapped",
    "Mapping",
    "canonical_column",
    "content_hash",
    "json_text",
    "load_mapping",
    "mapping_path_for",
    "record_data",
]

BUILTIN_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
if not BUILTIN_MAPPINGS.is_dir():  # installed from a wheel
    BUILTIN_MAPPINGS = Path(__file__).resolve().parent / "_mappings"

_CONTACT_TARGETS = set(Contact.model_fields) | {"email", "phone"}
_ACTIVITY_TARGETS = set(Activity.model_fields) | {"participant"}
_SECTION_KEYS = {"external_id", "updated_at", "attributes", "canonical", "fields", "when"}
_INDEX = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_MISSING = object()


@dataclass(frozen=True, slots=True)
class FieldIssue:
    """A value that was dropped from an otherwise good record."""

    field: str
    reason: str


@dataclass(slots=True)
class Mapped:
    """The result of mapping one payload."""

    external_id: str | None
    updated_at: datetime | None
    record: Contact | Activity
    issues: list[FieldIssue] = field(default_factory=list)


@lru_cache(maxsize=4096)
def canonical_column(header: str) -> str:
    """'First Name' -> 'first_name', the spelling used to recognise canonical CSV headers."""
    return re.sub(r"[^a-z0-9]+", "_", header.strip().lower()).strip("_")


def _compile_path(path: str) -> tuple[str, tuple[str | int, ...]]:
    parts: list[str | int] = []
    for name, index in _INDEX.findall(path):
        parts.append(int(index) if index else name)
    return path, tuple(parts)


def _get(payload: Any, path: tuple[str, tuple[str | int, ...]]) -> Any:
    verbatim, parts = path
    if isinstance(payload, dict) and verbatim in payload:
        return payload[verbatim]
    current = payload
    for part in parts:
        if isinstance(part, int):
            if not isinstance(current, list) or part >= len(current):
                return _MISSING
            current = current[part]
        elif isinstance(current, dict) and part in current:
            current = current[part]
        else:
            return _MISSING
    return current


@dataclass(slots=True)
class _FieldSpec:
    target: str
    paths: list[tuple[str, tuple[str | int, ...]]]
    many: bool = False
    const: Any = _MISSING
    default: Any = _MISSING
    transforms: list[tuple[str, Callable[..., Any], dict[str, Any]]] = field(default_factory=list)
    # `when = { path, in }`: the field maps only while the value at `path` is one of `in`.
    when: tuple[tuple[str, tuple[str | int, ...]], frozenset[str]] | None = None

    def extract(self, payload: Any) -> Any:
        if self.when is not None and str(_get(payload, self.when[0])) not in self.when[1]:
            return None
        if self.const is not _MISSING:
            return self.const
        if self.many:
            values = [_get(payload, p) for p in self.paths]
            flat: list[Any] = []
            for v in values:
                if isinstance(v, list):
                    flat.extend(v)
                elif v is not _MISSING and v not in (None, ""):
                    flat.append(v)
            value: Any = flat or _MISSING
        else:
            value = _get(payload, self.paths[0]) if self.paths else _MISSING
        if value is _MISSING or value is None or value == "":
            return None if self.default is _MISSING else self.default
        for _name, fn, kwargs in self.transforms:
            if value is None:
                break
            value = fn(value, **kwargs)
        return value


@dataclass(slots=True)
class _Section:
    kind: str
    external_id: _FieldSpec | None
    updated_at: _FieldSpec | None
    fields: list[_FieldSpec]
    canonical: bool = False
    rest_to_attributes: bool = False
    used_roots: set[str] = field(default_factory=set)


class Mapping:
    """A compiled mapping file. `map_contact` / `map_activity` never raise for bad values."""

    def __init__(self, path: Path, contacts: _Section | None, activities: _Section | None):
        self.path = path
        self.contacts = contacts
        self.activities = activities

    @property
    def name(self) -> str:
        return self.path.name

    # -- contacts -----------------------------------------------------------------
    def map_contact(self, payload: dict[str, Any], region: str = "US") -> Mapped:
        """Map a payload to a `Contact`. Raises `ValueError` only when nothing usable is left."""
        section = self.contacts
        if section is None:
            raise ValueError(f"{self.name} has no [contacts] section")
        issues: list[FieldIssue] = []
        data: dict[str, Any] = {}
        attributes: dict[str, Any] = {}
        if section.canonical:
            for key, value in payload.items():
                column = canonical_column(key)
                if value in (None, ""):
                    continue
                if column in _CONTACT_TARGETS and column not in ("attributes",):
                    data.setdefault(column, value)
                elif column not in ("id", "updated_at", "external_id"):
                    attributes[key] = value
        for spec in section.fields:
            try:
                value = spec.extract(payload)
            except (ValueError, TypeError) as exc:
                issues.append(FieldIssue(spec.target, str(exc)))
                continue
            if value is None:
                continue
            if spec.target.startswith("attributes."):
                attributes[spec.target[len("attributes.") :]] = value
            elif spec.target == "full_name" and isinstance(value, dict):
                data.update({k: v for k, v in value.items() if v})
            else:
                data[spec.target] = value
        if section.rest_to_attributes:
            for key, value in payload.items():
                if key not in section.used_roots and value not in (None, "", [], {}):
                    attributes.setdefault(key, value)
        contact = _build_contact(data, attributes, region, issues)
        return Mapped(
            self._external_id(section, payload),
            self._updated_at(section, payload, issues),
            contact,
            issues,
        )

    # -- activities ---------------------------------------------------------------
    def map_activity(self, payload: dict[str, Any]) -> Mapped:
        """Map a payload to an `Activity`; raises `ValueError` when a required field is bad."""
        section = self.activities
        if section is None:
            raise ValueError(f"{self.name} has no [activities] section")
        issues: list[FieldIssue] = []
        data: dict[str, Any] = {}
        attributes: dict[str, Any] = {}
        participants: list[str] = []
        for spec in section.fields:
            try:
                value = spec.extract(payload)
            except (ValueError, TypeError) as exc:
                if spec.target in ("type", "occurred_at"):
                    raise ValueError(f"field '{spec.target}': {exc}") from None
                issues.append(FieldIssue(spec.target, str(exc)))
                continue
            if value is None:
                continue
            if spec.target.startswith("attributes."):
                attributes[spec.target[len("attributes.") :]] = value
            elif spec.target in ("participants", "participant"):
                for raw in value if isinstance(value, list) else [value]:
                    try:
                        participants.append(normalise_email(str(raw)))
                    except ValueError as exc:
                        issues.append(FieldIssue("participants", str(exc)))
            else:
                data[spec.target] = value
        if section.rest_to_attributes:
            for key, value in payload.items():
                if key not in section.used_roots and value not in (None, "", [], {}):
                    attributes.setdefault(key, value)
        data["participants"] = list(dict.fromkeys(participants))
        data["attributes"] = attributes
        if "occurred_at" in data and not isinstance(data["occurred_at"], datetime):
            data["occurred_at"] = parse_datetime(data["occurred_at"])
        if isinstance(data.get("excerpt"), str):
            data["excerpt"] = data["excerpt"][:500]
        try:
            activity = Activity.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"field '{loc}': {first['msg']}") from None
        return Mapped(
            self._external_id(section, payload),
            self._updated_at(section, payload, issues),
            activity,
            issues,
        )

    @staticmethod
    def _external_id(section: _Section, payload: dict[str, Any]) -> str | None:
        if section.external_id is None:
            return None
        value = section.external_id.extract(payload)
        return None if value in (None, "") else str(value)

    @staticmethod
    def _updated_at(
        section: _Section, payload: dict[str, Any], issues: list[FieldIssue]
    ) -> datetime | None:
        if section.updated_at is None:
            return None
        try:
            value = section.updated_at.extract(payload)
            return None if value is None else parse_datetime(value)
        except ValueError as exc:
            issues.append(FieldIssue("updated_at", str(exc)))
            return None


def _clean_emails(values: list[Any], issues: list[FieldIssue], target: str) -> list[str]:
    out: list[str] = []
    for raw in values:
        for part in str(raw).replace(";", ",").split(","):
            if not part.strip():
                continue
            try:
                email = normalise_email(part)
            except ValueError as exc:
                issues.append(FieldIssue(target, f"{exc} (value dropped)"))
                continue
            if email not in out:
                out.append(email)
    return out


def _clean_phones(
    values: list[Any], region: str, issues: list[FieldIssue], target: str
) -> list[str]:
    out: list[str] = []
    for raw in values:
        try:
            phone = normalise_phone(str(raw), region)
        except ValueError as exc:
            issues.append(FieldIssue(target, f"{exc} (value dropped)"))
            continue
        if phone not in out:
            out.append(phone)
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _build_contact(
    data: dict[str, Any], attributes: dict[str, Any], region: str, issues: list[FieldIssue]
) -> Contact:
    emails = _clean_emails(
        _as_list(data.pop("email", None)) + _as_list(data.pop("emails", None)), issues, "email"
    )
    phones = _clean_phones(
        _as_list(data.pop("phone", None)) + _as_list(data.pop("phones", None)),
        region,
        issues,
        "phone",
    )
    for key, value in list(data.items()):
        if isinstance(value, str):
            value = " ".join(value.split())
            data[key] = value or None
    if data.get("birth_date") is not None and not isinstance(data["birth_date"], date):
        try:
            data["birth_date"] = parse_date(data["birth_date"])
        except ValueError as exc:
            issues.append(FieldIssue("birth_date", f"{exc} (value dropped)"))
            data.pop("birth_date")
    if data.get("consent") is not None:
        try:
            data["consent"] = normalise_consent(data["consent"])
        except ValueError as exc:
            issues.append(FieldIssue("consent", f"{exc} (value dropped)"))
            data.pop("consent")
    if data.get("consent") in (None, "unknown"):
        data.pop("consent_at", None)  # a date with no status says nothing (a form without a box)
    for key in ("consent_at", "source_created_at", "source_updated_at"):
        if data.get(key) is not None:
            try:
                data[key] = parse_datetime(data[key])
            except ValueError as exc:
                issues.append(FieldIssue(key, f"{exc} (value dropped)"))
                data.pop(key)
    if data.get("full_name") and not (data.get("first_name") or data.get("last_name")):
        data.update({k: v for k, v in split_name(data["full_name"]).items() if v})
    if not data.get("full_name") and (data.get("first_name") or data.get("last_name")):
        data["full_name"] = " ".join(
            p for p in (data.get("first_name"), data.get("last_name")) if p
        )
    data["emails"] = emails
    data["phones"] = phones
    data["attributes"] = attributes
    while True:
        try:
            return Contact.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                key = str(err["loc"][0])
                issues.append(FieldIssue(key, f"{err['msg']} (value dropped)"))
                data.pop(key, None)


# -- loading ----------------------------------------------------------------------------


def _compile_transforms(raw: Any, where: str, problems: list[str]) -> list[Any]:
    steps = []
    for item in _as_list(raw):
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            kwargs = {k: v for k, v in item.items() if k != "name"}
            name = item["name"]
        else:
            problems.append(
                f"{where}: a transform is a name or {{ name = ..., ... }}, got {item!r}"
            )
            continue
        fn = TRANSFORMS.get(name)
        if fn is None:
            problems.append(
                f"{where}: unknown transform '{name}' (known: {', '.join(sorted(TRANSFORMS))})"
            )
            continue
        steps.append((name, fn, kwargs))
    return steps


def _compile_field(target: str, raw: Any, where: str, problems: list[str]) -> _FieldSpec | None:
    if isinstance(raw, str):
        return _FieldSpec(target, [_compile_path(raw)])
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a path or a table, got {raw!r}")
        return None
    unknown = set(raw) - {"path", "paths", "const", "default", "transform", "when"}
    if unknown:
        problems.append(f"{where}: unknown option(s) {', '.join(sorted(unknown))}")
    spec = _FieldSpec(target, [])
    if "paths" in raw:
        spec.paths = [_compile_path(p) for p in _as_list(raw["paths"])]
        spec.many = True
    elif "path" in raw:
        spec.paths = [_compile_path(raw["path"])]
    elif "const" not in raw:
        problems.append(f"{where}: needs one of path, paths or const")
    spec.const = raw.get("const", _MISSING)
    spec.default = raw.get("default", _MISSING)
    spec.transforms = _compile_transforms(raw.get("transform"), where, problems)
    if "when" in raw:
        spec.when = _compile_when(raw["when"], where, problems)
    return spec


def _compile_when(
    raw: Any, where: str, problems: list[str]
) -> tuple[tuple[str, tuple[str | int, ...]], frozenset[str]] | None:
    values = raw.get("in") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or set(raw) != {"path", "in"}
        or not isinstance(raw["path"], str)
        or not isinstance(values, list)
        or not values
    ):
        problems.append(
            f'{where}.when: expected {{ path = "...", in = ["value", ...] }}, got {raw!r}'
        )
        return None
    return _compile_path(raw["path"]), frozenset(str(v) for v in values)


def _compile_section(
    kind: str, raw: Any, targets: set[str], file: str, problems: list[str]
) -> _Section | None:
    if raw is None:
        return None
    name = "contacts" if kind == "contact" else "activities"
    if not isinstance(raw, dict):
        problems.append(f"[{name}] must be a table")
        return None
    for key in set(raw) - _SECTION_KEYS:
        problems.append(
            f"[{name}]: unknown key '{key}' (known: {', '.join(sorted(_SECTION_KEYS))})"
        )
    section = _Section(
        kind=kind,
        external_id=_compile_field(
            "external_id", raw["external_id"], f"[{name}].external_id", problems
        )
        if "external_id" in raw
        else None,
        updated_at=_compile_field("updated_at", raw["updated_at"], f"[{name}].updated_at", problems)
        if "updated_at" in raw
        else None,
        fields=[],
        canonical=bool(raw.get("canonical", False)),
        rest_to_attributes=raw.get("attributes") == "rest",
    )
    if raw.get("attributes") not in (None, "rest", "none"):
        problems.append(f'[{name}].attributes: use "rest" or "none"')
    for target, spec_raw in (raw.get("fields") or {}).items():
        where = f"[{name}.fields].{target}"
        if target not in targets and not target.startswith("attributes."):
            problems.append(f"{where}: unknown target field (known: {', '.join(sorted(targets))})")
            continue
        spec = _compile_field(target, spec_raw, where, problems)
        if spec is not None:
            section.fields.append(spec)
    for spec in [*section.fields, section.external_id, section.updated_at]:
        for verbatim, parts in spec.paths if spec else []:
            section.used_roots.add(verbatim)
            if parts:
                section.used_roots.add(str(parts[0]))
    if kind == "activity" and section.fields:
        given = {s.target for s in section.fields}
        for required in ("type", "occurred_at"):
            if required not in given:
                problems.append(f"[activities.fields]: required target '{required}' is missing")
    return section


def load_mapping(path: Path) -> Mapping:
    """Read and compile a mapping file, reporting every problem in it at once."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MappingError(f"mapping file {path} not found", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{path}: not valid TOML: {exc}", path=str(path)) from None
    problems: list[str] = []
    if raw.get("version", 1) != 1:
        problems.append(f"version: only version = 1 is understood, got {raw.get('version')!r}")
    for key in set(raw) - {"version", "connector", "contacts", "activities", "description"}:
        problems.append(f"unknown top-level key '{key}'")
    contacts = _compile_section(
        "contact", raw.get("contacts"), _CONTACT_TARGETS, str(path), problems
    )
    activities = _compile_section(
        "activity", raw.get("activities"), _ACTIVITY_TARGETS, str(path), problems
    )
    if contacts is None and activities is None:
        problems.append("needs a [contacts] or an [activities] section")
    if problems:
        raise MappingError(f"{path}: invalid mapping", path=str(path), problems=problems)
    return Mapping(path, contacts, activities)


def mapping_path_for(
    kind: str, override: Path | None = None, extra_dir: Path | None = None
) -> Path:
    """The mapping file for a connector: its override, else `<extra_dir>/<kind>.toml`, else
    the shipped `mappings/<kind>.toml`."""
    if override is not None:
        return override
    if extra_dir is not None and (extra_dir / f"{kind}.toml").exists():
        return extra_dir / f"{kind}.toml"
    return BUILTIN_MAPPINGS / f"{kind}.toml"


def json_text(value: Any) -> str:
    """A value as the store's JSON columns hold it (what their bind processors write)."""
    return orjson.dumps(value, default=str).decode()


def content_hash(payload: Any) -> str:
    """A stable digest of a payload, so re-staging an unchanged record is a no-op."""
    blob = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def record_data(record: Contact | Activity) -> dict[str, Any]:
    """The JSON the store keeps for a mapped record: set fields only (model_dump is slower)."""
    out: dict[str, Any] = {}
    for name, value in record.__dict__.items():
        if (
            value is None
            or value == []
            or value == {}
            or (name == "consent" and value == "unknown")
        ):
            continue
        out[name] = value.isoformat() if isinstance(value, date) else value
    return out
