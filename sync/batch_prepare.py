"""A batch's staged contacts validated, prepared and keyed, on a helper process as well as here.

Before a batch (a first load, `crmhub rebuild`) clusters, every staged contact is validated,
prepared (`dedupe.normalize.prepare`) and keyed (blocking keys and term-frequency rows): pure
Python, about 70 us a contact, so at 1M contacts one core worked for over a minute while the
other idled. A big batch sends chunks of the stored JSON text to a helper process, which sends
back each contact's prepared form and key rows, marshalled; this process prepares the chunks
the helper has no room for itself. Chunks are taken in the order they were read, so the batch
is exactly the one preparing everything here gives.
"""

from __future__ import annotations

import logging
import marshal
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from crmhub.errors import DedupeError
from crmhub.mapping import json_text
from crmhub.records import Contact
from dedupe.cluster import index_parts
from dedupe.matcher import key_tuples
from dedupe.normalize import Prepared, prepare
from dedupe.scoring import tf_values
from sync.forms import form_row, prepared_values
from sync.frequencies import tf_rows
from sync.helper import HelperProcess, helper_pool

__all__ = ["BatchPreparer", "Keyed", "Staged", "contact_of", "keyed", "rows_json"]

HELPER_AFTER = 50_000  # contacts prepared here before the helper starts (small batches never pay)
CHUNK = 2_000  # contacts a chunk
LOOKAHEAD = 10  # chunks read ahead of the one being taken
HELPER_QUEUE = 6  # chunks waiting for the helper at most; the others are prepared here

log = logging.getLogger("crmhub.sync")

KeyRow = tuple[str, str]


class Staged(NamedTuple):
    """One live contact's staged data: the store's JSON text, or the data a re-mapping gave;
    and its `source_updated_at` (survivorship's recency)."""

    record_id: int
    source: str
    data: str | dict[str, Any]
    updated_at: datetime | None = None


def contact_of(staged: Staged) -> Contact:
    """The staged data as a `Contact`; a clear error naming the record if it is not one."""
    try:
        if isinstance(staged.data, str):
            return Contact.model_validate_json(staged.data)
        return Contact.model_validate(staged.data)
    except ValueError as exc:
        raise _invalid(staged, exc.__class__.__name__) from None


def _invalid(staged: Staged, error: str) -> DedupeError:
    rid, source = staged.record_id, staged.source
    return DedupeError(
        f"source record {rid} ({source}): its staged data is not a valid contact ({error}); "
        f"run `crmhub sync {source} --full`",
        record_id=rid,
    )


class Keyed(NamedTuple):
    """A contact's keys as the batch takes them."""

    used: list[KeyRow]  # the blocking keys the batch's `KeyIndex` holds
    flags: bytes  # their probe flags (`dedupe.cluster.index_parts`)
    rows: list[KeyRow]  # its match_key rows: all blocking keys, then term-frequency rows
    rows_json: str  # the rows as `KeyRows` keeps them
    form: str  # its contact_form row (`sync.forms.form_row`)


def keyed(record: Prepared, data_text: str) -> Keyed:
    """A contact's keys: blocking keys for the batch's index, and the match_key rows the
    incremental path stores for it (blocking keys and term-frequency rows), with its
    prepared form's row for the data it was prepared from (the store's text)."""
    own = key_tuples(record)
    rows = list(dict.fromkeys([*own, *tf_rows(tf_values(record))]))
    return Keyed(*index_parts(record, own), rows, rows_json(rows), form_row(data_text, record))


def rows_json(rows: list[KeyRow]) -> str:
    """A contact's match_key rows as `KeyRows` keeps them. As str: orjson's bytes keep their
    4 KB output buffer (measured), a str is exact."""
    return orjson.dumps(rows).decode()


