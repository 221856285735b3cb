"""Fake ActiveCampaign API v3: contacts (`limit`/`offset`, `filters[updated_after]`,
`orders[udate]`, `include=contactLists` side-loading list status), `Api-Token` auth, account
timestamps with a -05:00 offset, string `meta.total`.

Writes: `GET /contacts?email=`, `PUT /contacts/{id}`, `GET /contacts/{id}/contactLists`,
`POST /contactLists` (status 2 unsubscribes) and `DELETE /contacts/{id}`; a missing contact
is 404 "No Result found for Subscriber with id N"."""

from __future__ import annotations

import bisect
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes.server import FakeState, FastJSON, Person, changed_second, faulty, live_in_order

ACCOUNT_TZ = timezone(timedelta(hours=-5))


def _ts(value: datetime) -> str:
    return value.astimezone(ACCOUNT_TZ).replace(microsecond=0).isoformat()


def error_body(status: int, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    if status == 403:
        return {"message": "No Result found for Subscriber with id 0"}, {}
    if status == 429:
        return {"message": "Too Many Requests"}, {}
    return {"message": "Internal Server Error"}, {}


def contact(p: Person) -> dict[str, Any]:
    out = {
        "id": str(p.id),
        "email": p.email,
        "phone": p.phone or "",
        "firstName": p.first,
        "lastName": p.last,
        "orgid": "0",
        "orgname": p.company or "",
        "cdate": _ts(p.created),
        "udate": _ts(p.updated),
        "deleted": "0",
        "anonymized": "0",
        "hash": f"{p.id:032x}",
        "bounced_hard": "1" if p.status == "cleaned" else "0",
        "bounced_soft": "0",
        "links": {"contactLists": f"/api/3/contacts/{p.id}/contactLists"},
    }
    if p.broken:
        del out["udate"]
    return out


def make_app(state: FakeState) -> ASGIApp:
    def auth_error(request: Request) -> FastJSON | None:
        if request.headers.get("api-token") != state.token:
            return FastJSON({"message": "Forbidden"}, 403)
        return None

    async def me(request: Request) -> FastJSON:
        return auth_error(request) or FastJSON(
            {"user": {"id": "1", "username": "admin", "email": "admin@shop.example"}}
        )

    async def contacts(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        q = request.query_params
        limit = min(int(q.get("limit", 20)), 100)
        offset = int(q.get("offset", 0))

        by_udate = q.get("orders[udate]") in ("ASC", "DESC")
        rows = state.view(("contacts", by_udate), lambda: live_in_order(state, by_udate))
        if "email" in q:
            rows = [p for p in rows if p.email.lower() == q["email"].lower()]
        if "filters[updated_after]" in q:  # strict, to the second
            low = datetime.fromisoformat(q["filters[updated_after]"])
            if by_udate:
                rows = rows[bisect.bisect_right(rows, low, key=changed_second) :]
            else:
                rows = [p for p in rows if changed_second(p) > low]
        if q.get("orders[udate]") == "DESC":
            rows = rows[::-1]
        page = rows[offset : offset + limit]
        body: dict[str, Any] = {
            "contacts": [contact(p) for p in page],
            "meta": {"total": str(len(rows)), "page_input": {"limit": limit, "offset": offset}},
        }
        if "contactLists" in q.get("include", ""):
            body["contactLists"] = [
                {
                    "contact": str(p.id),
                    "list": "1",
                    "id": str(p.id),
                    "status": "2" if p.status == "unsubscribed" else "1",
                }
                for p in page
            ]
        return FastJSON(body)

    def find(ident: str) -> Person | None:
        person = state.people.get(int(ident)) if ident.isdigit() else None
        return person if person is not None and person.deleted_at is None else None

    def gone(ident: str) -> FastJSON:
        return FastJSON({"message": f"No Result found for Subscriber with id {ident}"}, 404)

    names = {"firstName": "first", "lastName": "last", "phone": "phone"}

    async def one_contact(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        ident = request.path_params["ident"]
        person = find(ident)
        if person is None:
            return gone(ident)
        if request.method == "DELETE":
            state.erase(person)
            state.writes.append(("erase", person.email))
            return FastJSON({})
        if request.method == "PUT":
            attrs = (await request.json()).get("contact") or {}
            state.touch([person.id], **{names[k]: v for k, v in attrs.items() if k in names})
            state.writes.append(("update", person.email))
        return FastJSON({"contact": contact(person)})

    async def contact_lists(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        ident = request.path_params["ident"]
        person = find(ident)
        if person is None:
            return gone(ident)
        status = "2" if person.status == "unsubscribed" else "1"
        return FastJSON(
            {"contactLists": [{"contact": ident, "list": "1", "id": ident, "status": status}]}
        )

    async def set_list_status(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        body = (await request.json()).get("contactList") or {}
        ident = str(body.get("contact"))
        person = find(ident)
        if person is None:
            return gone(ident)
        status = "unsubscribed" if str(body.get("status")) == "2" else "subscribed"
        if person.status != status:
            state.touch([person.id], status=status)
        state.writes.append(
            ("unsubscribe" if status == "unsubscribed" else "subscribe", person.email)
        )
        return FastJSON({"contactList": {**body, "id": ident}}, 201)

    app = Starlette(
        routes=[
            Route("/api/3/contacts/{ident}", one_contact, methods=["GET", "PUT", "DELETE"]),
            Route("/api/3/contacts/{ident}/contactLists", contact_lists),
            Route("/api/3/contactLists", set_list_status, methods=["POST"]),
            Route("/api/3/users/me", me),
            Route("/api/3/contacts", contacts),
        ]
    )
    return faulty(app, state, error_body)
