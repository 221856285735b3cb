"""HubSpot CRM v3: contacts (search on `lastmodifieddate`), archived contacts as deletions,
and email engagements (search on `hs_lastmodifieddate`) as activities.

A merge leaves the survivor listing the ids merged into it (`hs_merged_object_ids`; the old
ids are no longer listed) and their addresses in `hs_additional_emails`: each merged id
becomes `merged(old, survivor)`, an alias (sync/aliases.py), never a deletion.

Incremental reads use the search endpoint sorted ascending and seek from the watermark each
page, so a query never pages towards HubSpot's 10,000-result search cap. Archived contacts
have no change filter: every contacts run lists them and yields a deletion for each one
archived since the last run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr

from connectors.base import Recipient, Stream, merged
from connectors.http import (
    ApiClient,
    HttpConnector,
    HttpConnectorConfig,
    bearer_auth,
    require_email,
)
from connectors.pagination import (
    AfterPaginator,
    Watermark,
    iso,
    resync_when_refused,
    seek_pages,
)
from connectors.registry import register
from crmhub.errors import PermanentError
from crmhub.records import Cursor, Page, RawRecord
from crmhub.transforms import parse_datetime

__all__ = ["HubSpotConnector"]

CONTACT_PROPERTIES = (
    "email",
    "firstname",
    "lastname",
    "phone",
    "mobilephone",
    "company",
    "jobtitle",
    "address",
    "city",
    "state",
    "zip",
    "country",
    "lifecyclestage",
    "hs_email_optout",
    "createdate",
    "lastmodifieddate",
    "hs_merged_object_ids",  # ids merged into this one: aliases, not deletions
    "hs_additional_emails",  # the addresses of the contacts merged into this one (";")
)
EMAIL_PROPERTIES = (
    "hs_timestamp",
    "hs_email_direction",
    "hs_email_subject",
    "hs_email_text",
    "hs_email_status",
    "hs_email_headers",
    "hs_lastmodifieddate",
)

# Canonical field -> HubSpot contact property, for `writeback.fields`.
WRITE_PROPERTIES = {
    "first_name": "firstname",
    "last_name": "lastname",
    "phone": "phone",
    "company": "company",
    "job_title": "jobtitle",
    "street": "address",
    "city": "city",
    "region": "state",
    "postal_code": "zip",
    "country": "country",
}


@register("hubspot", label="HubSpot")
class HubSpotConnector(HttpConnector["HubSpotConnector.Config"]):
    """Contacts and email engagements from one HubSpot account (private app token)."""

    class Config(HttpConnectorConfig):
        token: SecretStr = Field(description="private app access token (crm.objects.contacts.read)")
        extra_properties: list[str] = Field(
            default_factory=list, description="more contact properties to fetch"
        )

    streams = frozenset({"contacts", "activities"})
    default_base_url = "https://api.hubapi.com"
    default_rate = 4.0  # the search API's own limit (4-5/s per token)
    max_page_size = 200
    secret_name: ClassVar[str] = "token"
    writable_fields: ClassVar[frozenset[str]] = frozenset(WRITE_PROPERTIES)

    def auth_headers(self) -> dict[str, str]:
        return bearer_auth(self.config.token.get_secret_value())

    def account_key(self) -> str:
        return hashlib.sha256(self.config.token.get_secret_value().encode()).hexdigest()[:12]

    async def check(self) -> str:
        api = self.api()
        async with api.session():
            await api.request_json(
                "GET", "/crm/v3/objects/contacts", params={"limit": 1}, stream="contacts"
            )
        return f"HubSpot at {api.base_url}: token accepted, contacts readable"

    def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        return resync_when_refused(
            lambda at: self._pages(stream, at), cursor, connector=self.name, stream=stream
        )

    async def _pages(self, stream: Stream, cursor: Cursor | None) -> AsyncGenerator[Page, None]:
        api = self.api()
        async with api.session():
            pages = (
                self._contacts(api, cursor) if stream == "contacts" else self._emails(api, cursor)
            )
            async for page in pages:
                yield page

    # -- write-back (needs the crm.objects.contacts.write and communication_preferences
    # scopes; GDPR delete needs crm.objects.contacts.write too) ------------------------

    async def push_consent(self, who: Recipient, status: Literal["unsubscribed"]) -> None:
        """Unsubscribe from every email subscription (v4 `unsubscribe-all`, idempotent)."""
        email = require_email(self.name, who)
        api = self.api()
        async with api.session():
            await api.request_json(
                "POST",
                f"/communication-preferences/v4/statuses/{quote(email, safe='')}/unsubscribe-all",
                params={"channel": "EMAIL"},
                stream="writeback",
            )

    async def update_fields(self, who: Recipient, fields: dict[str, Any]) -> None:
        """PATCH the contact by id (or by email with `idProperty=email`): an idempotent set."""
        props = {WRITE_PROPERTIES[k]: v for k, v in fields.items() if k in WRITE_PROPERTIES}
        params = {} if who.external_id else {"idProperty": "email"}
        ident = who.external_id or require_email(self.name, who)
        api = self.api()
        async with api.session():
            await api.request_json(
                "PATCH",
                f"/crm/v3/objects/contacts/{quote(ident, safe='')}",
                params=params,
                json_body={"properties": props},
                stream="writeback",
            )

    async def erase(self, who: Recipient) -> None:
        """GDPR delete: permanent; an unknown email is blocklisted instead (both 204)."""
        body: dict[str, Any] = (
            {"objectId": who.email, "idProperty": "email"}
            if who.email
            else {"objectId": who.external_id}
        )
        if not who.email and not who.external_id:
            raise PermanentError(f"{self.name}: nothing to erase by", connector=self.name)
        api = self.api()
        async with api.session():
            await api.request_json(
                "POST", "/crm/v3/objects/contacts/gdpr-delete", json_body=body, stream="writeback"
            )

    # -- contacts ---------------------------------------------------------------------

    async def _contacts(self, api: ApiClient, cursor: Cursor | None) -> AsyncIterator[Page]:
        mark = Watermark.from_cursor(cursor)
        archived_since = (cursor or {}).get("archived_since")
        properties = [*CONTACT_PROPERTIES, *self.config.extra_properties]
        fetch = self._search(api, "contacts", "lastmodifieddate", properties)

        def parse(item: Any) -> RawRecord:
            return RawRecord(
                external_id=str(item["id"]),
                kind="contact",
                payload=item,
                updated_at=parse_datetime(item["properties"]["lastmodifieddate"]),
                origin=f"hubspot contact {item['id']}",
            )

        async for page in seek_pages(
            fetch,
            parse,
            mark,
            limit=self.page_size,
            origin="hubspot contacts search",
            cursor_extra=lambda: {"archived_since": archived_since} if archived_since else {},
        ):
            page.records.extend(_merges(page.records))
            yield page
        async for page in self._archived(api, mark, archived_since):
            yield page

    async def _archived(
        self, api: ApiClient, mark: Watermark, archived_since: str | None
    ) -> AsyncIterator[Page]:
        """Deletions: contacts archived after `archived_since` (the list has no filter)."""
        low = parse_datetime(archived_since) if archived_since else None
        newest = low
        paginator = AfterPaginator(limit=min(self.page_size, 100))
        params: dict[str, Any] = {"archived": "true", "properties": "email"}
        paginator.init_request(params)
        while True:
            body = await api.request_json(
                "GET", "/crm/v3/objects/contacts", params=params, stream="contacts"
            )
            items = _results(body, self.name, "contacts")
            records = []
            for item in items:
                at = item.get("archivedAt")
                when = parse_datetime(at) if at else None
                if when is not None and low is not None and when <= low:
                    continue
                if when is not None and (newest is None or when > newest):
                    newest = when
                records.append(
                    RawRecord(str(item["id"]), "deletion", item, when, "hubspot archived contact")
                )
            more = paginator.next_request(body, items, params)
            # The archived mark only moves once the whole list has been read.
            done_mark = iso(newest) if (more is None and newest) else archived_since
            extra = {"archived_since": done_mark} if done_mark else {}
            yield Page(records, mark.cursor(**extra))
            if more is None:
                return

    # -- email engagements ------------------------------------------------------------

    async def _emails(self, api: ApiClient, cursor: Cursor | None) -> AsyncIterator[Page]:
        mark = Watermark.from_cursor(cursor)
        fetch = self._search(api, "emails", "hs_lastmodifieddate", list(EMAIL_PROPERTIES))

        def parse(item: Any) -> RawRecord:
            props = item["properties"]
            payload = dict(item)
            payload["participants"] = _participants(props.get("hs_email_headers"))
            return RawRecord(
                external_id=str(item["id"]),
                kind="activity",
                payload=payload,
                updated_at=parse_datetime(props["hs_lastmodifieddate"]),
                origin=f"hubspot email {item['id']}",
            )

        async for page in seek_pages(
            fetch, parse, mark, limit=self.page_size, origin="hubspot emails search"
        ):
            yield page

    def _search(self, api: ApiClient, obj: str, prop: str, properties: list[str]) -> Any:
        stream = "contacts" if obj == "contacts" else "activities"

        async def fetch(since: datetime | None, offset: int) -> tuple[list[Any], int | None]:
            body: dict[str, Any] = {
                "filterGroups": [],
                "sorts": [{"propertyName": prop, "direction": "ASCENDING"}],
                "properties": properties,
                "limit": self.page_size,
            }
            if since is not None:
                ms = str(int(since.timestamp() * 1000))
                body["filterGroups"] = [
                    {"filters": [{"propertyName": prop, "operator": "GTE", "value": ms}]}
                ]
            if offset:
                body["after"] = str(offset)
            data = await api.request_json(
                "POST", f"/crm/v3/objects/{obj}/search", json_body=body, stream=stream
            )
            total = data.get("total") if isinstance(data, dict) else None
            return _results(data, self.name, stream), total if isinstance(total, int) else None

        return fetch


def _results(body: Any, connector: str, stream: str) -> list[Any]:
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise PermanentError(
            f"{connector}: HubSpot answered without a 'results' list; is base_url right?",
            connector=connector,
            stream=stream,
        )
    return results


def _merges(contacts: list[RawRecord]) -> list[RawRecord]:
    """An alias for every id merged into one of `contacts` (`hs_merged_object_ids`). The
    survivor lists them for good; repeats are no-ops in the store."""
    out = []
    for record in contacts:
        ids = (record.payload.get("properties") or {}).get("hs_merged_object_ids")
        for old in str(ids or "").split(";"):
            old = old.strip()
            if old and old != record.external_id:
                origin = f"hubspot contact {old} merged into {record.external_id}"
                out.append(merged(old, record.external_id, record.updated_at, origin))
    return out


def _participants(headers: Any) -> list[str]:
    """Every address in `hs_email_headers` (a JSON string: from, to[], cc[], bcc[])."""
    if not isinstance(headers, str) or not headers:
        return []
    try:
        parsed = json.loads(headers)
    except ValueError:
        return []
    people = [parsed.get("from") or {}]
    for key in ("to", "cc", "bcc"):
        people.extend(parsed.get(key) or [])
    return [p["email"] for p in people if isinstance(p, dict) and p.get("email")]
