"""Write-back detection: which golden-record changes the connected tools must hear about.

Called inside the transaction that changes golden records (`sync.golden.recompute_goldens`)
or erases a person (`enqueue_erasure`, for `crmhub forget`), so the change and its outbox
rows commit together. Delivery is `sync.outbox.relay`.

Echo suppression: `writeback_ledger` keeps, per (recipient, golden record, field), a hash
of the value last delivered. A recipient is never told a value it was already told, and a
golden value whose winning record comes from a tool that was told exactly that value is our
own echo, not a new change: nothing is enqueued for it, so nothing loops.

Consent: only opt-outs are pushed. A golden record lifted back to "subscribed" by an explicit
later consent (dedupe.survivorship) pushes nothing: re-subscribing someone a tool has as
unsubscribed is the tool's own (double opt-in) business. A tool once told "unsubscribed" is
told again only if its own record shows an explicit re-subscription (subscribed, with a
consent_at) after that push and the golden record has since gone back to "unsubscribed".
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, select

from connectors.base import WriteBackConfig
from crmhub.errors import SettingsError
from crmhub.settings import Settings
from sync.store import golden_record, membership, one_of, outbox, source_record, writeback_ledger

__all__ = [
    "Plan",
    "can_write_back",
    "enqueue",
    "enqueue_erasure",
    "golden_changed",
    "install",
    "plan_for",
    "plan_from_settings",
    "resend_erasure",
    "value_hash",
]

ERASED = "erased"  # the ledger's field name for "this recipient got the erasure"


@dataclass(frozen=True)
class Plan:
    """The connectors with write-back switched on, and what each may receive."""

    targets: dict[str, WriteBackConfig] = field(default_factory=dict)

    def wants(self, connector: str, action: str) -> bool:
        config = self.targets.get(connector)
        if config is None:
            return False
        if action == "consent":
            return config.consent
        if action == "erase":
            return config.erasure
        return bool(config.fields)


def plan_from_settings(settings: Settings) -> Plan:
    """Validate every `writeback` table: the connector must be able to write those fields."""
    from sync.sources import configured_sources, load_source

    targets: dict[str, WriteBackConfig] = {}
    for name in configured_sources(settings):
        if "writeback" not in settings.connectors[name]:
            continue
        source = load_source(settings, name)
        config: WriteBackConfig | None = getattr(source.config, "writeback", None)
        if config is None or not config.enabled:
            continue
        key = f"connectors.{name}.writeback"
        if not can_write_back(source.connector_cls):
            raise SettingsError(
                f"[{key}]: connector kind {source.connector_cls.kind!r} cannot write back",
                key=key,
            )
        writable: frozenset[str] = getattr(source.connector_cls, "writable_fields", frozenset())
        unknown = sorted(set(config.fields) - writable)
        if unknown:
            can = ", ".join(sorted(writable))
            raise SettingsError(
                f"[{key}] fields: {', '.join(unknown)} cannot be written to "
                f"{source.connector_cls.kind} (writable: {can})",
                key=f"{key}.fields",
            )
        targets[name] = config
    return Plan(targets)


def can_write_back(cls: type[Any]) -> bool:
    """True when a connector class implements the `WriteBack` protocol."""
    return all(callable(getattr(cls, m, None)) for m in ("push_consent", "update_fields", "erase"))


_PLANS: weakref.WeakKeyDictionary[Engine, Plan] = weakref.WeakKeyDictionary()


def install(db: Engine, settings: Settings) -> Plan:
    """Switch detection on for transactions on `db` (SyncEngine does this once)."""
    plan = plan_from_settings(settings)
    _PLANS[db] = plan
    return plan


def plan_for(conn: Connection) -> Plan | None:
    plan = _PLANS.get(conn.engine)
    return plan if plan is not None and plan.targets else None


def value_hash(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, default=str)).hexdigest()


def _field_value(fields: dict[str, Any], name: str) -> Any:
    if name == "phone":
        phones = fields.get("phones") or []
        return phones[0] if phones else None
    if name == "email":
        emails = fields.get("emails") or []
        return emails[0] if emails else None
    value = fields.get(name)
    return None if value in ("", None) else value


def enqueue(
    conn: Connection,
    *,
    connector: str,
    action: str,
    golden_id: int | None,
    payload: dict[str, Any],
    dedupe_key: str,
    now: datetime | None = None,
) -> bool:
    """Add one outbox row unless the same push is already pending. True if added."""
    pending = conn.execute(
        select(outbox.c.id).where(outbox.c.dedupe_key == dedupe_key, outbox.c.status == "pending")
    ).first()
    if pending is not None:
        return False
    now = now or datetime.now(UTC)
    conn.execute(
        outbox.insert().values(
            connector=connector,
            action=action,
            golden_id=golden_id,
            dedupe_key=dedupe_key,
            payload=payload,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    return True


def _ledger(
    conn: Connection, golden_ids: list[int]
) -> tuple[dict[tuple[str, int, str], str], dict[tuple[str, int], datetime]]:
    """What each recipient was told: value hashes, and when it was last told its consent."""
    rows = conn.execute(
        select(
            writeback_ledger.c.connector,
            writeback_ledger.c.golden_id,
            writeback_ledger.c.field,
            writeback_ledger.c.value_hash,
            writeback_ledger.c.pushed_at,
        ).where(one_of(conn, writeback_ledger.c.golden_id, golden_ids))
    )
    told: dict[tuple[str, int, str], str] = {}
    consent_at: dict[tuple[str, int], datetime] = {}
    for c, g, f, h, at in rows:
        told[(c, g, f)] = h
        if f == "consent":
            consent_at[(c, g)] = at
    return told, consent_at


def _resubscribed_since(data: dict[str, Any], pushed_at: datetime | None) -> bool:
    """The tool's own record holds an explicit opt-in given after our last consent push."""
    given = data.get("consent_at")
    if pushed_at is None or data.get("consent") != "subscribed" or not given:
        return False
    at = datetime.fromisoformat(str(given))
    return (at if at.tzinfo else at.replace(tzinfo=UTC)) > pushed_at


