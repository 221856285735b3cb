"""REST API `/api/v1`: the review queue, golden records, unmerge, audit, data quality, users.

Bearer API tokens (`crmhub users token NAME`); viewers read, stewards decide, admins manage
users. The operations are sync/review.py's, the same as the CLI's and the steward UI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field, StringConstraints

from crmhub.errors import DedupeError
from crmhub.web.steward.auth import MAX_ID, DbId, api_role, clean_text, db_of
from sync import review
from sync.history import golden_history
from sync.quality import blank_incidents, blank_summary
from sync.queries import golden_detail, list_golden, search_golden
from sync.users import User, UserError, add_user, list_users

__all__ = ["http_error", "router"]


class Problem(BaseModel):
    detail: str = Field(description="what went wrong and how to fix it")


class InvalidRequest(BaseModel):
    """422: FastAPI's list of validation errors, or one sentence for a request that is
    well-formed but cannot be carried out (e.g. a choice naming a record outside the pair)."""

    detail: str | list[dict[str, Any]]


# Documented on every operation, so clients (and schemathesis) know every status we answer.
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body is not JSON"},
    401: {"model": Problem, "description": "No API token, or an unknown or revoked one"},
    403: {"model": Problem, "description": "The token's user lacks the role this needs"},
    404: {"model": Problem, "description": "No such review item, golden record or bucket"},
    409: {
        "model": Problem,
        "description": "Decided already, changed since it was shown (`seen`), or the current "
        "state does not allow it (nothing to undo, the last member)",
    },
    422: {"model": InvalidRequest, "description": "The request is not valid"},
}

router = APIRouter(prefix="/api/v1", tags=["steward"], responses=_ERRORS)


def _links(**links: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI links from a 200 answer to the operations its ids lead to (`operationId`:
    {"parameters": ..., "requestBody": ...}), so clients and schemathesis' stateful tests can
    follow a pair from the queue to its merge, the split and the erasure."""
    return {200: {"links": {name: {"operationId": name, **spec} for name, spec in links.items()}}}


_FIRST_ITEM = {"parameters": {"review_id": "$response.body#/items/0/id"}}
_THIS_REVIEW = {"review_id": "$request.path.review_id"}

viewer = Depends(api_role("viewer"))
steward = Depends(api_role("steward"))
admin = Depends(api_role("admin"))


# Only the fields a merge can choose (sync.review.CHOOSABLE_FIELDS): others fail validation.
ChoosableField = Annotated[
    str, StringConstraints(pattern=f"^({'|'.join(review.CHOOSABLE_FIELDS)})$")
]
ReviewStatus = Annotated[
    str, Query(pattern=f"^({'|'.join((*review.STATUSES, 'all'))})$", description="or `all`")
]


class ApproveBody(BaseModel):
    choices: dict[ChoosableField, Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(
        default_factory=dict,
        description="field -> record id whose value the merge keeps",
        json_schema_extra={"additionalProperties": False},  # only the choosable fields
    )
    seen: str | None = Field(None, description="`seen` from GET /review/{id}: refuse if stale")


class RejectBody(BaseModel):
    seen: str | None = None


class UnmergeBody(BaseModel):
    record_id: int = Field(ge=1, le=MAX_ID)


# sync.users' rule for names (tests/web/test_api_schema.py checks the two agree).
USER_NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,100}$"


class NewUser(BaseModel):
    name: str = Field(pattern=USER_NAME_PATTERN)
    password: str = Field(min_length=8)
    role: Literal["viewer", "steward", "admin"] = "viewer"


def http_error(exc: Exception) -> HTTPException:
    """A steward-operation error as the HTTP status a client can act on."""
    if isinstance(exc, review.NotFoundError):
        return HTTPException(404, str(exc))
    if isinstance(
        exc, review.AlreadyDecidedError | review.StaleDecisionError | review.ConflictError
    ):
        return HTTPException(409, str(exc))
    if isinstance(exc, review.ReviewError | UserError):
        return HTTPException(422, str(exc))
    raise exc


