"""The steward UI: server-rendered pages (Jinja2, autoescaped) with htmx for partial updates.

Sign-in, the review queue, the compare view with one-key decisions, golden records with
lineage and unmerge, search and the audit log. Every page but sign-in needs a session; every
state change needs the steward role and the session's CSRF token.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from crmhub.errors import DedupeError
from crmhub.web.steward.auth import (
    CSRF_FIELD,
    MAX_ID,
    DbId,
    PageNo,
    WebSession,
    check_origin,
    clean_text,
    cookie_name,
    db_of,
    throttle_of,
    ui_role,
)
from crmhub.web.steward.nav import open_after
from sync import review
from sync.history import golden_history
from sync.outbox import disclosures
from sync.quality import BLANKS_WINDOW, QUALITY_FIELDS, blank_incidents, source_quality
from sync.queries import dead_letters, golden_detail, list_runs, search_golden
from sync.users import SESSION_TTL, authenticate, create_session, end_session

__all__ = ["router"]

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
STATIC = {name: HERE / "static" / name for name in ("htmx.min.js", "steward.js", "steward.css")}
PAGE_SIZE = 50

templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)

viewer = Depends(ui_role("viewer"))
steward = Depends(ui_role("steward"))

_HEADERS = {
    # No inline script or style anywhere: the policy can be strict.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def render(
    request: Request,
    name: str,
    session: WebSession | None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    context.update(
        session=session,
        user=session.user if session else None,
        csrf=session.csrf if session else "",
        csrf_field=CSRF_FIELD,
    )
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(_HEADERS)
    return response


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _safe_next(target: str | None) -> str:
    """Only same-site paths: `next=//evil.example` must not bounce a user off-site."""
    if (
        target
        and target.startswith("/")
        and not target.startswith("//")
        and "\\" not in target
        and all(ch.isprintable() and ch != " " for ch in target)  # browsers drop tabs: "/\t/x"
    ):
        return target
    return "/queue"


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    path = STATIC.get(name)
    if path is None:
        raise HTTPException(404, "no such file")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    return render(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login")
def login(
    request: Request,
    name: str = Form(..., max_length=100),
    password: str = Form(..., max_length=1000),
    next: str = Form("/queue"),
) -> Response:
    check_origin(request)  # no sign-in from another site's form (login CSRF)
    name = clean_text(name) or ""
    throttle = throttle_of(request)
    client = request.client.host if request.client else "?"
    if throttle.blocked(name, client):
        log.warning("sign-in throttled for a name or client")
        return render(
            request,
            "login.html",
            None,
            status_code=429,
            next=_safe_next(next),
            error="Too many failed sign-ins. Wait a few minutes and try again.",
        )
    with db_of(request).connect() as conn:
        user = authenticate(conn, name, password)
    if user is None:
        throttle.failed(name, client)
        return render(
            request,
            "login.html",
            None,
            status_code=401,
            next=_safe_next(next),
            error="Wrong name or password.",
        )
    throttle.succeeded(name)
    previous = request.cookies.get(cookie_name(request))
    if previous:
        end_session(db_of(request), previous)  # a new session id at every sign-in
    session_id, _csrf = create_session(db_of(request), user)
    log.info("user %s signed in", user.id)
    response = _see_other(_safe_next(next))
    response.set_cookie(
        cookie_name(request),
        session_id,
        max_age=int(SESSION_TTL.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request, session: WebSession = viewer) -> Response:
    end_session(db_of(request), session.session_id)
    response = _see_other("/login")
    response.delete_cookie(
        cookie_name(request), path="/", secure=request.url.scheme == "https", httponly=True
    )
    return response


@router.get("/")
def home(session: WebSession = viewer) -> Response:
    return _see_other("/queue")


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _days(value: str | None) -> float | None:
    """An age filter from the form: days, or None when empty or out of range."""
    days = _float(value)
    return days if days is not None and 0 <= days <= review.MAX_AGE_DAYS else None


SORT_LABELS = {
    "best": "Best first",
    "borderline": "Borderline first",
    "oldest": "Oldest first",
    "newest": "Newest first",
}


@router.get("/queue")
def queue(
    request: Request,
    status: str = "open",
    min_score: str | None = None,
    max_score: str | None = None,
    source: str | None = None,
    min_age_days: str | None = None,
    max_age_days: str | None = None,
    sort: str = "best",
    page: PageNo = 1,
    done: str | None = None,
    session: WebSession = viewer,
) -> Response:
    """The merge-review queue, best first by default; filters, sort, paging, counts."""
    page = max(1, page)
    source = clean_text(source)
    status = status if status in (*review.STATUSES, "all") else "open"
    sort = sort if sort in review.SORTS else "best"
    low, high = _float(min_score), _float(max_score)
    older, newer = _days(min_age_days), _days(max_age_days)
    filters = {
        "status": status,
        "min_score": low,
        "max_score": high,
        "source": source or None,
        "min_age_days": older,
        "max_age_days": newer,
        "sort": sort if sort != "best" else None,
    }
    with db_of(request).connect() as conn:
        items, total = review.list_reviews(
            conn,
            status=status,
            min_score=low,
            max_score=high,
            source=source or None,
            min_age_days=older,
            max_age_days=newer,
            sort=sort,
            limit=PAGE_SIZE,
            offset=(page - 1) * PAGE_SIZE,
        )
        counts = review.review_counts(conn)
    query = {k: v for k, v in filters.items() if v is not None}
    pages = max(1, (min(total, review.COUNT_CAP) + PAGE_SIZE - 1) // PAGE_SIZE)
    template = "queue_table.html" if request.headers.get("HX-Request") else "queue.html"
    return render(
        request,
        template,
        session,
        items=items,
        total=total,
        counts=counts,
        filters=filters,
        page=page,
        pages=pages,
        prev_url=f"/queue?{urlencode({**query, 'page': page - 1})}" if page > 1 else None,
        next_url=f"/queue?{urlencode({**query, 'page': page + 1})}" if page < pages else None,
        statuses=(*review.STATUSES, "all"),
        sorts=SORT_LABELS,
        count_cap=review.COUNT_CAP,
        done=done,
    )


@router.get("/queue/next")
def queue_next(
    request: Request,
    done: str | None = None,
    after: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    session: WebSession = viewer,
) -> Response:
    """The best open pair (or the one after `after`, undecided), or the queue when none is."""
    with db_of(request).connect() as conn:
        if after is None:
            items, _ = review.list_reviews(conn, limit=1)
            found = items[0]["id"] if items else None
        else:
            found = open_after(conn, after)
            if found is None and not done:
                done = "no other pair is open"
    suffix = f"?{urlencode({'done': done})}" if done else ""
    return _see_other(f"/review/{found}{suffix}" if found is not None else f"/queue{suffix}")


def _compare(
    request: Request, session: WebSession, review_id: int, error: str | None, done: str | None
) -> Response:
    try:
        with db_of(request).connect() as conn:
            item = review.show_review(conn, review_id)
    except review.NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    return render(
        request,
        "compare.html",
        session,
        status_code=409 if error else 200,
        item=item,
        error=error,
        done=done,
    )


@router.get("/review/{review_id}")
def compare(
    request: Request, review_id: DbId, done: str | None = None, session: WebSession = viewer
) -> Response:
    """Two records side by side: differences highlighted, the matcher's evidence per field."""
    return _compare(request, session, review_id, None, done)