def golden_changed(
    conn: Connection,
    new_fields: dict[int, dict[str, Any]],
    lineage: dict[int, dict[str, int]],
    now: datetime | None = None,
) -> int:
    """Enqueue the pushes that golden records' new fields call for; returns rows added.

    Each recipient is a member record of the golden record from a write-back connector whose
    own value differs from the golden value and that was not told that value already.
    """
    plan = plan_for(conn)
    if plan is None or not new_fields:
        return 0
    ids = sorted(new_fields)
    members = conn.execute(
        select(
            membership.c.golden_id,
            source_record.c.id,
            source_record.c.source,
            source_record.c.external_id,
            source_record.c.data,
        )
        .join(source_record, source_record.c.id == membership.c.record_id)
        .where(
            one_of(conn, membership.c.golden_id, ids),
            source_record.c.deleted == 0,
            source_record.c.kind == "contact",
        )
    ).all()
    source_of = {rid: source for _, rid, source, _, _ in members}
    told, consent_pushed = _ledger(conn, ids)
    added = 0
    for golden_id, _rid, source, external_id, data in members:
        config = plan.targets.get(source)
        if config is None:
            continue
        fields = new_fields[golden_id]
        email = _field_value(data, "email") or _field_value(fields, "email")
        who = {"email": email, "external_id": external_id}
        unsubscribed = value_hash("unsubscribed")
        if (
            config.consent
            and fields.get("consent") == "unsubscribed"
            and data.get("consent") != "unsubscribed"
            and (
                told.get((source, golden_id, "consent")) != unsubscribed
                or _resubscribed_since(data, consent_pushed.get((source, golden_id)))
            )
        ):
            added += enqueue(
                conn,
                connector=source,
                action="consent",
                golden_id=golden_id,
                payload={**who, "status": "unsubscribed"},
                dedupe_key=f"consent:{source}:{external_id}",
                now=now,
            )
        push: dict[str, Any] = {}
        for name in config.fields:
            value = _field_value(fields, name)
            if value is None or value == _field_value(data, name):
                continue
            digest = value_hash(value)
            if told.get((source, golden_id, name)) == digest:
                continue  # already told this recipient exactly this
            winner = source_of.get(lineage.get(golden_id, {}).get(name, -1))
            if winner is not None and told.get((winner, golden_id, name)) == digest:
                continue  # the value is our own push read back: an echo, not a change
            push[name] = value
        if push:
            added += enqueue(
                conn,
                connector=source,
                action="fields",
                golden_id=golden_id,
                payload={**who, "fields": push},
                dedupe_key=f"fields:{source}:{external_id}:{value_hash(push)}",
                now=now,
            )
    return added


