"""Who is asking: web sessions (cookie + CSRF) for the UI, bearer API tokens for the REST API.

Every route but sign-in and /healthz depends on one of these. Roles are checked here too, so
a route states what it needs (`Depends(ui_role("steward"))`) and cannot forget it.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from sync.users import Role, User, session_user, token_user

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "MAX_ID",
    "SESSION_COOKIE",
    "DbId",
    "LoginThrottle",
    "PageNo",
    "WebSession",
    "api_role",
    "clean_text",
    "db_of",
    "throttle_of",
    "ui_role",
    "ui_session",
]

MAX_ID = 2**63 - 1  # ids are 64-bit on both back ends; larger ones are simply unknown
DbId = Annotated[int, Path(ge=1, le=MAX_ID)]
PageNo = Annotated[int, Query(ge=1, le=1_000_000)]

SESSION_COOKIE = "crmhub_session"
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
    that per client address (a shared office NAT should not lock everyone out at once)."""

    def __init__(self, limit: int = 5, window: float = 900.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        now = time.monotonic()
        times = self._failures.setdefault(key, deque())
        while times and now - times[0] > self.window:
            times.popleft()
        return times

    def blocked(self, name: str, client: str) -> bool:
        return (
            len(self._recent(f"user:{name}")) >= self.limit
            or len(self._recent(f"ip:{client}")) >= 4 * self.limit
        )

    def failed(self, name: str, client: str) -> None:
        self._recent(f"user:{name}").append(time.monotonic())
        self._recent(f"ip:{client}").append(time.monotonic())

    def succeeded(self, name: str) -> None:
        self._failures.pop(f"user:{name}", None)


def throttle_of(request: Request) -> LoginThrottle:
    throttle = getattr(request.app.state, "login_throttle", None)
    if throttle is None:
        throttle = request.app.state.login_throttle = LoginThrottle()
    assert isinstance(throttle, LoginThrottle)
    return throttle


def _to_login(request: Request) -> HTTPException:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.headers.get("HX-Request"):
        # htmx swaps fragments: tell it to load the sign-in page as a whole.
        return HTTPException(401, "sign in first", headers={"HX-Redirect": "/login"})
    return HTTPException(303, "sign in first", headers={"Location": f"/login?next={quote(target)}"})


def ui_session(request: Request) -> WebSession:
    """The signed-in user of a UI request; anonymous requests go to the sign-in page."""
    session_id = request.cookies.get(SESSION_COOKIE)
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
