"""A small open-loop HTTP/1.1 load generator for loopback benchmarks.

Why not httpx: its connection pool scans every queued request on each assignment, so under
load the client itself burns a core (measured: as much CPU per request as the server) and,
on a 2-core box, steals it from the server it measures. This one keeps `connections`
keep-alive sockets, each taking the next due request from a queue; it costs a few tens of
microseconds per request.

Latency is measured from each request's *scheduled* send time, so time a request spent
waiting for a free connection counts (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Answer", "LoadResult", "Request", "post_open_loop"]


@dataclass(frozen=True, slots=True)
class Request:
    path: str
    body: bytes
    # Called right before sending, so time-stamped signatures are fresh.
    headers: Callable[[bytes], dict[str, str]]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    latency: float  # seconds from the scheduled send time to the whole response


@dataclass(slots=True)
class LoadResult:
    answers: list[Answer | None] = field(default_factory=list)  # None: no answer at all
    resent: int = 0  # requests sent again on a new connection after the old one broke
    elapsed: float = 0.0
    # How late this client's own event loop woke up (5 ms sleeps): on a loaded machine the
    # load generator is delayed too, and that delay is inside every latency it measures.
    loop_lag: list[float] = field(default_factory=list)


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: Request) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = [
            f"POST {request.path} HTTP/1.1",
            f"host: {self.host}:{self.port}",
            f"content-length: {len(request.body)}",
        ]
        head += [f"{k}: {v}" for k, v in request.headers(request.body).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + request.body)
        status_line, *lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        length, close = 0, False
        for line in lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return int(status_line.split(b" ", 2)[1]), body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def post_open_loop(
    host: str,
    port: int,
    requests: list[Request],
    rate: float,
    connections: int,
    answer_within: float = 30.0,
) -> LoadResult:
    """Send `requests` at `rate` per second on a fixed schedule, whatever the answers do."""
    result = LoadResult(answers=[None] * len(requests))
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()

    async def worker() -> None:
        conn = _Connection(host, port)
        try:
            while (item := await queue.get()) is not None:
                index, scheduled = item
                request = requests[index]
                for attempt in range(2):
                    try:
                        status, body = await asyncio.wait_for(conn.exchange(request), answer_within)
                    except (TimeoutError, OSError, asyncio.IncompleteReadError):
                        # A broken keep-alive connection: a real sender retries the delivery
                        # (at least once); the server must answer the second copy `duplicate`
                        # if the first one got in.
                        conn.close()
                        result.resent += attempt == 0
                        continue
                    result.answers[index] = Answer(status, body, time.perf_counter() - scheduled)
                    break
        finally:
            conn.close()

    async def watch_lag() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            result.loop_lag.append(time.perf_counter() - before - 0.005)

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    watcher = asyncio.create_task(watch_lag())
    start = time.perf_counter()
    for index in range(len(requests)):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((index, scheduled))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    result.elapsed = time.perf_counter() - start
    watcher.cancel()
    return result
