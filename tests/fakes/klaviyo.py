"""Fake Klaviyo JSON:API: profiles (`filter=greater-than(updated,...)`, `sort=updated`,
`page[size]`, opaque keyset `page[cursor]` in `links.next`, subscriptions), events
(`greater-than(datetime,...)`, `include=profile,metric`), `Klaviyo-API-Key` auth, required
`revision` header, 429 with Retry-After and `RateLimit-*` headers, expiring page cursors.

Merges (`merge_profiles`): the source profile disappears, its events move to the destination
profile and a "Merged Profile" event is added to the destination (Klaviyo Help Center,
identity resolution FAQ), naming the source in `source_profile_id` (an assumption: the
public docs do not name that property).

Writes: `POST /profile-subscription-bulk-delete-jobs` (unsubscribe, 202), `PATCH
/profiles/{id}` (404 when deleted), `POST /profile-import` (upsert by email) and `POST
/data-privacy-deletion-jobs` (202; the profile disappears)."""

from __future__ import annotations

import base64
import bisect
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes.server import Event, FakeState, FastJSON, Person, faulty

_FILTER = re.compile(r"^greater-than\((updated|datetime),([^)]+)\)$")
METRICS = {
    "sent": "Received Email",
    "open": "Opened Email",
    "click": "Clicked Email",
    "bounce": "Bounced Email",
    "unsubscribe": "Unsubscribed",
    "merged_profile": "Merged Profile",
}


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def error(status: int, code: str, title: str, detail: str) -> dict[str, Any]:
    return {
        "errors": [
            {
                "id": str(uuid.uuid4()),
                "status": status,
                "code": code,
                "title": title,
                "detail": detail,
                "source": {"pointer": "/data/"},
            }
        ]
    }


