"""The steward workspace in a real browser: Debian's Chromium, driven by Playwright, against a
real uvicorn server on loopback, over a store filled by the real sync pipeline.

- A steward signs in and works a queue of 20 pairs with the keyboard only: merges one keeping
  a chosen value, rejects one, steps past one, decides the rest; then splits the merged pair
  again on the golden record page and finds every action in the audit log (and undoes one).
- Every page, at desktop (1280x800) and phone (390x844) size: a screenshot each, and no page
  is wider than the phone's screen (wide tables scroll inside their own box).

Screenshots go to test-artifacts/screenshots/ (gitignored), or to $STEWARD_SCREENSHOTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import Engine, func, select

from crmhub.errors import CrmHubError
from crmhub.web import create_app
from sync import review
from sync.engine import SyncEngine
from sync.queries import search_golden
from sync.store import make_engine, membership, merge_constraint, review_item
from sync.users import add_user
from tests.conftest import REPO, make_settings, service_missing
from tests.steward_data import write_families
from tests.web.conftest import PASSWORD

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
# Tables wider than their scrolling box: the phone shows them cut off at the right edge.
CUT_OFF = """[...document.querySelectorAll("table")]
    .filter(t => t.scrollWidth > t.parentElement.clientWidth + 1)
    .map(t => "table." + [...t.classList].join("."))"""
ACTIONS = {"approved": "review.approve", "rejected": "review.reject", "skipped": "review.skip"}
PAIRS = 20
# A second source with rows the pipeline cannot use (dead letters, data-quality figures) and
# one with very long unbroken values (must wrap, not widen the page).
LEADS = (
    "id,first_name,last_name,email,phone,birth_date,company\n"
    "1,Jonas,Vogel,jonas.vogel@example.org,+49 30 1234567,1984-03-02,Vogel & Söhne KG\n"
    "2,Mira,Brandt,not-an-email,,,Brandt Consulting\n"
    "3,,,,,,\n"
    "4,Lea,Roth,lea.roth@example.org,,31/12/1990,\n"
    "5,x@example.com,1,2\n"
    f"6,Karl,Lang,{'k' * 70}@example.org,,,{'Aktiengesellschaft' * 6} GmbH\n"
)


# Web-form submissions by the first family (the Keller pair): a timeline on their golden
# record, and consent given in one and withdrawn in a later one (the opt-out wins).
FORMS = [
    {
        "submission_id": "F-1",
        "form": "contact-us",
        "submitted_at": "2026-10-01T09:12:00Z",
        "fields": {
            "name": "Anna Keller",
            "email": "anna@keller.example",
            "message": "Could you send the price list for <b>2027</b>?",
            "consent": "yes",
        },
    },
    {
        "submission_id": "F-2",
        "form": "newsletter",
        "submitted_at": "2026-11-15T16:40:00Z",
        "fields": {"name": "Ann Keller", "email": "a.keller@web.example", "consent": "no"},
    },
]


@dataclass
class Site:
    url: str
    db: Engine
    settings: Any


def _seed(tmp_path: Path, url: str, db: Engine) -> Any:
    crm, leads, forms = tmp_path / "crm.csv", tmp_path / "leads.csv", tmp_path / "forms.jsonl"
    write_families(crm, PAIRS)
    leads.write_text(LEADS, encoding="utf-8")
    forms.write_text("".join(json.dumps(f) + "\n" for f in FORMS), encoding="utf-8")
    settings = make_settings(
        tmp_path,
        url,
        {
            "crm": {"type": "csv", "path": str(crm)},
            "leads": {"type": "csv", "path": str(leads)},
            "archive": {"type": "csv", "path": str(tmp_path / "gone" / "archive-2019.csv")},
            "forms": {"type": "jsonl", "path": str(forms)},  # synced by _prepare_pages
        },
    )

    async def sync_all() -> None:
        engine = SyncEngine(settings, db)
        try:
            await engine.run("crm")
            await engine.run("leads")
            # The next export lost Jonas's company: a blank-overwrite incident.
            leads.write_text(LEADS.replace("Vogel & Söhne KG", ""), encoding="utf-8")
            await engine.run("leads")
            with contextlib.suppress(CrmHubError):
                await engine.run("archive")  # a failed run: its error on the Sources page
        finally:
            engine.close()

    asyncio.run(sync_all())
    with db.connect() as conn:
        queued = conn.execute(select(func.count()).select_from(review_item)).scalar_one()
    assert queued == PAIRS, f"the pipeline queued {queued} pairs, not {PAIRS}"
    return settings


@pytest.fixture
def site(tmp_path, sqlite_url) -> Iterator[Site]:
    """A real crmhub web server on 127.0.0.1: 20 pairs to review, a steward and an admin."""
    if not Path(CHROMIUM).exists():
        service_missing("Chromium", f"{CHROMIUM} not found; run .ci/setup-chromium.sh")
    db = make_engine(sqlite_url)
    settings = _seed(tmp_path, sqlite_url, db)
    add_user(db, "sam", PASSWORD, "steward")
    add_user(db, "ada", PASSWORD, "admin")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings, db), log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        threading.Event().wait(0.05)
    assert uv.started, "uvicorn did not start"
    yield Site(f"http://127.0.0.1:{port}", db, settings)
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()
    db.dispose()


@pytest.fixture
def shots() -> Path:
    target = Path(os.environ.get("STEWARD_SCREENSHOTS") or REPO / "test-artifacts" / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def new_page(browser: Any, errors: list[str]) -> Any:
    width, height = SIZES["desktop"]
    page = await browser.new_page(viewport={"width": width, "height": height})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return page


def review_id_of(url: str) -> int:
    found = re.search(r"/review/(\d+)", url)
    assert found, f"not on a compare page: {url}"
    return int(found.group(1))


def shown(db: Engine, review_id: int) -> dict[str, Any]:
    with db.connect() as conn:
        return review.show_review(conn, review_id)


def golden_of(db: Engine, record_id: int) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                select(membership.c.golden_id).where(membership.c.record_id == record_id)
            ).scalar_one()
        )


async def test_steward_works_a_queue_of_20_with_the_keyboard(site, browser):
    from playwright.async_api import expect

    errors: list[str] = []
    page = await new_page(browser, errors)
    keys = page.keyboard

    # Sign in, keyboard only (the name field has the focus).
    await page.goto(f"{site.url}/queue")
    await expect(page).to_have_url(re.compile(r"/login\?next=/queue$"))
    await keys.type("sam")
    await keys.press("Tab")
    await keys.type(PASSWORD)
    await keys.press("Enter")
    await expect(page).to_have_url(re.compile(r"/queue$"))
    await expect(page.locator("p.total")).to_contain_text(f"{PAIRS} pairs")
    await expect(page.locator("p.keys")).to_contain_text("start reviewing")

    done: list[tuple[str, int]] = []  # (audit action, review id), in order

    async def decide(key: str, verb: str) -> int:
        """Press `key` on the current pair; the next page says what happened to it."""
        current = review_id_of(page.url)
        await keys.press(key)
        await expect(page.locator(".flash")).to_have_text(f"{verb} #{current}")
        done.append((ACTIONS[verb], current))
        return current

    # Enter: the best pair, side by side, the shortcuts on the page.
    await keys.press("Enter")
    await expect(page).to_have_url(re.compile(r"/review/\d+$"))
    await expect(page.locator("p.keys")).to_contain_text("merge")
    await expect(page.locator("tr.differs[data-field=first_name]")).to_be_visible()
    merged_id = review_id_of(page.url)
    pair = shown(site.db, merged_id)
    a, b = pair["a"], pair["b"]
    anna = a if a["data"]["first_name"] == "Anna" else b
    assert {a["data"]["first_name"], b["data"]["first_name"]} == {"Anna", "Ann"}

    # Keep "Anna" (survivorship alone keeps the newer "Ann"): f jumps to the value choices,
    # Tab moves on to the first-name row, an arrow key or Space picks a side.
    await keys.press("f")
    for _ in range(len(pair["fields"])):
        if await page.evaluate("document.activeElement.name") == "keep_first_name":
            break
        await keys.press("Tab")
    focused_value = int(await page.evaluate("document.activeElement.value"))
    await keys.press(" " if focused_value == anna["record_id"] else "ArrowRight")
    chosen = page.locator("input[name=keep_first_name]:checked")
    await expect(chosen).to_have_value(str(anna["record_id"]))
    await decide("m", "approved")

    # Not the same person: a do-not-merge constraint on the pair.
    rejected_id = await decide("n", "rejected")
    rejected = shown(site.db, rejected_id)
    low, high = sorted((rejected["a"]["record_id"], rejected["b"]["record_id"]))
    with site.db.connect() as conn:
        kind = conn.execute(
            select(merge_constraint.c.kind).where(
                merge_constraint.c.record_a == low, merge_constraint.c.record_b == high
            )
        ).scalar_one()
    assert kind == "do_not_merge"

    # j: on to the next pair, this one stays open (it comes round again below).
    passed_by = review_id_of(page.url)
    await keys.press("j")
    await expect(page).not_to_have_url(re.compile(rf"/review/{passed_by}$"))
    await expect(page.locator(".flash")).to_have_count(0)
    assert shown(site.db, passed_by)["status"] == "open"

    # The rest of the queue, alternately merged and skipped, until it is clear.
    for turn in range(PAIRS - 2):
        await decide(*(("m", "approved") if turn % 2 == 0 else ("s", "skipped")))
    await expect(page).to_have_url(re.compile(r"/queue\?done="))
    await expect(page.locator("#queue .empty")).to_contain_text("The queue is clear")
    assert passed_by in {rid for _action, rid in done}
    with site.db.connect() as conn:
        counts = review.review_counts(conn)
    assert counts == {"open": 0, "approved": 10, "rejected": 1, "skipped": 9, "merged": 0}

    # The golden record holds the chosen value; split the pair again.
    golden_id = golden_of(site.db, anna["record_id"])
    assert golden_of(site.db, a["record_id"]) == golden_of(site.db, b["record_id"])
    await page.goto(f"{site.url}/golden/{golden_id}")
    fields = page.locator("table.fields")
    await expect(fields.locator("tr", has_text="first_name")).to_contain_text("Anna")
    await expect(page.locator("table.members tbody tr")).to_have_count(2)
    other = b if anna is a else a
    split = page.locator("table.members tbody tr").filter(
        has=page.get_by_role("cell", name=other["external_id"], exact=True)
    )
    await split.locator("button.unmerge").click()
    await expect(page.locator(".flash")).to_contain_text(f"split record {other['record_id']}")
    await expect(page.locator("table.members tbody tr")).to_have_count(1)
    await expect(page.locator("table.history tbody tr").first).to_contain_text(
        f"record {other['record_id']} split off #{golden_id}"
    )
    assert golden_of(site.db, anna["record_id"]) != golden_of(site.db, other["record_id"])
    done.append(("golden.unmerge", 0))

    # The audit log lists every action, newest first.
    await page.goto(f"{site.url}/audit")
    rows = page.locator("table.audit tbody tr")
    await expect(rows).to_have_count(len(done))
    for row, (action, review_id) in enumerate(reversed(done)):
        entry = rows.nth(row)
        await expect(entry.locator("td").nth(3)).to_have_text(action)
        await expect(entry).to_contain_text("sam")
        if review_id:
            await expect(entry).to_contain_text(f"review #{review_id}")
    await expect(rows.nth(len(done) - 1)).to_contain_text("kept first_name")
    await expect(rows.nth(0)).to_contain_text(f"record {other['record_id']}")

    # u: undo the split, from the keyboard too.
    await keys.press("u")
    await expect(page.locator(".flash")).to_have_text("undid golden.unmerge")
    await expect(rows.nth(0).locator("td").nth(3)).to_have_text("undo")
    assert golden_of(site.db, anna["record_id"]) == golden_of(site.db, other["record_id"])
    assert not errors, errors


async def _prepare_pages(site: Site) -> dict[str, str]:
    """Decisions of every kind (by the same functions the UI calls), web-form submissions
    (a timeline and consent on the first golden record), and the pages to visit."""
    db = site.db
    with db.connect() as conn:
        items, _ = review.list_reviews(conn, limit=3)
        first = review.show_review(conn, items[0]["id"])
    keep = {"first_name": first["a"]["record_id"]}
    merged = review.approve(db, first["id"], "ada", choices=keep)
    review.reject(db, items[1]["id"], "ada")
    review.skip(db, items[2]["id"], "ada")
    engine = SyncEngine(site.settings, db)
    try:
        await engine.run("forms")
    finally:
        engine.close()
    with db.connect() as conn:
        open_items, _ = review.list_reviews(conn, limit=1)
        (long_one,) = search_golden(conn, "Aktiengesellschaft", limit=2)
    return {
        "queue": "/queue",
        "compare": f"/review/{open_items[0]['id']}",
        "golden": f"/golden/{merged['golden_id']}",
        "golden-long-values": f"/golden/{long_one['id']}",
        "search": "/search?q=GmbH",
        "audit": "/audit",
        "sources": "/sources",  # connectors, runs and data quality
        "blanks": "/sources/blanks?source=leads",  # blank-overwrite incidents
        "dead-letters": "/errors",
        "buckets": "/buckets",
        "bucket": "/buckets/same-name-company",
        "erase": "/admin/forget",
    }


async def test_every_page_fits_desktop_and_phone(site, browser, shots):
    from playwright.async_api import expect

    pages = await _prepare_pages(site)
    errors: list[str] = []
    page = await new_page(browser, errors)
    too_wide: list[str] = []

    async def snap(name: str) -> None:
        for size, (width, height) in SIZES.items():
            await page.set_viewport_size({"width": width, "height": height})
            await page.screenshot(path=str(shots / f"{name}-{size}.png"), full_page=True)
            # Wide tables scroll inside their own box; the page itself never scrolls sideways.
            scroll, inner = await page.evaluate(
                "[document.documentElement.scrollWidth, window.innerWidth]"
            )
            if scroll > inner:
                too_wide.append(f"{name} at {size}: {scroll}px wide in a {inner}px window")
            if size == "phone":
                # ... and on a phone no table is cut off at the edge of its box either.
                cut = await page.evaluate(CUT_OFF)
                too_wide.extend(f"{name} at {size}: {what} is cut off" for what in cut)
        await page.set_viewport_size(dict(zip(("width", "height"), SIZES["desktop"], strict=True)))

    await page.goto(f"{site.url}/login")
    await snap("login")
    await page.fill("input[name=name]", "ada")
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(re.compile(r"/queue$"))

    for name, path in pages.items():
        response = await page.goto(f"{site.url}{path}")
        assert response is not None, (name, path)
        assert response.status == 200, (name, path)
        await snap(name)

    # htmx: the queue's filter form swaps the table in place (no page load).
    await page.goto(f"{site.url}/queue")
    await page.fill("input[name=min_score]", "0.99")
    await page.dispatch_event("input[name=min_score]", "change")
    await expect(page.locator("#queue p.total")).to_contain_text("0 pairs")
    await expect(page).to_have_url(re.compile(r"min_score=0.99"))

    # Search finds a person by name, email, phone (as written locally) and company.
    for query in ("jonas vogel", "JONAS.VOGEL@example.org", "030 1234567"):
        await page.goto(f"{site.url}/search?q={query}")
        await expect(page.locator("table.results")).to_contain_text("Jonas Vogel")
    await page.goto(f"{site.url}/search?q=Brandt Consulting")
    await expect(page.locator("table.results")).to_contain_text("Mira Brandt")

    assert not too_wide, too_wide
    assert not errors, errors
