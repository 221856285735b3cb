"""The write-back outbox: enqueue in the changing transaction, deliver at least once.

- Enqueue: `enqueue_erasure(conn, golden_id)` (the `forget` command), `resend_erasure`
  (the suppression check), and the golden-record hook (`sync.writeback.golden_changed`,
  called by `recompute_goldens`) all add `outbox` rows in the caller's transaction.
- Deliver: `await relay(settings, db, client)` claims due rows (a lease, so two relays never
  push the same row at once), calls the connector's `WriteBack` method, then marks the row
  sent and records the pushed value's hash in `writeback_ledger`. A crash between the
  vendor's 2xx and that commit leaves the row pending: it is pushed again after the lease,
  which the vendors' idempotent endpoints absorb (at least once, never lost).
- Errors: transient ones (timeouts, 5xx, 429 once the request's own retries are spent) are
  retried with backoff up to MAX_ATTEMPTS; permanent ones (404 contact gone, 400, refused
  credentials) fail the row at once with the reason, for `crmhub outbox` to show.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
from sqlalchemy import Connection, Engine, func, or_, select, update

from connectors.base import Connector, Recipient
from crmhub.errors import AuthError, ConfigError, ConnectorError, PermanentError, TransientError
from crmhub.settings import Settings
from sync.store import outbox, write_transaction, writeback_ledger
from sync.writeback import (
    ERASED,
    Plan,
    can_write_back,
    enqueue,
    enqueue_erasure,
    plan_from_settings,
    resend_erasure,
    value_hash,
)

__all__ = [
    "MAX_ATTEMPTS",
    "RelayReport",
    "disclosures",
    "enqueue",
    "enqueue_erasure",
    "outbox_counts",
    "relay",
    "requeue_failed",
    "resend_erasure",
]

MAX_ATTEMPTS = 8
LEASE = timedelta(minutes=5)
BACKOFF_CAP = timedelta(hours=1)


@dataclass
class RelayReport:
    """What one relay pass did."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed,
            "sent": self.sent,
            "retried": self.retried,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "errors": self.errors,
        }


def backoff(attempts: int) -> timedelta:
    """30 s, 1 min, 2 min ... capped at an hour: the vendor gets time to recover."""
    return min(timedelta(seconds=30 * 2 ** max(0, attempts - 1)), BACKOFF_CAP)


def _claim(db: Engine, limit: int, now: datetime) -> list[Any]:
    with write_transaction(db) as conn:
        rows = conn.execute(
            select(outbox)
            .where(
                outbox.c.status == "pending",
                outbox.c.next_attempt_at <= now,
                or_(outbox.c.locked_until.is_(None), outbox.c.locked_until < now),
            )
            .order_by(outbox.c.id)
            .limit(limit)
        ).all()
        claimed = []
        for row in rows:
            # Compare-and-set: another relay that claimed the row first wins it.
            done = conn.execute(
                update(outbox)
                .where(
                    outbox.c.id == row.id,
                    or_(outbox.c.locked_until.is_(None), outbox.c.locked_until < now),
                )
                .values(locked_until=now + LEASE)
            )
            if done.rowcount == 1:
                claimed.append(row)
        return claimed


def _record_sent(conn: Connection, row: Any, now: datetime) -> None:
    payload = dict(row.payload)
    told: dict[str, Any] = {}
    if row.action == "consent":
        told["consent"] = payload.get("status")
    elif row.action == "fields":
        told.update(payload.get("fields") or {})
    elif row.action == "erase":
        told[ERASED] = True
        payload = {"scrubbed": True}  # the address has done its job; keep no PII
    conn.execute(
        update(outbox)
        .where(outbox.c.id == row.id)
        .values(
            status="sent",
            sent_at=now,
            attempts=row.attempts + 1,
            locked_until=None,
            last_error=None,
            payload=payload,
        )
    )
    if row.golden_id is None:
        return
    for name, value in told.items():
        key = {"connector": row.connector, "golden_id": row.golden_id, "field": name}
        values = {"value_hash": value_hash(value), "pushed_at": now}
        changed = conn.execute(
            update(writeback_ledger)
            .where(*(writeback_ledger.c[k] == v for k, v in key.items()))
            .values(**values)
        )
        if changed.rowcount == 0:
            conn.execute(writeback_ledger.insert().values(**key, **values))


def _redact(text: str, payload: dict[str, Any]) -> str:
    """Vendor paths can hold the address (HubSpot by email): keep it out of stored reasons."""
    email = payload.get("email")
    if isinstance(email, str) and email:
        for form in {email, quote(email, safe=""), quote(email)}:
            text = text.replace(form, "<email>")
    return text


def _record_error(conn: Connection, row: Any, exc: Exception, now: datetime) -> str:
    attempts = row.attempts + 1
    reason = _redact(str(exc), dict(row.payload))[:1000]
    # Refused credentials are the operator's to fix, not a reason to drop an opt-out.
    permanent = not isinstance(exc, (TransientError, AuthError))
    if permanent or attempts >= MAX_ATTEMPTS:
        if isinstance(exc, PermanentError) and exc.context.get("status") == 404:
            reason = f"contact gone at the vendor (404): {reason}"
        elif not permanent:
            reason = f"gave up after {attempts} attempts: {reason}"
        values: dict[str, Any] = {"status": "failed"}
        outcome = "failed"
    else:
        wait = backoff(attempts)
        retry_after = getattr(exc, "context", {}).get("retry_after")
        if isinstance(retry_after, (int, float)):
            wait = max(wait, timedelta(seconds=float(retry_after)))
        values = {"next_attempt_at": now + wait}
        outcome = "retried"
    conn.execute(
        update(outbox)
        .where(outbox.c.id == row.id)
        .values(attempts=attempts, locked_until=None, last_error=reason, **values)
    )
    return outcome


