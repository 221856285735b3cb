"""Fake HubSpot CRM v3: contacts list (`after` paging, `archived`), contacts and emails search
(`lastmodifieddate`/`hs_lastmodifieddate` GTE epoch ms, ascending, 10,000-result cap), bearer
auth, `X-HubSpot-RateLimit-*` headers and the RATE_LIMIT error body.

Merges (`merge_contacts`): the survivor lists the merged ids in `hs_merged_object_ids` and
their addresses in `hs_additional_emails`, the merged ids are no longer listed and address the
survivor; with `new_record=True` both contacts merge into a new id, as HubSpot does now
(developer changelog, "Updated merge functionality for contacts and companies").

Writes: `PATCH /crm/v3/objects/contacts/{id}` (`idProperty=email`), communication
preferences v4 `unsubscribe-all`, and `POST /crm/v3/objects/contacts/gdpr-delete` (204; an
unknown email is blocklisted)."""

from __future__ import annotations

import bisect
import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes.server import Event, FakeState, FastJSON, Person, faulty

SEARCH_CAP = 10_000


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def error_body(status: int, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    if status == 429:
        return (
            {
                "status": "error",
                "message": "You have reached your ten_secondly_rolling limit.",
                "errorType": "RATE_LIMIT",
                "correlationId": str(uuid.uuid4()),
                "policyName": "TEN_SECONDLY_ROLLING",
            },
            {"X-HubSpot-RateLimit-Interval-Milliseconds": "10000"},
        )
    if status == 401:
        return (
            {
                "status": "error",
                "message": "Authentication credentials not found.",
                "category": "INVALID_AUTHENTICATION",
                "correlationId": str(uuid.uuid4()),
            },
            {},
        )
    return ({"status": "error", "message": "internal error", "category": "INTERNAL_ERROR"}, {})


def contact(p: Person) -> dict[str, Any]:
    props = {
        "email": p.email,
        "firstname": p.first,
        "lastname": p.last,
        "phone": p.phone,
        "company": p.company,
        "jobtitle": None,
        "city": None,
        "country": None,
        "lifecyclestage": "lead",
        "hs_email_optout": "true" if p.status != "subscribed" else "false",
        "createdate": _iso(p.created),
        "lastmodifieddate": _iso(p.updated),
        "hs_object_id": str(p.id),
    }
    if p.merged_ids:
        props["hs_merged_object_ids"] = ";".join(str(i) for i in p.merged_ids)
    extra = [e for e in p.extra_emails if e.lower() != p.email.lower()]
    if extra:
        props["hs_additional_emails"] = ";".join(extra)
    if p.broken:
        del props["lastmodifieddate"]
    out: dict[str, Any] = {
        "id": str(p.id),
        "properties": props,
        "createdAt": _iso(p.created),
        "updatedAt": _iso(p.updated),
        "archived": p.deleted_at is not None,
    }
    if p.deleted_at is not None:
        out["archivedAt"] = _iso(p.deleted_at)
    return out


def email(e: Event, p: Person) -> dict[str, Any]:
    headers = {
        "from": {"email": "news@shop.example", "firstName": "Shop", "lastName": "News"},
        "to": [{"email": p.email, "firstName": p.first, "lastName": p.last}],
        "cc": [],
        "bcc": [],
    }
    return {
        "id": str(e.id),
        "properties": {
            "hs_timestamp": _iso(e.at),
            "hs_email_direction": "EMAIL",
            "hs_email_subject": e.subject,
            "hs_email_text": f"Hello {p.first}",
            "hs_email_status": "BOUNCED" if e.kind == "bounce" else "SENT",
            "hs_email_headers": json.dumps(headers),
            "hs_lastmodifieddate": _iso(e.at),
            "hs_object_id": str(e.id),
        },
        "createdAt": _iso(e.at),
        "updatedAt": _iso(e.at),
        "archived": False,
    }


def merge_contacts(
    state: FakeState, primary: int, secondary: int, *, new_record: bool = False
) -> Person:
    """Merge `secondary` into `primary` (the primary keeps its id), or both into a new record
    that starts as a copy of the primary; returns the surviving person."""
    if not new_record:
        return state.merge(secondary, primary)
    base = state.people[primary]
    survivor = replace(base, id=max(state.people) + 1, merged_ids=[], extra_emails=[])
    state.people[survivor.id] = survivor
    state.merge(primary, survivor.id)
    return state.merge(secondary, survivor.id)


def make_app(state: FakeState) -> ASGIApp:
    def auth_error(request: Request) -> FastJSON | None:
        if request.headers.get("authorization") != f"Bearer {state.token}":
            body, _ = error_body(401, request.url.path)
            return FastJSON(body, 401)
        return None

    def limits() -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Max": "190",
            "X-HubSpot-RateLimit-Remaining": "180",
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
        }

    async def list_contacts(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        q = request.query_params
        limit = min(int(q.get("limit", 10)), 100)
        archived = q.get("archived", "false") == "true"
        rows = state.view(
            ("list", archived),
            lambda: sorted(
                (
                    (p for p in state.people.values() if p.deleted_at and p.merged_into is None)
                    if archived
                    else state.live()
                ),
                key=lambda p: p.id,
            ),
        )
        after = int(q.get("after", 0))
        start = bisect.bisect_right(rows, after, key=lambda p: p.id)
        page = rows[start : start + limit]
        body: dict[str, Any] = {"results": [contact(p) for p in page]}
        if page and page[-1].id != rows[-1].id:
            body["paging"] = {"next": {"after": str(page[-1].id + 0), "link": "..."}}
        return FastJSON(body, headers=limits())

    async def search(
        request: Request,
        rows_of: Callable[[], list[tuple[datetime, int, Any]]],
        prop: str,
        render: Any,
    ) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        try:
            spec = await request.json()
        except ValueError:
            return FastJSON({"status": "error", "message": "Invalid input JSON"}, 400)
        limit = min(int(spec.get("limit", 10)), 200)
        after = int(spec.get("after") or 0)
        low = None
        for group in spec.get("filterGroups", []):
            for f in group.get("filters", []):
                if f.get("propertyName") != prop or f.get("operator") != "GTE":
                    return FastJSON({"status": "error", "message": "bad filter"}, 400)
                low = int(f["value"])
        if after + limit > SEARCH_CAP:
            return FastJSON(
                {
                    "status": "error",
                    "message": "There was a problem with the request.",
                    "category": "VALIDATION_ERROR",
                },
                400,
            )
        everything = state.view(("search", prop), lambda: sorted(rows_of(), key=lambda r: r[:2]))
        start = 0 if low is None else bisect.bisect_left(everything, low, key=lambda r: _ms(r[0]))
        matched = everything[start:]
        page = matched[after : after + limit]
        body: dict[str, Any] = {"total": len(matched), "results": [render(r[2]) for r in page]}
        if after + limit < len(matched):
            body["paging"] = {"next": {"after": str(after + limit)}}
        return FastJSON(body)

    async def search_contacts(request: Request) -> FastJSON:
        return await search(
            request,
            lambda: [(p.updated, p.id, p) for p in state.live()],
            "lastmodifieddate",
            contact,
        )

    async def search_emails(request: Request) -> FastJSON:
        people = state.people
        return await search(
            request,
            lambda: [(e.at, e.id, e) for e in state.events],
            "hs_lastmodifieddate",
            lambda e: email(e, people[e.person_id]),
        )

    def not_found(what: str) -> FastJSON:
        return FastJSON(
            {
                "status": "error",
                "message": f"resource not found: {what}",
                "category": "OBJECT_NOT_FOUND",
            },
            404,
        )

    # Canonical Person attribute for each writable property.
    writable = {"firstname": "first", "lastname": "last", "phone": "phone", "company": "company"}

    async def update_contact(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        ident = request.path_params["ident"]
        if request.query_params.get("idProperty") == "email":
            person = state.by_email(ident)
        else:
            person = state.people.get(int(ident)) if ident.isdigit() else None
            while person is not None and person.merged_into is not None:
                person = state.people[person.merged_into]  # a merged id addresses the survivor
            person = person if person is not None and person.deleted_at is None else None
        if person is None:
            return not_found("contact")
        props = (await request.json()).get("properties") or {}
        changes = {writable[k]: v for k, v in props.items() if k in writable}
        state.touch([person.id], **changes)
        state.writes.append(("update", person.email))
        return FastJSON(contact(person))

    async def unsubscribe_all(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        person = state.by_email(request.path_params["subscriber"])
        if person is None:
            return not_found("subscriber")
        if person.status == "subscribed":
            state.touch([person.id], status="unsubscribed")
        state.writes.append(("unsubscribe", person.email))
        return FastJSON(
            {"results": [{"subscriberIdString": person.email, "status": "NOT_SUBSCRIBED"}]}
        )

    async def gdpr_delete(request: Request) -> Response:
        if (err := auth_error(request)) is not None:
            return err
        body = await request.json()
        ident = str(body.get("objectId") or "")
        if body.get("idProperty") == "email":
            person = state.by_email(ident)
            state.erased.add(ident.lower())  # found or not: the address is blocklisted
        else:
            person = state.people.get(int(ident)) if ident.isdigit() else None
        if person is not None:
            state.erase(person)
        state.writes.append(("erase", ident))
        return Response(status_code=204)

    app = Starlette(
        routes=[
            Route("/crm/v3/objects/contacts/gdpr-delete", gdpr_delete, methods=["POST"]),
            Route("/crm/v3/objects/contacts/{ident}", update_contact, methods=["PATCH"]),
            Route(
                "/communication-preferences/v4/statuses/{subscriber}/unsubscribe-all",
                unsubscribe_all,
                methods=["POST"],
            ),
            Route("/crm/v3/objects/contacts", list_contacts),
            Route("/crm/v3/objects/contacts/search", search_contacts, methods=["POST"]),
            Route("/crm/v3/objects/emails/search", search_emails, methods=["POST"]),
        ]
    )
    return faulty(app, state, error_body)
