"""REST API `/api/v1`: the review queue, golden records, unmerge, audit, users.

Bearer API tokens (`crmhub users token NAME`); viewers read, stewards decide, admins manage
users. The operations are sync/review.py's, the same as the CLI's and the steward UI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from crmhub.errors import DedupeError
from crmhub.web.steward.auth import MAX_ID, DbId, api_role, clean_text, db_of
from sync import review
from sync.queries import golden_detail, list_golden, search_golden
from sync.users import User, UserError, add_user, list_users

__all__ = ["http_error", "router"]

router = APIRouter(prefix="/api/v1", tags=["steward"])

viewer = Depends(api_role("viewer"))
steward = Depends(api_role("steward"))
admin = Depends(api_role("admin"))


class ApproveBody(BaseModel):
    choices: dict[str, Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(
        default_factory=dict, description="field -> record id whose value the merge keeps"
    )
    seen: str | None = Field(None, description="`seen` from GET /review/{id}: refuse if stale")


class RejectBody(BaseModel):
    seen: str | None = None


class UnmergeBody(BaseModel):
    record_id: int = Field(ge=1, le=MAX_ID)


class NewUser(BaseModel):
    name: str
    password: str = Field(min_length=8)
    role: Literal["viewer", "steward", "admin"] = "viewer"


def http_error(exc: Exception) -> HTTPException:
    """A steward-operation error as the HTTP status a client can act on."""
    if isinstance(exc, review.NotFoundError):
        return HTTPException(404, str(exc))
    if isinstance(exc, review.AlreadyDecidedError | review.StaleDecisionError):
        return HTTPException(409, str(exc))
    if isinstance(exc, review.ReviewError | UserError):
        return HTTPException(422, str(exc))
    raise exc


@router.get("/review")
def review_list(
    request: Request,
    status: str = "open",
    min_score: float | None = Query(None, ge=0, le=1),
    max_score: float | None = Query(None, ge=0, le=1),
    source: str | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
    user: User = viewer,
) -> dict[str, Any]:
    """The review queue, most probable first, with the total and counts per status."""
    try:
        with db_of(request).connect() as conn:
            items, total = review.list_reviews(
                conn,
                status=status,
                min_score=min_score,
                max_score=max_score,
                source=clean_text(source),
                limit=limit,
                offset=offset,
            )
            counts = review.review_counts(conn)
    except DedupeError as exc:
        raise http_error(exc) from None
    return {"total": total, "counts": counts, "items": items}


@router.get("/review/{review_id}")
def review_show(request: Request, review_id: DbId, user: User = viewer) -> dict[str, Any]:
    """One pair side by side: fields, which differ, the matcher's evidence, `seen`."""
    try:
        with db_of(request).connect() as conn:
            return review.show_review(conn, review_id)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/review/{review_id}/approve")
def review_approve(
    request: Request, review_id: DbId, body: ApproveBody | None = None, user: User = steward
) -> dict[str, Any]:
    """Same person: merge the two golden records, keeping the chosen value per field."""
    body = body or ApproveBody()
    try:
        return review.approve(
            db_of(request), review_id, user.name, choices=body.choices, seen=body.seen
        )
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/review/{review_id}/reject")
def review_reject(
    request: Request, review_id: DbId, body: RejectBody | None = None, user: User = steward
) -> dict[str, Any]:
    """Not the same person: a do-not-merge constraint later syncs honour."""
    try:
        return review.reject(db_of(request), review_id, user.name, seen=(body or RejectBody()).seen)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/review/{review_id}/skip")
