"""A real browser (Debian's headless Chromium, driven by Playwright) fills and submits the
`crmhub forms snippet` form on a page served from localhost; the contact appears."""

from __future__ import annotations

import shutil

from crmhub.cli.forms_cmd import snippet_html
from crmhub.web import create_app
from sync.store import make_engine
from tests.conftest import make_settings, service_missing
from tests.web.conftest import activities, connectors, golden_of, live, records, wait_until

SITE = "http://www.example.com"  # http like the test server: https -> http sends Origin: null

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_chromium_submits_the_snippet_and_the_contact_appears(tmp_path, sqlite_url):
    # One back end is enough here: the browser path is the same on both stores.
    if CHROMIUM is None:
        service_missing("Chromium", "no chromium on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        service_missing("Playwright", exc)
    tables = connectors()
    tables["contact"] |= {"allowed_origins": [SITE], "thank_you_url": f"{SITE}/thanks"}
    db = make_engine(sqlite_url)
    app = create_app(make_settings(tmp_path, sqlite_url, tables), db)
    with live(app) as server:
        form = snippet_html(f"{server.url}/f/contact", ["name", "email", "message"], "website_url")
        page_html = f"<!doctype html><title>Contact</title><h1>Contact us</h1>{form}"

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                # The page comes from the allowed origin, so the browser sends that Origin.
                page.route(
                    f"{SITE}/contact",
                    lambda route: route.fulfill(body=page_html, content_type="text/html"),
                )
                page.goto(f"{SITE}/contact")
                page.fill("input[name=name]", "Noor Haddad")
                page.fill("input[name=email]", "noor@haddad.example")
                page.fill("textarea[name=message]", "Sent from a real browser")
                # (Playwright does not route a redirect's target, so the 303 itself is checked.)
                with page.expect_response(lambda r: r.url.endswith("/f/contact")) as posted:
                    page.click("button[type=submit]")
                assert posted.value.status == 303
                assert posted.value.headers["location"] == f"{SITE}/thanks"
            finally:
                browser.close()
        wait_until(lambda: len(activities(db, "contact")) == 1, timeout=5)
    (contact,) = records(db, "contact", "contact")
    golden = golden_of(db, contact["id"])
    assert golden is not None
    assert golden["emails"] == ["noor@haddad.example"]
    assert golden["last_name"] == "Haddad"
    assert activities(db, "contact")[0]["data"]["excerpt"] == "Sent from a real browser"
    db.dispose()
