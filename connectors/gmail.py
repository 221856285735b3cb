"""Gmail API: every message an `email` activity, its external correspondents contacts.

First sync: note the mailbox's `historyId` (users.getProfile), then page `messages.list`
(ids only) and fetch each page's messages with `format=metadata` (headers + snippet, never
bodies or attachments), `concurrency` at a time within the rate budget. Mid-listing pages
carry the list's `pageToken`, so a crash resumes the listing; the final page stores the
noted `historyId`. Later syncs page `history.list` from it and fetch the added messages.
A 404 on `history.list` means the id expired (Google keeps about a week): the connector
falls back to a full listing, which staging turns into a no-op for known messages, so
nothing is doubled. Deleted messages keep their activity (the conversation happened).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, SecretStr

from connectors.base import Stream
from connectors.email_parsing import MailIdentity, email_records, parse_header_list
from connectors.http import HttpConnector, HttpConnectorConfig
from connectors.oauth import OAuthApiClient, RefreshToken
from connectors.registry import register
from crmhub.errors import PermanentError
from crmhub.records import Cursor, Page, RawRecord

__all__ = ["GmailConnector"]

_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To", "References")
_AUTOMATION = ("List-Unsubscribe", "Auto-Submitted", "Precedence")
_SKIP_LABELS = {"SPAM", "TRASH", "DRAFT"}


@register("gmail", label="Gmail (API)")
class GmailConnector(HttpConnector["GmailConnector.Config"]):
    """One Gmail mailbox through the Gmail API (OAuth2, gmail.readonly or gmail.metadata)."""

    class Config(HttpConnectorConfig):
        client_id: str = Field(description="OAuth client id")
        client_secret: SecretStr | None = Field(None, description="OAuth client secret")
        refresh_token: SecretStr = Field(description="OAuth refresh token, e.g. ${GMAIL_REFRESH}")
        token_url: str = Field(
            "https://oauth2.googleapis.com/token", description="OAuth token endpoint"
        )
        user_id: str = Field("me", description="mailbox: me, or an address (domain delegation)")
        query: str | None = Field(None, description="Gmail search for the first sync (after:...)")
        owner: list[str] = Field(default_factory=list, description="the mailbox owner's addresses")
        internal_domains: list[str] = Field(
            default_factory=list, description="colleagues' domains: never turned into contacts"
        )
        concurrency: int = Field(10, ge=1, le=50, description="message gets in flight at once")

    streams = frozenset({"activities"})
    default_base_url = "https://gmail.googleapis.com/gmail/v1"
    # Per-user quota 15,000 units/min (250/s); a get costs 5 units: 50 requests/s at most.
    default_rate = 40.0
    max_page_size = 500
    secret_name = "refresh_token"

    def auth_headers(self) -> dict[str, str]:
        return {}

    def account_key(self) -> str:
        return f"{self.config.client_id}:{self.config.user_id}"

    def oauth_api(self) -> OAuthApiClient:
        base = self.api()  # budget, timeout and shared client come from the shared layer
        secret = self.config.client_secret
        token = RefreshToken(
            connector=self.name,
            token_url=self.config.token_url,
            client_id=self.config.client_id,
            client_secret=secret.get_secret_value() if secret else None,
            refresh_token=self.config.refresh_token.get_secret_value(),
        )
        return OAuthApiClient(
            token=token,
            connector=base.connector,
            base_url=f"{base.base_url}/users/{self.config.user_id}",
            budget=base._budget,
            client=base._shared,
            secret_name=base._secret_name,
            timeout=base._timeout,
        )

    async def check(self) -> str:
        api = self.oauth_api()
        async with api.session():
            profile = await api.request_json("GET", "/profile", stream="activities")
        return f"Gmail {profile.get('emailAddress')}: {profile.get('messagesTotal', 0):,} messages"

    async def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        api = self.oauth_api()
        async with api.session():
            owner = await self._owner(api)
            identity = MailIdentity.of([*self.config.owner, owner], self.config.internal_domains)
            history_id = (cursor or {}).get("history_id")
            if history_id and not (cursor or {}).get("page_token"):
                try:
                    async for page in self._history(api, str(history_id), identity):
                        yield page
                    return
                except PermanentError as exc:
                    if getattr(exc, "status", None) != 404:
                        raise
                    # startHistoryId expired: list everything again; staging absorbs it.
            async for page in self._full(api, cursor, identity):
                yield page

    async def _owner(self, api: OAuthApiClient) -> str:
        if "@" in self.config.user_id:
            return self.config.user_id
        profile = await api.request_json("GET", "/profile", stream="activities")
        return str(profile.get("emailAddress") or "")

    async def _full(
        self, api: OAuthApiClient, cursor: Cursor | None, identity: MailIdentity
    ) -> AsyncIterator[Page]:
        resuming = cursor if cursor and cursor.get("page_token") else None
        if resuming:
            start_history, token = str(resuming["history_id"]), resuming["page_token"]
        else:
            profile = await api.request_json("GET", "/profile", stream="activities")
            start_history, token = str(profile["historyId"]), None
        while True:
            params: dict[str, Any] = {"maxResults": self.page_size, "includeSpamTrash": "false"}
            if token:
                params["pageToken"] = token
            if self.config.query:
                params["q"] = self.config.query
            try:
                body = await api.request_json(
                    "GET", "/messages", params=params, stream="activities"
                )
            except PermanentError as exc:
                if resuming is None or getattr(exc, "status", None) != 400:
                    raise
                # The stored pageToken expired: list again from the top (staging absorbs it).
                resuming, token = None, None
                profile = await api.request_json("GET", "/profile", stream="activities")
                start_history = str(profile["historyId"])
                continue
            if not isinstance(body, dict):
                raise PermanentError(
                    f"{self.name}: messages.list answered without an object; is base_url right?",
                    connector=self.name,
                    stream="activities",
                )
            ids = [str(m["id"]) for m in body.get("messages") or [] if isinstance(m, dict)]
            records, rejects = await self._fetch(api, ids, identity)
            token = body.get("nextPageToken")
            next_cursor = {"history_id": start_history, "page_token": token} if token else None
            yield Page(
                records,
                next_cursor or {"history_id": start_history},
                rejects,
                total_hint=body.get("resultSizeEstimate"),
            )
            if not token:
                return

    async def _history(
        self, api: OAuthApiClient, start: str, identity: MailIdentity
    ) -> AsyncIterator[Page]:
        token: str | None = None
        while True:
            params: dict[str, Any] = {
                "startHistoryId": start,
                "historyTypes": "messageAdded",
                "maxResults": self.page_size,
            }
            if token:
                params["pageToken"] = token
            body = await api.request_json("GET", "/history", params=params, stream="activities")
            added: dict[str, None] = {}
            for entry in body.get("history") or []:
                for item in entry.get("messagesAdded") or []:
                    message = item.get("message") or {}
                    if not _SKIP_LABELS & set(message.get("labelIds") or []):
                        added[str(message["id"])] = None
            records, rejects = await self._fetch(api, list(added), identity)
            token = body.get("nextPageToken")
            # Mid-history pages keep the start id: a replay re-reads them, staging absorbs it.
            done = not token
            yield Page(records, {"history_id": str(body["historyId"]) if done else start}, rejects)
            if done:
                return

    async def _fetch(
        self, api: OAuthApiClient, ids: list[str], identity: MailIdentity
    ) -> tuple[list[RawRecord], list[tuple[str, str, str]]]:
        gate = asyncio.Semaphore(self.config.concurrency)

        async def one(message_id: str) -> Any:
            async with gate:
                try:
                    return await api.request_json(
                        "GET",
                        f"/messages/{message_id}",
                        params={
                            "format": "metadata",
                            "metadataHeaders": [*_HEADERS, *_AUTOMATION],
                        },
                        stream="activities",
                    )
                except PermanentError as exc:
                    if getattr(exc, "status", None) == 404:
                        return None  # deleted since it was listed
                    raise

        # A task group, not gather: when one get fails, the others are cancelled and awaited
        # before the error leaves, so no request outlives the session's HTTP client.
        try:
            async with asyncio.TaskGroup() as group:
                gets = [group.create_task(one(i)) for i in ids]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        bodies = [get.result() for get in gets]
        records: list[RawRecord] = []
        rejects: list[tuple[str, str, str]] = []
        for message_id, body in zip(ids, bodies, strict=True):
            if body is None or _SKIP_LABELS & set(body.get("labelIds") or []):
                continue
            origin = f"gmail message {message_id}"
            try:
                headers = [(str(h["name"]), str(h["value"])) for h in body["payload"]["headers"]]
            except (KeyError, TypeError) as exc:
                rejects.append((origin, f"message without payload.headers ({exc})", ""))
                continue
            parsed = parse_header_list(headers, str(body.get("snippet") or ""))
            if parsed.sent_at is None and str(body.get("internalDate") or "").isdigit():
                # No usable Date header: Gmail's receive time (ms since the epoch) stands in.
                parsed.sent_at = datetime.fromtimestamp(int(body["internalDate"]) / 1000, UTC)
            records.extend(email_records(parsed, origin, identity))
        return records, rejects
