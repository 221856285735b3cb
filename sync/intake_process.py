"""The intake processor: a process next to the web server that maps and matches what it accepts.

Why a process of its own: mapping and matching are CPU-bound Python. On a thread of the web
process they hold the GIL for long stretches, and the event loop answering deliveries waits
for it (measured at 200 deliveries/s on 2 cores: p99 of the 2xx 180-400 ms in-process,
against 9-30 ms with a processor process; docs/benchmarks.md). A separate process gets the
other core.

The web process wakes it with one byte on a pipe after each accepted delivery (`kick`), and it
also looks every `POLL_SECONDS` for rows accepted elsewhere. When the web process goes away,
even killed, the pipe's write end closes: the processor finishes its batch and exits. Rows it
claimed but did not finish are picked up after their claim lapses (sync/intake.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection

from crmhub.settings import Settings
from sync.intake import Intake, inline_connectors
from sync.store import make_engine

__all__ = ["POLL_SECONDS", "Processor"]

log = logging.getLogger("crmhub.intake")

# Seconds between two looks at the inbox when nobody kicks (rows from other processes).
POLL_SECONDS = 1.0
# After a kick, wait up to this long, or for this many deliveries, before processing: a
# burst becomes one batch (a submission is still matched well within a second).
GATHER_SECONDS = 0.2
GATHER_ROWS = 50
# CPU priority below the web process's: when the cores are contended, answering deliveries
# comes first and the inbox holds the backlog (p99 of the 2xx 45-48 ms against 51-52 ms at
# nice 0, at 200/s on a loaded 2-core box).
NICENESS = 5
# A processor that died is started again by a kick at most this often.
RESTART_SECONDS = 5.0


class Processor:
    """Starts the processor process; `kick()` after each accepted delivery; `close()`.

    A processor that died (killed, out of memory) is started again by the next kick, at
    most once per `RESTART_SECONDS`; its claimed rows are picked up when their claim lapses.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._next_start = 0.0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # forking a threaded server is unsafe
        reader, self._writer = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_main, args=(self._settings, reader), name="crmhub-intake-processor"
        )
        self._process.start()
        reader.close()
        os.set_blocking(self._writer.fileno(), False)
        self._next_start = time.monotonic() + RESTART_SECONDS

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def kick(self) -> None:
        """Wake the processor: there is a new row. Never blocks (but for a restart)."""
        try:
            os.write(self._writer.fileno(), b"\0")
        except BlockingIOError:
            pass  # the pipe is full of kicks not read yet: it will look anyway
        except OSError:  # BrokenPipeError: it died
            if time.monotonic() < self._next_start:
                return  # rows stay pending until the restart (or `crmhub forms drain`)
            log.error(
                "intake processor died; starting it again",
                extra={"pid": self._process.pid, "exitcode": self._process.exitcode},
            )
            self._writer.close()
            self._process.join(1)
            self._start()

    def close(self, timeout: float = 30.0) -> None:
        """Let it finish the batch in hand, then stop it."""
        self._writer.close()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


def _main(settings: Settings, reader: Connection) -> None:
    # Ctrl-C reaches the whole process group; the web process says when to stop (by closing
    # the pipe), after its own shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(NICENESS)
    db = make_engine(settings.store.url, settings.base_dir)
    intake = Intake(settings, db, only=inline_connectors(settings))
    try:
        asyncio.run(_loop(intake, reader))
    finally:
        intake.close()
        db.dispose()


async def _loop(intake: Intake, reader: Connection) -> None:
    loop = asyncio.get_running_loop()
    fd = reader.fileno()
    os.set_blocking(fd, False)
    woken = asyncio.Event()
    kicks = 0  # deliveries announced since the last batch started
    closed = False

    def readable() -> None:
        nonlocal closed, kicks
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:  # the web process closed its end, or died
            closed = True
            intake.stop()
            loop.remove_reader(fd)
        kicks += len(data)
        woken.set()

    async def woken_within(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), seconds)
        woken.clear()

    loop.add_reader(fd, readable)
    await intake.drain()  # what a previous run acknowledged and did not finish
    while not closed:
        await woken_within(POLL_SECONDS)
        # Gather a burst: a batch costs ~13 ms of CPU whatever its size (frequency prefetch,
        # candidate queries, commits), so one delivery per batch would cost 16 ms each and
        # 25 per batch ~2.5 ms each (docs/benchmarks.md).
        deadline = loop.time() + GATHER_SECONDS
        while kicks < GATHER_ROWS and not closed and (left := deadline - loop.time()) > 0:
            await woken_within(left)
        if closed:
            break
        kicks = 0  # before processing: kicks that come meanwhile start the next gathering
        await intake.process_pending()