@router.get(
    "/review",
    operation_id="listReviews",
    responses=_links(
        showReview=_FIRST_ITEM,
        approveReview=_FIRST_ITEM,
        rejectReview=_FIRST_ITEM,
        skipReview=_FIRST_ITEM,
    ),
)
def review_list(
    request: Request,
    status: ReviewStatus = "open",
    min_score: float | None = Query(None, ge=0, le=1),
    max_score: float | None = Query(None, ge=0, le=1),
    source: str | None = None,
    min_age_days: float | None = Query(
        None, ge=0, le=review.MAX_AGE_DAYS, description="queued at least this many days ago"
    ),
    max_age_days: float | None = Query(
        None, ge=0, le=review.MAX_AGE_DAYS, description="queued at most this many days ago"
    ),
    sort: Annotated[str, Query(pattern=f"^({'|'.join(review.SORTS)})$")] = "best",
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
    user: User = viewer,
) -> dict[str, Any]:
    """The review queue with the total (for the filters; capped at 10,001 when filtering by
    source or age) and counts per status. `sort`: best (most probable) first, borderline
    (least probable) first, oldest or newest first."""
    try:
        with db_of(request).connect() as conn:
            items, total = review.list_reviews(
                conn,
                status=status,
                min_score=min_score,
                max_score=max_score,
                source=clean_text(source),
                min_age_days=min_age_days,
                max_age_days=max_age_days,
                sort=sort,
                limit=limit,
                offset=offset,
            )
            counts = review.review_counts(conn)
    except DedupeError as exc:
        raise http_error(exc) from None
    return {"total": total, "counts": counts, "items": items}


@router.get(
    "/review/{review_id}",
    operation_id="showReview",
    responses=_links(
        approveReview={"parameters": _THIS_REVIEW, "requestBody": {"seen": "$response.body#/seen"}},
        rejectReview={"parameters": _THIS_REVIEW, "requestBody": {"seen": "$response.body#/seen"}},
    ),
)
def review_show(request: Request, review_id: DbId, user: User = viewer) -> dict[str, Any]:
    """One pair side by side: fields, which differ, the matcher's evidence, `seen`."""
    try:
        with db_of(request).connect() as conn:
            return review.show_review(conn, review_id)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post(
    "/review/{review_id}/approve",
    operation_id="approveReview",
    responses=_links(
        getGolden={"parameters": {"golden_id": "$response.body#/golden_id"}},
        unmergeGolden={
            "parameters": {"golden_id": "$response.body#/golden_id"},
            "requestBody": {"record_id": "$response.body#/record_b"},
        },
        undo={},
    ),
)
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


@router.post("/review/{review_id}/reject", operation_id="rejectReview", responses=_links(undo={}))
def review_reject(
    request: Request, review_id: DbId, body: RejectBody | None = None, user: User = steward
) -> dict[str, Any]:
    """Not the same person: a do-not-merge constraint later syncs honour."""
    try:
        return review.reject(db_of(request), review_id, user.name, seen=(body or RejectBody()).seen)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/review/{review_id}/skip", operation_id="skipReview", responses=_links(undo={}))