def error_body(status: int, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    if status == 429:
        return error(
            429,
            "throttled",
            "Request was throttled.",
            "Request was throttled. Expected available in 1 second.",
        ), {"RateLimit-Limit": "75", "RateLimit-Remaining": "0", "RateLimit-Reset": "1"}
    if status == 401:
        return error(
            401,
            "not_authenticated",
            "Authentication credentials were not provided.",
            "Missing or invalid private key.",
        ), {}
    return error(status, "error", "A server error occurred.", "Please try again later."), {}


def profile(p: Person) -> dict[str, Any]:
    out = _profile(p)
    if p.broken:
        del out["attributes"]["updated"]
    return out


def _profile(p: Person) -> dict[str, Any]:
    consent = {"subscribed": "SUBSCRIBED", "unsubscribed": "UNSUBSCRIBED"}.get(
        p.status, "NEVER_SUBSCRIBED"
    )
    return {
        "type": "profile",
        "id": f"01P{p.id:023d}",
        "attributes": {
            "email": p.email,
            "phone_number": p.phone,
            "external_id": None,
            "first_name": p.first,
            "last_name": p.last,
            "organization": p.company,
            "title": None,
            "locale": "en-US",
            "image": None,
            "created": _ts(p.created),
            "updated": _ts(p.updated),
            "last_event_date": None,
            "location": {
                "address1": None,
                "city": None,
                "country": None,
                "region": None,
                "zip": None,
                "timezone": None,
            },
            "properties": {},
            "subscriptions": {
                "email": {
                    "marketing": {
                        "can_receive_email_marketing": consent == "SUBSCRIBED",
                        "consent": consent,
                        "consent_timestamp": _ts(p.status_at or p.created),
                        "suppression": [{"reason": "USER_SUPPRESSED", "timestamp": _ts(p.updated)}]
                        if consent == "UNSUBSCRIBED"
                        else [],
                    }
                }
            },
        },
        "relationships": {},
        "links": {"self": f"https://a.klaviyo.com/api/profiles/01P{p.id:023d}/"},
    }


def profile_id(person: int) -> str:
    return f"01P{person:023d}"


def merge_profiles(state: FakeState, source: int, destination: int) -> Person:
    """Merge profile `source` into `destination`: events move, a Merged Profile event marks it."""
    survivor = state.merge(source, destination)
    for e in state.events:
        if e.person_id == source:
            e.person_id = destination
    next_id = max((e.id for e in state.events), default=0) + 1
    state.events.append(Event(next_id, destination, "merged_profile", state.clock, about=source))
    return survivor


def event(e: Event) -> dict[str, Any]:
    props: dict[str, Any] = {"Subject": e.subject}
    if e.about is not None:
        props = {"source_profile_id": profile_id(e.about)}
    return {
        "type": "event",
        "id": f"E{e.id:010d}",
        "attributes": {
            "timestamp": int(e.at.timestamp()),
            "datetime": _ts(e.at),
            "uuid": str(uuid.UUID(int=e.id)),
            "event_properties": props,
        },
        "relationships": {
            "profile": {"data": {"type": "profile", "id": f"01P{e.person_id:023d}"}},
            "metric": {"data": {"type": "metric", "id": f"M{e.kind}"}},
        },
    }


def make_app(
    state: FakeState,
    *,
    expired_cursors: set[str] | None = None,
    issued_cursors: list[str] | None = None,
) -> ASGIApp:
    """`issued_cursors` collects every page cursor handed out; moving some into
    `expired_cursors` makes the server refuse them with 400, as Klaviyo does."""
    expired = expired_cursors if expired_cursors is not None else set()
    issued = issued_cursors if issued_cursors is not None else []

    def check(request: Request) -> FastJSON | None:
        if request.headers.get("authorization") != f"Klaviyo-API-Key {state.token}":
            return FastJSON(error_body(401, "")[0], 401)
        if not request.headers.get("revision"):
            return FastJSON(
                error(400, "invalid", "Invalid input.", "A revision header is required."), 400
            )
        return None

    def listing(
        request: Request,
        rows_of: Callable[[], list[tuple[datetime, int, Any]]],
        field: str,
        max_size: int,
        render: Any,
        included: list[dict[str, Any]] | None = None,
    ) -> FastJSON:
        q = request.query_params
        size = min(int(q.get("page[size]", 20)), max_size)
        low: datetime | None = None
        if "filter" in q:
            m = _FILTER.match(q["filter"])
            if m is None or m.group(1) != field:
                return FastJSON(
                    error(400, "invalid", "Invalid input.", f"unsupported filter {q['filter']!r}"),
                    400,
                )
            low = datetime.fromisoformat(m.group(2).replace("Z", "+00:00"))

        def ordered() -> list[tuple[datetime, int, Any]]:
            rows = rows_of()
            if low is not None:
                rows = [r for r in rows if r[0] > low]
            rows.sort(key=lambda r: (r[0], r[1]), reverse=q.get("sort") == f"-{field}")
            return rows

        rows = state.view((field, q.get("filter"), q.get("sort")), ordered)
        start = 0
        if "page[cursor]" in q:
            token = q["page[cursor]"]
            if token in expired:
                return FastJSON(
                    error(
                        400, "invalid", "Invalid input.", "The page cursor is invalid or expired."
                    ),
                    400,
                )
            # A keyset cursor: the page after the last record handed out (its sort key), so
            # records edited meanwhile move to the end without shifting unread ones.
            at, ident = json.loads(base64.urlsafe_b64decode(token))["after"]
            after = (datetime.fromisoformat(at), ident)
            if q.get("sort", "").startswith("-"):  # descending: the rows below the key
                start = sum(1 for r in rows if (r[0], r[1]) >= after)
            else:
                start = bisect.bisect_right(rows, after, key=lambda r: (r[0], r[1]))
        page = [(r[0], r[1], render(r[2])) for r in rows[start : start + size]]
        base = str(request.url.remove_query_params("page[cursor]"))
        nxt = None
        if start + size < len(rows):
            last = page[-1]
            raw = json.dumps({"after": [last[0].isoformat(), last[1]], "f": q.get("filter", "")})
            token = base64.urlsafe_b64encode(raw.encode()).decode()
            issued.append(token)
            sep = "&" if "?" in base else "?"
            nxt = f"{base}{sep}page[cursor]={token}"
        body: dict[str, Any] = {
            "data": [r[2] for r in page],
            "links": {"self": str(request.url), "next": nxt, "prev": None},
        }
        if included is not None:
            people = {int(r[2]["relationships"]["profile"]["data"]["id"][3:]) for r in page}
            metrics = {r[2]["relationships"]["metric"]["data"]["id"] for r in page}
            body["included"] = [profile(state.people[n]) for n in sorted(people)] + [
                i for i in included if i["id"] in metrics
            ]
        return FastJSON(
            body,
            headers={"RateLimit-Limit": "75", "RateLimit-Remaining": "74", "RateLimit-Reset": "1"},
        )

    async def accounts(request: Request) -> FastJSON:
        return check(request) or FastJSON({"data": [{"type": "account", "id": "ABC123"}]})

    async def profiles(request: Request) -> FastJSON:
        if (err := check(request)) is not None:
            return err
        return listing(
            request, lambda: [(p.updated, p.id, p) for p in state.live()], "updated", 100, profile
        )

    async def events(request: Request) -> FastJSON:
        if (err := check(request)) is not None:
            return err
        included: list[dict[str, Any]] | None = None
        if "include" in request.query_params:
            included = [
                {"type": "metric", "id": f"M{k}", "attributes": {"name": v}}
                for k, v in METRICS.items()
            ]
        return listing(
            request,
            lambda: [(e.at, e.id, e) for e in state.events],
            "datetime",
            200,
            event,
            included,
        )

    names = {
        "first_name": "first",
        "last_name": "last",
        "phone_number": "phone",
        "organization": "company",
    }

    def by_id(ident: str) -> Person | None:
        if not ident.startswith("01P") or not ident[3:].isdigit():
            return None
        person = state.people.get(int(ident[3:]))
        if person is None or person.deleted_at is not None or person.merged_into is not None:
            return None  # deleted or merged away: 404
        return person

    async def unsubscribe(request: Request) -> Response:
        if (err := check(request)) is not None:
            return err
        body = await request.json()
        profiles = body["data"]["attributes"]["profiles"]["data"]
        for item in profiles:
            person = state.by_email(item["attributes"]["email"])
            if person is not None and person.status == "subscribed":
                state.touch([person.id], status="unsubscribed")
            state.writes.append(("unsubscribe", item["attributes"]["email"]))
        return Response(status_code=202)

    async def patch_profile(request: Request) -> FastJSON:
        if (err := check(request)) is not None:
            return err
        person = by_id(request.path_params["ident"])
        if person is None:
            return FastJSON(error(404, "not_found", "Not found.", "Profile not found."), 404)
        attrs = (await request.json())["data"]["attributes"]
        state.touch([person.id], **{names[k]: v for k, v in attrs.items() if k in names})
        state.writes.append(("update", person.email))
        return FastJSON({"data": profile(person)})

    async def profile_import(request: Request) -> FastJSON:
        if (err := check(request)) is not None:
            return err
        attrs = (await request.json())["data"]["attributes"]
        person = state.by_email(attrs["email"])
        if person is None:
            person = state.add_people(1)[0]
            person.email = attrs["email"]
        state.touch([person.id], **{names[k]: v for k, v in attrs.items() if k in names})
        state.writes.append(("update", person.email))
        return FastJSON({"data": profile(person)})

    async def privacy_delete(request: Request) -> Response:
        if (err := check(request)) is not None:
            return err
        attrs = (await request.json())["data"]["attributes"]["profile"]["data"]["attributes"]
        person = state.by_email(attrs["email"]) if "email" in attrs else by_id(attrs["id"])
        if person is not None:
            state.erase(person)
        state.writes.append(("erase", attrs.get("email") or attrs.get("id")))
        return Response(status_code=202)

    app = Starlette(
        routes=[
            Route("/api/profile-subscription-bulk-delete-jobs", unsubscribe, methods=["POST"]),
            Route("/api/profiles/{ident}", patch_profile, methods=["PATCH"]),
            Route("/api/profile-import", profile_import, methods=["POST"]),
            Route("/api/data-privacy-deletion-jobs", privacy_delete, methods=["POST"]),
            Route("/api/accounts", accounts),
            Route("/api/profiles", profiles),
            Route("/api/events", events),
        ]
    )
    return faulty(app, state, error_body)