async def _deliver(connector: Any, row: Any) -> None:
    payload = row.payload
    who = Recipient(payload.get("email"), payload.get("external_id"))
    if row.action == "consent":
        await connector.push_consent(who, payload.get("status", "unsubscribed"))
    elif row.action == "fields":
        await connector.update_fields(who, dict(payload.get("fields") or {}))
    elif row.action == "erase":
        await connector.erase(who)
    else:
        raise ConfigError(f"outbox row {row.id}: unknown action {row.action!r}")


async def relay(
    settings: Settings,
    db: Engine,
    client: httpx.AsyncClient | None = None,
    *,
    limit: int = 500,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    after_push: Callable[[int], None] | None = None,
) -> RelayReport:
    """Deliver up to `limit` due outbox rows; the body of the arq job and `crmhub outbox
    relay`. `after_push(row_id)` runs between the vendor's answer and marking the row sent
    (a test hook for the crash window)."""
    if client is None:  # one connection pool for the whole pass, not one per push
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0)) as own:
            return await relay(settings, db, own, limit=limit, now=now, after_push=after_push)
    from sync.sources import load_source

    started = time.monotonic()
    report = RelayReport()
    plan: Plan = plan_from_settings(settings)
    connectors: dict[str, Connector[Any]] = {}

    async def one(row: Any) -> None:
        try:
            if not plan.wants(row.connector, row.action):
                raise ConfigError(
                    f"write-back of {row.action} to {row.connector!r} is not configured "
                    f"(connectors.{row.connector}.writeback)"
                )
            connector = connectors.get(row.connector)
            if connector is None:
                source = load_source(settings, row.connector)
                if not can_write_back(source.connector_cls):
                    raise ConfigError(f"connector {row.connector!r} cannot write back")
                connector = connectors[row.connector] = source.connector(settings, client)
            await _deliver(connector, row)
        except (ConnectorError, ConfigError) as exc:
            with write_transaction(db) as conn:
                outcome = _record_error(conn, row, exc, now())
            if outcome == "failed":
                report.failed += 1
                reason = _redact(str(exc), dict(row.payload))
                where = f"outbox row {row.id} ({row.connector} {row.action})"
                report.errors.append(f"{where}: {reason}")
            else:
                report.retried += 1
            return
        if after_push is not None:
            after_push(row.id)
        with write_transaction(db) as conn:
            _record_sent(conn, row, now())
        report.sent += 1

    async def lane(rows: list[Any]) -> None:
        for row in rows:  # in id order: a tool hears an opt-out before a later erasure
            await one(row)

    # One lane per tool, lanes concurrent: each paces itself under its own rate budget.
    lanes: dict[str, list[Any]] = {}
    for row in _claim(db, limit, now()):
        report.claimed += 1
        lanes.setdefault(row.connector, []).append(row)
    try:
        async with asyncio.TaskGroup() as group:
            for rows in lanes.values():
                group.create_task(lane(rows))
    except BaseExceptionGroup as failed:  # a bug or a kill in one lane: surface it as is
        raise failed.exceptions[0] from None
    report.seconds = time.monotonic() - started
    return report


def outbox_counts(conn: Connection) -> dict[str, int]:
    """Rows per status (pending, sent, failed)."""
    rows = conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status))
    counts = {"pending": 0, "sent": 0, "failed": 0}
    counts.update({status: int(n) for status, n in rows})
    return counts


def requeue_failed(conn: Connection, *, connector: str | None = None) -> int:
    """Put failed rows back in the queue (after fixing a credential or a config)."""
    query = update(outbox).where(outbox.c.status == "failed")
    if connector is not None:
        query = query.where(outbox.c.connector == connector)
    result = conn.execute(
        query.values(status="pending", attempts=0, next_attempt_at=datetime.now(UTC))
    )
    return int(result.rowcount)


def disclosures(conn: Connection, golden_id: int) -> list[dict[str, Any]]:
    """Which tools were told what about a golden record, and when (the Art. 19 record):
    delivered values come from the ledger as hashes, pending and failed pushes from the
    outbox. For the steward UI's golden-record page."""
    told = [
        {"connector": c, "field": f, "status": "sent", "at": at}
        for c, f, at in conn.execute(
            select(
                writeback_ledger.c.connector, writeback_ledger.c.field, writeback_ledger.c.pushed_at
            )
            .where(writeback_ledger.c.golden_id == golden_id)
            .order_by(writeback_ledger.c.pushed_at)
        )
    ]
    open_rows = [
        {"connector": c, "field": a, "status": st, "at": at, "error": err}
        for c, a, st, at, err in conn.execute(
            select(
                outbox.c.connector,
                outbox.c.action,
                outbox.c.status,
                outbox.c.created_at,
                outbox.c.last_error,
            )
            .where(outbox.c.golden_id == golden_id, outbox.c.status != "sent")
            .order_by(outbox.c.id)
        )
    ]
    return told + open_rows
