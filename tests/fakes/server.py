"""Run a fake vendor ASGI app as a real HTTP server on 127.0.0.1, with injectable faults.

`FakeServer(app_factory(state))` starts uvicorn on an ephemeral port in a background thread;
`state.faults` scripts what the next matching requests get (429 with Retry-After, 5xx,
malformed JSON, slowness, 401) and `state.fault_rate` answers a random share of requests
with 429 or 503, seeded so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

ErrorBody = Callable[[int, str], tuple[dict[str, Any], dict[str, str]]]


@dataclass
class Fault:
    """What one request gets instead of its answer. `status` 0 means serve it normally."""

    status: int = 0
    retry_after: str | None = None
    malformed: bool = False
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
    deleted_at: datetime | None = None  # HubSpot archive / source-side deletion


@dataclass
class Event:
    id: int
    person_id: int
    kind: str  # sent | open | click | bounce | unsubscribe
    at: datetime
    subject: str = "Spring newsletter"


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

    def by_email(self, email: str) -> Person | None:
        wanted = email.strip().lower()
        for person in self.live():
            if person.email.lower() == wanted:
                return person
        return None

    def erase(self, person: Person) -> None:
        """A permanent (privacy) delete: the person is gone, with nothing left to read."""
        self.erased.add(person.email.lower())
        del self.people[person.id]

    def add_people(
        self,
        n: int,
        *,
        start: datetime | None = None,
        step_ms: int = 1000,
        same_time: bool = False,
        status_every: int = 0,
    ) -> list[Person]:
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
        at = at or (self.clock + timedelta(seconds=1))
        self.clock = max(self.clock, at)
        for pid in ids:
            person = self.people[pid]
            for key, value in changes.items():
                setattr(person, key, value)
            person.updated = at

    def add_events(self, per_person: int = 2, *, start: datetime | None = None) -> None:
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
        return [p for p in self.people.values() if p.deleted_at is None]

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
            await JSONResponse(body, fault.status, headers=headers)(scope, receive, send)
            return
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

    def __init__(self, app: ASGIApp) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="error",
            lifespan="off",
            ws="none",
            http="h11",
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
