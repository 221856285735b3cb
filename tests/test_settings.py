from __future__ import annotations

from pathlib import Path

import pytest

from crmhub.errors import SettingsError, UnknownConnectorError
from crmhub.settings import load_settings
from sync.sources import load_source
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crmhub.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_loads_and_every_connector_validates(monkeypatch):
    monkeypatch.setenv("HUBSPOT_TOKEN", "pat-example")
    settings = load_settings(REPO / "config.example.toml")
    for name in settings.connectors:
        source = load_source(settings, name)
        assert source.mapping.path.exists()


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, '[store]\nurl = "sqlite:///x.db"\nurll = 10\n')
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert "unknown key 'store.urll'; did you mean 'url'?" in str(err.value)


def test_connector_typo_is_named_with_the_table(tmp_path):
    path = write(tmp_path, '[connectors.leads]\ntype = "csv"\npth = "a.csv"\n')
    with pytest.raises(SettingsError) as err:
        load_source(load_settings(path), "leads")
    message = str(err.value)
    assert "unknown key 'connectors.leads.pth'; did you mean 'path'?" in message
    assert "missing required key 'connectors.leads.path'" in message


def test_unknown_connector_type_lists_the_known_ones(tmp_path):
    path = write(tmp_path, '[connectors.x]\ntype = "salesforce"\n')
    with pytest.raises(UnknownConnectorError, match=r"known types: .*csv.*jsonl.*mailbox"):
        load_source(load_settings(path), "x")


def test_env_references_expand_and_missing_ones_name_the_key(tmp_path, monkeypatch):
    path = write(tmp_path, '[store]\nurl = "${DB_URL}"\n')
    monkeypatch.setenv("DB_URL", "sqlite:///from-env.db")
    assert load_settings(path).store.url == "sqlite:///from-env.db"
    monkeypatch.delenv("DB_URL")
    with pytest.raises(SettingsError, match=r"store\.url refers to \$\{DB_URL\}.*Export DB_URL"):
        load_settings(path)
    default = write(tmp_path, '[store]\nurl = "${DB_URL:-sqlite:///fallback.db}"\n')
    assert load_settings(default).store.url == "sqlite:///fallback.db"


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "[matching]\nauto_merge = 0.9\n")
    monkeypatch.setenv("CRMHUB_MATCHING__AUTO_MERGE", "0.99")
    assert load_settings(path).matching.auto_merge == 0.99


def test_bad_toml_and_missing_named_file(tmp_path):
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "[store\n"))
    with pytest.raises(SettingsError, match=r"config file not found.*crmhub init"):
        load_settings(tmp_path / "absent.toml")


def test_secret_values_never_appear_in_errors(tmp_path):
    path = write(
        tmp_path, '[connectors.m]\ntype = "mailbox"\npath = "x"\npage_size = "sk_canary"\n'
    )
    with pytest.raises(SettingsError) as err:
        load_source(load_settings(path), "m")
    assert "page_size" in str(err.value)


def test_a_recluster_growth_that_would_batch_every_page_is_refused(tmp_path):
    with pytest.raises(SettingsError) as err:
        load_settings(write(tmp_path, "[matching]\nrecluster_growth = 0.001\n"))
    assert "matching.recluster_growth" in str(err.value)
    assert "use 0.01 or more" in str(err.value)
    assert load_settings(write(tmp_path, "[matching]\nrecluster_growth = 0\n")).matching


def test_a_recheck_growth_that_would_recheck_every_page_is_refused(tmp_path):
    with pytest.raises(SettingsError) as err:
        load_settings(write(tmp_path, "[matching]\nrecheck_growth = 0.0001\n"))
    assert "matching.recheck_growth" in str(err.value)
    assert "use 0.002 or more" in str(err.value)
    assert load_settings(write(tmp_path, "[matching]\nrecheck_growth = 0\n")).matching
