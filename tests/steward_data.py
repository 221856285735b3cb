"""Seed a store with review items the real way: a CSV synced through the engine.

Each family is one person seen twice with different emails (Anna/Ann, same surname and
company): the matcher is unsure and queues the pair for review.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, select

from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.store import review_item
from tests.conftest import make_settings

SURNAMES = [
    "Keller",
    "Fischer",
    "Weber",
    "Becker",
    "Hoffmann",
    "Schulz",
    "Koch",
    "Richter",
    "Wolf",
    "Neumann",
    "Schwarz",
    "Zimmermann",
    "Braun",
    "Hartmann",
    "Lange",
    "Krause",
    "Werner",
    "Lehmann",
    "Schmitt",
    "Walter",
    "Maier",
    "Frank",
    "Berger",
    "Kaiser",
    "Fuchs",
]


def write_families(path: Path, count: int) -> None:
    lines = ["id,first_name,last_name,email,company,city"]
    for i, surname in enumerate(SURNAMES[:count]):
        low = surname.lower()
        lines.append(f"{i}-a,Anna,{surname},anna@{low}.example,{surname} GmbH,Berlin")
        lines.append(f"{i}-b,Ann,{surname},a.{low}@web.example,{surname} GmbH,")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def seed_reviews(tmp_path: Path, store_url: str, db: Engine, count: int = 3) -> Settings:
    csv_path = tmp_path / "crm.csv"
    write_families(csv_path, count)
    settings = make_settings(tmp_path, store_url, {"crm": {"type": "csv", "path": str(csv_path)}})
    engine = SyncEngine(settings, db)
    try:
        await engine.run("crm")
    finally:
        engine.close()
    with db.connect() as conn:
        queued = conn.execute(select(review_item.c.id)).scalars().all()
    assert len(queued) == count, f"expected {count} review items, the engine queued {len(queued)}"
    return settings
