"""Run a fake vendor ASGI app as a real HTTP server on 127.0.0.1, with injectable faults.

`FakeServer(app_factory(state))` starts uvicorn on an ephemeral port in a background thread;
`state.faults` scripts what the next matching requests get (429 with Retry-After, 5xx,
malformed JSON, a connection dropped mid-response, slowness, 401) and `state.fault_rate`
answers a random share of requests with 429 or 503, seeded so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import uvicorn
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

ErrorBody = Callable[[int, str], tuple[dict[str, Any], dict[str, str]]]


class FastJSON(JSONResponse):
    """A JSON response rendered by orjson: the fakes serve benchmarks at thousands of records
    a second, and must not be what the benchmark measures."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


@dataclass
class Fault:
    """What one request gets instead of its answer. `status` 0 means serve it normally."""

    status: int = 0
    retry_after: str | None = None
    malformed: bool = False
    dropped: bool = False  # headers and half a body, then the connection is closed
    delay: float = 0.0
    path: str = ""  # only requests whose path contains this


@dataclass
class Person:
    """A vendor-neutral person; each fake renders it in its own shape."""

    id: int
    first: str
    last: str
    email: str
    phone: str | None
    company: str | None
    created: datetime
    updated: datetime
    status: str = "subscribed"  # subscribed | unsubscribed | cleaned | archived
    status_at: datetime | None = None  # when `status` last changed (None: since `created`)
    deleted_at: datetime | None = None  # HubSpot archive / source-side deletion
    broken: bool = False  # rendered without its change timestamp: a record with missing fields
    # Source-side merges (`FakeState.merge`): who this person was merged into, who was merged
    # into them, and the addresses they took over (HubSpot keeps them as additional emails).
    merged_into: int | None = None
    merged_ids: list[int] = field(default_factory=list)
    extra_emails: list[str] = field(default_factory=list)


@dataclass
class Event:
    id: int
    person_id: int
    kind: str  # sent | open | click | bounce | unsubscribe | merged_profile
    at: datetime
    subject: str = "Spring newsletter"
    about: int | None = None  # merged_profile: the person merged away


