from __future__ import annotations

import json
import math

import pytest

from crmhub.records import Contact
from dedupe import Decision, ExactMatcher, MatchKey, build_matcher
from dedupe.cluster import frequency_table
from dedupe.matcher import FellegiSunterMatcher, lookup_keys
from dedupe.normalize import prepare
from dedupe.scoring import FrequencyTable, Params, default_params

BOB_WEBFORM = Contact(first_name="Bob", last_name="Smith", emails=["bob.smith@gmail.com"])
ROBERT_HUBSPOT = Contact(
    first_name="Robert",
    last_name="Smith",
    company="Acme Inc.",
    emails=["bob.smith+crm@gmail.com"],
    phones=["+15550101234"],
)
R_MAILBOX = Contact(full_name="R. Smith", emails=["rsmith@acme.com"], company="ACME")
JAMES_ACME = Contact(first_name="James", last_name="Smith", company="Acme", phones=["+15550100001"])
JAMES_GLOBEX = Contact(
    first_name="James", last_name="Smith", company="Globex", phones=["+15550100002"]
)


def test_build_matcher_returns_the_fellegi_sunter_matcher() -> None:
    matcher = build_matcher(0.95, 0.8, "US")
    assert isinstance(matcher, FellegiSunterMatcher)
    assert matcher.version == "crmhub-fs-3"
    with pytest.raises(ValueError, match="review <= auto_merge"):
        build_matcher(0.5, 0.9)


@pytest.mark.parametrize(
    ("a", "b", "action"),
    [
        (BOB_WEBFORM, ROBERT_HUBSPOT, "merge"),  # gmail dots/+tag + nickname
        (ROBERT_HUBSPOT, R_MAILBOX, "likely"),  # initial + same company: likely, not certain
        (JAMES_ACME, JAMES_GLOBEX, "separate"),  # namesakes at different companies
        (Contact(), Contact(), "separate"),
        (Contact(first_name="Bob"), Contact(first_name="Bob"), "separate"),
    ],
)
def test_issue_examples(a: Contact, b: Contact, action: str) -> None:
    matcher = build_matcher()
    for one, other in ((a, b), (b, a)):
        decision = matcher.compare(one, other)
        if action == "likely":  # at the review threshold's edge: never merged, not dismissed
            assert decision.action != "merge"
            assert 0.5 <= decision.probability < matcher.auto_merge
        else:
            assert decision.action == action


PAIRS = [
    (BOB_WEBFORM, ROBERT_HUBSPOT),
    (ROBERT_HUBSPOT, R_MAILBOX),
    (JAMES_ACME, JAMES_GLOBEX),
    (BOB_WEBFORM, R_MAILBOX),
    (Contact(first_name="Smith", last_name="Bob"), BOB_WEBFORM),
    (Contact(), BOB_WEBFORM),
]


@pytest.mark.parametrize("freq", [None, "table"])
def test_compare_is_symmetric_and_matches_compare_many(freq: str | None) -> None:
    contacts = [c for pair in PAIRS for c in pair]
    table = frequency_table([prepare(c) for c in contacts]) if freq else None
    matcher = FellegiSunterMatcher(frequencies=table)
    batch = matcher.compare_many(PAIRS)
    for (a, b), many in zip(PAIRS, batch, strict=True):
        one, other = matcher.compare(a, b), matcher.compare(b, a)
        assert one.probability == pytest.approx(other.probability, abs=1e-12)
        assert one.probability == pytest.approx(many.probability, abs=1e-9)
        assert one.action == many.action


def test_explanation_is_json_and_readable() -> None:
    decision = build_matcher().compare(BOB_WEBFORM, ROBERT_HUBSPOT)
    explanation = json.loads(json.dumps(decision.explanation))
    fields = explanation["fields"]
    assert fields["first_name"]["level"] == "nickname"
    assert fields["first_name"]["normalisation"] == "nickname bob = robert"
    assert fields["email"]["level"] == "exact"
    assert "+tag removed" in fields["email"]["normalisation"]
    assert fields["phone"]["level"] == "null"
    assert fields["phone"]["weight"] == 0.0
    total = explanation["prior_weight"] + sum(f["weight"] for f in fields.values())
    assert explanation["match_weight"] == pytest.approx(total, abs=0.01)


