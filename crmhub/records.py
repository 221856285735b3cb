"""The canonical model every source is mapped into.

`RawRecord` is what a connector yields (source payload + identity); the mapping turns its payload
into a `Contact` or an `Activity`; the store keeps both and folds contacts into `GoldenRecord`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CONTACT_FIELDS",
    "SCALAR_CONTACT_FIELDS",
    "Activity",
    "Consent",
    "Contact",
    "Cursor",
    "GoldenRecord",
    "Page",
    "RawRecord",
    "RecordKind",
]

RecordKind = Literal["contact", "activity", "deletion"]
Consent = Literal["subscribed", "unsubscribed", "pending", "cleaned", "unknown"]
Cursor = dict[str, Any]
"""A connector's opaque resume point; JSON-serialisable, stored per (connector, stream)."""


class Contact(BaseModel):
    """One person as one source knows them. Emails and phones keep their primary first."""

    model_config = ConfigDict(extra="forbid")

    first_name: str | None = None
    last_name: str | None = None
    full_name: str | None = None
    emails: list[str] = Field(default_factory=list)
    phones: list[str] = Field(default_factory=list, description="E.164")
    company: str | None = None
    job_title: str | None = None
    street: str | None = None
    city: str | None = None
    region: str | None = None
    postal_code: str | None = None
    country: str | None = None
    birth_date: date | None = None
    consent: Consent = "unknown"
    # When the source says `consent` was set (an opt-in's or opt-out's own time, not the
    # record's last edit); None when the source does not say. See docs/matching.md#consent.
    consent_at: datetime | None = None
    source_created_at: datetime | None = None
    source_updated_at: datetime | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)

    @property
    def primary_email(self) -> str | None:
        return self.emails[0] if self.emails else None

    @property
    def primary_phone(self) -> str | None:
        return self.phones[0] if self.phones else None

    def has_identity(self) -> bool:
        """True when there is anything to match this person on."""
        return bool(self.emails or self.phones or self.full_name or self.last_name)


class Activity(BaseModel):
    """A touchpoint: an email, a form submission, a campaign event."""

    model_config = ConfigDict(extra="forbid")

    type: str
    occurred_at: datetime
    subject: str | None = None
    excerpt: str | None = Field(default=None, description="short plain-text body excerpt")
    channel: str | None = None
    participants: list[str] = Field(default_factory=list, description="participants' emails")
    thread_id: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


# Field names a canonical CSV header may use, in documentation order.
CONTACT_FIELDS: tuple[str, ...] = (
    "first_name",
    "last_name",
    "full_name",
    "email",
    "phone",
    "company",
    "job_title",
    "street",
    "city",
    "region",
    "postal_code",
    "country",
    "birth_date",
    "consent",
    "consent_at",
)
# consent_at travels with consent (survivorship decides both together), so it is not here.
SCALAR_CONTACT_FIELDS: tuple[str, ...] = (
    "first_name",
    "last_name",
    "full_name",
    "company",
    "job_title",
    "street",
    "city",
    "region",
    "postal_code",
    "country",
    "birth_date",
    "consent",
)


@dataclass(slots=True)
class RawRecord:
    """What a connector yields: one source record, not yet mapped.

    `external_id` is the record's id at the source, unique per (source, kind). A `deletion`
    carries the external id of a contact the source no longer has.
    """

    external_id: str
    kind: RecordKind
    payload: dict[str, Any]
    updated_at: datetime | None = None
    # Where in the source the record came from (file and line), for error messages.
    origin: str = ""

    def __reduce__(self) -> tuple[type[RawRecord], tuple[Any, ...]]:
        # Pages whose payloads marshal refuses cross to the mapping process pickled
        # (`sync.mapping_step._pack_raw`): as constructor arguments a record pickles about
        # three times faster than a slots dataclass's default state.
        state = (self.external_id, self.kind, self.payload, self.updated_at, self.origin)
        return (RawRecord, state)


@dataclass(slots=True)
class Page:
    """A batch of records and the cursor that is safe to store once they are committed."""

    records: list[RawRecord]
    next_cursor: Cursor | None
    # Records the connector could not even parse: (origin, reason, raw text).
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    # Known total for progress bars, when the connector can tell cheaply.
    total_hint: int | None = None


class GoldenRecord(BaseModel):
    """One person across every source: survived fields, all emails/phones, per-field lineage."""

    id: int
    fields: dict[str, Any]
    lineage: dict[str, int] = Field(description="field -> source_record id that supplied it")
    version: int = 1
    members: int = 0
