"""The CLI as a user runs it: a real process, real files, exit codes and output."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CRMHUB = [sys.executable, "-m", "crmhub"]


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
    full_env["COLUMNS"] = "120"
    full_env.update(env or {})
    return subprocess.run(
        [*CRMHUB, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_runs_twice_and_the_second_run_changes_nothing(tmp_path):
    first = run("demo", "--dir", "d", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Sync summary" in first.stdout
    assert "golden records" in first.stdout
    assert "crmhub --config d/crmhub.toml golden list" in first.stdout
    second = run("demo", "--dir", "d", "--json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert all(r["counts"]["new"] == 0 and r["counts"]["changed"] == 0 for r in report["runs"])
    assert report["store"]["golden_records"] == 24

    cfg = ["--config", "d/crmhub.toml"]
    listing = json.loads(run(*cfg, "golden", "list", "--merged", "--json", cwd=tmp_path).stdout)
    assert {g["name"] for g in listing} >= {"Bob Smith", "Maria Garcia", "Priya Patel"}
    bob = next(g for g in listing if g["name"] == "Bob Smith")
    shown = run(*cfg, "golden", "show", str(bob["id"]), cwd=tmp_path)
    assert shown.returncode == 0
    assert "bob.smith@gmail.com" in shown.stdout
    assert "Timeline" in shown.stdout
    found = json.loads(
        run(*cfg, "golden", "search", "+1 415 555 0132", "--json", cwd=tmp_path).stdout
    )
    # Bob, whose golden record holds the Acme lead with the same phone too.
    assert [g["id"] for g in found] == [bob["id"]]

    xref = run(*cfg, "export", "xref", "--format", "csv", cwd=tmp_path)
    rows = list(csv.reader(io.StringIO(xref.stdout)))
    assert rows[0] == ["source", "external_id", "golden_id"]
    assert len(rows) - 1 == report["store"]["contacts"]
    assert ["leads", "L-1021", str(bob["id"])] in rows
    assert ["leads", "L-1001", str(bob["id"])] in rows

    golden_out = tmp_path / "golden.jsonl"
    assert (
        run(
            *cfg, "export", "golden", "--format", "jsonl", "--out", str(golden_out), cwd=tmp_path
        ).returncode
        == 0
    )
    assert len(golden_out.read_text(encoding="utf-8").splitlines()) == 24

    why = json.loads(
        run(*cfg, "explain", "leads:L-1001", "webforms:F-9001", "--json", cwd=tmp_path).stdout
    )
    assert why["action"] == "merge"
    assert why["explanation"]["fields"]["first_name"]["level"] == "nickname"
    assert why["a"]["golden_id"] == why["b"]["golden_id"]  # one person
    missing = run(*cfg, "explain", "leads:nope", "1", cwd=tmp_path)
    assert missing.returncode == 1
    assert "no contact record 'leads:nope'" in missing.stderr

    runs = json.loads(run(*cfg, "runs", "--json", cwd=tmp_path).stdout)
    assert {r["state"] for r in runs} == {"succeeded"}
    errors = json.loads(run(*cfg, "errors", "--records-only", "--json", cwd=tmp_path).stdout)
    assert {e["origin"] for e in errors} == {"leads.csv:16", "leads.csv:27", "forms.jsonl:9"}


def test_sync_exit_code_tells_scripts_about_dead_letters(tmp_path):
    (tmp_path / "a.csv").write_text("id,email\n1,a@x.com\n2,\n", encoding="utf-8")
    (tmp_path / "crmhub.toml").write_text(
        '[connectors.a]\ntype = "csv"\npath = "a.csv"\n', encoding="utf-8"
    )
    result = run("sync", "--quiet", cwd=tmp_path)
    assert result.returncode == 3
    assert (tmp_path / "crmhub.db").exists()
    clean = run("sync", "--json", cwd=tmp_path)
    assert clean.returncode == 0
    assert json.loads(clean.stdout)["runs"][0]["counts"]["pulled"] == 0


def test_config_errors_are_one_clear_line_and_exit_1(tmp_path):
    (tmp_path / "crmhub.toml").write_text(
        '[connectors.a]\ntype = "csv"\npaht = "a.csv"\n', encoding="utf-8"
    )
    result = run("sync", cwd=tmp_path)
    assert result.returncode == 1
    assert "did you mean 'path'?" in result.stderr
    assert "Traceback" not in result.stderr
    unknown = run("sync", "nope", cwd=tmp_path)
    assert unknown.returncode == 1
    assert "unknown connector(s): nope" in unknown.stderr
    # A bad value outside the connectors fails as the settings load, past the command.
    (tmp_path / "crmhub.toml").write_text("[matching]\nauto_merge = 2\n", encoding="utf-8")
    for command in (["sync"], ["review", "list"]):
        bad = run(*command, cwd=tmp_path)
        assert bad.returncode == 1, command
        assert "'matching.auto_merge': Input should be less than or equal to 1" in bad.stderr
        assert "Traceback" not in bad.stderr, command


def test_connectors_list_and_check(tmp_path):
    (tmp_path / "a.csv").write_text("id,email\n1,a@x.com\n", encoding="utf-8")
    (tmp_path / "crmhub.toml").write_text(
        '[connectors.a]\ntype = "csv"\npath = "a.csv"\n'
        '[connectors.b]\ntype = "csv"\npath = "missing.csv"\n',
        encoding="utf-8",
    )
    listing = json.loads(run("connectors", "list", "--json", cwd=tmp_path).stdout)
    assert {"csv", "jsonl", "mailbox"} <= {k["kind"] for k in listing["kinds"]}
    ok = run("connectors", "check", "a", cwd=tmp_path)
    assert ok.returncode == 0
    assert "1 file(s)" in ok.stdout
    bad = run("connectors", "check", "b", cwd=tmp_path)
    assert bad.returncode == 1
    assert "matches no file" in bad.stderr


def test_init_writes_a_config_that_works(tmp_path):
    result = run("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "crmhub.toml").read_text(encoding="utf-8")
    assert text == (REPO / "config.example.toml").read_text(encoding="utf-8")
    assert (tmp_path / "crmhub.db").exists()


def test_help_explains_every_command(tmp_path):
    result = run("--help", cwd=tmp_path)
    for command in ("sync", "init", "demo", "golden", "runs", "errors", "export", "connectors"):
        assert command in result.stdout


def test_verbose_logs_carry_ids_not_pii(tmp_path):
    canary = "canary+7f3a@example.invalid"
    (tmp_path / "a.csv").write_text(
        f"id,email,first_name\n1,{canary},Zed\n2,bad@@x,Zed\n", encoding="utf-8"
    )
    (tmp_path / "crmhub.toml").write_text(
        '[connectors.a]\ntype = "csv"\npath = "a.csv"\n', encoding="utf-8"
    )
    result = run("-v", "sync", "--quiet", cwd=tmp_path)
    assert "sync finished connector=a" in result.stderr
    assert canary not in result.stderr
    assert "bad@@x" not in result.stderr
    assert "Zed" not in result.stderr
