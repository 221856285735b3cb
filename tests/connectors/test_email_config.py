"""config.example.toml's commented connector examples validate once uncommented.

The shipped file itself is loaded by tests/test_settings.py; the examples a user is meant to
uncomment (imap, imap with XOAUTH2, gmail, graph, the web forms, write-back) are only comments
there, so this test strips the `# ` of each `# [connectors.NAME]` block and validates the
result the way `crmhub sync` would: settings, connector config, mapping file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crmhub.settings import load_settings
from sync.sources import load_source
from tests.conftest import REPO

EXAMPLE = REPO / "config.example.toml"


def commented_blocks(text: str) -> dict[str, str]:
    """`# [connectors.NAME]` and the `# key = value` lines under it, uncommented."""
    blocks: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        header = re.fullmatch(r"# \[connectors\.([\w-]+)\]", line)
        if header is None:
            continue
        body = [line[2:]]
        for following in lines[i + 1 :]:
            if not following.startswith("# ") or following.startswith("# ["):
                break  # "#" alone, a blank line or the next block ends this one
            body.append(following[2:])
        blocks[header.group(1)] = "\n".join(body) + "\n"
    return blocks


def test_every_commented_connector_example_validates_when_uncommented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = commented_blocks(EXAMPLE.read_text(encoding="utf-8"))
    kinds = set(re.findall(r'^type = "(\w+)"', "".join(blocks.values()), re.M))
    assert {"imap", "gmail", "graph"} <= kinds
    text = "".join(blocks.values())
    for name in set(re.findall(r"\$\{(\w+)\}", text)):
        monkeypatch.setenv(name, f"example-{name.lower()}")
    config = tmp_path / "crmhub.toml"
    config.write_text('[store]\nurl = "sqlite:///x.db"\n\n' + text, encoding="utf-8")
    settings = load_settings(config)
    assert set(settings.connectors) == set(blocks)
    for name in blocks:
        source = load_source(settings, name)
        assert source.mapping.path.exists()


def test_imap_examples_use_each_credential_kind() -> None:
    blocks = commented_blocks(EXAMPLE.read_text(encoding="utf-8"))
    imap = [b for b in blocks.values() if 'type = "imap"' in b]
    assert any('password = "${' in b for b in imap)
    assert any('refresh_token = "${' in b and "token_url" in b for b in imap)
    # Secrets are environment references in every email example, never literal values.
    for block in blocks.values():
        for key in ("password", "refresh_token", "client_secret"):
            for value in re.findall(rf"^{key} = \"([^\"]*)\"", block, re.M):
                assert value.startswith("${"), f"{key} = {value!r} should be a ${{ENV}} reference"