def review_skip(request: Request, review_id: DbId, user: User = steward) -> dict[str, Any]:
    """Put the pair aside; it leaves the open queue."""
    try:
        return review.skip(db_of(request), review_id, user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/undo")
def undo(request: Request, user: User = steward) -> dict[str, Any]:
    """Undo the caller's last approve, reject, skip or unmerge."""
    try:
        return review.undo_last(db_of(request), user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


class BucketApproval(BaseModel):
    expected_count: int = Field(ge=0, description="the count the preview showed")


@router.get("/buckets")
def buckets(request: Request, user: User = viewer) -> list[dict[str, Any]]:
    """Rule buckets of open pairs (e.g. same email, no conflicting field) with counts."""
    with db_of(request).connect() as conn:
        return review.bucket_counts(conn)


@router.get("/buckets/{bucket}")
def bucket_preview(
    request: Request, bucket: str, sample: int = Query(5, ge=0, le=50), user: User = viewer
) -> dict[str, Any]:
    """A bucket's size and a random sample of its pairs."""
    try:
        with db_of(request).connect() as conn:
            return review.bucket_preview(conn, bucket, sample=sample)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/buckets/{bucket}/approve")
def bucket_approve(
    request: Request, bucket: str, body: BucketApproval, user: User = steward
) -> dict[str, Any]:
    """Approve the whole bucket if it still holds `expected_count` pairs (else 409)."""
    try:
        return review.approve_bucket(
            db_of(request), bucket, user.name, expected=body.expected_count
        )
    except DedupeError as exc:
        raise http_error(exc) from None


@router.get("/golden")
def golden_search(
    request: Request,
    q: str | None = Query(None, max_length=200, description="email, phone, name or company"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
    user: User = viewer,
) -> list[dict[str, Any]]:
    """Golden records matching `q` (or all, oldest first)."""
    with db_of(request).connect() as conn:
        q = clean_text(q)
        if q:
            return search_golden(conn, q, limit=limit)
        return list_golden(conn, limit=limit, offset=offset)


@router.get("/golden/{golden_id}")
def golden_get(request: Request, golden_id: DbId, user: User = viewer) -> dict[str, Any]:
    """A golden record: fields with lineage, members, activity timeline."""
    with db_of(request).connect() as conn:
        detail = golden_detail(conn, golden_id)
    if detail is None:
        raise HTTPException(404, f"no golden record {golden_id}")
    return detail


@router.post("/golden/{golden_id}/unmerge")
def golden_unmerge(
    request: Request, golden_id: DbId, body: UnmergeBody, user: User = steward
) -> dict[str, Any]:
    """Split a member record off into a golden record of its own."""
    with db_of(request).connect() as conn:
        detail = golden_detail(conn, golden_id)
    if detail is None:
        raise HTTPException(404, f"no golden record {golden_id}")
    if body.record_id not in {m["record_id"] for m in detail["members"]}:
        raise HTTPException(422, f"record {body.record_id} is not a member of {golden_id}")
    try:
        return review.unmerge(db_of(request), body.record_id, user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.get("/audit")
def audit(
    request: Request,
    actor: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=10**9),
    user: User = viewer,
) -> list[dict[str, Any]]:
    """Steward actions, newest first (ids and states; no personal data)."""
    with db_of(request).connect() as conn:
        return review.audit_entries(conn, actor=clean_text(actor), limit=limit, offset=offset)


class ForgetBody(BaseModel):
    identifier: str = Field(min_length=3, max_length=300, description="email, phone or golden:ID")


@router.post("/forget")
def forget(request: Request, body: ForgetBody, user: User = admin) -> dict[str, Any]:
    """Erase a person everywhere (admins only); the audit entry names nobody."""
    from sync.erasure import forget as erase

    try:
        return erase(db_of(request), clean_text(body.identifier) or "", user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.get("/users")
def users(request: Request, user: User = admin) -> list[dict[str, Any]]:
    """Local users and their roles (admins only)."""
    with db_of(request).connect() as conn:
        return list_users(conn)


@router.post("/users", status_code=201)
def users_add(request: Request, body: NewUser, user: User = admin) -> dict[str, Any]:
    """Add a local user (admins only)."""
    try:
        created = add_user(db_of(request), body.name, body.password, body.role)
    except UserError as exc:
        raise http_error(exc) from None
    return {"id": created.id, "name": created.name, "role": created.role}
