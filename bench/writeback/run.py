"""Write-back figures: time to propagate opt-outs from Mailchimp to the other three fakes and
pushes/s under a per-tool rate budget.

    .venv/bin/python -m bench.writeback.run PEOPLE OPTOUTS RATE
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from contextlib import ExitStack

from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.outbox import relay
from sync.store import make_engine
from tests.connectors.vendors import TOKEN, VENDORS, running

KINDS = ("activecampaign", "hubspot", "klaviyo", "mailchimp")


async def main(people: int, optouts: int, rate: float) -> None:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        tools = {k: stack.enter_context(running(k)) for k in KINDS}
        table = {}
        for k, t in tools.items():
            t.state.add_people(people)
            table[k] = {
                **VENDORS[k].config(t.url, TOKEN),
                "rate_limit": rate,
                "writeback": {"consent": True},
            }
        settings = Settings(
            store={"url": f"sqlite:///{tmp}/crm.db"}, connectors=table, matching={"method": "exact"}
        )
        db = make_engine(settings.store.url)
        upgrade(db)
        eng = SyncEngine(settings, db)
        for k in KINDS:
            await eng.run(k)
        tools["mailchimp"].state.touch(list(range(1, optouts + 1)), status="unsubscribed")
        t0 = time.monotonic()
        await eng.run("mailchimp")
        t1 = time.monotonic()
        report = await relay(settings, db)
        t2 = time.monotonic()
        ok = all(
            tools[k].state.people[n].status == "unsubscribed"
            for k in KINDS
            for n in range(1, optouts + 1)
        )
        print(
            f"people={people} optouts={optouts} rate={rate}/s per tool: sync {t1 - t0:.2f}s, "
            f"relay {report.sent} pushes in {t2 - t1:.2f}s ({report.sent / (t2 - t1):.1f}/s), "
            f"propagated={ok}, failed={report.failed}, total {t2 - t0:.2f}s"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
