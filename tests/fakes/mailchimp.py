"""Fake Mailchimp Marketing API v3: list members (`count`/`offset`, `since_last_changed`,
`sort_field=last_changed`), sent campaigns and per-campaign email activity (`since`), Basic
auth with the API key as password, problem+json errors.

Writes: `PATCH /lists/{id}/members/{subscriber_hash}` (status, merge_fields; 404 for a
non-member) and `POST .../actions/delete-permanent` (204, then 404: the member is gone and
cannot be re-imported)."""

from __future__ import annotations

import bisect
import hashlib
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.fakes.server import FakeState, FastJSON, Person, changed_second, faulty, live_in_order

LIST_ID = "a1b2c3d4e5"
CAMPAIGN_ID = "42694e9e57"


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).replace(microsecond=0).isoformat()


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": "995c5cb0-3280-4a6e-808b-3b096d0bb219",
    }


def error_body(status: int, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    titles = {
        429: ("Too Many Requests", "You have exceeded the limit of 10 simultaneous connections."),
        401: (
            "API Key Invalid",
            "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
        ),
        404: ("Resource Not Found", "The requested resource could not be found."),
    }
    title, detail = titles.get(status, ("Internal Server Error", "An unexpected error occurred."))
    return problem(status, title, detail), {"Content-Type": "application/problem+json"}


def member(p: Person) -> dict[str, Any]:
    email = p.email.lower()
    out = {
        "id": hashlib.md5(email.encode()).hexdigest(),
        "email_address": p.email,
        "unique_email_id": f"u{p.id:09d}",
        "contact_id": f"c{p.id:031d}",
        "full_name": f"{p.first} {p.last}",
        "web_id": p.id,
        "email_type": "html",
        "status": p.status,
        "unsubscribe_reason": "N/A (Unsubscribed by an admin)"
        if p.status == "unsubscribed"
        else None,
        "merge_fields": {"FNAME": p.first, "LNAME": p.last, "PHONE": p.phone or "", "ADDRESS": ""},
        "interests": {},
        "stats": {"avg_open_rate": 0.5, "avg_click_rate": 0.1},
        "ip_signup": "",
        "timestamp_signup": "",
        "ip_opt": "198.51.100.7",
        # the (last) opt-in: a re-subscribe moves it, an unsubscribe leaves it
        "timestamp_opt": _ts(
            p.status_at if p.status == "subscribed" and p.status_at else p.created
        ),
        "member_rating": 2,
        "last_changed": _ts(p.updated),
        "language": "en",
        "vip": False,
        "location": {"latitude": 0, "longitude": 0, "country_code": "US", "timezone": ""},
        "source": "API - Generic",
        "tags_count": 0,
        "tags": [],
        "list_id": LIST_ID,
    }
    if p.broken:
        del out["last_changed"]
    return out


def make_app(state: FakeState, *, max_count: int = 1000) -> ASGIApp:
    def auth_error(request: Request) -> FastJSON | None:
        import base64

        header = request.headers.get("authorization", "")
        ok = False
        if header.startswith("Basic "):
            _, _, password = base64.b64decode(header[6:]).decode().partition(":")
            ok = password == state.token
        if not ok:
            body, headers = error_body(401, request.url.path)
            return FastJSON(body, 401, headers=headers)
        return None

    async def ping(request: Request) -> FastJSON:
        return auth_error(request) or FastJSON({"health_status": "Everything's Chimpy!"})

    async def members(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        if request.path_params["list_id"] != LIST_ID:
            body, headers = error_body(404, request.url.path)
            return FastJSON(body, 404, headers=headers)
        q = request.query_params
        count = min(int(q.get("count", 10)), max_count)
        offset = int(q.get("offset", 0))

        by_change = q.get("sort_field") == "last_changed"
        rows = state.view(("members", by_change), lambda: live_in_order(state, by_change))
        if "since_last_changed" in q:  # "changed after": strict, to the second
            low = _parse(q["since_last_changed"])
            if by_change:
                rows = rows[bisect.bisect_right(rows, low, key=changed_second) :]
            else:
                rows = [p for p in rows if changed_second(p) > low]
        if q.get("sort_dir") == "DESC":
            rows = rows[::-1]
        page = rows[offset : offset + count]
        return FastJSON(
            {
                "members": [member(p) for p in page],
                "list_id": LIST_ID,
                "total_items": len(rows),
                "_links": [],
            }
        )

    async def campaigns(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        sent = (
            [
                {
                    "id": CAMPAIGN_ID,
                    "type": "regular",
                    "status": "sent",
                    "recipients": {"list_id": LIST_ID},
                    "settings": {"subject_line": "Spring newsletter"},
                }
            ]
            if state.events
            else []
        )
        return FastJSON({"campaigns": sent, "total_items": len(sent), "_links": []})

    async def email_activity(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        q = request.query_params
        count = min(int(q.get("count", 10)), max_count)
        offset = int(q.get("offset", 0))
        campaign = request.path_params["campaign_id"]

        def recipients() -> list[dict[str, Any]]:
            events = state.events
            if "since" in q:
                low = _parse(q["since"])
                events = [e for e in events if e.at.replace(microsecond=0) > low]
            by_person: dict[int, list[dict[str, Any]]] = {}
            for e in events:
                if e.kind == "sent":
                    continue  # email-activity lists opens, clicks and bounces
                by_person.setdefault(e.person_id, []).append(
                    {"action": e.kind, "timestamp": _ts(e.at), "ip": "198.51.100.7"}
                )
            rows = []
            for pid in sorted(by_person):
                p = state.people[pid]
                rows.append(
                    {
                        "campaign_id": campaign,
                        "list_id": LIST_ID,
                        "list_is_active": True,
                        "email_id": hashlib.md5(p.email.lower().encode()).hexdigest(),
                        "email_address": p.email,
                        "activity": by_person[pid],
                    }
                )
            return rows

        rows = state.view(("activity", campaign, q.get("since")), recipients)
        return FastJSON(
            {
                "emails": rows[offset : offset + count],
                "campaign_id": request.path_params["campaign_id"],
                "total_items": len(rows),
                "_links": [],
            }
        )

    def find(request: Request) -> Person | None:
        if request.path_params["list_id"] != LIST_ID:
            return None
        wanted = request.path_params["hash"]
        for p in state.live():
            if hashlib.md5(p.email.lower().encode()).hexdigest() == wanted:
                return p
        return None

    def missing(request: Request) -> FastJSON:
        body, headers = error_body(404, request.url.path)
        return FastJSON(body, 404, headers=headers)

    async def patch_member(request: Request) -> FastJSON:
        if (err := auth_error(request)) is not None:
            return err
        person = find(request)
        if person is None:
            return missing(request)
        body = await request.json()
        changes: dict[str, Any] = {}
        if body.get("status") in ("subscribed", "unsubscribed"):
            changes["status"] = body["status"]
        names = {"FNAME": "first", "LNAME": "last", "PHONE": "phone"}
        for key, value in (body.get("merge_fields") or {}).items():
            if key in names:
                changes[names[key]] = value
        state.touch([person.id], **changes)
        state.writes.append(("update", person.email))
        return FastJSON(member(person))

    async def delete_permanent(request: Request) -> Response:
        if (err := auth_error(request)) is not None:
            return err
        person = find(request)
        if person is None:
            return missing(request)
        state.erase(person)
        state.writes.append(("erase", person.email))
        return Response(status_code=204)

    app = Starlette(
        routes=[
            Route("/3.0/lists/{list_id}/members/{hash}", patch_member, methods=["PATCH"]),
            Route(
                "/3.0/lists/{list_id}/members/{hash}/actions/delete-permanent",
                delete_permanent,
                methods=["POST"],
            ),
            Route("/3.0/ping", ping),
            Route("/3.0/lists/{list_id}/members", members),
            Route("/3.0/campaigns", campaigns),
            Route("/3.0/reports/{campaign_id}/email-activity", email_activity),
        ]
    )
    return faulty(app, state, error_body)
