"""The REST API: bearer tokens, the role matrix, and the review operations over HTTP."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from sync.store import api_token, audit_log

READS = [
    "/api/v1/review",
    "/api/v1/review/1",
    "/api/v1/golden",
    "/api/v1/golden/1",
    "/api/v1/audit",
]


async def test_anonymous_and_bad_tokens_get_401(workspace):
    async with workspace.client() as anon:
        for path in READS:
            response = await anon.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            wrong = await anon.get(path, headers={"Authorization": "Bearer chm_not-a-token"})
            assert wrong.status_code == 401, path
        assert (await anon.post("/api/v1/review/1/approve")).status_code == 401
        assert (await anon.get("/healthz")).status_code == 200


async def test_role_matrix(workspace):
    async with (
        workspace.client("viewer") as viewer,
        workspace.client("steward") as steward,
        workspace.client("admin") as admin,
    ):
        listing = (await viewer.get("/api/v1/review")).json()
        assert listing["total"] == 3
        first = listing["items"][0]["id"]
        for path in (f"/review/{first}/approve", f"/review/{first}/reject", "/undo"):
            assert (await viewer.post(f"/api/v1{path}")).status_code == 403
        assert (await viewer.get("/api/v1/users")).status_code == 403
        assert (await steward.get("/api/v1/users")).status_code == 403
        new_user = {"name": "eve", "password": "long enough pw", "role": "viewer"}
        assert (await steward.post("/api/v1/users", json=new_user)).status_code == 403
        assert (await admin.post("/api/v1/users", json=new_user)).status_code == 201
        names = [u["name"] for u in (await admin.get("/api/v1/users")).json()]
        assert names == ["admin", "eve", "steward", "viewer"]
        (added,) = (await viewer.get("/api/v1/audit")).json()  # a state change: audited
        assert (added["actor"], added["action"]) == ("admin", "user.add")
        assert added["details"]["role"] == "viewer"
        assert "password" not in str(added["details"])
        assert (await steward.post(f"/api/v1/review/{first}/reject")).status_code == 200


async def test_review_flow_over_http(workspace, db):
    async with workspace.client("steward") as steward:
        items = (await steward.get("/api/v1/review", params={"limit": 2})).json()["items"]
        assert len(items) == 2
        assert items[0]["probability"] >= items[1]["probability"]
        oldest = (await steward.get("/api/v1/review", params={"sort": "oldest"})).json()
        assert [i["id"] for i in oldest["items"]] == sorted(i["id"] for i in oldest["items"])
        waited = await steward.get("/api/v1/review", params={"min_age_days": 1})
        assert waited.json()["total"] == 0  # all queued just now
        assert (await steward.get("/api/v1/review", params={"sort": "x"})).status_code == 422
        assert (await steward.get("/api/v1/review", params={"max_age_days": -1})).status_code == 422
        shown = (await steward.get(f"/api/v1/review/{items[0]['id']}")).json()
        a, b = shown["a"]["record_id"], shown["b"]["record_id"]
        approved = await steward.post(
            f"/api/v1/review/{shown['id']}/approve",
            json={"choices": {"first_name": a}, "seen": shown["seen"]},
        )
        assert approved.status_code == 200, approved.text
        golden_id = approved.json()["golden_id"]
        golden = (await steward.get(f"/api/v1/golden/{golden_id}")).json()
        assert len(golden["members"]) == 2
        assert golden["fields"]["first_name"] == "Anna"  # A's, though B is newer
        again = await steward.post(f"/api/v1/review/{shown['id']}/approve")
        assert again.status_code == 409
        assert "already" in again.json()["detail"]
        stale = await steward.post(
            f"/api/v1/review/{items[1]['id']}/reject", json={"seen": "stale"}
        )
        assert stale.status_code == 409
        outside = await steward.post(
            f"/api/v1/review/{items[1]['id']}/approve", json={"choices": {"first_name": 1234567}}
        )
        assert outside.status_code == 409  # well-formed, but not a record of this pair
        assert "not one of the pair" in outside.json()["detail"]
        unknown = await steward.post(
            f"/api/v1/review/{items[1]['id']}/approve", json={"choices": {"password": a}}
        )
        assert unknown.status_code == 422  # the schema names the choosable fields
        assert (await steward.get("/api/v1/review/999999")).status_code == 404
        split = await steward.post(f"/api/v1/golden/{golden_id}/unmerge", json={"record_id": b})
        assert split.status_code == 200, split.text
        history = (await steward.get(f"/api/v1/golden/{golden_id}")).json()["history"]
        assert [h["action"] for h in history][:2] == ["golden.unmerge", "review.approve"]
        last = await steward.post(
            f"/api/v1/golden/{split.json()['new_golden_id']}/unmerge", json={"record_id": b}
        )
        assert last.status_code == 409
        assert "only member" in last.json()["detail"]
        found = (await steward.get("/api/v1/golden", params={"q": "GmbH"})).json()
        assert len(found) >= 3
        audit = (await steward.get("/api/v1/audit")).json()
        assert [e["action"] for e in audit] == ["golden.unmerge", "review.approve"]
        assert {e["actor"] for e in audit} == {"steward"}


async def test_two_stewards_on_one_pair_one_wins(workspace, db):
    from sync.users import add_user, create_token

    add_user(db, "kim", "another password", "steward")
    workspace.tokens["kim"] = create_token(db, "kim")
    async with workspace.client("steward") as sam, workspace.client("kim") as kim:
        item = (await sam.get("/api/v1/review")).json()["items"][0]["id"]
        results = await asyncio.gather(
            sam.post(f"/api/v1/review/{item}/approve"), kim.post(f"/api/v1/review/{item}/reject")
        )
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 409]
    loser = next(r for r in results if r.status_code == 409)
    assert "already" in loser.json()["detail"]
    with db.connect() as conn:
        assert len(conn.execute(select(audit_log)).all()) == 1


async def test_tokens_are_stored_hashed(workspace, db):
    with db.connect() as conn:
        stored = set(conn.execute(select(api_token.c.token_hash)).scalars())
    assert not stored & set(workspace.tokens.values())
    assert all(len(h) == 64 for h in stored)


async def test_openapi_documents_the_api(workspace):
    async with workspace.client() as anon:
        schema = (await anon.get("/openapi.json")).json()
    assert "/api/v1/review/{review_id}/approve" in schema["paths"]
    assert "/queue" not in schema["paths"]  # UI pages stay out of the API schema


async def test_bucket_approval_over_http(workspace):
    async with workspace.client("viewer") as viewer, workspace.client("steward") as steward:
        buckets = {b["bucket"]: b["count"] for b in (await viewer.get("/api/v1/buckets")).json()}
        assert buckets["same-name-company"] == 3
        preview = (await viewer.get("/api/v1/buckets/same-name-company?sample=2")).json()
        assert len(preview["sample"]) == 2
        body = {"expected_count": 3}
        url = "/api/v1/buckets/same-name-company/approve"
        assert (await viewer.post(url, json=body)).status_code == 403
        assert (await steward.post(url, json={"expected_count": 2})).status_code == 409
        done = await steward.post(url, json=body)
        assert done.status_code == 200
        assert done.json()["approved"] == 3
        assert (await viewer.get("/api/v1/buckets/unknown")).status_code == 404


async def test_forget_is_for_admins(workspace):
    body = {"identifier": "anna@keller.example"}
    async with workspace.client("steward") as steward, workspace.client("admin") as admin:
        assert (await steward.post("/api/v1/forget", json=body)).status_code == 403
        erased = await admin.post("/api/v1/forget", json=body)
        assert erased.status_code == 200
        assert erased.json()["source_records"] == 1  # not merged: one record
        again = await admin.post("/api/v1/forget", json=body)
        assert again.status_code == 404