def prepare_texts(texts: list[str]) -> bytes:
    """On the helper: each contact's prepared fields, blocking keys and other rows, as
    marshalled columns; it stops at a text that is not a valid contact and names its place
    and the error."""
    prepared: list[tuple[Any, ...]] = []
    keys: list[Keyed] = []
    failed: tuple[int, str] | None = None
    for at, text in enumerate(texts):
        try:
            contact = Contact.model_validate_json(text)
        except ValueError as exc:
            failed = (at, exc.__class__.__name__)
            break
        record = prepare(contact)
        prepared.append(prepared_values(record))
        keys.append(keyed(record, text))
    # marshal writes a key shared by `used` and `rows` once (a reference the second time)
    return marshal.dumps((prepared, [tuple(k) for k in keys], failed))


PreparedContact = tuple[Staged, Prepared, Keyed]


class BatchPreparer:
    """Prepares staged contacts in order, a share of them on a helper process once a batch
    is big (and there is a second core). Use as a context manager: it ends the helper."""

    def __init__(self, helper: bool = True) -> None:
        self._helper = helper and (os.cpu_count() or 1) > 1
        self._pool: HelperProcess | None = None
        self._ready: Future[bool] | None = None
        self._queued: deque[Future[bytes]] = deque()
        self.on_helper = 0  # contacts the helper prepared
        self.helper_lost = False

    def __enter__(self) -> BatchPreparer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def start(self, wait: bool = False) -> None:
        """Start the helper (it imports for a second or more; chunks are prepared here until
        it is ready, or, with `wait`, once it is)."""
        if self._helper and self._pool is None:
            self._pool, self._ready = helper_pool()
        if wait and self._ready is not None:
            self._ready.result()

    def prepared(self, staged: Iterable[Staged]) -> Iterator[PreparedContact]:
        """(staged, prepared form, keys) for each contact, in the order given."""
        pending: deque[tuple[list[Staged], Future[bytes] | None]] = deque()
        read = 0
        for chunk in _chunks(staged, CHUNK):
            if read >= HELPER_AFTER:
                self.start()
            pending.append((chunk, self._submit(chunk)))
            read += len(chunk)
            while len(pending) > LOOKAHEAD:
                yield from self._take(*pending.popleft())
        while pending:
            yield from self._take(*pending.popleft())

    def _submit(self, chunk: list[Staged]) -> Future[bytes] | None:
        """The chunk sent to the helper, or None to prepare it here: the helper is not
        started yet, or has enough waiting."""
        ready = self._ready
        if not self._helper or self._pool is None or ready is None or not ready.done():
            return None
        while self._queued and self._queued[0].done():
            self._queued.popleft()
        if len(self._queued) >= HELPER_QUEUE:
            return None
        texts = [_text(s) for s in chunk]
        try:
            future: Future[bytes] = self._pool.submit(prepare_texts, texts)
        except BrokenProcessPool:
            self._lost()
            return None
        self._queued.append(future)
        return future

    def _lost(self) -> None:
        """The helper died (killed, out of memory): this process prepares the rest."""
        if self._helper:
            log.warning("the batch's helper process ended; preparing the rest in this process")
        self._helper = False
        self.helper_lost = True

    def _take(self, chunk: list[Staged], future: Future[bytes] | None) -> Iterator[PreparedContact]:
        blob = None
        if future is not None:
            try:
                blob = future.result()
            except BrokenProcessPool:
                self._lost()
        if blob is None:
            for staged in chunk:
                record = prepare(contact_of(staged))
                yield staged, record, keyed(record, _text(staged))
            return
        prepared, keys, failed = marshal.loads(blob)
        self.on_helper += len(prepared)
        for staged, values, parts in zip(chunk, prepared, keys, strict=False):
            yield staged, Prepared(*values), Keyed(*parts)
        if failed is not None:
            raise _invalid(chunk[failed[0]], failed[1])


def _text(staged: Staged) -> str:
    """The contact's data as the store's `data` column holds (or will hold) it."""
    return staged.data if isinstance(staged.data, str) else json_text(staged.data)


def _chunks(items: Iterable[Staged], size: int) -> Iterator[list[Staged]]:
    chunk: list[Staged] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
