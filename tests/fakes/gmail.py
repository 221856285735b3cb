"""Fake Gmail API v1 + Google token endpoint: `POST /token` (refresh_token grant, short-lived
access tokens), `users/me/profile`, `messages.list` (ids only, newest first, `pageToken`,
`maxResults` <= 500), `messages.get?format=metadata` (headers, snippet, internalDate,
labelIds), `history.list` (`startHistoryId`, `messagesAdded`/`messagesDeleted`, 404 when the
id is older than the retained history), 401 UNAUTHENTICATED on an expired token, and 429 /
403 `rateLimitExceeded` in Google's error shape.

`unit_quota` enforces the per-user limit in quota units per second (the docs: 15,000 units
per user per minute, i.e. 250/s; getProfile 1, history.list 2, messages.list and
messages.get 5 each); `get_delay` makes each get take that long, and `max_in_flight` records
how many gets were served at once."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes.server import FakeState, faulty

CLIENT_ID = "1234-fake.apps.googleusercontent.com"
CLIENT_SECRET = "fake-client-secret"
REFRESH = "1//fake-refresh-token"
OWNER = "rep@crmhub.test"


@dataclass
class GMessage:
    id: str
    thread_id: str
    headers: list[tuple[str, str]]
    snippet: str
    internal: datetime
    history_id: int
    labels: list[str] = field(default_factory=lambda: ["INBOX"])


@dataclass
class GmailState(FakeState):
    messages: dict[str, GMessage] = field(default_factory=dict)
    history: list[tuple[int, str, str]] = field(default_factory=list)  # (id, kind, message id)
    history_id: int = 1000
    oldest_history: int = 0  # startHistoryId below this answers 404
    access: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry
    token_lifetime: float = 3600.0
    refreshes: int = 0
    gets: int = 0
    get_delay: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    unit_quota: float | None = None  # quota units per user per second; None: unlimited
    _spent: list[tuple[float, int]] = field(default_factory=list)

    def over_quota(self, units: int) -> bool:
        """Charge `units` to the last second's budget; True (and no charge) when over it."""
        if self.unit_quota is None:
            return False
        now = time.monotonic()
        self._spent = [(t, u) for t, u in self._spent if now - t < 1.0]
        if sum(u for _, u in self._spent) + units > self.unit_quota:
            return True
        self._spent.append((now, units))
        return False

    def add_messages(self, n: int, **kw: Any) -> list[GMessage]:
        return [self.add_message(**kw) for _ in range(n)]

    def add_message(
        self,
        *,
        sender: str | None = None,
        to: str = OWNER,
        labels: list[str] | None = None,
        extra: list[tuple[str, str]] | None = None,
        message_id: str | None = "",
        snippet: str = "Hello &amp; welcome",
    ) -> GMessage:
        n = len(self.messages) + 1
        self.history_id += 3  # ids grow with gaps
        at = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=n)
        headers = [
            ("From", sender or f"Client {n} <client{n}@customer.example>"),
            ("To", to),
            ("Subject", f"Deal {n}"),
            ("Date", format_datetime(at)),
        ]
        if message_id is not None:
            headers.append(("Message-ID", message_id or f"<g{n}@customer.example>"))
        headers += extra or []
        msg = GMessage(f"{n:016x}", f"t{n:015x}", headers, snippet, at, self.history_id)
        if labels is not None:
            msg.labels = labels
        self.messages[msg.id] = msg
        self.history.append((self.history_id, "messagesAdded", msg.id))
        return msg

    def delete(self, message_id: str) -> None:
        self.history_id += 1
        self.messages.pop(message_id)
        self.history.append((self.history_id, "messagesDeleted", message_id))

    def expire_history(self) -> None:
        """Forget all history so far: the stored startHistoryId now answers 404."""
        self.oldest_history = self.history_id + 1
        self.history_id += 1

    def expire_tokens(self) -> None:
        self.access.clear()


def gerror(code: int, status: str, message: str, reason: str, domain: str = "global") -> Any:
    return {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": domain, "reason": reason}],
            "status": status,
        }
    }