@router.post("/review/{review_id}/approve")
async def approve(request: Request, review_id: DbId, session: WebSession = steward) -> Response:
    form = await request.form()
    choices: dict[str, int] = {}
    for key, value in form.multi_items():
        if key.startswith("keep_") and isinstance(value, str) and value.isdigit():
            choices[key.removeprefix("keep_")] = int(value)
    seen = form.get("seen")
    return await _decide(
        request,
        session,
        review_id,
        "approved",
        lambda: review.approve(
            db_of(request),
            review_id,
            session.user.name,
            choices=choices,
            seen=seen if isinstance(seen, str) and seen else None,
        ),
    )


@router.post("/review/{review_id}/reject")
async def reject(request: Request, review_id: DbId, session: WebSession = steward) -> Response:
    seen = (await request.form()).get("seen")
    return await _decide(
        request,
        session,
        review_id,
        "rejected",
        lambda: review.reject(
            db_of(request),
            review_id,
            session.user.name,
            seen=seen if isinstance(seen, str) and seen else None,
        ),
    )


@router.post("/review/{review_id}/skip")
async def skip(request: Request, review_id: DbId, session: WebSession = steward) -> Response:
    return await _decide(
        request,
        session,
        review_id,
        "skipped",
        lambda: review.skip(db_of(request), review_id, session.user.name),
    )


