"""A pair back for a re-check shows its reason everywhere a steward looks: the REST API, the
queue and compare pages, and `crmhub review show`."""

from __future__ import annotations

from pathlib import Path

from sync import review
from sync.engine import SyncEngine
from tests.conftest import make_settings
from tests.steward_data import write_families
from tests.web.test_steward_cli import crmhub
from tests.web.test_steward_ui import sign_in

REASON = "record B (crm) gained email ann.k@mail.example"


async def _requeue_keller(tmp_path: Path, db, store_url: str) -> int:
    """Reject the Keller pair, then re-sync with Ann Keller's address changed."""
    with db.connect() as conn:
        items, _ = review.list_reviews(conn, limit=10)
    keller = next(i for i in items if i["a"]["email"] == "anna@keller.example")
    review.reject(db, keller["id"], "sam")
    csv_path = tmp_path / "crm.csv"
    write_families(csv_path, 3)
    text = csv_path.read_text(encoding="utf-8").replace("a.keller@web", "ann.k@mail")
    csv_path.write_text(text, encoding="utf-8")
    settings = make_settings(tmp_path, store_url, {"crm": {"type": "csv", "path": str(csv_path)}})
    engine = SyncEngine(settings, db)
    try:
        result = await engine.run("crm")
    finally:
        engine.close()
    assert result.as_dict()["counts"]["reviews_queued"] == 1
    return int(keller["id"])


async def test_reason_in_the_api_and_the_pages(workspace, tmp_path, db, store_url):
    item_id = await _requeue_keller(tmp_path, db, store_url)
    async with workspace.client("viewer") as api:
        listing = (await api.get("/api/v1/review")).json()
        mine = next(i for i in listing["items"] if i["id"] == item_id)
        assert REASON in mine["recheck"]["reason"]
        assert mine["recheck"]["decided_by"] == "sam"
        assert [i["recheck"] for i in listing["items"] if i["id"] != item_id] == [None, None]
        shown = (await api.get(f"/api/v1/review/{item_id}")).json()
        assert shown["recheck"]["decision"] == "do_not_merge"
        assert REASON in shown["recheck"]["reason"]
    async with workspace.client() as browser:
        await sign_in(browser, "steward")
        queue = (await browser.get("/queue")).text
        assert "re-check: since sam decided on" in queue
        page = (await browser.get(f"/review/{item_id}")).text
        assert "Back for a re-check:" in page
        assert REASON in page
        assert "(not the same person) holds until it is decided again" in page


async def test_reason_in_review_show(tmp_path, sqlite_url):
    from sync.store import make_engine
    from tests.steward_data import seed_reviews

    db = make_engine(sqlite_url)
    await seed_reviews(tmp_path, sqlite_url, db, count=3)
    item_id = await _requeue_keller(tmp_path, db, sqlite_url)
    (tmp_path / "crmhub.toml").write_text(
        f'[store]\nurl = "{sqlite_url}"\n[connectors.crm]\ntype = "csv"\npath = "crm.csv"\n',
        encoding="utf-8",
    )
    shown = crmhub(tmp_path, "review", "show", str(item_id))
    assert shown.returncode == 0, shown.stderr
    assert "Back for a re-check: since sam decided on" in shown.stdout
    assert "gained email ann.k@mail.example" in " ".join(shown.stdout.split())
    listed = crmhub(tmp_path, "review", "list")
    assert "open (re-check)" in " ".join(listed.stdout.split())
    db.dispose()
