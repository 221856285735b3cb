"""The connector extension point: subclass `Connector`, register it, yield `Page`s.

A new source kind is one module, `connectors/<kind>.py`::

    @register("acme", label="Acme Forms")
    class AcmeConnector(Connector["AcmeConnector.Config"]):
        class Config(ConnectorConfig):
            token: SecretStr

        streams = frozenset({"contacts"})

        async def pull(self, stream, cursor):
            ...
            yield Page(records, next_cursor)

plus `mappings/acme.toml`, which maps its payloads into the canonical model.

A source-side merge ("contact X is now Y") is reported as `merged(X, Y)`, a deletion that
names its survivor (sync/aliases.py makes X an alias of Y). A connector whose config derives
from `FullScanConfig` lists every contact on a `--full` run, so the engine infers deletions
from what it did not list, under `max_delete_ratio` (sync/deletions.py).

A connector that can also *write* to its tool (opt-outs, erasures, golden field values; see
docs/connectors.md "Write-back") implements the optional `WriteBack` protocol below. The
outbox relay (sync/outbox.py) is its only caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    Literal,
    Protocol,
    TypeVar,
    runtime_checkable,
)

import httpx
from pydantic import BaseModel, ConfigDict, Field

from crmhub.records import Cursor, Page, RawRecord

if TYPE_CHECKING:
    from crmhub.settings import Settings

__all__ = [
    "Connector",
    "ConnectorConfig",
    "ConnectorContext",
    "FullScanConfig",
    "Recipient",
    "Stream",
    "WriteBack",
    "WriteBackConfig",
    "merged",
    "merged_into",
]

Stream = Literal["contacts", "activities"]


class ConnectorConfig(BaseModel):
    """Options every connector takes; subclasses add their own.

    Unknown keys are rejected. Secrets are `SecretStr` so they never print. Every field has a
    `description` so `crmhub connectors list --json` and the UI can render the form.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="connector kind, e.g. csv, mailbox, hubspot")
    schedule: str | None = Field(None, description="cron expression for background syncs")
    mapping: str | None = Field(None, description="override mapping file (TOML)")
    enabled: bool = Field(True, description="false keeps the table but skips the connector")


class FullScanConfig(ConnectorConfig):
    """The config of a connector whose `--full` run lists every contact the source has, so
    the contacts it no longer lists are deletions (sync/deletions.py)."""

    max_delete_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="largest share of stored contacts a --full run may delete because the "
        "source no longer lists them; above it the run asks for confirmation",
    )


# The key of a deletion's payload that names the survivor of a source-side merge.
_MERGED_INTO = "crmhub:merged_into"


def merged(retired: str, survivor: str, at: datetime | None = None, origin: str = "") -> RawRecord:
    """The source merged contact `retired` into `survivor`: the retired id is gone, as a
    deletion, with a forwarding address (it becomes an alias of the survivor)."""
    return RawRecord(retired, "deletion", {_MERGED_INTO: survivor}, at, origin)


def merged_into(record: RawRecord) -> str | None:
    """The survivor a `merged` record names; None for anything else."""
    if record.kind != "deletion":
        return None
    survivor = record.payload.get(_MERGED_INTO)
    return str(survivor) if survivor else None


class WriteBackConfig(BaseModel):
    """`writeback = { consent = true, erasure = true, fields = [...] }`: what crmhub may push.

    Everything is off by default: a tool is only written to when its owner opted in.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    consent: bool = Field(False, description="push opt-outs (unsubscribes) from other tools")
    erasure: bool = Field(False, description="call the vendor's privacy deletion on erasure")
    fields: list[str] = Field(
        default_factory=list,
        description="golden fields to push when they change (first_name, company, phone ...)",
    )

    @property
    def enabled(self) -> bool:
        return self.consent or self.erasure or bool(self.fields)


@dataclass(frozen=True, slots=True)
class Recipient:
    """One person as one tool knows them: its id for them and/or their email (either may be
    missing; each connector says which it needs)."""

    email: str | None
    external_id: str | None = None


@runtime_checkable
class WriteBack(Protocol):
    """The optional write capability of a connector.

    Contract for every method:
    - Idempotent: the outbox delivers at least once, so a repeat must leave the same state
      (upsert by email or id, the vendors' own GDPR endpoints, Mailchimp's subscriber hash).
    - A person the tool no longer has raises `PermanentError` with `status=404` from
      `push_consent`/`update_fields` (recorded as failed, never retried); `erase` treats
      "already gone" as success.
    - Errors are those of `crmhub.errors`; retries inside one request are the connector's
      (`ApiClient`), retries across minutes are the relay's.
    """

    writable_fields: ClassVar[frozenset[str]]

    async def push_consent(self, who: Recipient, status: Literal["unsubscribed"]) -> None: ...

    async def update_fields(self, who: Recipient, fields: dict[str, Any]) -> None: ...

    async def erase(self, who: Recipient) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What a connector may use besides its config: its instance name, paths, a shared client."""

    name: str
    base_dir: Path
    client: httpx.AsyncClient | None = None
    settings: Settings | None = None
    extras: dict[str, Any] | None = None

    def resolve(self, value: str | Path) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


ConfigT = TypeVar("ConfigT", bound=ConnectorConfig)


class Connector(ABC, Generic[ConfigT]):
    """Base of every source. Set by `@register`: `kind` and `label`."""

    kind: ClassVar[str]
    label: ClassVar[str]
    Config: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    streams: ClassVar[frozenset[Stream]] = frozenset({"contacts"})
    # May the pipeline write several of this connector's pages in one transaction? Yes for
    # vendor-sized pages (APIs page by 100); no where `page_size` is the promised commit batch.
    joins_pages: ClassVar[bool] = False

    def __init__(self, config: ConfigT, context: ConnectorContext) -> None:
        self.config = config
        self.context = context

    @property
    def name(self) -> str:
        return self.context.name

    @property
    def max_delete_ratio(self) -> float | None:
        """The guard on deletions inferred from a full scan; None: this kind infers none."""
        config = self.config
        return config.max_delete_ratio if isinstance(config, FullScanConfig) else None

    async def check(self) -> str:
        """Cheaply prove the source is reachable and the credentials work.

        Returns a one-line human description of what was checked ("3 files, 1,204 rows").
        Raises `AuthError` for refused credentials, `PermanentError`/`ConfigError` for
        anything an operator must fix, `TransientError` when trying again later may help.
        """
        return "ok"

    @abstractmethod
    def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        """Yield the records of `stream` changed since `cursor`, in pages.

        Contract:
        - `cursor` is None on a first or full sync, else a value this connector yielded as
          some page's `next_cursor` earlier; resume right after it.
        - Each `Page.next_cursor` must be safe to store once that page (and every page before
          it) is committed: the engine commits records and cursor in one transaction.
        - Records at the boundary may be yielded again (the store absorbs them); records must
          never be skipped.
        - A record that cannot be parsed goes into `Page.rejects`, it does not stop the pull.
        - Never write to the store, never sleep for retries, never swallow HTTP errors:
          raise the errors from `crmhub.errors` and let the engine and the queue decide.
        """
        raise NotImplementedError
