"""Fake Microsoft Graph v1.0 mail + Microsoft identity token endpoint: `POST
/common/oauth2/v2.0/token` (refresh_token grant), `GET /v1.0/me`, per-folder
`/me/mailFolders/{inbox|sentitems}/messages/delta` rounds (`Prefer: odata.maxpagesize`,
`@odata.nextLink` with `$skiptoken`, a final `@odata.deltaLink` with `$deltatoken`, `@removed`
entries for deleted messages), 401 `InvalidAuthenticationToken`, and 429
`ApplicationThrottled` with Retry-After.

As the docs say (concepts/delta-query-overview.md, delta-query-messages.md):
- `$select` is given once, on the first request of a round; the tokens carry it on. Only the
  selected properties come back (plus `id`), and `internetMessageHeaders` only when selected.
- A message changed after it was delivered (read, flagged) comes back in the next round: with
  its selected properties, or, as users report, with only `id`, `isRead` and `parentFolderId`
  (`mark_read(partial=True)`).
- An expired delta token answers 410 Gone with a Location header (the initial query), or a
  40X with code `syncStateNotFound` (`expired_status`)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes.server import FakeState, faulty

CLIENT_ID = "00000000-fake-graph-client"
CLIENT_SECRET = "fake-graph-secret"
REFRESH = "M.R3_fake-graph-refresh"
OWNER = "rep@crmhub.test"


@dataclass
class GraphState(FakeState):
    folders: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"inbox": {}, "sentitems": {}}
    )
    log: list[tuple[int, str, str, str]] = field(default_factory=list)  # seq, folder, id, kind
    seq: int = 0
    expired_before: int = 0  # delta tokens below this are expired
    expired_status: int = 410  # what an expired token answers: 410, or e.g. 400
    access: dict[str, float] = field(default_factory=dict)
    refreshes: int = 0
    n: int = 0

    def add_message(
        self,
        folder: str = "inbox",
        *,
        sender: tuple[str, str] | None = None,
        to: list[tuple[str, str]] | None = None,
        message_id: str | None = "",
        headers: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        self.n += 1
        n = self.n
        at = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=n)
        name, address = sender or (f"Client {n}", f"client{n}@customer.example")

        def who(pair: tuple[str, str]) -> dict[str, Any]:
            return {"emailAddress": {"name": pair[0], "address": pair[1]}}

        msg: dict[str, Any] = {
            "@odata.etag": f'W/"{n}"',
            "id": f"AAMkAG{n:010d}=",
            "subject": f"Deal {n}",
            "bodyPreview": f"Hi, about deal {n}",
            "receivedDateTime": at.isoformat().replace("+00:00", "Z"),
            "sentDateTime": at.isoformat().replace("+00:00", "Z"),
            "from": who((name, address)),
            "toRecipients": [who(p) for p in (to or [("Rep", OWNER)])],
            "ccRecipients": [],
            "internetMessageId": f"<o{n}@customer.example>" if message_id == "" else message_id,
            "conversationId": f"conv{n}",
            "isRead": False,
            "isDraft": False,
            "parentFolderId": f"folder-{folder}",
        }
        if headers is not None:
            msg["internetMessageHeaders"] = headers
        self.folders[folder][msg["id"]] = msg
        self.seq += 1
        self.log.append((self.seq, folder, msg["id"], "upsert"))
        return msg

    def mark_read(self, folder: str, message_id: str, *, partial: bool = False) -> None:
        """The user reads a delivered message: the next delta round reports the change."""
        self.folders[folder][message_id]["isRead"] = True
        self.seq += 1
        self.log.append((self.seq, folder, message_id, "partial" if partial else "upsert"))

    def delete(self, folder: str, message_id: str) -> None:
        self.folders[folder].pop(message_id)
        self.seq += 1
        self.log.append((self.seq, folder, message_id, "removed"))

    def expire_delta_tokens(self) -> None:
        self.expired_before = self.seq + 1


def gerror(code: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "innerError": {"date": "2026-03-01T00:00:00", "request-id": "fake"},
        }
    }


def error_body(status: int, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    if status == 429:
        return gerror(
            "ApplicationThrottled", "Application is over its MailboxConcurrency limit."
        ), {}
    if status == 401:
        return gerror("InvalidAuthenticationToken", "Access token has expired."), {}
    return gerror("UnknownError", "Service unavailable"), {}


def make_app(state: GraphState) -> ASGIApp:
    def denied(request: Request) -> JSONResponse | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        expiry = state.access.get(token)
        if expiry is None or expiry < time.monotonic():
            body, _ = error_body(401, request.url.path)
            return JSONResponse(body, 401)
        return None

    async def token(request: Request) -> JSONResponse:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return JSONResponse({"error": "invalid_client", "error_codes": [7000215]}, 401)
        if form.get("refresh_token") != REFRESH:
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "AADSTS70008: expired"}, 400
            )
        state.refreshes += 1
        access = "eyJ0eXAi." + secrets.token_urlsafe(16)
        state.access[access] = time.monotonic() + 3600
        return JSONResponse(
            {
                "token_type": "Bearer",
                "scope": form.get("scope", ""),
                "expires_in": 3600,
                "access_token": access,
                "refresh_token": REFRESH,
            }
        )

    async def me(request: Request) -> JSONResponse:
        if (refused := denied(request)) is not None:
            return refused
        return JSONResponse({"id": "user-1", "mail": OWNER, "userPrincipalName": OWNER})

    def project(msg: dict[str, Any], select: str) -> dict[str, Any]:
        """The message as Graph returns it for this `$select` (all but headers without one)."""
        wanted = {f for f in select.split(",") if f} or set(msg) - {"internetMessageHeaders"}
        out = {"@odata.type": "#microsoft.graph.message", "id": msg["id"]}
        out.update({k: v for k, v in msg.items() if k in wanted or k == "@odata.etag"})
        return out

    async def delta(request: Request) -> JSONResponse:
        if (refused := denied(request)) is not None:
            return refused
        folder = request.path_params["folder"]
        if folder not in state.folders:
            return JSONResponse(gerror("ErrorInvalidIdMalformed", "Id is malformed."), 400)
        q = request.query_params
        prefer = request.headers.get("prefer", "")
        size = 10
        for part in prefer.split(","):
            if part.strip().startswith("odata.maxpagesize="):
                size = min(int(part.split("=", 1)[1]), 1000)
        # Tokens: "<since>.<upto>.<offset>.<select>" (opaque to the client, like Graph's).
        if "$skiptoken" in q:
            since_s, upto_s, offset_s, select = q["$skiptoken"].split(".", 3)
            since, upto, offset = int(since_s), int(upto_s), int(offset_s)
        elif "$deltatoken" in q:
            since_s, select = q["$deltatoken"].split(".", 1)
            since, upto, offset = int(since_s), state.seq, 0
            if since < state.expired_before:
                initial = str(request.url.replace(query=""))
                if state.expired_status == 410:
                    return JSONResponse(
                        gerror("SyncStateNotFound", "The sync state generation is not found."),
                        410,
                        headers={"Location": initial},
                    )
                body = gerror(
                    "syncStateNotFound",
                    "The sync state generation is not found. The delta token is expired "
                    "and data must be synchronized again.",
                )
                return JSONResponse(body, state.expired_status)
        else:
            since, upto, offset, select = 0, state.seq, 0, q.get("$select", "")
        if since == 0:  # initial round: the folder as it is
            items = [project(m, select) for m in state.folders[folder].values()]
        else:
            latest: dict[str, str] = {}
            for seq, f, mid, kind in state.log:
                if f == folder and since < seq <= upto:
                    # A partial change report never hides a full one in the same round.
                    latest[mid] = "upsert" if latest.get(mid) == "upsert" else kind
            items = []
            for mid, kind in latest.items():
                msg = state.folders[folder].get(mid)
                if msg is None or kind == "removed":
                    items.append({"@odata.type": "#microsoft.graph.message", "id": mid,
                                  "@removed": {"reason": "deleted"}})  # fmt: skip
                elif kind == "partial":
                    items.append({"@odata.type": "#microsoft.graph.message", "id": mid,
                                  "isRead": msg["isRead"],
                                  "parentFolderId": msg["parentFolderId"]})  # fmt: skip
                else:
                    items.append(project(msg, select))
        chunk = items[offset : offset + size]
        base = str(request.url.replace(query=""))
        body: dict[str, Any] = {"@odata.context": f"{base}/$metadata", "value": chunk}
        if offset + size < len(items):
            body["@odata.nextLink"] = f"{base}?$skiptoken={since}.{upto}.{offset + size}.{select}"
        else:
            body["@odata.deltaLink"] = f"{base}?$deltatoken={upto}.{select}"
        return JSONResponse(body)

    app = Starlette(
        routes=[
            Route("/common/oauth2/v2.0/token", token, methods=["POST"]),
            Route("/v1.0/me", me),
            Route("/v1.0/me/mailFolders/{folder}/messages/delta", delta),
        ]
    )
    return faulty(app, state, error_body)