def error_body(status: int, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    if status == 429:
        return gerror(
            429, "RESOURCE_EXHAUSTED", "Too many requests", "rateLimitExceeded", "usageLimits"
        ), {}
    if status == 403:
        return gerror(
            403,
            "PERMISSION_DENIED",
            "User-rate limit exceeded",
            "userRateLimitExceeded",
            "usageLimits",
        ), {}
    if status == 401:
        return gerror(401, "UNAUTHENTICATED", "Invalid Credentials", "authError"), {}
    return gerror(status, "UNAVAILABLE", "Backend Error", "backendError"), {}


def make_app(state: GmailState) -> ASGIApp:
    def authorized(request: Request, units: int) -> JSONResponse | None:
        """401 for a bad token, 429 over the per-user quota (`units` is the call's cost)."""
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        expiry = state.access.get(token)
        if expiry is None or expiry < time.monotonic():
            body, _ = error_body(401, request.url.path)
            return JSONResponse(body, 401, headers={"WWW-Authenticate": 'Bearer realm="fake"'})
        if state.over_quota(units):
            return JSONResponse(error_body(429, request.url.path)[0], 429)
        return None

    async def token(request: Request) -> JSONResponse:
        # No python-multipart here: the form is parsed by hand, as bytes on the wire.
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if form.get("grant_type") != "refresh_token":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
            return JSONResponse({"error": "invalid_client"}, 401)
        if form.get("refresh_token") != REFRESH:
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "Token has been revoked."}, 400
            )
        state.refreshes += 1
        access = "ya29." + secrets.token_urlsafe(16)
        state.access[access] = time.monotonic() + state.token_lifetime
        return JSONResponse(
            {
                "access_token": access,
                "expires_in": int(state.token_lifetime),
                "token_type": "Bearer",
                "scope": "https://www.googleapis.com/auth/gmail.readonly",
            }
        )

    async def profile(request: Request) -> JSONResponse:
        if (denied := authorized(request, 1)) is not None:
            return denied
        return JSONResponse(
            {
                "emailAddress": OWNER,
                "messagesTotal": len(state.messages),
                "threadsTotal": len(state.messages),
                "historyId": str(state.history_id),
            }
        )

    def visible(m: GMessage, spam_trash: bool) -> bool:
        return spam_trash or not ({"SPAM", "TRASH"} & set(m.labels))

    async def list_messages(request: Request) -> JSONResponse:
        if (denied := authorized(request, 5)) is not None:
            return denied
        q = request.query_params
        size = min(int(q.get("maxResults", 100)), 500)
        token = q.get("pageToken") or "0"
        if not token.isdigit():  # page tokens expire; Gmail answers 400
            body = gerror(400, "INVALID_ARGUMENT", "Invalid pageToken", "invalidArgument")
            return JSONResponse(body, 400)
        start = int(token)
        spam_trash = q.get("includeSpamTrash") == "true"
        ids = sorted(
            (m for m in state.messages.values() if visible(m, spam_trash)),
            key=lambda m: m.internal,
            reverse=True,
        )
        chunk = ids[start : start + size]
        body: dict[str, Any] = {
            "messages": [{"id": m.id, "threadId": m.thread_id} for m in chunk],
            "resultSizeEstimate": len(ids),
        }
        if start + size < len(ids):
            body["nextPageToken"] = str(start + size)
        if not chunk:
            body.pop("messages")
        return JSONResponse(body)

    async def get_message(request: Request) -> JSONResponse:
        if (denied := authorized(request, 5)) is not None:
            return denied
        state.gets += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(state.get_delay)
        finally:
            state.in_flight -= 1
        msg = state.messages.get(request.path_params["id"])
        if msg is None:
            return JSONResponse(
                gerror(404, "NOT_FOUND", "Requested entity was not found.", "notFound"), 404
            )
        wanted = {h.lower() for h in request.query_params.getlist("metadataHeaders")}
        headers = [
            {"name": k, "value": v} for k, v in msg.headers if not wanted or k.lower() in wanted
        ]
        return JSONResponse(
            {
                "id": msg.id,
                "threadId": msg.thread_id,
                "labelIds": msg.labels,
                "snippet": msg.snippet,
                "historyId": str(msg.history_id),
                "internalDate": str(int(msg.internal.timestamp() * 1000)),
                "sizeEstimate": 2048,
                "payload": {"partId": "", "mimeType": "text/plain", "headers": headers},
            }
        )

    async def history(request: Request) -> JSONResponse:
        if (denied := authorized(request, 2)) is not None:
            return denied
        q = request.query_params
        start_id = int(q.get("startHistoryId") or 0)
        if start_id < state.oldest_history:
            return JSONResponse(
                gerror(404, "NOT_FOUND", "Requested entity was not found.", "notFound"), 404
            )
        size = min(int(q.get("maxResults", 100)), 500)
        offset = int(q.get("pageToken") or 0)
        events = [h for h in state.history if h[0] > start_id]
        chunk = events[offset : offset + size]
        records = []
        for hid, kind, mid in chunk:
            ref = {"id": mid, "threadId": "t" + mid[1:]}
            if mid in state.messages:
                ref["labelIds"] = state.messages[mid].labels
            records.append({"id": str(hid), "messages": [ref], kind: [{"message": ref}]})
        body: dict[str, Any] = {"historyId": str(state.history_id)}
        if records:
            body["history"] = records
        if offset + size < len(events):
            body["nextPageToken"] = str(offset + size)
        return JSONResponse(body)

    base = "/gmail/v1/users/me"
    app = Starlette(
        routes=[
            Route("/token", token, methods=["POST"]),
            Route(f"{base}/profile", profile),
            Route(f"{base}/messages", list_messages),
            Route(f"{base}/messages/{{id}}", get_message),
            Route(f"{base}/history", history),
        ]
    )
    return faulty(app, state, error_body)
