"""The connector contract, checked against every HTTP connector's fake vendor server."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pydantic
import pytest

from connectors.base import Connector
from crmhub.errors import AuthError, PermanentError, TransientError
from crmhub.mapping import load_mapping, mapping_path_for
from crmhub.records import Page, RawRecord
from tests.connectors.vendors import TOKEN, Running
from tests.fakes.server import Fault


async def pull_all(
    connector: Connector[Any], stream: str = "contacts", cursor: dict[str, Any] | None = None
) -> list[Page]:
    return [page async for page in connector.pull(stream, cursor)]  # type: ignore[arg-type]


def records(pages: list[Page], kind: str = "contact") -> list[RawRecord]:
    return [r for p in pages for r in p.records if r.kind == kind]


def ids(pages: list[Page], kind: str = "contact") -> list[str]:
    return [r.external_id for r in records(pages, kind)]


def test_config_rejects_unknown_keys_and_renders_schema(vendor: Running) -> None:
    cls = type(vendor.connector())
    raw = {**vendor.vendor.config(vendor.url, TOKEN), "tokn": "x"}
    with pytest.raises(pydantic.ValidationError, match="tokn"):
        cls.Config.model_validate(raw)
    schema = cls.Config.model_json_schema()
    secrets = [k for k, v in schema["properties"].items() if v.get("format") == "password"]
    assert secrets, "the credential must be a SecretStr"
    assert TOKEN not in repr(vendor.connector().config)


async def test_full_pull_yields_every_record_once_and_maps(vendor: Running) -> None:
    vendor.state.add_people(250, status_every=10)
    pages = await pull_all(vendor.connector(page_size=100))
    got = ids(pages)
    assert len(got) == 250
    assert set(got) == vendor.want(range(1, 251))
    assert all(isinstance(p, Page) and not p.rejects for p in pages)
    assert pages[-1].next_cursor
    mapping = load_mapping(mapping_path_for(vendor.vendor.kind))
    contacts = [mapping.map_contact(r.payload) for r in records(pages)]
    assert {c.external_id for c in contacts} == set(got)
    assert all(c.record.emails and c.updated_at for c in contacts)
    consent = {c.external_id: c.record.consent for c in contacts}
    assert consent[vendor.vendor.external_id(10)] == "unsubscribed"
    assert consent[vendor.vendor.external_id(11)] != "unsubscribed"


async def test_resume_mid_run_skips_nothing(vendor: Running) -> None:
    vendor.state.add_people(230)
    connector = vendor.connector(page_size=50)
    first: list[Page] = []
    async for page in connector.pull("contacts", None):
        first.append(page)
        if len(first) == 2:
            break  # the run dies after committing two pages
    resumed = await pull_all(vendor.connector(page_size=50), cursor=first[-1].next_cursor)
    seen = set(ids(first)) | set(ids(resumed))
    assert seen == vendor.want(range(1, 231))
    # The boundary records already committed are not yielded again.
    assert not set(ids(first)) & set(ids(resumed))


async def test_ties_across_page_boundaries_are_not_lost(vendor: Running) -> None:
    """S8d: 300 records sharing one updated_at, pages of 100, resumed after page 1."""
    vendor.state.add_people(300, same_time=True)
    vendor.state.add_people(5)
    connector = vendor.connector(page_size=100)
    full = await pull_all(connector)
    assert len(set(ids(full))) == 305
    first = None
    async for page in vendor.connector(page_size=100).pull("contacts", None):
        first = page
        break
    assert first is not None
    rest = await pull_all(vendor.connector(page_size=100), cursor=first.next_cursor)
    assert set(ids([first])) | set(ids(rest)) == vendor.want(range(1, 306))


async def test_records_edited_while_paging_are_not_lost(vendor: Running) -> None:
    """Records already read are edited mid-run (they move to the end of the order): no
    unread record is shifted past the position the next page starts from."""
    vendor.state.add_people(300)
    got: list[str] = []
    async for page in vendor.connector(page_size=50).pull("contacts", None):
        got += [r.external_id for r in page.records if r.kind == "contact"]
        if len(got) == 100:
            vendor.state.touch([10, 20, 30])
    assert set(got) == vendor.want(range(1, 301))


async def test_dense_timestamps_many_per_second(vendor: Running) -> None:
    """100 records per second: second-resolution sources see ties everywhere, and the next
    incremental run still yields exactly the records changed (no re-reads of the overlap)."""
    vendor.state.add_people(1000, step_ms=10)
    full = await pull_all(vendor.connector(page_size=100))
    got = ids(full)
    assert set(got) == vendor.want(range(1, 1001))
    assert len(got) == 1000
    vendor.state.touch([7, 500, 999])
    again = ids(await pull_all(vendor.connector(page_size=100), cursor=full[-1].next_cursor))
    assert sorted(again) == sorted(vendor.want([7, 500, 999]))


async def test_incremental_run_fetches_only_changes(vendor: Running) -> None:
    vendor.state.add_people(120)
    full = await pull_all(vendor.connector(page_size=50))
    cursor = full[-1].next_cursor
    vendor.state.touch([3, 50, 77], status="unsubscribed")
    vendor.state.add_people(2)
    again = await pull_all(vendor.connector(page_size=50), cursor=cursor)
    assert sorted(ids(again)) == sorted(vendor.want([3, 50, 77, 121, 122]))
    nothing = await pull_all(vendor.connector(page_size=50), cursor=again[-1].next_cursor)
    assert ids(nothing) == []


async def test_future_cursor_yields_nothing(vendor: Running) -> None:
    vendor.state.add_people(20)
    full = await pull_all(vendor.connector())
    future = dict(full[-1].next_cursor or {})
    future["since"] = "2099-01-01T00:00:00.000Z"
    future.pop("seen", None)
    assert ids(await pull_all(vendor.connector(), cursor=future)) == []


async def test_401_is_an_auth_error_naming_the_setting(vendor: Running) -> None:
    vendor.state.add_people(3)
    with pytest.raises(AuthError) as info:
        await pull_all(vendor.connector(token="wrong-" + TOKEN))
    message = str(info.value)
    assert TOKEN not in message
    assert "wrong-" not in message
    assert "setting of connector" in message
    assert "401" in message or "403" in message
    with pytest.raises(AuthError):
        await vendor.connector(token="wrong-" + TOKEN).check()
    assert await vendor.connector().check()


async def test_429_is_retried_honouring_retry_after(vendor: Running) -> None:
    vendor.state.add_people(30)
    vendor.state.faults.append(Fault(429, retry_after="1"))
    started = time.monotonic()
    pages = await pull_all(vendor.connector())
    assert time.monotonic() - started >= 1.0
    assert len(set(ids(pages))) == 30
    assert vendor.state.statuses.count(429) == 1


async def test_500_is_retried_then_transient(vendor: Running) -> None:
    vendor.state.add_people(30)
    vendor.state.faults.append(Fault(500))
    assert len(set(ids(await pull_all(vendor.connector())))) == 30
    vendor.state.faults.extend(Fault(503) for _ in range(10))
    with pytest.raises(TransientError, match="503"):
        await pull_all(vendor.connector())


async def test_malformed_body_is_retried_then_a_clear_error(vendor: Running) -> None:
    vendor.state.add_people(30)
    vendor.state.faults.append(Fault(malformed=True))
    assert len(set(ids(await pull_all(vendor.connector())))) == 30
    vendor.state.faults.extend(Fault(malformed=True) for _ in range(10))
    with pytest.raises(TransientError, match="not valid JSON"):
        await pull_all(vendor.connector())


async def test_dropped_connection_is_retried(vendor: Running) -> None:
    """The server closes the connection halfway through a body: a transient error, retried."""
    vendor.state.add_people(30)
    await pull_all(vendor.connector())
    clean = len(vendor.state.requests)
    vendor.state.faults.append(Fault(dropped=True))
    assert sorted(ids(await pull_all(vendor.connector()))) == sorted(vendor.want(range(1, 31)))
    assert len(vendor.state.requests) == 2 * clean + 1  # the dropped one, sent again


async def test_401_mid_run_stops_with_a_resumable_checkpoint(vendor: Running) -> None:
    vendor.state.add_people(200)
    committed: list[Page] = []
    vendor.state.faults.append(Fault(401))  # applies to the next request: the first page
    with pytest.raises(AuthError):
        await pull_all(vendor.connector(page_size=50))
    connector = vendor.connector(page_size=50)

    async def revoked_after_first_page() -> None:
        async for page in connector.pull("contacts", None):
            committed.append(page)
            vendor.state.faults.append(Fault(401))

    with pytest.raises(AuthError):
        await revoked_after_first_page()
    assert len(committed) == 1
    rest = await pull_all(vendor.connector(page_size=50), cursor=committed[-1].next_cursor)
    assert set(ids(committed)) | set(ids(rest)) == vendor.want(range(1, 201))


async def test_refused_position_resyncs_the_stream(
    vendor: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A source that refuses the stored position (a 400 for the first request of an
    incremental run: a `since` or a token it no longer takes) gets a scoped resync of the
    stream, every record once; refused again on a fresh start, the run stops clearly."""
    vendor.state.add_people(120)
    full = await pull_all(vendor.connector(page_size=50))
    vendor.state.touch([5, 60])
    vendor.state.faults.append(Fault(400))
    again = ids(await pull_all(vendor.connector(page_size=50), cursor=full[-1].next_cursor))
    assert sorted(again) == sorted(vendor.want(range(1, 121)))
    assert vendor.state.statuses.count(400) == 1
    assert "resyncing the stream" in caplog.text
    vendor.state.faults.extend([Fault(400), Fault(400)])
    with pytest.raises(PermanentError, match="400"):
        await pull_all(vendor.connector(page_size=50), cursor=full[-1].next_cursor)