async def _decide(
    request: Request, session: WebSession, review_id: int, verb: str, action: Any
) -> Response:
    from starlette.concurrency import run_in_threadpool

    try:
        await run_in_threadpool(action)
    except review.NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    except DedupeError as exc:
        return await run_in_threadpool(_compare, request, session, review_id, str(exc), None)
    return _see_other(f"/queue/next?{urlencode({'done': f'{verb} #{review_id}'})}")


@router.post("/undo")
def undo(request: Request, session: WebSession = steward) -> Response:
    try:
        result = review.undo_last(db_of(request), session.user.name)
    except DedupeError as exc:
        return _see_other(f"/audit?{urlencode({'done': str(exc)})}")
    return _see_other(f"/audit?{urlencode({'done': 'undid ' + result['action']})}")


@router.get("/golden/{golden_id}")
def golden(
    request: Request, golden_id: DbId, done: str | None = None, session: WebSession = viewer
) -> Response:
    """A golden record: fields with their source, member records, timeline, history."""
    with db_of(request).connect() as conn:
        detail = golden_detail(conn, golden_id)
        if detail is None:
            raise HTTPException(404, f"no golden record {golden_id}")
        told = disclosures(conn, detail["id"])
        history = golden_history(conn, detail["id"])
    return render(request, "golden.html", session, g=detail, done=done, told=told, history=history)


@router.post("/golden/{golden_id}/unmerge")
def unmerge(
    request: Request,
    golden_id: DbId,
    record_id: int = Form(..., ge=1, le=MAX_ID),
    session: WebSession = steward,
) -> Response:
    with db_of(request).connect() as conn:
        detail = golden_detail(conn, golden_id)
    if detail is None or record_id not in {m["record_id"] for m in detail["members"]}:
        raise HTTPException(404, f"record {record_id} is not a member of golden {golden_id}")
    try:
        result = review.unmerge(db_of(request), record_id, session.user.name)
    except DedupeError as exc:
        return _see_other(f"/golden/{golden_id}?{urlencode({'done': str(exc)})}")
    done = f"split record {record_id} off golden record {golden_id}"
    return _see_other(f"/golden/{result['new_golden_id']}?{urlencode({'done': done})}")


@router.get("/buckets")
def buckets(request: Request, done: str | None = None, session: WebSession = viewer) -> Response:
    """Rule buckets of open pairs, for bulk approval."""
    with db_of(request).connect() as conn:
        rows = review.bucket_counts(conn)
    return render(request, "buckets.html", session, rows=rows, done=done)


@router.get("/buckets/{bucket}")
def bucket(request: Request, bucket: str, session: WebSession = viewer) -> Response:
    """A random sample of a bucket, and the confirmation to approve all of it."""
    try:
        with db_of(request).connect() as conn:
            preview = review.bucket_preview(conn, bucket, sample=5)
    except review.NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    return render(request, "bucket.html", session, p=preview)


@router.post("/buckets/{bucket}/approve")
def bucket_approve(
    request: Request,
    bucket: str,
    expected_count: int = Form(...),
    confirm: str = Form(""),
    session: WebSession = steward,
) -> Response:
    if confirm != "yes":
        return _see_other(f"/buckets/{bucket}")
    try:
        result = review.approve_bucket(
            db_of(request), bucket, session.user.name, expected=expected_count
        )
    except DedupeError as exc:
        return _see_other(f"/buckets?{urlencode({'done': str(exc)})}")
    done = f"bucket {bucket}: {result['approved']} pairs approved"
    return _see_other(f"/buckets?{urlencode({'done': done})}")


