"""A batch's contacts prepared partly on the helper process come out as preparing them all
here gives them, in order; a bad contact is named wherever it was prepared; a helper that
dies leaves the rest to this process."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from bench.matching.generate import generate
from bench.matching.ship_params import contact
from crmhub.errors import DedupeError
from crmhub.mapping import json_text, record_data
from sync import batch_prepare
from sync.batch_prepare import BatchPreparer, Staged


def _staged(count: int) -> list[Staged]:
    """Realistic contacts as the store holds them (JSON text), a few as re-mapped data."""
    rows = generate(count, seed=3)
    out = []
    for i, row in enumerate(rows):
        data = record_data(contact(row))
        out.append(Staged(i + 1, row["source"], data if i % 50 == 0 else json_text(data)))
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(batch_prepare, "CHUNK", 100)
    monkeypatch.setattr(batch_prepare, "HELPER_AFTER", 0)


def _here(staged: list[Staged]) -> list[tuple]:
    with BatchPreparer(helper=False) as preparer:
        return list(preparer.prepared(staged))


def test_the_helper_prepares_contacts_as_this_process_does(small_chunks):
    staged = _staged(3000)
    with BatchPreparer() as preparer:
        preparer.start(wait=True)
        shared = list(preparer.prepared(staged))
    assert preparer.on_helper > 0, "nothing went to the helper"
    assert preparer.on_helper < len(staged), "this process prepared nothing"
    assert shared == _here(staged)
    assert [s.record_id for s, *_ in shared] == [s.record_id for s in staged]


def test_a_bad_contact_is_named_wherever_it_was_prepared(small_chunks, monkeypatch):
    staged = _staged(3000)
    bad = 2_345
    staged[bad] = Staged(staged[bad].record_id, "crm", '{"emails": "not a list"}')
    with pytest.raises(DedupeError, match=f"source record {bad + 1} \\(crm\\)") as here:
        _here(staged)
    monkeypatch.setattr(batch_prepare, "HELPER_QUEUE", 10**6)  # every chunk to the helper
    with BatchPreparer() as preparer:
        preparer.start(wait=True)
        seen = []
        with pytest.raises(DedupeError) as error:
            seen.extend(s.record_id for s, *_ in preparer.prepared(staged))
    assert str(error.value) == str(here.value)
    assert seen == [s.record_id for s in staged[:bad]]
    assert preparer.on_helper == bad


def test_a_helper_that_dies_leaves_the_rest_to_this_process(small_chunks):
    staged = _staged(3000)
    out = []
    with BatchPreparer() as preparer:
        preparer.start(wait=True)
        for item in preparer.prepared(staged):
            out.append(item)
            if len(out) == 500:
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)
    assert preparer.helper_lost
    assert 0 < preparer.on_helper < len(staged)
    assert out == _here(staged)
