"""The write-back capability of each marketing connector, against its fake over real HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.base import Recipient
from crmhub.errors import PermanentError
from sync.writeback import can_write_back
from tests.connectors.vendors import Running


def _who(vendor: Running, n: int, *, with_id: bool = True) -> Recipient:
    person = vendor.state.people[n]
    ext = next(iter(vendor.want([n]))) if with_id else None
    return Recipient(person.email, ext)


async def test_every_marketing_connector_can_write_back(vendor: Running) -> None:
    connector: Any = vendor.connector()
    assert can_write_back(type(connector))
    assert {"first_name", "last_name", "phone"} <= connector.writable_fields


async def test_push_consent_unsubscribes_and_is_idempotent(vendor: Running) -> None:
    vendor.state.add_people(3)
    connector: Any = vendor.connector()
    for _ in range(2):  # at-least-once delivery: a repeat leaves the same state
        await connector.push_consent(_who(vendor, 2), "unsubscribed")
    assert vendor.state.people[2].status == "unsubscribed"
    assert {p.id for p in vendor.state.people.values() if p.status == "unsubscribed"} == {2}


async def test_update_fields_sets_values_and_is_idempotent(vendor: Running) -> None:
    vendor.state.add_people(2)
    connector: Any = vendor.connector()
    for _ in range(2):
        await connector.update_fields(_who(vendor, 1), {"first_name": "Jo", "last_name": "Ng"})
    person = vendor.state.people[1]
    assert (person.first, person.last) == ("Jo", "Ng")
    assert vendor.state.people[2].first == "First2"


async def test_update_fields_by_email_only(vendor: Running) -> None:
    vendor.state.add_people(2)
    connector: Any = vendor.connector()
    await connector.update_fields(_who(vendor, 2, with_id=False), {"first_name": "Ann"})
    assert vendor.state.people[2].first == "Ann"


async def test_erase_removes_the_person_and_repeats_cleanly(vendor: Running) -> None:
    vendor.state.add_people(3)
    who = _who(vendor, 3)
    connector: Any = vendor.connector()
    await connector.erase(who)
    await connector.erase(who)  # already gone: still a success
    assert 3 not in vendor.state.people
    assert who.email is not None
    assert who.email.lower() in vendor.state.erased
    assert set(vendor.state.people) == {1, 2}


@pytest.mark.parametrize("kind", ["hubspot", "mailchimp", "activecampaign"])
async def test_a_contact_gone_at_the_vendor_is_a_404_permanent_error(kind: str) -> None:
    from tests.connectors.vendors import running

    with running(kind) as vendor:
        vendor.state.add_people(2)
        who = _who(vendor, 2)
        del vendor.state.people[2]
        connector: Any = vendor.connector()
        with pytest.raises(PermanentError) as caught:
            await connector.push_consent(who, "unsubscribed")
        assert caught.value.context.get("status") == 404
        with pytest.raises(PermanentError):
            await connector.update_fields(who, {"first_name": "X"})


async def test_klaviyo_update_of_a_deleted_profile_is_404_not_a_re_creation() -> None:
    from tests.connectors.vendors import running

    with running("klaviyo") as vendor:
        vendor.state.add_people(2)
        who = _who(vendor, 2)
        del vendor.state.people[2]
        connector: Any = vendor.connector()
        with pytest.raises(PermanentError) as caught:
            await connector.update_fields(who, {"first_name": "X"})
        assert caught.value.context.get("status") == 404
        assert len(vendor.state.people) == 1
