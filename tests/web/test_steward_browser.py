"""The steward workspace in a real browser: Debian's Chromium, driven by Playwright, against a
real uvicorn server on loopback. Sign in, work the queue with the keyboard, merge with a field
choice, reject, skip, undo, unmerge, check the audit log; screenshots at desktop and phone size.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from crmhub.web import create_app
from sync.store import make_engine
from sync.users import add_user
from tests.conftest import service_missing
from tests.steward_data import seed_reviews
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
PAIRS = 6


@pytest.fixture
def server(tmp_path, sqlite_url) -> Iterator[str]:
    """A real crmhub web server on 127.0.0.1 with a seeded queue and a steward."""
    if not Path(CHROMIUM).exists():
        service_missing("Chromium", f"{CHROMIUM} not found; run .ci/setup-chromium.sh")
    db = make_engine(sqlite_url)
    settings = asyncio.run(seed_reviews(tmp_path, sqlite_url, db, count=PAIRS))
    add_user(db, "sam", PASSWORD, "steward")
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
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Screenshots go to $STEWARD_SCREENSHOTS when set (to look at them), else a tmp dir."""
    target = Path(os.environ.get("STEWARD_SCREENSHOTS") or tmp_path / "screens")
    target.mkdir(parents=True, exist_ok=True)
    return target


async def test_steward_works_the_queue_in_chromium(server, shots):
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(
                viewport=dict(zip(("width", "height"), SIZES["desktop"], strict=True))
            )
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda msg: errors.append(msg.text) if msg.type == "error" else None,
            )

            async def snap(name: str) -> None:
                for size, (width, height) in SIZES.items():
                    await page.set_viewport_size({"width": width, "height": height})
                    await page.screenshot(path=str(shots / f"{name}-{size}.png"), full_page=True)
                await page.set_viewport_size(
                    dict(zip(("width", "height"), SIZES["desktop"], strict=True))
                )

            await page.goto(f"{server}/queue")
            await expect(page).to_have_url(re.compile(r"/login\?next=/queue$"))
            await snap("login")
            await page.fill("input[name=name]", "sam")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await expect(page).to_have_url(re.compile(r"/queue$"))
            await expect(page.locator("p.total")).to_contain_text(f"{PAIRS} pairs")
            await snap("queue")

            # htmx: the filter form swaps the table in place (no page load).
            await page.fill("input[name=min_score]", "0.99")
            await page.dispatch_event("input[name=min_score]", "change")
            await expect(page.locator("#queue p.total")).to_contain_text("0 pairs")
            await expect(page).to_have_url(re.compile(r"min_score=0.99"))
            await page.goto(f"{server}/queue")

            # Enter starts reviewing: the best pair, side by side, differences highlighted.
            await page.keyboard.press("Enter")
            await expect(page).to_have_url(re.compile(r"/review/\d+"))
            first = page.url
            await expect(page.locator("tr.differs[data-field=first_name]")).to_be_visible()
            await expect(page.locator("tr[data-field=first_name] td.evidence")).to_contain_text(
                "nickname"
            )
            await snap("compare")
            # Keep "Anna" (survivorship alone would keep the newer "Ann"), merge by keyboard.
            await page.locator(
                "tr[data-field=first_name] label", has_text=re.compile(r"Anna$")
            ).click()
            await page.locator("body").click(position={"x": 5, "y": 5})  # focus off the radio
            await page.keyboard.press("m")
            await expect(page.locator(".flash")).to_contain_text("approved #")
            second = page.url
            assert second != first
            await page.keyboard.press("n")
            await expect(page.locator(".flash")).to_contain_text("rejected #")
            await page.keyboard.press("s")
            await expect(page.locator(".flash")).to_contain_text("skipped #")

            await page.goto(f"{server}/audit")
            rows = page.locator("table.audit tbody tr")
            await expect(rows).to_have_count(3)
            await expect(rows.nth(0)).to_contain_text("review.skip")
            await expect(rows.nth(1)).to_contain_text("review.reject")
            await expect(rows.nth(2)).to_contain_text("review.approve")
            await expect(rows.nth(2)).to_contain_text("kept first_name")
            await snap("audit")
            await page.keyboard.press("u")  # undo the skip
            await expect(page.locator(".flash")).to_contain_text("undid review.skip")
            await expect(rows.nth(0)).to_contain_text("undo")

            # The merged golden record: "Anna" kept, two members; split one off again.
            await page.locator("table.audit a", has_text="golden #").first.click()
            await expect(page.locator("table.fields tr", has_text="first_name")).to_contain_text(
                "Anna"
            )
            await expect(page.locator("button.unmerge")).to_have_count(2)
            await snap("golden")
            await page.locator("button.unmerge").last.click()
            await expect(page.locator(".flash")).to_contain_text("split record")
            await expect(page.locator("table.members tbody tr")).to_have_count(1)

            await page.fill("header input[name=q]", "Keller")
            await page.keyboard.press("Enter")
            await expect(page.locator("table.results")).to_contain_text("Keller")
            await snap("search")
            assert not errors, errors
        finally:
            await browser.close()
