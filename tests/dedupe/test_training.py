"""The learning math: labelled pairs move m toward what they show, in proportion to their
number, and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from dedupe.comparators import COMPARISONS, NULL
from dedupe.scoring import MODEL_VERSION, Params, default_params
from dedupe.training import (
    base_version,
    level_changes,
    train_from_labels,
    trained_version,
)

FIELDS = [c.name for c in COMPARISONS]
COMPANY = FIELDS.index("company")
DIFFERENT = COMPARISONS[COMPANY].levels.index("different")


def _pairs(n: int, company_level: int) -> np.ndarray:
    """n pairs with only the company compared (every other field missing)."""
    levels = np.full((n, len(COMPARISONS)), NULL, dtype=np.int8)
    levels[:, COMPANY] = company_level
    return levels


def _train(levels: np.ndarray, labels: np.ndarray, **kw) -> tuple[Params, object]:
    result = train_from_labels(default_params(), levels, labels, version="test+t1", **kw)
    return result.params, result


def test_no_labels_leave_every_parameter_as_it_was():
    base = default_params()
    params, result = _train(np.empty((0, len(COMPARISONS)), np.int8), np.empty(0, bool))
    assert params.m == base.m
    assert params.u == base.u
    assert params.match_rate == base.match_rate
    assert params.version == "test+t1"
    assert params.provenance["labels"] == {"match": 0, "non_match": 0}
    assert all(c.shift == 0 for c in result.changes)


def test_labelled_matches_move_m_toward_the_observed_level_shares():
    base = default_params()
    # 100 labelled matches, all with different companies (a job change): the observed share
    # of "different" among matches is 1.0, far above the shipped m.
    params, result = _train(_pairs(100, DIFFERENT), np.ones(100, bool), prior_strength=100)
    old = base.m["company"][DIFFERENT] / sum(base.m["company"])
    new = params.m["company"][DIFFERENT]
    assert new == pytest.approx((100 * old + 100) / 200)  # half way with alpha = labels
    assert old < new < 1.0
    assert sum(params.m["company"]) == pytest.approx(1.0)
    assert params.weight("company", DIFFERENT) > base.weight("company", DIFFERENT)
    # The other comparisons saw only nulls: unchanged. u never moves.
    for name in FIELDS:
        if name != "company":
            assert params.m[name] == base.m[name]
    assert params.u == base.u
    assert result.changes[0].comparison == "company"
    assert result.changes[0].level == "different"
    assert result.changes[0].labels == 100


def test_few_labels_move_m_little_and_more_labels_move_it_further():
    base = default_params()
    old = base.m["company"][DIFFERENT]
    moved = {}
    for n in (10, 100, 1000):
        params, _ = _train(_pairs(n, DIFFERENT), np.ones(n, bool))
        moved[n] = params.m["company"][DIFFERENT] - old
    assert 0 < moved[10] < moved[100] < moved[1000]
    assert moved[10] < 0.1 * (1.0 - old)  # 10 labels: under a tenth of the way (alpha = 100)
    assert moved[1000] > 0.9 * (1.0 - old)


def test_labelled_non_matches_do_not_touch_m_and_the_prior_stays_by_default():
    base = default_params()
    params, result = _train(_pairs(50, DIFFERENT), np.zeros(50, bool))
    assert params.m == base.m
    assert params.match_rate == base.match_rate
    assert result.non_matches == 50


def test_the_optional_prior_shift_follows_the_labels_and_is_held_back_by_its_prior():
    base = default_params()
    # Pairs the model calls near-certain (offset +10 bits) that a steward rejects.
    levels, labels = _pairs(30, DIFFERENT), np.zeros(30, bool)
    offsets = np.full(30, 10.0)
    _, loose = _train(levels, labels, offsets=offsets, shift_sd=4.0)
    _, tight = _train(levels, labels, offsets=offsets, shift_sd=0.5)
    assert loose.prior_shift < tight.prior_shift < 0
    _, few = _train(levels[:3], labels[:3], offsets=offsets[:3], shift_sd=0.5)
    assert tight.prior_shift < few.prior_shift < 0
    assert abs(few.prior_shift) < 1.0  # three surprising labels: under a bit
    assert loose.params.match_rate == pytest.approx(base.match_rate * 2**loose.prior_shift)
    # Confirmed instead of rejected: the shift goes the other way.
    _, confirmed = _train(levels, np.ones(30, bool), offsets=np.full(30, -10.0), shift_sd=1.0)
    assert confirmed.prior_shift > 0


def test_training_is_deterministic_and_records_its_provenance():
    levels = _pairs(40, DIFFERENT)
    labels = np.arange(40) % 4 != 0
    when = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
    a, _ = _train(levels, labels, trained_at=when, provenance={"label_fingerprint": "abc"})
    b, _ = _train(levels, labels, trained_at=when, provenance={"label_fingerprint": "abc"})
    assert a.to_json() == b.to_json()
    assert a.provenance["labels"] == {"match": 30, "non_match": 10}
    assert a.provenance["trained_at"] == "2026-11-25T03:00:00+00:00"
    assert a.provenance["base_version"] == MODEL_VERSION
    assert a.provenance["label_fingerprint"] == "abc"
    again = Params.from_json(a.to_json())
    assert again.provenance == a.provenance
    for name in FIELDS:
        assert again.m[name] == pytest.approx(a.m[name], abs=1e-6)


def test_versions_name_the_comparisons_they_belong_to():
    assert trained_version(3) == f"{MODEL_VERSION}+t3"
    assert base_version(trained_version(3)) == MODEL_VERSION
    assert base_version(MODEL_VERSION) == MODEL_VERSION


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="level rows"):
        _train(_pairs(3, DIFFERENT), np.ones(2, bool))
    with pytest.raises(ValueError, match="prior_strength"):
        _train(_pairs(3, DIFFERENT), np.ones(3, bool), prior_strength=0)


def test_level_changes_between_two_parameter_sets_largest_first():
    base = default_params()
    params, _ = _train(_pairs(200, DIFFERENT), np.ones(200, bool))
    changes = level_changes(base, params)
    shifts = [abs(c.shift) for c in changes]
    assert shifts == sorted(shifts, reverse=True)
    assert len(changes) == sum(len(c.levels) for c in COMPARISONS)