def test_term_frequency_makes_shared_numbers_weak() -> None:
    a = Contact(last_name="Kowalczyk", phones=["+15550100000"])
    b = Contact(last_name="Nguyen", phones=["+15550100000"])
    table = FrequencyTable(n=10_000)
    rare = FellegiSunterMatcher(frequencies=table).compare(a, b)
    table.add("phone", ["+15550100000"] * 300)  # a switchboard
    shared = FellegiSunterMatcher(frequencies=table).compare(a, b)
    assert shared.probability < rare.probability
    assert shared.explanation["fields"]["phone"]["tf_adjustment"] < 0
    assert shared.action == "separate"


def test_keys_are_capped_by_frequency() -> None:
    contact = Contact(first_name="Ann", last_name="Lee", emails=["ann@acme.com"])
    table = FrequencyTable(n=100_000)
    table.add("email", ["ann@acme.com"] * 50_000)
    keys = FellegiSunterMatcher(frequencies=table).keys(contact)
    assert MatchKey("email", "ann@acme.com") not in keys
    assert MatchKey("email", "ann@acme.com") in build_matcher().keys(contact)


def test_keys_role_addresses_and_probe_kinds() -> None:
    keys = build_matcher().keys(Contact(first_name="R.", last_name="Smith", emails=["info@a.com"]))
    kinds = {k.kind for k in keys}
    assert "email" not in kinds
    assert {"initial", "initial-only"} <= kinds
    full = lookup_keys(prepare(Contact(first_name="Robert", last_name="Smith")))
    probe = lookup_keys(prepare(Contact(first_name="R.", last_name="Smith")))
    assert MatchKey("initial-only", "SM0:r") in full
    assert MatchKey("initial", "SM0:r") in probe
    assert MatchKey("initial", "SM0:r") not in full


def test_exact_matcher_still_works() -> None:
    d = ExactMatcher().compare(BOB_WEBFORM, ROBERT_HUBSPOT)
    assert d == Decision("merge", 1.0, {"shared": ["email"]})


def test_params_json_round_trip_and_validation() -> None:
    params = default_params()
    again = Params.from_json(params.to_json())
    assert again.m == params.m
    assert again.weight("email", 4) == pytest.approx(params.weight("email", 4), rel=1e-3)
    data = json.loads(params.to_json())
    data["comparisons"]["phone"]["m"] = [1.0]
    with pytest.raises(ValueError, match="phone"):
        Params.from_json(json.dumps(data))


def test_huge_fields_are_cut_before_comparison() -> None:
    """10,000-character fields cannot make a comparison expensive: values are cut first.
    (Speed itself is measured by `python -m bench.matching`, not asserted here.)"""
    big = Contact(first_name="x" * 10_000, last_name="y" * 10_000, company="z" * 10_000)
    matcher = build_matcher()
    assert matcher.compare(big, big).action in {"merge", "review", "separate"}
    prepared = prepare(big)
    assert max(len(prepared.first), len(prepared.last), len(prepared.company)) <= 128


@pytest.mark.parametrize(
    "contact",
    [
        Contact(first_name="🙂", last_name="王伟"),
        Contact(full_name="   "),
        Contact(emails=["a@b.co"]),
        Contact(first_name="Bob"),
    ],
)
def test_odd_records_do_not_crash(contact: Contact) -> None:
    matcher = build_matcher()
    assert isinstance(matcher.keys(contact), list)
    assert matcher.compare(contact, BOB_WEBFORM).action in {"merge", "review", "separate"}


