"""Mailchimp Marketing API v3: one audience's members, and campaign email activity.

Members are read with `since_last_changed` (strict "after", second resolution, so the query
reaches one second below the watermark) sorted by `last_changed`. Unsubscribed, cleaned and
archived members arrive as contacts whose status the mapping turns into consent; Mailchimp's
permanent delete leaves no trace to read. Activity comes from each sent campaign's
`/reports/{id}/email-activity` with `since`.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr

from connectors.base import Recipient, Stream
from connectors.http import (
    ApiClient,
    HttpConnector,
    HttpConnectorConfig,
    basic_auth,
    mailchimp_base_url,
    tolerate_missing,
)
from connectors.pagination import (
    OffsetPaginator,
    Watermark,
    iso,
    resync_when_refused,
    seek_pages,
)
from connectors.registry import register
from crmhub.errors import PermanentError, SettingsError
from crmhub.records import Cursor, Page, RawRecord
from crmhub.transforms import parse_datetime

__all__ = ["MailchimpConnector"]

SECOND = timedelta(seconds=1)
# Canonical field -> the audience's default merge field.
MERGE_FIELDS = {"first_name": "FNAME", "last_name": "LNAME", "phone": "PHONE"}


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: MD5 of the lower-cased address (stable, so calls are idempotent)."""
    return hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()