def review_skip(request: Request, review_id: DbId, user: User = steward) -> dict[str, Any]:
    """Put the pair aside; it leaves the open queue."""
    try:
        return review.skip(db_of(request), review_id, user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/undo", operation_id="undo")
def undo(request: Request, user: User = steward) -> dict[str, Any]:
    """Undo the caller's last approve, reject, skip or unmerge."""
    try:
        return review.undo_last(db_of(request), user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


class BucketApproval(BaseModel):
    expected_count: int = Field(ge=0, description="the count the preview showed")


@router.get(
    "/buckets",
    operation_id="listBuckets",
    responses=_links(previewBucket={"parameters": {"bucket": "$response.body#/0/bucket"}}),
)
def buckets(request: Request, user: User = viewer) -> list[dict[str, Any]]:
    """Rule buckets of open pairs (e.g. same email, no conflicting field) with counts."""
    with db_of(request).connect() as conn:
        return review.bucket_counts(conn)


@router.get(
    "/buckets/{bucket}",
    operation_id="previewBucket",
    responses=_links(
        approveBucket={
            "parameters": {"bucket": "$request.path.bucket"},
            "requestBody": {"expected_count": "$response.body#/count"},
        }
    ),
)
def bucket_preview(
    request: Request, bucket: str, sample: int = Query(5, ge=0, le=50), user: User = viewer
) -> dict[str, Any]:
    """A bucket's size and a random sample of its pairs."""
    try:
        with db_of(request).connect() as conn:
            return review.bucket_preview(conn, bucket, sample=sample)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.post("/buckets/{bucket}/approve", operation_id="approveBucket")
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


@router.get(
    "/golden",
    operation_id="searchGolden",
    responses=_links(getGolden={"parameters": {"golden_id": "$response.body#/0/id"}}),
)
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


@router.get(
    "/golden/{golden_id}",
    operation_id="getGolden",
    responses=_links(
        unmergeGolden={
            "parameters": {"golden_id": "$response.body#/id"},
            "requestBody": {"record_id": "$response.body#/members/0/record_id"},
        },
        forget={"requestBody": {"identifier": "golden:{$response.body#/id}"}},
    ),
)
def golden_get(request: Request, golden_id: DbId, user: User = viewer) -> dict[str, Any]:
    """A golden record: fields with lineage, `consent` (status, `at`, and the source record
    that decided it), members, activity timeline, and `history` (how each member joined and
    the steward actions on it, newest first)."""
    with db_of(request).connect() as conn:
        detail = golden_detail(conn, golden_id)
        if detail is None:
            raise HTTPException(404, f"no golden record {golden_id}")
        return {**detail, "history": golden_history(conn, detail["id"])}


@router.post(
    "/golden/{golden_id}/unmerge",
    operation_id="unmergeGolden",
    responses=_links(
        getGolden={"parameters": {"golden_id": "$response.body#/new_golden_id"}},
        forget={"requestBody": {"identifier": "golden:{$response.body#/new_golden_id}"}},
        undo={},
    ),
)
def golden_unmerge(
    request: Request, golden_id: DbId, body: UnmergeBody, user: User = steward
) -> dict[str, Any]:
    """Split a member record off into a golden record of its own."""
    with db_of(request).connect() as conn:
        detail = golden_detail(conn, golden_id)
    if detail is None:
        raise HTTPException(404, f"no golden record {golden_id}")
    if body.record_id not in {m["record_id"] for m in detail["members"]}:
        raise HTTPException(404, f"record {body.record_id} is not a member of {golden_id}")
    try:
        return review.unmerge(db_of(request), body.record_id, user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.get("/audit", operation_id="listAudit")
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


@router.get("/quality/blanks", operation_id="listBlanks")
def quality_blanks(
    request: Request,
    source: str | None = Query(None, max_length=200, description="only this connector"),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
    user: User = viewer,
) -> dict[str, Any]:
    """Blank-overwrite incidents: per source the counts (total, last 30 days, per field), and
    the incidents newest first (ids and field names; the lost values are not kept)."""
    with db_of(request).connect() as conn:
        items, total = blank_incidents(conn, clean_text(source) or None, limit=limit, offset=offset)
        return {"summary": blank_summary(conn), "total": total, "items": items}


class ForgetBody(BaseModel):
    identifier: str = Field(min_length=3, max_length=300, description="email, phone or golden:ID")


@router.post("/forget", operation_id="forget")
def forget(request: Request, body: ForgetBody, user: User = admin) -> dict[str, Any]:
    """Erase a person everywhere (admins only); the audit entry names nobody."""
    from sync.erasure import forget as erase

    try:
        return erase(db_of(request), clean_text(body.identifier) or "", user.name)
    except DedupeError as exc:
        raise http_error(exc) from None


@router.get("/users", operation_id="listUsers")
def users(request: Request, user: User = admin) -> list[dict[str, Any]]:
    """Local users and their roles (admins only)."""
    with db_of(request).connect() as conn:
        return list_users(conn)


@router.post("/users", status_code=201, operation_id="addUser")
def users_add(request: Request, body: NewUser, user: User = admin) -> dict[str, Any]:
    """Add a local user (admins only)."""
    try:
        created = add_user(db_of(request), body.name, body.password, body.role, actor=user.name)
    except UserError as exc:
        # The body passed validation (name pattern, role, password length): what is left
        # is a name taken already.
        raise HTTPException(409, str(exc)) from None
    return {"id": created.id, "name": created.name, "role": created.role}
