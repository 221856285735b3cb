"""Property: the batch clusters do not depend on the order records arrive in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crmhub.records import Contact
from dedupe.cluster import cluster

# A small vocabulary so that random records collide: nicknames, shared surnames, shared
# switchboard numbers and addresses, missing fields.
FIRST = st.sampled_from([None, "Bob", "Robert", "R.", "Rob", "Ann", "Anne", "James", "Jim"])
LAST = st.sampled_from([None, "Smith", "Smyth", "Lee", "Jones"])
EMAIL = st.sampled_from(
    ["bob.smith@gmail.com", "bobsmith+x@gmail.com", "ann@acme.com", "jim@globex.com", "j@x.io"]
)
PHONE = st.sampled_from(["+15550100001", "+15550100002", "+15550100003"])
COMPANY = st.sampled_from([None, "Acme Inc.", "ACME", "Globex LLC"])
CITY = st.sampled_from([None, "Leeds", "York"])

CONTACT = st.builds(
    Contact,
    first_name=FIRST,
    last_name=LAST,
    emails=st.lists(EMAIL, max_size=1),
    phones=st.lists(PHONE, max_size=1),
    company=COMPANY,
    city=CITY,
)


def _partition(
    contacts: list[Contact], clusters: list[list[int]], ids: list[int]
) -> list[list[str]]:
    """The clusters as sorted lists of record contents: identical records are interchangeable,
    so which of two identical copies joins a cluster is not an order dependence."""
    return sorted(sorted(contacts[ids[i]].model_dump_json() for i in m) for m in clusters)


@settings(max_examples=60, deadline=None)
@given(st.lists(CONTACT, min_size=2, max_size=14), st.randoms(use_true_random=False))
def test_shuffled_input_gives_the_same_clusters(contacts: list[Contact], rnd: object) -> None:
    order = list(range(len(contacts)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    base = _partition(contacts, cluster(contacts).clusters, list(range(len(contacts))))
    shuffled = _partition(contacts, cluster([contacts[i] for i in order]).clusters, order)
    assert shuffled == base