async def test_refused_mid_run_resumes_from_the_last_page(vendor: Running) -> None:
    """A page token or offset refused mid-run (expired, past a cap): the pull resumes from the
    last page's cursor, and no record is lost or repeated."""
    vendor.state.add_people(230)
    got: list[str] = []
    async for page in vendor.connector(page_size=50).pull("contacts", None):
        got += [r.external_id for r in page.records if r.kind == "contact"]
        if len(got) == 50:
            vendor.state.faults.append(Fault(400))
    assert sorted(got) == sorted(vendor.want(range(1, 231)))
    assert vendor.state.statuses.count(400) == 1


async def test_slow_response_times_out_and_is_retried(vendor: Running) -> None:
    vendor.state.add_people(20)
    vendor.state.faults.append(Fault(delay=0.5))
    pages = await pull_all(vendor.connector(timeout=0.2))
    assert set(ids(pages)) == vendor.want(range(1, 21))


async def test_wrong_base_url_is_a_permanent_error(vendor: Running) -> None:
    connector = vendor.connector(base_url=vendor.url + "/nowhere")
    with pytest.raises(PermanentError):
        await pull_all(connector)


async def test_fault_storm_every_record_exactly_once(vendor: Running) -> None:
    """30% of requests answered 429 or 503: the run still delivers every record."""
    vendor.state.add_people(400)
    vendor.state.fault_rate = 0.3
    connector = vendor.connector(page_size=50)
    got = ids(await pull_all(connector))
    assert set(got) == vendor.want(range(1, 401))
    assert len(got) == 400


async def test_activities_map_and_resume(vendor: Running) -> None:
    count = vendor.vendor.activity_count
    if count is None:
        # No account-wide activity feed at this vendor: the connector must not offer the stream.
        assert "activities" not in vendor.connector().streams
        return
    vendor.state.add_people(40)
    vendor.state.add_events(2, start=vendor.state.clock + timedelta(seconds=5))
    pages = await pull_all(vendor.connector(page_size=30), "activities")
    acts = records(pages, "activity")
    assert len({r.external_id for r in acts}) == count(vendor.state)
    mapping = load_mapping(mapping_path_for(vendor.vendor.kind))
    mapped = [mapping.map_activity(r.payload) for r in acts]
    assert all(m.record.participants for m in mapped)
    assert "person7@example.com" in {p for m in mapped for p in m.record.participants}
    before = count(vendor.state)
    vendor.state.add_events(2, start=vendor.state.clock + timedelta(seconds=5))
    more = await pull_all(vendor.connector(page_size=30), "activities", pages[-1].next_cursor)
    new = {r.external_id for r in records(more, "activity")} - {r.external_id for r in acts}
    assert len(new) == count(vendor.state) - before