def _identity_key(email: str | None, external_id: str | None) -> str:
    # A hash, not the address: dedupe keys are listed by `crmhub outbox`.
    return value_hash((email or "").strip().lower() or f"id:{external_id}")[:32]


def resend_erasure(
    conn: Connection,
    connector: str,
    *,
    email: str | None,
    external_id: str | None,
    golden_id: int | None = None,
    plan: Plan | None = None,
    now: datetime | None = None,
) -> bool:
    """Tell `connector` (again) to erase one person: for a suppressed person who showed up
    in a later pull of that tool (the suppression check calls this). True if enqueued."""
    plan = plan or plan_for(conn)
    if plan is None or not plan.wants(connector, "erase"):
        return False
    return enqueue(
        conn,
        connector=connector,
        action="erase",
        golden_id=golden_id,
        payload={"email": email, "external_id": external_id},
        dedupe_key=f"erase:{connector}:{_identity_key(email, external_id)}",
        now=now,
    )


def enqueue_erasure(
    conn: Connection, golden_id: int, *, plan: Plan | None = None, now: datetime | None = None
) -> int:
    """Enqueue the erasure of golden record `golden_id` to every write-back tool that holds
    or was told about the person. Call in the `forget` transaction BEFORE its source records
    are deleted (their ids and emails address the vendor calls). Returns rows added."""
    plan = plan or plan_for(conn)
    if plan is None:
        return 0
    while True:  # an alias erases its survivor
        row = conn.execute(
            select(golden_record.c.merged_into, golden_record.c.fields).where(
                golden_record.c.id == golden_id
            )
        ).first()
        if row is None or row.merged_into is None:
            break
        golden_id = int(row.merged_into)
    golden_fields: dict[str, Any] = dict(row.fields) if row is not None else {}
    added = 0
    reached: set[str] = set()
    members = conn.execute(
        select(source_record.c.source, source_record.c.external_id, source_record.c.data)
        .join(membership, membership.c.record_id == source_record.c.id)
        .where(membership.c.golden_id == golden_id, source_record.c.kind == "contact")
    ).all()
    for source, external_id, data in members:
        if plan.wants(source, "erase"):
            reached.add(source)
            email = _field_value(data, "email") or _field_value(golden_fields, "email")
            added += resend_erasure(
                conn,
                source,
                email=email,
                external_id=external_id,
                golden_id=golden_id,
                plan=plan,
                now=now,
            )
    # Tools we disclosed the person to without holding a record of theirs (Art. 19 ledger).
    disclosed = conn.execute(
        select(writeback_ledger.c.connector)
        .where(writeback_ledger.c.golden_id == golden_id)
        .distinct()
    ).scalars()
    for connector in disclosed:
        if connector not in reached and plan.wants(connector, "erase"):
            added += resend_erasure(
                conn,
                connector,
                email=_field_value(golden_fields, "email"),
                external_id=None,
                golden_id=golden_id,
                plan=plan,
                now=now,
            )
    return added
