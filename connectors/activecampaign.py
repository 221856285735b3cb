"""ActiveCampaign API v3: contacts, with list membership side-loaded for consent.

Contacts are read with `filters[updated_after]` (strict, second resolution, account
timezone) and `orders[udate]=ASC`, seeking from the watermark page by page. Each contact's
list statuses (`include=contactLists`; 1 active, 2 unsubscribed) are folded into its payload
as `list_statuses` and `unsubscribed` (every list unsubscribed). ActiveCampaign has no
account-wide activity feed (one call per contact) and no deleted-contacts feed, so this
connector syncs contacts only; activity is better taken from its webhooks.
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
    header_auth,
    tolerate_missing,
)
from connectors.pagination import Watermark, resync_when_refused, seek_pages
from connectors.registry import register
from crmhub.errors import PermanentError
from crmhub.records import Cursor, Page, RawRecord
from crmhub.transforms import parse_datetime

__all__ = ["ActiveCampaignConnector"]

# Canonical field -> contact attribute.
CONTACT_ATTRIBUTES = {"first_name": "firstName", "last_name": "lastName", "phone": "phone"}
UNSUBSCRIBED = "2"


@register("activecampaign", label="ActiveCampaign")
class ActiveCampaignConnector(HttpConnector["ActiveCampaignConnector.Config"]):
    """Contacts of one ActiveCampaign account (`Api-Token`)."""

    class Config(HttpConnectorConfig):
        base_url: str = Field(
            description="the account's API URL from Settings -> Developer, "
            "e.g. https://acme.api-us1.com (per-account host; there is no default)"
        )
        api_token: SecretStr = Field(description="API key from Settings -> Developer")

    streams = frozenset({"contacts"})
    default_rate = 5.0  # 5 requests/second per account, shared by every key
    max_page_size = 100
    secret_name = "api_token"
    writable_fields: ClassVar[frozenset[str]] = frozenset(CONTACT_ATTRIBUTES)

    def base_url(self) -> str:
        base = self.config.base_url.rstrip("/")
        return base if base.endswith("/api/3") else base + "/api/3"

    def auth_headers(self) -> dict[str, str]:
        return header_auth("Api-Token", self.config.api_token.get_secret_value())

    def account_key(self) -> str:
        return hashlib.sha256(self.base_url().encode()).hexdigest()[:12]

    async def check(self) -> str:
        api = self.api()
        async with api.session():
            body = await api.request_json("GET", "/users/me", stream="contacts")
        user = (body.get("user") or {}).get("username") if isinstance(body, dict) else None
        return f"ActiveCampaign at {api.base_url}: key accepted (user {user})"

    # -- write-back -------------------------------------------------------------------

    async def _contact_id(self, api: ApiClient, who: Recipient) -> str | None:
        """The contact id: the staged external id, else a lookup by email (None: no one)."""
        if who.external_id:
            return who.external_id
        if not who.email:
            return None
        body = await api.request_json(
            "GET", "/contacts", params={"email": who.email}, stream="writeback"
        )
        found = body.get("contacts") if isinstance(body, dict) else None
        return str(found[0]["id"]) if found else None

    def _gone(self) -> PermanentError:
        return PermanentError(
            f"{self.name}: the contact no longer exists in ActiveCampaign",
            connector=self.name,
            stream="writeback",
            status=404,
        )

    async def push_consent(self, who: Recipient, status: Literal["unsubscribed"]) -> None:
        """Set every list membership of the contact to status 2 (unsubscribed)."""
        api = self.api()
        async with api.session():
            cid = await self._contact_id(api, who)
            if cid is None:
                raise self._gone()
            body = await api.request_json(
                "GET", f"/contacts/{cid}/contactLists", stream="writeback"
            )
            for membership in (body or {}).get("contactLists") or []:
                if str(membership.get("status")) == UNSUBSCRIBED:
                    continue
                await api.request_json(
                    "POST",
                    "/contactLists",
                    json_body={
                        "contactList": {
                            "list": membership.get("list"),
                            "contact": cid,
                            "status": int(UNSUBSCRIBED),
                        }
                    },
                    stream="writeback",
                )

    async def update_fields(self, who: Recipient, fields: dict[str, Any]) -> None:
        attrs = {CONTACT_ATTRIBUTES[k]: v for k, v in fields.items() if k in CONTACT_ATTRIBUTES}
        api = self.api()
        async with api.session():
            cid = await self._contact_id(api, who)
            if cid is None:
                raise self._gone()
            await api.request_json(
                "PUT", f"/contacts/{cid}", json_body={"contact": attrs}, stream="writeback"
            )

    async def erase(self, who: Recipient) -> None:
        """ActiveCampaign has no privacy-delete endpoint: DELETE the contact (404 = gone)."""
        api = self.api()
        async with api.session():
            cid = await self._contact_id(api, who)
            if cid is not None:
                await tolerate_missing(
                    api.request_json("DELETE", f"/contacts/{cid}", stream="writeback")
                )

    def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        return resync_when_refused(self._contacts, cursor, connector=self.name, stream=stream)

    async def _contacts(self, cursor: Cursor | None) -> AsyncGenerator[Page, None]:
        api = self.api()
        mark = Watermark.from_cursor(cursor, overlap=timedelta(seconds=1), strict=True)

        async def fetch(since: datetime | None, offset: int) -> tuple[list[Any], int | None]:
            params: dict[str, Any] = {
                "limit": self.page_size,
                "offset": offset,
                "orders[udate]": "ASC",
                "include": "contactLists",
            }
            if since is not None:
                params["filters[updated_after]"] = since.replace(microsecond=0).isoformat()
            body = await api.request_json("GET", "/contacts", params=params, stream="contacts")
            contacts = body.get("contacts") if isinstance(body, dict) else None
            if not isinstance(contacts, list):
                raise PermanentError(
                    f"{self.name}: ActiveCampaign answered without a 'contacts' list; "
                    "is base_url the account's API URL?",
                    connector=self.name,
                    stream="contacts",
                )
            statuses: dict[str, list[str]] = {}
            for membership in body.get("contactLists") or []:
                statuses.setdefault(str(membership.get("contact")), []).append(
                    str(membership.get("status"))
                )
            for contact in contacts:
                if isinstance(contact, dict):
                    mine = statuses.get(str(contact.get("id")), [])
                    contact["list_statuses"] = mine
                    contact["unsubscribed"] = bool(mine) and all(s == "2" for s in mine)
            total = str((body.get("meta") or {}).get("total") or "")
            return contacts, int(total) if total.isdigit() else None

        def parse(item: Any) -> RawRecord:
            return RawRecord(
                external_id=str(item["id"]),
                kind="contact",
                payload=item,
                updated_at=parse_datetime(item["udate"]),
                origin=f"activecampaign contact {item['id']}",
            )

        async with api.session():
            async for page in seek_pages(
                fetch, parse, mark, limit=self.page_size, origin="activecampaign contacts"
            ):
                yield page
