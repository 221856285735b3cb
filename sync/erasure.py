"""Erase a person everywhere (right to erasure), keeping only keyed hashes in `suppression`.

`forget` finds the golden record(s) an email, phone or golden id belongs to and deletes the
golden records, their source records (contact rows and everything keyed on them: match keys,
memberships, review items, constraints, field choices), the activities the person took part
in, and dead letters that quote their email. What remains is a keyed hash (HMAC-SHA256 with a
per-store key) of each email, phone and source identity, so a later sync can recognise the
person with `is_suppressed` without the store knowing who they were. The audit entry counts
what was erased and names nobody.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from crmhub.records import Contact
from dedupe.matcher import email_key
from sync import writeback
from sync.review import NotFoundError
from sync.store import (
    activity_participant,
    audit_log,
    dead_letter,
    field_choice,
    golden_record,
    match_key,
    membership,
    source_record,
    store_secret,
    suppression,
    write_transaction,
)

__all__ = ["forget", "is_suppressed", "suppression_hashes"]

log = logging.getLogger(__name__)
_KEY_NAME = "suppression_key"


def _key(conn: Connection, create: bool) -> bytes | None:
    value = conn.execute(
        select(store_secret.c.value).where(store_secret.c.name == _KEY_NAME)
    ).scalar_one_or_none()
    if value is None and create:
        value = secrets.token_hex(32)
        conn.execute(
            store_secret.insert().values(name=_KEY_NAME, value=value, created_at=datetime.now(UTC))
        )
    return bytes.fromhex(value) if value else None


def _digest(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def suppression_hashes(
    key: bytes, source: str | None, external_id: str | None, data: Any
) -> set[str]:
    """The keyed hashes that identify one contact: each email key, each phone, its identity."""
    data = data or {}
    out = {_digest(key, "email", email_key(e)) for e in data.get("emails") or []}
    out |= {_digest(key, "phone", p) for p in data.get("phones") or []}
    if source and external_id:
        out.add(_digest(key, "record", f"{source}\x1f{external_id}"))
    return out


def is_suppressed(conn: Connection, source: str, external_id: str, contact: Contact) -> bool:
    """Whether an incoming contact belongs to an erased person (for the staging step)."""
    key = _key(conn, create=False)
    if key is None:
        return False
    hashes = suppression_hashes(key, source, external_id, contact.model_dump())
    if not hashes:
        return False
    found = conn.execute(
        select(suppression.c.hash).where(suppression.c.hash.in_(sorted(hashes))).limit(1)
    ).first()
    return found is not None


def _goldens_for(conn: Connection, identifier: str) -> set[int]:
    text = identifier.strip()
    if text.lower().startswith("golden:") and text[7:].isdigit():
        golden_id = int(text[7:])
        exists = conn.execute(
            select(golden_record.c.id).where(golden_record.c.id == golden_id)
        ).first()
        return {golden_id} if exists else set()
    if "@" in text:
        condition = (match_key.c.key_kind == "email") & (
            match_key.c.key_value == email_key(text.lower())
        )
    else:
        # Erasure must not guess: the full international number, matched exactly (E.164).
        digits = "".join(ch for ch in text if ch.isdigit())
        if len(digits) < 8:
            return set()
        condition = (match_key.c.key_kind == "phone") & (match_key.c.key_value == f"+{digits}")
    return set(
        conn.execute(
            select(membership.c.golden_id)
            .join(match_key, match_key.c.record_id == membership.c.record_id)
            .where(condition)
        ).scalars()
    )


def _with_aliases(conn: Connection, ids: set[int]) -> set[int]:
    """The golden records `ids` resolve to, and every alias id that resolves to them."""
    from sync.queries import resolve_golden_id

    roots = {r for r in (resolve_golden_id(conn, i) for i in ids) if r is not None}
    out, frontier = set(roots), set(roots)
    while frontier:
        frontier = (
            set(
                conn.execute(
                    select(golden_record.c.id).where(golden_record.c.merged_into.in_(frontier))
                ).scalars()
            )
            - out
        )
        out |= frontier
    return out


def forget(db: Engine, identifier: str, actor: str) -> dict[str, int]:
    """Erase the person behind an email, a phone or `golden:ID`; return what was erased."""
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        goldens = _with_aliases(conn, _goldens_for(conn, identifier))
        if not goldens:
            raise NotFoundError(
                "no person found for that identifier (use an email, a phone or golden:ID)"
            )
        members = conn.execute(
            select(
                source_record.c.id,
                source_record.c.source,
                source_record.c.external_id,
                source_record.c.data,
            )
            .join(membership, membership.c.record_id == source_record.c.id)
            .where(membership.c.golden_id.in_(sorted(goldens)))
        ).all()
        # The connected tools are told too (write-back), from the records still here.
        for golden_id in sorted(goldens):
            writeback.enqueue_erasure(conn, golden_id, now=now)
        key = _key(conn, create=True)
        assert key is not None
        hashes: set[str] = set()
        emails: set[str] = set()
        for m in members:
            hashes |= suppression_hashes(key, m.source, m.external_id, m.data)
            emails |= {email_key(e) for e in (m.data or {}).get("emails") or []}
        record_ids = [int(m.id) for m in members]
        activity_ids = (
            set(
                conn.execute(
                    select(activity_participant.c.record_id).where(
                        activity_participant.c.email_key.in_(sorted(emails))
                    )
                ).scalars()
            )
            if emails
            else set()
        )
        letters = 0
        for email in sorted(emails):
            letters += conn.execute(
                dead_letter.delete().where(func.lower(dead_letter.c.raw).like(f"%{email}%"))
            ).rowcount
        conn.execute(field_choice.delete().where(field_choice.c.golden_id.in_(sorted(goldens))))
        # Deleting source records cascades to match keys, memberships, activities and their
        # participants, review items, constraints and field choices naming those records.
        everything = sorted(set(record_ids) | activity_ids)
        conn.execute(source_record.delete().where(source_record.c.id.in_(everything)))
        conn.execute(
            golden_record.update()
            .where(golden_record.c.id.in_(sorted(goldens)))
            .values(merged_into=None)
        )
        conn.execute(golden_record.delete().where(golden_record.c.id.in_(sorted(goldens))))
        existing = set(
            conn.execute(
                select(suppression.c.hash).where(suppression.c.hash.in_(sorted(hashes)))
            ).scalars()
        )
        new = sorted(hashes - existing)
        if new:
            conn.execute(
                suppression.insert(),
                [{"hash": h, "created_at": now, "created_by": actor} for h in new],
            )
        result = {
            "golden_records": len(goldens),
            "source_records": len(record_ids),
            "activities": len(activity_ids),
            "dead_letters": letters,
            "suppressed": len(new),
        }
        conn.execute(
            audit_log.insert().values(at=now, actor=actor, action="privacy.forget", details=result)
        )
    log.info("erasure by %s: %s", actor, result)
    return result
