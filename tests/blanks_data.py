"""A store in which a CSV source blanked values it had sent before (blank-overwrite incidents).

`leads` sends Anna, Ben and Cleo, then again with Anna's company blanked and Ben's only email
removed; `crm` also knows Anna with her company, so her golden record keeps one.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from crmhub.settings import Settings
from sync.engine import SyncEngine
from tests.conftest import make_settings

HEADER = "id,first_name,last_name,email,phone,company,city\n"
ANNA = "L-1,Anna,Keller,anna.keller@example.org,+49 30 1234567,Keller Maschinenbau,Berlin\n"
BEN = "L-2,Ben,Ott,ben.ott@example.org,,Ott Logistik,Hamburg\n"
CLEO = "L-3,Cleo,Park,cleo.park@example.org,+49 40 7654321,Park Design,Köln\n"
CRM = (
    "id,first_name,last_name,email,company\n"
    "C-1,Anna,Keller,anna.keller@example.org,Keller Maschinenbau\n"
)


def write_blanked(leads: Path) -> None:
    """The second export: Anna without her company, Ben without his email, Cleo as before."""
    leads.write_text(
        HEADER
        + ANNA.replace("Keller Maschinenbau", "")
        + BEN.replace("ben.ott@example.org", "")
        + CLEO,
        encoding="utf-8",
    )


def blank_settings(tmp_path: Path, store_url: str) -> Settings:
    leads, crm = tmp_path / "leads.csv", tmp_path / "crm.csv"
    leads.write_text(HEADER + ANNA + BEN + CLEO, encoding="utf-8")
    crm.write_text(CRM, encoding="utf-8")
    return make_settings(
        tmp_path,
        store_url,
        {"leads": {"type": "csv", "path": str(leads)}, "crm": {"type": "csv", "path": str(crm)}},
    )


async def seed_blanks(tmp_path: Path, store_url: str, db: Engine) -> Settings:
    """Sync both sources, blank two values at `leads`, sync it again."""
    settings = blank_settings(tmp_path, store_url)
    engine = SyncEngine(settings, db)
    try:
        await engine.run("crm")
        await engine.run("leads")
        write_blanked(tmp_path / "leads.csv")
        await engine.run("leads")
    finally:
        engine.close()
    return settings