@dataclass
class FakeState:
    token: str
    people: dict[int, Person] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    fault_rate: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    requests: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    # Limit actually enforced, requests per second (None: unlimited).
    enforce_rate: float | None = None
    _window: list[float] = field(default_factory=list)
    clock: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    # Write-back: addresses erased or blocklisted by a privacy delete (never re-created).
    erased: set[str] = field(default_factory=set)
    writes: list[tuple[str, str]] = field(default_factory=list)  # (what, email)
    # People the listings leave out while they still exist (a vendor-side glitch).
    hidden: set[int] = field(default_factory=set)
    # Benchmarks only: memoised listings (every person filtered and sorted), dropped on each
    # change made through this class. Off (None) in tests, which also edit people directly.
    views: dict[Hashable, Any] | None = None

    def view(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """`build()`, memoised under `key` while nothing changes (when `views` is on)."""
        if self.views is None:
            return build()
        if key not in self.views:
            self.views[key] = build()
        return self.views[key]

    def _changed(self) -> None:
        if self.views is not None:
            self.views.clear()

    def by_email(self, email: str) -> Person | None:
        wanted = email.strip().lower()
        for person in self.live():
            if person.email.lower() == wanted:
                return person
        return None

    def erase(self, person: Person) -> None:
        """A permanent (privacy) delete: the person is gone, with nothing left to read."""
        self._changed()
        self.erased.add(person.email.lower())
        del self.people[person.id]

    def merge(self, retired: int, survivor: int, *, at: datetime | None = None) -> Person:
        """A source-side merge: `retired` stops being listed, `survivor` is edited now and
        records the merged id (and those merged into it before) and takes its addresses."""
        old, keep = self.people[retired], self.people[survivor]
        old.merged_into = survivor
        keep.merged_ids += [retired, *old.merged_ids]
        keep.extra_emails += [old.email, *old.extra_emails]
        for p in self.people.values():
            if p.merged_into == retired:
                p.merged_into = survivor
        self.touch([survivor], at=at)
        return keep

    def add_people(
        self,
        n: int,
        *,
        start: datetime | None = None,
        step_ms: int = 1000,
        same_time: bool = False,
        status_every: int = 0,
    ) -> list[Person]:
        self._changed()
        start = start or self.clock
        first = max(self.people, default=0) + 1
        made = []
        for i in range(first, first + n):
            at = start if same_time else start + timedelta(milliseconds=step_ms * (i - first))
            status = "unsubscribed" if status_every and i % status_every == 0 else "subscribed"
            p = Person(
                i,
                f"First{i}",
                f"Last{i}",
                f"person{i}@example.com",
                f"+1415555{i % 10000:04d}",
                f"Company {i % 97}",
                start,
                at,
                status,
            )
            self.people[i] = p
            made.append(p)
        self.clock = max(self.clock, made[-1].updated) if made else self.clock
        return made

    def touch(self, ids: list[int], *, at: datetime | None = None, **changes: Any) -> None:
        """Edit people now (or `at`): their updated time moves past every earlier one."""
        self._changed()
        at = at or (self.clock + timedelta(seconds=1))
        self.clock = max(self.clock, at)
        for pid in ids:
            person = self.people[pid]
            if "status" in changes and changes["status"] != person.status:
                person.status_at = at
            for key, value in changes.items():
                setattr(person, key, value)
            person.updated = at

    def add_events(self, per_person: int = 2, *, start: datetime | None = None) -> None:
        self._changed()
        at = start or self.clock
        kinds = ["sent", "open", "click", "bounce"]
        next_id = len(self.events) + 1
        for pid in sorted(self.people):
            for k in range(per_person):
                at = at + timedelta(milliseconds=500)
                self.events.append(Event(next_id, pid, kinds[k % len(kinds)], at))
                next_id += 1
        self.clock = max(self.clock, at)

    def live(self) -> list[Person]:
        return [
            p
            for p in self.people.values()
            if p.deleted_at is None and p.merged_into is None and p.id not in self.hidden
        ]

    def next_fault(self, path: str) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if fault.path in path:
                return self.faults.pop(i)
        if self.fault_rate and self.rng.random() < self.fault_rate:
            return Fault(429, retry_after="0") if self.rng.random() < 0.5 else Fault(503)
        return None

    def over_limit(self) -> bool:
        if self.enforce_rate is None:
            return False
        now = time.monotonic()
        self._window = [t for t in self._window if now - t < 1.0]
        if len(self._window) >= self.enforce_rate:
            return True
        self._window.append(now)
        return False


def changed_second(p: Person) -> datetime:
    """When a person last changed, to the second (Mailchimp's and ActiveCampaign's filters)."""
    return p.updated.replace(microsecond=0)


def live_in_order(state: FakeState, by_change: bool) -> list[Person]:
    """Live people by (last change to the second, id), or by id."""
    if by_change:
        return sorted(state.live(), key=lambda p: (changed_second(p), p.id))
    return sorted(state.live(), key=lambda p: p.id)


def faulty(app: ASGIApp, state: FakeState, error_body: ErrorBody) -> ASGIApp:
    """Wrap a vendor app: log requests, apply scripted/random faults and the enforced limit."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"]
        state.requests.append(path)
        fault = state.next_fault(path)
        if fault is None and state.over_limit():
            fault = Fault(429, retry_after="1")
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.status:
            body, headers = error_body(fault.status, path)
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            state.statuses.append(fault.status)
            await FastJSON(body, fault.status, headers=headers)(scope, receive, send)
            return
        if fault is not None and fault.dropped:
            state.statuses.append(200)
            headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"results": [', "more_body": True})
            return  # the server gives up on the response: uvicorn closes the connection
        if fault is not None and fault.malformed:
            state.statuses.append(200)
            response = Response(
                b'{"results": [{"id": "1", "prop', 200, media_type="application/json"
            )
            await response(scope, receive, send)
            return

        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                state.statuses.append(message["status"])
            await send(message)

        await app(scope, receive, record)

    return wrapped


class FakeServer:
    """A real HTTP server for `app` on 127.0.0.1:<ephemeral>; use as a context manager."""

    def __init__(self, app: ASGIApp, *, http: Literal["h11", "httptools"] = "h11") -> None:
        """`http="httptools"` (a C parser) for benchmarks; tests keep the pure-Python h11."""
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="error",
            lifespan="off",
            ws="none",
            http=http,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
