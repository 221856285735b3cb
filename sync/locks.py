"""A per-connector lease in Redis: one sync of a connector at a time, across every worker.

The lease is a key holding its owner's token with a TTL. The holder renews it every third of
the TTL while its run goes on; a worker that dies (SIGKILL, power loss) stops renewing, so the
key expires on its own and another worker can take the connector over. Renewal and release
compare the token first (Lua, atomic), so a worker never extends or deletes a lease it lost.

A holder that cannot renew in time (Redis unreachable, process paused past the TTL) cancels its
own run: the committed pages stand and the next holder resumes from the cursor. The page it was
writing may still commit after the next holder started: `fence` makes page transactions of one
connector wait for each other in the store, so that late page is applied whole and the next
holder's copy of it finds its records staged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Connection, text

from crmhub.errors import CrmHubError

__all__ = ["ConnectorLocked", "Lease", "LeaseLost", "connector_lease", "fence", "lease_key"]

log = logging.getLogger("crmhub.locks")

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def lease_key(namespace: str, connector: str) -> str:
    return f"{namespace}crmhub:lease:{connector}"


def fence(conn: Connection, connector: str) -> None:
    """Wait for any other open page transaction of `connector`; held until this one ends.

    PostgreSQL only (a transaction-level advisory lock); SQLite's `BEGIN IMMEDIATE` already
    lets one writer in at a time. Call first in the page's transaction, before staging reads.
    """
    if conn.dialect.name != "postgresql":
        return
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": fence_key(connector)})


def fence_key(connector: str) -> int:
    """The advisory lock key `fence` takes: `pg_locks` shows who holds it (classid is its
    high 32 bits, objid its low 32 bits)."""
    digest = hashlib.blake2b(f"crmhub:sync:{connector}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class LeaseLost(Exception):
    """The lease expired or was taken over while its holder was still running."""


class Lease:
    """One connector's lock. `owner` identifies the holder (host:pid:random) for operators."""

    def __init__(self, redis: Redis, key: str, ttl: float) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = max(1, int(ttl * 1000))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        renewed = self.redis.eval(_RENEW, 1, self.key, self.owner, str(self.ttl_ms))
        return bool(await renewed)  # type: ignore[misc]

    async def release(self) -> None:
        await self.redis.eval(_RELEASE, 1, self.key, self.owner)  # type: ignore[misc]

    async def holder(self) -> str | None:
        value = await self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Keep the (already acquired) lease renewed while the body runs; release it after.

        If renewal fails until the lease would have expired, the body's task is cancelled.
        """
        body = asyncio.current_task()
        assert body is not None
        lost = False

        async def keep_renewing() -> None:
            nonlocal lost
            ttl, every = self.ttl_ms / 1000, self.ttl_ms / 3000
            renewed_at = time.monotonic()
            while True:
                await asyncio.sleep(every)
                sent = time.monotonic()  # a renewal keeps the key until sent + ttl at least
                try:
                    if not await self.renew():
                        lost = True
                except (RedisError, OSError) as exc:
                    log.warning("lease renewal failed", extra={"key": self.key, "error": str(exc)})
                    lost = time.monotonic() >= renewed_at + ttl
                else:
                    gap = sent - renewed_at
                    if gap > 2 * every:
                        # The event loop was starved (heavy pages on a busy machine) and came
                        # close to losing the lease: the fix is a longer lease.
                        log.warning(
                            "lease renewed late", extra={"key": self.key, "gap": round(gap, 2)}
                        )
                    renewed_at = sent
                if lost:
                    log.error(
                        "lease lost; stopping the run (raise [queue] lease_seconds if this "
                        "worker was busy, not dead)",
                        extra={"key": self.key},
                    )
                    body.cancel()
                    return

        renewer = asyncio.create_task(keep_renewing())
        try:
            yield
        except asyncio.CancelledError:
            if lost:
                raise LeaseLost(self.key) from None
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            if not lost:
                with contextlib.suppress(RedisError, OSError):
                    await self.release()


class ConnectorLocked(CrmHubError):
    """Another process (a `crmhub worker`) holds the connector's lease: nothing was done."""


@contextlib.asynccontextmanager
async def connector_lease(
    redis: Redis, namespace: str, connector: str, ttl: float
) -> AsyncIterator[None]:
    """Hold `connector`'s lease around an in-process run (`crmhub sync NAME`), as a job does.

    Raises `ConnectorLocked` at once if someone holds it, `LeaseLost` if it is lost mid-run.
    """
    lease = Lease(redis, lease_key(namespace, connector), ttl)
    if not await lease.acquire():
        holder = await lease.holder()
        raise ConnectorLocked(
            f"{connector}: a worker is syncing it right now (lock held by {holder}); nothing "
            f"was done. Let that run finish (`crmhub runs --connector {connector}`; a dead "
            "worker's lock expires after [queue] lease_seconds), or queue one after it with "
            f"`crmhub sync {connector} --enqueue`.",
            connector=connector,
            holder=holder,
        )
    async with lease.held():
        yield
