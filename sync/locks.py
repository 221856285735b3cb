"""A per-connector lease in Redis: one sync of a connector at a time, across every worker.

The lease is a key holding its owner's token with a TTL. The holder renews it every third of
the TTL while its run goes on; a worker that dies (SIGKILL, power loss) stops renewing, so the
key expires on its own and another worker can take the connector over. Renewal and release
compare the token first (Lua, atomic), so a worker never extends or deletes a lease it lost.

A holder that cannot renew in time (Redis unreachable, process paused past the TTL) cancels its
own run: the committed pages stand and the next holder resumes from the cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ["Lease", "LeaseLost", "lease_key"]

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
            valid_until = time.monotonic() + self.ttl_ms / 1000
            while True:
                await asyncio.sleep(self.ttl_ms / 3000)
                try:
                    if not await self.renew():
                        lost = True
                except (RedisError, OSError) as exc:
                    log.warning("lease renewal failed", extra={"key": self.key, "error": str(exc)})
                    lost = time.monotonic() >= valid_until
                else:
                    valid_until = time.monotonic() + self.ttl_ms / 1000
                if lost:
                    log.error("lease lost; stopping the run", extra={"key": self.key})
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
