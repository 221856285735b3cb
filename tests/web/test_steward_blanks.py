"""Blank-overwrite incidents in the steward UI, the REST API and the CLI, over a store the
real pipeline filled (tests/blanks_data.py): counts on /sources, the list page with paging
and golden-record links, the API for a viewer, `crmhub quality --json`."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from crmhub.cli.app import app as cli_app
from crmhub.web import create_app
from sync.store import make_engine
from sync.users import add_user, create_token
from tests.blanks_data import seed_blanks
from tests.web.conftest import PASSWORD, Workspace
from tests.web.test_steward_ui import sign_in


async def blank_workspace(tmp_path, store_url, db) -> Workspace:
    settings = await seed_blanks(tmp_path, store_url, db)
    tokens = {}
    for role in ("viewer", "steward"):
        add_user(db, role, PASSWORD, role)
        tokens[role] = create_token(db, role, "tests")
    return Workspace(create_app(settings, db), tokens)


async def test_sources_page_and_list_show_the_incidents(tmp_path, store_url, db):
    workspace = await blank_workspace(tmp_path, store_url, db)
    async with workspace.client() as anon:
        assert (await anon.get("/sources/blanks")).status_code == 303  # sign in first
    async with workspace.client() as client:
        await sign_in(client, "viewer")
        sources = await client.get("/sources")
        assert sources.status_code == 200
        assert "Blanked values" in sources.text
        row = re.search(
            r'<a href="/sources/blanks\?source=leads">leads</a>(.*?)</tr>', sources.text, re.S
        )
        assert row, sources.text
        assert re.findall(r'class="score">(\d+)<', row.group(1)) == ["2", "2"]  # 30 days, total
        assert "company (1)" in row.group(1)
        assert "emails (1)" in row.group(1)
        assert "/sources/blanks?source=crm" not in sources.text  # crm blanked nothing

        listing = await client.get("/sources/blanks", params={"source": "leads"})
        assert listing.status_code == 200
        assert "2 incidents" in listing.text
        rows = re.findall(r"<tr>(.*?)</tr>", listing.text.split("<tbody>")[1], re.S)
        assert len(rows) == 2
        by_id = {re.search(r"L-\d", r).group(0): r for r in rows}
        assert set(by_id) == {"L-1", "L-2"}
        assert ">company<" in by_id["L-1"]
        assert ">emails<" in by_id["L-2"]
        assert re.search(r'href="/golden/\d+"', by_id["L-1"])
        assert 'data-label="Still set">yes<' in by_id["L-1"]  # crm still supplies her company
        assert 'data-label="Still set">no<' in by_id["L-2"]
        for value in ("Keller Maschinenbau", "ben.ott@example.org", "Ott Logistik"):
            assert value not in listing.text  # the page names fields, never the lost values
        golden = re.search(r'href="(/golden/\d+)"', by_id["L-1"]).group(1)
        assert (await client.get(golden)).status_code == 200

        other = await client.get("/sources/blanks", params={"source": "crm"})
        assert "No blanked values from crm" in other.text
        everything = await client.get("/sources/blanks", params={"page": 2})
        assert everything.status_code == 200  # past the last page: empty, not an error
        assert 'rel="prev"' in everything.text
        assert (
            "<script>"
            not in (await client.get("/sources/blanks", params={"source": "<script>x"})).text
        )


async def test_api_lists_incidents_for_a_viewer(tmp_path, store_url, db):
    workspace = await blank_workspace(tmp_path, store_url, db)
    async with workspace.client() as anon:
        assert (await anon.get("/api/v1/quality/blanks")).status_code == 401
    async with workspace.client("viewer") as viewer:
        response = await viewer.get("/api/v1/quality/blanks", params={"source": "leads"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == 2
        assert sorted((i["external_id"], i["field"]) for i in body["items"]) == [
            ("L-1", "company"),
            ("L-2", "emails"),
        ]
        assert body["summary"]["leads"]["last_30_days"] == 2
        page = await viewer.get("/api/v1/quality/blanks", params={"limit": 1, "offset": 1})
        assert page.json()["total"] == 2
        assert len(page.json()["items"]) == 1
        assert (await viewer.get("/api/v1/quality/blanks?limit=0")).status_code == 422


async def test_quality_command_counts_them(tmp_path, sqlite_url):
    db = make_engine(sqlite_url)  # one back end: the command reads sync/quality.py as tested
    await seed_blanks(tmp_path, sqlite_url, db)
    db.dispose()
    (tmp_path / "crmhub.toml").write_text(f'[store]\nurl = "{sqlite_url}"\n', encoding="utf-8")
    config = ["--config", str(tmp_path / "crmhub.toml")]
    result = CliRunner().invoke(cli_app, [*config, "quality", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {r["source"]: r for r in json.loads(result.stdout)}
    assert rows["leads"]["blank_overwrites"]["total"] == 2
    assert rows["crm"]["blank_overwrites"]["total"] == 0
    table = CliRunner().invoke(cli_app, [*config, "quality"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.stderr
    assert "company (1), emails (1)" in table.stdout or "emails (1), company (1)" in table.stdout
