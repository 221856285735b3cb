"""`crmhub review ...` and `crmhub users ...` as a user runs them: a real process, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from sqlalchemy import select
from typer.testing import CliRunner

from crmhub.cli.app import app
from sync.store import app_user, audit_log, make_engine
from tests.steward_data import seed_reviews


def crmhub(tmp_path, *args: str, stdin: str | None = None) -> Result:
    """In process (a subprocess costs ~1.5 s of imports each); one real process below."""
    result = CliRunner().invoke(
        app, ["--config", str(tmp_path / "crmhub.toml"), *args], input=stdin, env={"COLUMNS": "160"}
    )
    return Result(result.exit_code, result.stdout, result.stderr)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def crmhub_process(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "crmhub", "--config", str(tmp_path / "crmhub.toml"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_review_and_users_commands(tmp_path, sqlite_url):
    db = make_engine(sqlite_url)  # one back end: the commands share sync/review.py with the API
    await seed_reviews(tmp_path, sqlite_url, db, count=2)
    (tmp_path / "crmhub.toml").write_text(
        f'[store]\nurl = "{sqlite_url}"\n[connectors.crm]\ntype = "csv"\npath = "crm.csv"\n',
        encoding="utf-8",
    )
    listing = crmhub_process(tmp_path, "review", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    report = json.loads(listing.stdout)
    assert report["total"] == 2
    first = report["items"][0]
    newest = json.loads(crmhub(tmp_path, "review", "list", "--sort", "newest", "--json").stdout)
    assert [i["id"] for i in newest["items"]] == sorted(
        (i["id"] for i in report["items"]), reverse=True
    )
    waited = crmhub(tmp_path, "review", "list", "--min-age-days", "1", "--json")
    assert json.loads(waited.stdout)["total"] == 0
    bad_sort = crmhub(tmp_path, "review", "list", "--sort", "random")
    assert bad_sort.returncode == 1
    assert "unknown sort 'random'" in bad_sort.stderr
    shown = crmhub(tmp_path, "review", "show", str(first["id"]))
    assert "first_name" in shown.stdout
    assert "nickname" in shown.stdout

    approved = crmhub(
        tmp_path, "review", "approve", str(first["id"]), "--keep", "first_name=a", "--as", "sam",
        "--json",
    )  # fmt: skip
    assert approved.returncode == 0, approved.stderr
    golden_id = json.loads(approved.stdout)["golden_id"]
    again = crmhub(tmp_path, "review", "approve", str(first["id"]))
    assert again.returncode == 1
    assert "already" in again.stderr
    bad = crmhub(tmp_path, "review", "approve", str(report["items"][1]["id"]), "--keep", "x")
    assert bad.returncode == 1
    assert "FIELD=a or FIELD=b" in bad.stderr
    missing = crmhub(tmp_path, "review", "show", "99999")
    assert missing.returncode == 1
    assert "no review item 99999" in missing.stderr

    golden = json.loads(crmhub(tmp_path, "golden", "show", str(golden_id), "--json").stdout)
    assert golden["fields"]["first_name"] == "Anna"  # A kept; B is newer
    undone = crmhub(tmp_path, "review", "undo", "--as", "sam")
    assert undone.returncode == 0, undone.stderr
    assert "undid review.approve" in undone.stdout
    assert json.loads(crmhub(tmp_path, "review", "list", "--json").stdout)["total"] == 2

    added = crmhub(
        tmp_path, "users", "add", "sam", "--role", "steward", "--password-stdin",
        stdin="a long password\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    dup = crmhub(tmp_path, "users", "add", "sam", "--password-stdin", stdin="another one!\n")
    assert dup.returncode == 1
    assert "exists already" in dup.stderr
    role = crmhub(tmp_path, "users", "add", "x", "--role", "root", "--password-stdin", stdin="")
    assert "unknown role 'root'" in role.stderr
    token = crmhub(tmp_path, "users", "token", "sam")
    assert token.stdout.startswith("chm_")
    users = json.loads(crmhub(tmp_path, "users", "list", "--json").stdout)
    assert [(u["name"], u["role"]) for u in users] == [("sam", "steward")]
    with db.connect() as conn:
        stored = conn.execute(select(app_user.c.password_hash)).scalar_one()
        audited = conn.execute(
            select(audit_log.c.actor, audit_log.c.action)
            .where(audit_log.c.action.like("user.%"))
            .order_by(audit_log.c.id)
        ).all()
    db.dispose()
    assert [a for _, a in audited] == ["user.add", "user.token"]
    assert all(actor.startswith("cli:") for actor, _ in audited)
    assert stored.startswith("$argon2id$")
    assert "a long password" not in stored
