"""Fake HubSpot CRM v3: contacts list (`after` paging, `archived`), contacts and emails search
(`lastmodifieddate`/`hs_lastmodifieddate` GTE epoch ms, ascending, 10,000-result cap), bearer
auth, `X-HubSpot-RateLimit-*` headers and the RATE_LIMIT error body."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes.server import Event, FakeState, Person, faulty

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


def make_app(state: FakeState) -> ASGIApp:
    def auth_error(request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {state.token}":
            body, _ = error_body(401, request.url.path)
            return JSONResponse(body, 401)
        return None

    def limits() -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Max": "190",
            "X-HubSpot-RateLimit-Remaining": "180",
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
        }

    async def list_contacts(request: Request) -> JSONResponse:
        if (err := auth_error(request)) is not None:
            return err
        q = request.query_params
        limit = min(int(q.get("limit", 10)), 100)
        archived = q.get("archived", "false") == "true"
        rows = sorted(
            (p for p in state.people.values() if (p.deleted_at is not None) == archived),
            key=lambda p: p.id,
        )
        after = int(q.get("after", 0))
        page = [p for p in rows if p.id > after][:limit]
        body: dict[str, Any] = {"results": [contact(p) for p in page]}
        if page and page[-1].id != rows[-1].id:
            body["paging"] = {"next": {"after": str(page[-1].id + 0), "link": "..."}}
        return JSONResponse(body, headers=limits())

    async def search(
        request: Request, rows: list[tuple[datetime, int, Any]], prop: str, render: Any
    ) -> JSONResponse:
        if (err := auth_error(request)) is not None:
            return err
        try:
            spec = await request.json()
        except ValueError:
            return JSONResponse({"status": "error", "message": "Invalid input JSON"}, 400)
        limit = min(int(spec.get("limit", 10)), 200)
        after = int(spec.get("after") or 0)
        low = None
        for group in spec.get("filterGroups", []):
            for f in group.get("filters", []):
                if f.get("propertyName") != prop or f.get("operator") != "GTE":
                    return JSONResponse({"status": "error", "message": "bad filter"}, 400)
                low = int(f["value"])
        if after + limit > SEARCH_CAP:
            return JSONResponse(
                {
                    "status": "error",
                    "message": "There was a problem with the request.",
                    "category": "VALIDATION_ERROR",
                },
                400,
            )
        matched = sorted(
            (r for r in rows if low is None or _ms(r[0]) >= low), key=lambda r: (r[0], r[1])
        )
        page = matched[after : after + limit]
        body: dict[str, Any] = {"total": len(matched), "results": [render(r[2]) for r in page]}
        if after + limit < len(matched):
            body["paging"] = {"next": {"after": str(after + limit)}}
        return JSONResponse(body)

    async def search_contacts(request: Request) -> JSONResponse:
        rows = [(p.updated, p.id, p) for p in state.live()]
        return await search(request, rows, "lastmodifieddate", contact)

    async def search_emails(request: Request) -> JSONResponse:
        people = state.people
        rows = [(e.at, e.id, e) for e in state.events]
        return await search(
            request, rows, "hs_lastmodifieddate", lambda e: email(e, people[e.person_id])
        )

    app = Starlette(
        routes=[
            Route("/crm/v3/objects/contacts", list_contacts),
            Route("/crm/v3/objects/contacts/search", search_contacts, methods=["POST"]),
            Route("/crm/v3/objects/emails/search", search_emails, methods=["POST"]),
        ]
    )
    return faulty(app, state, error_body)
