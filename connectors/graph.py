"""Microsoft Graph (Outlook / Microsoft 365) mail through per-folder delta queries.

Each folder (`inbox`, `sentitems` by default) runs its own delta round: the first run pages
`/mailFolders/{folder}/messages/delta` through `@odata.nextLink` to the `@odata.deltaLink`;
later runs start from the stored deltaLink and get only what changed. Every page commits
with the link to continue from, so a crash resumes mid-round. A stored link the service no
longer knows (410 Gone, or a 40X such as `syncStateNotFound`: the delta token expired) starts
the folder's round again from scratch; the Message-ID identity makes that re-read a no-op in
the store. `@removed` entries keep their activity (the conversation happened), and a change
report that names no message content (a message read or flagged: only `id`, `isRead`...)
is skipped. Throttling (429 + Retry-After) is waited out by the shared retry policy; the
access token refreshes itself (connectors.oauth).

`internetMessageHeaders` is selected (Graph returns it only when asked) for the headers the
shared rules read: List-Unsubscribe, Auto-Submitted, Precedence, In-Reply-To, References.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from pydantic import Field, SecretStr

from connectors.base import Stream
from connectors.email_parsing import MailIdentity, email_records, parse_header_list
from connectors.http import HttpConnector, HttpConnectorConfig
from connectors.oauth import OAuthApiClient, RefreshToken
from connectors.registry import register
from crmhub.errors import AuthError, PermanentError
from crmhub.records import Cursor, Page, RawRecord

__all__ = ["GraphConnector"]

log = logging.getLogger(__name__)

_SELECT = (
    "subject,from,toRecipients,ccRecipients,receivedDateTime,sentDateTime,"
    "internetMessageId,bodyPreview,isDraft,internetMessageHeaders"
)
# Of the message's internet headers, those the shared rules read (threads, automated mail).
_HEADERS_READ = {"in-reply-to", "references", "list-unsubscribe", "auto-submitted", "precedence"}
# A delta entry with none of these is a change report (read, flagged), not a message.
_CONTENT = ("from", "subject", "internetMessageId", "toRecipients", "sentDateTime")
MAX_RESTARTS = 2


@register("graph", label="Microsoft 365 mail (Graph)")
class GraphConnector(HttpConnector["GraphConnector.Config"]):
    """One Microsoft 365 / Outlook.com mailbox through Microsoft Graph."""

    class Config(HttpConnectorConfig):
        tenant: str = Field("common", description="Entra tenant id or domain")
        client_id: str = Field(description="app (client) id")
        client_secret: SecretStr | None = Field(None, description="client secret (confidential)")
        refresh_token: SecretStr = Field(description="OAuth refresh token, e.g. ${GRAPH_REFRESH}")
        token_url: str | None = Field(
            None, description="token endpoint; login.microsoftonline.com/<tenant> by default"
        )
        scope: str = Field(
            "https://graph.microsoft.com/Mail.Read offline_access", description="OAuth scopes"
        )
        user: str = Field("me", description="me, or a user id / UPN (application permissions)")
        folders: list[str] = Field(
            default_factory=lambda: ["inbox", "sentitems"], description="mail folders to read"
        )
        owner: list[str] = Field(default_factory=list, description="the mailbox owner's addresses")
        internal_domains: list[str] = Field(
            default_factory=list, description="colleagues' domains: never turned into contacts"
        )

    streams = frozenset({"activities"})
    default_base_url = "https://graph.microsoft.com/v1.0"
    default_rate = 15.0  # 10,000 requests / 10 min per app per mailbox
    max_page_size = 1000
    secret_name = "refresh_token"

    def auth_headers(self) -> dict[str, str]:
        return {}

    def account_key(self) -> str:
        return f"{self.config.tenant}:{self.config.client_id}:{self.config.user}"

    @property
    def prefix(self) -> str:
        return "/me" if self.config.user == "me" else f"/users/{self.config.user}"

    def oauth_api(self) -> OAuthApiClient:
        base = self.api()  # budget, timeout and shared client from the shared layer
        cfg = self.config
        secret = cfg.client_secret
        token = RefreshToken(
            connector=self.name,
            token_url=cfg.token_url
            or f"https://login.microsoftonline.com/{cfg.tenant}/oauth2/v2.0/token",
            client_id=cfg.client_id,
            client_secret=secret.get_secret_value() if secret else None,
            refresh_token=cfg.refresh_token.get_secret_value(),
            scope=cfg.scope,
        )
        return OAuthApiClient(
            token=token,
            extra_headers={
                "Prefer": f'odata.maxpagesize={min(self.page_size, 1000)}, IdType="ImmutableId"'
            },
            connector=base.connector,
            base_url=base.base_url,
            budget=base._budget,
            client=base._shared,
            secret_name=base._secret_name,
            timeout=base._timeout,
        )

    @property
    def page_size(self) -> int:
        return min(self.config.page_size or 100, self.max_page_size)

    async def check(self) -> str:
        api = self.oauth_api()
        async with api.session():
            me = await api.request_json("GET", self.prefix, stream="activities")
        return f"Graph mailbox {me.get('mail') or me.get('userPrincipalName')}: token accepted"

    async def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        state: dict[str, str] = dict((cursor or {}).get("folders") or {})
        api = self.oauth_api()
        async with api.session():
            me = await api.request_json(
                "GET", self.prefix, params={"$select": "mail,userPrincipalName"}
            )
            owner = [str(me.get(k) or "") for k in ("mail", "userPrincipalName")]
            identity = MailIdentity.of(
                [
                    *self.config.owner,
                    *owner,
                    *([self.config.user] if "@" in self.config.user else []),
                ],
                self.config.internal_domains,
            )
            for folder in self.config.folders:
                async for page in self._folder(api, folder, state, identity):
                    yield page

    async def _folder(
        self, api: OAuthApiClient, folder: str, state: dict[str, str], identity: MailIdentity
    ) -> AsyncIterator[Page]:
        start = f"{self.prefix}/mailFolders/{folder}/messages/delta"
        first_params = {"$select": _SELECT}
        url = state.get(folder) or start
        restarts = 0
        while True:
            params = first_params if url == start else None
            try:
                body = await api.request_json("GET", url, params=params, stream="activities")
            except PermanentError as exc:
                if url != start and _link_expired(exc) and restarts < MAX_RESTARTS:
                    # The stored link died: a fresh round; staging absorbs the repeats.
                    log.warning(
                        "graph delta link expired; restarting the folder's round",
                        extra={"connector": self.name, "folder": folder},
                    )
                    restarts += 1
                    url = start
                    continue
                raise
            if not isinstance(body, dict) or not isinstance(body.get("value"), list):
                raise PermanentError(
                    f"{self.name}: Graph delta answered without a 'value' list; "
                    f"check base_url and the folder {folder!r}",
                    connector=self.name,
                    stream="activities",
                )
            records, rejects = self._records(body["value"], folder, identity)
            nxt = body.get("@odata.nextLink")
            link = nxt or body.get("@odata.deltaLink")
            if not isinstance(link, str):
                raise PermanentError(
                    f"{self.name}: Graph delta page has neither nextLink nor deltaLink",
                    connector=self.name,
                    stream="activities",
                )
            state[folder] = link
            yield Page(records, {"folders": dict(state)}, rejects)
            if not nxt:
                return
            url = nxt

    def _records(
        self, items: list[Any], folder: str, identity: MailIdentity
    ) -> tuple[list[RawRecord], list[tuple[str, str, str]]]:
        records: list[RawRecord] = []
        rejects: list[tuple[str, str, str]] = []
        for item in items:
            if not isinstance(item, dict) or "@removed" in item or item.get("isDraft"):
                continue
            if not any(k in item for k in _CONTENT):
                continue  # a flag or read-state change of a message delivered earlier
            origin = f"graph {folder} message {item.get('id')}"
            try:
                headers = _headers(item)
            except (KeyError, TypeError, ValueError) as exc:
                rejects.append((origin, f"unreadable message: {type(exc).__name__} {exc}", ""))
                continue
            parsed = parse_header_list(headers, str(item.get("bodyPreview") or ""))
            records.extend(email_records(parsed, origin, identity))
        return records, rejects


def _link_expired(exc: PermanentError) -> bool:
    """410 Gone, or another 4xx on a stored link (Graph names `syncStateNotFound` with "a
    40X-series error"), but not a refused token or permission: those are for the user."""
    return not isinstance(exc, AuthError) and getattr(exc, "status", None) in (400, 404, 410)


def _who(entry: Any) -> str:
    address = entry["emailAddress"]
    name = str(address.get("name") or "").replace('"', "'")
    return f'"{name}" <{address.get("address") or ""}>' if name else str(address["address"])


def _headers(item: dict[str, Any]) -> list[tuple[str, str]]:
    """Graph's message fields as RFC 5322 headers, so parsing is shared with IMAP."""
    headers: list[tuple[str, str]] = []
    sender = item.get("from") or item.get("sender")
    if sender:
        headers.append(("From", _who(sender)))
    for field, name in (("toRecipients", "To"), ("ccRecipients", "Cc")):
        people = item.get(field) or []
        if people:
            headers.append((name, ", ".join(_who(p) for p in people)))
    headers.append(("Subject", str(item.get("subject") or "")))
    stamp = item.get("sentDateTime") or item.get("receivedDateTime")
    if stamp:
        headers.append(("Date", format_datetime(datetime.fromisoformat(stamp))))
    if item.get("internetMessageId"):
        headers.append(("Message-ID", str(item["internetMessageId"])))
    for header in item.get("internetMessageHeaders") or []:
        if str(header["name"]).lower() in _HEADERS_READ:
            headers.append((str(header["name"]), str(header["value"])))
    return headers
