"""The cyclic garbage collector, tuned for bulk syncs.

A sync allocates millions of short-lived containers (payloads, mapped records, rows) while
tens of thousands of long-lived ones (modules, models, caches, a page or two in flight) stay
put. With the default thresholds the collector runs every 700 allocations and re-scans the
long-lived objects over and over: about a quarter of a CSV sync's CPU time, for almost no
garbage (reference counting frees everything acyclic). During a run, objects that existed
before it are frozen out of collection and the collector runs every 50,000 allocations;
cyclic garbage is still collected, just in bigger, rarer batches.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["bulk_collection", "tune_for_bulk"]

BULK_THRESHOLDS = (50_000, 20, 20)

_lock = threading.Lock()
_active = 0
_saved: tuple[int, int, int] = gc.get_threshold()


def tune_for_bulk() -> None:
    """For a process that only does bulk work (the mapping helper): freeze what is alive
    now (imports, caches) and collect in big batches from here on."""
    gc.freeze()
    gc.set_threshold(*BULK_THRESHOLDS)


@contextmanager
def bulk_collection() -> Iterator[None]:
    """Bulk thresholds and a frozen heap while a sync runs; restored when the last
    concurrent run in the process ends (a worker may run several)."""
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(*BULK_THRESHOLDS)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                gc.set_threshold(*_saved)
                gc.unfreeze()
