"""Klaviyo (JSON:API, date-versioned): profiles and events.

Both streams filter `greater-than(<field>, since - 1s)` sorted ascending and follow
`links.next` within a run. The stored cursor is the watermark, not Klaviyo's page cursor,
so an expired page cursor (400) restarts the query from the watermark of the last page read
(`resync_when_refused`), not a failed run. Unsubscribes and suppressions are in each
profile's `subscriptions` (requested as an additional field); deleted profiles simply
disappear (a `--full` run infers those deletions).

A profile merge deletes the source profile, moves its events to the destination profile and
adds a "Merged Profile" event to the destination (Klaviyo Help Center, identity resolution
FAQ). That event becomes `merged(source, destination)`, an alias (sync/aliases.py), when it
names the source profile in `MERGED_SOURCE_PROPERTY`; the public docs do not name that
property, so the name is an assumption to check against a real account.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import timedelta
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr

from connectors.base import Recipient, Stream, merged
from connectors.http import (
    ApiClient,
    HttpConnector,
    HttpConnectorConfig,
    header_auth,
    require_email,
)
from connectors.pagination import (
    LinksNextPaginator,
    Watermark,
    iso,
    reject_of,
    resync_when_refused,
)
from connectors.registry import register
from crmhub.errors import PermanentError
from crmhub.records import Cursor, Page, RawRecord
from crmhub.transforms import parse_datetime

__all__ = ["KlaviyoConnector"]

MERGED_METRIC = "Merged Profile"
MERGED_SOURCE_PROPERTY = "source_profile_id"  # unconfirmed: see the module docstring

# Canonical field -> profile attribute.
PROFILE_ATTRIBUTES = {
    "first_name": "first_name",
    "last_name": "last_name",
    "phone": "phone_number",
    "company": "organization",
    "job_title": "title",
}


@register("klaviyo", label="Klaviyo")
class KlaviyoConnector(HttpConnector["KlaviyoConnector.Config"]):
    """Profiles and events of one Klaviyo account (private API key)."""

    class Config(HttpConnectorConfig):
        api_key: SecretStr = Field(description="private API key (pk_...), read scopes")
        revision: str = Field("2024-10-15", description="API revision header (YYYY-MM-DD)")

    streams = frozenset({"contacts", "activities"})
    default_base_url = "https://a.klaviyo.com/api"
    default_rate = 10.0  # Get Profiles is tier L (75/s burst, 700/min steady)
    max_page_size = 100
    secret_name = "api_key"
    writable_fields: ClassVar[frozenset[str]] = frozenset(PROFILE_ATTRIBUTES)

    def auth_headers(self) -> dict[str, str]:
        return {
            **header_auth(
                "Authorization", self.config.api_key.get_secret_value(), prefix="Klaviyo-API-Key"
            ),
            "revision": self.config.revision,
            "accept": "application/vnd.api+json",
        }

    def account_key(self) -> str:
        return hashlib.sha256(self.config.api_key.get_secret_value().encode()).hexdigest()[:12]

    async def check(self) -> str:
        api = self.api()
        async with api.session():
            body = await api.request_json("GET", "/accounts", stream="contacts")
        data = body.get("data") if isinstance(body, dict) else None
        account = data[0].get("id") if isinstance(data, list) and data else "?"
        return f"Klaviyo account {account}: key accepted (revision {self.config.revision})"

    # -- write-back (scopes: profiles:write, subscriptions:write, data-privacy:write) ------

    async def push_consent(self, who: Recipient, status: Literal["unsubscribed"]) -> None:
        """Unsubscribe Profiles (a bulk job, 202): idempotent, never re-creates anyone."""
        email = require_email(self.name, who)
        body = {
            "data": {
                "type": "profile-subscription-bulk-delete-job",
                "attributes": {
                    "profiles": {"data": [{"type": "profile", "attributes": {"email": email}}]}
                },
            }
        }
        api = self.api()
        async with api.session():
            await api.request_json(
                "POST", "/profile-subscription-bulk-delete-jobs", json_body=body, stream="writeback"
            )

    async def update_fields(self, who: Recipient, fields: dict[str, Any]) -> None:
        """PATCH the profile by id (404 when deleted), else import by email (an upsert)."""
        attrs = {PROFILE_ATTRIBUTES[k]: v for k, v in fields.items() if k in PROFILE_ATTRIBUTES}
        api = self.api()
        async with api.session():
            if who.external_id:
                body = {"data": {"type": "profile", "id": who.external_id, "attributes": attrs}}
                await api.request_json(
                    "PATCH",
                    f"/profiles/{quote(who.external_id, safe='')}",
                    json_body=body,
                    stream="writeback",
                )
            else:
                attrs["email"] = require_email(self.name, who)
                body = {"data": {"type": "profile", "attributes": attrs}}
                await api.request_json(
                    "POST", "/profile-import", json_body=body, stream="writeback"
                )

    async def erase(self, who: Recipient) -> None:
        """Data Privacy API deletion job (asynchronous, irreversible, repeatable)."""
        attrs = {"email": who.email} if who.email else {"id": who.external_id}
        if not who.email and not who.external_id:
            raise PermanentError(f"{self.name}: nothing to erase by", connector=self.name)
        body = {
            "data": {
                "type": "data-privacy-deletion-job",
                "attributes": {"profile": {"data": {"type": "profile", "attributes": attrs}}},
            }
        }
        api = self.api()
        async with api.session():
            await api.request_json(
                "POST", "/data-privacy-deletion-jobs", json_body=body, stream="writeback"
            )

    def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        return resync_when_refused(
            lambda at: self._pages(stream, at), cursor, connector=self.name, stream=stream
        )

    async def _pages(self, stream: Stream, cursor: Cursor | None) -> AsyncGenerator[Page, None]:
        api = self.api()
        async with api.session():
            if stream == "contacts":
                pages = self._follow(
                    api,
                    cursor,
                    "/profiles",
                    "updated",
                    stream,
                    {"page[size]": self.page_size, "additional-fields[profile]": "subscriptions"},
                    _profile,
                )
            else:
                pages = self._follow(
                    api,
                    cursor,
                    "/events",
                    "datetime",
                    stream,
                    {"page[size]": min(self.page_size * 2, 200), "include": "profile,metric"},
                    _event,
                )
            async for page in pages:
                if stream == "activities":
                    page.records.extend(_merges(page.records))
                yield page

    async def _follow(
        self,
        api: ApiClient,
        cursor: Cursor | None,
        path: str,
        field: str,
        stream: Stream,
        base_params: dict[str, Any],
        parse: Callable[[Any, dict[Any, Any]], RawRecord],
    ) -> AsyncIterator[Page]:
        mark = Watermark.from_cursor(cursor, overlap=timedelta(seconds=1), strict=True)
        seen: set[tuple[str, Any]] = set()
        paginator = LinksNextPaginator()
        url, params = path, {**base_params, "sort": field}
        low = mark.query_from()
        if low is not None:
            params["filter"] = f"greater-than({field},{iso(low)})"
        while True:
            # An expired page cursor is a 400: `resync_when_refused` resumes from the mark.
            body = await api.request_json("GET", url, params=params, stream=stream)
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list):
                raise PermanentError(
                    f"{self.name}: Klaviyo answered without a 'data' list; is base_url right?",
                    connector=self.name,
                    stream=stream,
                )
            included = {
                (i.get("type"), i.get("id")): i
                for i in body.get("included") or []
                if isinstance(i, dict)
            }
            records, rejects = [], []
            for item in data:
                try:
                    record = parse(item, included)
                except (KeyError, TypeError, ValueError) as exc:
                    rejects.append(reject_of(item, f"klaviyo {path}", exc))
                    continue
                key = (record.external_id, record.updated_at)
                if key in seen or not mark.admit(record.external_id, record.updated_at):
                    continue
                seen.add(key)
                records.append(record)
            nxt = paginator.next_request(body, data, params)
            yield Page(records, mark.cursor(), rejects)
            if nxt is None:
                return
            url = nxt


def _profile(item: Any, included: dict[Any, Any]) -> RawRecord:
    attrs = item["attributes"]
    return RawRecord(
        external_id=str(item["id"]),
        kind="contact",
        payload=item,
        updated_at=parse_datetime(attrs["updated"]),
        origin=f"klaviyo profile {item['id']}",
    )


def _merges(events: list[RawRecord]) -> list[RawRecord]:
    """An alias for each "Merged Profile" event that names the profile merged away."""
    out = []
    for event in events:
        if event.payload.get("metric_name") != MERGED_METRIC or not event.payload.get("profile_id"):
            continue
        props = (event.payload.get("attributes") or {}).get("event_properties") or {}
        source = props.get(MERGED_SOURCE_PROPERTY)
        if source:
            survivor = str(event.payload["profile_id"])
            origin = f"klaviyo profile {source} merged into {survivor}"
            out.append(merged(str(source), survivor, event.updated_at, origin))
    return out


def _event(item: Any, included: dict[Any, Any]) -> RawRecord:
    """An event, with its profile's email and its metric's name copied in from `included`."""
    rels = item.get("relationships") or {}
    payload = dict(item)
    profile_ref = ((rels.get("profile") or {}).get("data")) or {}
    metric_ref = ((rels.get("metric") or {}).get("data")) or {}
    profile = included.get(("profile", profile_ref.get("id"))) or {}
    metric = included.get(("metric", metric_ref.get("id"))) or {}
    payload["profile_id"] = profile_ref.get("id")
    payload["profile_email"] = (profile.get("attributes") or {}).get("email")
    payload["metric_name"] = (metric.get("attributes") or {}).get("name")
    return RawRecord(
        external_id=str(item["id"]),
        kind="activity",
        payload=payload,
        updated_at=parse_datetime(item["attributes"]["datetime"]),
        origin=f"klaviyo event {item['id']}",
    )