def test_vectorised_term_frequencies_equal_scalar_on_random_pairs() -> None:
    import random

    from tests.dedupe.test_comparators import _random_contact

    rng = random.Random(11)
    contacts = [_random_contact(rng) for _ in range(200)]
    matcher = build_matcher(frequencies=frequency_table([prepare(c) for c in contacts]))
    pairs = [(rng.choice(contacts), rng.choice(contacts)) for _ in range(1500)]
    batch = matcher.compare_many(pairs)
    mid = 0
    for (a, b), d in zip(pairs, batch, strict=True):
        one = matcher.compare(a, b)
        assert d.probability == pytest.approx(one.probability, abs=1e-9)
        if 1e-6 < d.probability < 1 - 1e-6:  # compare the weights where they are visible
            mid += 1
            weight = math.log2(d.probability / (1 - d.probability))
            assert weight == pytest.approx(one.explanation["match_weight"], abs=0.01)
    assert mid > 50


def test_vectorised_probabilities_equal_scalar_on_random_pairs() -> None:
    """Term frequencies included: alternative name readings, shared addresses, switchboards
    weighed within a company, swapped names."""
    import random

    import numpy as np

    from dedupe.comparators import Columns
    from tests.dedupe.test_comparators import _random_contact

    rng = random.Random(11)
    records = [prepare(_random_contact(rng)) for _ in range(400)]
    matcher = FellegiSunterMatcher(frequencies=frequency_table(records))
    ia = np.array([rng.randrange(400) for _ in range(3000)], dtype=np.int64)
    ib = np.array([rng.randrange(400) for _ in range(3000)], dtype=np.int64)
    batch = matcher.probabilities(Columns.of(records), ia, ib)
    for k in range(len(ia)):
        one = matcher.compare_prepared(records[ia[k]], records[ib[k]]).probability
        assert one == pytest.approx(float(batch[k]), abs=1e-9)


def test_scoring_on_threads_gives_the_same_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch path scores chunks of pairs on several threads: every chunk's probabilities
    land where they would on one thread, term frequencies counted as the threads ask."""
    import random

    import numpy as np

    import dedupe.matcher as matcher_module
    from dedupe.comparators import Columns
    from tests.dedupe.test_comparators import _random_contact

    rng = random.Random(23)
    records = [prepare(_random_contact(rng)) for _ in range(500)]
    ia = np.array([rng.randrange(500) for _ in range(20_000)], dtype=np.int64)
    ib = np.array([rng.randrange(500) for _ in range(20_000)], dtype=np.int64)
    one = FellegiSunterMatcher(frequencies=frequency_table(records))
    alone = one.probabilities(Columns.of(records), ia, ib)
    monkeypatch.setattr(matcher_module, "PAIR_CHUNK", 700)  # 29 chunks
    threaded = FellegiSunterMatcher(frequencies=frequency_table(records))
    assert np.array_equal(threaded.probabilities(Columns.of(records), ia, ib, threads=3), alone)
    assert np.array_equal(threaded.probabilities(Columns.of(records), ia, ib), alone)


def test_a_number_shared_at_one_company_counts_among_that_company() -> None:
    """Colleagues share a switchboard: when two records name the same company, a number held
    by several of its records is weak evidence even if it is rare in the whole store."""
    table = FrequencyTable(n=100_000)
    table.add("company", ["acme"] * 10)
    table.add("phone", ["+15550100000"] * 5)
    a = Contact(first_name="Adam", last_name="Taylor", company="Acme", phones=["+15550100000"])
    b = Contact(first_name="Loretta", last_name="Taylor", company="Acme", phones=["+15550100000"])
    c = Contact(first_name="Loretta", last_name="Taylor", phones=["+15550100000"])
    matcher = FellegiSunterMatcher(frequencies=table)
    same_company = matcher.compare(a, b).explanation["fields"]["phone"]
    no_company = matcher.compare(a, c).explanation["fields"]["phone"]
    assert same_company["tf_adjustment"] < no_company["tf_adjustment"] - 10
    # A number only the pair holds keeps its full weight at the same company.
    table.add("phone", ["+15550109999"] * 2)
    d = a.model_copy(update={"phones": ["+15550109999"]})
    e = b.model_copy(update={"phones": ["+15550109999"]})
    own = matcher.compare(d, e).explanation["fields"]["phone"]
    assert own["tf_adjustment"] > same_company["tf_adjustment"] + 10


def test_the_explanation_read_later_is_the_one_the_score_came_from() -> None:
    """compare_prepared explains a pair only when asked (most candidates never are): the
    explanation read later sums to the pair's probability, is built once, and does not
    change when the matcher's parameters are swapped in between (a retrained model)."""
    import random

    from tests.dedupe.test_comparators import _random_contact

    rng = random.Random(5)
    records = [prepare(_random_contact(rng)) for _ in range(300)]
    matcher = FellegiSunterMatcher(frequencies=frequency_table(records))
    decisions = [
        matcher.compare_prepared(rng.choice(records), rng.choice(records)) for _ in range(400)
    ]
    matcher.params = Params(match_rate=5.0, m=default_params().m, u=default_params().u)
    for d in decisions:
        explanation = d.explanation
        assert explanation is d.explanation  # built once
        assert explanation["probability"] == round(d.probability, 6)
        fields = explanation["fields"].values()
        total = explanation["prior_weight"] + sum(
            f["weight"] + f.get("tf_adjustment", 0.0) for f in fields
        )
        assert total == pytest.approx(explanation["match_weight"], abs=0.01)
        assert explanation["prior_weight"] == round(default_params().prior_weight(300), 3)
    assert Decision("review", 0.9, {"a": 1}) == Decision("review", 0.9, {"a": 1})
    assert Decision("review", 0.9, {"a": 1}) != Decision("review", 0.9, {"a": 2})