@register("mailchimp", label="Mailchimp")
class MailchimpConnector(HttpConnector["MailchimpConnector.Config"]):
    """Members and email activity of one Mailchimp audience (list)."""

    class Config(HttpConnectorConfig):
        api_key: SecretStr = Field(description="API key; its -<dc> suffix picks the host")
        list_id: str = Field(description="audience id (Audience settings -> Audience ID)")

    streams = frozenset({"contacts", "activities"})
    default_rate = 10.0  # Mailchimp limits concurrency (10 connections), not a rate
    max_page_size = 1000
    secret_name = "api_key"
    writable_fields: ClassVar[frozenset[str]] = frozenset(MERGE_FIELDS)

    def base_url(self) -> str:
        if self.config.base_url:
            return self.config.base_url
        try:
            return mailchimp_base_url(self.config.api_key.get_secret_value())
        except ValueError as exc:
            raise SettingsError(
                f"[connectors.{self.name}] api_key: {exc}", connector=self.name
            ) from None

    def auth_headers(self) -> dict[str, str]:
        return basic_auth(self.config.api_key.get_secret_value())

    def account_key(self) -> str:
        return hashlib.sha256(self.config.api_key.get_secret_value().encode()).hexdigest()[:12]

    async def check(self) -> str:
        api = self.api()
        async with api.session():
            await api.request_json("GET", "/ping", stream="contacts")
            body = await api.request_json(
                "GET",
                f"/lists/{self.config.list_id}/members",
                params={"count": 1, "fields": "total_items"},
                stream="contacts",
            )
        total = body.get("total_items") if isinstance(body, dict) else None
        return f"Mailchimp audience {self.config.list_id}: {total} members readable"

    def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        return resync_when_refused(
            lambda at: self._pages(stream, at), cursor, connector=self.name, stream=stream
        )

    async def _pages(self, stream: Stream, cursor: Cursor | None) -> AsyncGenerator[Page, None]:
        api = self.api()
        async with api.session():
            pages = (
                self._members(api, cursor) if stream == "contacts" else self._activity(api, cursor)
            )
            async for page in pages:
                yield page

    # -- write-back ---------------------------------------------------------------------

    def _member_path(self, who: Recipient) -> str:
        if who.email:
            ident = subscriber_hash(who.email)
        elif who.external_id:
            ident = who.external_id
        else:
            raise PermanentError(f"{self.name}: nothing to address the member by")
        return f"/lists/{self.config.list_id}/members/{ident}"

    async def push_consent(self, who: Recipient, status: Literal["unsubscribed"]) -> None:
        """PATCH the member's status; 404 when the member is gone (not re-created)."""
        api = self.api()
        async with api.session():
            await api.request_json(
                "PATCH", self._member_path(who), json_body={"status": status}, stream="writeback"
            )

    async def update_fields(self, who: Recipient, fields: dict[str, Any]) -> None:
        merge = {MERGE_FIELDS[k]: v for k, v in fields.items() if k in MERGE_FIELDS}
        api = self.api()
        async with api.session():
            await api.request_json(
                "PATCH",
                self._member_path(who),
                json_body={"merge_fields": merge},
                stream="writeback",
            )

    async def erase(self, who: Recipient) -> None:
        """`delete-permanent` (a plain DELETE only archives); 404 = already erased."""
        api = self.api()
        async with api.session():
            await tolerate_missing(
                api.request_json(
                    "POST", self._member_path(who) + "/actions/delete-permanent", stream="writeback"
                )
            )

    async def _members(self, api: ApiClient, cursor: Cursor | None) -> AsyncIterator[Page]:
        mark = Watermark.from_cursor(cursor, overlap=SECOND, strict=True)
        path = f"/lists/{self.config.list_id}/members"

        async def fetch(since: datetime | None, offset: int) -> tuple[list[Any], int | None]:
            params: dict[str, Any] = {
                "count": self.page_size,
                "offset": offset,
                "sort_field": "last_changed",
                "sort_dir": "ASC",
            }
            if since is not None:
                params["since_last_changed"] = since.replace(microsecond=0).isoformat()
            body = await api.request_json("GET", path, params=params, stream="contacts")
            return _items(body, "members", self.name, "contacts"), body.get("total_items")

        def parse(item: Any) -> RawRecord:
            return RawRecord(
                external_id=str(item["id"]),
                kind="contact",
                payload=item,
                updated_at=parse_datetime(item["last_changed"]),
                origin=f"mailchimp member {item['id']}",
            )

        async for page in seek_pages(
            fetch, parse, mark, limit=self.page_size, origin="mailchimp members"
        ):
            yield page

    async def _activity(self, api: ApiClient, cursor: Cursor | None) -> AsyncIterator[Page]:
        """Opens, clicks and bounces of every sent campaign to this audience.

        The mark moves only after every campaign was read (activity is grouped per
        campaign, not ordered by time); re-reads are absorbed by the activity's id.
        """
        since = parse_datetime(cursor["since"]) if cursor and cursor.get("since") else None
        newest = since
        body = await api.request_json(
            "GET",
            "/campaigns",
            params={"list_id": self.config.list_id, "status": "sent", "count": 1000},
            stream="activities",
        )
        campaigns = _items(body, "campaigns", self.name, "activities")
        old_cursor = {"since": iso(since)} if since else None
        for n, campaign in enumerate(campaigns):
            paginator = OffsetPaginator(limit=self.page_size, total_path="total_items")
            params: dict[str, Any] = {}
            paginator.init_request(params)
            if since is not None:
                params["since"] = (since - SECOND).replace(microsecond=0).isoformat()
            while True:
                report = await api.request_json(
                    "GET",
                    f"/reports/{campaign['id']}/email-activity",
                    params=params,
                    stream="activities",
                )
                rows = _items(report, "emails", self.name, "activities")
                records = []
                for row in rows:
                    for event in row.get("activity") or []:
                        at = parse_datetime(event["timestamp"])
                        newest = at if newest is None or at > newest else newest
                        payload = {**event, **{k: v for k, v in row.items() if k != "activity"}}
                        key = f"{row['campaign_id']}:{row['email_id']}:{event['action']}:{at}"
                        records.append(RawRecord(key, "activity", payload, at, "mailchimp"))
                more = paginator.next_request(report, rows, params)
                last = more is None and n == len(campaigns) - 1
                yield Page(records, {"since": iso(newest)} if last and newest else old_cursor)
                if more is None:
                    break


def _items(body: Any, key: str, connector: str, stream: str) -> list[Any]:
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise PermanentError(
            f"{connector}: Mailchimp answered without a {key!r} list; is base_url right?",
            connector=connector,
            stream=stream,
        )
    return items
