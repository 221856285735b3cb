"""The compare view's `j` (next pair, undecided): `/queue/next?after=ID` walks the open queue
in its own order, wraps round at the end, and lands on the queue when nothing else is open."""

from __future__ import annotations

from sync import review
from tests.web.test_steward_ui import sign_in


async def test_next_pair_walks_the_open_queue_and_wraps(workspace, db):
    with db.connect() as conn:
        items, _ = review.list_reviews(conn, limit=10)
    order = [item["id"] for item in items]
    assert len(order) == 3
    async with workspace.client() as client:
        csrf = await sign_in(client, "steward")

        async def after(review_id: int) -> str:
            response = await client.get("/queue/next", params={"after": review_id})
            assert response.status_code == 303
            return str(response.headers["location"])

        assert await after(order[0]) == f"/review/{order[1]}"
        assert await after(order[1]) == f"/review/{order[2]}"
        assert await after(order[2]) == f"/review/{order[0]}"  # round again
        assert await after(999_999) == f"/review/{order[0]}"  # unknown: the best one
        # Decided pairs drop out of the walk; with no other pair open, back to the queue.
        await client.post(f"/review/{order[1]}/skip", data={"csrf_token": csrf})
        assert await after(order[0]) == f"/review/{order[2]}"
        await client.post(f"/review/{order[2]}/skip", data={"csrf_token": csrf})
        assert await after(order[0]) == "/queue?done=no+other+pair+is+open"
        bad = await client.get("/queue/next", params={"after": "0"})
        assert bad.status_code == 422


async def test_compare_page_shows_its_shortcuts(workspace, db):
    with db.connect() as conn:
        items, _ = review.list_reviews(conn, limit=1)
    async with workspace.client() as client:
        await sign_in(client, "steward")
        page = (await client.get(f"/review/{items[0]['id']}")).text
    for key in ('data-key="m"', 'data-key="n"', 'data-key="s"', 'data-key="j"', 'data-key="q"'):
        assert key in page
    assert page.count('data-focus-key="f"') == 1  # the first value to choose
    assert '<p class="keys"' in page