@router.get("/sources")
def sources(request: Request, session: WebSession = viewer) -> Response:
    """Connectors, their recent runs, and data quality per source."""
    settings = request.app.state.settings
    with db_of(request).connect() as conn:
        quality = source_quality(conn)
        runs = list_runs(conn, limit=30)
    return render(
        request,
        "sources.html",
        session,
        connectors=sorted(settings.connectors),
        quality=quality,
        runs=runs,
        fields=QUALITY_FIELDS,
        blanks_days=BLANKS_WINDOW.days,
    )


@router.get("/sources/blanks")
def blanks(
    request: Request, source: str | None = None, page: PageNo = 1, session: WebSession = viewer
) -> Response:
    """Blank-overwrite incidents, newest first: which record of which source lost which field."""
    page = max(1, page)
    source = clean_text(source) or None
    with db_of(request).connect() as conn:
        items, total = blank_incidents(conn, source, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    query = {"source": source} if source else {}
    pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)
    return render(
        request,
        "blanks.html",
        session,
        items=items,
        total=total,
        source=source or "",
        page=page,
        pages=pages,
        prev_url=f"/sources/blanks?{urlencode({**query, 'page': page - 1})}" if page > 1 else None,
        next_url=(
            f"/sources/blanks?{urlencode({**query, 'page': page + 1})}" if page < pages else None
        ),
    )


@router.get("/errors")
def errors(request: Request, source: str | None = None, session: WebSession = viewer) -> Response:
    """Dead letters: records (and field values) a source sent that could not be used."""
    with db_of(request).connect() as conn:
        source = clean_text(source)
        rows = dead_letters(conn, source=source or None, limit=200)
    return render(request, "errors.html", session, rows=rows, source=source or "")


admin = Depends(ui_role("admin"))


@router.get("/admin/forget")
def forget_form(request: Request, done: str | None = None, session: WebSession = admin) -> Response:
    """Erasure: remove a person everywhere (admins only)."""
    return render(request, "forget.html", session, done=done)


@router.post("/admin/forget")
def forget(
    request: Request,
    identifier: str = Form(..., max_length=300),
    confirm: str = Form(""),
    session: WebSession = admin,
) -> Response:
    from sync.erasure import forget as erase

    if confirm != "yes":
        return _see_other("/admin/forget")
    try:
        result = erase(db_of(request), clean_text(identifier) or "", session.user.name)
    except DedupeError as exc:
        return _see_other(f"/admin/forget?{urlencode({'done': str(exc)})}")
    done = (
        f"erased {result['golden_records']} golden record(s), "
        f"{result['source_records']} source record(s), {result['activities']} activities"
    )
    return _see_other(f"/admin/forget?{urlencode({'done': done})}")


@router.get("/search")
def search(request: Request, q: str = "", session: WebSession = viewer) -> Response:
    """Golden records by email, phone, name or company."""
    rows: list[dict[str, Any]] = []
    q = clean_text(q) or ""
    if q.strip():
        with db_of(request).connect() as conn:
            rows = search_golden(conn, q[:200], limit=50)
    return render(request, "search.html", session, q=q, rows=rows)


@router.get("/audit")
def audit(
    request: Request, page: PageNo = 1, done: str | None = None, session: WebSession = viewer
) -> Response:
    """Every steward action, newest first."""
    page = max(1, page)
    with db_of(request).connect() as conn:
        entries = review.audit_entries(conn, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    return render(
        request,
        "audit.html",
        session,
        entries=entries,
        page=page,
        prev_url=f"/audit?page={page - 1}" if page > 1 else None,
        next_url=f"/audit?page={page + 1}" if len(entries) == PAGE_SIZE else None,
        done=done,
    )
