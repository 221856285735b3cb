"""Local users, their roles, and their credentials: passwords, API tokens, web sessions.

Passwords are argon2id hashes (argon2-cffi). API tokens and session ids are long random
strings, so a SHA-256 of them is enough at rest: a stolen table gives no usable credential,
and a lookup stays one indexed equality. Nothing here logs a credential or a password.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, func, select

from crmhub.errors import CrmHubError
from sync.store import (
    api_token,
    app_user,
    audit_log,
    login_failure,
    web_session,
    write_transaction,
)

__all__ = [
    "ROLES",
    "Role",
    "User",
    "UserError",
    "add_user",
    "authenticate",
    "can",
    "clear_failures",
    "create_session",
    "create_token",
    "end_session",
    "failures_since",
    "list_users",
    "record_failure",
    "session_user",
    "token_user",
]

Role = Literal["viewer", "steward", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "steward", "admin")
_RANK: dict[str, int] = {role: i for i, role in enumerate(ROLES)}
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,100}$")
SESSION_TTL = timedelta(hours=12)
TOKEN_PREFIX = "chm_"

_hasher = PasswordHasher()


class UserError(CrmHubError):
    """A user cannot be created or used as asked (bad name, role, duplicate, unknown)."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    role: Role

    def can(self, needed: Role) -> bool:
        return can(self.role, needed)


def can(role: str, needed: Role) -> bool:
    """Roles are ordered: viewer < steward < admin; each may do what the ones below may."""
    return _RANK.get(role, -1) >= _RANK[needed]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _user(row: Any) -> User:
    return User(int(row.id), str(row.name), cast(Role, row.role))


def _audit(conn: Connection, actor: str | None, action: str, details: dict[str, Any]) -> None:
    """An audit entry for a change made by someone (the API, the CLI); none for fixtures."""
    if actor is not None:
        conn.execute(
            audit_log.insert().values(
                at=datetime.now(UTC), actor=actor, action=action, details=details
            )
        )


def add_user(db: Engine, name: str, password: str, role: str, *, actor: str | None = None) -> User:
    """Create a local user; the password is stored as an argon2id hash. With `actor`, the
    audit log records who added whom (`user.add`)."""
    if not _NAME.match(name):
        raise UserError(f"bad user name {name!r}: use 1-100 letters, digits or . _ @ -", user=name)
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: use one of {', '.join(ROLES)}", role=role)
    if len(password) < 8:
        raise UserError(f"the password for {name!r} is too short (8 characters at least)")
    hashed = _hasher.hash(password)
    with write_transaction(db) as conn:
        if conn.execute(select(app_user.c.id).where(app_user.c.name == name)).first():
            raise UserError(f"user {name!r} exists already", user=name)
        new_id = conn.execute(
            app_user.insert()
            .values(
                name=name,
                password_hash=hashed,
                role=role,
                disabled=0,
                created_at=datetime.now(UTC),
            )
            .returning(app_user.c.id)
        ).scalar_one()
        _audit(conn, actor, "user.add", {"user_id": int(new_id), "user": name, "role": role})
    return User(int(new_id), name, role)


def list_users(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(select(app_user).order_by(app_user.c.name))
    return [
        {
            "id": r.id,
            "name": r.name,
            "role": r.role,
            "disabled": bool(r.disabled),
            "created_at": r.created_at.isoformat(),
        }
        for r in rows
    ]


def authenticate(conn: Connection, name: str, password: str) -> User | None:
    """The user if `password` is theirs; None otherwise (same answer for an unknown name)."""
    row = conn.execute(
        select(app_user).where(app_user.c.name == name, app_user.c.disabled == 0)
    ).first()
    if row is None:
        # Spend the same time as a real check, so the answer does not reveal which names exist.
        _hasher.hash(password)
        return None
    try:
        _hasher.verify(row.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    return _user(row)


def create_token(
    db: Engine, user_name: str, label: str = "api", *, actor: str | None = None
) -> str:
    """A new API token for `user_name`; shown once, stored only as a hash (and audited as
    `user.token` when an `actor` is given)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with write_transaction(db) as conn:
        user_id = conn.execute(
            select(app_user.c.id).where(app_user.c.name == user_name)
        ).scalar_one_or_none()
        if user_id is None:
            raise UserError(f"no user {user_name!r} (add one with `crmhub users add`)")
        conn.execute(
            api_token.insert().values(
                user_id=user_id,
                token_hash=_digest(token),
                label=label[:100],
                created_at=datetime.now(UTC),
            )
        )
        _audit(conn, actor, "user.token", {"user_id": int(user_id), "label": label[:100]})
    return token


def token_user(conn: Connection, token: str) -> User | None:
    row = conn.execute(
        select(app_user)
        .join(api_token, api_token.c.user_id == app_user.c.id)
        .where(api_token.c.token_hash == _digest(token), app_user.c.disabled == 0)
    ).first()
    return _user(row) if row else None


def create_session(db: Engine, user: User) -> tuple[str, str]:
    """A new web session: (cookie value, CSRF token). Expired sessions are swept here."""
    session_id = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        conn.execute(web_session.delete().where(web_session.c.expires_at < now))
        conn.execute(
            web_session.insert().values(
                id_hash=_digest(session_id),
                user_id=user.id,
                csrf_token=csrf,
                created_at=now,
                expires_at=now + SESSION_TTL,
            )
        )
    return session_id, csrf


def session_user(conn: Connection, session_id: str) -> tuple[User, str] | None:
    """(user, CSRF token) of a live session, or None."""
    row = conn.execute(
        select(app_user, web_session.c.csrf_token)
        .join(web_session, web_session.c.user_id == app_user.c.id)
        .where(
            web_session.c.id_hash == _digest(session_id),
            web_session.c.expires_at > datetime.now(UTC),
            app_user.c.disabled == 0,
        )
    ).first()
    return (_user(row), str(row.csrf_token)) if row else None


def end_session(db: Engine, session_id: str) -> None:
    with write_transaction(db) as conn:
        conn.execute(web_session.delete().where(web_session.c.id_hash == _digest(session_id)))


# Failed sign-ins, for throttling (crmhub.web.steward.auth.LoginThrottle). In the store, not in
# a process's memory, so every web process of a store counts the same failures. Keys (a user
# name, a client address) are kept only as SHA-256.


def failures_since(conn: Connection, key: str, since: datetime) -> int:
    """How many sign-ins failed for `key` after `since`."""
    return int(
        conn.execute(
            select(func.count())
            .select_from(login_failure)
            .where(login_failure.c.key_hash == _digest(key), login_failure.c.at > since)
        ).scalar_one()
    )


def record_failure(db: Engine, keys: list[str], forget_before: datetime) -> None:
    """One failed sign-in for each of `keys`; failures older than `forget_before` go."""
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        conn.execute(login_failure.delete().where(login_failure.c.at < forget_before))
        conn.execute(login_failure.insert(), [{"key_hash": _digest(k), "at": now} for k in keys])


def clear_failures(db: Engine, key: str) -> None:
    with write_transaction(db) as conn:
        conn.execute(login_failure.delete().where(login_failure.c.key_hash == _digest(key)))
