"""Who is asking: web sessions (cookie + CSRF) for the UI, bearer API tokens for the REST API.

Every route but sign-in and /healthz depends on one of these. Roles are checked here too, so
a route states what it needs (`Depends(ui_role("steward"))`) and cannot forget it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from sync.users import (
    Role,
    User,
    clear_failures,
    failures_since,
    record_failure,
    session_user,
    token_user,
)

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "MAX_ID",
    "SECURE_SESSION_COOKIE",
    "SESSION_COOKIE",
    "DbId",
    "LoginThrottle",
    "PageNo",
    "WebSession",
    "api_role",
    "check_origin",
    "clean_text",
    "cookie_name",
    "db_of",
    "throttle_of",
    "ui_role",
    "ui_session",
]

# Ids are allocated in sequence and stay far below JSON's safe-integer range; larger ones are
# unknown (422). Not 2**63 - 1: OpenAPI bounds are floats, and that one rounds up to 2**63,
# so the schema would promise ids the server refuses.
MAX_ID = 2**53 - 1
DbId = Annotated[int, Path(ge=1, le=MAX_ID)]
PageNo = Annotated[int, Query(ge=1, le=1_000_000)]

SESSION_COOKIE = "crmhub_session"
# Over HTTPS the cookie takes the __Host- prefix: the browser then accepts it only with
# Secure, Path=/ and no Domain, so neither a sibling subdomain nor plain HTTP can plant one.
SECURE_SESSION_COOKIE = "__Host-crmhub_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

_bearer = HTTPBearer(auto_error=False, description="An API token from `crmhub users token`.")


@dataclass(frozen=True, slots=True)
class WebSession:
    user: User
    csrf: str
    session_id: str


def clean_text(value: str | None) -> str | None:
    """User text bound for a query: without NUL and other control characters (PostgreSQL
    refuses NUL in text; none of them can match stored data anyway)."""
    if value is None:
        return None
    return "".join(ch for ch in value if ch.isprintable() or ch == " ")


def db_of(request: Request) -> Engine:
    db: Engine = request.app.state.db
    return db


class LoginThrottle:
    """Failed sign-ins in the last `window` seconds: at most `limit` per name, and four times
    that per client address (a shared office NAT should not lock everyone out at once).

    The failures are kept in the store (sync.users), so every web process of one store
    enforces the same limit: several `crmhub serve` processes do not multiply it.
    """

    def __init__(self, db: Engine, limit: int = 5, window: float = 900.0) -> None:
        self.db = db
        self.limit = limit
        self.window = timedelta(seconds=window)

    def blocked(self, name: str, client: str) -> bool:
        since = datetime.now(UTC) - self.window
        with self.db.connect() as conn:
            return (
                failures_since(conn, f"user:{name}", since) >= self.limit
                or failures_since(conn, f"ip:{client}", since) >= 4 * self.limit
            )

    def failed(self, name: str, client: str) -> None:
        record_failure(self.db, [f"user:{name}", f"ip:{client}"], datetime.now(UTC) - self.window)

    def succeeded(self, name: str) -> None:
        clear_failures(self.db, f"user:{name}")


def throttle_of(request: Request) -> LoginThrottle:
    throttle = getattr(request.app.state, "login_throttle", None)
    if throttle is None:
        throttle = request.app.state.login_throttle = LoginThrottle(db_of(request))
    assert isinstance(throttle, LoginThrottle)
    return throttle


def _to_login(request: Request) -> HTTPException:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.headers.get("HX-Request"):
        # htmx swaps fragments: tell it to load the sign-in page as a whole.
        return HTTPException(401, "sign in first", headers={"HX-Redirect": "/login"})
    return HTTPException(303, "sign in first", headers={"Location": f"/login?next={quote(target)}"})


def cookie_name(request: Request) -> str:
    """The session cookie's name for this request's scheme (behind a TLS-terminating proxy,
    the scheme comes from X-Forwarded-Proto, which uvicorn trusts from its
    `forwarded_allow_ips`)."""
    return SECURE_SESSION_COOKIE if request.url.scheme == "https" else SESSION_COOKIE


def check_origin(request: Request) -> None:
    """Refuse a state change sent from another site. Browsers send `Origin` with every POST;
    it must name this host (the scheme is not compared: a proxy may terminate TLS)."""
    origin = request.headers.get("origin")
    if origin is None:
        return  # not a browser (curl, scripts), or an old one: the CSRF token still holds
    # A proxy may pass the public host as X-Forwarded-Host. Another site's page cannot set
    # either header on a victim's request, so both are safe to accept.
    forwarded = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    if urlsplit(origin).netloc not in {request.headers.get("host"), forwarded} - {"", None}:
        raise HTTPException(403, "cross-site request refused: use crmhub's own pages")


def ui_session(request: Request) -> WebSession:
    """The signed-in user of a UI request; anonymous requests go to the sign-in page."""
    session_id = request.cookies.get(cookie_name(request))
    found = None
    if session_id:
        with db_of(request).connect() as conn:
            found = session_user(conn, session_id)
    if found is None:
        raise _to_login(request)
    return WebSession(found[0], found[1], session_id or "")


async def _check_csrf(request: Request, session: WebSession) -> None:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    check_origin(request)
    sent = request.headers.get(CSRF_HEADER)
    if not sent:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not secrets.compare_digest(sent, session.csrf):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


_session = Depends(ui_session)
_bearer_credentials = Depends(_bearer)


def ui_role(needed: Role) -> Callable[..., object]:
    """Dependency: a signed-in user with at least role `needed`; state changes need CSRF."""

    async def dependency(request: Request, session: WebSession = _session) -> WebSession:
        if not session.user.can(needed):
            raise HTTPException(403, f"this needs the {needed} role")
        await _check_csrf(request, session)
        return session

    return dependency


def api_role(needed: Role) -> Callable[..., object]:
    """Dependency: the user behind a bearer API token, with at least role `needed`."""

    def dependency(
        request: Request, credentials: HTTPAuthorizationCredentials | None = _bearer_credentials
    ) -> User:
        user = None
        if credentials is not None and credentials.scheme.lower() == "bearer":
            with db_of(request).connect() as conn:
                user = token_user(conn, credentials.credentials)
        if user is None:
            raise HTTPException(
                401, "a valid API token is needed", headers={"WWW-Authenticate": "Bearer"}
            )
        if not user.can(needed):
            raise HTTPException(403, f"this needs the {needed} role")
        return user

    return dependency