def test_vectorised_scoring_counts_only_the_values_pairs_agree_on() -> None:
    """An incremental caller's `Frequencies` counts in the store: one new record's hundreds
    of candidates must not have every value of theirs counted, only what pairs agree on."""
    import random

    import numpy as np

    from dedupe.comparators import Columns
    from dedupe.scoring import tf_values
    from tests.dedupe.test_comparators import _random_contact

    rng = random.Random(5)
    probe = prepare(
        Contact(
            first_name="Robert", last_name="Smith", emails=["rob.smith@acme.com"], company="Acme"
        )
    )
    candidates = [prepare(_random_contact(rng)) for _ in range(300)]
    bob = prepare(Contact(first_name="Bob", last_name="Smith", company="Acme Inc"))
    candidates.append(bob)
    records = [probe, *candidates]
    table = frequency_table(records)
    asked: set[str] = set()

    class Recording:
        total = table.total

        def count(self, kind: str, value: str) -> int:
            asked.add(value)
            return table.count(kind, value)

    matcher = FellegiSunterMatcher(frequencies=Recording())
    ib = np.arange(1, len(records), dtype=np.int64)
    ia = np.zeros(len(ib), dtype=np.int64)
    matcher.probabilities(Columns.of(records), ia, ib)
    own = {v for record in (probe, bob) for values in tf_values(record).values() for v in values}
    held = {v for c in candidates for values in tf_values(c).values() for v in values}
    assert asked  # what Bob Smith at Acme agrees on with Robert Smith ("bob" = "robert") ...
    assert asked <= own  # ... and nothing of the 300 others
    assert len(held - own) > 20  # values the others hold, never counted


def test_scored_columns_are_freed_without_the_cyclic_collector() -> None:
    """The batch path pauses the cyclic collector: a cycle through the term-frequency cache
    would keep every chunk's columns alive (+400 MiB at 1M records)."""
    import gc
    import random

    import numpy as np

    from dedupe.comparators import Columns
    from tests.dedupe.test_comparators import _random_contact

    rng = random.Random(3)
    records = [prepare(_random_contact(rng)) for _ in range(50)]
    matcher = FellegiSunterMatcher(frequencies=frequency_table(records))
    pairs = np.arange(49, dtype=np.int64)

    def alive() -> int:
        return sum(isinstance(o, Columns) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = alive()
        cols = Columns.of(records)
        matcher.probabilities(cols, pairs, pairs + 1)
        assert alive() == before + 1
        del cols
        assert alive() == before
    finally:
        gc.enable()
